"""Text batches of documents of similar length: evaluation in length order gives the figures of plain batches; the local
stage's cached batches and the training order carry far less padding."""

import pytest
import torch
from hf_models import hub_model

from lowrank_cli.data.text import load_text_data
from lowrank_cli.distill.evaluate import evaluate
from lowrank_cli.distill.local import local_batches
from lowrank_cli.models import build_model
from lowrank_cli.recipe import LocalConfig


class _NoLengths(torch.utils.data.Dataset):
    """The same documents, without `lengths()`: batched in index order, each padded to its longest."""

    def __init__(self, base):
        self.base, self.collate = base, base.collate

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        return self.base[i]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    return {kind: hub_model(root, kind) for kind in ("bert", "gpt2")}


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
def test_evaluation_in_length_order_gives_the_figures_of_plain_batches(hub, kind):
    built = build_model(hub[kind])
    student = built.model
    teacher = build_model(hub[kind]).model
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.01 * torch.randn_like(p))
    config = student.config
    data = load_text_data("pydoc", built.folder, getattr(config, "n_positions", None) or config.max_position_embeddings)
    lengths = data.val.lengths()
    assert len(set(lengths)) > 5  # documents of many lengths: the order and the padding differ from the plain ones
    sorted_ = evaluate(student, data.val, built.family, teacher=teacher).to_dict()
    plain = evaluate(student, _NoLengths(data.val), built.family, teacher=teacher).to_dict()
    assert sorted_.keys() == plain.keys()
    for key, value in plain.items():
        if isinstance(value, float):
            assert sorted_[key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_local_batches_are_grouped_by_length(hub):
    built = build_model(hub["bert"])
    data = load_text_data("pydoc", built.folder, 128)
    cfg = LocalConfig(examples=256, batch_size=16)
    padded = lambda batches: sum(b["input_ids"].numel() for b in batches)  # noqa: E731
    real = lambda batches: sum(int(b["attention_mask"].sum()) for b in batches)  # noqa: E731
    grouped, plain = local_batches(data.train, cfg, seed=0), local_batches(data.train, cfg, seed=0, group_by_length=False)
    assert real(grouped) == real(plain)  # the same documents
    assert padded(grouped) < 0.8 * padded(plain)
