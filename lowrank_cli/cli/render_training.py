"""Rich output for training runs: a progress bar with loss, lr, examples/s and ETA, and the report."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from lowrank_cli.cli.render import err_console, fmt_count, ratio
from lowrank_cli.models.tasks import TASKS


@contextlib.contextmanager
def training_progress(description: str, enabled: bool = True) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A progress bar on stderr; yields `log(record)` for the training loop's log records."""
    if not enabled:
        yield lambda record: None
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}{task.fields[lam]}  {task.fields[ips]} ex/s"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=err_console,
    )
    task = local = measure = None

    def log(record: dict[str, Any]) -> None:
        nonlocal task, local, measure
        if "eval" in record:  # a held-out evaluation: a line above the bar, quality against wall time
            progress.console.print(f"[dim]held-out at step {record['step']} ({record['stage']}, {record['seconds'] / 60:.1f} min): "
                                   f"{eval_summary(record['eval'])}[/]")
            return
        if record.get("stage") == "measure":  # one record per block of each pass of the block-by-block measurement
            if measure is None:
                measure = progress.add_task("measure", total=record["blocks"], loss="", lr="", lam="", ips="")
            progress.update(measure, completed=record["done"])
            return
        if record.get("stage") == "local":  # one record per block of local distillation
            if local is None:
                local = progress.add_task("local", total=record["blocks"], loss="", lr="", lam="", ips="")
            error = record.get("error_after")
            progress.update(local, completed=record["done"], loss="" if error is None else f"{error:.3g}", lr="", lam="", ips="")
            return
        if task is None:
            task = progress.add_task(description, total=record["total_steps"], loss="", lr="", lam="", ips="")
        progress.update(task, total=record["total_steps"])  # a time budget sets the count after the first steps
        lam = f"  λ {record['lam']:.3f}" if "lam" in record else ""  # PC-LoRA: the dense weights' share
        progress.update(task, completed=record["step"], loss=f"{record['loss']:.4g}", lr=f"{record['lr']:.2e}", lam=lam,
                        ips=f"{record.get('examples_per_s', record.get('images_per_s', 0)):.0f}")

    with progress:
        try:
            yield log
        except BaseException:
            progress.live.transient = True  # on an error the bar goes, so that the error is the one line left
            raise


def eval_summary(e: dict[str, Any]) -> str:
    """The figures of an evaluation that say most, on one line."""
    shown = [f"{label} {_show(e.get(key), how)}" for key, label, how in METRICS[:6] if e.get(key) is not None]
    return ", ".join(shown) or "—"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.1%}"


def _acc(d: dict | None, key: str) -> str:
    return _pct((d or {}).get(key))


# The figures an evaluation may hold and how each is shown (what the primary one is called: the task's `primary_label`).
METRICS = (("top1", "top-1", "pct"), ("top5", "top-5", "pct"), ("mean_cosine", "embedding cosine to teacher (mean)", "num"),
           ("min_cosine", "embedding cosine to teacher (min)", "num"), ("neighbour_agreement", "nearest-neighbour agreement", "pct"),
           ("perplexity", "perplexity", "ppl"), ("feature_cosine", "feature cosine to teacher", "num"))


def primary_label(task: str | None) -> str:
    """What a report's task (its name) is judged by, in words; `score` for a task this version does not know."""
    known = TASKS.get(task) if task is not None else None
    return known.primary_label if known is not None else "score"


def _show(value: float | None, how: str) -> str:
    if value is None:
        return "—"
    return _pct(value) if how == "pct" else f"{value:.2f}" if how == "ppl" else f"{value:.3f}"


def compress_table(report: dict[str, Any], title: str = "Compressed") -> Table:
    """Parameters and MACs before/after; the task's figures for the teacher, the SVD-only and the distilled student."""
    table = Table(title=title, title_justify="left")
    last = "PC-LoRA" if report.get("method") == "pclora" else "distilled"
    for col, just in (("", "left"), ("teacher", "right"), ("SVD only", "right"), (last, "right")):
        table.add_column(col, justify=just)
    acc = report.get("accuracy") or {}
    evals = [acc.get("teacher") or {}, acc.get("svd") or {}, acc.get("distilled") or {}]
    table.add_row("parameters", fmt_count(report["params_before"]), fmt_count(report["params_after"]),
                  f"{fmt_count(report['params_after'])} ({ratio(report['params_after'], report['params_before'])})")
    table.add_row("MACs / example", fmt_count(report["macs_before"]), fmt_count(report["macs_after"]),
                  f"{fmt_count(report['macs_after'])} ({ratio(report['macs_after'], report['macs_before'])})")
    for key, label, how in METRICS:
        if any(e.get(key) is not None for e in evals):
            table.add_row(label, *(_show(e.get(key), how) for e in evals))
    frac = report.get("recovered_fraction")
    train = report.get("train", {})
    pc = report.get("pclora")
    data = report.get("data") or {}
    table.caption = (
        (f"PC-LoRA: λ ({pc['schedule']}) from 1 to 0 over steps 0–{pc['zero_at_step']}, 0 from step {pc['zero_at_step']} "
         f"of {pc['total_steps']} on ({' · '.join(f'{s}: {v:.2f}' for s, v in pc['course'])}); " if pc else "")
        + (f"recovered {frac:.0%} of the {primary_label(report.get('task'))} SVD lost; " if frac is not None else "")
        + f"{train.get('steps')} steps at lr {train.get('lr', 0):.2e} (global batch {train.get('global_batch')}), "
        + f"{train.get('examples_per_s', train.get('images_per_s', 0)):.0f} examples/s; student: {report.get('student')}"
        + (f"; {data['skipped_unreadable']} unreadable images skipped (data.skip_unreadable)" if data.get("skipped_unreadable") else "")
        + (f"; data: {data['split']}" if data.get("split") else "")
    )
    return table


def curve_table(report: dict[str, Any]) -> Table | None:
    """Held-out quality against wall time (`distill.eval_every`, the local stage, the end): when more training stops paying."""
    points = report.get("curve") or []
    if len(points) < 2:
        return None
    shown = [(key, label, how) for key, label, how in METRICS[:6] if any(p["eval"].get(key) is not None for p in points)]
    table = Table(title="Held-out quality against wall time", title_justify="left")
    for col in ("step", "stage", "minutes"):
        table.add_column(col, justify="right")
    for _, label, _ in shown:
        table.add_column(label, justify="right")
    for p in points:
        table.add_row(str(p["step"]), p["stage"], f"{p['seconds'] / 60:.1f}", *(_show(p["eval"].get(key), how) for key, _, how in shown))
    return table


def budget_table(report: dict[str, Any]) -> Table | None:
    """A run under `distill.budget`: each stage's planned and actual minutes and steps, beside the budget."""
    b = report.get("budget")
    if not b:
        return None
    table = Table(title=f"Time budget: {b['seconds'] / 60:.1f} min for the whole command", title_justify="left")
    for col in ("stage", "planned min", "actual min", "steps"):
        table.add_column(col, justify="right" if col != "stage" else "left")
    table.add_row("loading, calibration, factorization", "", f"{b['setup_seconds'] / 60:.1f}", "")
    table.add_row("teacher and SVD-only evaluations", "", f"{b['baseline_eval_seconds'] / 60:.1f}", "")
    if "local" in b:
        loc = b["local"]
        steps = loc.get("steps") or []
        shown = f"{min(steps)}–{max(steps)} per block (at most {loc.get('max_steps')})" if steps else ""
        table.add_row("local stage", f"{loc['planned_seconds'] / 60:.1f}", _minutes(loc.get("seconds")), shown)
    if "end_to_end" in b:
        e2e = b["end_to_end"]
        table.add_row("end-to-end stage", f"{e2e['planned_seconds'] / 60:.1f}" if "planned_seconds" in e2e else "", _minutes(e2e.get("seconds")),
                      f"{e2e.get('steps')} (at most {e2e.get('max_steps')})")
    table.add_row("whole command", f"{b['seconds'] / 60:.1f}", _minutes(b.get("command_seconds")), "", style="bold")
    return table


def _minutes(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds / 60:.1f}"


def evaluation_table(rows: dict[str, dict[str, Any]], title: str = "Evaluation") -> Table:
    """One row per model: the figures its evaluation holds."""
    table = Table(title=title, title_justify="left")
    shown = [(key, label, how) for key, label, how in METRICS + (("logit_cosine", "logit cosine", "num"),)
             if any(e.get(key) is not None for e in rows.values())]
    table.add_column("model")
    table.add_column("examples", justify="right")
    for _, label, _ in shown:
        table.add_column(label, justify="right")
    for name, e in rows.items():
        table.add_row(name, str(e["examples"]), *(_show(e.get(key), how) for key, _, how in shown))
    return table


def demo_seeds_table(report: dict[str, Any], what: str = "distillation") -> Table:
    """Each seed's teacher / SVD-only / distilled top-1 and recovery, with their median and range."""
    table = Table(title=f"lowrank demo over {len(report['seeds'])} seeds (teacher and distillation seeded alike)", title_justify="left")
    for col in ("seed", "teacher", "SVD only", "distilled", "recovered", "seconds"):
        table.add_column(col, justify="right")
    for r in report["seeds"]:
        table.add_row(str(r["seed"]), _pct(r["teacher"]), _pct(r["svd"]), _pct(r["distilled"]),
                      "—" if r["recovered"] is None else f"{r['recovered']:.0%}", f"{r['seconds']:.0f}" + (" (cached teacher)" if r["teacher_cached"] else ""))
    sp = report["spread"]
    for label, key in (("median", "median"), ("min", "min"), ("max", "max")):
        table.add_row(label, *(_pct(sp[k][key]) if k in sp else "—" for k in ("teacher", "svd", "distilled")),
                      f"{sp['recovered'][key]:.0%}" if "recovered" in sp else "—", "", style="bold" if key == "median" else "dim")
    if "recovered" in sp:
        table.caption = (f"SVD alone lost {sp['teacher']['median'] - sp['svd']['median']:.1%} top-1 (median); {what} recovered "
                         f"{sp['recovered']['median']:.0%} of the loss (median; range {sp['recovered']['min']:.0%}–{sp['recovered']['max']:.0%}) "
                         f"in {report['wall_seconds']:.0f} s")
    return table
