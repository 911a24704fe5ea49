"""Text that streams: `.txt`/`.jsonl` shards, and tables (`.csv`/`.tsv`, `.parquet`, `.arrow`, a `datasets` folder's Arrow
files: `data/formats.py`), one file or a folder of them, read lazily, never whole.

A corpus too big for memory is read a line (a table: a row) at a time, tokenized a few documents at a time and
turned into training sequences as it is read (docs/algorithms.md §10):

- **Order.** Shards in sorted path order; with a shuffle window (`data.shuffle_window` ≥ 2) each
  epoch permutes the shard order (seeded with the seed and the epoch) and permutes the sequences
  inside consecutive windows of that many sequences (seeded with the seed, the epoch and the
  window's number). Nothing but the window is held.
- **Sequences.** A causal LM's documents are concatenated, an EOS after each (unless the
  tokenizer already ended it with one), and cut into sequences of exactly `max_length` tokens
  (the epoch's last, shorter one is dropped). Any other task keeps a document per example,
  truncated to `max_length` and padded per batch, as in-memory text is.
- **Held-out split.** A document is held out when a seeded hash of its text falls below the
  held-out fraction: decided document by document, without reading the rest, the same in
  every epoch and on every process; a duplicated document is always on one side. The training
  stream skips held-out documents; the evaluation set is the first `val_documents` held-out
  documents in sorted shard order. A folder with train/val parts streams its train part and
  evaluates on the first documents of its val part.
- **Position.** Where the stream stands is a `StreamState`: the window's number, where the
  window began (shard, byte offset of a document (a Parquet or Arrow shard: its row number), token offset inside it) and how many of its
  sequences were taken. Resuming seeks there, reads that one window again and skips what was
  taken, so a resumed run's batches equal an uninterrupted run's.
- **Processes.** Batches are taken from groups of `batch_size × world` consecutive sequences,
  rank r taking every world-th from r: every process is at the same place in the stream.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from lowrank_cli.data.formats import (BINARY_SUFFIXES, CHAT_FIELD, TABLE_SUFFIXES, TEXT_FIELD, Chat, columns_of, document_text, read_rows,
                                      table_label, text_column)
from lowrank_cli.errors import LowrankError

STREAM_BYTES = 256 * 2**20  # `data.streaming: auto` streams a source whose text files add up to more than this
TOKENIZE_CHUNK = 64  # documents tokenized together (the fast tokenizers batch in Rust)

Item = tuple[torch.Tensor, int]  # token ids and a label (-1: none)


@dataclass(frozen=True)
class Doc:
    """A document read from a shard: its text and label, where its line begins and ends (bytes), and its shard's place in the epoch's order."""

    text: str
    label: int | None
    shard: int
    offset: int
    end: int


@dataclass(frozen=True)
class StreamState:
    """Where a training stream stands in an epoch (see the module docstring): JSON-safe, saved with each checkpoint."""

    window: int = 0
    shard: int = 0
    offset: int = 0
    token: int = 0
    taken: int = 0
    corpus: str = ""  # the shards' names and sizes, hashed: a resume refuses a corpus that changed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> "StreamState":
        return cls(**d) if d else cls()


def held_out(text: str, seed: int, fraction: float) -> bool:
    """Whether a document is held out: the first 8 bytes of BLAKE2b(`seed`, NUL, its UTF-8 text), read as a
    fraction of 2⁶⁴, fall below `fraction`."""
    digest = hashlib.blake2b(f"{seed}\0{text}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


def _seed_of(*parts: int) -> int:
    """A 63-bit generator seed from integers (seed, epoch, window), well mixed."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def source_bytes(files: list[Path]) -> int:
    return sum(f.stat().st_size for f in files)


class Shards:
    """Source files read a document at a time from a position: `.txt` (a document per non-empty line) or `.jsonl` (an
    object per line with `text_field`, and `label_field` where there is one), from a byte offset, with the checks
    `read_documents` makes; a table (`data/formats.py`: CSV from a byte offset, Parquet and Arrow from a row number), its
    `text_field` column (None: `text`, else chat `messages`) and its `label_field` column where it has one.

    Chat messages are rendered by `chat` (the checkpoint's chat template); a source is all text or all chat (`chat_docs`,
    decided by the first document read, as `labelled` is)."""

    def __init__(self, files: list[Path], root: Path, text_field: str | None = None, label_field: str = "label", chat: Chat | None = None):
        self.files, self.root, self.text_field, self.label_field, self.chat = files, root, text_field, label_field, chat
        self.labelled: bool | None = None  # decided by the first document read
        self.chat_docs: bool | None = None  # likewise: chat messages rendered (tokenized without the tokenizer's special tokens)
        self.lines_read = 0  # for tests and benchmarks: how much was read
        self._columns: dict[Path, list[str]] = {}  # a table's columns to read: its text column, then its label column if any
        for f in files:
            if f.suffix not in BINARY_SUFFIXES:
                _check_text_file(f)

    def fingerprint(self) -> str:
        """The shards' relative names and sizes, hashed: what a resume checks is unchanged."""
        names = [(str(f.relative_to(self.root)) if f != self.root else f.name, f.stat().st_size) for f in self.files]
        return hashlib.blake2b(json.dumps(names).encode(), digest_size=8).hexdigest()

    def read(self, file_index: int, shard: int, offset: int) -> Iterator[Doc]:
        """The documents of file `file_index` from `offset` (a line's or a CSV row's byte offset, a Parquet or Arrow row number),
        tagged with `shard` (its place in the epoch's order)."""
        path = self.files[file_index]
        if path.suffix in TABLE_SUFFIXES:
            yield from self._read_table(path, shard, offset)
            return
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                for raw in f:
                    start, offset = offset, offset + len(raw)
                    self.lines_read += 1
                    doc = self._parse(path, raw, start)
                    if doc is not None:
                        yield Doc(doc[0], doc[1], shard, start, offset)
        except OSError as e:
            raise LowrankError(f"{path}: cannot be read ({e.strerror or e})", param="data") from None

    def _read_table(self, path: Path, shard: int, start: int) -> Iterator[Doc]:
        if path not in self._columns:
            columns = columns_of(path)
            field = text_column(columns, self.text_field, path)
            self._columns[path] = [field] + ([self.label_field] if self.label_field in columns and self.label_field != field else [])
        field, *label = self._columns[path]
        for record, at, end in read_rows(path, start, self._columns[path]):
            self.lines_read += 1
            where = f"the row at byte {at}" if path.suffix in (".csv", ".tsv") else f"row {at}"
            got = document_text(record[field], self.chat, f"{path}: {where}")
            if got is None:
                raise LowrankError(f"{path}: {where}: '{field}' holds {type(record[field]).__name__}, not text or chat messages",
                                   param="data")
            text, lab = self._checked(path, got, table_label(record[label[0]], path) if label else None, where)
            yield Doc(text, lab, shard, at, end)

    def _parse(self, path: Path, raw: bytes, at: int) -> tuple[str, int | None] | None:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise LowrankError(f"{path}: is not UTF-8 text (byte {at + e.start} is not)", param="data") from None
        if not line.strip():
            return None
        if path.suffix == ".txt":
            return line.strip(), None
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LowrankError(f"{path}: the line at byte {at} is not JSON ({e.msg})", param="data") from None
        chat = isinstance(record, dict) and TEXT_FIELD not in record and CHAT_FIELD in record
        field = self.text_field or (CHAT_FIELD if chat else TEXT_FIELD)
        got = document_text(record.get(field), self.chat, f"{path}: the line at byte {at}") if isinstance(record, dict) else None
        if got is None:
            raise LowrankError(f"{path}: the line at byte {at} has no '{field}' string "
                               f"(each line: {{\"{field}\": ..., \"{self.label_field}\": ...}})", param="data")
        return self._checked(path, got, record.get(self.label_field), f"the line at byte {at}")

    def _checked(self, path: Path, got: tuple[str, bool], label: Any, where: str) -> tuple[str, int | None]:
        """A document's text and label, checked against the documents read before: all text or all chat, all labelled or none."""
        text, chat = got
        if self.chat_docs is None:
            self.chat_docs = chat
        if chat != self.chat_docs:
            raise LowrankError(f"{path}: {where} holds {'chat messages' if chat else 'text'} while others hold "
                               f"{'text' if chat else 'chat messages'}; a source is all text or all chat", param="data")
        if self.labelled is None:
            self.labelled = label is not None
        if (label is not None) != self.labelled:
            raise LowrankError(f"{path}: {where} {'has no' if self.labelled else 'has a'} '{self.label_field}' while others "
                               f"{'do' if self.labelled else 'do not'}", param="data")
        if label is not None and not (isinstance(label, int) and not isinstance(label, bool) and label >= 0):
            raise LowrankError(f"{path}: '{self.label_field}' values must be non-negative integers (class indices; {where})", param="data")
        return text, label


def _check_text_file(path: Path) -> None:
    """A binary file is refused before anything is streamed (its first 4 KiB hold a NUL byte)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096)
    except OSError as e:
        raise LowrankError(f"{path}: cannot be read ({e.strerror or e})", param="data") from None
    if b"\x00" in head:
        raise LowrankError(f"{path}: is binary, not text (a .txt with one document per line, or .jsonl)", param="data")


def _chunks(items: Iterable, n: int) -> Iterator[list]:
    it = iter(items)
    while chunk := list(islice(it, n)):
        yield chunk


class TextStream:
    """The training part of a streamed corpus as batches, resumable from a `StreamState` (see the module docstring).

    `pack`: cut the concatenated documents into `max_length`-token sequences (a causal LM);
    else a document per example, truncated. `holdout`: (seed, fraction) of the hash split,
    or None when every document of these shards is for training (a folder's train part).
    """

    def __init__(self, shards: Shards, tokenizer: Any, max_length: int, pack: bool, holdout: tuple[int, float] | None,
                 seed: int = 0, window: int = 1024):
        self.shards, self.tokenizer, self.max_length, self.pack = shards, tokenizer, max_length, pack
        self.holdout, self.seed, self.window = holdout, seed, max(1, window)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
        if pack and self.eos_id is None:
            raise LowrankError("text data: the tokenizer has no end-of-text token to put between packed documents", param="data")
        self.corpus = shards.fingerprint()

    # -- the order -----------------------------------------------------------------------------
    def shard_order(self, epoch: int) -> list[int]:
        """The files' order in `epoch`: sorted, or a seeded permutation of it when the stream is shuffled."""
        n = len(self.shards.files)
        if self.window < 2:
            return list(range(n))
        return torch.randperm(n, generator=torch.Generator().manual_seed(_seed_of(self.seed, epoch, -1))).tolist()

    def documents(self, epoch: int, shard: int = 0, offset: int = 0) -> Iterator[Doc]:
        """The training documents of `epoch` from (`shard` in its order, byte `offset`), held-out ones skipped."""
        order = self.shard_order(epoch)
        for i in range(shard, len(order)):
            for doc in self.shards.read(order[i], i, offset if i == shard else 0):
                if self.holdout is None or not held_out(doc.text, *self.holdout):
                    yield doc

    def _encode(self, texts: list[str]) -> list[list[int]]:
        special = not self.shards.chat_docs  # a rendered chat holds the special tokens its template writes
        if self.pack:
            ids = self.tokenizer(texts, add_special_tokens=special, verbose=False)["input_ids"]
            return [list(x) + ([] if x and x[-1] == self.eos_id else [self.eos_id]) for x in ids]
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length, add_special_tokens=special)["input_ids"]
        return [list(x) for x in ids]

    def items(self, epoch: int, start: StreamState) -> Iterator[tuple[Item, tuple[int, int, int]]]:
        """Examples in stream order from `start`, each with the position just after it: (shard, byte offset, token)."""
        skip, buffer = start.token, []  # a packed sequence being filled; it is empty at every position yielded
        for chunk in _chunks(self.documents(epoch, start.shard, start.offset), TOKENIZE_CHUNK):
            for doc, ids in zip(chunk, self._encode([d.text for d in chunk])):
                if not self.pack:
                    yield (torch.tensor(ids, dtype=torch.long), -1 if doc.label is None else doc.label), (doc.shard, doc.end, 0)
                    continue
                t, skip = skip, 0
                while t < len(ids):
                    take = min(self.max_length - len(buffer), len(ids) - t)
                    buffer.extend(ids[t:t + take])
                    t += take
                    if len(buffer) == self.max_length:
                        seq, buffer = torch.tensor(buffer, dtype=torch.long), []
                        yield (seq, -1), ((doc.shard, doc.end, 0) if t == len(ids) else (doc.shard, doc.offset, t))

    def sequences(self, epoch: int, state: StreamState | None = None) -> Iterator[tuple[Item, StreamState]]:
        """The examples of `epoch` from `state` in training order (permuted within windows), each with the state after it."""
        state = state or StreamState(corpus=self.corpus)
        if state.corpus and state.corpus != self.corpus:
            raise LowrankError("the text data changed since this run's checkpoint (its shards' names or sizes differ); "
                               "resume on the same data, or start a new run", param="data")
        items = self.items(epoch, state)
        window, start, taken = state.window, (state.shard, state.offset, state.token), state.taken
        while block := list(islice(items, self.window)):
            order = self._window_order(epoch, window, len(block))
            end = block[-1][1]
            for k in range(taken, len(block)):
                after = StreamState(window, *start, k + 1, self.corpus) if k + 1 < len(block) else StreamState(window + 1, *end, 0, self.corpus)
                yield block[order[k]][0], after
            window, start, taken = window + 1, end, 0

    def _window_order(self, epoch: int, window: int, n: int) -> list[int]:
        if self.window < 2:
            return list(range(n))
        return torch.randperm(n, generator=torch.Generator().manual_seed(_seed_of(self.seed, epoch, window))).tolist()

    def batches(self, epoch: int, state: StreamState | None, batch_size: int, rank: int = 0, world: int = 1
                ) -> Iterator[tuple[tuple[dict[str, torch.Tensor], torch.Tensor], StreamState]]:
        """This process's batches of `epoch` from `state`: of each `batch_size × world` consecutive sequences, every
        `world`-th from `rank`; each with the stream's state after it (the same on every process). A last partial group is dropped."""
        group: list[Item] = []
        for item, after in self.sequences(epoch, state):
            group.append(item)
            if len(group) == batch_size * world:
                yield self.collate(group[rank::world]), after
                group = []

    def head(self, n: int) -> list[Item]:
        """The first `n` examples of epoch 0 in training order (local distillation's cached examples)."""
        return [item for item, _ in islice(self.sequences(0), n)]

    def collate(self, items: list[Item]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Right-padded `input_ids` (packed sequences need none) with their `attention_mask`, and the labels (-1: none)."""
        return pad_batch([ids for ids, _ in items], [label for _, label in items], self.pad_id)


def pad_batch(ids: list[torch.Tensor], labels: list[int], pad_id: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Token id rows right-padded with `pad_id` to the longest, their `attention_mask` (1: a real token), and the labels."""
    length = max(len(x) for x in ids)
    batch = torch.full((len(ids), length), pad_id, dtype=torch.long)
    mask = torch.zeros(len(ids), length, dtype=torch.long)
    for row, x in enumerate(ids):
        batch[row, : len(x)] = x
        mask[row, : len(x)] = 1
    return {"input_ids": batch, "attention_mask": mask}, torch.tensor(labels, dtype=torch.long)


def first_documents(shards: Shards, n: int, holdout: tuple[int, float] | None, want_held_out: bool) -> tuple[list[str], list[int] | None]:
    """The first `n` documents in sorted shard order that are held out (`want_held_out`) or for training; fewer
    if the corpus has fewer. The only part of a streamed corpus held in memory whole: the evaluation set, calibration."""
    texts, labels = [], []
    for i in range(len(shards.files)):
        for doc in shards.read(i, i, 0):
            if holdout is None or held_out(doc.text, *holdout) == want_held_out:
                texts.append(doc.text)
                labels.append(doc.label)
                if len(texts) == n:
                    return texts, (labels if shards.labelled else None)
    return texts, (labels if shards.labelled else None)
