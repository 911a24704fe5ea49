"""`lowrank evaluate`: accuracy of a dense or factorized checkpoint on a validation split, and,
against a teacher, how close its block features are to the teacher's."""

from __future__ import annotations

import os
from typing import Any

from lowrank_cli.device import resolve_device
from lowrank_cli.distill.evaluate import evaluate
from lowrank_cli.errors import LowrankError
from lowrank_cli.models.build import build_model
from lowrank_cli.pipelines.common import hint_of
from lowrank_cli.pipelines.compress import load_data, model_classes
from lowrank_cli.recipe import Recipe


def evaluate_checkpoint(
    checkpoint: str | os.PathLike,
    data: str,
    *,
    arch: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    teacher: str | os.PathLike | None = None,
    batch_size: int = 256,
    device: str = "auto",
    skip_unreadable: bool = False,
) -> dict[str, Any]:
    """Top-1/top-5 of `checkpoint` on the val split of `data` (and feature cosine to `teacher`); a JSON-able report."""
    dev = resolve_device(device)
    if batch_size < 1:
        raise LowrankError(f"batch_size must be at least 1 (got {batch_size})", param="batch_size")
    built = build_model(checkpoint, arch, model_kwargs, hint=hint_of(Recipe()))
    net, family = built.model, built.family
    task = family.task(net)
    recipe = Recipe(data={"source": data, "skip_unreadable": skip_unreadable})
    images = load_data(recipe, family, net, built.folder)
    classes = model_classes(net)
    if task in ("classification", "image-classification") and classes != images.num_classes:
        raise LowrankError(f"{checkpoint}: the model has {classes} outputs but the data '{data}' has {images.num_classes} classes", param="data")
    if task == "features" and teacher is None:
        raise LowrankError(f"{checkpoint}: a model of text features is judged by how close its embeddings are to its teacher's; "
                           "give the original (argument `teacher`)", param="teacher")
    teacher_net = None
    if teacher is not None:
        try:
            teacher_net = build_model(teacher, built.architecture, {**built.model_kwargs, **(model_kwargs or {})}, family=family.name).model
        except LowrankError as e:
            raise LowrankError(f"teacher {teacher} does not match '{built.architecture}': {str(e).split(': ', 1)[-1]}", param="teacher") from None
    result = evaluate(net, images.val, family, dev, batch_size=batch_size, teacher=teacher_net, task=task)
    return {"checkpoint": str(checkpoint), "data": images.source, "factorized": built.manifest is not None, "task": task, **result.to_dict(),
            "skipped_unreadable": len(images.skipped), **({"split": images.split} if hasattr(images, "split") else {})}
