"""The `lowrank` command line: parse, call the library, print. No algorithm lives here.

Every `LowrankError` (and every usage error) becomes one line on stderr and exit status 1
(2 for usage errors), never a traceback.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from lowrank_cli import __version__
from lowrank_cli.errors import LowrankError

app = typer.Typer(
    name="lowrank",
    help="Make transformer checkpoints smaller and faster by low-rank factorization (PELA, PC-LoRA).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

# Options shared by several commands
ModelOpt = typer.Option(None, "--model", "-m", help="timm architecture name (default: the recipe's 'model').")
ModelArgOpt = typer.Option(None, "--model-arg", help="Architecture setting KEY=VALUE, repeatable (e.g. img_size=384).")
RecipeOpt = typer.Option(None, "--recipe", "-r", help="Recipe: a bundled name (deit, swin, ...) or a YAML path.")
KappaOpt = typer.Option(None, "--kappa", "-k", help="Compression ratio κ: rank r = floor(d_in·d_out / (κ(d_in+d_out))). Overrides the recipe.")
JsonOpt = typer.Option(False, "--json", help="Print one JSON object on stdout and nothing else.")
LatencyOpt = typer.Option(False, "--latency-aware", help="Time each planned layer dense vs factorized on this device; keep dense those not faster by select.latency_margin.")


def _print_json(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def _recipe(recipe: Optional[str], kappa: Optional[float]):
    from lowrank_cli.recipe import load_recipe

    return load_recipe(recipe).with_kappa(kappa)


@app.callback(invoke_without_command=True)
def _root(version: bool = typer.Option(False, "--version", help="Print the version and exit.")) -> None:
    if version:
        typer.echo(f"lowrank {__version__}")
        raise typer.Exit()


@app.command()
def inspect(
    checkpoint: Optional[Path] = typer.Argument(None, help="A .safetensors file (any model, factorized or not)."),
    model: Optional[str] = ModelOpt,
    model_arg: Optional[List[str]] = ModelArgOpt,
    recipe: Optional[str] = RecipeOpt,
    kappa: Optional[float] = KappaOpt,
    spectrum: bool = typer.Option(False, "--spectrum", help="Show the singular-value energy kept at each layer's rank."),
    latency_aware: bool = LatencyOpt,
    as_json: bool = JsonOpt,
) -> None:
    """What is in a checkpoint, which linear layers can be factorized, and what each saves."""
    from lowrank_cli.models import parse_model_args
    from lowrank_cli.pipeline import inspect_checkpoint
    from lowrank_cli.report import print_inspection

    r = _recipe(recipe, kappa).with_latency_aware(latency_aware)
    if checkpoint is None and model is None and r.model is None:
        raise LowrankError("give a checkpoint, or an architecture with --model (e.g. --model deit_base_patch16_224)")
    insp = inspect_checkpoint(checkpoint, r, model, parse_model_args(model_arg), spectrum=spectrum)
    if as_json:
        _print_json(insp.to_dict())
    else:
        print_inspection(insp, spectrum=spectrum)


@app.command()
def factorize(
    checkpoint: Optional[Path] = typer.Argument(None, help="The .safetensors checkpoint (default: the recipe's 'checkpoint')."),
    recipe: Optional[str] = RecipeOpt,
    model: Optional[str] = ModelOpt,
    model_arg: Optional[List[str]] = ModelArgOpt,
    kappa: Optional[float] = KappaOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file (default: <input>.lowrank.safetensors)."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists (never the input)."),
    calib_data: Optional[str] = typer.Option(None, "--calib-data", help="Calibration images for factorize.method whitened/asvd: a folder, 'digits' or 'synthetic'."),
    calib_samples: Optional[int] = typer.Option(None, "--calib-samples", help="Number of calibration images (default: the recipe's, 256)."),
    latency_aware: bool = LatencyOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Replace each selected nn.Linear by two thin linears from its truncated SVD (PELA)."""
    from lowrank_cli.models import parse_model_args
    from lowrank_cli.pipeline import factorize_checkpoint
    from lowrank_cli.report import allocation_table, console, err_console, latency_table, layer_progress, summary_table

    r = _recipe(recipe, kappa).with_latency_aware(latency_aware)
    checkpoint = checkpoint or (Path(r.checkpoint) if r.checkpoint else None)
    if checkpoint is None and model is None and r.model is None:
        raise LowrankError("give a checkpoint (or 'checkpoint:' in the recipe), or an architecture with --model")
    if checkpoint is None:
        err_console.print(f"[yellow]note:[/] no checkpoint given: factorizing {model or r.model} with random weights")
    with layer_progress("SVD") as progress:
        result = factorize_checkpoint(checkpoint, r, out, model, parse_model_args(model_arg), force, progress, calib_data, calib_samples)
    if as_json:
        _print_json({"out": str(result.out), **result.inspection.to_dict()})
        return
    if result.inspection.allocation is not None:
        console.print(allocation_table(result.inspection.allocation))
    if result.inspection.latency is not None:
        console.print(latency_table(result.inspection.latency))
    console.print(summary_table(result.inspection, title=f"Factorized → {result.out}"))
    dense = [p for p in result.inspection.layers if not p.factorized and not (p.latency or {}).get("kept_dense")]
    if dense:
        reasons: dict[str, int] = {}
        for p in dense:
            reasons[p.reason] = reasons.get(p.reason, 0) + 1
        for reason, n in reasons.items():
            console.print(f"  [dim]{n} left dense: {reason}[/]")


@app.command()
def convert(
    source: Path = typer.Argument(..., help="A PyTorch .pth/.pt/.bin state dict."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output .safetensors (default: beside the input)."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists."),
) -> None:
    """Convert a pickled PyTorch state dict to safetensors, loading it with weights_only=True."""
    from lowrank_cli.convert import convert_pickle
    from lowrank_cli.report import console

    written, n = convert_pickle(source, out, force)
    console.print(f"wrote {written} ({n} tensors)")


@app.command()
def export(
    model: Optional[Path] = typer.Argument(None, help="A factorized checkpoint or a run directory (default: the newest run under ./runs/)."),
    fmt: str = typer.Option("onnx", "--format", "-f", help="onnx | dense | safetensors"),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Output file (default: beside the input)."),
    img_size: Optional[int] = typer.Option(None, "--img-size", help="ONNX input image size (default: the model's)."),
    opset: int = typer.Option(18, "--opset", help="ONNX opset version."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 | float16 | bfloat16 (dense and safetensors)."),
    force: bool = typer.Option(False, "--force", help="Overwrite --out if it exists (never the input)."),
    as_json: bool = JsonOpt,
) -> None:
    """Deployable artifacts: verified ONNX, dense timm weights, or a dtype-cast factorized checkpoint."""
    from lowrank_cli.export import export_checkpoint
    from lowrank_cli.report import console, export_table

    result = export_checkpoint(model, fmt, out, img_size=img_size, opset=opset, dtype=dtype, force=force)
    if as_json:
        _print_json(result.to_dict())
    else:
        console.print(export_table(result))


@app.command()
def bench(
    model: Optional[Path] = typer.Argument(None, help="A factorized checkpoint or a run directory (default: the newest run under ./runs/)."),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="Dense checkpoint to compare with (default: the model merged dense)."),
    batch: int = typer.Option(8, "--batch", "-b", help="Images per forward pass."),
    threads: Optional[int] = typer.Option(None, "--threads", help="Intra-op threads (default: the runtime's)."),
    runtime: str = typer.Option("torch", "--runtime", help="torch | onnxruntime"),
    device: Optional[str] = typer.Option(None, "--device", help="cpu | cuda (default: cuda when available)."),
    repeats: int = typer.Option(10, "--repeats", help="Timed runs of each model, interleaved."),
    warmup: int = typer.Option(2, "--warmup", help="Untimed runs of each model first."),
    layers: bool = typer.Option(False, "--layers", help="Also time each factorized linear against its dense shape."),
    as_json: bool = JsonOpt,
) -> None:
    """Latency of a factorized model vs its dense baseline: measured speedup, ideal (MAC ratio), efficiency."""
    from lowrank_cli.bench import bench_checkpoint
    from lowrank_cli.report import bench_tables, console

    result = bench_checkpoint(model, baseline, batch=batch, threads=threads, runtime=runtime, device=device,
                              layers=layers, warmup=warmup, repeats=repeats)
    if as_json:
        _print_json(result.to_dict())
    else:
        for table in bench_tables(result):
            console.print(table)


DeviceOpt = typer.Option("auto", "--device", help="auto (CUDA when available), cpu or cuda.")
DataOpt = typer.Option(None, "--data", "-d", help="Image folder (ROOT/train/<class>/*, ROOT/val/<class>/*), 'digits' or 'synthetic' (default: the recipe's data.source).")


def _is_main_process() -> bool:
    import os

    return int(os.environ.get("RANK", "0")) == 0


_ARGV: List[str] = []  # the arguments `main` parsed, for relaunching a command under torchrun


def _argv_without_nproc() -> List[str]:
    """This command's arguments as given, less `--nproc N` / `--nproc=N`."""
    out, skip = [], False
    for arg in _ARGV:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


def _launch(nproc: Optional[int]) -> bool:
    """With `--nproc N` (N > 1) outside torchrun: relaunch this command under torchrun."""
    from lowrank_cli.distill.distributed import launch_torchrun, under_torchrun

    if nproc is None or nproc == 1 or under_torchrun():
        return False
    code = launch_torchrun(nproc, _argv_without_nproc())
    if code:
        raise LowrankError(f"torchrun with {nproc} processes failed (exit status {code}); see the messages above")
    return True


def _print_compress_report(report: dict, as_json: bool) -> None:
    from lowrank_cli.distill.report import compress_table
    from lowrank_cli.report import console

    if not report:  # not rank 0
        return
    if as_json:
        _print_json(report)
    else:
        console.print(compress_table(report, title=f"Compressed → {report['student']}"))


@app.command()
def compress(
    checkpoint: Optional[Path] = typer.Argument(None, help="The dense .safetensors checkpoint (default: the recipe's 'checkpoint')."),
    recipe: Optional[str] = RecipeOpt,
    model: Optional[str] = ModelOpt,
    model_arg: Optional[List[str]] = ModelArgOpt,
    kappa: Optional[float] = KappaOpt,
    data: Optional[str] = DataOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default: runs/<recipe name>)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Training epochs (overrides the recipe's distill.epochs)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    device: str = DeviceOpt,
    nproc: Optional[int] = typer.Option(None, "--nproc", help="Processes (GPUs) to train on: launches torchrun."),
    as_json: bool = JsonOpt,
) -> None:
    """Factorize a checkpoint (PELA SVD), then distill it against the original (PELA pre-training)."""
    from lowrank_cli.distill.compress import compress_checkpoint, prepare_compress, with_run_options
    from lowrank_cli.distill.report import training_progress
    from lowrank_cli.models import parse_model_args
    from lowrank_cli.report import err_console

    r = with_run_options(_recipe(recipe, kappa), data, epochs)
    kwargs = parse_model_args(model_arg)
    if nproc is not None and nproc > 1:
        prepare_compress(checkpoint, r, arch=model, model_kwargs=kwargs, out=out, resume=resume, device=device)  # checks only
        if _launch(nproc):
            return
    main_process = _is_main_process()
    with training_progress("distill", enabled=main_process) as log:
        report = compress_checkpoint(checkpoint, r, arch=model, model_kwargs=kwargs, out=out, resume=resume, device=device,
                                     log=log, note=lambda s: err_console.print(f"[dim]{s}[/]"))
    _print_compress_report(report, as_json)


@app.command()
def distill(
    factorized: Path = typer.Argument(..., help="A checkpoint written by `lowrank factorize`."),
    teacher: Path = typer.Option(..., "--teacher", "-t", help="The original dense checkpoint it was factorized from."),
    recipe: Optional[str] = typer.Option(None, "--recipe", "-r", help="Recipe for the distill:/data: settings (default: the one in the checkpoint's manifest)."),
    data: Optional[str] = DataOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default: runs/<recipe name>)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Training epochs (overrides the recipe's distill.epochs)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its last checkpoint."),
    device: str = DeviceOpt,
    nproc: Optional[int] = typer.Option(None, "--nproc", help="Processes (GPUs) to train on: launches torchrun."),
    as_json: bool = JsonOpt,
) -> None:
    """Distill an already factorized checkpoint against its dense original (PELA pre-training)."""
    from lowrank_cli.distill.compress import distill_checkpoint, prepare_distill
    from lowrank_cli.distill.report import training_progress
    from lowrank_cli.recipe import load_recipe
    from lowrank_cli.report import err_console

    r = load_recipe(recipe) if recipe else None
    if nproc is not None and nproc > 1:
        prepare_distill(factorized, teacher, r, out=out, resume=resume, device=device, data=data, epochs=epochs)  # checks only
        if _launch(nproc):
            return
    with training_progress("distill", enabled=_is_main_process()) as log:
        report = distill_checkpoint(factorized, teacher, r, out=out, resume=resume, device=device, data=data, epochs=epochs,
                                    log=log, note=lambda s: err_console.print(f"[dim]{s}[/]"))
    _print_compress_report(report, as_json)


@app.command()
def evaluate(
    checkpoint: Path = typer.Argument(..., help="A dense or factorized .safetensors checkpoint."),
    data: str = typer.Option(..., "--data", "-d", help="Image folder (its val/ split is used), 'digits' or 'synthetic'."),
    model: Optional[str] = ModelOpt,
    model_arg: Optional[List[str]] = ModelArgOpt,
    teacher: Optional[Path] = typer.Option(None, "--teacher", "-t", help="A dense checkpoint of the same architecture: also report feature cosine similarity to it."),
    batch_size: int = typer.Option(256, "--batch-size", help="Images per batch."),
    device: str = DeviceOpt,
    as_json: bool = JsonOpt,
) -> None:
    """Top-1/top-5 accuracy on the validation split (and, with --teacher, feature similarity)."""
    from lowrank_cli.distill.data import load_image_data
    from lowrank_cli.distill.distributed import resolve_device
    from lowrank_cli.distill.evaluate import evaluate as evaluate_model
    from lowrank_cli.distill.report import evaluation_table
    from lowrank_cli.models import build_model, parse_model_args
    from lowrank_cli.report import console

    dev = resolve_device(device)
    kwargs = parse_model_args(model_arg)
    net, header = build_model(checkpoint, model, kwargs)
    manifest = header.manifest if header is not None else None
    images = load_image_data(data, net)
    classes = getattr(net, "num_classes", None)
    if classes != images.num_classes:
        raise LowrankError(f"{checkpoint}: the model has {classes} outputs but the data '{data}' has {images.num_classes} classes")
    teacher_net = None
    if teacher is not None:
        arch = (manifest or {}).get("architecture") or model
        t_kwargs = {**(manifest or {}).get("model_kwargs", {}), **kwargs}
        try:
            teacher_net, _ = build_model(teacher, arch, t_kwargs)
        except LowrankError as e:
            raise LowrankError(f"--teacher {teacher} does not match '{arch}': {str(e).split(': ', 1)[-1]}") from None
    result = evaluate_model(net, images.val, dev, batch_size=batch_size, teacher=teacher_net)
    rows = {str(checkpoint): result.to_dict()}
    if as_json:
        _print_json({"checkpoint": str(checkpoint), "data": images.source, "factorized": manifest is not None, **result.to_dict()})
    else:
        console.print(evaluation_table(rows, title=f"Evaluation on {images.source} (val)"))


@app.command()
def demo(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Run folder (default: runs/demo, runs/demo-pclora; a previous demo run there is replaced)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Distillation epochs (default: the demo recipe's)."),
    method: str = typer.Option("pela", "--method", help="pela: SVD then PELA distillation; pclora: PC-LoRA progressive compression to the same ranks."),
    device: str = DeviceOpt,
    retrain: bool = typer.Option(False, "--retrain-teacher", help="Train the teacher again even if one is cached."),
    as_json: bool = JsonOpt,
) -> None:
    """Train a small ViT on handwritten digits, factorize it at κ=3, distill it, and report the accuracy recovered."""
    from lowrank_cli.demo import DEMO_RECIPES, run_demo
    from lowrank_cli.distill.report import compress_table, training_progress
    from lowrank_cli.report import console, err_console

    if method not in DEMO_RECIPES:
        raise LowrankError(f"--method '{method}': accepted: {', '.join(DEMO_RECIPES)}")
    out = out or Path("runs") / DEMO_RECIPES[method]
    note = lambda s: err_console.print(f"[dim]{s}[/]")  # noqa: E731
    with training_progress("teacher") as teacher_log, training_progress("distill") as log:
        report = run_demo(out, device=device, epochs=epochs, retrain=retrain, teacher_log=teacher_log, log=log, note=note, method=method)
    if as_json:
        _print_json(report)
        return
    t = report["teacher_training"]
    how = "cached" if t["cached"] else f"trained in {t['seconds']:.0f} s"
    console.print(f"teacher: {report['architecture']} on digits ({how}, {t['file']})")
    how = "SVD then PELA distillation" if method == "pela" else "PC-LoRA progressive compression"
    console.print(compress_table(report, title=f"lowrank demo: κ = 3, {how}"))
    acc = report["accuracy"]
    frac = report["recovered_fraction"]
    if frac is not None:
        console.print(
            f"[bold]SVD lost {acc['teacher']['top1'] - acc['svd']['top1']:.1%} top-1; {'distillation' if method == 'pela' else 'PC-LoRA'} recovered "
            f"{frac:.0%} of it[/] ({acc['svd']['top1']:.1%} → {acc['distilled']['top1']:.1%}, teacher {acc['teacher']['top1']:.1%}) "
            f"in {report['wall_seconds']:.0f} s"
        )


def main(argv: Optional[List[str]] = None) -> None:
    """Console entry point: one-line errors, no tracebacks for anything the user can fix."""
    _ARGV[:] = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    try:
        rv = app(args=argv, standalone_mode=False)
    except LowrankError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:  # click's (or typer's vendored click's) usage errors, matched by shape
        if type(e).__name__ == "NoArgsIsHelpError":  # the help is already printed
            sys.exit(0)
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):
            print(f"error: {e.format_message()}", file=sys.stderr)
            sys.exit(e.exit_code)
        if type(e).__name__ == "Abort":
            print("error: aborted", file=sys.stderr)
            sys.exit(130)
        raise
    sys.exit(rv if isinstance(rv, int) else 0)
