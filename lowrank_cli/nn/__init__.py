"""Layers and surgery: `LowRankLinear`, the PC-LoRA layer, and `replace_modules`."""

from lowrank_cli.nn.lowrank import LowRankEmbedding, LowRankLinear, dense_weight, is_conv1d, linear_dims
from lowrank_cli.nn.pclora import PCLoRALinear, decay_lambda, finalize, set_lambda
from lowrank_cli.nn.surgery import named_in, replace_modules

__all__ = ["LowRankEmbedding", "LowRankLinear", "dense_weight", "is_conv1d", "linear_dims", "PCLoRALinear", "decay_lambda", "finalize", "named_in", "replace_modules", "set_lambda"]
