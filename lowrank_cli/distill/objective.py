"""What one training step minimises: PELA distillation, PC-LoRA, or plain supervised training.

An objective is called with the (possibly DDP-wrapped) student, a batch of inputs and its
labels, and returns the loss to back-propagate and its terms (detached, on the device: the
loop reads them only when it logs, so no step waits on the device). The model's family
says how a model is called (`forward`) and which blocks feature distillation compares.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from lowrank_cli.distill.fsdp import is_sharded
from lowrank_cli.distill.losses import BlockOutputs, base_loss, factorized_pairs, feature_distill_loss, noisy_tokens, pooled_cosine_loss, weight_perturbation_loss
from lowrank_cli.models.family import Inputs, ModelFamily, call_model
from lowrank_cli.recipe import DistillConfig

Forward = Callable[[nn.Module, Inputs], torch.Tensor]


def freeze(model: nn.Module) -> nn.Module:
    """A teacher: eval mode, no parameter requires grad (so no optimizer state, no DDP)."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def teacher_dtype(device: torch.device, amp: str, strategy: str = "ddp") -> torch.dtype | None:
    """The dtype the frozen teacher runs in: the training's autocast dtype on CUDA (`distill.amp` bf16/fp16), else None (as it is).

    Under `distill.strategy` fsdp, None: the teacher is sharded as it is, and FSDP's mixed-precision policy gathers its weights
    in bf16 (a cast copy would be a second, whole teacher on every process)."""
    if device.type != "cuda" or amp == "none" or strategy == "fsdp":
        return None
    return torch.bfloat16 if amp == "bf16" else torch.float16


class _AgainstTeacher:
    """What both distillation objectives share: a frozen teacher, block hooks on both models,
    and one forward of each per step giving the base (task) term and the feature KD term.

    The teacher runs under `torch.inference_mode()` (no autograd bookkeeping at all; `torch.no_grad()` when FSDP shards it); its
    outputs are cloned out of inference mode, so that the loss may save them for backward.
    With `dtype` (CUDA autocast: bf16/fp16) it runs on a copy cast once to that dtype, rather
    than autocast casting its fp32 weights again at every step; `teacher` itself is unchanged.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, family: ModelFamily, base: str, logit_weight: float, pooled_cosine: float = 0.0,
                 dtype: torch.dtype | None = None, token_noise: float = 0.0):
        teacher = freeze(teacher)
        if dtype is not None and any(p.dtype != dtype for p in teacher.parameters() if p.is_floating_point()):
            teacher = freeze(copy.deepcopy(teacher).to(dtype))
        self.teacher = teacher
        self.forward: Forward = family.forward
        self.base, self.logit_weight, self.pooled_cosine, self.token_noise = base, logit_weight, pooled_cosine, token_noise
        self.student_blocks = BlockOutputs(family.blocks(student))
        self.teacher_blocks = BlockOutputs(family.blocks(teacher))
        if self.student_blocks.names != self.teacher_blocks.names:
            raise ValueError("student and teacher blocks differ")

    def base_and_feature_terms(self, model: nn.Module, inputs: Inputs, labels: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.token_noise and isinstance(inputs, Mapping) and "input_ids" in inputs:
            inputs = noisy_tokens(inputs, self.token_noise)  # the same noisy copy for teacher and student
        # FSDP's gathered weights outlive a forward pass: made in inference mode, a later forward under no_grad (an
        # evaluation) could not refill them; a sharded teacher runs under no_grad instead
        with torch.no_grad() if is_sharded(self.teacher) else torch.inference_mode():
            teacher_logits = self.forward(self.teacher, inputs)
            teacher_feats = self.teacher_blocks.take()
        teacher_logits, teacher_feats = teacher_logits.clone(), [t.clone() for t in teacher_feats]  # normal tensors: autograd may save them
        logits = self.forward(model, inputs)
        student_feats = self.student_blocks.take()
        mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        base = base_loss(self.base, logits, labels, teacher_logits, inputs) * (self.logit_weight if self.base in ("logits", "kl") else 1.0)
        if self.pooled_cosine:
            base = base + self.pooled_cosine * pooled_cosine_loss(logits, teacher_logits, mask)
        return base, feature_distill_loss(student_feats, teacher_feats, mask)

    def paused(self) -> contextlib.ExitStack:
        """A context in which forward passes of student and teacher feed no loss (an evaluation during training)."""
        stack = contextlib.ExitStack()
        stack.enter_context(self.student_blocks.paused())
        stack.enter_context(self.teacher_blocks.paused())
        return stack

    def close(self) -> None:
        self.student_blocks.remove()
        self.teacher_blocks.remove()


class DistillationObjective(_AgainstTeacher):
    """`L = L_base + α·L_fd + β·L_rwp` against a frozen teacher, one student forward per step.

    `base` is `ce`, `logits` or `none` (`auto` is resolved by the caller from whether the
    data's labels match the model's classes).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, cfg: DistillConfig, base: str, family: ModelFamily, dtype: torch.dtype | None = None):
        super().__init__(student, teacher, family, base, cfg.logit_weight, cfg.pooled_cosine, dtype, cfg.token_noise)
        self.cfg = cfg
        self.pairs = factorized_pairs(student, teacher) if cfg.beta > 0 else []

    def __call__(self, model: nn.Module, inputs: Inputs, labels: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        base, fd = self.base_and_feature_terms(model, inputs, labels)
        terms = {"base": base, "fd": fd}
        if self.cfg.beta > 0:
            terms["rwp"] = weight_perturbation_loss(self.pairs, self.cfg.epsilon, self.cfg.rwp_form)
        loss = terms["base"] + self.cfg.alpha * terms["fd"] + self.cfg.beta * terms.get("rwp", 0.0)
        return loss, {k: v.detach() for k, v in terms.items()}


class ProgressiveObjective(_AgainstTeacher):
    """PC-LoRA: `L = α_task·L_task + (1 − α_task)·L_featKD` against a frozen teacher (docs/algorithms.md §3).

    The same terms as PELA's (`base_loss`, `feature_distill_loss` over every block), with a
    separate forward of the frozen teacher; the KD term stays in the graph, so it trains
    the adapters (a third-party implementation detached it through `torch.tensor(list)`).
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, task_weight: float, base: str, family: ModelFamily, logit_weight: float = 1.0,
                 pooled_cosine: float = 0.0, dtype: torch.dtype | None = None, token_noise: float = 0.0):
        super().__init__(student, teacher, family, base, logit_weight, pooled_cosine, dtype, token_noise)
        self.task_weight = task_weight

    def __call__(self, model: nn.Module, inputs: Inputs, labels: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        task, kd = self.base_and_feature_terms(model, inputs, labels)
        loss = self.task_weight * task + (1.0 - self.task_weight) * kd
        return loss, {"task": task.detach(), "kd": kd.detach()}


class SupervisedObjective:
    """Cross-entropy on labels (with label smoothing): how the demo trains its teacher."""

    def __init__(self, label_smoothing: float = 0.0, forward: Forward = call_model):
        self.label_smoothing = label_smoothing
        self.forward = forward

    def __call__(self, model: nn.Module, inputs: Inputs, labels: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, Any]]:
        loss = F.cross_entropy(self.forward(model, inputs).float(), labels, label_smoothing=self.label_smoothing)
        return loss, {"ce": loss.detach()}

    def close(self) -> None:
        pass
