"""Accuracy of a model on a validation split, and how close its features are to a teacher's."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from lowrank_cli.data.loaders import eval_loader
from lowrank_cli.distill.losses import BlockOutputs
from lowrank_cli.models.family import ModelFamily, inputs_to


@dataclass
class Evaluation:
    """Top-1/top-5 accuracy (fractions) over `images`; `feature_cosine`: mean cosine
    similarity of every block's token features to the teacher's (None without a teacher)."""

    images: int
    top1: float
    top5: float | None
    feature_cosine: float | None = None
    logit_cosine: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, family: ModelFamily, device: torch.device | str = "cpu", batch_size: int = 256,
             teacher: nn.Module | None = None, num_workers: int = 0) -> Evaluation:
    """Evaluate `model` (dense or factorized) of `family` on `dataset`, in eval mode, in fp32."""
    device = torch.device(device)
    was_training = model.training
    model.eval().to(device)
    hooks = None
    if teacher is not None:
        teacher.eval().to(device)
        hooks = (BlockOutputs(family.blocks(model)), BlockOutputs(family.blocks(teacher)))
    n = correct1 = correct5 = 0
    cos_sum = logit_cos_sum = 0.0
    try:
        for inputs, labels in eval_loader(dataset, batch_size, num_workers, pin_memory=device.type == "cuda"):
            inputs, labels = inputs_to(inputs, device, non_blocking=True), labels.to(device, non_blocking=True)
            logits = family.forward(model, inputs)
            k = min(5, logits.shape[-1])
            top = logits.topk(k, dim=-1).indices
            correct1 += (top[:, 0] == labels).sum().item()
            correct5 += (top == labels[:, None]).any(-1).sum().item()
            if hooks is not None:
                t_logits = family.forward(teacher, inputs)
                s_feats, t_feats = hooks[0].take(), hooks[1].take()
                per_block = [F.cosine_similarity(s.float(), t.float(), dim=-1).flatten(1).mean(1) for s, t in zip(s_feats, t_feats)]
                cos_sum += torch.stack(per_block).mean(0).sum().item()
                logit_cos_sum += F.cosine_similarity(logits.float(), t_logits.float(), dim=-1).sum().item()
            n += len(labels)
    finally:
        if hooks is not None:
            for h in hooks:
                h.remove()
        model.train(was_training)
    return Evaluation(
        images=n, top1=correct1 / max(n, 1), top5=correct5 / max(n, 1) if logits.shape[-1] >= 5 else None,
        feature_cosine=cos_sum / n if hooks is not None else None, logit_cosine=logit_cos_sum / n if hooks is not None else None,
    )
