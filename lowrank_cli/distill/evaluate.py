"""How well a model does on a held-out split, by its task, and how close its features are to a teacher's."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from lowrank_cli.data.loaders import eval_loader
from lowrank_cli.distill.losses import BlockOutputs, mean_pool, next_token_nll
from lowrank_cli.models.family import ModelFamily, inputs_to
from lowrank_cli.models.tasks import Task, get_task

# The most output values (logits or features) one forward may produce in evaluation: 64 M, 256 MB in fp32. A causal
# LM's logits are tokens × vocabulary per example (256 × 49 152 = 12.6 M for a small Llama), so a batch of 256 such
# examples would need 13 GB for each of the student's and the teacher's; batches are cut into sub-batches to stay under.
EVAL_OUTPUT_ELEMENTS = 1 << 26


@dataclass
class Evaluation:
    """How well a model does on a held-out split, by what its task reads (fractions, not percents):

    - classification (images or text with labels): `top1`, `top5`;
    - text features (an encoder without a head): against the teacher, `mean_cosine` and
      `min_cosine` of the mean-pooled sentence embeddings, and `neighbour_agreement`, the share
      of documents whose nearest neighbour (by cosine, among the held-out ones) is the teacher's;
    - causal LM: `perplexity` of the held-out text (next token, real tokens only).

    With a teacher, also `feature_cosine` (every block's token features) and `logit_cosine`.
    """

    examples: int
    top1: float | None = None
    top5: float | None = None
    feature_cosine: float | None = None
    logit_cosine: float | None = None
    mean_cosine: float | None = None
    min_cosine: float | None = None
    neighbour_agreement: float | None = None
    perplexity: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def primary(self) -> float | None:
        """The figure the task is judged by, larger is better: top-1, mean embedding cosine, or −log perplexity."""
        if self.top1 is not None:
            return self.top1
        if self.mean_cosine is not None:
            return self.mean_cosine
        if self.perplexity is not None:
            return -math.log(self.perplexity)
        return None


@torch.no_grad()
def evaluate(model: nn.Module, dataset: Dataset, family: ModelFamily, device: torch.device | str = "cpu", batch_size: int = 256,
             teacher: nn.Module | None = None, num_workers: int = 0, task: Task | str | None = None) -> Evaluation:
    """Evaluate `model` (dense or factorized) of `family` on `dataset`, in eval mode, in fp32, by its task's metric (see
    `Evaluation`; `task`, a `Task` or its name, defaults to the family's for the model)."""
    device = torch.device(device)
    metric = (get_task(task) if task is not None else family.task(model)).metric
    was_training = model.training
    model.eval().to(device)
    width = _output_width(model, family, dataset, device)  # before the block hooks, which expect one forward per batch
    hooks = None
    same = teacher is model  # the teacher's own reference figures: one forward, compared with itself
    if teacher is not None:
        teacher.eval().to(device)
        student_hooks = BlockOutputs(family.blocks(model))
        hooks = (student_hooks, student_hooks if same else BlockOutputs(family.blocks(teacher)))
    n = correct1 = correct5 = 0
    cos_sum = logit_cos_sum = nll = tokens = 0.0
    classes = None
    student_emb, teacher_emb = [], []
    try:
        for inputs, labels in _bounded(eval_loader(dataset, batch_size, num_workers, pin_memory=device.type == "cuda"), width):
            inputs, labels = inputs_to(inputs, device, non_blocking=True), labels.to(device, non_blocking=True)
            mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
            logits = family.forward(model, inputs)
            t_logits = logits if same else family.forward(teacher, inputs) if teacher is not None else None
            if metric == "accuracy":
                classes = logits.shape[-1]
                top = logits.topk(min(5, classes), dim=-1).indices
                correct1 += (top[:, 0] == labels).sum().item()
                correct5 += (top == labels[:, None]).any(-1).sum().item()
            elif metric == "perplexity":
                total, count = next_token_nll(logits, inputs["input_ids"], mask)
                nll, tokens = nll + total.item(), tokens + count.item()
            elif t_logits is not None:  # features: sentence embeddings against the teacher's
                student_emb.append(mean_pool(logits.float(), mask).cpu())
                teacher_emb.append(mean_pool(t_logits.float(), mask).cpu())
            if hooks is not None:
                s_feats = hooks[0].take()
                t_feats = s_feats if same else hooks[1].take()
                per_block = [_token_cosine(s, t, mask) for s, t in zip(s_feats, t_feats)]
                cos_sum += torch.stack(per_block).mean(0).sum().item()
                logit_cos_sum += _token_cosine(logits, t_logits, mask).sum().item()
            n += len(labels)
    finally:
        if hooks is not None:
            for h in set(hooks):
                h.remove()
        model.train(was_training)
    out = Evaluation(examples=n, feature_cosine=cos_sum / n if hooks is not None else None, logit_cosine=logit_cos_sum / n if hooks is not None else None)
    if metric == "accuracy":
        out.top1, out.top5 = correct1 / max(n, 1), correct5 / max(n, 1) if classes and classes >= 5 else None
    elif metric == "perplexity":
        out.perplexity = math.exp(nll / max(tokens, 1))
    elif student_emb:
        out.mean_cosine, out.min_cosine, out.neighbour_agreement = embedding_agreement(torch.cat(student_emb), torch.cat(teacher_emb))
    return out


def _tokens(inputs) -> int:
    """Positions per example: a text batch's sequence length, 1 for anything else (an image's outputs count as one)."""
    ids = inputs.get("input_ids") if isinstance(inputs, dict) else None
    return int(ids.shape[-1]) if ids is not None and ids.dim() == 2 else 1


def _output_width(model: nn.Module, family: ModelFamily, dataset: Dataset, device: torch.device) -> int:
    """Output values per example and position (a causal LM: its vocabulary), from one forward of one example."""
    if len(dataset) == 0:
        return 1
    inputs, _ = next(iter(eval_loader(dataset, 1, 0, pin_memory=False)))
    out = family.forward(model, inputs_to(inputs, device))
    return max(1, out.numel() // _tokens(inputs))


def _bounded(batches, width: int):
    """The loader's batches, each cut into sub-batches whose outputs hold at most `EVAL_OUTPUT_ELEMENTS` values."""
    for inputs, labels in batches:
        rows = max(1, EVAL_OUTPUT_ELEMENTS // (width * _tokens(inputs)))
        for i in range(0, len(labels), rows):
            sub = {k: v[i:i + rows] for k, v in inputs.items()} if isinstance(inputs, dict) else inputs[i:i + rows]
            yield sub, labels[i:i + rows]


def _token_cosine(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per example: the mean cosine of feature vectors (last dimension) over tokens, real tokens only for text."""
    cos = F.cosine_similarity(a.float(), b.float(), dim=-1)
    if cos.dim() == 1:
        return cos
    if mask is not None and cos.dim() == 2 and tuple(cos.shape) == tuple(mask.shape):
        m = mask.to(cos.dtype)
        return (cos * m).sum(1) / m.sum(1).clamp_min(1)
    return cos.flatten(1).mean(1)


def embedding_agreement(student: torch.Tensor, teacher: torch.Tensor) -> tuple[float, float, float]:
    """(mean cosine, min cosine, nearest-neighbour agreement) of two sets of sentence embeddings (N × d).

    Nearest neighbours are taken among the N documents themselves (each one's closest other), by cosine.
    """
    cos = F.cosine_similarity(student, teacher, dim=-1)
    agree = float("nan")
    if len(student) > 1:
        def neighbours(e: torch.Tensor) -> torch.Tensor:
            e = F.normalize(e, dim=-1)
            sim = e @ e.T
            sim.fill_diagonal_(-2.0)
            return sim.argmax(-1)
        agree = (neighbours(student) == neighbours(teacher)).float().mean().item()
    return cos.mean().item(), cos.min().item(), agree
