"""Text for text models: a `.txt` file (one document per line), a `.jsonl` file (a `text` field, and a
`label` field where there is one), a table (`.csv`, `.tsv`, `.parquet`, `.arrow`/`.feather`: a `text` column, and a
`label` column where there is one; `data/formats.py`), a folder of such files with `train`/`val` parts, a folder saved by
`datasets.save_to_disk` (its `train` and validation splits are the parts), or `pydoc`: real English text that ships with
Python itself (the help topics of `pydoc_data.topics`). `data.text_field` names another field or column; a record whose
text field holds chat `messages` is rendered by the checkpoint's chat template.

A source without train/val parts is split once, seeded, into training and held-out documents,
and the split is stated in `TextData.split`; a file or folder given for evaluation alone
(`all_held_out`) is held out whole (a folder with train/val parts still gives its val part). Documents are tokenized with the checkpoint's own
tokenizer (read from its folder, never downloaded), truncated to `max_length` tokens and padded
per batch; without `max_length` (`data.max_length`), to the tokens that hold 95 % of the training documents whole, at most
the model's positions and 512 (`default_length`), stated in `TextData.length_rule`.

A large source (or any, with `data.streaming: true`) is streamed instead: `data/stream.py`.
"""

from __future__ import annotations

import functools
import json
import math
import pydoc_data.topics as pydoc_topics
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from lowrank_cli.data.formats import CHAT_FIELD, TABLE_SUFFIXES, TEXT_FIELD, Chat, document_text, is_saved_dataset, saved_dataset_splits
from lowrank_cli.data.stream import STREAM_BYTES, Shards, TextStream, first_documents, pad_batch, source_bytes
from lowrank_cli.errors import LowrankError

TEXT_SUFFIXES = (".txt", ".jsonl")
SOURCE_SUFFIXES = TEXT_SUFFIXES + TABLE_SUFFIXES  # the files a text source (or a folder of them) may hold
FILES_ACCEPTED = "a .txt, .jsonl, .csv, .tsv, .parquet or .arrow file, a folder of them, a folder saved by datasets' save_to_disk"
ACCEPTED = FILES_ACCEPTED + ", or 'pydoc'"  # what a text source may be, in the errors that refuse one
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "tokenizer.model", "sentencepiece.bpe.model")
BUILTIN = "pydoc"
VAL_NAMES = ("val", "validation", "valid", "test")
HUB_SHARD = re.compile(r"(.+)-\d{5}-of-\d{5}")  # the Hub's shard names, `train-00000-of-00002.parquet`: a part's name, then the shard
DEFAULT_MAX_LENGTH = 512  # the most tokens per document the default length gives (the model's positions bound it too)
COVER = 0.95  # the share of the training documents the default length holds whole


@dataclass
class Documents:
    """Texts and, for a labelled corpus, their labels (`None` otherwise); `chat`: the texts are chats rendered by the
    checkpoint's chat template, tokenized without the tokenizer's own special tokens (the template writes them)."""

    texts: list[str]
    labels: list[int] | None = None
    chat: bool = False


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
    max_length: int | None = None  # tokens per document (a packed stream's sequence length)
    length_rule: str = ""  # why that many: data.max_length, or the default's rule with what it measured
    notice: str | None = None  # said before the data is used: the built-in text stands in for the user's

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


def read_documents(path: Path, text_field: str | None = None, label_field: str = "label", chat: Chat | None = None) -> Documents:
    """The documents of one `.txt` (a line each), `.jsonl` (an object per line with `text_field`; None: `text`, or chat
    `messages` in an object without `text`, rendered by `chat`) or table file (`Shards`' reader, `data/formats.py`)."""
    if path.suffix in TABLE_SUFFIXES:
        return _table_documents(path, text_field, label_field, chat)
    text = _read_text(path)
    if path.suffix == ".txt":
        docs = [line.strip() for line in text.splitlines() if line.strip()]
        if not docs:
            raise LowrankError(f"{path}: holds no text (one document per line)", param="data")
        return Documents(docs)
    texts, labels, chats = [], [], []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise LowrankError(f"{path}: line {n} is not JSON ({e.msg})", param="data") from None
        field = text_field or (CHAT_FIELD if isinstance(record, dict) and TEXT_FIELD not in record and CHAT_FIELD in record else TEXT_FIELD)
        got = document_text(record.get(field), chat, f"{path}: line {n}") if isinstance(record, dict) else None
        if got is None:
            raise LowrankError(f"{path}: line {n} has no '{field}' string (each line: {{\"{field}\": ..., \"{label_field}\": ...}})",
                               param="data")
        texts.append(got[0])
        chats.append(got[1])
        labels.append(record.get(label_field))
    if not texts:
        raise LowrankError(f"{path}: holds no documents", param="data")
    if any(chats) and not all(chats):
        raise LowrankError(f"{path}: document {chats.index(not chats[0]) + 1} holds {'text' if chats[0] else 'chat messages'} "
                           "while the first "
                           f"holds {'chat messages' if chats[0] else 'text'}; a source is all text or all chat", param="data")
    has = [lab is not None for lab in labels]
    if any(has) and not all(has):
        raise LowrankError(f"{path}: line {has.index(False) + 1} has no '{label_field}' while others do", param="data")
    if any(has) and not all(isinstance(lab, int) and not isinstance(lab, bool) and lab >= 0 for lab in labels):
        raise LowrankError(f"{path}: '{label_field}' values must be non-negative integers (class indices)", param="data")
    return Documents(texts, labels if all(has) else None, chat=chats[0])


def _table_documents(path: Path, text_field: str | None, label_field: str, chat: Chat | None) -> Documents:
    """A table file's documents, read by the reader that streams it (its checks, its messages)."""
    shards = Shards([path], path.parent, text_field, label_field, chat)
    docs = list(shards.read(0, 0, 0))
    if not docs:
        raise LowrankError(f"{path}: holds no documents (no rows)", param="data")
    return Documents([d.text for d in docs], [d.label for d in docs] if shards.labelled else None, chat=bool(shards.chat_docs))


def _concat(parts: list[Documents], where: str) -> Documents:
    labelled = {p.labels is not None for p in parts}
    if len(labelled) > 1:
        raise LowrankError(f"{where}: some files have labels and some do not", param="data")
    if len({p.chat for p in parts}) > 1:
        raise LowrankError(f"{where}: some files hold chat messages and some plain text; a source is all text or all chat", param="data")
    return Documents([t for p in parts for t in p.texts], [lab for p in parts for lab in p.labels] if labelled == {True} else None,
                     chat=parts[0].chat)


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in SOURCE_SUFFIXES)


def load_documents(source: str, seed: int = 0, val_fraction: float = 0.2, all_held_out: bool = False, text_field: str | None = None,
                   chat: Chat | None = None) -> tuple[Documents, Documents, str]:
    """(train, held-out, how they were split) from `pydoc`, a file, or a folder (see the module docstring); `text_field` and
    `chat` as `read_documents` takes them.

    `all_held_out`: a file, or a folder without train/val parts, is all held-out data (nothing to
    train on: what `evaluate` reads); `pydoc` keeps its seeded split, so that its figures are the
    ones a run on it reported.
    """
    split = _whole if all_held_out else _split
    if source == BUILTIN:
        return _split(pydoc_documents(), seed, val_fraction, "pydoc_data.topics (CPython's help topics)")
    path = Path(source)
    if not path.exists():
        raise LowrankError(f"text data '{source}': no such file or folder (give {ACCEPTED})", param="data")
    files, train, val = _parts(source, path)
    read = lambda f: read_documents(f, text_field, "label", chat)  # noqa: E731
    if path.is_file():
        return split(read(path), seed, val_fraction, path.name)
    if train:
        return (_concat([read(f) for f in train], source), _concat([read(f) for f in val], source),
                f"its train ({len(train)} files) and {_part_name(val[0])} parts")
    return split(_concat([read(f) for f in files], source), seed, val_fraction, f"{len(files)} files")


def _whole(docs: Documents, _seed: int, _val_fraction: float, what: str) -> tuple[Documents, Documents, str]:
    """Nothing to train on, every document held out."""
    nothing = Documents([], [] if docs.labels is not None else None, docs.chat)
    return nothing, docs, f"{what}: all {len(docs.texts)} documents (no split: given for evaluation)"


def _split(docs: Documents, seed: int, val_fraction: float, what: str) -> tuple[Documents, Documents, str]:
    n = len(docs.texts)
    if n < 2:
        raise LowrankError(f"text data {what}: {n} document; at least 2 are needed for a training and a held-out part", param="data")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(val_fraction * n))
    pick = lambda idx: Documents([docs.texts[i] for i in idx],  # noqa: E731
                                 None if docs.labels is None else [docs.labels[i] for i in idx], docs.chat)
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
    encoded = tokenizer(docs.texts, truncation=True, max_length=max_length, add_special_tokens=not docs.chat)["input_ids"]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return TokenizedTexts([list(ids) for ids in encoded], docs.labels, pad)


@dataclass(frozen=True)
class Reading:
    """How a source's records become tokens: `text_field` (recipe key data.text_field: the field or column that holds the
    text; None: `text`, or chat `messages` where a record has no `text`) and `positions`, the model's longest input, which
    bounds the default length (`default_length`)."""

    text_field: str | None = None
    positions: int | None = None


def length_bound(positions: int | None) -> int:
    """The most tokens the default length gives: 512, or the model's positions if fewer."""
    return min(DEFAULT_MAX_LENGTH, positions or DEFAULT_MAX_LENGTH)


def default_length(lengths: list[int], positions: int | None) -> tuple[int, str]:
    """The tokens per document when `data.max_length` is not given, and the rule in words: the fewest that hold 95 % of
    the documents measured whole (`lengths`: their tokens, counted up to one past the bound), rounded up to a multiple of
    8, at most the model's positions and 512. A batch is padded to its longest document: a few long documents would
    otherwise set the memory and time of every batch they land in, and 128 (the old default) cut a quarter of the
    documents of typical LLM text."""
    bound = length_bound(positions)
    limit = f"at most {DEFAULT_MAX_LENGTH}" + (f" and the model's {positions} positions" if positions else "")
    if not lengths:
        return bound, f"{bound} tokens (data.max_length not given; no document to measure: {limit})"
    k = sorted(lengths)[math.ceil(COVER * len(lengths)) - 1]
    length = min(bound, max(8, -(-k // 8) * 8))
    whole = sum(n <= length for n in lengths)
    return length, (f"{length} tokens (data.max_length not given): {whole} of the {len(lengths)} documents measured fit whole "
                    f"(the fewest tokens that hold {COVER * 100:.0f} % of them, rounded up to a multiple of 8, {limit})")


def tokenize_measured(docs: Documents, tokenizer: Any, positions: int | None) -> tuple[TokenizedTexts, int, str]:
    """`docs` tokenized at the length `default_length` picks from their own token counts: (tokens, length, rule). Counted
    once, cut to one past the bound; only the documents longer than the length are tokenized again."""
    measured = tokenize(docs, tokenizer, length_bound(positions) + 1)
    length, rule = default_length(measured.lengths(), positions)
    return cut(measured, docs, tokenizer, length), length, rule


def cut(tokens: TokenizedTexts, docs: Documents, tokenizer: Any, length: int) -> TokenizedTexts:
    """`tokens` (of `docs`) with every document longer than `length` tokenized again, truncated to it as the tokenizer
    truncates (its closing special tokens kept)."""
    long = [i for i, ids in enumerate(tokens.ids) if len(ids) > length]
    if long:
        again = tokenize(Documents([docs.texts[i] for i in long], None, docs.chat), tokenizer, length)
        for i, ids in zip(long, again.ids):
            tokens.ids[i] = ids
    return tokens


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
            raise LowrankError(f"data.streaming true: '{BUILTIN}' is held in memory, not streamed; give a file or a folder of them "
                               f"({FILES_ACCEPTED}), or set data.streaming to auto", param="data")
        return False
    if streaming is True:
        return True
    return source_bytes(_parts(source, Path(source))[0]) > STREAM_BYTES


def builtin_notice(docs: int) -> str:
    """What a run on `pydoc` says before it uses it: the built-in text stands in for the user's."""
    return (f"data: '{BUILTIN}', CPython's help topics ({docs} paragraphs of Python's documentation), stands in for your own text; "
            f"give yours in data.source (argument `data`): {FILES_ACCEPTED}")


def load_text_data(source: str | None, folder: Path | None, max_length: int | None, seed: int = 0, val_fraction: float = 0.2,
                   all_held_out: bool = False, stream: StreamOptions | None = None, reading: Reading | None = None) -> TextData:
    """Tokenized train and held-out text from `source` for the checkpoint in `folder` (see the module docstring and `load_documents`);
    streamed (`TextData.train` a `TextStream`) when `stream` says so. `max_length` None: the default length (`default_length`,
    measured on the training documents; `evaluate`'s, on the held-out ones); `reading`: the text field and the model's positions."""
    if source is None:
        raise LowrankError(f"no data: give {ACCEPTED} (argument `data`, recipe key data.source)", param="data")
    if source in ("digits", "synthetic"):
        raise LowrankError(f"data '{source}' is images, and this is a text model; give {ACCEPTED}", param="data")
    if Path(source).is_dir() and any(p.suffix.lower() in (".png", ".jpg", ".jpeg") for p in Path(source).rglob("*")):
        raise LowrankError(f"data '{source}' is a folder of images, and this is a text model; give {ACCEPTED}", param="data")
    stream, reading = stream or StreamOptions(), reading or Reading()
    tokenizer = functools.cache(lambda: tokenizer_of(folder))  # loaded once, after the documents (a chat source: on its first)
    if streams(source, stream.streaming):
        return stream_text_data(source, tokenizer(), max_length, seed, val_fraction, all_held_out, stream, reading)
    train, val, split = load_documents(source, seed, val_fraction, all_held_out, reading.text_field, Chat(tokenizer))
    if max_length is None:  # measured on what is trained on (evaluate: on what it reads)
        measured, max_length, rule = tokenize_measured(train if train.texts else val, tokenizer(), reading.positions)
        train_tokens, val_tokens = (measured, None) if train.texts else (tokenize(train, tokenizer(), max_length), measured)
    else:
        rule, train_tokens, val_tokens = f"{max_length} tokens (data.max_length)", tokenize(train, tokenizer(), max_length), None
    labels = (train.labels or []) + (val.labels or [])
    notice = builtin_notice(len(train.texts) + len(val.texts)) if source == BUILTIN else None
    if val_tokens is None:
        val_tokens = tokenize(val, tokenizer(), max_length)
    return TextData(source, train_tokens, val_tokens, max(labels) + 1 if labels else None, split,
                    max_length=max_length, length_rule=rule, notice=notice)


def _in_part(f: Path, names: tuple[str, ...]) -> bool:
    """Whether file `f` belongs to a part named in `names`: by its name (`train.jsonl`, the Hub's `train-00000-of-00002.parquet`)
    or its folder's (`train/…`)."""
    hub = HUB_SHARD.fullmatch(f.stem)
    return f.stem in names or f.parent.name in names or (hub is not None and hub.group(1) in names)


def _part_name(f: Path) -> str:
    hub = HUB_SHARD.fullmatch(f.stem)
    return f.stem if f.stem in VAL_NAMES else hub.group(1) if hub is not None and hub.group(1) in VAL_NAMES else f.parent.name


def _parts(source: str, path: Path) -> tuple[list[Path], list[Path], list[Path]]:
    """A file or folder source's files, and its train and val parts (both empty unless a folder has both); a folder saved by
    `datasets` gives its splits' Arrow files (`train` and the validation splits are its parts)."""
    if path.is_file():
        if path.suffix not in SOURCE_SUFFIXES:
            raise LowrankError(f"text data '{source}': '{path.suffix or path.name}' is not a format lowrank reads; give {ACCEPTED}",
                               param="data")
        return [path], [], []
    if is_saved_dataset(path):
        splits = saved_dataset_splits(path)
        files = [f for fs in splits.values() for f in fs]
        if not files:
            raise LowrankError(f"text data '{source}': the saved dataset holds no rows", param="data")
        train, val = splits.get("train", []), [f for name in VAL_NAMES for f in splits.get(name, [])]
        return (files, train, val) if train and val else (files, [], [])
    files = _files(path)
    if not files:
        raise LowrankError(f"text data '{source}': the folder holds no {', '.join(SOURCE_SUFFIXES)} files (give {ACCEPTED})", param="data")
    train = [f for f in files if _in_part(f, ("train",))]
    val = [f for f in files if _in_part(f, VAL_NAMES)]
    return (files, train, val) if train and val else (files, [], [])


def stream_shards(source: str, text_field: str | None = None, chat: Chat | None = None) -> tuple[Shards, Shards | None]:
    """The shards of a streamed source: (all of them, None), or a folder's (train part, val part)."""
    path = Path(source)
    files, train, val = _parts(source, path)
    if train:
        return Shards(train, path, text_field, "label", chat), Shards(val, path, text_field, "label", chat)
    return Shards(files, path, text_field, "label", chat), None


def stream_text_data(source: str, tokenizer: Any, max_length: int | None, seed: int, val_fraction: float, all_held_out: bool,
                     opts: StreamOptions, reading: Reading | None = None) -> TextData:
    """A streamed source (`data/stream.py`): the training part as a `TextStream`, the held-out part the first
    `opts.val_documents` held-out documents, in memory, tokenized as in-memory text is. `max_length` None: a packed stream's
    sequences are as long as the bound (`length_bound`); a document per example, the default length of the first
    `opts.val_documents` training documents (`evaluate`: of the held-out ones)."""
    reading = reading or Reading()
    shards, val_shards = stream_shards(source, reading.text_field, Chat(lambda: tokenizer))
    n = opts.val_documents
    holdout = None if val_shards is not None else (seed, val_fraction)
    if all_held_out and val_shards is None:  # evaluate: nothing to train on; the first documents are held out
        texts, labels = first_documents(shards, n, None, True)
        split = f"{source}: its first {len(texts)} documents (streamed; no split: given for evaluation)"
    elif val_shards is not None:
        texts, labels = first_documents(val_shards, n, None, True)
        split = f"its train part ({len(shards.files)} files, streamed) and the first {len(texts)} documents of its val part"
    else:
        texts, labels = first_documents(shards, n, holdout, True)
        if not texts:
            raise LowrankError(f"text data '{source}': no document is held out (a fraction {val_fraction} by a hash seeded with {seed}); "
                               "give more documents", param="data")
        split = (f"{len(shards.files)} files, streamed: a document is held out when its seeded hash (seed {seed}) falls below {val_fraction}; "
                 f"the first {len(texts)} held-out documents are evaluated")
    val_docs = Documents(texts, labels, bool((val_shards or shards).chat_docs))
    evaluating = all_held_out and val_shards is None
    length, rule = _streamed_length(max_length, shards, holdout, val_docs if evaluating else None, tokenizer, opts, reading.positions)
    train = None if evaluating else TextStream(shards, tokenizer, length, opts.pack, holdout, opts.seed, opts.window)
    val = tokenize(val_docs, tokenizer, length)
    if train is None:
        train = TokenizedTexts([], None if labels is None else [], val.pad_id)
    return TextData(source, train, val, max(labels) + 1 if labels else None, split, max_length=length, length_rule=rule)


def _streamed_length(max_length: int | None, shards: Shards, holdout: tuple[int, float] | None, held: Documents | None, tokenizer: Any,
                     opts: StreamOptions, positions: int | None) -> tuple[int, str]:
    """A streamed source's tokens per example and why (see `stream_text_data`); `held`: the documents `evaluate` reads."""
    if max_length is not None:
        return max_length, f"{max_length} tokens (data.max_length)"
    if opts.pack and held is None:
        bound = length_bound(positions)
        return bound, (f"{bound} tokens per packed sequence (data.max_length not given: at most {DEFAULT_MAX_LENGTH}"
                       + (f" and the model's {positions} positions)" if positions else ")"))
    if held is None:
        texts, labels = first_documents(shards, opts.val_documents, holdout, False)
        held = Documents(texts, labels, bool(shards.chat_docs))
    _, length, rule = tokenize_measured(held, tokenizer, positions)
    return length, rule
