"""Rank allocation under a global budget (`factorize.rank_rule: budget`, docs/algorithms.md §5).

The user gives a target: the fraction of the selected layers' parameters (`target_params`)
or MACs (`target_macs`) to keep. Truncating layer l to rank r drops `Σ_{i>r} σ_{l,i}²`,
its squared truncation error (‖W − W'‖_F² for plain SVD, ‖(W − W')X‖_F² on the
calibration inputs for whitened SVD, whose σ are those of `W·S`). We minimise the total
dropped energy over all layers within the budget, greedily: every layer starts at its
floor (`min_rank`), then the singular value with the most energy per parameter (or MAC)
spent, over all layers, is added next, until nothing more fits. A layer that reaches the
rank where low rank stops saving anything is made dense instead (that last step costs
little and recovers all its energy). The result meets the target exactly or just under
(by less than one rank of one layer).

The uniform-κ baseline at the same budget (PELA's rule with the smallest κ that fits) is
computed alongside, so reports can show what the allocation buys.

`factorize.allocation: sensitivity` (docs/algorithms.md §8) passes spectra already weighted
by each layer's measured output sensitivity (`factorize/sensitivity.py`), so that the
energies are estimated increases of the output loss; with `rank_rule: kappa` the rule is
`budget_kappa=κ`: the budget is the parameter count of uniform κ itself, and the uniform
ranks shown beside the allocation are those of that same κ.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from lowrank_cli.decompose.ranks import energy_kept, max_shrinking_rank, rank_for_kappa
from lowrank_cli.errors import LowrankError
from lowrank_cli.plan.select import LayerPlan, rule_of, set_rank


@dataclass
class Allocation:
    """Ranks chosen under a budget, with the uniform-κ ranks at the same budget beside them.

    Costs are parameters (bias included) or MACs per image, of the selected layers only.
    `dropped` is Σ of the discarded σ² (0 for a dense layer); `energy` is Σ σ².
    A rank of None means the layer stays dense.
    """

    target: str  # "params" or "macs"
    fraction: float
    base_cost: int  # the selected layers, dense
    cost: int
    dropped: float
    energy: float
    ranks: dict[str, int | None]
    layer_dropped: dict[str, float]
    layer_energy: dict[str, float]
    uniform_kappa: float | None = None
    uniform_cost: int | None = None
    uniform_dropped: float | None = None
    uniform_ranks: dict[str, int | None] = field(default_factory=dict)
    uniform_layer_dropped: dict[str, float] = field(default_factory=dict)
    spectrum: str = "svd"  # whose singular values: "svd" (W), "whitened" (W·S), "asvd" (W·D)
    kappa: float | None = None  # rank_rule kappa with allocation sensitivity: the κ whose parameter count is the budget
    allocation: str = "uniform"  # "sensitivity": the spectra were weighted by each layer's output sensitivity
    sensitivity: dict[str, float] = field(default_factory=dict)  # c_l = mean over tokens of ‖∂L/∂y_l‖²

    def manifest_record(self) -> dict:
        """What a manifest keeps of a sensitivity allocation: the rule, the uniform κ beside it and each layer's c_l."""
        return {"allocation": self.allocation, "spectrum": self.spectrum, "target": self.target, "fraction": self.fraction,
                **({"kappa": self.kappa} if self.kappa is not None else {}), "uniform_kappa": self.uniform_kappa,
                "sensitivity": dict(self.sensitivity)}

    def to_dict(self) -> dict:
        def rel(d: float | None) -> float | None:
            return None if d is None or self.energy <= 0 else d / self.energy

        return {
            "target": self.target,
            "fraction": self.fraction,
            "spectrum": self.spectrum,
            "allocation": self.allocation,
            **({"kappa": self.kappa} if self.kappa is not None else {}),
            "base": self.base_cost,
            "budget": {"cost": self.cost, "fraction": self.cost / self.base_cost, "dropped": self.dropped, "relative_error": rel(self.dropped)},
            "uniform_kappa": None if self.uniform_kappa is None else {
                "kappa": self.uniform_kappa, "cost": self.uniform_cost, "fraction": self.uniform_cost / self.base_cost,
                "dropped": self.uniform_dropped, "relative_error": rel(self.uniform_dropped),
            },
            "layers": [
                {
                    "name": name, "rank": rank, "uniform_rank": self.uniform_ranks.get(name),
                    "dropped": self.layer_dropped[name], "uniform_dropped": self.uniform_layer_dropped.get(name),
                    "energy": self.layer_energy[name],
                    **({"sensitivity": self.sensitivity.get(name)} if self.sensitivity else {}),
                }
                for name, rank in self.ranks.items()
            ],
        }


def _cost(p: LayerPlan, rank: int | None, weight: int, with_bias: bool) -> int:
    """Cost of one layer at `rank` (None: dense): parameters (weight 1, bias counted) or MACs (weight = rows)."""
    per = p.d_in * p.d_out if rank is None else rank * (p.d_in + p.d_out)
    return weight * per + (p.d_out if with_bias and p.bias else 0)


def _plan_cost(p: LayerPlan, weight: int, with_bias: bool) -> int:
    return _cost(p, p.rank if p.factorized else None, weight, with_bias)


def allocate_ranks(
    plans: list[LayerPlan],
    spectrum: Callable[[str], torch.Tensor],
    min_rank: int = 1,
    rows: dict[str, int] | None = None,
    spectrum_kind: str = "svd",
    sensitivity: dict[str, float] | None = None,
) -> Allocation:
    """Set `rank` (or dense) on every plan whose rule is `budget_params=F` / `budget_macs=F` / `budget_kappa=κ`.

    `spectrum(name)` gives a layer's singular values (descending), or its spectrum weighted by
    its output sensitivity (then `sensitivity`, each layer's c_l, is recorded in the result).
    `budget_kappa=κ` (rank_rule kappa with allocation sensitivity) allocates the parameters that
    uniform κ keeps, and compares with that κ's ranks. `rows` (input rows per
    example of each linear: tokens × batch, from `measure.count_macs`) is needed for MACs.
    Selected layers with another rule (per-pattern overrides) keep their rank (an energy
    rule's is set here from `spectrum`); their cost counts against the budget. Raises `LowrankError` when the floors alone exceed it.
    """
    budgeted = [p for p in plans if p.rule is not None and p.rule.startswith("budget")]
    if not budgeted:
        raise LowrankError("rank_rule 'budget': no selected layer to allocate ranks to")
    kind, fraction = rule_of(budgeted[0])
    target = kind.removeprefix("budget_")
    kappa = None
    if target == "kappa":  # the budget is uniform κ's parameter count: the fraction follows below
        kappa, target = fraction, "params"
    if target == "macs" and rows is None:
        raise LowrankError("factorize.target_macs needs an architecture to count MACs (argument `arch`, recipe key `model`), or use target_params", param="model")
    with_bias = target == "params"
    weight = {p.name: (rows.get(p.name, 0) if target == "macs" else 1) for p in plans}
    selected = [p for p in plans if p.rule is not None]
    fixed = [p for p in selected if not p.rule.startswith("budget")]
    for p in fixed:  # an energy-rule override's rank follows from its spectrum: known now, so that it counts at its real cost
        if p.factorized and p.rank is None:
            set_rank(p, *rule_of(p), spectrum(p.name).detach().cpu())
    base = sum(_cost(p, None, weight[p.name], with_bias) for p in selected)
    fixed_cost = sum(_plan_cost(p, weight[p.name], with_bias) for p in fixed)
    if kappa is not None:
        budget = fixed_cost + sum(_cost(p, r, weight[p.name], with_bias) for p, r in zip(budgeted, _ranks_at(budgeted, kappa).values()))
        fraction = budget / base
    else:
        budget = fraction * base

    power = {p.name: spectrum(p.name).detach().double().cpu().pow(2) for p in budgeted}
    energy = {n: float(s.sum()) for n, s in power.items()}
    tail = {n: torch.flip(torch.cumsum(torch.flip(s, [0]), 0), [0]).tolist() + [0.0] for n, s in power.items()}  # tail[r] = Σ_{i≥r} σ²

    # start: every layer at its floor (dense when even the floor would not shrink it)
    ranks: dict[str, int | None] = {}
    for p in budgeted:
        r_max = min(max_shrinking_rank(p.d_in, p.d_out), len(tail[p.name]) - 1)
        ranks[p.name] = min(min_rank, min(p.d_in, p.d_out)) if min_rank <= r_max else None
    used = fixed_cost + sum(_cost(p, ranks[p.name], weight[p.name], with_bias) for p in budgeted)
    if used > budget + 1e-9:
        if kappa is not None:
            raise LowrankError(f"factorize.kappa {kappa:g} with allocation 'sensitivity': the floors (min_rank {min_rank}) and the layers with "
                               f"their own rule already keep more than uniform κ's {fraction:.3f} of the selected layers' parameters", param="kappa")
        raise LowrankError(
            f"target_{target} {fraction:g} cannot be met: the floors (min_rank {min_rank}) and the layers with their own "
            f"rule already keep {used / base:.3f} of the selected layers' {target}"
        )

    # greedy: a max-heap of each layer's next step by energy gained per unit of cost
    by_name = {p.name: p for p in budgeted}

    def next_step(name: str) -> tuple[float, float, int] | None:
        p, r = by_name[name], ranks[name]
        if r is None:
            return None
        r_max = max_shrinking_rank(p.d_in, p.d_out)
        if r < r_max:
            gain, cost = tail[name][r] - tail[name][r + 1], weight[name] * (p.d_in + p.d_out)
        else:  # one more rank would not shrink it: go dense, which keeps all its energy
            gain, cost = tail[name][r], weight[name] * (p.d_in * p.d_out - r * (p.d_in + p.d_out))
        if gain <= 0:
            return None
        return gain / max(cost, 1), gain, cost

    heap = []
    for name in ranks:
        if (step := next_step(name)) is not None:
            heapq.heappush(heap, (-step[0], name, step[2]))
    while heap:
        _, name, cost = heapq.heappop(heap)
        if used + cost > budget + 1e-9:
            continue  # never fits again: the remaining budget only shrinks
        used += cost
        p = by_name[name]
        ranks[name] = None if ranks[name] >= max_shrinking_rank(p.d_in, p.d_out) else ranks[name] + 1
        if (step := next_step(name)) is not None:
            heapq.heappush(heap, (-step[0], name, step[2]))

    layer_dropped = {n: (0.0 if r is None else tail[n][r]) for n, r in ranks.items()}
    for p in budgeted:
        r = ranks[p.name]
        if r is None:
            p.factorized, p.rank, p.energy_kept = False, None, 1.0
            p.reason = f"budget allocation keeps it dense (a rank above {max_shrinking_rank(p.d_in, p.d_out)} would not shrink it)"
        else:
            p.factorized, p.rank, p.reason = True, r, None
            p.energy_kept = energy_kept(power[p.name].sqrt(), r)
    alloc = Allocation(
        target, fraction, base, used, sum(layer_dropped.values()), sum(energy.values()), ranks, layer_dropped, energy,
        spectrum=spectrum_kind, kappa=kappa, allocation="sensitivity" if sensitivity is not None else "uniform",
        sensitivity=dict(sensitivity or {}),
    )
    _uniform_kappa(alloc, budgeted, tail, weight, with_bias, budget - fixed_cost, kappa)
    return alloc


def _ranks_at(budgeted: list[LayerPlan], kappa: float) -> dict[str, int | None]:
    """PELA's uniform κ rule: each layer's rank at κ, None where it would not shrink the layer."""
    out = {}
    for p in budgeted:
        r = rank_for_kappa(p.d_in, p.d_out, kappa)
        out[p.name] = r if r * (p.d_in + p.d_out) < p.d_in * p.d_out else None
    return out


def _uniform_kappa(alloc: Allocation, budgeted: list[LayerPlan], tail: dict[str, list[float]], weight: dict[str, int], with_bias: bool, budget: float,
                   given: float | None = None) -> None:
    """PELA's uniform κ rule at the smallest κ (to 4 digits) whose cost fits `budget` (bisection on log κ), or at κ = `given`."""

    def ranks_at(kappa: float) -> dict[str, int | None]:
        return _ranks_at(budgeted, kappa)

    def cost_at(kappa: float) -> int:
        return sum(_cost(p, r, weight[p.name], with_bias) for p, r in zip(budgeted, ranks_at(kappa).values()))

    if given is not None:
        _set_uniform(alloc, budgeted, tail, weight, with_bias, given, ranks_at(given), cost_at(given))
        return
    lo, hi = math.log(0.5), math.log(1e9)  # κ ≤ 1 keeps (almost) everything; κ = 1e9 gives rank 1 everywhere
    if cost_at(math.exp(hi)) > budget + 1e-9:
        return
    if cost_at(math.exp(lo)) <= budget + 1e-9:
        hi = lo
    for _ in range(100):  # cost is non-increasing in κ
        mid = (lo + hi) / 2
        if cost_at(math.exp(mid)) <= budget + 1e-9:
            hi = mid
        else:
            lo = mid
    # the smallest κ that fits, rounded *up* to 4 significant digits (cost only falls as κ grows):
    # a κ a user would write, which survives the 6-digit rule strings of manifests and plans
    exact = math.exp(hi)
    scale = 10 ** (math.floor(math.log10(exact)) - 3)
    kappa = math.ceil(exact / scale - 1e-9) * scale
    kappa = float(f"{kappa:.4g}") if cost_at(float(f"{kappa:.4g}")) <= budget + 1e-9 else exact
    _set_uniform(alloc, budgeted, tail, weight, with_bias, kappa, ranks_at(kappa), cost_at(kappa))


def _set_uniform(alloc: Allocation, budgeted: list[LayerPlan], tail: dict[str, list[float]], weight: dict[str, int], with_bias: bool,
                 kappa: float, ranks: dict[str, int | None], cost: int) -> None:
    alloc.uniform_kappa = kappa
    alloc.uniform_ranks = ranks
    alloc.uniform_cost = alloc.cost - sum(_cost(p, alloc.ranks[p.name], weight[p.name], with_bias) for p in budgeted) + cost
    alloc.uniform_layer_dropped = {n: (0.0 if r is None else tail[n][min(r, len(tail[n]) - 1)]) for n, r in ranks.items()}
    alloc.uniform_dropped = sum(alloc.uniform_layer_dropped.values())
