"""The task type (`models/tasks.py`): the base loss `auto` stands for, the losses refused, and the registry."""

from __future__ import annotations

import pytest

from lowrank_cli.errors import LowrankError
from lowrank_cli.models.tasks import TASKS, get_task


@pytest.mark.parametrize("task, classes, data_classes, expected", [
    ("image-classification", 10, 10, ("ce", True)),
    ("image-classification", 1000, 10, ("logits", False)),
    ("classification", 2, 2, ("ce", True)),
    ("causal-lm", None, 0, ("kl", True)),
    ("features", None, 0, ("none", True)),
    ("masked-lm", None, 0, ("none", True)),
])
def test_auto_base_loss_follows_the_task_and_the_data(task, classes, data_classes, expected):
    assert get_task(task).base_loss("auto", classes, data_classes, "data") == expected


@pytest.mark.parametrize("task, kind, words", [
    ("image-classification", "ce", "has 10 classes but the model has 1000 outputs"),
    ("features", "ce", "needs a classifier; this model's task is features"),
    ("features", "kl", "'kl' is for causal language models; this model's task is features"),
    ("classification", "lm", None),  # a classifier's data decides: lm is not refused by the task (the objective refuses it)
])
def test_base_losses_that_do_not_fit_the_task_are_refused(task, kind, words):
    if words is None:
        assert get_task(task).base_loss(kind, 2, 2, "data") == (kind, True)
        return
    with pytest.raises(LowrankError, match="distill.base_loss") as e:
        get_task(task).base_loss(kind, 1000, 10, "data")
    assert words in str(e.value)


def test_given_bases_are_kept_and_labels_match_outside_classification():
    assert get_task("causal-lm").base_loss("logits", None, 0, "data") == ("logits", True)
    assert get_task("features").base_loss("none", None, 0, "data") == ("none", True)


def test_the_registry_names_each_task_once_and_refuses_an_unknown_one():
    assert all(name == task.name for name, task in TASKS.items())
    assert get_task(TASKS["features"]) is TASKS["features"]
    with pytest.raises(LowrankError, match="task 'translation' is not supported; accepted: image-classification"):
        get_task("translation")
    assert {t.metric for t in TASKS.values()} <= {"accuracy", "perplexity", "embedding"}  # what distill.evaluate computes


def test_every_task_a_family_names_is_registered():
    pytest.importorskip("transformers")
    from lowrank_cli.models.hf_family import CLASS_TASKS

    assert {task for _, task in CLASS_TASKS} <= set(TASKS)
