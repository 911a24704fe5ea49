"""Planning: which layers are factorized at which rank (selection, budget allocation, latency-aware selection)."""

from lowrank_cli.plan.budget import Allocation, allocate_ranks
from lowrank_cli.plan.latency import LatencySelection, LayerTimer
from lowrank_cli.plan.select import LayerPlan, manifest_layers, matches, plan_layers, rule_of, saved_params, set_rank, weight_candidates

__all__ = ["Allocation", "LatencySelection", "LayerPlan", "LayerTimer", "allocate_ranks", "manifest_layers", "matches", "plan_layers", "rule_of", "saved_params", "set_rank", "weight_candidates"]
