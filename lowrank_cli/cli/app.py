"""The `lowrank` command line: parse, call a pipeline, render. No algorithm lives here.

Commands are registered by name and imported only when one is run (click's lazy-loading
pattern), so that `lowrank --version` and `lowrank --help` import neither torch nor timm, and
each command imports only what it needs. Every `LowrankError` (and every usage error) becomes
one line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import datetime
import importlib
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from lowrank_cli._version import __version__
from lowrank_cli.errors import LowrankError

# name -> (module under lowrank_cli.cli.commands, one-line help shown by `lowrank --help`)
COMMANDS = {
    "inspect": ("inspect", "What is in a checkpoint, which linear layers can be factorized, and what each saves."),
    "factorize": ("factorize", "Replace each selected nn.Linear by two thin linears from its truncated SVD (PELA)."),
    "convert": ("convert", "Convert a pickled PyTorch state dict to safetensors, loading it with weights_only=True."),
    "compress": ("compress", "Factorize a checkpoint, then distill it against the original (PELA or PC-LoRA)."),
    "distill": ("distill", "Distill an already factorized checkpoint against its dense original."),
    "evaluate": ("evaluate", "Held-out quality by task: top-1/top-5, perplexity or embedding cosine (with --teacher, the teacher's too)."),
    "export": ("export", "Deployable artifacts: verified ONNX, dense weights, or a dtype-cast factorized checkpoint."),
    "bench": ("bench", "Latency of a factorized model vs its dense baseline: measured speedup, ideal (MAC ratio), efficiency."),
    "demo": ("demo", "Train a small ViT on handwritten digits, factorize it, distill it, and report the accuracy recovered."),
    "recipes": ("recipes", "The bundled recipes (what each selects, its κ or budget, how long it trains), or one recipe's every setting."),
}

ARGV: List[str] = []  # the arguments `main` parsed, for relaunching a command under torchrun (`launch.py`)
STARTED_ENV = "LOWRANK_COMMAND_STARTED"  # the launcher's start (Unix time), for the processes torchrun starts
_started = [time.perf_counter()]


def command_started() -> float:
    """When the command began, on the `time.perf_counter()` clock: the clock of a time budget (`--budget`). Under torchrun,
    when the launching command began."""
    return _started[0]


def _start_clock() -> None:
    now = time.perf_counter()
    launched = os.environ.get(STARTED_ENV) if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    try:
        _started[0] = now - min(max(0.0, time.time() - float(launched)), 86400.0) if launched else now
    except ValueError:
        _started[0] = now


def command_started_unix() -> float:
    """`command_started()` as Unix time (for the processes a launcher starts)."""
    return time.time() - (time.perf_counter() - _started[0])

# The command-line option for each library argument or recipe key that errors name (`LowrankError.param`).
FLAGS = {
    "model": "--model", "model_kwargs": "--model-arg", "kappa": "--kappa", "factorize.kappa": "--kappa",
    "out": "--out", "force": "--force", "device": "--device", "data": "--data", "calib_data": "--calib-data",
    "calib_samples": "--calib-samples", "epochs": "--epochs", "teacher": "--teacher", "nproc": "--nproc",
    "nnodes": "--nnodes", "node_rank": "--node-rank", "rdzv_endpoint": "--rdzv-endpoint",
    "batch": "--batch", "batch_size": "--batch-size", "threads": "--threads", "runtime": "--runtime", "repeats": "--repeats",
    "format": "--format", "dtype": "--dtype", "opset": "--opset", "img_size": "--img-size", "baseline": "--baseline",
    "method": "--method", "recipe": "--recipe", "resume": "--resume", "spectrum": "--spectrum", "seq_len": "--seq-len",
    "max_shard_size": "--max-shard-size", "strategy": "--strategy", "budget": "--budget", "kv_cache": "--kv-cache",
    "base_model": "--base-model", "overrides": "--set", "tasks": "--tasks", "pairs": "--pairs",
}


def _one_line(msg: str) -> str:
    """A message on one line; a LowrankError re-raised from a DataLoader worker carries the worker's traceback: keep its own text."""
    lines = [line for line in msg.strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return msg.strip()
    for line in reversed(lines):
        if "LowrankError: " in line:
            return line.split("LowrankError: ", 1)[1].strip()
    return lines[0]


def render_error(e: LowrankError) -> str:
    """The one line printed for a library error, naming the command-line option it is about.

    A message that starts with the argument's name gets the option in its place
    (`kappa must be ...` → `--kappa must be ...`); another gets `(option --kappa)` appended.
    """
    msg = _one_line(str(e))
    flag = FLAGS.get(e.param or "")
    if flag is None or flag in msg:
        return msg
    for lead in (f"{e.param} ", f"{e.param}:"):
        if msg.startswith(lead):
            return flag + msg[len(e.param):]
    return f"{msg} (option {flag})"


class _Listed(TyperCommand):
    """A command's name and one-line help, for `--help`, before its module is imported."""


def load_command(name: str) -> TyperCommand:
    """The command `name`, imported now."""
    module = importlib.import_module(f"lowrank_cli.cli.commands.{COMMANDS[name][0]}")
    command = typer.main.get_command(module.app)
    command.name = name
    return command


class LazyGroup(TyperGroup):
    """Lists every command from `COMMANDS` (for `--help`) and imports one only when it is run."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for name, (_, short) in COMMANDS.items():
            self.commands.setdefault(name, _Listed(name, help=short, short_help=short))

    def resolve_command(self, ctx, args: List[str]):
        if args and args[0] in COMMANDS and isinstance(self.commands[args[0]], _Listed):
            self.commands[args[0]] = load_command(args[0])
        return super().resolve_command(ctx, args)


app = typer.Typer(
    name="lowrank",
    cls=LazyGroup,
    help="Make transformer checkpoints smaller and faster by low-rank factorization (PELA, PC-LoRA).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        typer.echo(f"lowrank {__version__}")
        raise typer.Exit()


INTERNAL_ERROR = 3  # the exit status of an error lowrank did not foresee (1: the user's input, 2: usage, 130: Ctrl-C)


def _command_name() -> str:
    return next((a for a in ARGV if not a.startswith("-")), "")


def _log_traceback(command: str) -> Path | None:
    """Write the current exception's traceback to a log file; its path, or None if no folder takes it."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"lowrank-{command or 'main'}-{stamp}-{os.getpid()}.log"
    cache = os.environ.get("LOWRANK_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "lowrank")
    for folder in (Path(cache) / "logs", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            path = folder / name
            path.write_text(f"lowrank {__version__}, python {sys.version.split()[0]}\nargv: {ARGV}\n\n{traceback.format_exc()}")
            return path
        except OSError:
            continue
    return None


def _internal_error(e: BaseException) -> None:
    """The last line of defence: one line naming the command and the exception, the traceback in a log file."""
    command = _command_name()
    if os.environ.get("LOWRANK_DEBUG") == "1":
        traceback.print_exc()
        sys.exit(INTERNAL_ERROR)
    log = _log_traceback(command)
    text = (str(e).strip().splitlines() or [""])[0]
    where = f"; traceback in {log}" if log else ""
    print(f"error: lowrank {command} failed with {type(e).__name__}: {text} (an internal error{where}; LOWRANK_DEBUG=1 prints it)".replace("lowrank  ", "lowrank "),
          file=sys.stderr)
    sys.exit(INTERNAL_ERROR)


def main(argv: Optional[List[str]] = None) -> None:
    """Console entry point: one-line errors, no tracebacks for anything the user can fix."""
    ARGV[:] = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    _start_clock()
    try:
        _main(argv)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)


def _main(argv: Optional[List[str]]) -> None:
    try:
        rv = app(args=argv, standalone_mode=False)
    except LowrankError as e:
        print(f"error: {render_error(e)}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # click's usage errors (typer vendors click: matched by shape, not by class)
        if type(e).__name__ == "NoArgsIsHelpError":  # the help is already printed
            sys.exit(0)
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):
            print(f"error: {e.format_message().replace('Value error, ', '')}", file=sys.stderr)  # a Literal option's wrong choice
            sys.exit(e.exit_code)
        if type(e).__name__ == "Abort":
            print("error: aborted", file=sys.stderr)
            sys.exit(130)
        _internal_error(e)
    if rv == 130:  # typer turns Ctrl-C inside a command into a silent exit status 130
        print("error: interrupted", file=sys.stderr)
    sys.exit(rv if isinstance(rv, int) else 0)
