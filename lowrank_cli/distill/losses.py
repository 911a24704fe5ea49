"""PELA's training objective: `L = L_base + α·L_fd + β·L_rwp` (docs/algorithms.md §2).

- `feature_distill_loss`: every transformer block's token features, student against teacher,
  captured with forward hooks (`BlockOutputs`) during the one forward pass each model makes.
- `weight_perturbation_loss` (`L_rwp`): how far each factorized layer's `up·down` is from the
  teacher's dense weight, in the max-norm, in one of three forms (see its docstring).
- `base_loss`: cross-entropy with labels, MSE on the teacher's logits, or nothing.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Literal, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_cli.errors import LowrankError
from lowrank_cli.nn.lowrank import LowRankLinear, dense_weight, is_conv1d, linear_dims

RwpForm = Literal["hinge", "squared", "paper"]
BaseLoss = Literal["ce", "logits", "lm", "kl", "none"]

class BlockOutputs:
    """Forward hooks that keep each transformer block's output from the last forward pass.

    `blocks` are the model's transformer blocks in forward order, as its family finds them
    (`ModelFamily.blocks`). ViT/DeiT blocks output (B, N, C) tokens, Swin blocks (B, H, W, C):
    the loss does not care, it compares student and teacher tensors of the same shape.
    `take()` returns the outputs in block order and forgets them, so nothing is kept across steps.
    """

    def __init__(self, blocks: list[tuple[str, nn.Module]]):
        self.names = [name for name, _ in blocks]
        self._outputs: list[torch.Tensor] = []
        self._handles = [m.register_forward_hook(self._keep) for _, m in blocks]
        self._paused = False

    def _keep(self, module: nn.Module, inputs, output) -> None:
        if not self._paused:
            self._outputs.append(output[0] if isinstance(output, tuple) else output)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Forward passes inside keep nothing (an evaluation in the middle of training)."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    def take(self) -> list[torch.Tensor]:
        outputs, self._outputs = self._outputs, []
        if len(outputs) != len(self.names):
            raise RuntimeError(f"expected {len(self.names)} block outputs, got {len(outputs)} (one forward pass per take())")
        return outputs

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._outputs = [], []


def feature_distill_loss(student: list[torch.Tensor], teacher: list[torch.Tensor], mask: torch.Tensor | None = None) -> torch.Tensor:
    """`L_fd`: mean over blocks of the mean squared error of all token features, in fp32.

    The released PELA code's form (`mean_i mse(X_s^i, X_t^i)`); the paper's
    `1/(2N) Σ_i ‖X_s^i − X_t^i‖²` is the same up to a constant factor per model size.
    `mask` (B, N), for text: padding tokens are left out of the mean.
    """
    if len(student) != len(teacher) or not student:
        raise ValueError(f"student has {len(student)} block outputs, teacher {len(teacher)}")
    losses = [masked_mse(s.float(), t.detach().float(), mask) for s, t in zip(student, teacher)]
    return torch.stack(losses).mean()


def masked_mse(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean squared error over every element, or, with a (B, N) token mask and (B, N, C) features, over the real tokens."""
    if mask is None or a.dim() != 3 or tuple(a.shape[:2]) != tuple(mask.shape):
        return F.mse_loss(a, b)
    m = mask.to(a.dtype).unsqueeze(-1)
    return ((a - b).square() * m).sum() / (m.sum() * a.shape[-1]).clamp_min(1)


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The mean of (B, N, C) token features over the real tokens: a sentence embedding."""
    if mask is None:
        return hidden.mean(1)
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1)


def next_token_nll(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of −log p(next token), number of predicted tokens) over the real tokens of a causal LM's batch."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = input_ids[:, 1:]
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    keep = torch.ones_like(nll) if mask is None else mask[:, 1:].to(nll.dtype)
    return (nll * keep).sum(), keep.sum()


def factorized_pairs(student: nn.Module, teacher: nn.Module) -> list[tuple[LowRankLinear, torch.Tensor]]:
    """Each `LowRankLinear` of the student with the teacher's dense weight it stands in for."""
    pairs = []
    for name, module in student.named_modules():
        if isinstance(module, LowRankLinear):
            dense = teacher.get_submodule(name)
            if not (isinstance(dense, nn.Linear) or is_conv1d(dense)) or linear_dims(dense) != (module.in_features, module.out_features):
                raise LowrankError(f"teacher layer '{name}' is {dense!r}, not a {module.out_features}x{module.in_features} linear")
            pairs.append((module, dense_weight(dense)[0]))
    return pairs


def weight_perturbation_loss(pairs: list[tuple[LowRankLinear, torch.Tensor]], epsilon: float, form: RwpForm = "hinge") -> torch.Tensor:
    """`L_rwp`: `Σ_k f(‖up_k·down_k − W_k‖_∞ − ε)` over the factorized layers, in fp32.

    `form`: `paper` f(x) = x (ε shifts the value, not the gradient); `squared` f(x) = x², the
    released code's form, which also pushes ΔW *up* towards ε when it is below; `hinge`
    f(x) = max(0, x), which is the constraint ‖ΔW‖_∞ ≤ ε itself: no pull once it holds.
    """
    if not pairs:
        return torch.zeros(())
    terms = []
    with torch.autocast(device_type=pairs[0][1].device.type, enabled=False):  # fp32 even under AMP
        for layer, dense in pairs:
            delta = layer.up.weight.float() @ layer.down.weight.float() - dense.detach().float()
            gap = delta.abs().amax() - epsilon
            terms.append(gap if form == "paper" else gap.square() if form == "squared" else gap.clamp_min(0))
    return torch.stack(terms).sum()


def base_loss(kind: BaseLoss, logits: torch.Tensor, labels: torch.Tensor | None, teacher_logits: torch.Tensor | None,
              inputs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """`L_base`: cross-entropy on labels (`ce`), MSE on the teacher's logits (`logits`), a causal LM's next-token
    loss (`lm`), the KL divergence from the teacher's next-token distribution (`kl`), or 0. Text's padding is left out."""
    mask = inputs.get("attention_mask") if isinstance(inputs, dict) else None
    if kind == "ce":
        if labels is None:
            raise ValueError("base_loss 'ce' needs labels")
        return F.cross_entropy(logits.float(), labels)
    if kind == "logits":
        return masked_mse(logits.float(), teacher_logits.detach().float(), mask)
    if kind == "lm":
        total, count = next_token_nll(logits, inputs["input_ids"], mask)
        return total / count.clamp_min(1)
    if kind == "kl":
        kl = F.kl_div(torch.log_softmax(logits.float(), -1), torch.log_softmax(teacher_logits.detach().float(), -1),
                      reduction="none", log_target=True).sum(-1)
        keep = torch.ones_like(kl) if mask is None else mask.to(kl.dtype)
        return (kl * keep).sum() / keep.sum().clamp_min(1)
    return logits.new_zeros((), dtype=torch.float32)


def pooled_cosine_loss(hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """1 − cosine of the mean-pooled sentence embeddings, student against teacher, averaged over the batch."""
    s, t = mean_pool(hidden.float(), mask), mean_pool(teacher_hidden.detach().float(), mask)
    return (1 - F.cosine_similarity(s, t, dim=-1)).mean()


def noisy_tokens(inputs: Mapping[str, torch.Tensor], fraction: float) -> dict[str, torch.Tensor]:
    """`inputs` with about `fraction` of the real tokens of `input_ids` (neither a document's first nor its last, which are
    special tokens for most tokenizers; padding never) replaced by tokens drawn at random from those positions of the batch.
    Without an `attention_mask` every token is real. Uses torch's global generator (seeded by the run); `inputs` itself is not changed."""
    ids = inputs["input_ids"]
    mask = inputs["attention_mask"].bool() if inputs.get("attention_mask") is not None else torch.ones_like(ids, dtype=torch.bool)
    inner = mask.clone()
    inner[:, 0] = False
    inner[torch.arange(len(ids), device=ids.device), (mask.sum(1) - 1).clamp_min(0)] = False
    pool = ids[inner]
    hit = inner & (torch.rand(ids.shape, device=ids.device) < fraction)
    n = int(hit.sum())
    if not n or not pool.numel():
        return dict(inputs)
    ids = ids.clone()
    ids[hit] = pool[torch.randint(len(pool), (n,), device=ids.device)]
    return {**inputs, "input_ids": ids}
