"""The report a distillation run writes (`report.json`): sizes, MACs, the task's figures before and after, training."""

from __future__ import annotations

from typing import Any

from torch import nn

from lowrank_cli.data.modality import split_record
from lowrank_cli.distill.evaluate import Evaluation
from lowrank_cli.distill.train import TrainResult, train_examples
from lowrank_cli.io.rundir import RunDir
from lowrank_cli.measure.macs import count_macs, count_params
from lowrank_cli.nn.pclora import decay_lambda
from lowrank_cli.pipelines.common import recovered_fraction
from lowrank_cli.pipelines.common.prepare import PreparedRun


def curve(run: RunDir, final: Evaluation | None, steps: int, seconds: float) -> list[dict[str, Any]]:
    """Held-out quality against wall time: every evaluation in the run's metrics (a resumed run's earlier ones too), then the final."""
    points = [r for r in run.read_metrics() if "eval" in r]
    if final is not None:
        points.append({"step": steps, "stage": "final", "seconds": seconds, "eval": final.to_dict()})
    return points


def _primary(d: dict | None) -> float | None:
    return None if d is None else Evaluation(**d).primary()


def run_report(p: PreparedRun, teacher: nn.Module, baseline: dict, final: Evaluation | None, result: TrainResult,
            digests: list[str], seconds: float) -> dict[str, Any]:
    example = p.family.example_inputs(teacher)
    macs_t, macs_s = count_macs(teacher, example, p.family.forward), count_macs(p.student, example, p.family.forward)
    return {
        "run": str(p.run.root),
        "student": str(p.run.student_file),
        "architecture": p.manifest.architecture,
        "architecture_source": p.info.get("architecture", {}).get("source", "manifest"),
        "architecture_note": p.info.get("architecture", {}).get("note"),
        "params_before": count_params(teacher), "params_after": count_params(p.student),
        "macs_before": macs_t.macs, "macs_after": macs_s.macs,
        "accuracy": {"teacher": baseline.get("teacher"), "svd": baseline.get("svd"), "distilled": final.to_dict() if final else None},
        "task": p.task.name,
        "recovered_fraction": recovered_fraction(_primary(baseline.get("teacher")), _primary(baseline.get("svd")), final.primary() if final else None),
        "train": {"steps": result.steps, "total_steps": result.total_steps, "lr": result.lr, "global_batch": result.global_batch,
                  "seconds": result.seconds, "examples_per_s": result.images / max(result.seconds, 1e-9),
                  "images_per_s": result.images / max(result.seconds, 1e-9), "last": result.last_terms,
                  "base_loss": p.base, "untrained": result.untrained, "state_bytes": result.state_bytes},
        "method": p.recipe.distill.method,
        **({"local": p.info["local"]} if "local" in p.info else {}),
        **({"pclora": _pclora_report(p, result)} if p.recipe.distill.method == "pclora" else {}),
        "data": {"source": p.data.source, "train": train_examples(p.data.train), "val": len(p.data.val), "skipped_unreadable": len(p.data.skipped),
                 "skipped_first": p.data.skipped[:5], **split_record(p.data)},
        **({"allocation": p.info["allocation"]} if "allocation" in p.info else {}),
        "world_size": p.env.world,
        "rank_weight_sha256": digests,
        "seconds": seconds,
    }


def _pclora_report(p: PreparedRun, result: TrainResult) -> dict[str, Any]:
    cfg, q = p.recipe.distill.pclora, p.info["pclora"]["decay_steps"]
    return {"schedule": cfg.schedule, "init": cfg.init, "task_weight": cfg.task_weight, "decay_end": cfg.decay_end,
            "decay_steps": q, "zero_at_step": q, "total_steps": result.total_steps,
            "lambda_final": decay_lambda(cfg.schedule, result.steps, q), "course": lambda_course(cfg.schedule, q)}


def lambda_course(schedule: str, q: int, points: int = 5) -> list[tuple[int, float]]:
    """λ at `points` steps evenly spaced from 0 to q (where it is exactly 0)."""
    return [(round(q * i / (points - 1)), decay_lambda(schedule, round(q * i / (points - 1)), q)) for i in range(points)]


