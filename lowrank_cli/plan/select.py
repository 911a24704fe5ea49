"""Which linear layers are factorized, at which rank, and why the others are left dense.

Selection works on *candidates* (name, d_in, d_out, bias), found either in a built model
(its family's `linear_candidates`) or in a checkpoint's header alone (`weight_candidates`),
so that `inspect` and `factorize` work with and without an architecture.
"""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import torch

from lowrank_cli.decompose.ranks import energy_kept, rank_for_energy, rank_for_kappa, shrinks
from lowrank_cli.io.manifest import LayerEntry
from lowrank_cli.io.safetensors import CheckpointHeader
from lowrank_cli.models.family import Candidate
from lowrank_cli.recipe import Recipe

_FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


@dataclass
class LayerPlan:
    """The decision for one candidate layer. Parameter counts include the bias."""

    name: str
    d_in: int
    d_out: int
    bias: bool
    factorized: bool
    rank: int | None
    rule: str | None
    reason: str | None = None
    energy_kept: float | None = None
    latency: dict | None = None  # select.latency_aware: this layer's timings and decision (latency.py)
    kind: str = "linear"  # linear, conv1d (GPT-2's transposed linear) or embedding (d_in = rows V, d_out = width d)

    @classmethod
    def of(cls, name: str, entry: LayerEntry) -> "LayerPlan":
        """The plan of a layer a manifest records as factorized."""
        return cls(name, entry.d_in, entry.d_out, entry.bias, True, entry.rank, entry.rule, kind=entry.kind)

    def manifest_entry(self, method: str = "svd") -> LayerEntry:
        """This factorized layer's entry in a manifest."""
        return LayerEntry(self.rank, self.d_in, self.d_out, self.bias, self.rule, method, self.kind)

    @property
    def params_before(self) -> int:
        return self.d_in * self.d_out + (self.d_out if self.bias else 0)

    @property
    def params_after(self) -> int:
        if not self.factorized or self.rank is None:
            return self.params_before
        return self.rank * (self.d_in + self.d_out) + (self.d_out if self.bias else 0)

    @property
    def macs_per_token_saved(self) -> int:
        """MACs saved per input row (token): d_in·d_out − r·(d_in + d_out), 0 when dense. An embedding's
        lookup costs nothing dense and `r·d` factorized (its projection): negative."""
        if not self.factorized or self.rank is None:
            return 0
        if self.kind == "embedding":
            return -self.rank * self.d_out
        return self.d_in * self.d_out - self.rank * (self.d_in + self.d_out)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = [self.d_out, self.d_in]
        d["params_before"] = self.params_before
        d["params_after"] = self.params_after
        return d


def matches(name: str, pattern: str) -> bool:
    """Substring match (the released PELA code's rule), or fnmatch when `pattern` has `*?[`."""
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


def weight_candidates(header: CheckpointHeader) -> list[Candidate]:
    """Every 2-D floating-point `<layer>.weight` of a checkpoint that looks like a linear layer's, read from its
    header only. Embedding tables (`*embed*`, `wte`, `wpe`, under `embeddings.`) are not linear layers: left out."""
    out = []
    for key, info in header.tensors.items():
        if not key.endswith(".weight") or len(info.shape) != 2:
            continue
        layer = key[: -len(".weight")]
        last = layer.rsplit(".", 1)[-1]
        if "embed" in last or last in ("wte", "wpe") or "embeddings" in layer.split("."):
            continue
        skip = None if info.dtype in _FLOAT_DTYPES else f"dtype {info.dtype} is not floating point"
        out.append(Candidate(layer, info.shape[1], info.shape[0], f"{layer}.bias" in header.tensors, skip))
    return out


def plan_layers(
    candidates: Iterable[Candidate],
    recipe: Recipe,
    spectrum: Callable[[str], torch.Tensor] | None = None,
) -> list[LayerPlan]:
    """Decide, for each candidate, whether it is factorized and at which rank.

    `spectrum(name)` returns a layer's singular values; it is needed for the energy rule
    (without it those layers get `rank=None`, to be set once their SVD is known) and, when
    given, fills `energy_kept`.
    """
    sel, fac = recipe.select, recipe.factorize
    plans = []
    for c in candidates:
        kind, value = fac.rank_rule, {"kappa": fac.kappa, "rank": fac.rank, "energy": fac.energy}.get(fac.rank_rule)
        if kind == "budget":  # ranks set later by budget.allocate_ranks, once every spectrum is known
            kind, value = ("budget_params", fac.target_params) if fac.target_params is not None else ("budget_macs", fac.target_macs)
        elif kind == "kappa" and fac.allocation == "sensitivity":  # uniform κ's parameter count, spread by allocate_ranks
            kind = "budget_kappa"
        override = next((o for o in sel.overrides if matches(c.name, o.pattern)), None)
        reason = c.skip
        if reason is None and sel.include and not any(matches(c.name, p) for p in sel.include):
            reason = "not matched by select.include"
        if reason is None and (hit := next((p for p in sel.exclude if matches(c.name, p)), None)):
            reason = f"excluded by pattern '{hit}'"
        if reason is None and c.d_out < sel.min_out_features:
            reason = f"fewer than {sel.min_out_features} outputs (select.min_out_features)"
        if reason is None and override is not None:
            if override.skip:
                reason = f"skipped by override '{override.pattern}'"
            else:
                kind, value = next((k, getattr(override, k)) for k in ("kappa", "rank", "energy") if getattr(override, k) is not None)
        rule = f"{kind}={value:g}"
        if reason is not None:
            plans.append(LayerPlan(c.name, c.d_in, c.d_out, c.bias, False, None, None, reason, kind=c.kind))
            continue
        s = spectrum(c.name) if spectrum is not None else None
        plan = LayerPlan(c.name, c.d_in, c.d_out, c.bias, True, None, rule, kind=c.kind)
        set_rank(plan, kind, value, s)
        plans.append(plan)
    return plans


def plan_embeddings(candidates: Iterable[Candidate], recipe: Recipe) -> list[LayerPlan]:
    """Decide, for each embedding table, whether it is factorized (`factorize.embeddings`) and at which rank.

    A table `V × d` is planned like a linear with d_in = V and d_out = d: its rule is the
    embeddings' own κ or rank; it is factorized only when that shrinks it.
    """
    cfg = recipe.factorize.embeddings
    plans = []
    for c in candidates:
        reason = c.skip
        if reason is None and cfg is None:
            reason = "embedding tables stay dense (factorize.embeddings is off)"
        if reason is None and not any(matches(c.name, p) for p in cfg.include):
            reason = "not matched by factorize.embeddings.include"
        if reason is not None:
            plans.append(LayerPlan(c.name, c.d_in, c.d_out, False, False, None, None, reason, kind="embedding"))
            continue
        kind, value = ("rank", cfg.rank) if cfg.rank is not None else ("kappa", cfg.kappa)
        plan = LayerPlan(c.name, c.d_in, c.d_out, False, True, None, f"{kind}={value:g}", kind="embedding")
        set_rank(plan, kind, value, None)
        plans.append(plan)
    return plans


def set_rank(plan: LayerPlan, kind: str, value: float, singular_values: torch.Tensor | None) -> None:
    """Fill `plan.rank` from its rule; leave the layer dense when the rank would not shrink it."""
    full = min(plan.d_in, plan.d_out)
    if kind.startswith("budget") and plan.rank is None:
        return  # decided across layers by budget.allocate_ranks
    if kind.startswith("budget"):
        rank = plan.rank  # already allocated: only fill energy_kept
    elif kind == "kappa":
        rank = rank_for_kappa(plan.d_in, plan.d_out, value)
    elif kind == "rank":
        rank = min(int(value), full)
    elif singular_values is not None:
        rank = rank_for_energy(singular_values, value)
    else:
        plan.rank = None  # decided once the SVD is known
        return
    plan.rank = rank
    if singular_values is not None:
        plan.energy_kept = energy_kept(singular_values, rank)
    if not shrinks(plan.d_in, plan.d_out, rank):
        plan.factorized = False
        plan.reason = (
            f"rank {rank} would not shrink it: r·(d_in+d_out) = {rank * (plan.d_in + plan.d_out)} "
            f">= d_in·d_out = {plan.d_in * plan.d_out}"
        )


def rule_of(plan: LayerPlan) -> tuple[str, float]:
    """The (kind, value) of a plan's rank rule, parsed back from `plan.rule`."""
    kind, value = plan.rule.split("=")
    return kind, float(value)


def manifest_layers(plans: Iterable[LayerPlan], method: str = "svd") -> dict[str, LayerEntry]:
    """The manifest entries of the factorized plans."""
    return {p.name: p.manifest_entry(method) for p in plans if p.factorized}


def saved_params(plans: Iterable[LayerPlan]) -> int:
    """Parameters the plans save, all layers together."""
    return sum(p.params_before - p.params_after for p in plans)
