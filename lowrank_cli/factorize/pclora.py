"""PC-LoRA's starting point (docs/algorithms.md §3): adapters beside each selected linear.

Embedding tables (`factorize.embeddings`) have no dense branch to fade out: they are factorized
from their truncated SVD at the start, as PELA's are, and trained with the adapters.
"""

from __future__ import annotations

import torch
from torch import nn

from lowrank_cli.factorize.model import factorize_embeddings
from lowrank_cli.models.family import ModelFamily, embedding_candidates, linear_candidates
from lowrank_cli.nn.pclora import AdapterInit, PCLoRALinear
from lowrank_cli.nn.surgery import named_in, replace_modules
from lowrank_cli.plan.select import LayerPlan, plan_embeddings, plan_layers
from lowrank_cli.recipe import Recipe


def apply_pclora(model: nn.Module, recipe: Recipe, init: AdapterInit = "lora", seed: int = 0, family: ModelFamily | None = None,
                 device: torch.device | None = None) -> list[LayerPlan]:
    """Replace each linear the recipe selects by a `PCLoRALinear` at the recipe's rank, in place; with
    `factorize.embeddings`, each selected embedding table by its `LowRankEmbedding` (SVD start)."""
    generator = torch.Generator().manual_seed(seed)
    candidates = family.linear_candidates(model) if family is not None else linear_candidates(model)
    plans = plan_layers(candidates, recipe)
    todo = {p.name: p for p in plans if p.factorized and p.rank is not None}
    replace_modules(model, lambda name, linear: PCLoRALinear.from_linear(linear, todo[name].rank, init, generator, device), named_in(todo))
    if recipe.factorize.embeddings is not None:
        tables = plan_embeddings(family.embedding_candidates(model) if family is not None else embedding_candidates(model), recipe)
        factorize_embeddings(model, tables, device=device)
        plans += tables
    return plans
