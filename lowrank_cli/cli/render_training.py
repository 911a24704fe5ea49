"""Rich output for training runs: a progress bar with loss, lr, images/s and ETA, and the report."""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from lowrank_cli.cli.render import err_console, fmt_count, ratio


@contextlib.contextmanager
def training_progress(description: str, enabled: bool = True) -> Iterator[Callable[[dict[str, Any]], None]]:
    """A progress bar on stderr; yields `log(record)` for the training loop's log records."""
    if not enabled:
        yield lambda record: None
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}{task.fields[lam]}  {task.fields[ips]} img/s"),
        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=err_console,
    )
    task = None

    def log(record: dict[str, Any]) -> None:
        nonlocal task
        if task is None:
            task = progress.add_task(description, total=record["total_steps"], loss="", lr="", lam="", ips="")
        lam = f"  λ {record['lam']:.3f}" if "lam" in record else ""  # PC-LoRA: the dense weights' share
        progress.update(task, completed=record["step"], loss=f"{record['loss']:.4g}", lr=f"{record['lr']:.2e}", lam=lam,
                        ips=f"{record['images_per_s']:.0f}")

    with progress:
        try:
            yield log
        except BaseException:
            progress.live.transient = True  # on an error the bar goes, so that the error is the one line left
            raise


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.1%}"


def _acc(d: dict | None, key: str) -> str:
    return _pct((d or {}).get(key))


def compress_table(report: dict[str, Any], title: str = "Compressed") -> Table:
    """Parameters and MACs before/after; accuracy of teacher, SVD-only and distilled student."""
    table = Table(title=title, title_justify="left")
    last = "PC-LoRA" if report.get("method") == "pclora" else "distilled"
    for col, just in (("", "left"), ("teacher", "right"), ("SVD only", "right"), (last, "right")):
        table.add_column(col, justify=just)
    acc = report.get("accuracy") or {}
    t, s, d = acc.get("teacher"), acc.get("svd"), acc.get("distilled")
    table.add_row("parameters", fmt_count(report["params_before"]), fmt_count(report["params_after"]),
                  f"{fmt_count(report['params_after'])} ({ratio(report['params_after'], report['params_before'])})")
    table.add_row("MACs / image", fmt_count(report["macs_before"]), fmt_count(report["macs_after"]),
                  f"{fmt_count(report['macs_after'])} ({ratio(report['macs_after'], report['macs_before'])})")
    table.add_row("top-1", _acc(t, "top1"), _acc(s, "top1"), _acc(d, "top1"))
    table.add_row("top-5", _acc(t, "top5"), _acc(s, "top5"), _acc(d, "top5"))
    table.add_row("feature cosine to teacher", "1.000", _num((s or {}).get("feature_cosine")), _num((d or {}).get("feature_cosine")))
    frac = report.get("recovered_fraction")
    train = report.get("train", {})
    pc = report.get("pclora")
    table.caption = (
        (f"PC-LoRA: λ ({pc['schedule']}) from 1 to 0 over steps 0–{pc['zero_at_step']}, 0 from step {pc['zero_at_step']} "
         f"of {pc['total_steps']} on ({' · '.join(f'{s}: {v:.2f}' for s, v in pc['course'])}); " if pc else "")
        + (f"recovered {frac:.0%} of the top-1 accuracy SVD lost; " if frac is not None else "")
        + f"{train.get('steps')} steps at lr {train.get('lr', 0):.2e} (global batch {train.get('global_batch')}), "
        + f"{train.get('images_per_s', 0):.0f} img/s; student: {report.get('student')}"
        + (f"; {report['data']['skipped_unreadable']} unreadable images skipped (data.skip_unreadable)" if (report.get("data") or {}).get("skipped_unreadable") else "")
    )
    return table


def _num(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def evaluation_table(rows: dict[str, dict[str, Any]], title: str = "Evaluation") -> Table:
    table = Table(title=title, title_justify="left")
    for col in ("model", "images", "top-1", "top-5", "feature cosine", "logit cosine"):
        table.add_column(col, justify="left" if col == "model" else "right")
    for name, e in rows.items():
        table.add_row(name, str(e["images"]), _pct(e["top1"]), _pct(e["top5"]), _num(e.get("feature_cosine")), _num(e.get("logit_cosine")))
    return table
