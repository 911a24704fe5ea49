"""Streamed text (`data/stream.py`): packing, the hashed held-out split, exact resume by position, processes, bounded memory."""

import json
import weakref
from itertools import islice
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from hf_models import _byte_bpe, _wordpiece, hub_model
from transformers import AutoTokenizer

from lowrank_cli.data import stream as stream_mod
from lowrank_cli.data.stream import Shards, StreamState, TextStream, held_out
from lowrank_cli.data.text import StreamOptions, load_text_data, pydoc_documents, streams
from lowrank_cli.errors import LowrankError
from lowrank_cli.io.rundir import load_training_state
from lowrank_cli.pipelines.compress import compress_checkpoint
from lowrank_cli.distill.train import warmup_steps
from lowrank_cli.recipe import DistillConfig, Recipe, load_recipe

DOCS = pydoc_documents().texts


def _saved(make_tokenizer, root: Path):
    """The tokenizer as a checkpoint's folder gives it (`AutoTokenizer`, as `tokenizer_of` loads it), and that folder."""
    make_tokenizer(None).save_pretrained(str(root))
    return AutoTokenizer.from_pretrained(str(root), local_files_only=True)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    return _saved(_byte_bpe, tmp_path_factory.mktemp("bpe"))


@pytest.fixture(scope="module")
def wordpiece(tmp_path_factory):
    return _saved(_wordpiece, tmp_path_factory.mktemp("wordpiece"))


def shards(root: Path, n_files: int = 3, per_file: int = 40, jsonl: bool = True) -> Path:
    """`n_files` shards of `per_file` real documents each (jsonl: with a label), under `root/corpus`."""
    folder = root / "corpus"
    folder.mkdir()
    for f in range(n_files):
        docs = DOCS[f * per_file:(f + 1) * per_file]
        if jsonl:
            (folder / f"part-{f:02d}.jsonl").write_text("".join(json.dumps({"text": d, "label": i % 3}) + "\n" for i, d in enumerate(docs)))
        else:
            (folder / f"part-{f:02d}.txt").write_text("\n\n".join(docs) + "\n")
    return folder


def make(folder: Path, tokenizer, pack: bool, window: int = 1, length: int = 16, fraction: float = 0.2) -> TextStream:
    files = sorted(p for p in folder.iterdir() if p.suffix in (".txt", ".jsonl"))
    return TextStream(Shards(files, folder), tokenizer, length, pack, (0, fraction), seed=3, window=window)


def test_packed_sequences_are_the_training_documents_concatenated_with_eos(tmp_path, bpe):
    folder = shards(tmp_path, jsonl=False)
    s = make(folder, bpe, pack=True)
    train = [d for d in DOCS[:120] if not held_out(d, 0, 0.2)]
    assert 0 < len(train) < 120  # some are held out
    tokens = [t for d in train for t in bpe(d)["input_ids"] + [bpe.eos_token_id]]
    seqs = [x for (x, _), _ in s.sequences(0)]
    assert all(len(x) == 16 for x in seqs) and len(seqs) == len(tokens) // 16  # the epoch's last, partial sequence dropped
    assert torch.cat(seqs).tolist() == tokens[: 16 * len(seqs)]
    inputs, labels = s.collate([(x, -1) for x in seqs[:4]])
    assert inputs["attention_mask"].all() and labels.tolist() == [-1] * 4


def test_the_held_out_split_is_a_seeded_hash_of_each_document(tmp_path, bpe):
    folder = shards(tmp_path)
    opts = StreamOptions(streaming=True, val_documents=5)
    texts = [json.loads(line)["text"] for f in sorted(folder.iterdir()) for line in f.read_text().splitlines()]
    held = [t for t in texts if held_out(t, 0, 0.2)]
    assert 10 < len(held) < 40  # about a fifth
    assert held_out(texts[0], 0, 0.2) == held_out(texts[0], 0, 0.2) and [held_out(t, 1, 0.2) for t in texts] != [held_out(t, 0, 0.2) for t in texts]
    s = make(folder, bpe, pack=False)
    trained = [d.text for d in s.documents(0)]
    assert set(trained) == set(texts) - set(held) and len(trained) == len(texts) - len(held)
    assert s.shard_order(0) == [0, 1, 2]  # no shuffle window: sorted order
    with_tokenizer = Path(bpe.name_or_path)
    data = load_text_data(str(folder), with_tokenizer, 32, stream=opts)
    assert isinstance(data.train, TextStream) and len(data.val) == 5 and data.num_classes == 3
    assert [bpe.decode(data.val[i][0]["input_ids"]) for i in range(5)] == [bpe.decode(bpe(t, truncation=True, max_length=32)["input_ids"]) for t in held[:5]]
    assert "seeded hash (seed 0)" in data.split and "first 5 held-out documents" in data.split
    whole = load_text_data(str(folder), with_tokenizer, 32, all_held_out=True, stream=opts)  # evaluate: the first documents, no split
    assert len(whole.val) == 5 and "no split" in whole.split


@pytest.mark.parametrize("pack", [True, False])
def test_resume_from_any_batch_gives_the_batches_of_an_uninterrupted_run(tmp_path, bpe, pack):
    folder = shards(tmp_path)
    s = make(folder, bpe, pack=pack, window=7)
    for epoch in (0, 1):
        run = list(s.batches(epoch, None, 3))
        assert len(run) >= 8
        for k in (1, 2, 5, len(run) - 1):
            state = StreamState.from_dict(json.loads(json.dumps(run[k - 1][1].to_dict())))  # as saved in a checkpoint
            resumed = list(make(folder, bpe, pack=pack, window=7).batches(epoch, state, 3))
            assert len(resumed) == len(run) - k
            for (a, _), (b, _) in zip(resumed, run[k:]):
                assert torch.equal(a[0]["input_ids"], b[0]["input_ids"]) and torch.equal(a[1], b[1])
    first = lambda e: torch.cat([b[0]["input_ids"] for b, _ in s.batches(e, None, 3)])  # noqa: E731
    assert not torch.equal(first(0), first(1))  # each epoch its own order


def test_each_process_takes_every_world_th_sequence(tmp_path, bpe):
    folder = shards(tmp_path)
    s = make(folder, bpe, pack=True, window=5)
    one = [x for (x, _), _ in s.sequences(0)]
    ranks = [list(s.batches(0, None, 2, rank=r, world=3)) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1
    for b in range(len(ranks[0])):
        group = one[b * 6:(b + 1) * 6]
        for r in range(3):
            assert torch.equal(ranks[r][b][0][0]["input_ids"], torch.stack(group[r::3]))
            assert ranks[r][b][1] == ranks[0][b][1]  # every process at the same place in the stream


def test_a_changed_corpus_is_refused_on_resume(tmp_path, bpe):
    folder = shards(tmp_path)
    state = next(iter(make(folder, bpe, pack=True).batches(0, None, 2)))[1]
    with open(folder / "part-01.jsonl", "a") as f:
        f.write(json.dumps({"text": "one more document", "label": 0}) + "\n")
    with pytest.raises(LowrankError, match="the text data changed since this run's checkpoint"):
        next(iter(make(folder, bpe, pack=True).batches(0, state, 2)))


def test_streaming_holds_a_window_never_the_corpus(tmp_path, bpe, monkeypatch):
    """A corpus of 20 000 documents: the first batches read a few hundred lines and hold at most a chunk of documents."""
    folder = tmp_path / "big"
    folder.mkdir()
    with open(folder / "all.txt", "w") as f:
        for i in range(20_000):
            f.write(f"{DOCS[i % len(DOCS)]} ({i})\n")
    alive, peak = [0], [0]

    class Counted(stream_mod.Doc):
        def __init__(self, *args):
            super().__init__(*args)
            alive[0] += 1
            peak[0] = max(peak[0], alive[0])
            weakref.finalize(self, lambda: alive.__setitem__(0, alive[0] - 1))

    monkeypatch.setattr(stream_mod, "Doc", Counted)
    monkeypatch.setattr(Path, "read_bytes", lambda self: pytest.fail(f"{self} read whole"))
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: pytest.fail(f"{self} read whole"))
    s = make(folder, bpe, pack=True, window=32, length=32)
    batches = s.batches(0, None, 4)
    for _ in range(10):
        next(batches)
    assert 0 < s.shards.lines_read < 600  # 10 × 4 of 32 packed from the first few hundred documents, plus a window ahead
    assert 0 < peak[0] <= 2 * stream_mod.TOKENIZE_CHUNK  # documents held at once: a tokenizer chunk (and the one being read)
    texts, _ = stream_mod.first_documents(s.shards, 50, (0, 0.2), True)
    assert len(texts) == 50 and s.shards.lines_read < 600 + 400  # the held-out set: only as far as its 50th document


def test_encoder_documents_stay_one_per_example_truncated(tmp_path, wordpiece):
    folder = shards(tmp_path)
    s = make(folder, wordpiece, pack=False, length=12)
    items = [x for x in s.sequences(0)]
    docs = list(s.documents(0))
    assert len(items) == len(docs)
    assert [x.tolist() for (x, _), _ in items] == [wordpiece(d.text, truncation=True, max_length=12)["input_ids"] for d in docs]
    assert [label for (_, label), _ in items] == [d.label for d in docs]
    inputs, _ = s.collate([item for item, _ in items[:3]])
    assert inputs["input_ids"].shape[1] <= 12


def test_when_text_streams(tmp_path, monkeypatch):
    small = tmp_path / "docs.txt"
    small.write_text("a document\nanother one\n")
    assert not streams(str(small), "auto") and streams(str(small), True) and not streams(str(small), False)
    monkeypatch.setattr("lowrank_cli.data.text.STREAM_BYTES", 10)
    assert streams(str(small), "auto") and streams(str(tmp_path), "auto")  # a folder of more than the threshold too
    assert not streams("pydoc", "auto")
    with pytest.raises(LowrankError, match="'pydoc' is held in memory"):
        streams("pydoc", True)


def _stream_recipe(tmp_path: Path, corpus: Path, **distill) -> Recipe:
    settings = {"epochs": 1, "max_steps": 20, "batch_size": 4, "lr": 1e-3, "warmup_steps": 3, "log_every": 1, "checkpoint_every": 4,
                "amp": "none", **distill}
    path = tmp_path / "stream.yaml"
    path.write_text(f"name: gpt2-stream\nselect:\n  exclude: [lm_head]\nfactorize:\n  kappa: 2\n"
                    f"data: {json.dumps({'source': str(corpus), 'num_workers': 0, 'streaming': True, 'shuffle_window': 8, 'max_length': 16, 'val_documents': 6})}\n"
                    f"distill: {json.dumps(settings)}\n")
    return load_recipe(str(path))


@pytest.mark.slow
def test_a_causal_lm_on_streamed_text_resumes_exactly_across_epochs(tmp_path):
    hub = hub_model(tmp_path / "hub", "gpt2")
    corpus = shards(tmp_path, n_files=2, per_file=3, jsonl=False)
    recipe = _stream_recipe(tmp_path, corpus)
    epochs = []
    full = compress_checkpoint(hub / "model.safetensors", recipe, out=tmp_path / "full", device="cpu", step_hook=lambda pos: epochs.append(pos.epoch))
    assert full["train"]["steps"] == 20 and full["data"]["train"] is None and 1 <= full["data"]["val"] <= 6
    assert "streamed" in full["data"]["split"] and epochs[-1] == 2  # three passes over the stream: max_steps, not distill.epochs, ends a streamed run

    def interrupt(pos):
        if pos.step == 15:  # after the checkpoint at step 12: steps 13-15 are lost and redone
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compress_checkpoint(hub / "model.safetensors", recipe, out=tmp_path / "cut", device="cpu", step_hook=interrupt)
    state = load_training_state(tmp_path / "cut" / "checkpoint-000012.state.safetensors")
    assert state.position.epoch == 1 and state.position.stream["token"] > 0  # mid-pass, inside a document: where the stream stood, saved
    resumed = compress_checkpoint(hub / "model.safetensors", recipe, out=tmp_path / "cut", device="cpu", resume=True)
    assert resumed["rank_weight_sha256"] == full["rank_weight_sha256"]  # the same weights, bit for bit
    losses = lambda p: {r["step"]: r["loss"] for r in map(json.loads, (p / "metrics.jsonl").read_text().splitlines()) if "loss" in r}  # noqa: E731
    assert losses(tmp_path / "full") == losses(tmp_path / "cut")


def test_streamed_training_needs_max_steps(tmp_path):
    hub = hub_model(tmp_path / "hub", "gpt2")
    corpus = shards(tmp_path, n_files=1, per_file=12)
    recipe = _stream_recipe(tmp_path, corpus, max_steps=None)
    with pytest.raises(LowrankError, match="set distill.max_steps"):
        compress_checkpoint(hub / "model.safetensors", recipe, out=tmp_path / "run", device="cpu")
    assert not (tmp_path / "run").exists()
    with pytest.raises(LowrankError, match="the streamed training text holds fewer than one step of 1000 sequences"):
        compress_checkpoint(hub / "model.safetensors", _stream_recipe(tmp_path, corpus, batch_size=1000), out=tmp_path / "run", device="cpu")
    assert not (tmp_path / "run").exists()  # a new run that failed before its first checkpoint is removed


def test_warmup_in_steps_or_in_epochs():
    cfg = DistillConfig(warmup_epochs=2)
    assert warmup_steps(cfg, 10, 100) == 20 and warmup_steps(cfg, None, 100) == 0  # a stream's epochs have no known length
    steps = cfg.model_copy(update={"warmup_steps": 7})
    assert warmup_steps(steps, 10, 100) == 7 and warmup_steps(steps, None, 100) == 7 and warmup_steps(steps, None, 5) == 4


@pytest.mark.slow
def test_two_processes_on_a_stream_train_as_one_with_their_global_batch(tmp_path):
    """Each process takes every other packed sequence: two processes of batch 2 see what one of batch 4 sees, and end with its weights."""
    import os
    import subprocess
    import sys

    hub = hub_model(tmp_path / "hub", "gpt2")
    corpus = shards(tmp_path, n_files=2, per_file=3, jsonl=False)
    one = compress_checkpoint(hub / "model.safetensors", _stream_recipe(tmp_path, corpus, max_steps=6, clip_grad=None, dropout=False), out=tmp_path / "one", device="cpu")
    recipe = _stream_recipe(tmp_path, corpus, max_steps=6, clip_grad=None, dropout=False, batch_size=2)
    path = tmp_path / "two.yaml"
    path.write_text(json.dumps(recipe.to_dict()))
    proc = subprocess.run([sys.executable, "-m", "lowrank_cli", "compress", str(hub), "--recipe", str(path), "--out", str(tmp_path / "two"),
                           "--device", "cpu", "--nproc", "2", "--json"], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert two["world_size"] == 2 and two["train"]["steps"] == 6 and two["train"]["global_batch"] == one["train"]["global_batch"] == 4
    a, b = load_file(str(tmp_path / "one" / "student.safetensors")), load_file(str(tmp_path / "two" / "student.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_local_distillation_and_calibration_take_a_streams_first_examples(tmp_path, bpe, monkeypatch):
    from lowrank_cli.data.calibration import text_calibration_batches
    from lowrank_cli.distill.local import local_batches
    from lowrank_cli.recipe import LocalConfig

    folder = shards(tmp_path, jsonl=False)
    s = make(folder, bpe, pack=True, window=4)
    batches = local_batches(s, LocalConfig(examples=10, batch_size=4), seed=0)
    assert [b["input_ids"].shape for b in batches] == [(4, 16), (4, 16), (2, 16)]
    assert torch.equal(torch.cat([b["input_ids"] for b in batches]), torch.stack([x for (x, _), _ in islice(s.sequences(0), 10)]))
    monkeypatch.setattr("lowrank_cli.data.text.STREAM_BYTES", 100)  # the corpus is "large": calibration streams it
    lines_read = []
    real_read = Shards.read
    monkeypatch.setattr(Shards, "read", lambda self, *a: (lines_read.append(1), real_read(self, *a))[1])
    calib = text_calibration_batches(str(folder), Path(bpe.name_or_path), 24, n_samples=6, batch_size=4)
    first = [d for d in DOCS[:40] if not held_out(d, 0, 0.2)][:6]  # the first training documents, in order
    assert [bpe.decode(row[m.bool()]) for inputs, _ in calib for row, m in zip(inputs["input_ids"], inputs["attention_mask"])] == \
        [bpe.decode(bpe(d, truncation=True, max_length=24)["input_ids"]) for d in first]
    assert len(lines_read) == 1  # the first shard was enough


def test_an_encoder_compresses_on_streamed_documents(tmp_path):
    hub = hub_model(tmp_path / "hub", "bert")
    corpus = shards(tmp_path, n_files=2, per_file=10, jsonl=False)
    recipe = _stream_recipe(tmp_path, corpus, max_steps=3, checkpoint_every=0)
    recipe.select.exclude = ["pooler"]
    report = compress_checkpoint(hub / "model.safetensors", recipe, out=tmp_path / "run", device="cpu")
    assert report["task"] == "features" and report["train"]["steps"] == 3 and report["train"]["global_batch"] == 4
    assert report["accuracy"]["distilled"]["mean_cosine"] > 0 and report["data"]["val"] == len([d for d in DOCS[:20] if held_out(d, 0, 0.2)][:6])
