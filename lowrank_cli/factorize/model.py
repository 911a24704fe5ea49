"""Factorizing a model in place: each selected `nn.Linear` becomes a `LowRankLinear`.

Plain truncated SVD (PELA §3.1, docs/algorithms.md §1), or the data-aware methods (whitened
SVD, ASVD: §4) that minimise each layer's output error on calibration inputs. Which layers and
which ranks come from the plan (`plan/`); the factors from `decompose/`; the module swap is
`nn.replace_modules`, one layer at a time, so that peak memory stays near one layer's SVD
beyond the model.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch
from torch import nn

from lowrank_cli.decompose.ranks import max_shrinking_rank
from lowrank_cli.decompose.svd import svd, svd_device
from lowrank_cli.decompose.whiten import asvd_basis, projection_factors, whitened_basis
from lowrank_cli.errors import LowrankError
from lowrank_cli.factorize.calibrate import collect_input_stats, gram_groups
from lowrank_cli.factorize.sensitivity import LayerSensitivity, layer_sensitivity
from lowrank_cli.measure.macs import count_macs
from lowrank_cli.models.family import ModelFamily, call_model, embedding_candidates, linear_candidates
from lowrank_cli.models.tasks import Task
from lowrank_cli.nn.lowrank import LowRankEmbedding, LowRankLinear, dense_weight
from lowrank_cli.nn.surgery import named_in, replace_modules
from lowrank_cli.plan.budget import Allocation, allocate_ranks
from lowrank_cli.plan.latency import LatencySelection
from lowrank_cli.plan.select import LayerPlan, plan_embeddings, plan_layers, rule_of, set_rank
from lowrank_cli.recipe import Recipe

Progress = Callable[[str], None]


@dataclass
class Factorization:
    """What `factorize_model` decided: every candidate's plan (dense ones with their reason), the
    budget allocation (`rank_rule: budget`, or `allocation: sensitivity`) and the latency-aware selection's timings."""

    plans: list[LayerPlan]
    allocation: Allocation | None = None
    latency: LatencySelection | None = None

    @property
    def factorized(self) -> list[LayerPlan]:
        return [p for p in self.plans if p.factorized]


def linear_rows(model: nn.Module, family: ModelFamily | None) -> dict[str, int]:
    """Input rows per example of each linear (tokens), from one forward pass at batch 1."""
    if family is None:
        raise LowrankError("counting each layer's tokens needs the model's family (argument `family`)", param="family")
    return count_macs(model, family.example_inputs(model), family.forward).linear_rows


def check_method(recipe: Recipe, task: Task | None) -> None:
    """Refuse, before any work, a factorization method that is known to ruin a task's models.

    ASVD scales each input feature by its mean magnitude but does not decorrelate the inputs, so its
    spectrum does not measure a layer's output error; its published results (ASVD4LLM) always choose
    per-layer ranks by sensitivity and leave the most sensitive layers dense. At one uniform κ on
    every projection of a causal LM it collapses: SmolLM2-135M at κ = 1.25 went from a perplexity of 15
    to 6.9·10⁵ (whitened SVD: 46; docs/benchmarks.md).
    """
    f = recipe.factorize
    if (task is not None and task.language_model and f.method == "asvd" and f.allocation == "uniform"
            and f.rank_rule in ("kappa", "rank")):
        raise LowrankError(f"factorize.method 'asvd' with factorize.allocation 'uniform' and factorize.rank_rule '{f.rank_rule}' ruins {task.name} "
                           "models (at κ = 1.25 on every projection, a 135 M Llama's perplexity went from 15 to 6.9·10⁵); use "
                           "factorize.method 'whitened', or set factorize.allocation to 'sensitivity' (per-layer ranks, as ASVD's own "
                           "procedure chooses them)", param="factorize.allocation")


def factorize_model(
    model: nn.Module,
    recipe: Recipe,
    *,
    family: ModelFamily | None = None,
    progress: Progress | None = None,
    calibration: Iterable | None = None,
    latency: LatencySelection | None = None,
    rows: dict[str, int] | None = None,
    device: torch.device | str | None = None,
) -> Factorization:
    """Replace, in place, each linear the recipe selects by a `LowRankLinear` of its factors.

    `family` gives the candidates (default: every plain `nn.Linear`) and the example inputs
    for counting tokens. `factorize.method: whitened | asvd` and `factorize.allocation:
    sensitivity` need `calibration` (input batches, e.g. `data.calibration_batches`). With
    `select.latency_aware`, `latency` (built from the recipe when not given) times each layer once its rank is known and keeps dense
    those not faster factorized. `rows` (input rows per example of each linear) are counted
    when the MAC budget or the latency selection need them and are not given.
    `progress(name)` is called after each layer. SVDs run on `device` (the command's device;
    default: the GPU when there is one), and so do the calibration passes (statistics, sensitivity) of a data-aware
    factorization: a model on the host is moved there for them and back. The factors land where each weight was.
    """
    check_method(recipe, family.task(model) if family is not None else None)
    candidates = family.linear_candidates(model) if family is not None else linear_candidates(model)
    plans = plan_layers(candidates, recipe)
    device = svd_device(device)
    calibrates = calibration is not None and (recipe.factorize.method != "svd" or recipe.factorize.allocation == "sensitivity")
    with on_device(model, device if calibrates else None):
        result = _factorize_linears(model, recipe, plans, family, progress, calibration, latency, rows, device)
    if recipe.factorize.embeddings is not None:  # embedding tables: their own rule, plain SVD, after the linears
        tables = family.embedding_candidates(model) if family is not None else embedding_candidates(model)
        embedding_plans = plan_embeddings(tables, recipe)
        factorize_embeddings(model, embedding_plans, progress, device)
        result.plans += embedding_plans
    return result


def factorize_embeddings(model: nn.Module, plans: list[LayerPlan], progress: Progress | None = None, device: torch.device | None = None) -> None:
    """Replace each planned `nn.Embedding` by a `LowRankEmbedding` from the truncated SVD of its table."""
    todo = {p.name: p for p in plans if p.factorized}

    def swap(name: str, table: nn.Module) -> nn.Module:
        new = LowRankEmbedding.from_embedding(table, todo[name].rank, svd(table.weight, device))
        if progress is not None:
            progress(name)
        return new

    replace_modules(model, swap, named_in(todo))


@contextlib.contextmanager
def on_device(model: nn.Module, device: torch.device | None) -> Iterator[nn.Module]:
    """`model` on `device` inside the block, and back where its parameters were after it (even on an error); nothing
    moves when `device` is None, where the model already is, or a GPU whose free memory is under twice the weights."""
    first = next(model.parameters(), None)
    home = first.device if first is not None else None
    if device is None or home is None or home == device or home.type == "meta" or not _fits(model, device):
        yield model
        return
    model.to(device)
    try:
        yield model
    finally:
        model.to(home)


def _fits(model: nn.Module, device: torch.device) -> bool:
    """Whether `model`'s weights take at most half of `device`'s free memory (a GPU's; the rest for the passes' activations,
    Grams and SVDs). A model that does not is calibrated where it is."""
    if device.type != "cuda":
        return True
    free, _total = torch.cuda.mem_get_info(device)
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) <= 0.5 * free


def _factorize_linears(model: nn.Module, recipe: Recipe, plans: list[LayerPlan], family: ModelFamily | None, progress: Progress | None,
                       calibration: Iterable | None, latency: LatencySelection | None, rows: dict[str, int] | None,
                       device: torch.device | None = None) -> Factorization:
    fac = recipe.factorize
    sensitive = fac.allocation == "sensitivity"
    if sensitive and calibration is None:
        raise LowrankError("factorize.allocation 'sensitivity' needs calibration data (recipe key factorize.calib_data, argument "
                           "`calibration`): a folder of images, 'digits' or 'synthetic'; for text models 'pydoc', a .txt or .jsonl "
                           "file or a folder of them", param="calib_data")
    needs_rows = recipe.select.latency_aware and latency is None or fac.rank_rule == "budget" and fac.target_macs is not None
    if needs_rows and rows is None:
        rows = linear_rows(model, family)
    if latency is None and recipe.select.latency_aware:
        latency = LatencySelection(recipe.select, rows)
    call = family.forward if family is not None else call_model
    sens, svds, measure = None, {}, None
    if sensitive:  # one forward + backward per calibration batch, on the dense model
        if iter(calibration) is calibration:  # a one-shot iterator: keep it for the statistics' passes
            calibration = list(calibration)
        names = [p.name for p in plans if p.factorized and p.rule.startswith("budget")]
        task = family.task(model) if family is not None else None

        def measure(directions: dict[str, torch.Tensor] | None = None) -> dict[str, LayerSensitivity]:
            return layer_sensitivity(model, names, calibration, task=task, call=call, directions=directions)

        if fac.method == "svd":  # each layer's (σ, V), so that the pass measures the inputs' power along every v_i (within calib_max_gram_mb)
            svds = _right_singular(model, names, fac.calib_max_gram_mb * 2**20, device)
            sens = measure({n: V for n, (_s, V) in svds.items()})
        elif fac.method == "whitened":
            sens = measure()
    if fac.method != "svd":  # asvd measures after its statistics: the directions come from its basis
        return _factorize_data_aware(model, recipe, plans, calibration, progress, latency, rows, call, sens,
                                     measure if fac.method == "asvd" else None, device)

    allocation = None
    if fac.rank_rule == "budget" or sensitive:  # every spectrum first (svdvals), then the usual loop
        weights = _loss_weights(sens, lambda n: 1.0 if n in svds else sens[n].input_power) if sens else {}

        def spectrum(n: str) -> torch.Tensor:
            if n in svds:  # ‖ΔW X‖² / rows = Σ_{i>r} σ_i² · mean (v_iᵀx)² exactly: the energies estimate the loss increase
                s, _V = svds[n]
                return s.double() * (sens[n].direction_power.cpu() * weights[n]).sqrt()
            s = torch.linalg.svdvals(dense_weight(model.get_submodule(n))[0].to(svd_device(device)).float())
            # without the directions: ‖ΔW X‖² / rows ≈ Σ_{i>r} σ_i² · mean ‖x‖² / d_in (inputs taken as isotropic)
            return s * math.sqrt(weights[n]) if n in weights else s

        allocation = allocate_ranks(plans, spectrum, fac.min_rank, rows, sensitivity=_c(sens))
    if latency is not None:  # ranks known before the SVD (κ, rank, budget): time them all now, no SVD for dense ones
        for plan in latency.decide(plans):
            if progress is not None:
                progress(plan.name)
    todo = {p.name: p for p in plans if p.factorized}

    def swap(name: str, linear: nn.Module) -> nn.Module | None:
        plan = todo[name]
        factors = svd(dense_weight(linear)[0], device)
        set_rank(plan, *rule_of(plan), factors[1].cpu())
        if latency is not None and plan.factorized:  # the energy rule's rank is known only now
            latency.decide([plan])
        new = LowRankLinear.from_linear(linear, plan.rank, factors) if plan.factorized else None
        del factors
        if progress is not None:
            progress(name)
        return new

    replace_modules(model, swap, named_in(todo))
    return Factorization(plans, allocation, latency)


def _right_singular(model: nn.Module, names: list[str], max_bytes: int,
                    device: torch.device | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(σ, V) of each layer's weight while their V (fp32) fit in `max_bytes`; the others are left out."""
    out, used = {}, 0
    for name in names:
        w = dense_weight(model.get_submodule(name))[0]
        need = w.shape[1] * min(w.shape) * 4
        if used + need > max_bytes:
            continue
        _U, s, Vh = torch.linalg.svd(w.detach().to(svd_device(device)).float(), full_matrices=False)
        out[name] = (s.cpu(), Vh.T.to(w.device).contiguous())  # beside the layer's inputs
        used += need
    return out


def _c(sens: dict[str, LayerSensitivity] | None) -> dict[str, float] | None:
    return None if sens is None else {n: st.c for n, st in sens.items()}


def _loss_weights(sens: dict[str, LayerSensitivity], per_unit: Callable[[str], float]) -> dict[str, float]:
    """Each layer's factor from its spectrum's energies to the expected increase of the output loss:
    (c_l / d_out) · `per_unit(l)` (what one unit of the spectrum's energy is in squared output error per row).
    Floored at 1e-12 of the largest, so that a layer the loss never felt gets ranks only when nothing else wants them."""
    w = {n: st.weight * per_unit(n) for n, st in sens.items()}
    top = max(w.values(), default=0.0)
    return {n: max(v, 1e-12 * top) for n, v in w.items()}


def allocate_on_bases(plans: list[LayerPlan], recipe: Recipe, sigma: Callable[[str], torch.Tensor], sens: dict[str, LayerSensitivity] | None,
                      unit: dict[str, float], rows: dict[str, int] | None = None) -> Allocation:
    """Ranks across layers for the data-aware methods, from each layer's spectrum `sigma(name)` (of W·S, whitened; of W·D,
    ASVD) weighted by its sensitivity (`unit`: the squared output error per row of one unit of the spectrum's energy), or
    from the exact per-component output error where the sensitivity pass measured it (ASVD's `direction_power`)."""
    fac = recipe.factorize
    weights = _loss_weights(sens, unit.__getitem__) if sens else {}

    def spectrum(n: str) -> torch.Tensor:
        if n in weights and sens[n].direction_power is not None:  # exact per-component output error (asvd)
            return (sens[n].direction_power.cpu().double() * weights[n]).sqrt()
        return sigma(n) * math.sqrt(weights[n]) if n in weights else sigma(n)

    return allocate_ranks(plans, spectrum, fac.min_rank, rows, spectrum_kind=fac.method, sensitivity=_c(sens))


def _factorize_data_aware(
    model: nn.Module,
    recipe: Recipe,
    plans: list[LayerPlan],
    calibration: Iterable | None,
    progress: Progress | None,
    latency: LatencySelection | None,
    rows: dict[str, int] | None,
    call,
    sens: dict[str, LayerSensitivity] | None = None,
    measure: Callable[[dict[str, torch.Tensor]], dict[str, LayerSensitivity]] | None = None,
    device: torch.device | None = None,
) -> Factorization:
    """The `whitened` / `asvd` methods (see `decompose.whiten`).

    The calibration batches go through the dense model once per group of Grams (see
    `calibrate.gram_groups`): every layer's statistics are taken on the *original* model's
    inputs, and the layers are swapped for `LowRankLinear`s only after all passes. With
    `rank_rule: budget`, ranks are allocated on the spectra of `W·M` (output-error energy);
    with `sens` (allocation sensitivity), on those spectra weighted by each layer's sensitivity.
    ASVD with sensitivity passes `measure` instead: once its bases are known, the sensitivity pass
    also measures the inputs' power along `Wᵀu_i`, which is exactly ASVD's output error per component.
    """
    fac = recipe.factorize
    if calibration is None:
        raise LowrankError(f"factorize.method '{fac.method}' needs calibration data (recipe key factorize.calib_data, "
                           "argument `calibration`): a folder of images, 'digits' or 'synthetic'; for text models 'pydoc', "
                           "a .txt or .jsonl file or a folder of them", param="calib_data")
    todo = {p.name: p for p in plans if p.factorized}
    whitened = fac.method == "whitened"
    budget = fac.rank_rule == "budget" or sens is not None or measure is not None
    directions: dict[str, torch.Tensor] = {}  # asvd with sensitivity: Wᵀu_i for every u_i of W·D
    groups = gram_groups(model, list(todo), fac.calib_max_gram_mb * 2**20) if whitened else [list(todo)]
    if len(groups) > 1 and iter(calibration) is calibration:  # a one-shot iterator: keep it for the next passes
        calibration = list(calibration)

    bases: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    unit: dict[str, float] = {}  # squared output error per row of one unit of the spectrum's energy
    for group in groups:
        stats = collect_input_stats(model, group, calibration, gram=whitened, call=call)
        for name in group:
            plan, w = todo[name], dense_weight(model.get_submodule(name))[0]
            st = stats.pop(name)
            U, sigma = whitened_basis(w, st.gram, device=device) if whitened else asvd_basis(w, st.abs_mean, fac.asvd_alpha, device)
            if budget:  # keep the basis up to the largest rank that could still shrink the layer
                keep = max_shrinking_rank(plan.d_in, plan.d_out)
            else:
                set_rank(plan, *rule_of(plan), sigma.cpu())
                keep = plan.rank if plan.factorized else 0
            bases[name] = (U[:, :keep].clone(), sigma.cpu())
            if measure is not None:  # (I − U_r U_rᵀ) W x: component i's output error is (u_iᵀ W x)², the input's power along Wᵀu_i
                directions[name] = (w.detach().to(U.device, U.dtype).T @ U).to(w.device, torch.float32).contiguous()
            if sens is not None and name in sens:  # whitened: σ² of W·S sum the output error over the calibration rows
                unit[name] = 1.0 / max(st.rows, 1)
            del U, st
            if progress is not None:
                progress(name)
        del stats

    if measure is not None:
        sens = measure(directions)
        directions.clear()
        unit = {n: 1.0 for n in sens}
    allocation = allocate_on_bases(plans, recipe, lambda n: bases[n][1], sens, unit, rows) if budget else None

    def swap(name: str, linear: nn.Module) -> nn.Module | None:
        plan = todo[name]
        U, _ = bases.pop(name)
        if latency is not None and plan.factorized:
            latency.decide([plan])
        if not plan.factorized:
            return None
        weight, bias = dense_weight(linear)
        up, down = projection_factors(weight, U[:, : plan.rank])
        bias = None if bias is None else bias.detach().clone()
        return LowRankLinear.from_factors(up.to(weight.device).contiguous(), down.to(weight.device).contiguous(), bias)

    replace_modules(model, swap, named_in(todo))
    return Factorization(plans, allocation, latency)
