"""Help texts: options that take text or images say both, enumerations show their choices (and a wrong value is refused by
listing them), every command that takes a recipe takes `--set`, and no option promises what its command does not do."""

import pytest
from conftest import one_line_error

from lowrank_cli.cli.app import COMMANDS, load_command

# options whose help must serve text and image models alike
NEUTRAL = {("compress", "--data"), ("distill", "--data"), ("evaluate", "--data"), ("factorize", "--calib-data"),
           ("factorize", "--calib-samples"), ("evaluate", "--batch-size"), ("bench", "--batch")}
IMAGE_ONLY = {"--img-size", "--skip-unreadable"}  # these apply to images alone, and say so first
CHOICES = [("export", "--format", ("onnx", "dense", "safetensors", "hf")), ("export", "--dtype", ("float32", "float16", "bfloat16")),
           ("bench", "--runtime", ("torch", "onnxruntime")), ("compress", "--strategy", ("ddp", "fsdp")),
           ("distill", "--strategy", ("ddp", "fsdp")), ("demo", "--method", ("pela", "pclora"))]


def options(name: str) -> dict[str, str]:
    """`{flag: help}` of a command's options."""
    return {opt: p.help or "" for p in load_command(name).params for opt in getattr(p, "opts", []) if opt.startswith("--")}


def test_the_named_options_speak_of_text_too():
    for command, flag in NEUTRAL:
        help_text = options(command)[flag].lower()
        assert "text" in help_text, (command, flag, help_text)


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "demo"])  # the demo trains on digits: images by design
def test_no_option_assumes_images(command):
    for flag, help_text in options(command).items():
        if "image" in help_text.lower():
            assert "text" in help_text.lower() or (flag in IMAGE_ONLY and help_text.startswith("Image")), (command, flag, help_text)


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_runs_and_lists_no_choices_in_prose(cli, command):
    r = cli(command, "--help")
    assert r.code == 0 and "Usage" in r.out, r.err
    for flag, help_text in options(command).items():
        assert " | " not in help_text, (command, flag, help_text)  # `a | b` in words: a Literal option shows them itself


@pytest.mark.parametrize("command,flag,choices", CHOICES)
def test_choices_are_shown_and_a_wrong_value_is_refused_by_listing_them(cli, tmp_path, command, flag, choices):
    assert f"<{'|'.join(choices)}>" in cli(command, "--help").out
    args = [command] + ([str(tmp_path / "x.safetensors")] if command in ("export", "bench", "compress") else [])
    args += ["--teacher", str(tmp_path / "t.safetensors"), str(tmp_path / "s.safetensors")] if command == "distill" else []
    listed = ", ".join(f"'{c}'" for c in choices)
    one_line_error(cli(*args, flag, "nope"), f"Invalid value for '{flag}", f"'nope' is not one of {listed}.", code=2)
    assert list(tmp_path.iterdir()) == []


def test_every_command_with_a_recipe_takes_set():
    with_recipe = [c for c in COMMANDS if "--recipe" in options(c)]
    assert sorted(with_recipe) == ["compress", "distill", "factorize", "inspect"]
    for command in with_recipe:
        assert "distill.lr=1e-4" in options(command)["--set"]


def test_evaluate_takes_no_recipe_and_its_help_names_none():
    opts = options("evaluate")
    assert "--recipe" not in opts and "--set" not in opts
    assert "recipe" not in opts["--model"].lower() and "manifest" in opts["--model"]


def test_epochs_says_what_it_does_to_the_step_cap():
    for command in ("compress", "distill"):
        assert "distill.max_steps" in options(command)["--epochs"] and "distill.budget" in options(command)["--epochs"]
