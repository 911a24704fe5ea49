"""PELA intermediate pre-training: distill a factorized student from its dense original.

- `losses.py`     L_fd (block features via hooks), L_rwp (paper / squared / hinge), L_base
- `objective.py`  what one step minimises: distillation, or supervised (the demo's teacher)
- `data.py`       image folders (timm), `digits`, `synthetic`; a resumable sampler
- `train.py`      AdamW, warm-up + cosine, clipping, accumulation, AMP, the loop
- `distributed.py` torchrun / DDP set-up
- `rundir.py`     the run folder: recipe, metrics, checkpoints, training state, report
- `compress.py`   `compress` and `distill`, from checkpoints to a report
- `evaluate.py`   top-1/top-5 and feature cosine similarity to a teacher
"""

from lowrank_cli.distill.compress import compress_checkpoint, distill_checkpoint
from lowrank_cli.distill.evaluate import Evaluation, evaluate
from lowrank_cli.distill.losses import feature_distill_loss, weight_perturbation_loss

__all__ = ["Evaluation", "compress_checkpoint", "distill_checkpoint", "evaluate", "feature_distill_loss", "weight_perturbation_loss"]
