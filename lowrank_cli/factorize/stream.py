"""Streamed factorization: a checkpoint factorized one weight at a time, from its files to a writer, the model never whole.

The model is a skeleton (`models.skeleton`: its parameters on the meta device), which gives the
candidates, the plans and the state dict's names. Each tensor of that state dict is then read
from the checkpoint when its turn comes: a planned layer's weight is factorized by truncated SVD
in fp32 and its factors, cast to the weight's dtype, are handed to `write`; every other tensor is
handed on as stored. Memory is one weight and its SVD, beyond what the writer holds. The
tensors are those the in-memory path (`factorize.model.factorize_model` on the loaded model,
then its state dict with tied tensors once) writes for plain SVD: same names, same values.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from lowrank_cli.decompose.svd import svd, svd_device, truncated_factors
from lowrank_cli.decompose.whiten import asvd_basis, projection_factors, whitened_basis
from lowrank_cli.errors import LowrankError
from lowrank_cli.factorize.calibrate import collect_input_stats
from lowrank_cli.factorize.model import Factorization, check_method
from lowrank_cli.models.blocks import BlockRunner
from lowrank_cli.models.family import ModelFamily, inputs_to
from lowrank_cli.models.skeleton import state_names
from lowrank_cli.plan.select import LayerPlan, plan_embeddings, plan_layers, rule_of, set_rank
from lowrank_cli.recipe import Recipe

Progress = Callable[[str], None]
Write = Callable[[str, torch.Tensor], None]


def plan_streamed(model: nn.Module, recipe: Recipe, family: ModelFamily) -> list[LayerPlan]:
    """Every linear candidate's plan, then the embedding tables' (`factorize.embeddings`), as `factorize_model` plans them."""
    plans = plan_layers(family.linear_candidates(model), recipe)
    if recipe.factorize.embeddings is not None:
        plans += plan_embeddings(family.embedding_candidates(model), recipe)
    return plans


Factors = Callable[[LayerPlan, torch.Tensor], "tuple[torch.Tensor, torch.Tensor] | None"]


class _Emitter:
    """Hands each saved tensor of the skeleton to `write`, a planned layer's weight as the factors `factor(plan, W)` gives
    (None: it stays dense), its bias as `up.bias`; W as `(d_out, d_in)` in its stored dtype (a Conv1D's transposed)."""

    def __init__(self, plans: list[LayerPlan], get: Callable[[str], torch.Tensor], sources: dict[str, str], write: Write,
                 progress: Progress | None):
        self.todo = {p.name: p for p in plans if p.factorized}
        self.get, self.sources, self.progress = get, sources, progress
        self.write: Write = lambda key, tensor: write(key, tensor.cpu())  # what ran on a GPU is written from the host
        self.done: set[str] = set()  # layers factorized (their bias goes to up.bias)
        self.device = torch.device("cpu")  # where `_materialize` puts the weights it reads

    def emit(self, key: str, factor: Factors, weight: torch.Tensor | None = None) -> None:
        """`key`'s tensor (or what replaces it); `weight`: the stored tensor when the caller holds it already."""
        layer, _, leaf = key.rpartition(".")
        plan = self.todo.get(layer)
        if plan is None or leaf not in ("weight", "bias"):
            self.write(key, weight if weight is not None else self.get(self.sources[key]))
            return
        stored = weight if weight is not None else self.get(self.sources[key])
        if leaf == "bias":
            self.write(f"{layer}.up.bias" if layer in self.done else key, stored)
            return
        factors = factor(plan, stored.T if plan.kind == "conv1d" else stored)  # GPT-2's Conv1D stores (d_in, d_out)
        if factors is None:
            self.write(key, stored)
        elif plan.kind == "embedding":  # lookup: V × r (U_r √Σ), proj: d × r (V_r √Σ)
            self.write(f"{layer}.lookup.weight", factors[0].contiguous())
            self.write(f"{layer}.proj.weight", factors[1].T.contiguous())
        else:
            self.write(f"{layer}.down.weight", factors[1].contiguous())
            self.write(f"{layer}.up.weight", factors[0].contiguous())
        if factors is not None:
            self.done.add(layer)
        if self.progress is not None:
            self.progress(layer)


def svd_factors(device: torch.device) -> Factors:
    """Plain truncated SVD (`decompose.svd`): the energy rule's rank from σ; None when that rank would not shrink it."""

    def factor(plan: LayerPlan, weight: torch.Tensor):
        usv = svd(weight, device)
        set_rank(plan, *rule_of(plan), usv[1].cpu())
        return truncated_factors(weight, plan.rank, usv) if plan.factorized else None

    return factor


def factorize_streamed(
    model: nn.Module,
    recipe: Recipe,
    get: Callable[[str], torch.Tensor],
    sources: dict[str, str],
    write: Write,
    *,
    family: ModelFamily,
    progress: Progress | None = None,
    device: torch.device | str | None = None,
    calibration: Iterable | None = None,
) -> Factorization:
    """Factorize the skeleton `model` streamed: each tensor of its state dict is read by `get(sources[name])`
    (`models.skeleton.source_keys`) and what replaces it handed to `write(name, tensor)`.

    A factorized linear's `<layer>.weight` becomes `<layer>.down.weight` and `<layer>.up.weight` and its bias
    `<layer>.up.bias` (`LowRankLinear`); an embedding table becomes `<table>.lookup.weight` and `<table>.proj.weight`
    (`LowRankEmbedding`). The factors are in the weight's dtype, computed in fp32 on `svd_device(device)`; a plan with the
    energy rule gets its rank from its spectrum, and stays dense when that rank would not shrink it. `progress(name)` after
    each planned layer. Plain SVD goes in the state dict's order; `factorize.method: whitened | asvd` block by block on
    `calibration` (`_factorize_blocks`).
    """
    check_method(recipe, family.task(model))
    device = svd_device(device)
    plans = plan_streamed(model, recipe, family)
    emitter = _Emitter(plans, get, sources, write, progress)
    if recipe.factorize.method != "svd":
        _factorize_blocks(model, recipe, family, emitter, calibration, device)
        return Factorization(plans)
    factor = svd_factors(device)
    for names in state_names(model):
        emitter.emit(names[0], factor)
    return Factorization(plans)


def _factorize_blocks(model: nn.Module, recipe: Recipe, family: ModelFamily, emitter: _Emitter, calibration: Iterable | None,
                      device: torch.device) -> None:
    """Whitened SVD or ASVD, one transformer block at a time (`models.blocks.BlockRunner`).

    The calibration batches are embedded once (the weights outside the blocks read, then dropped) and each block's
    inputs cached. For each block in turn: its weights are read, the cached inputs run through it while the input
    statistics of its planned linears are collected (`calibrate.collect_input_stats`), its linears are factorized from
    them, and its *dense* outputs become the next block's inputs: every layer's statistics are those of the original
    model's inputs, as the in-memory path (`factorize_model`) takes them, all passes on the dense model. Then the block's
    weights are dropped. Memory: one block's weights, its Grams, and the calibration set's hidden states (twice). The weights
    read and the calibration passes are on `device` (the SVDs' device), what is written goes from the host.
    """
    fac = recipe.factorize
    whitened = fac.method == "whitened"
    if calibration is None:
        raise LowrankError(f"factorize.method '{fac.method}' needs calibration data (recipe key factorize.calib_data, argument "
                           "`calibration`)", param="calib_data")
    runner = BlockRunner(family, model)
    prefixes = [f"{name}." for name in runner.names]
    emitter.device = device  # the weights read for the calibration passes go there, and the skeleton's buffers (rotary tables)
    for module in model.modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.device.type != "meta":
                module._buffers[name] = buffer.to(device)
    keys = [names[0] for names in state_names(model)]
    inside = [i for i, key in enumerate(keys) if key.startswith(tuple(prefixes))]
    before, after = keys[: inside[0]], [k for k in keys[inside[0]:] if not k.startswith(tuple(prefixes))]  # in the state dict's order
    _materialize(model, emitter, lambda key: not any(key.startswith(p) for p in prefixes))
    hidden, calls, masks = [], [], []
    for batch in calibration:
        inputs = inputs_to(batch[0] if isinstance(batch, (tuple, list)) else batch, device)
        h, call = runner.first_input(inputs)
        hidden.append(h)
        calls.append(call)
        masks.append(inputs.get("attention_mask") if isinstance(inputs, dict) else None)
    for key in before:  # nothing outside the blocks is factorized here (streamable() checks it)
        emitter.emit(key, svd_factors(device), _held(model, key))
    _to_meta(model, lambda key: not any(key.startswith(p) for p in prefixes))
    if not hidden:
        raise LowrankError("calibration data is empty: give at least one example (factorize.calib_samples)", param="calib_samples")
    for i, (name, block) in enumerate(runner.blocks):
        prefix = f"{name}."
        _materialize(model, emitter, lambda key: key.startswith(prefix))
        names = [n[len(prefix):] for n in emitter.todo if n.startswith(prefix)]
        outputs: list[torch.Tensor] = []

        def run(blk: nn.Module, item: dict) -> torch.Tensor:
            out = calls[int(item["index"])](blk, item["hidden"])
            outputs.append(out)
            return out

        items = [{"hidden": runner.link(i, h) if i else h, "index": torch.tensor(j), **({"attention_mask": m} if m is not None else {})}
                 for j, (h, m) in enumerate(zip(hidden, masks))]
        stats = collect_input_stats(block, names, items, gram=whitened, call=run) if names else {}
        if not names:
            outputs = [run(block, item) for item in items]

        def factor(plan: LayerPlan, weight: torch.Tensor):
            st = stats.pop(plan.name[len(prefix):])
            U, sigma = whitened_basis(weight, st.gram, device=device) if whitened else asvd_basis(weight, st.abs_mean, fac.asvd_alpha, device)
            set_rank(plan, *rule_of(plan), sigma.cpu())
            if not plan.factorized:
                return None
            up, down = projection_factors(weight, U[:, : plan.rank])
            return up.to(weight.device), down.to(weight.device)

        for key in [n[0] for n in state_names(model) if n[0].startswith(prefix)]:
            emitter.emit(key, factor, _held(model, key))
        _to_meta(model, lambda key: key.startswith(prefix))
        hidden, items, stats = outputs, None, None
    for key in after:  # read again: not held through the blocks
        emitter.emit(key, svd_factors(device))


def _held(model: nn.Module, key: str) -> torch.Tensor:
    """The tensor `key` of the model as it holds it now (read by `_materialize`)."""
    return model.state_dict(keep_vars=True)[key].detach()


def _materialize(model: nn.Module, emitter: _Emitter, which: Callable[[str], bool]) -> None:
    """Read the parameters whose (first) names `which` takes from the checkpoint into the model, in their stored dtype
    (whatever the skeleton holds in their place: meta tensors, or `models.skeleton.zero_weights`' zeros)."""
    for names in state_names(model):
        key = names[0]
        module_name, _, leaf = key.rpartition(".")
        module = model.get_submodule(module_name)
        param = module._parameters.get(leaf)
        if which(key) and param is not None:
            real = nn.Parameter(emitter.get(emitter.sources[key]).to(emitter.device), requires_grad=False)
            for name in names:  # tied: every holder gets the same tensor
                holder, _, attr = name.rpartition(".")
                model.get_submodule(holder)._parameters[attr] = real


def _to_meta(model: nn.Module, which: Callable[[str], bool]) -> None:
    """Drop the weights `_materialize` read: the parameters whose names `which` takes go back to the meta device."""
    for names in state_names(model):
        key = names[0]
        module_name, _, leaf = key.rpartition(".")
        param = model.get_submodule(module_name)._parameters.get(leaf)
        if which(key) and param is not None:
            empty = nn.Parameter(param.detach().to("meta"), requires_grad=False)
            for name in names:
                holder, _, attr = name.rpartition(".")
                model.get_submodule(holder)._parameters[attr] = empty
