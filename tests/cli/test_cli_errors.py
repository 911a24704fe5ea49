"""How errors reach the command line: one line, naming the command-line option; the unforeseen ones too."""

from pathlib import Path

from conftest import one_line_error

from lowrank_cli.cli.app import render_error
from lowrank_cli.errors import LowrankError


def test_library_errors_name_arguments_and_the_cli_names_its_option():
    assert render_error(LowrankError("kappa must be a finite number > 0 (got inf)", param="kappa")) == "--kappa must be a finite number > 0 (got inf)"
    assert render_error(LowrankError("device 'tpu' is not supported", param="device")) == "--device 'tpu' is not supported"
    assert render_error(LowrankError("x.safetensors: already exists; overwrite it with force=True", param="force")) == (
        "x.safetensors: already exists; overwrite it with force=True (option --force)")
    assert render_error(LowrankError("no run here")) == "no run here"
    assert render_error(LowrankError("--model-arg 'x': expected KEY=VALUE", param="model_kwargs")) == "--model-arg 'x': expected KEY=VALUE"


def test_an_error_from_a_data_loader_worker_stays_one_line():
    wrapped = LowrankError("Caught LowrankError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n  File \"x.py\", line 1\n"
                           "lowrank_cli.errors.LowrankError: /data/train/cat/3.png: cannot be read as an image\n")
    assert render_error(wrapped) == "/data/train/cat/3.png: cannot be read as an image"


def test_an_unexpected_exception_is_one_line_with_a_log_and_exit_3(cli, monkeypatch, tmp_path, vit_ckpt):
    def boom(*a, **k):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setenv("LOWRANK_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LOWRANK_DEBUG", raising=False)
    import lowrank_cli.cli.commands.inspect as cmd

    monkeypatch.setattr(cmd, "inspect_checkpoint", lambda *a, **k: boom())
    r = cli("inspect", vit_ckpt)
    line = one_line_error(r, "lowrank inspect failed with ZeroDivisionError: division by zero", "traceback in", code=3)
    log = Path(line.split("traceback in ")[1].split(";")[0])
    assert log.parent == tmp_path / "cache" / "logs" and "ZeroDivisionError" in log.read_text() and "Traceback" in log.read_text()
    monkeypatch.setenv("LOWRANK_DEBUG", "1")
    r = cli("inspect", vit_ckpt)
    assert r.code == 3 and "Traceback (most recent call last)" in r.err


def test_ctrl_c_is_one_line_and_exit_130(cli, monkeypatch, vit_ckpt):
    import lowrank_cli.cli.commands.inspect as cmd

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cmd, "inspect_checkpoint", interrupt)
    one_line_error(cli("inspect", vit_ckpt), "interrupted", code=130)
