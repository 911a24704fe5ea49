"""`lowrank evaluate`: accuracy of a dense or factorized checkpoint on a validation split, and,
against a teacher, how close its block features are to the teacher's."""

from __future__ import annotations

import os
from typing import Any

from lowrank_cli.data.modality import load_data, needs_tokenizer, split_record
from lowrank_cli.data.text import has_tokenizer
from lowrank_cli.device import resolve_device
from lowrank_cli.distill.evaluate import evaluate
from lowrank_cli.errors import LowrankError
from lowrank_cli.models.build import build_model
from lowrank_cli.models.family import model_classes
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
    """`checkpoint`'s figures on the held-out data of `data`, by its task; a JSON-able report.

    Images: the val split of a folder. Text: the val part of a folder with train/val parts, else
    the whole file or folder (`pydoc`: its seeded held-out split); `split` says which. With a
    `teacher`: feature and logit cosine to it, and under `teacher` its own figures on the same
    examples (its top-1, perplexity, …); its folder's tokenizer serves a checkpoint that has none.
    """
    dev = resolve_device(device)
    if batch_size < 1:
        raise LowrankError(f"batch_size must be at least 1 (got {batch_size})", param="batch_size")
    built = build_model(checkpoint, arch, model_kwargs, hint=hint_of(Recipe()))
    net, family = built.model, built.family
    task = family.task(net)
    if task.needs_teacher and teacher is None:
        raise LowrankError(f"{checkpoint}: a model of text features is judged by how close its embeddings are to its teacher's; "
                           "give the original (argument `teacher`)", param="teacher")
    teacher_built = None
    if teacher is not None:
        try:
            teacher_built = build_model(teacher, built.architecture, {**built.model_kwargs, **(model_kwargs or {})}, family=family.name)
        except LowrankError as e:
            raise LowrankError(f"teacher {teacher} does not match '{built.architecture}': {str(e).split(': ', 1)[-1]}", param="teacher") from None
    # text: the checkpoint's own tokenizer, else its teacher's (a factorized file written away from its Hub folder has none)
    folder = built.folder
    if not has_tokenizer(folder) and teacher_built is not None and has_tokenizer(teacher_built.folder):
        folder = teacher_built.folder
    if folder is None and needs_tokenizer(family, net):
        raise LowrankError(f"{checkpoint}: text data needs a tokenizer, and this checkpoint has no folder with a tokenizer; give its Hub folder, "
                           "or its original from a Hub folder as the teacher (argument `teacher`), whose tokenizer is then used", param="teacher")
    recipe = Recipe(data={"source": data, "skip_unreadable": skip_unreadable})
    images = load_data(recipe, family, net, folder, all_held_out=True)
    classes = model_classes(net)
    if task.labels and classes != images.num_classes:
        raise LowrankError(f"{checkpoint}: the model has {classes} outputs but the data '{data}' has {images.num_classes} classes", param="data")
    teacher_net = teacher_built.model if teacher_built is not None else None
    result = evaluate(net, images.val, family, dev, batch_size=batch_size, teacher=teacher_net, task=task)
    report = {"checkpoint": str(checkpoint), "data": images.source, "factorized": built.manifest is not None, "task": task.name, **result.to_dict(),
              "skipped_unreadable": len(images.skipped), **split_record(images)}
    if teacher_net is not None:  # the teacher's own figures on the same examples (against itself: cosines of 1)
        reference = evaluate(teacher_net, images.val, family, dev, batch_size=batch_size, teacher=teacher_net, task=task)
        report["teacher"] = {"checkpoint": str(teacher), **reference.to_dict()}
    return report
