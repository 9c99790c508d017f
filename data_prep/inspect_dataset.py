"""Look inside a prepared dataset: counts, document lengths, token histogram, decoded samples, checksums."""

from __future__ import annotations

import os
import random

import numpy as np

from data_prep.records import Problems
from data_prep.tokenize import STATE_DIR, read_json
from megatron_mega.data import indexed_dataset, open_files
from megatron_mega.data.manifest import Manifest
from megatron_mega.data.tokenizer import Tokenizer, TokenizerError


def inspect_dataset(path: str, samples: int = 3, verify: bool = True, max_tokens: int = 10_000_000,
                    sample_chars: int = 300, seed: int = 0, top: int = 10) -> list[str]:
    """Report lines; raises ManifestError if verification fails."""
    manifest = Manifest.load(path)
    lines = [f"{os.path.join(manifest.root, 'manifest.json')}"]
    if verify:
        manifest.verify(checksums=True)
        lines.append(f"  checksums: OK (sha256 of {2 * len(manifest.shards)} files match the manifest)")
    else:
        lines.append("  checksums: not verified (--no-verify)")
    info = manifest.tokenizer
    lines.append(f"  tokenizer: sha256 {info.sha256[:16]}…, vocab {info.vocab_size:,}, bos {info.bos_id}, "
                 f"pad {info.pad_id}, eos {info.eos_id}, unk {info.unk_id}, mask {info.mask_id}; "
                 f"dtype {manifest.dtype}")
    lines.append(f"  {manifest.documents:,} documents, {manifest.tokens:,} tokens, {len(manifest.shards)} shard(s)")
    if manifest.shards:
        sizes = [s.tokens for s in manifest.shards]
        lines.append(f"  tokens per shard: min {min(sizes):,}, max {max(sizes):,}")
    summary_path = os.path.join(manifest.root, STATE_DIR, "summary.json")
    problems = Problems.from_dict(read_json(summary_path)["problems"]) if os.path.exists(summary_path) else None
    if manifest.skipped:
        lines.append(f"  skipped {sum(manifest.skipped.values()):,} record(s):")
        lines.extend(problems.report() if problems else [f"    {k}: {v}" for k, v in sorted(manifest.skipped.items())])
    else:
        lines.append("  skipped: none")
    lines.append(f"  sources: {len(manifest.sources)} ({', '.join(manifest.sources[:3])}"
                 f"{', …' if len(manifest.sources) > 3 else ''})")
    if not manifest.shards:
        return lines

    open_files.make_room(len(manifest.shards), manifest.root)
    datasets = [indexed_dataset.IndexedDataset(manifest.shard_prefix(s)) for s in manifest.shards]
    for dataset in datasets:
        dataset.check_layout()  # also under --no-verify: it reads the index only, which the report reads anyway
    lengths = np.concatenate([_document_lengths(d) for d in datasets])
    q = np.percentile(lengths, [50, 90, 99])
    lines.append(f"  document length (tokens, EOD included): min {lengths.min():,}, median {q[0]:,.0f}, "
                 f"mean {lengths.mean():,.1f}, p90 {q[1]:,.0f}, p99 {q[2]:,.0f}, max {lengths.max():,}")

    tokenizer = None
    model = os.path.join(manifest.root, info.model_file or "tokenizer.model")
    try:
        tokenizer = Tokenizer.load(model) if os.path.exists(model) else None
    except TokenizerError:
        tokenizer = None
    if tokenizer is not None and tokenizer.sha256 != info.sha256:
        lines.append(f"  WARNING: {model} has sha256 {tokenizer.sha256[:12]}…, not the manifest's; not decoding")
        tokenizer = None

    counts, seen = np.zeros(info.vocab_size, dtype=np.int64), 0
    for shard, dataset in zip(manifest.shards, datasets):
        if seen >= max_tokens or not shard.tokens:
            continue
        take = min(shard.tokens, max_tokens - seen)
        data = np.memmap(indexed_dataset.data_path(manifest.shard_prefix(shard)), dtype=dataset.dtype, mode="r",
                         shape=(take,))
        counts += np.bincount(np.asarray(data, dtype=np.int64), minlength=info.vocab_size)[: info.vocab_size]
        seen += take
    scope = "all tokens" if seen >= manifest.tokens else f"the first {seen:,} tokens"
    lines.append(f"  token histogram over {scope}: {int((counts > 0).sum()):,} of {info.vocab_size:,} ids used; "
                 f"eos {counts[info.eos_id] / max(seen, 1):.2%}, unk {counts[info.unk_id] / max(seen, 1):.2%}"
                 + (f", byte pieces {_byte_share(counts, tokenizer, seen):.2%}" if tokenizer else ""))
    order = np.argsort(-counts, kind="stable")[:top]
    described = ", ".join(f"{_piece(tokenizer, int(i))} {counts[i] / max(seen, 1):.1%}" for i in order if counts[i])
    lines.append(f"  most frequent: {described}")

    if samples and tokenizer is not None:
        starts = np.cumsum([0] + [d.num_documents for d in datasets])
        rng = random.Random(seed)
        picks = [0] + sorted(rng.sample(range(1, manifest.documents), min(samples - 1, manifest.documents - 1)))
        for document in picks[:samples]:
            shard = int(np.searchsorted(starts, document, side="right")) - 1
            dataset = datasets[shard]
            local = document - int(starts[shard])
            tokens = np.concatenate([dataset[i] for i in dataset.document_sequences(local)])
            text = tokenizer.decode(tokens)
            shown = text if len(text) <= sample_chars else text[:sample_chars] + "…"
            lines.append(f"  document {document:,} ({manifest.shards[shard].prefix}, {len(tokens):,} tokens, "
                         f"ends with EOD: {bool(tokens[-1] == info.eos_id)}): {shown!r}")
    return lines


def _document_lengths(dataset: indexed_dataset.IndexedDataset) -> np.ndarray:
    cumulative = np.concatenate([[0], np.cumsum(dataset.sequence_lengths, dtype=np.int64)])
    return cumulative[dataset.document_indices[1:]] - cumulative[dataset.document_indices[:-1]]


def _piece(tokenizer, token_id: int) -> str:
    return repr(tokenizer.id_to_piece(token_id)) if tokenizer is not None else str(token_id)


def _byte_share(counts: np.ndarray, tokenizer: Tokenizer, seen: int) -> float:
    ids = [i for i in np.nonzero(counts)[0] if tokenizer.is_byte(int(i))]
    return float(counts[ids].sum()) / max(seen, 1)
