"""Tokenize a corpus into Megatron .bin/.idx shards plus manifest.json: parallel, resumable, deterministic.

Output folder (one per job part when the work is split with --num-jobs):

    manifest.json                 written last: its presence means the folder is complete
    tokenizer.model, .json        the tokenizer used (manifest["tokenizer"]["model_file"])
    shard-00000.bin / .idx        Megatron indexed datasets, one document (ending in EOD = eos) per sequence
    .prepare/settings.json        what determines the output (tokenizer, inputs and their sizes, options)
    .prepare/shard-00000.json     a finished shard: counts, sha256, and the input position after its last document
    .prepare/summary.json         totals and skipped records (counts and first locations) of the finished folder

Determinism: the main process reads records in document order (sources.py) and sends them in batches to the workers,
who parse, check and tokenize; results come back in submission order and one writer cuts shards: a shard is closed
when the next document would take it past --shard-tokens. Shard boundaries therefore depend only on the document
order and --shard-tokens, and the output is byte-identical for any number of workers.

Resume: a shard counts as finished only once its .prepare/shard-NNNNN.json exists; that file is written (atomically)
after the .bin/.idx pair is complete (the writer renames .bin then .idx into place). It records the input position
after the shard's last document and the skipped-record tally up to that document. A rerun keeps the finished shards,
deletes anything after them (partial temporaries, a pair without its record), and restarts reading after that
position, so it produces exactly the bytes an uninterrupted run would have.
"""

from __future__ import annotations

import collections
import contextlib
import glob
import hashlib
import itertools
import json
import multiprocessing
import os
import re
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Iterator, Optional

import numpy as np

from data_prep.errors import PrepareError
from data_prep.records import REASONS, SKIP, Problems, record_text
from data_prep.sources import DatasetSource, FileSource, expand_inputs, file_size, iter_items, split_files
from megatron_mega.atomic_io import atomic_write_text, remove_stale_temporaries
from megatron_mega.data import indexed_dataset
from megatron_mega.data.manifest import MANIFEST_NAME, Manifest, ManifestError, ShardEntry, sha256_file
from megatron_mega.data.tokenizer import Tokenizer

STATE_DIR = ".prepare"
SETTINGS_FORMAT = "megatron_mega.prepare"
SHARD_NAME = re.compile(r"^shard-(\d{5,})\.(bin|idx)(\.tmp-\d+)?$")


@dataclass
class TokenizeOptions:
    output: str
    tokenizer: str
    inputs: list[str] = field(default_factory=list)
    hf_dataset: Optional[str] = None
    hf_split: str = "train"
    hf_config: Optional[str] = None
    hf_data_files: Optional[list[str]] = None
    text_key: str = "text"
    txt_unit: str = "file"
    shard_tokens: int = 1 << 28
    workers: int = 1
    num_jobs: int = 1
    job_index: int = 0
    strict: bool = False
    batch_docs: int = 256  # documents per task sent to a worker
    batch_bytes: int = 1 << 19
    progress: Optional[bool] = None  # None: a progress bar only on a terminal


@dataclass
class Summary:
    output: str
    documents: int
    tokens: int
    shards: int
    problems: Problems
    oversized: int  # documents longer than --shard-tokens (each alone in its shard)
    new_documents: int = 0  # tokenized by this invocation
    new_tokens: int = 0
    resumed_shards: int = 0  # finished shards found from an earlier run
    seconds: float = 0.0
    already_complete: bool = False

    def lines(self) -> list[str]:
        rate = self.new_tokens / self.seconds if self.seconds > 0 else 0.0
        out = [f"{self.output}: {self.documents:,} documents, {self.tokens:,} tokens in {self.shards} shard(s)"]
        if self.already_complete:
            out.append("  already complete (nothing to do)")
        else:
            if self.resumed_shards:
                out.append(f"  resumed: kept {self.resumed_shards} finished shard(s) from an earlier run")
            out.append(f"  this run: {self.new_documents:,} documents, {self.new_tokens:,} tokens in "
                       f"{self.seconds:.1f} s ({rate:,.0f} tokens/s)")
        if self.oversized:
            out.append(f"  {self.oversized} document(s) longer than --shard-tokens, each in a shard of its own")
        if self.problems:
            out.append(f"  skipped {self.problems.total:,} record(s):")
            out.extend(self.problems.report())
        else:
            out.append("  skipped: none")
        return out


# ---- settings and state -----------------------------------------------------------------------------------------


def _build_sources(opts: TokenizeOptions) -> tuple[list, dict[str, Any]]:
    """(this job's sources, the settings that identify them)."""
    if opts.num_jobs < 1 or not 0 <= opts.job_index < opts.num_jobs:
        raise PrepareError(f"--job-index {opts.job_index} must be in [0, --num-jobs {opts.num_jobs})")
    if opts.txt_unit not in ("file", "line", "paragraph"):
        raise PrepareError(f"--txt-unit {opts.txt_unit!r}: choose file, line or paragraph")
    if opts.hf_dataset:
        if opts.inputs:
            raise PrepareError("give either input paths or --hf-dataset, not both")
        whole = DatasetSource(opts.hf_dataset, split=opts.hf_split, config=opts.hf_config,
                              data_files=opts.hf_data_files, text_key=opts.text_key)
        rows = len(whole)
        start, stop = opts.job_index * rows // opts.num_jobs, (opts.job_index + 1) * rows // opts.num_jobs
        source = DatasetSource(opts.hf_dataset, split=opts.hf_split, config=opts.hf_config,
                               data_files=opts.hf_data_files, text_key=opts.text_key, start=start, stop=stop,
                               _dataset=whole.load())
        return [source], {"dataset": {"path": os.path.abspath(opts.hf_dataset) if os.path.exists(opts.hf_dataset)
                                      else opts.hf_dataset, "split": opts.hf_split, "config": opts.hf_config,
                                      "data_files": opts.hf_data_files, "rows": rows}, "part": [start, stop]}
    if not opts.inputs:
        raise PrepareError("no inputs: give files, folders or globs, or --hf-dataset")
    paths = expand_inputs(opts.inputs)
    if not any(os.path.exists(p) for p in paths):
        raise PrepareError(f"no input file found in {' '.join(opts.inputs)}")
    sizes = [file_size(p) for p in paths]
    chosen = split_files(paths, sizes, opts.num_jobs, opts.job_index)
    sources = [FileSource(paths[j], text_key=opts.text_key, txt_unit=opts.txt_unit) for j in chosen]
    return sources, {"files": [[p, s] for p, s in zip(paths, sizes)], "part": chosen}


def part_folder(output: str, job_index: int, num_jobs: int) -> str:
    return os.path.join(output, f"part-{job_index:05d}-of-{num_jobs:05d}")


def _settings(opts: TokenizeOptions, tokenizer: Tokenizer, inputs: dict[str, Any]) -> dict[str, Any]:
    return {"format": SETTINGS_FORMAT, "version": 1, "tokenizer_sha256": tokenizer.sha256,
            "vocab_size": tokenizer.vocab_size,
            "dtype": str(indexed_dataset.token_dtype_for_vocab(tokenizer.vocab_size)),
            "text_key": opts.text_key, "txt_unit": opts.txt_unit, "shard_tokens": opts.shard_tokens,
            "num_jobs": opts.num_jobs, "job_index": opts.job_index, **inputs}


def read_json(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise PrepareError(f"{path}: unreadable ({err}); delete the output folder to start over") from None


def _check_existing(out: str, settings: dict[str, Any], tokenizer: Tokenizer, tokenizer_path: str) -> bool:
    """Refuse an output folder made with another tokenizer or other settings. True if it is already complete."""
    state = os.path.join(out, STATE_DIR, "settings.json")
    manifest_path = os.path.join(out, MANIFEST_NAME)
    if os.path.exists(manifest_path):
        Manifest.load(manifest_path).check_tokenizer(tokenizer.sha256, f"the tokenizer given ({tokenizer_path})")
    if not os.path.exists(state):
        names = os.listdir(out) if os.path.isdir(out) else []
        leftovers = [n for n in names if SHARD_NAME.match(n) or n == MANIFEST_NAME]
        if leftovers:
            raise PrepareError(f"{out}: holds {leftovers[0]} but no {STATE_DIR}/settings.json; "
                               f"not an output of `prepare tokenize` (use an empty folder)")
        return False
    previous = read_json(state)
    if previous.get("tokenizer_sha256") != tokenizer.sha256:
        raise PrepareError(
            f"{out}: prepared with tokenizer sha256 {str(previous.get('tokenizer_sha256'))[:12]}…, but the tokenizer "
            f"given ({tokenizer_path}) has sha256 {tokenizer.sha256[:12]}…; use the matching tokenizer or a new "
            f"output folder")
    if previous != settings:
        changed = sorted(k for k in set(previous) | set(settings) if previous.get(k) != settings.get(k))
        detail = ""
        if "files" in changed:
            old, new = dict(map(tuple, previous.get("files", []))), dict(map(tuple, settings.get("files", [])))
            diffs = [p for p in sorted(set(old) | set(new)) if old.get(p) != new.get(p)]
            if diffs:
                detail = f" (e.g. {diffs[0]}: {old.get(diffs[0], 'absent')} -> {new.get(diffs[0], 'absent')} bytes)"
        raise PrepareError(f"{out}: an earlier run used other settings ({', '.join(changed)} differ{detail}); "
                           f"rerun with the same ones to resume, or delete the folder to start over")
    return os.path.exists(manifest_path)


@dataclass
class _Resume:
    shards: list[dict[str, Any]]
    cursor: Optional[tuple[int, int]]
    problems: Problems
    oversized: int


def _load_finished(out: str) -> _Resume:
    """The finished shards (a contiguous run from shard 0), after deleting everything past them."""
    state_dir = os.path.join(out, STATE_DIR)
    shards: list[dict[str, Any]] = []
    while True:
        path = os.path.join(state_dir, f"shard-{len(shards):05d}.json")
        if not os.path.exists(path):
            break
        record = read_json(path)
        prefix = os.path.join(out, record["shard"]["prefix"])
        if (os.path.exists(f"{prefix}.bin") and os.path.exists(f"{prefix}.idx")
                and os.path.getsize(f"{prefix}.bin") == record["bin_bytes"]
                and os.path.getsize(f"{prefix}.idx") == record["idx_bytes"]):
            shards.append(record)
        else:
            break
    keep = len(shards)
    for directory in (out, state_dir):  # the atomic writes of a killed run (a record, the manifest) left halfway
        remove_stale_temporaries(directory)
    for name in os.listdir(out):
        match = SHARD_NAME.match(name)
        if match and (match.group(3) or int(match.group(1)) >= keep):
            os.remove(os.path.join(out, name))
    for path in glob.glob(os.path.join(state_dir, "shard-*.json")):
        number = re.search(r"shard-(\d+)\.json$", path)
        if number and int(number.group(1)) >= keep:
            os.remove(path)
    if not shards:
        return _Resume([], None, Problems(), 0)
    last = shards[-1]
    return _Resume(shards, tuple(last["cursor"]), Problems.from_dict(last["problems"]), last["oversized"])


# ---- workers ----------------------------------------------------------------------------------------------------

# Per worker process: set once by the pool initializer (a process-local cache, never shared or mutated afterwards).
_WORKER: dict[str, Any] = {}


def _init_worker(tokenizer: Tokenizer, text_key: str, dtype: str) -> None:
    _WORKER.update(tokenizer=tokenizer, text_key=text_key, dtype=np.dtype(dtype))


def _worker_batch(batch: list) -> tuple[list, np.ndarray, np.ndarray]:
    return tokenize_batch(batch, _WORKER["tokenizer"], _WORKER["text_key"], _WORKER["dtype"])


def tokenize_batch(batch: list, tokenizer: Tokenizer, text_key: str, dtype: np.dtype
                   ) -> tuple[list, np.ndarray, np.ndarray]:
    """Check and tokenize one batch of raw items. Returns (outcomes, document lengths, all tokens back to back):
    outcomes[i] = (source, number, None, "", 0) for a document (EOD appended) or (source, number, reason, detail,
    count) for a skipped record; documents' tokens are in `tokens`, in order, split by `lengths`."""
    outcomes, texts = [], []
    for source, number, kind, payload in batch:
        text, reason, detail = record_text(kind, payload, text_key)
        if text is None:
            outcomes.append((source, number, reason, detail, payload[2] if kind == SKIP else 1))
        else:
            outcomes.append((source, number, None, "", 0))
            texts.append(text)
    ids = tokenizer.encode_batch(texts, add_eos=True) if texts else []
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    tokens = np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=int(lengths.sum()))
    return outcomes, lengths, tokens


def _batches(items: Iterable, max_docs: int, max_bytes: int) -> Iterator[list]:
    batch, size = [], 0
    for item in items:
        batch.append(item)
        payload = item[3]
        size += len(payload) if isinstance(payload, (bytes, str)) else 256
        if len(batch) >= max_docs or size >= max_bytes:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _pool(opts: TokenizeOptions, tokenizer: Tokenizer, dtype: np.dtype):
    """A worker pool (None for one worker: everything runs in this process, through the same function)."""
    if opts.workers <= 1:
        return contextlib.nullcontext(None)
    methods = multiprocessing.get_all_start_methods()
    # fork: workers start at once without re-importing torch; made before the progress bar's thread exists
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    return context.Pool(opts.workers, initializer=_init_worker, initargs=(tokenizer, opts.text_key, str(dtype)))


def _results(batches: Iterator[list], pool, tokenizer: Tokenizer, text_key: str, dtype: np.dtype,
             in_flight: int) -> Iterator:
    """Tokenized batches in submission order; with a pool, at most `in_flight` batches queued (flat memory)."""
    if pool is None:
        for batch in batches:
            yield tokenize_batch(batch, tokenizer, text_key, dtype)
        return
    pending: collections.deque = collections.deque()
    for batch in batches:
        pending.append(pool.apply_async(_worker_batch, (batch,)))
        if len(pending) >= in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


# ---- the shard writer -------------------------------------------------------------------------------------------


def documents_that_fit(ends: np.ndarray, start: int, shard_tokens: int, in_shard: int) -> int:
    """The end (exclusive) of the run of documents from `start` that the shard being written takes, by the rule
    every shard is cut by: a document that would take a shard holding `in_shard` tokens past `shard_tokens` starts
    the next one, and an oversized document sits alone in a fresh shard. `ends`: the documents' cumulative lengths.
    (The caller has already started a new shard when document `start` does not fit the current one.)"""
    before = int(ends[start - 1]) if start else 0
    return max(start + 1, int(np.searchsorted(ends, before + shard_tokens - in_shard, side="right")))


class ShardCutter:
    """Appends documents in order; closes a shard when the next document would take it past `shard_tokens`."""

    def __init__(self, out: str, dtype: np.dtype, shard_tokens: int, resume: _Resume):
        self.out, self.dtype, self.shard_tokens = out, np.dtype(dtype), shard_tokens
        self.finished = list(resume.shards)
        self.problems = resume.problems  # skipped records up to the last document written
        self.pending = Problems()  # skipped records after it (they belong to the next shard's tally)
        self.oversized = resume.oversized
        self.cursor = resume.cursor
        self.writer: Optional[indexed_dataset.IndexedDatasetWriter] = None
        self.digest = hashlib.sha256()
        self.new_documents = self.new_tokens = 0  # written by this process

    def skip(self, reason: str, where: str, detail: str, count: int) -> None:
        self.pending.add(reason, where, detail, count)

    def add_run(self, tokens: np.ndarray, lengths: np.ndarray, positions: list[tuple[int, int]]) -> None:
        """Documents with no skipped record between them: `tokens` back to back, `lengths` theirs, `positions`
        their (source, record). Cut by documents_that_fit, a shard's share at a time: one binary search, one
        write and one hash update per share instead of per document."""
        ends = np.cumsum(lengths)
        start, count = 0, len(lengths)
        while start < count:
            before = int(ends[start - 1]) if start else 0
            if self.writer is not None and self.writer.num_tokens + int(lengths[start]) > self.shard_tokens:
                self._close()
            if self.pending:  # records skipped before this document count in the shard that holds it
                self.problems.merge(self.pending)
                self.pending = Problems()
            if self.writer is None:
                prefix = os.path.join(self.out, f"shard-{len(self.finished):05d}")
                self.writer = indexed_dataset.IndexedDatasetWriter(prefix, self.dtype)
                self.digest = hashlib.sha256()
            stop = documents_that_fit(ends, start, self.shard_tokens, self.writer.num_tokens)
            share = np.ascontiguousarray(tokens[before:int(ends[stop - 1])], dtype=self.dtype)
            self.writer.add_documents(share, lengths[start:stop])
            self.digest.update(memoryview(share).cast("B"))
            self.oversized += int((lengths[start:stop] > self.shard_tokens).sum())
            self.cursor = positions[stop - 1]
            start = stop

    def _close(self) -> None:
        writer, self.writer = self.writer, None
        writer.finalize()
        name = os.path.basename(writer.prefix)
        entry = ShardEntry(prefix=name, documents=writer.num_documents, tokens=writer.num_tokens,
                           bin_sha256=self.digest.hexdigest(), idx_sha256=sha256_file(f"{writer.prefix}.idx"))
        record = {"shard": asdict(entry), "bin_bytes": os.path.getsize(f"{writer.prefix}.bin"),
                  "idx_bytes": os.path.getsize(f"{writer.prefix}.idx"), "cursor": list(self.cursor),
                  "problems": self.problems.to_dict(), "oversized": self.oversized}
        atomic_write_text(os.path.join(self.out, STATE_DIR, f"{name}.json"), json.dumps(record, indent=1) + "\n")
        self.finished.append(record)

    def finish(self) -> Problems:
        """Close the last shard; the returned tally includes skipped records after the last document."""
        if self.writer is not None:
            self._close()
        total = self.problems.copy()
        total.merge(self.pending)
        return total

    def abort(self) -> None:
        if self.writer is not None:
            self.writer.abort()
            self.writer = None


# ---- the command ------------------------------------------------------------------------------------------------


def tokenize_corpus(opts: TokenizeOptions) -> Summary:
    """Tokenize (or resume tokenizing) into `opts.output` (or its part folder). Raises PrepareError/ManifestError."""
    from filelock import FileLock, Timeout

    if opts.shard_tokens < 1:
        raise PrepareError(f"--shard-tokens {opts.shard_tokens} must be positive")
    if opts.workers < 1:
        raise PrepareError(f"--workers {opts.workers} must be at least 1")
    tokenizer = Tokenizer.load(opts.tokenizer)
    dtype = indexed_dataset.token_dtype_for_vocab(tokenizer.vocab_size)
    sources, inputs = _build_sources(opts)
    settings = _settings(opts, tokenizer, inputs)
    out = part_folder(opts.output, opts.job_index, opts.num_jobs) if opts.num_jobs > 1 else opts.output
    os.makedirs(os.path.join(out, STATE_DIR), exist_ok=True)
    lock = FileLock(os.path.join(out, STATE_DIR, "lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        raise PrepareError(f"{out}: another process is writing this folder (lock {lock.lock_file})") from None
    try:
        complete = _check_existing(out, settings, tokenizer, opts.tokenizer)
        if complete:
            return _summary_of_complete(out)
        return _run(opts, out, sources, settings, tokenizer, dtype)
    finally:
        lock.release()


def _write(results: Iterator, sources: list, cutter: ShardCutter, strict: bool, bar) -> Problems:
    """Feed tokenized batches to the shard cutter in order; returns the skipped-record tally."""
    for outcomes, lengths, tokens in results:
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        document, first, positions = 0, 0, []  # the run of documents since the last skipped record

        def flush() -> None:
            if positions:
                cutter.add_run(tokens[offsets[first]:offsets[document]], lengths[first:document], positions)

        for source, number, reason, detail, count in outcomes:
            if reason is not None:
                flush()  # the documents before it are written first, as shards closed before a --strict stop
                first, positions = document, []
                where = sources[source].location(number)
                if strict:
                    raise PrepareError(f"{where}: {REASONS.get(reason, reason)}: {detail} "
                                       f"(--strict; without it such records are skipped and counted)")
                cutter.skip(reason, where, detail, count)
                continue
            positions.append((source, number))
            document += 1
        flush()
        cutter.new_documents += len(lengths)
        cutter.new_tokens += int(offsets[-1])
        bar.update(len(lengths))
        bar.set_postfix_str(f"{cutter.new_tokens:,} tokens", refresh=False)
    return cutter.finish()


def _summary_of_complete(out: str) -> Summary:
    manifest = Manifest.load(out)
    manifest.verify(checksums=False)
    summary = read_json(os.path.join(out, STATE_DIR, "summary.json"))
    return Summary(out, manifest.documents, manifest.tokens, len(manifest.shards),
                   Problems.from_dict(summary["problems"]), summary["oversized"], already_complete=True)


def _run(opts: TokenizeOptions, out: str, sources: list, settings: dict[str, Any], tokenizer: Tokenizer,
         dtype: np.dtype) -> Summary:
    from tqdm import tqdm

    atomic_write_text(os.path.join(out, STATE_DIR, "settings.json"), json.dumps(settings, indent=1) + "\n")
    if not os.path.exists(os.path.join(out, "tokenizer.model")) or Tokenizer.load(out).sha256 != tokenizer.sha256:
        tokenizer.save(out)
    resume = _load_finished(out)
    cutter = ShardCutter(out, dtype, opts.shard_tokens, resume)
    started = time.perf_counter()
    with _pool(opts, tokenizer, dtype) as pool:
        bar = tqdm(desc=f"tokenizing {os.path.basename(os.path.abspath(out))}", unit=" docs", unit_scale=True,
                   disable=(not opts.progress) if opts.progress is not None else None)
        try:
            batches = _batches(iter_items(sources, after=resume.cursor), opts.batch_docs, opts.batch_bytes)
            results = _results(batches, pool, tokenizer, opts.text_key, dtype, in_flight=3 * opts.workers)
            problems = _write(results, sources, cutter, opts.strict, bar)
        except BaseException:
            cutter.abort()
            raise
        finally:
            bar.close()
    seconds = time.perf_counter() - started
    manifest = Manifest(tokenizer=tokenizer.info(), dtype=str(dtype),
                        shards=[ShardEntry(**record["shard"]) for record in cutter.finished],
                        skipped=dict(problems.counts), sources=[source.name for source in sources], root=out)
    atomic_write_text(os.path.join(out, STATE_DIR, "summary.json"), json.dumps(
        {"documents": manifest.documents, "tokens": manifest.tokens, "shards": len(manifest.shards),
         "oversized": cutter.oversized, "problems": problems.to_dict()}, indent=1) + "\n")
    manifest.save(out)
    try:
        Manifest.load(out).verify(checksums=False)
    except ManifestError as err:  # cannot happen unless the disk lies; never leave a manifest that fails
        os.remove(os.path.join(out, MANIFEST_NAME))
        raise PrepareError(f"{out}: the output failed verification: {err}") from None
    return Summary(out, manifest.documents, manifest.tokens, len(manifest.shards), problems, cutter.oversized,
                   new_documents=cutter.new_documents, new_tokens=cutter.new_tokens, resumed_shards=len(resume.shards),
                   seconds=seconds)
