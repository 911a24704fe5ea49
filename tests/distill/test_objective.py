"""The distillation objectives' teacher: inference mode, cast once to the training dtype on CUDA (issue 18)."""

import copy
from typing import Mapping

import pytest
import torch
from conftest import tiny_vit

from lowrank_cli.distill.losses import base_loss, feature_distill_loss, pooled_cosine_loss
from lowrank_cli.distill.objective import DistillationObjective, ProgressiveObjective, teacher_dtype
from lowrank_cli.factorize import factorize_model
from lowrank_cli.models import get_family
from lowrank_cli.recipe import DistillConfig, load_recipe

FAMILY = get_family("timm")


def _no_grad_terms(self, model, inputs, labels):
    """What base_and_feature_terms did before: the teacher under no_grad, its outputs used as they are."""
    with torch.no_grad():
        teacher_logits = self.forward(self.teacher, inputs)
    teacher_feats = self.teacher_blocks.take()
    logits = self.forward(model, inputs)
    student_feats = self.student_blocks.take()
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    base = base_loss(self.base, logits, labels, teacher_logits, inputs) * (self.logit_weight if self.base in ("logits", "kl") else 1.0)
    if self.pooled_cosine:
        base = base + self.pooled_cosine * pooled_cosine_loss(logits, teacher_logits, mask)
    return base, feature_distill_loss(student_feats, teacher_feats, mask)


@pytest.fixture(scope="module")
def svd_student():
    student = tiny_vit(0)
    factorize_model(student, load_recipe("deit"), family=FAMILY, device="cpu")
    return student


def _loss_and_grads(make, svd_student, old: bool):
    teacher = tiny_vit(0)
    student = copy.deepcopy(svd_student).train()
    objective = make(student, teacher)
    if old:
        objective.base_and_feature_terms = _no_grad_terms.__get__(objective)
    x, y = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3])
    loss, terms = objective(student, x, y)
    loss.backward()
    objective.close()
    return loss.detach(), terms, {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("make", [
    lambda s, t: DistillationObjective(s, t, DistillConfig(amp="none", beta=1.0, pooled_cosine=0.5), "logits", FAMILY),
    lambda s, t: ProgressiveObjective(s, t, 0.5, "logits", FAMILY, pooled_cosine=0.5),
], ids=["pela", "pclora"])
def test_inference_mode_teacher_gives_the_same_loss_and_gradients(make, svd_student):
    new_loss, new_terms, new_grads = _loss_and_grads(make, svd_student, old=False)
    old_loss, old_terms, old_grads = _loss_and_grads(make, svd_student, old=True)
    assert torch.equal(new_loss, old_loss) and new_loss > 0
    assert new_terms.keys() == old_terms.keys() and all(torch.equal(new_terms[k], old_terms[k]) for k in new_terms)
    assert new_grads.keys() == old_grads.keys() and len(new_grads) > 8
    for k in new_grads:
        assert torch.equal(new_grads[k], old_grads[k]), k


def test_teacher_dtype_is_the_autocast_dtype_on_cuda_only():
    cuda = torch.device("cuda", 0)
    assert teacher_dtype(cuda, "bf16") == torch.bfloat16 and teacher_dtype(cuda, "fp16") == torch.float16
    assert teacher_dtype(cuda, "none") is None and teacher_dtype(torch.device("cpu"), "bf16") is None


def test_a_cast_teacher_is_a_copy_and_the_student_still_trains():
    """bf16 (on the CPU, under CPU autocast, standing in for CUDA's): the teacher runs cast, the caller's stays fp32."""
    teacher, student = tiny_vit(0), tiny_vit(1).train()
    objective = DistillationObjective(student, teacher, DistillConfig(), "logits", FAMILY, dtype=torch.bfloat16)
    assert {p.dtype for p in objective.teacher.parameters()} == {torch.bfloat16} and objective.teacher is not teacher
    assert {p.dtype for p in teacher.parameters()} == {torch.float32}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, terms = objective(student, torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(p.grad is None for p in teacher.parameters())
    objective.close()
