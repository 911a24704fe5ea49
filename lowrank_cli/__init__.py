"""lowrank: smaller, faster transformer checkpoints by low-rank factorization and distillation.

Library use, without the CLI::

    from lowrank_cli import load, factorize_model, load_recipe
    model = load("deit.lowrank.safetensors")

The names below are resolved when first used (PEP 562), so that importing the package (as
`lowrank --version` does) costs nothing: torch and timm are imported with the first of them.
"""

from __future__ import annotations

import importlib
from typing import Any

from lowrank_cli._version import __version__

# public name -> the module that defines it
_EXPORTS = {
    "LowrankError": "lowrank_cli.errors",
    "LowRankLinear": "lowrank_cli.nn.lowrank",
    "replace_modules": "lowrank_cli.nn.surgery",
    "Manifest": "lowrank_cli.io.manifest",
    "create_model": "lowrank_cli.models.build",
    "load": "lowrank_cli.models.build",
    "factorize_model": "lowrank_cli.factorize.model",
    "Recipe": "lowrank_cli.recipe",
    "load_recipe": "lowrank_cli.recipe",
    "inspect_checkpoint": "lowrank_cli.pipelines.inspect",
    "factorize_checkpoint": "lowrank_cli.pipelines.factorize",
    "compress_checkpoint": "lowrank_cli.pipelines.compress",
    "distill_checkpoint": "lowrank_cli.pipelines.compress",
    "export_checkpoint": "lowrank_cli.pipelines.export",
    "bench_checkpoint": "lowrank_cli.pipelines.bench",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lowrank_cli' has no attribute '{name}'")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
