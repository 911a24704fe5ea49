"""Distillation: losses, objectives, the training loop, distributed set-up, evaluation.

- `losses.py`      L_fd (block features via hooks), L_rwp (paper / squared / hinge), L_base
- `objective.py`   what one step minimises: PELA, PC-LoRA, or supervised (the demo's teacher)
- `train.py`       AdamW, warm-up + cosine, clipping, accumulation, AMP, the loop
- `distributed.py` torchrun / DDP set-up
- `fsdp.py`        FSDP2 sharding of the student and the teacher, whole checkpoints gathered from the shards
- `local.py`       local (block-wise) distillation before the end-to-end stage
- `evaluate.py`    top-1/top-5 and feature cosine similarity to a teacher

The whole `compress` / `distill` step, from checkpoints to a report, is `pipelines/compress.py` (its parts in `pipelines/common/`).
"""

from lowrank_cli.distill.evaluate import Evaluation, evaluate
from lowrank_cli.distill.losses import feature_distill_loss, weight_perturbation_loss
from lowrank_cli.distill.objective import DistillationObjective, ProgressiveObjective, SupervisedObjective
from lowrank_cli.distill.train import train

__all__ = ["DistillationObjective", "Evaluation", "ProgressiveObjective", "SupervisedObjective", "evaluate", "feature_distill_loss", "train", "weight_perturbation_loss"]
