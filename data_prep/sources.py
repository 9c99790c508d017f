"""Where documents come from: local files (globs, folders, compressed) or a `datasets` dataset, read in a fixed order.

The document order is the contract everything else builds on (shard boundaries, resume, job splits):
- input specs in the order given; a glob's matches and a folder's files sorted by path; a file listed twice read once;
- inside a file, records in file order; a `datasets` dataset in row order.

Every item carries its position `(source index, record number)`: the line number for line-based files (JSONL, .txt
lines and paragraphs, CSV), the element number of a JSON array, the row number of a parquet file or dataset. A resumed
run restarts after a position without reopening the files before it.

Readers never parse JSON or validate text (the workers do, see records.py). What goes wrong while reading a file
(missing, unreadable, corrupt compression, empty) becomes a SKIP item in its place in the stream, never an exception.
"""

from __future__ import annotations

import bz2
import csv
import glob
import gzip
import io
import lzma
import os
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from data_prep.errors import PrepareError
from data_prep.records import JSON_LINE, OBJECT, RAW, SKIP, TEXT

FORMATS = (".jsonl", ".ndjson", ".json", ".txt", ".csv", ".tsv", ".parquet")
COMPRESSIONS = (".gz", ".zst", ".bz2", ".xz")
TXT_UNITS = ("file", "paragraph", "line")

Item = tuple[int, int, int, Any]  # (source index, record number, kind, payload)


def split_suffix(path: str) -> tuple[Optional[str], Optional[str]]:
    """(format suffix, compression suffix) of a file name, e.g. ('.jsonl', '.zst'); (None, None) if unsupported."""
    name = os.path.basename(path).lower()
    compression = next((c for c in COMPRESSIONS if name.endswith(c)), None)
    if compression:
        name = name[: -len(compression)]
    fmt = next((f for f in FORMATS if name.endswith(f)), None)
    if fmt is None or (fmt == ".parquet" and compression):  # parquet compresses inside; it needs a seekable file
        return None, None
    return fmt, compression


def _supported(path: str) -> bool:
    return split_suffix(path)[0] is not None


def expand_inputs(specs: list[str]) -> list[str]:
    """Absolute file paths, in document order. A spec is a file, a folder (searched recursively for supported
    files, hidden ones left out) or a glob (`**` allowed). A file that does not exist or a glob that matches no
    supported file is refused before anything is read (a typo would otherwise give a dataset without that file);
    a file that vanishes while a run reads is reported as unreadable."""
    paths: list[str] = []
    missing: list[str] = []
    for spec in specs:
        if glob.has_magic(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            found = []
            for match in matches:
                found.extend(_walk(match) if os.path.isdir(match) else [match] if _supported(match) else [])
            paths.extend(found)
            if not found:
                missing.append(f"{spec} (matches no supported file)")
        elif os.path.isdir(spec):
            paths.extend(_walk(spec))
        else:
            if not _supported(spec):
                raise PrepareError(f"{spec}: unsupported file type (supported: "
                                   f"{', '.join(FORMATS)}, optionally compressed {', '.join(COMPRESSIONS)}; "
                                   f"parquet uncompressed)")
            paths.append(spec)
            if not os.path.exists(spec):
                missing.append(f"{spec} (no such file)")
    if missing:
        raise PrepareError(f"input {missing[0]}" + (f", and {len(missing) - 1} more" if len(missing) > 1 else ""))
    seen: set[str] = set()
    unique = []
    for path in map(os.path.abspath, paths):
        if path not in seen:
            seen.add(path)
            unique.append(path)
    return unique


def _walk(folder: str) -> list[str]:
    """Supported files under `folder`, sorted; hidden entries and our own output folders (they hold a .prepare
    folder, and JSON files of their own) are left out, so an output inside an input folder is never read back."""
    found = []
    for root, dirs, files in os.walk(folder):
        if os.path.isdir(os.path.join(root, ".prepare")):
            dirs[:] = []
            continue
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found.extend(os.path.join(root, f) for f in sorted(files) if not f.startswith(".") and _supported(f))
    return sorted(found)


def file_size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return -1


def split_files(paths: list[str], sizes: list[int], num_jobs: int, job_index: int) -> list[int]:
    """Indices of the files job `job_index` of `num_jobs` reads: a contiguous block, blocks balanced by bytes.

    File j goes to the job whose share of the total bytes holds the file's midpoint, so the blocks are contiguous,
    disjoint, cover every file, and depend only on the file list and sizes (not on the machine or the job count
    of anything else)."""
    weights = [max(s, 0) + 1 for s in sizes]  # +1: empty and missing files still belong somewhere
    total = sum(weights)
    chosen, start = [], 0
    for j, weight in enumerate(weights):
        job = min(num_jobs - 1, (2 * start + weight) * num_jobs // (2 * total))
        if job == job_index:
            chosen.append(j)
        start += weight
    return chosen


# ---- local files ------------------------------------------------------------------------------------------------

# a UTF-8 byte-order mark (Windows editors and spreadsheet tools write one) is not text: dropped from every format
BOM = b"\xef\xbb\xbf"
CSV_FIELD_LIMIT = 2**31 - 1  # the C long csv.field_size_limit takes on every platform


@dataclass
class FileSource:
    path: str
    text_key: str = "text"
    txt_unit: str = "file"
    _json_array: Optional[bool] = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.path

    def location(self, number: int) -> str:
        fmt, _ = split_suffix(self.path)
        if number <= 0 or (fmt == ".txt" and self.txt_unit == "file"):
            return self.path
        if fmt == ".parquet":
            return f"{self.path}:row {number}"
        if fmt == ".json" and self._json_array:
            return f"{self.path}:element {number}"
        return f"{self.path}:{number}"

    def _open(self):
        _, compression = split_suffix(self.path)
        if compression == ".gz":
            return gzip.open(self.path, "rb")
        if compression == ".bz2":
            return bz2.open(self.path, "rb")
        if compression == ".xz":
            return lzma.open(self.path, "rb")
        raw = open(self.path, "rb")
        if compression == ".zst":
            import zstandard  # only .zst inputs need it

            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
            return io.BufferedReader(reader, buffer_size=1 << 20)
        return raw

    def records(self) -> Iterator[tuple[int, int, Any]]:
        """(record number, kind, payload) in file order; errors propagate (items() turns them into SKIP)."""
        fmt, _ = split_suffix(self.path)
        if fmt in (".jsonl", ".ndjson"):
            yield from self._json_lines()
        elif fmt == ".json":
            yield from self._json()
        elif fmt == ".txt":
            yield from self._txt()
        elif fmt in (".csv", ".tsv"):
            yield from self._csv(delimiter="\t" if fmt == ".tsv" else ",")
        elif fmt == ".parquet":
            yield from self._parquet()

    def _json_lines(self) -> Iterator[tuple[int, int, Any]]:
        with self._open() as fh:
            for number, line in enumerate(fh, 1):
                if number == 1:
                    line = line.removeprefix(BOM)
                if not line.isspace():  # blank lines separate nothing and are not records
                    yield number, JSON_LINE, line

    def _json(self) -> Iterator[tuple[int, int, Any]]:
        """A JSON array of objects, or (anything else) JSON Lines under a .json name."""
        with self._open() as fh:
            head = fh.read(1 << 16).removeprefix(BOM)
            first = head.lstrip()[:1]
            if first != b"[":
                self._json_array = False
                if not first and not head:
                    return
            else:
                self._json_array = True
                data = head + fh.read()
        if not self._json_array:
            yield from self._json_lines()
            return
        import json

        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as err:
            line = data.count(b"\n", 0, err.start) + 1
            yield 0, SKIP, ("invalid_utf8", f"byte 0x{data[err.start]:02x} at line {line}; the whole file "
                                            f"is skipped", 1)
            return
        try:
            values = json.loads(text)
        except json.JSONDecodeError as err:
            yield 0, SKIP, ("invalid_json", f"{err.msg} (line {err.lineno}, column {err.colno}); "
                                                     f"the whole file is skipped", 1)
            return
        for number, value in enumerate(values if isinstance(values, list) else [values], 1):
            yield number, OBJECT, value

    def _txt(self) -> Iterator[tuple[int, int, Any]]:
        with self._open() as fh:
            if self.txt_unit == "file":
                data = fh.read().removeprefix(BOM)
                if data:
                    yield 1, RAW, data
                return
            if self.txt_unit == "line":
                for number, line in enumerate(fh, 1):
                    if number == 1:
                        line = line.removeprefix(BOM)
                    if line and not line.isspace():
                        yield number, RAW, line.rstrip(b"\r\n")
                return
            lines: list[bytes] = []
            first = 0
            for number, line in enumerate(fh, 1):
                if number == 1:
                    line = line.removeprefix(BOM)
                if not line or line.isspace():
                    if lines:
                        yield first, RAW, b"".join(lines).rstrip(b"\r\n")
                        lines = []
                    continue
                if not lines:
                    first = number
                lines.append(line)
            if lines:
                yield first, RAW, b"".join(lines).rstrip(b"\r\n")

    def _csv(self, delimiter: str) -> Iterator[tuple[int, int, Any]]:
        # the csv module refuses fields over 128 KiB by default: a book in one cell would end the file there
        csv.field_size_limit(CSV_FIELD_LIMIT)
        with self._open() as raw:
            # surrogateescape: a bad byte becomes a lone surrogate that the worker reports as invalid UTF-8
            text = io.TextIOWrapper(raw, encoding="utf-8", errors="surrogateescape", newline="")
            reader = csv.reader(text, delimiter=delimiter)
            header = next(reader, None)
            if header is None:
                return
            if header and header[0].startswith("\ufeff"):  # a byte-order mark written by spreadsheet tools
                header[0] = header[0][1:]
            column = header.index(self.text_key) if self.text_key in header else None
            columns = ", ".join(header[:8])
            line = reader.line_num
            for row in reader:
                start, line = line + 1, reader.line_num
                if column is None:
                    yield start, SKIP, ("missing_key", f"no {self.text_key!r} column (columns: {columns})", 1)
                elif column >= len(row):
                    yield start, SKIP, ("missing_key", f"row has {len(row)} fields, no {self.text_key!r}", 1)
                else:
                    yield start, TEXT, row[column]

    def _parquet(self) -> Iterator[tuple[int, int, Any]]:
        import pyarrow.parquet as pq

        parquet = pq.ParquetFile(self.path)
        names = parquet.schema_arrow.names
        rows = parquet.metadata.num_rows
        if self.text_key not in names:
            if rows:
                yield 1, SKIP, ("missing_key", f"no {self.text_key!r} column (columns: {', '.join(names[:8])}); "
                                               f"all {rows} rows skipped", rows)
            return
        number = 0
        for batch in parquet.iter_batches(batch_size=4096, columns=[self.text_key]):
            for value in batch.column(0).to_pylist():
                number += 1
                yield number, TEXT, value


def _read_errors() -> tuple[type, ...]:
    errors: list[type] = [OSError, EOFError, csv.Error, lzma.LZMAError, UnicodeError]
    # the optional readers' errors, where those readers are installed (a machine without them reads no .zst or
    # .parquet file, so none of their errors can occur)
    try:
        import zstandard

        errors.append(zstandard.ZstdError)
    except ImportError:
        pass
    try:
        import pyarrow

        errors.append(pyarrow.ArrowException)
    except ImportError:
        pass
    return tuple(errors)


# ---- a `datasets` dataset ---------------------------------------------------------------------------------------


@dataclass
class DatasetSource:
    """A `datasets` dataset: a folder written by `save_to_disk`, or anything `datasets.load_dataset` accepts
    (a hub name needs the network; `json`/`parquet`/`csv` with data_files do not). Rows `start:stop`."""

    path: str
    split: str = "train"
    config: Optional[str] = None
    data_files: Optional[list[str]] = None
    text_key: str = "text"
    start: int = 0
    stop: Optional[int] = None
    _dataset: Any = field(default=None, repr=False)

    @property
    def name(self) -> str:
        extra = f", data_files={self.data_files}" if self.data_files else ""
        config = f"/{self.config}" if self.config else ""
        return f"datasets:{self.path}{config}[{self.split}]{extra}"

    def location(self, number: int) -> str:
        return f"{self.name}:row {number}"

    def load(self):
        if self._dataset is not None:
            return self._dataset
        import datasets

        try:
            if os.path.isdir(self.path) and (os.path.exists(os.path.join(self.path, "dataset_info.json"))
                                             or os.path.exists(os.path.join(self.path, "dataset_dict.json"))):
                dataset = datasets.load_from_disk(self.path)
                if isinstance(dataset, datasets.DatasetDict):
                    if self.split not in dataset:
                        raise PrepareError(f"{self.path}: no split {self.split!r} (splits: {', '.join(dataset)})")
                    dataset = dataset[self.split]
            else:
                dataset = datasets.load_dataset(self.path, self.config, split=self.split, data_files=self.data_files)
        except PrepareError:
            raise
        except Exception as err:  # datasets raises many types; the message is what the user needs
            raise PrepareError(f"{self.name}: cannot load the dataset ({type(err).__name__}: {err})") from None
        if self.text_key not in dataset.column_names:
            raise PrepareError(f"{self.name}: no column {self.text_key!r} "
                               f"(columns: {', '.join(dataset.column_names)}; choose one with --text-key)")
        self._dataset = dataset
        return dataset

    def __len__(self) -> int:
        return len(self.load())

    def records(self, after: Optional[int] = None) -> Iterator[tuple[int, int, Any]]:
        dataset = self.load().select_columns([self.text_key])
        stop = len(dataset) if self.stop is None else self.stop
        first = self.start if after is None else max(self.start, after + 1)
        # rows are numbered by their index in the dataset (0-based), as datasets does
        for begin in range(first, stop, 4096):
            batch = dataset[begin:min(begin + 4096, stop)][self.text_key]
            for offset, value in enumerate(batch):
                yield begin + offset, TEXT, value


# ---- the stream -------------------------------------------------------------------------------------------------


def iter_items(sources: list, after: Optional[tuple[int, int]] = None) -> Iterator[Item]:
    """All items of `sources` in document order, starting after position `after` (resume)."""
    errors = _read_errors()
    for index, source in enumerate(sources):
        if after is not None and index < after[0]:
            continue
        skip_to = after[1] if after is not None and index == after[0] else None
        if isinstance(source, DatasetSource):
            for number, kind, payload in source.records(skip_to):
                yield index, number, kind, payload
            continue
        if not os.path.exists(source.path):
            yield index, 0, SKIP, ("unreadable", "no such file or folder (or a pattern that matches nothing)", 1)
            continue
        count, last = 0, 0
        try:
            for number, kind, payload in source.records():
                count, last = count + 1, number
                if skip_to is None or number > skip_to:
                    yield index, number, kind, payload
        except errors as err:
            yield index, last + 1, SKIP, ("unreadable", f"{type(err).__name__}: {err}", 1)
            continue
        if count == 0:
            yield index, 0, SKIP, ("empty_file", "no records", 1)
