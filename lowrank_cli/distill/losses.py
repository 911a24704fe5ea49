"""PELA's training objective: `L = L_base + α·L_fd + β·L_rwp` (docs/algorithms.md §2).

- `feature_distill_loss`: every transformer block's token features, student against teacher,
  captured with forward hooks (`BlockOutputs`) during the one forward pass each model makes.
- `weight_perturbation_loss` (`L_rwp`): how far each factorized layer's `up·down` is from the
  teacher's dense weight, in the max-norm, in one of three forms (see its docstring).
- `base_loss`: cross-entropy with labels, MSE on the teacher's logits, or nothing.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_cli.errors import LowrankError
from lowrank_cli.nn.lowrank import LowRankLinear

RwpForm = Literal["hinge", "squared", "paper"]
BaseLoss = Literal["ce", "logits", "none"]

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

    def _keep(self, module: nn.Module, inputs, output) -> None:
        self._outputs.append(output[0] if isinstance(output, tuple) else output)

    def take(self) -> list[torch.Tensor]:
        outputs, self._outputs = self._outputs, []
        if len(outputs) != len(self.names):
            raise RuntimeError(f"expected {len(self.names)} block outputs, got {len(outputs)} (one forward pass per take())")
        return outputs

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles, self._outputs = [], []


def feature_distill_loss(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """`L_fd`: mean over blocks of the mean squared error of all token features, in fp32.

    The released PELA code's form (`mean_i mse(X_s^i, X_t^i)`); the paper's
    `1/(2N) Σ_i ‖X_s^i − X_t^i‖²` is the same up to a constant factor per model size.
    """
    if len(student) != len(teacher) or not student:
        raise ValueError(f"student has {len(student)} block outputs, teacher {len(teacher)}")
    losses = [F.mse_loss(s.float(), t.detach().float()) for s, t in zip(student, teacher)]
    return torch.stack(losses).mean()


def factorized_pairs(student: nn.Module, teacher: nn.Module) -> list[tuple[LowRankLinear, torch.Tensor]]:
    """Each `LowRankLinear` of the student with the teacher's dense weight it stands in for."""
    pairs = []
    for name, module in student.named_modules():
        if isinstance(module, LowRankLinear):
            dense = teacher.get_submodule(name)
            if not isinstance(dense, nn.Linear) or dense.weight.shape != (module.out_features, module.in_features):
                raise LowrankError(f"teacher layer '{name}' is {dense!r}, not a {module.out_features}x{module.in_features} linear")
            pairs.append((module, dense.weight))
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


def base_loss(kind: BaseLoss, logits: torch.Tensor, labels: torch.Tensor | None, teacher_logits: torch.Tensor | None) -> torch.Tensor:
    """`L_base`: cross-entropy on labels (`ce`), MSE on the teacher's logits (`logits`), or 0."""
    if kind == "ce":
        if labels is None:
            raise ValueError("base_loss 'ce' needs labels")
        return F.cross_entropy(logits.float(), labels)
    if kind == "logits":
        return F.mse_loss(logits.float(), teacher_logits.detach().float())
    return logits.new_zeros((), dtype=torch.float32)
