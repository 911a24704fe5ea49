"""Tables and chats as text: CSV/TSV, Parquet and Arrow files and folders saved by `datasets.save_to_disk`, and which field
of a record is its document (`data.text_field`, or chat `messages` rendered by the checkpoint's chat template).

A table is read row by row from a position (a CSV's byte offset, a Parquet or Arrow file's row number), so that it streams
as `.txt` and `.jsonl` shards do (`data/stream.py`) and loads in memory through the same reader (`data/text.py`). Parquet
is read a row group at a time and an Arrow file a record batch at a time (memory-mapped), only the columns a document
needs; a CSV a line at a time. pyarrow reads Parquet and Arrow; `datasets` opens a saved folder and names its splits'
Arrow files, which pyarrow then reads: both are the `data` extra, imported only for such a source. CSV needs neither.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Callable, Iterator

from lowrank_cli.errors import LowrankError

TABLE_SUFFIXES = (".csv", ".tsv", ".parquet", ".arrow", ".feather")
BINARY_SUFFIXES = (".parquet", ".arrow", ".feather")  # no text checks (NUL bytes, UTF-8) on these
EXTRA = "pip install 'lowrank[data]'"
TEXT_FIELD, CHAT_FIELD = "text", "messages"
ROWS_AT_ONCE = 1024  # rows of a Parquet row group or an Arrow batch turned into Python objects together
CSV_FIELD_LIMIT = 2**31 - 1  # a CSV cell may hold a whole document (the csv module's default limit is 128 KiB)

Row = tuple[dict[str, Any], int, int]  # a record (the columns asked for), its position, the next row's position


def _pyarrow(path: Path) -> Any:
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401 - submodules used below
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise LowrankError(f"{path}: reading {path.suffix} files needs pyarrow, which is not installed ({EXTRA})", param="data") from None
    return pyarrow


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def columns_of(path: Path) -> list[str]:
    """The column names of a table file (a CSV's header row)."""
    if path.suffix in (".csv", ".tsv"):
        return _csv_header(path)[0]
    pa = _pyarrow(path)
    try:
        if path.suffix == ".parquet":
            return list(pa.parquet.ParquetFile(path).schema_arrow.names)
        return list(_arrow_reader(pa, path)[0].schema.names)
    except (pa.ArrowException, OSError) as e:
        raise LowrankError(f"{path}: cannot be read as {path.suffix[1:]} ({_first_line(e)})", param="data") from None


def read_rows(path: Path, start: int, columns: list[str]) -> Iterator[Row]:
    """The rows of a table file from position `start` (a CSV: a row's byte offset; Parquet, Arrow: a row number), each a
    dict of `columns` with its position and the next row's."""
    if path.suffix in (".csv", ".tsv"):
        yield from _csv_rows(path, start, columns)
        return
    pa = _pyarrow(path)
    try:
        chunks = _parquet_chunks(pa, path, start, columns) if path.suffix == ".parquet" else _arrow_chunks(pa, path, start, columns)
        for first, table in chunks:
            values = {c: table.column(c).to_pylist() for c in columns}
            for i in range(table.num_rows):
                if first + i >= start:
                    yield {c: values[c][i] for c in columns}, first + i, first + i + 1
    except (pa.ArrowException, OSError) as e:
        raise LowrankError(f"{path}: cannot be read as {path.suffix[1:]} ({_first_line(e)})", param="data") from None


def _parquet_chunks(pa: Any, path: Path, start: int, columns: list[str]) -> Iterator[tuple[int, Any]]:
    """(first row, table of at most `ROWS_AT_ONCE` rows) from the row group holding row `start` on; one group in memory."""
    f = pa.parquet.ParquetFile(path)
    row = 0
    for g in range(f.num_row_groups):
        n = f.metadata.row_group(g).num_rows
        if row + n > start:
            group = f.read_row_group(g, columns=columns)
            for at in range(0, n, ROWS_AT_ONCE):
                if row + at + ROWS_AT_ONCE > start:
                    yield row + at, group.slice(at, ROWS_AT_ONCE)
        row += n


def _arrow_reader(pa: Any, path: Path) -> tuple[Any, bool]:
    """An Arrow IPC reader of a memory-mapped file: the file format (random access, `.feather` too) or the stream format
    (what `datasets` writes); True for the file format."""
    source = pa.memory_map(str(path))
    try:
        return pa.ipc.open_file(source), True
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_stream(source), False


def _arrow_chunks(pa: Any, path: Path, start: int, columns: list[str]) -> Iterator[tuple[int, Any]]:
    reader, random_access = _arrow_reader(pa, path)
    batches = (reader.get_batch(i) for i in range(reader.num_record_batches)) if random_access else reader
    row = 0
    for batch in batches:
        if row + batch.num_rows > start:
            table = pa.Table.from_batches([batch]).select(columns)
            for at in range(0, batch.num_rows, ROWS_AT_ONCE):
                if row + at + ROWS_AT_ONCE > start:
                    yield row + at, table.slice(at, ROWS_AT_ONCE)
        row += batch.num_rows


class _Lines:
    """A binary file's lines decoded as UTF-8, counting the bytes read: what `csv.reader` consumes (it reads no further
    than the row it returns, so `read` is where the next row begins)."""

    def __init__(self, f: Any, path: Path, at: int):
        self.f, self.path, self.read = f, path, at

    def __iter__(self) -> Iterator[str]:
        for raw in self.f:
            begin, self.read = self.read, self.read + len(raw)
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise LowrankError(f"{self.path}: is not UTF-8 text (byte {begin + e.start} is not)", param="data") from None


def _csv_reader(lines: _Lines, path: Path) -> Any:
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    return csv.reader(lines, delimiter="\t" if path.suffix == ".tsv" else ",")


def _csv_header(path: Path) -> tuple[list[str], int]:
    """A CSV's column names (its first row, a UTF-8 byte-order mark dropped) and the byte where its first data row begins."""
    try:
        with open(path, "rb") as f:
            if b"\x00" in f.read(4096):
                raise LowrankError(f"{path}: is binary, not {path.suffix[1:]} text", param="data")
            f.seek(0)
            lines = _Lines(f, path, 0)
            header = next(_csv_reader(lines, path), None)
            if not header or not any(h.strip() for h in header):
                raise LowrankError(f"{path}: has no header row (the first line names the columns, e.g. {TEXT_FIELD})", param="data")
            return [header[0].removeprefix("\ufeff"), *header[1:]], lines.read
    except OSError as e:
        raise LowrankError(f"{path}: cannot be read ({e.strerror or e})", param="data") from None
    except csv.Error as e:
        raise LowrankError(f"{path}: its header is not {path.suffix[1:]} ({e})", param="data") from None


def _csv_rows(path: Path, start: int, columns: list[str]) -> Iterator[Row]:
    header, first = _csv_header(path)
    index = [header.index(c) for c in columns]
    try:
        with open(path, "rb") as f:
            f.seek(max(start, first))
            lines = _Lines(f, path, max(start, first))
            reader = _csv_reader(lines, path)
            while True:
                at = lines.read
                row = next(reader, None)
                if row is None:
                    return
                if not row:
                    continue  # a blank line
                if len(row) != len(header):
                    raise LowrankError(f"{path}: the row at byte {at} has {len(row)} fields and the header {len(header)}", param="data")
                yield {c: row[i] for c, i in zip(columns, index)}, at, lines.read
    except OSError as e:
        raise LowrankError(f"{path}: cannot be read ({e.strerror or e})", param="data") from None
    except csv.Error as e:
        raise LowrankError(f"{path}: is not {path.suffix[1:]} past byte {lines.read} ({e})", param="data") from None


def text_column(columns: list[str], text_field: str | None, path: Path) -> str:
    """The column that holds the documents: `text_field` (recipe key data.text_field), else `text`, else chat `messages`."""
    if text_field is not None:
        if text_field in columns:
            return text_field
        raise LowrankError(f"{path}: has no column '{text_field}' (data.text_field); its columns: {', '.join(columns)}",
                           param="data.text_field")
    for name in (TEXT_FIELD, CHAT_FIELD):
        if name in columns:
            return name
    raise LowrankError(f"{path}: has no column '{TEXT_FIELD}' (nor chat '{CHAT_FIELD}'); its columns: {', '.join(columns)}; "
                       "name the one that holds the text in data.text_field", param="data.text_field")


def table_label(value: Any, path: Path) -> Any:
    """A label cell as a class index where it is one: a CSV's cells are strings ('3' is 3, an empty cell no label)."""
    if path.suffix in (".csv", ".tsv") and isinstance(value, str):
        return None if not value.strip() else int(value) if value.strip().isdigit() else value
    return value


class Chat:
    """Chat `messages` (a list of {"role": ..., "content": ...}) rendered as one text by the checkpoint's chat template
    (`tokenizer.apply_chat_template`, not tokenized: the rendered text is tokenized without the tokenizer's own special
    tokens, which the template writes). `load` gives the tokenizer, called on the first chat document."""

    def __init__(self, load: Callable[[], Any]):
        self._load, self._tokenizer = load, None

    def render(self, messages: list, where: str) -> str:
        if self._tokenizer is None:
            self._tokenizer = self._load()
        tokenizer = self._tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise LowrankError(f"{where}: holds chat messages ('{CHAT_FIELD}'), and the checkpoint's tokenizer has no chat template "
                               "(chat_template in tokenizer_config.json or chat_template.jinja); give plain text (data.text_field) "
                               "or a checkpoint whose tokenizer has a chat template", param="data")
        if not messages or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and "content" in m for m in messages):
            raise LowrankError(f"{where}: chat messages must be a non-empty list of {{\"role\": ..., \"content\": ...}}", param="data")
        try:
            return tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception as e:  # noqa: BLE001 - jinja2 raises its own errors (TemplateError, ...) for messages the template refuses
            raise LowrankError(f"{where}: the tokenizer's chat template cannot render these messages ({_first_line(e)})",
                               param="data") from None


def document_text(value: Any, chat: Chat | None, where: str) -> tuple[str, bool] | None:
    """The document a field's value is: (the text, False) for a string, (the rendered chat, True) for a list of chat
    messages; None for anything else (the caller says what it expected)."""
    if isinstance(value, str):
        return value, False
    if isinstance(value, list):
        if chat is None:
            raise LowrankError(f"{where}: holds chat messages, which need the checkpoint's tokenizer and its chat template", param="data")
        return chat.render(value, where), True
    return None


def is_saved_dataset(path: Path) -> bool:
    """Whether `path` is a folder written by `datasets`' `save_to_disk` (a `Dataset` or a `DatasetDict`)."""
    dataset = (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or dataset)


def saved_dataset_splits(path: Path) -> dict[str, list[Path]]:
    """The splits of a `save_to_disk` folder (a single `Dataset`: one split named '') and each one's Arrow files in row order,
    as `datasets.load_from_disk` finds them (a saved dataset holds its rows in order: `save_to_disk` applies any selection)."""
    try:
        import datasets
    except ImportError:
        raise LowrankError(f"{path}: is a folder saved by datasets' save_to_disk; reading it needs the datasets library, "
                           f"which is not installed ({EXTRA})", param="data") from None
    datasets.disable_progress_bars()  # the command's output stays its own
    try:
        loaded = datasets.load_from_disk(str(path), keep_in_memory=False)
    except Exception as e:  # noqa: BLE001 - datasets raises FileNotFoundError, ValueError, ... for a damaged folder
        raise LowrankError(f"{path}: datasets cannot load this saved folder ({_first_line(e)})", param="data") from None
    parts = loaded.items() if isinstance(loaded, datasets.DatasetDict) else [("", loaded)]
    root = path.resolve()
    splits = {}
    for name, ds in parts:
        files = [path / Path(f["filename"]).resolve().relative_to(root) for f in ds.cache_files]
        if not files and len(ds):
            raise LowrankError(f"{path}: split '{name or 'the dataset'}' is held in memory, not in Arrow files under the folder",
                               param="data")
        splits[name] = files
    return splits
