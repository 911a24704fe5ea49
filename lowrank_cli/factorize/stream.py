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

from typing import Callable

import torch
from torch import nn

from lowrank_cli.decompose.svd import svd, svd_device, truncated_factors
from lowrank_cli.factorize.model import Factorization
from lowrank_cli.models.family import ModelFamily
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
) -> Factorization:
    """Plain truncated SVD of every planned layer of the skeleton `model`, streamed: each tensor of its state dict is read by
    `get(sources[name])` (`models.skeleton.source_keys`) and what replaces it handed to `write(name, tensor)`, in the state dict's order.

    A factorized linear's `<layer>.weight` becomes `<layer>.down.weight` and `<layer>.up.weight` and its bias
    `<layer>.up.bias` (`LowRankLinear`); an embedding table becomes `<table>.lookup.weight` and `<table>.proj.weight`
    (`LowRankEmbedding`). The factors are in the weight's dtype, computed in fp32 on `svd_device(device)`; a plan with the
    energy rule gets its rank from the SVD, and stays dense when that rank would not shrink it. `progress(name)` after each
    planned layer.
    """
    device = svd_device(device)
    plans = plan_streamed(model, recipe, family)
    todo = {p.name: p for p in plans if p.factorized}
    kinds = {p.name: p.kind for p in plans}
    done: set[str] = set()  # layers factorized (their bias goes to up.bias)
    for names in state_names(model):
        key = names[0]
        layer, _, leaf = key.rpartition(".")
        plan = todo.get(layer)
        if plan is None or leaf not in ("weight", "bias"):
            write(key, get(sources[key]))
            continue
        if leaf == "bias":
            write(f"{layer}.up.bias" if layer in done else key, get(sources[key]))
            continue
        stored = get(sources[key])
        weight = stored.T if kinds[layer] == "conv1d" else stored  # GPT-2's Conv1D stores (d_in, d_out)
        usv = svd(weight, device)
        set_rank(plan, *rule_of(plan), usv[1].cpu())
        if plan.factorized:
            up, down = truncated_factors(weight, plan.rank, usv)
            if plan.kind == "embedding":  # lookup: V × r (U_r √Σ), proj: d × r (V_r √Σ)
                write(f"{layer}.lookup.weight", up.contiguous())
                write(f"{layer}.proj.weight", down.T.contiguous())
            else:
                write(f"{layer}.down.weight", down.contiguous())
                write(f"{layer}.up.weight", up.contiguous())
            done.add(layer)
        else:
            write(key, stored)
        del usv, weight, stored
        if progress is not None:
            progress(layer)
    return Factorization(plans)
