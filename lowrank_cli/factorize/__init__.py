"""Applying a plan to a model: SVD and data-aware factorization, weight-only factorization, PC-LoRA adapters."""

from lowrank_cli.factorize.calibrate import LayerInputStats, collect_input_stats, gram_groups
from lowrank_cli.factorize.model import Factorization, check_method, factorize_model, linear_rows
from lowrank_cli.factorize.pclora import apply_pclora
from lowrank_cli.factorize.state_dict import factorize_state_dict
from lowrank_cli.factorize.stream import factorize_streamed

__all__ = ["Factorization", "LayerInputStats", "apply_pclora", "check_method", "collect_input_stats", "factorize_model", "factorize_state_dict",
           "factorize_streamed", "gram_groups", "linear_rows"]
