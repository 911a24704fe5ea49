"""Measuring: parameters and MACs, and timing primitives (interleaved, per layer)."""

from lowrank_cli.measure.macs import MacCount, count_macs, count_params
from lowrank_cli.measure.timing import LayerShape, LayerTiming, Timing, layer_shapes, time_interleaved, time_linear_layers, torch_threads

__all__ = ["LayerShape", "LayerTiming", "MacCount", "Timing", "count_macs", "count_params", "layer_shapes", "time_interleaved", "time_linear_layers", "torch_threads"]
