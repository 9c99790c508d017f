"""Merge the part folders of a split run (`prepare tokenize --num-jobs K --job-index i`) into one dataset.

Jobs take contiguous blocks of the inputs in document order (files, or rows of a dataset), so the parts, read in job
order, hold the documents of a single-process run in the same order. The merge writes OUTPUT/manifest.json:

- default: the manifest lists the parts' shards where they are (`part-00000-of-00004/shard-00000`, ...); nothing is
  copied. Same documents, same tokens, same order as a single run; only the shard boundaries differ (each part starts
  a new shard).
- `--reshard`: the documents are rewritten into OUTPUT/shard-NNNNN cut by the same --shard-tokens rule as a single run,
  so shards and manifest.json are byte-identical to a single-process run (the parts can then be deleted).

Either way the merged manifest is verified (counts, sizes and sha256 of every shard) before the command succeeds.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass

import numpy as np

from data_prep.errors import PrepareError
from data_prep.records import Problems
from data_prep.tokenize import STATE_DIR, documents_that_fit, read_json
from megatron_mega.atomic_io import atomic_write_text
from megatron_mega.data import indexed_dataset
from megatron_mega.data.manifest import MANIFEST_NAME, Manifest, ManifestError, ShardEntry, sha256_file
from megatron_mega.data.tokenizer import Tokenizer

PART = re.compile(r"^part-(\d{5,})-of-(\d{5,})$")
PER_JOB = ("job_index", "part")  # settings that legitimately differ between parts


@dataclass
class MergeSummary:
    output: str
    parts: int
    documents: int
    tokens: int
    shards: int
    problems: Problems
    resharded: bool

    def lines(self) -> list[str]:
        how = "rewritten into single-run shards" if self.resharded else "shards left in the part folders"
        out = [f"{self.output}: merged {self.parts} part(s): {self.documents:,} documents, {self.tokens:,} tokens, "
               f"{self.shards} shard(s) ({how}); manifest verified"]
        if self.problems:
            out.append(f"  skipped {self.problems.total:,} record(s):")
            out.extend(self.problems.report())
        return out


def find_parts(output: str) -> list[str]:
    """The part folders of `output`, in job order; all K of them must be there and finished."""
    if not os.path.isdir(output):
        raise PrepareError(f"{output}: no such folder")
    found: dict[int, str] = {}
    totals = set()
    for name in sorted(os.listdir(output)):
        match = PART.match(name)
        if match and os.path.isdir(os.path.join(output, name)):
            found[int(match.group(1))] = os.path.join(output, name)
            totals.add(int(match.group(2)))
    if not found:
        raise PrepareError(f"{output}: no part-NNNNN-of-KKKKK folders (run `prepare tokenize --num-jobs K` first)")
    if len(totals) != 1:
        raise PrepareError(f"{output}: parts of different splits ({sorted(totals)} jobs); keep one split only")
    total = totals.pop()
    missing = [i for i in range(total) if i not in found]
    if missing:
        raise PrepareError(f"{output}: part(s) {missing} of {total} are missing; run those jobs (--job-index)")
    unfinished = [i for i in range(total) if not os.path.exists(os.path.join(found[i], MANIFEST_NAME))]
    if unfinished:
        raise PrepareError(f"{output}: part(s) {unfinished} of {total} are not finished (no manifest.json); "
                           f"rerun those jobs: they resume where they stopped")
    return [found[i] for i in range(total)]


def merge_parts(output: str, reshard: bool = False, checksums: bool = True) -> MergeSummary:
    parts = find_parts(output)
    # one part's settings at a time: each holds the whole input list (50k files make ~5 MB of it, a part)
    common = {k: v for k, v in read_json(os.path.join(parts[0], STATE_DIR, "settings.json")).items()
              if k not in PER_JOB}
    for path in parts[1:]:
        other = {k: v for k, v in read_json(os.path.join(path, STATE_DIR, "settings.json")).items()
                 if k not in PER_JOB}
        if other != common:
            changed = sorted(k for k in set(other) | set(common) if other.get(k) != common.get(k))
            raise PrepareError(f"{path}: made with other settings than {parts[0]} ({', '.join(changed)} differ)")
    manifests = [Manifest.load(p) for p in parts]
    summaries = [read_json(os.path.join(p, STATE_DIR, "summary.json")) for p in parts]
    problems = Problems.combined(Problems.from_dict(s["problems"]) for s in summaries)
    sources: list[str] = []
    for manifest in manifests:
        sources.extend(s for s in manifest.sources if s not in sources)
    tokenizer = Tokenizer.load(parts[0])
    if tokenizer.sha256 != manifests[0].tokenizer.sha256:
        raise PrepareError(f"{parts[0]}: tokenizer.model does not match its manifest")
    tokenizer.save(output)
    if reshard:
        shards, oversized = _reshard(manifests, output, common["shard_tokens"])
    else:
        shards = [ShardEntry(os.path.join(os.path.basename(p), s.prefix), s.documents, s.tokens, s.bin_sha256,
                             s.idx_sha256) for p, m in zip(parts, manifests) for s in m.shards]
        oversized = sum(s["oversized"] for s in summaries)
    merged = Manifest(tokenizer=manifests[0].tokenizer, dtype=manifests[0].dtype, shards=shards,
                      skipped=dict(problems.counts), sources=sources, root=output)
    atomic_write_text(os.path.join(output, STATE_DIR, "summary.json"), json.dumps(
        {"documents": merged.documents, "tokens": merged.tokens, "shards": len(shards), "oversized": oversized,
         "problems": problems.to_dict(), "parts": len(parts), "resharded": reshard}, indent=1) + "\n")
    merged.save(output)
    try:
        Manifest.load(output).verify(checksums=checksums)
    except ManifestError as err:
        os.remove(os.path.join(output, MANIFEST_NAME))
        raise PrepareError(f"{output}: the merged dataset failed verification: {err}") from None
    return MergeSummary(output, len(parts), merged.documents, merged.tokens, len(shards), problems, reshard)


def _copy_runs(dataset: indexed_dataset.IndexedDataset, shard_tokens: int, room_for, current) -> int:
    """Copy the documents of a shard whose documents are single sequences laid back to back, a run of whole
    documents at a time: each run is what fits in the current output shard by the rule `prepare tokenize` cuts
    by (documents_that_fit). Returns the number of oversized documents."""
    lengths = dataset.sequence_lengths.astype(np.int64)
    ends = np.cumsum(lengths)
    position, count = 0, len(lengths)
    while position < count:
        room_for(int(lengths[position]))
        writer, digest = current()
        stop = documents_that_fit(ends, position, shard_tokens, writer.num_tokens)
        tokens = dataset.tokens_between(position, stop)
        writer.add_documents(tokens, lengths[position:stop])
        digest.update(memoryview(np.ascontiguousarray(tokens)).cast("B"))
        position = stop
    return int((lengths > shard_tokens).sum())


def _reshard(manifests: list[Manifest], output: str, shard_tokens: int) -> tuple[list[ShardEntry], int]:
    """Rewrite every document, in order, into shards cut exactly as `prepare tokenize` cuts them."""
    dtype = np.dtype(manifests[0].dtype)
    os.makedirs(os.path.join(output, STATE_DIR), exist_ok=True)
    shards: list[ShardEntry] = []
    writer, digest, oversized = None, hashlib.sha256(), 0

    def close() -> None:
        writer.finalize()
        shards.append(ShardEntry(os.path.basename(writer.prefix), writer.num_documents, writer.num_tokens,
                                 digest.hexdigest(), sha256_file(f"{writer.prefix}.idx")))

    def room_for(length: int) -> None:
        """A writer with room for a document of `length` tokens (or an empty one, for an oversized document)."""
        nonlocal writer, digest
        if writer is not None and writer.num_tokens + length > shard_tokens:
            close()
            writer = None
        if writer is None:
            writer = indexed_dataset.IndexedDatasetWriter(os.path.join(output, f"shard-{len(shards):05d}"), dtype)
            digest = hashlib.sha256()

    try:
        for manifest in manifests:
            for shard in manifest.shards:
                prefix = manifest.shard_prefix(shard)
                try:
                    dataset = indexed_dataset.IndexedDataset(prefix)
                    # the whole index once: a damaged one is named here, not copied (the run copy trusts lengths)
                    dataset.check_layout()
                except indexed_dataset.IndexedDatasetError as err:
                    raise PrepareError(f"{err}") from None
                if dataset.dtype != dtype:
                    raise PrepareError(f"{prefix}.idx: tokens of dtype {dataset.dtype}, its manifest says {dtype}; "
                                       f"the part is damaged (re-run its job)")
                if dataset.one_sequence_documents() and dataset.is_contiguous():
                    oversized += _copy_runs(dataset, shard_tokens, room_for, lambda: (writer, digest))
                    continue
                for document in range(dataset.num_documents):  # Megatron files with several sequences a document
                    tokens = np.concatenate([dataset[i] for i in dataset.document_sequences(document)])
                    room_for(len(tokens))
                    oversized += len(tokens) > shard_tokens
                    writer.add_document(tokens)
                    digest.update(memoryview(np.ascontiguousarray(tokens, dtype=dtype)))
        if writer is not None:
            close()
            writer = None
    finally:
        if writer is not None:
            writer.abort()
    return shards, oversized
