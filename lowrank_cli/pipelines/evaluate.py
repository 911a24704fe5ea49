"""`lowrank evaluate`: accuracy of a dense or factorized checkpoint on a validation split, and,
against a teacher, how close its block features are to the teacher's."""

from __future__ import annotations

import os
from typing import Any

from lowrank_cli.data.images import load_image_data
from lowrank_cli.device import resolve_device
from lowrank_cli.distill.evaluate import evaluate
from lowrank_cli.errors import LowrankError
from lowrank_cli.models.build import build_model
from lowrank_cli.pipelines.common import hint_of
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
    classes = getattr(net, "num_classes", None)
    images = load_image_data(data, family.data_config(net), classes or 10, skip_unreadable=skip_unreadable)
    if classes != images.num_classes:
        raise LowrankError(f"{checkpoint}: the model has {classes} outputs but the data '{data}' has {images.num_classes} classes", param="data")
    teacher_net = None
    if teacher is not None:
        try:
            teacher_net = build_model(teacher, built.architecture, {**built.model_kwargs, **(model_kwargs or {})}, family=family.name).model
        except LowrankError as e:
            raise LowrankError(f"teacher {teacher} does not match '{built.architecture}': {str(e).split(': ', 1)[-1]}", param="teacher") from None
    result = evaluate(net, images.val, family, dev, batch_size=batch_size, teacher=teacher_net)
    return {"checkpoint": str(checkpoint), "data": images.source, "factorized": built.manifest is not None, **result.to_dict(),
            "skipped_unreadable": len(images.skipped)}
