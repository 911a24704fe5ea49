"""Text for text models: a `.txt` file (one document per line), a `.jsonl` file (a `text` field, and a
`label` field where there is one), a folder of such files with `train`/`val` parts, or `pydoc`:
real English text that ships with Python itself (the help topics of `pydoc_data.topics`).

A source without train/val parts is split once, seeded, into training and held-out documents,
and the split is stated in `TextData.split`; a file or folder given for evaluation alone
(`all_held_out`) is held out whole (a folder with train/val parts still gives its val part). Documents are tokenized with the checkpoint's own
tokenizer (read from its folder, never downloaded), truncated to `max_length` tokens and padded
per batch.

A large source (or any, with `data.streaming: true`) is streamed instead: `data/stream.py`.
"""

from __future__ import annotations

import json
import pydoc_data.topics as pydoc_topics
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from lowrank_cli.data.stream import STREAM_BYTES, Shards, TextStream, first_documents, pad_batch, source_bytes
from lowrank_cli.errors import LowrankError

TEXT_SUFFIXES = (".txt", ".jsonl")
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "tokenizer.model", "sentencepiece.bpe.model")
BUILTIN = "pydoc"
VAL_NAMES = ("val", "validation", "valid", "test")


@dataclass
class Documents:
    """Texts and, for a labelled corpus, their labels (`None` otherwise)."""

    texts: list[str]
    labels: list[int] | None = None


@dataclass
class TextData:
    """A train and a held-out split of tokenized documents; `split` says how they were made. A streamed source's
    `train` is a `TextStream` (no length, read as it is trained on); its `val` is always in memory, bounded."""

    source: str
    train: Dataset | TextStream
    val: Dataset
    num_classes: int | None
    split: str
    skipped: list[str] = None  # the image folders' field, for the report: nothing is skipped in text

    def __post_init__(self):
        self.skipped = self.skipped or []


def pydoc_documents() -> Documents:
    """CPython's own help topics (`pydoc_data.topics`), as paragraphs of prose: code lines and short fragments left out."""
    docs = []
    for key in sorted(pydoc_topics.topics):
        for para in re.split(r"\n\s*\n", pydoc_topics.topics[key]):
            lines = [line.strip() for line in para.splitlines() if line.strip() and not line.startswith("   ")]
            text = " ".join(lines)
            if len(text.split()) >= 12 and not text.startswith(">>>"):
                docs.append(text)
    return Documents(docs)


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise LowrankError(f"{path}: cannot be read ({e.strerror or e})", param="data") from None
    if b"\x00" in raw[:4096]:
        raise LowrankError(f"{path}: is binary, not text (a .txt with one document per line, or .jsonl)", param="data")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise LowrankError(f"{path}: is not UTF-8 text (byte {e.start} is not)", param="data") from None


def read_documents(path: Path, text_field: str = "text", label_field: str = "label") -> Documents:
    """The documents of one `.txt` (a line each) or `.jsonl` file (an object per line with `text_field`)."""
    text = _read_text(path)
    if path.suffix == ".txt":
        docs = [line.strip() for line in text.splitlines() if line.strip()]
        if not docs:
            raise LowrankError(f"{path}: holds no text (one document per line)", param="data")
        return Documents(docs)
    texts, labels = [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LowrankError(f"{path}: line {n} is not JSON ({e.msg})", param="data") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            raise LowrankError(f"{path}: line {n} has no '{text_field}' string (each line: {{\"{text_field}\": ..., \"{label_field}\": ...}})", param="data")
        texts.append(record[text_field])
        labels.append(record.get(label_field))
    if not texts:
        raise LowrankError(f"{path}: holds no documents", param="data")
    has = [lab is not None for lab in labels]
    if any(has) and not all(has):
        raise LowrankError(f"{path}: line {has.index(False) + 1} has no '{label_field}' while others do", param="data")
    if any(has) and not all(isinstance(lab, int) and not isinstance(lab, bool) and lab >= 0 for lab in labels):
        raise LowrankError(f"{path}: '{label_field}' values must be non-negative integers (class indices)", param="data")
    return Documents(texts, labels if all(has) else None)


def _concat(parts: list[Documents], where: str) -> Documents:
    labelled = {p.labels is not None for p in parts}
    if len(labelled) > 1:
        raise LowrankError(f"{where}: some files have labels and some do not", param="data")
    return Documents([t for p in parts for t in p.texts], [lab for p in parts for lab in p.labels] if labelled == {True} else None)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)


def load_documents(source: str, seed: int = 0, val_fraction: float = 0.2, all_held_out: bool = False) -> tuple[Documents, Documents, str]:
    """(train, held-out, how they were split) from `pydoc`, a text file, or a folder (see the module docstring).

    `all_held_out`: a file, or a folder without train/val parts, is all held-out data (nothing to
    train on: what `evaluate` reads); `pydoc` keeps its seeded split, so that its figures are the
    ones a run on it reported.
    """
    split = _whole if all_held_out else _split
    if source == BUILTIN:
        return _split(pydoc_documents(), seed, val_fraction, "pydoc_data.topics (CPython's help topics)")
    path = Path(source)
    if not path.exists():
        raise LowrankError(f"text data '{source}': no such file or folder (give a .txt, a .jsonl, a folder of them, or '{BUILTIN}')", param="data")
    files, train, val = _parts(source, path)
    if path.is_file():
        return split(read_documents(path), seed, val_fraction, path.name)
    if train:
        return (_concat([read_documents(f) for f in train], source), _concat([read_documents(f) for f in val], source),
                f"its train ({len(train)} files) and {val[0].stem if val[0].stem in VAL_NAMES else val[0].parent.name} parts")
    return split(_concat([read_documents(f) for f in files], source), seed, val_fraction, f"{len(files)} files")


def _whole(docs: Documents, _seed: int, _val_fraction: float, what: str) -> tuple[Documents, Documents, str]:
    """Nothing to train on, every document held out."""
    return Documents([], [] if docs.labels is not None else None), docs, f"{what}: all {len(docs.texts)} documents (no split: given for evaluation)"


def _split(docs: Documents, seed: int, val_fraction: float, what: str) -> tuple[Documents, Documents, str]:
    n = len(docs.texts)
    if n < 2:
        raise LowrankError(f"text data {what}: {n} document; at least 2 are needed for a training and a held-out part", param="data")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(val_fraction * n))
    pick = lambda idx: Documents([docs.texts[i] for i in idx], None if docs.labels is None else [docs.labels[i] for i in idx])  # noqa: E731
    note = f"{what}: {n - n_val} documents to train on and {n_val} held out (a split seeded with {seed})"
    return pick(order[n_val:]), pick(order[:n_val]), note


class TokenizedTexts(Dataset):
    """Tokenized documents; items are `({"input_ids": …}, label)`, padded per batch by `collate`."""

    def __init__(self, ids: list[list[int]], labels: list[int] | None, pad_id: int):
        self.ids, self.labels, self.pad_id = ids, labels, pad_id

    def __len__(self) -> int:
        return len(self.ids)

    def lengths(self) -> list[int]:
        """Tokens per document (what a batch is padded by): the training order groups documents of similar length."""
        return [len(x) for x in self.ids]

    def __getitem__(self, i: int) -> tuple[dict[str, torch.Tensor], int]:
        return {"input_ids": torch.tensor(self.ids[i], dtype=torch.long)}, -1 if self.labels is None else self.labels[i]

    def collate(self, items: list[tuple[dict[str, torch.Tensor], int]]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Right-padded `input_ids` and their `attention_mask`, and the labels (-1 where there are none)."""
        return pad_batch([x["input_ids"] for x, _ in items], [label for _, label in items], self.pad_id)


def tokenizer_of(folder: Path | None) -> Any:
    """The checkpoint's own tokenizer, from its folder (local files only), or a LowrankError saying none is there."""
    from transformers import AutoTokenizer

    if folder is None:
        raise LowrankError("text data needs the checkpoint's tokenizer, and this checkpoint has no folder with one "
                           "(give the Hub folder, or the model.safetensors inside it)", param="data")
    if not has_tokenizer(folder):  # transformers would make an empty one
        raise LowrankError(f"{folder}: no tokenizer found beside the checkpoint (one of {', '.join(TOKENIZER_FILES)})", param="data")
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises OSError, ValueError, ... for a folder without a tokenizer
        raise LowrankError(f"{folder}: no tokenizer found beside the checkpoint (tokenizer.json or vocab files): "
                           f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}", param="data") from None


def tokenize(docs: Documents, tokenizer: Any, max_length: int) -> TokenizedTexts:
    if not docs.texts:
        return TokenizedTexts([], docs.labels, 0)
    encoded = tokenizer(docs.texts, truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return TokenizedTexts([list(ids) for ids in encoded], docs.labels, pad)


def has_tokenizer(folder: Path | None) -> bool:
    """Whether `folder` holds tokenizer files (a Hub folder's)."""
    return folder is not None and any((folder / name).is_file() for name in TOKENIZER_FILES)


@dataclass(frozen=True)
class StreamOptions:
    """How a text source is streamed (recipe keys `data.streaming`, `data.shuffle_window`, `data.val_documents`).

    `streaming`: "auto" streams a folder or file of more than `STREAM_BYTES` of text, True always
    (a file or folder), False never. `pack`: a causal LM's documents are packed into full-length sequences.
    """

    streaming: bool | str = "auto"
    pack: bool = False
    seed: int = 0  # the shuffle's (distill.seed)
    window: int = 1024
    val_documents: int = 1000


def streams(source: str, streaming: bool | str) -> bool:
    """Whether `source` is streamed (see `StreamOptions`); `pydoc` never is (it ships in memory)."""
    if streaming is False or source == BUILTIN or not Path(source).exists():
        if streaming is True and source == BUILTIN:
            raise LowrankError(f"data.streaming true: '{BUILTIN}' is held in memory, not streamed; give a .txt or .jsonl file or a folder of them, "
                               "or set data.streaming to auto", param="data")
        return False
    if streaming is True:
        return True
    path = Path(source)
    return source_bytes(_files(path) if path.is_dir() else [path]) > STREAM_BYTES


def load_text_data(source: str | None, folder: Path | None, max_length: int, seed: int = 0, val_fraction: float = 0.2,
                   all_held_out: bool = False, stream: StreamOptions | None = None) -> TextData:
    """Tokenized train and held-out text from `source` for the checkpoint in `folder` (see the module docstring and `load_documents`);
    streamed (`TextData.train` a `TextStream`) when `stream` says so."""
    if source is None:
        raise LowrankError(f"no data: give a .txt or .jsonl file, a folder of them, or '{BUILTIN}' (argument `data`, recipe key data.source)", param="data")
    if source in ("digits", "synthetic"):
        raise LowrankError(f"data '{source}' is images, and this is a text model; give a .txt or .jsonl file, a folder of them, or '{BUILTIN}'", param="data")
    if Path(source).is_dir() and any(p.suffix.lower() in (".png", ".jpg", ".jpeg") for p in Path(source).rglob("*")):
        raise LowrankError(f"data '{source}' is a folder of images, and this is a text model; give text (.txt, .jsonl) or '{BUILTIN}'", param="data")
    stream = stream or StreamOptions()
    if streams(source, stream.streaming):
        return stream_text_data(source, tokenizer_of(folder), max_length, seed, val_fraction, all_held_out, stream)
    train, val, split = load_documents(source, seed, val_fraction, all_held_out)
    tokenizer = tokenizer_of(folder)
    labels = (train.labels or []) + (val.labels or [])
    return TextData(source, tokenize(train, tokenizer, max_length), tokenize(val, tokenizer, max_length),
                    max(labels) + 1 if labels else None, split)


def _parts(source: str, path: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """A file or folder source's text files, and its train and val parts (both empty unless a folder has both)."""
    if path.is_file():
        if path.suffix not in TEXT_SUFFIXES:
            raise LowrankError(f"text data '{source}': expected a .txt or .jsonl file (or a folder of them, or '{BUILTIN}')", param="data")
        return [path], [], []
    files = _files(path)
    if not files:
        raise LowrankError(f"text data '{source}': the folder holds no .txt or .jsonl files", param="data")
    train = [f for f in files if f.stem == "train" or f.parent.name == "train"]
    val = [f for f in files if f.stem in VAL_NAMES or f.parent.name in VAL_NAMES]
    return (files, train, val) if train and val else (files, [], [])


def stream_shards(source: str) -> tuple[Shards, Shards | None]:
    """The shards of a streamed source: (all of them, None), or a folder's (train part, val part)."""
    path = Path(source)
    files, train, val = _parts(source, path)
    if train:
        return Shards(train, path), Shards(val, path)
    return Shards(files, path), None


def stream_text_data(source: str, tokenizer: Any, max_length: int, seed: int, val_fraction: float, all_held_out: bool,
                     opts: StreamOptions) -> TextData:
    """A streamed source (`data/stream.py`): the training part as a `TextStream`, the held-out part the first
    `opts.val_documents` held-out documents, in memory, tokenized as in-memory text is."""
    shards, val_shards = stream_shards(source)
    n = opts.val_documents
    if all_held_out and val_shards is None:  # evaluate: nothing to train on; the first documents are held out
        texts, labels = first_documents(shards, n, None, True)
        split = f"{source}: its first {len(texts)} documents (streamed; no split: given for evaluation)"
        train = None
    elif val_shards is not None:
        texts, labels = first_documents(val_shards, n, None, True)
        split = f"its train part ({len(shards.files)} files, streamed) and the first {len(texts)} documents of its val part"
        train = TextStream(shards, tokenizer, max_length, opts.pack, None, opts.seed, opts.window)
    else:
        holdout = (seed, val_fraction)
        texts, labels = first_documents(shards, n, holdout, True)
        if not texts:
            raise LowrankError(f"text data '{source}': no document is held out (a fraction {val_fraction} by a hash seeded with {seed}); "
                               "give more documents", param="data")
        split = (f"{len(shards.files)} files, streamed: a document is held out when its seeded hash (seed {seed}) falls below {val_fraction}; "
                 f"the first {len(texts)} held-out documents are evaluated")
        train = TextStream(shards, tokenizer, max_length, opts.pack, holdout, opts.seed, opts.window)
    val = tokenize(Documents(texts, labels), tokenizer, max_length)
    if train is None:
        train = TokenizedTexts([], None if labels is None else [], val.pad_id)
    return TextData(source, train, val, max(labels) + 1 if labels else None, split)
