"""Data as users have it (`data/formats.py`, `data/text.py`): CSV/TSV, Parquet, Arrow and `datasets.save_to_disk` folders read
like `.jsonl`, in memory and streamed; `data.text_field`; chat `messages` rendered by the checkpoint's chat template; the
default sequence length; the one-line refusals."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import one_line_error
from hf_models import CHAT_TEMPLATE, _byte_bpe, _wordpiece, hub_model
from transformers import AutoTokenizer

from lowrank_cli.data.formats import Chat
from lowrank_cli.data.modality import MODALITIES, split_record
from lowrank_cli.data.stream import Shards, TextStream
from lowrank_cli.data.text import (DEFAULT_MAX_LENGTH, Reading, StreamOptions, default_length, load_documents, load_text_data,
                                   pydoc_documents, read_documents)
from lowrank_cli.errors import LowrankError
from lowrank_cli.models.build import build_model
from lowrank_cli.pipelines.common import prepare as prepare_mod
from lowrank_cli.recipe import Recipe

DOCS = pydoc_documents().texts[:60]
DOCS[3] = 'a document over two lines,\nwith "quotes", commas; and a tab\there'  # what a CSV must quote
ROWS = [{"text": d, "label": i % 3} for i, d in enumerate(DOCS)]
CHATS = [[{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": DOCS[i]}] for i in range(20)]
TABLES = (".csv", ".tsv", ".parquet", ".arrow", ".feather")


def write(path: Path, rows: list[dict]) -> Path:
    """`rows` as the file `path`'s suffix names: a CSV/TSV with a header, Parquet in row groups of 7 rows, Arrow in batches
    of 5 rows (`.arrow`: the stream format `datasets` writes; `.feather`: the file format)."""
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif path.suffix in (".csv", ".tsv"):
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t" if path.suffix == ".tsv" else ",")
            w.writeheader()
            w.writerows(rows)
    elif path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=7)
    else:
        table = pa.Table.from_pylist(rows)
        with pa.OSFile(str(path), "wb") as sink:
            with (pa.ipc.new_stream if path.suffix == ".arrow" else pa.ipc.new_file)(sink, table.schema) as w:
                for batch in table.to_batches(max_chunksize=5):
                    w.write_batch(batch)
    return path


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    """Tokenizer folders: a byte-level BPE without a chat template (`plain`), the same with one (`chat`), a WordPiece (`wordpiece`)."""
    root = tmp_path_factory.mktemp("tokenizers")
    bpe = _byte_bpe(None)
    bpe.save_pretrained(str(root / "plain"))
    bpe.chat_template = CHAT_TEMPLATE
    bpe.save_pretrained(str(root / "chat"))
    _wordpiece(None).save_pretrained(str(root / "wordpiece"))
    return {name: root / name for name in ("plain", "chat", "wordpiece")}


@pytest.mark.parametrize("suffix", [".jsonl", *TABLES, "saved"])
def test_every_format_gives_the_documents_and_labels_of_its_rows(tmp_path, suffix):
    if suffix == "saved":
        source = tmp_path / "saved"
        datasets.Dataset.from_list(ROWS).save_to_disk(str(source), num_shards=2)  # two Arrow files, read in order
    else:
        source = write(tmp_path / f"docs{suffix}", ROWS)
    _, whole, _ = load_documents(str(source), all_held_out=True)
    assert whole.texts == DOCS and whole.labels == [i % 3 for i in range(60)] and not whole.chat  # a CSV's '2' is class 2
    train, val, split = load_documents(str(source))
    ref_train, ref_val, _ = load_documents(str(write(tmp_path / "ref.jsonl", ROWS)))
    assert (train.texts, val.texts, train.labels) == (ref_train.texts, ref_val.texts, ref_train.labels)  # the same seeded split
    assert "48 documents to train on and 12 held out" in split


@pytest.mark.parametrize("suffix", TABLES)
def test_a_table_streams_from_any_rows_position(tmp_path, suffix):
    """A CSV row's byte offset (past quoted newlines), a Parquet or Arrow row number across row groups and batches: reading
    from a document's position gives that document and the rest, as a resume does."""
    path = write(tmp_path / f"docs{suffix}", ROWS)
    shards = Shards([path], tmp_path)
    docs = list(shards.read(0, 0, 0))
    assert [d.text for d in docs] == DOCS and shards.labelled
    for k in (1, 4, 7, 13, 59):
        assert list(shards.read(0, 0, docs[k].offset)) == docs[k:]
        assert docs[k].offset == docs[k - 1].end


def test_a_streamed_parquet_folder_resumes_exactly_and_keeps_its_parts(tmp_path, tok):
    """The Hub's shard names (`train-00000-of-00002.parquet`) are parts; the training stream resumes from any position."""
    data = tmp_path / "corpus" / "data"
    data.mkdir(parents=True)
    write(data / "train-00000-of-00002.parquet", [{"text": d} for d in DOCS[:30]])
    write(data / "train-00001-of-00002.parquet", [{"text": d} for d in DOCS[30:50]])
    write(data / "validation-00000-of-00001.parquet", [{"text": d} for d in DOCS[50:]])
    got = load_text_data(str(tmp_path / "corpus"), tok["plain"], 16, stream=StreamOptions(streaming=True, pack=True, window=4))
    assert isinstance(got.train, TextStream) and len(got.val) == 10 and "its val part" in got.split
    seqs = list(got.train.sequences(0))
    assert len(seqs) > 20 and all(len(x) == 16 for (x, _), _ in seqs)
    for k in (0, 7, 15):
        assert [x.tolist() for (x, _), _ in got.train.sequences(0, seqs[k][1])] == [x.tolist() for (x, _), _ in seqs[k + 1:]]
    _, held, split = load_documents(str(tmp_path / "corpus"), all_held_out=True)
    assert held.texts == DOCS[50:] and "validation parts" in split  # in memory alike


def test_a_saved_dataset_dict_gives_its_train_and_validation_splits(tmp_path, tok):
    folder = tmp_path / "dd"
    splits = {"train": datasets.Dataset.from_list(ROWS[:40]), "validation": datasets.Dataset.from_list(ROWS[40:])}
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    train, val, split = load_documents(str(folder))
    assert train.texts == DOCS[:40] and val.texts == DOCS[40:] and split == "its train (1 files) and validation parts"
    streamed = load_text_data(str(folder), tok["plain"], 32, stream=StreamOptions(streaming=True, val_documents=100))
    assert len(streamed.val) == 20 and isinstance(streamed.train, TextStream)


def test_text_field_names_the_field_or_column(tmp_path):
    rows = [{"title": f"t{i}", "body": d} for i, d in enumerate(DOCS)]
    for suffix in (".jsonl", ".csv", ".parquet", ".arrow"):
        path = write(tmp_path / f"docs{suffix}", rows)
        assert read_documents(path, text_field="body").texts == DOCS
        assert read_documents(path, text_field="title").texts[:2] == ["t0", "t1"]
    assert load_documents(str(tmp_path / "docs.parquet"), all_held_out=True, text_field="body")[1].texts == DOCS


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".parquet", ".arrow", ".feather"])
def test_a_table_without_the_text_field_is_refused_naming_its_columns(tmp_path, suffix):
    path = write(tmp_path / f"docs{suffix}", [{"id": i, "body": d} for i, d in enumerate(DOCS)])
    with pytest.raises(LowrankError) as e:
        read_documents(path)
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and "'text'" in msg and "its columns: id, body" in msg and "data.text_field" in msg
    with pytest.raises(LowrankError) as e:
        read_documents(path, text_field="content")
    assert str(e.value) == f"{path}: has no column 'content' (data.text_field); its columns: id, body"


def test_chat_messages_are_rendered_by_the_checkpoints_chat_template(tmp_path, tok):
    tokenizer = AutoTokenizer.from_pretrained(str(tok["chat"]))
    rendered = [tokenizer.apply_chat_template(m, tokenize=False) for m in CHATS]
    assert rendered[0] == f"<|user|>question 0\n<|assistant|>{DOCS[0]}\n"
    for suffix in (".jsonl", ".parquet"):  # a `messages` field (Parquet: a list of structs) is found without data.text_field
        path = write(tmp_path / f"chat{suffix}", [{"id": i, "messages": m} for i, m in enumerate(CHATS)])
        data = load_text_data(str(path), tok["chat"], 64, all_held_out=True)
        assert data.val.ids == [tokenizer(r, add_special_tokens=False, truncation=True, max_length=64)["input_ids"] for r in rendered]
        docs = read_documents(path, chat=Chat(lambda: tokenizer))
        assert docs.texts == rendered and docs.chat
    path = write(tmp_path / "convo.jsonl", [{"text": "x", "conversation": m} for m in CHATS])
    assert read_documents(path, text_field="conversation", chat=Chat(lambda: tokenizer)).texts == rendered
    # streamed and packed: each chat's tokens without the tokenizer's own special tokens, then EOS
    stream = load_text_data(str(tmp_path / "chat.jsonl"), tok["chat"], 8, stream=StreamOptions(streaming=True, pack=True, window=0))
    tokens = [t for (x, _), _ in stream.train.sequences(0) for t in x.tolist()]
    kept = [d.text for d in stream.train.documents(0)]
    expected = [t for r in kept for t in tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]]
    assert kept and set(kept) <= set(rendered) and tokens == expected[: len(tokens)] and len(tokens) == len(expected) // 8 * 8


def test_a_chat_dataset_for_a_tokenizer_without_a_chat_template_is_refused(tmp_path, tok):
    path = write(tmp_path / "chat.jsonl", [{"messages": m} for m in CHATS])
    for streaming in (False, True):
        with pytest.raises(LowrankError) as e:
            load_text_data(str(path), tok["plain"], 32, stream=StreamOptions(streaming=streaming))
        msg = str(e.value)
        assert "\n" not in msg and str(path) in msg and "no chat template" in msg and "data.text_field" in msg
    bad = write(tmp_path / "bad.jsonl", [{"messages": [{"content": "no role"}]}])
    with pytest.raises(LowrankError, match="a non-empty list of"):
        load_text_data(str(bad), tok["chat"], 32, all_held_out=True)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write(mixed / "a.jsonl", [{"messages": m} for m in CHATS])
    write(mixed / "b.jsonl", [{"text": d} for d in DOCS[:5]])
    with pytest.raises(LowrankError, match="some files hold chat messages and some plain text"):
        load_text_data(str(mixed), tok["chat"], 32)


def test_the_default_length_holds_most_documents_within_the_models_positions(tmp_path, tok):
    length, rule = default_length([10] * 95 + [1000] * 5, None)
    assert length == 16 and "95 of the 100 documents measured fit whole" in rule and "data.max_length not given" in rule
    assert default_length([300] * 10, None)[0] == 304 and default_length([600] * 10, None)[0] == DEFAULT_MAX_LENGTH
    assert default_length([600] * 10, 64)[0] == 64 and "the model's 64 positions" in default_length([600] * 10, 64)[1]
    assert default_length([3] * 10, None)[0] == 8
    # measured on the training documents (a folder's train part); the longer ones cut as the tokenizer truncates (WordPiece: [SEP] last)
    (tmp_path / "corpus").mkdir()
    write(tmp_path / "corpus" / "train.jsonl", [{"text": " ".join(["word"] * n)} for n in [5] * 40 + [40] * 18 + [200] * 2])
    write(tmp_path / "corpus" / "val.jsonl", [{"text": " ".join(["word"] * n)} for n in (5, 300)])
    data = load_text_data(str(tmp_path / "corpus"), tok["wordpiece"], None, reading=Reading(positions=128))
    tokenizer = AutoTokenizer.from_pretrained(str(tok["wordpiece"]))
    # 42 tokens hold 58 of the 60: 48, a multiple of 8
    assert sorted(set(data.train.lengths())) == [7, 42, 48] and data.val.lengths() == [7, 48]
    assert data.max_length == 48 and data.length_rule.startswith("48 tokens (data.max_length not given): 58 of the 60 documents measured")
    assert all(ids[-1] == tokenizer.sep_token_id for ids in data.train.ids + data.val.ids)
    assert split_record(data)["max_length"] == 48 and split_record(data)["max_length_rule"] == data.length_rule  # the report states it
    given = load_text_data(str(tmp_path / "corpus"), tok["wordpiece"], 20)
    assert given.max_length == 20 and given.length_rule == "20 tokens (data.max_length)" and max(given.val.lengths()) == 20


def test_a_models_text_takes_the_default_length_and_text_field_from_the_recipe(tmp_path):
    folder = hub_model(tmp_path, "bert")  # 64 positions
    built = build_model(folder)
    write(tmp_path / "docs.parquet", [{"body": d} for d in DOCS])
    recipe = Recipe(data={"source": str(tmp_path / "docs.parquet"), "text_field": "body"})
    data = MODALITIES["text"].load(recipe, built.family, built.model, None, folder, False)
    assert data.max_length == 64 and len(data.train) == 48 and "64 positions" in data.length_rule
    assert data.notice is None and split_record(data)["split"].startswith("docs.parquet")
    calib = MODALITIES["text"].calibration(str(tmp_path / "docs.parquet"), None, folder, 8, 4, None, Reading("body", 64))
    assert len(calib) == 2 and calib[0][0]["input_ids"].shape[1] <= 64


def test_a_text_recipe_on_the_builtin_text_says_so_before_using_it(tmp_path, monkeypatch):
    folder = hub_model(tmp_path, "gpt2")
    events = []
    real = prepare_mod.calibration_for
    monkeypatch.setattr(prepare_mod, "calibration_for", lambda *a, **k: events.append("calibration") or real(*a, **k))
    recipe = Recipe(name="t", select={"exclude": ["lm_head"]}, factorize={"kappa": 2, "method": "whitened", "calib_samples": 8},
                    data={"source": "pydoc", "num_workers": 0})
    p = prepare_mod.prepare_compress(folder, recipe, out=tmp_path / "run", device="cpu", note=events.append)
    assert events[0].startswith("data: 'pydoc', CPython's help topics (883 paragraphs") and "data.source" in events[0]
    assert events[1:] == ["calibration"] and not (tmp_path / "run").exists()
    assert split_record(p.data)["notice"] == events[0] and p.data.max_length == 64


def test_refusals_are_one_line_naming_what_is_accepted(tmp_path, tok, monkeypatch):
    (tmp_path / "docs.xlsx").write_bytes(b"PK\x03\x04")
    with pytest.raises(LowrankError) as e:
        load_text_data(str(tmp_path / "docs.xlsx"), tok["plain"], 32)
    assert str(e.value) == (f"text data '{tmp_path / 'docs.xlsx'}': '.xlsx' is not a format lowrank reads; give a .txt, .jsonl, .csv, "
                            ".tsv, .parquet or .arrow file, a folder of them, a folder saved by datasets' save_to_disk, or 'pydoc'")
    (tmp_path / "ragged.csv").write_text("text,label\nfine,1\nbroken,2,extra\n")
    with pytest.raises(LowrankError, match=r"ragged.csv: the row at byte 18 has 3 fields and the header 2"):
        read_documents(tmp_path / "ragged.csv")
    (tmp_path / "words.csv").write_text("text,label\nfine,positive\n")
    with pytest.raises(LowrankError, match=r"'label' values must be non-negative integers \(class indices; the row at byte 11\)"):
        read_documents(tmp_path / "words.csv")
    (tmp_path / "fake.parquet").write_text("not parquet")
    with pytest.raises(LowrankError, match=r"fake.parquet: cannot be read as parquet"):
        read_documents(tmp_path / "fake.parquet")
    write(tmp_path / "nums.parquet", [{"text": i} for i in range(3)])
    with pytest.raises(LowrankError, match=r"nums.parquet: row 0: 'text' holds int, not text or chat messages"):
        read_documents(tmp_path / "nums.parquet")
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "saved"))
    write(tmp_path / "docs.parquet", ROWS)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(LowrankError) as e:
        load_documents(str(tmp_path / "saved"))
    assert str(e.value) == (f"{tmp_path / 'saved'}: is a folder saved by datasets' save_to_disk; reading it needs the datasets library, "
                            "which is not installed (pip install 'lowrank[data]')")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(LowrankError, match=r"docs.parquet: reading .parquet files needs pyarrow, which is not installed "
                                           r"\(pip install 'lowrank\[data\]'\)"):
        load_documents(str(tmp_path / "docs.parquet"))


def test_compress_refuses_a_parquet_file_without_the_text_field_and_writes_nothing(cli, tmp_path):
    folder = hub_model(tmp_path, "gpt2")
    write(tmp_path / "docs.parquet", [{"body": d} for d in DOCS])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: r\nselect:\n  exclude: [lm_head]\nfactorize:\n  kappa: 2\ndata:\n  source: pydoc\n  num_workers: 0\n"
                      "distill: {epochs: 1, batch_size: 8}\n")
    out = tmp_path / "run"
    r = cli("compress", folder, "--recipe", recipe, "--data", tmp_path / "docs.parquet", "--out", out, "--device", "cpu")
    one_line_error(r, "docs.parquet: has no column 'text' (nor chat 'messages'); its columns: body", "data.text_field")
    assert not out.exists()
    recipe.write_text(recipe.read_text().replace("  num_workers: 0\n", "  num_workers: 0\n  text_field: content\n"))
    r = cli("compress", folder, "--recipe", recipe, "--data", tmp_path / "docs.parquet", "--out", out, "--device", "cpu")
    one_line_error(r, "docs.parquet: has no column 'content' (data.text_field); its columns: body")
    assert not out.exists()
