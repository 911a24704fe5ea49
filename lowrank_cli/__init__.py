"""lowrank: smaller, faster transformer checkpoints by low-rank factorization and distillation.

Library use, without the CLI::

    from lowrank_cli import load, factorize_model, load_recipe
    model = load("deit.lowrank.safetensors")
"""

__version__ = "0.1.0"

from lowrank_cli.errors import LowrankError  # noqa: E402
from lowrank_cli.factorize import LowRankLinear, factorize_model  # noqa: E402
from lowrank_cli.models import create_model, load  # noqa: E402
from lowrank_cli.pipeline import factorize_checkpoint, inspect_checkpoint  # noqa: E402
from lowrank_cli.recipe import Recipe, load_recipe  # noqa: E402

__all__ = [
    "LowRankLinear",
    "LowrankError",
    "Recipe",
    "__version__",
    "create_model",
    "factorize_checkpoint",
    "factorize_model",
    "inspect_checkpoint",
    "load",
    "load_recipe",
]
