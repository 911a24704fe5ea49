"""What a model's output is for, behind one type: its task.

A family says which task a model has (`ModelFamily.task(model)`); everything that depends on
the task asks the `Task` instead of comparing its name: how distillation's base loss `auto` is
resolved and which base losses fit, whether the data's labels are the model's classes, how a
held-out evaluation is computed (`metric`, read by `distill.evaluate`) and which figure judges
it (`primary`), whether judging it needs the teacher, and whether its output is a distribution
over classes (the sensitivity loss of `factorize.sensitivity`).

How the data are loaded depends on the model's inputs, not on its task (a ViT without a head
has the `features` task and takes images): that is the family's `data_config`, dispatched by
`data.modality`.

The registry `TASKS` names every task; `.name` is what reports and manifests record, so that
their formats do not change. Adding a task: a `Task` here and the family that returns it.
The module itself imports no model library (the CLI reads it to render a report), though its
package, `models/`, imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from lowrank_cli.errors import LowrankError

BASE_LOSSES = ("auto", "ce", "logits", "kl", "lm", "none")  # distill.base_loss


@dataclass(frozen=True)
class Task:
    """One task (see the module docstring)."""

    name: str  # as reports and manifests record it: `image-classification`, `causal-lm`, ...
    metric: str  # how `distill.evaluate` judges it: `accuracy` (top-1/top-5), `perplexity`, `embedding` (cosine to the teacher)
    primary_label: str  # the primary figure, in words (what a report's recovered fraction is of)
    labels: bool = False  # its examples carry labels that are the model's classes (a classifier)
    language_model: bool = False  # next-token prediction: base losses `lm` and `kl` apply, and `auto` is `kl`
    distribution: bool = False  # its output is a distribution over classes, per example or per token
    needs_teacher: bool = False  # evaluated only against a teacher (text features: how close the embeddings are)

    def base_loss(self, kind: str, classes: int | None, data_classes: int | None, source: str) -> tuple[str, bool]:
        """The base loss `kind` (`distill.base_loss`) stands for with this task, and whether the data's labels are the
        model's classes (`classes` outputs, `data_classes` in the data `source`); a LowrankError for one that does not fit."""
        if self.labels:
            match = classes == data_classes
            if kind == "auto":
                kind = "ce" if match else "logits"
            if kind == "ce" and not match:
                raise LowrankError(
                    f"distill.base_loss 'ce': the data '{source}' has {data_classes} classes but the model has {classes} outputs; "
                    "use base_loss: logits (match the teacher's logits) or none"
                )
            return kind, match
        if kind == "ce":
            raise LowrankError(f"distill.base_loss 'ce' needs a classifier; this model's task is {self.name} (use auto, kl, lm, logits or none)")
        if kind in ("lm", "kl") and not self.language_model:
            raise LowrankError(f"distill.base_loss '{kind}' is for causal language models; this model's task is {self.name} (use auto, logits or none)")
        if kind == "auto":
            kind = "kl" if self.language_model else "none"
        return kind, True


# The tasks, by name: what a family's `task(model)` returns.
TASKS = {t.name: t for t in (
    Task("image-classification", "accuracy", "top-1 accuracy", labels=True, distribution=True),
    Task("classification", "accuracy", "top-1 accuracy", labels=True, distribution=True),
    Task("features", "embedding", "embedding cosine", needs_teacher=True),
    Task("causal-lm", "perplexity", "log-perplexity", language_model=True, distribution=True),
    Task("masked-lm", "embedding", "score", distribution=True),
)}


def get_task(task: Task | str) -> Task:
    """The task called `task` (a `Task` is returned as it is), or a LowrankError listing those there are."""
    if isinstance(task, Task):
        return task
    found = TASKS.get(task)
    if found is None:
        raise LowrankError(f"task '{task}' is not supported; accepted: {', '.join(TASKS)}", param="task")
    return found
