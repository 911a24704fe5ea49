"""How library errors reach the command line: one line, naming the command-line option."""

from lowrank_cli.cli.app import render_error
from lowrank_cli.errors import LowrankError


def test_library_errors_name_arguments_and_the_cli_names_its_option():
    assert render_error(LowrankError("kappa must be a finite number > 0 (got inf)", param="kappa")) == "--kappa must be a finite number > 0 (got inf)"
    assert render_error(LowrankError("device 'tpu' is not supported", param="device")) == "--device 'tpu' is not supported"
    assert render_error(LowrankError("x.safetensors: already exists; overwrite it with force=True", param="force")) == (
        "x.safetensors: already exists; overwrite it with force=True (option --force)")
    assert render_error(LowrankError("no run here")) == "no run here"
    assert render_error(LowrankError("--model-arg 'x': expected KEY=VALUE", param="model_kwargs")) == "--model-arg 'x': expected KEY=VALUE"
