"""Latency-aware layer selection (`select.latency_aware`, docs/algorithms.md §6).

Half the MACs is not half the time: a factorized layer runs two thin matrix products, and
on CPUs, for narrow layers (Swin's width-128 stage) that can be barely faster, or slower,
than the dense one. Once the rank rule has chosen a layer's rank, we time the dense layer
against its factorization at that rank on the target device, at the model's real number of
rows (batch × tokens per image), and keep dense the layers whose factorized form is not
faster by `select.latency_margin`. Timing is `measure.time_linear_layers` (random weights:
only shapes matter), once per distinct (d_in, d_out, rank, tokens, bias).

The timer is injectable (`LayerTimer`), so that tests decide on given timings, not measured ones.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, Sequence

import torch

from lowrank_cli.device import resolve_device
from lowrank_cli.errors import LowrankError
from lowrank_cli.measure.timing import LayerShape, check_ort_device, time_linear_layers
from lowrank_cli.plan.select import LayerPlan
from lowrank_cli.recipe import SelectConfig


class _Timed(Protocol):
    dense_s: float
    factorized_s: float


# (shapes, batch) -> one result per shape, in order, with `dense_s` and `factorized_s`
# (seconds per call on `batch × shape.tokens` rows); `measure.LayerTiming` is one.
LayerTimer = Callable[[Sequence[LayerShape], int], Sequence[_Timed]]


def default_timer(config: SelectConfig) -> LayerTimer:
    """`measure.time_linear_layers` with the recipe's runtime, device and threads."""

    def timer(shapes: Sequence[LayerShape], batch: int):
        return time_linear_layers(list(shapes), batch, device=config.latency_device, runtime=config.latency_runtime, threads=config.latency_threads)

    return timer


def _fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3g} ms"


class LatencySelection:
    """Times planned layers and keeps dense those not faster factorized by the margin.

    `rows`: input rows per example of each linear, by name (`measure.count_macs(model, inputs).linear_rows`).
    `decide(plans)` may be called several times (e.g. once for the ranks known up front,
    then per layer as the energy rule sets them); each shape is timed once.
    """

    def __init__(self, config: SelectConfig, rows: dict[str, int], timer: LayerTimer | None = None):
        if config.latency_threads is not None and config.latency_threads < 1:
            raise LowrankError(f"select.latency_threads must be at least 1 (got {config.latency_threads})")
        self.config = config
        self.rows = rows
        self.timer = timer or default_timer(config)
        device = resolve_device(config.latency_device, param="select.latency_device")
        if timer is None and config.latency_runtime == "onnxruntime":  # before any layer is timed
            check_ort_device(device, param="select.latency_device")
        self.device = str(device)
        self.threads = config.latency_threads or torch.get_num_threads()
        self.measured: dict[tuple, tuple[float, float]] = {}
        self.layers: dict[str, dict[str, Any]] = {}

    def _shape(self, plan: LayerPlan) -> LayerShape:
        return LayerShape(plan.name, plan.d_in, plan.d_out, plan.rank, self.rows.get(plan.name, 1), plan.bias)

    @staticmethod
    def _key(s: LayerShape) -> tuple:
        return (s.d_in, s.d_out, s.rank, s.tokens, s.bias)

    def decide(self, plans: Sequence[LayerPlan]) -> list[LayerPlan]:
        """Time the factorized plans with a known rank; mark dense those that do not gain. Returns those."""
        todo = [p for p in plans if p.factorized and p.rank is not None and p.name not in self.layers]
        shapes = [self._shape(p) for p in todo]
        new: dict[tuple, LayerShape] = {}
        for s in shapes:
            if self._key(s) not in self.measured:
                new.setdefault(self._key(s), s)
        if new:
            batch = self.config.latency_batch
            results = list(self.timer(list(new.values()), batch))
            if len(results) != len(new):
                raise LowrankError(f"latency timer returned {len(results)} timings for {len(new)} layer shapes")
            for key, t in zip(new, results):
                self.measured[key] = (float(t.dense_s), float(t.factorized_s))
        kept = []
        margin, batch = self.config.latency_margin, self.config.latency_batch
        for plan, s in zip(todo, shapes):
            dense_s, fact_s = self.measured[self._key(s)]
            speedup = dense_s / fact_s if fact_s > 0 else float("inf")
            keep_dense = not speedup >= margin * (1 - 1e-9)
            entry = {
                "d_in": plan.d_in, "d_out": plan.d_out, "rank": plan.rank, "tokens": s.tokens, "rows": batch * s.tokens,
                "dense_s": dense_s, "factorized_s": fact_s, "speedup": speedup, "kept_dense": keep_dense,
                "params_given_up": 0, "macs_given_up": 0, "reason": None,
            }
            if keep_dense:
                entry["params_given_up"] = plan.params_before - plan.params_after
                entry["macs_given_up"] = s.tokens * plan.macs_per_token_saved  # per image
                entry["reason"] = (
                    f"latency-aware: factorized {_fmt_ms(fact_s)} vs dense {_fmt_ms(dense_s)} "
                    f"(rank {plan.rank}, batch {batch} × {s.tokens} tokens), not ≥{margin:.2f}× faster"
                )
                plan.factorized, plan.rank, plan.reason = False, None, entry["reason"]
                kept.append(plan)
            plan.latency = entry
            self.layers[plan.name] = entry
        return kept

    def to_dict(self) -> dict[str, Any]:
        """Settings, every timed layer and what keeping some dense cost: for reports and the manifest."""
        dense = [n for n, e in self.layers.items() if e["kept_dense"]]
        c = self.config
        return {
            "runtime": c.latency_runtime, "device": self.device, "threads": self.threads, "batch": c.latency_batch,
            "margin": c.latency_margin, "shapes_timed": len(self.measured),
            "layers": self.layers, "kept_dense": dense,
            "params_given_up": sum(self.layers[n]["params_given_up"] for n in dense),
            "macs_given_up": sum(self.layers[n]["macs_given_up"] for n in dense),
        }
