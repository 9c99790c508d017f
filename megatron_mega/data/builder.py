"""From a DataConfig to train/valid/test datasets: open and check the sources, split, blend, apply the objective.

    splits = build_datasets(config, {"train": iters * global_batch, "valid": ..., "test": ...},
                            tokenizer_sha256=Tokenizer.load(tokenizer_dir).sha256)
    splits.train[i]   # causal: {"tokens": int64[seq_len + 1]}; mlm: {"input_ids", "labels": int64[seq_len]}
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Mapping, Optional

from megatron_mega.data import indexed_dataset, open_files
from megatron_mega.data.blended import BlendedDataset, load_blending_indices, samples_per_dataset
from megatron_mega.data.config import SPLIT_NAMES, DataConfig, DataConfigError
from megatron_mega.data.documents import DocumentSource, is_manifest_path
from megatron_mega.data.gpt_dataset import GPTDataset, split_document_ranges
from megatron_mega.data.index_cache import IndexCache
from megatron_mega.data.manifest import Manifest, ManifestError, TokenizerInfo
from megatron_mega.data.mlm import MLMDataset, special_tokens_from

logger = logging.getLogger(__name__)


@dataclass
class DatasetSplits:
    train: Optional[object]
    valid: Optional[object]
    test: Optional[object]
    tokenizer: Optional[TokenizerInfo]  # from the manifests (None when every path is a bare prefix)

    def __getitem__(self, split: str):
        return getattr(self, split)


def default_cache_dir(config: DataConfig) -> str:
    first = config.paths[0]
    folder = first if os.path.isdir(first) else os.path.dirname(os.path.abspath(first))
    return os.path.join(folder, "index-cache")


def open_sources(config: DataConfig, tokenizer_sha256: Optional[str],
                 cache: Optional[IndexCache] = None) -> tuple[list[DocumentSource], Optional[TokenizerInfo]]:
    """Open every path; manifests made with another tokenizer than training's (or than each other) are refused
    before any shard is read. With `cache`, a bare prefix's identity is hashed once there for every process."""
    tokenizer: Optional[TokenizerInfo] = None
    first_path = None
    for path in config.paths:
        if not is_manifest_path(path):
            if indexed_dataset.exists(path):  # a missing path is DocumentSource's one error below
                logger.warning("%s: a bare prefix has no manifest, so its tokenizer cannot be checked", path)
            continue
        manifest = Manifest.load(path)
        if tokenizer_sha256 is not None:
            manifest.check_tokenizer(tokenizer_sha256, what="the tokenizer given to training")
        if tokenizer is None:
            tokenizer, first_path = manifest.tokenizer, path
        elif manifest.tokenizer.sha256 != tokenizer.sha256:
            raise ManifestError(f"{path}: prepared with tokenizer sha256 {manifest.tokenizer.sha256[:12]}… but "
                                f"{first_path} with {tokenizer.sha256[:12]}…; a blend needs one tokenizer")
    sources = [DocumentSource(path, verify_checksums=config.verify_checksums) for path in config.paths]
    if cache is not None:
        for source in sources:  # opened, so checked: a damaged file is refused before anything is recorded
            source.identity_from(cache)
    return sources, tokenizer


def checksum_problems(config: DataConfig, rank: int = 0, world_size: int = 1) -> list[str]:
    """Hash this process's share of the shards of every manifest in `config.paths` against the sha256 their
    manifests record, and return what does not match (messages naming the file).

    The shards of all the paths are dealt round-robin over `world_size` processes, so a training job reads its
    corpus once in all rather than once per process (1 TB on 512 ranks would be half a petabyte of reads from the
    shared filesystem); the caller gathers the problems so every rank stops together. Bare prefixes have no
    recorded checksums and are skipped."""
    shards = [(manifest, shard) for manifest in (Manifest.load(p) for p in config.paths if is_manifest_path(p))
              for shard in manifest.shards]
    return [problem for manifest, shard in shards[rank::world_size]
            if (problem := manifest.checksum_problem(shard)) is not None]


def check_objective(config: DataConfig, tokenizer: Optional[TokenizerInfo]) -> None:
    """MLM masks with the tokenizer's special ids, which only a manifest records."""
    if config.objective == "mlm":
        if tokenizer is None:
            raise DataConfigError("objective: 'mlm' needs the tokenizer's special ids, so at least one path must be "
                                  "a manifest")
        if tokenizer.mask_id is None:
            raise DataConfigError(f"objective: 'mlm' needs a mask token, and the tokenizer of {config.paths[0]} has "
                                  f"none (mask_id is null in its manifest)")


def build_datasets(config: DataConfig, num_samples: Mapping[str, int],
                   tokenizer_sha256: Optional[str]) -> DatasetSplits:
    """Datasets for each split with num_samples[split] > 0 and a non-zero share in `config.split` (else None).

    tokenizer_sha256: sha256 of the tokenizer training uses; a manifest recording another is refused. Pass None only
    to skip the check deliberately (tools that read data without a tokenizer).
    """
    unknown = sorted(set(num_samples) - set(SPLIT_NAMES))
    if unknown:
        raise ValueError(f"num_samples: unknown split(s) {unknown}; expected some of {SPLIT_NAMES}")
    cache = IndexCache(config.cache_dir or default_cache_dir(config))
    sources, tokenizer = open_sources(config, tokenizer_sha256, cache)
    check_objective(config, tokenizer)
    ranges = [split_document_ranges(s.num_documents, config.split_fractions) for s in sources]
    built = {}
    for split_id, split in enumerate(SPLIT_NAMES):
        wanted = int(num_samples.get(split, 0))
        if wanted <= 0 or config.split_fractions[split_id] == 0:
            built[split] = None
            continue
        dataset = _build_split(config, sources, [r[split_id] for r in ranges], wanted, cache, split)
        if config.objective == "mlm":
            dataset = MLMDataset(dataset, config.mlm, special_tokens_from(tokenizer), tokenizer.vocab_size,
                                 config.seed, config.seq_len, split)
        built[split] = dataset
    return DatasetSplits(tokenizer=tokenizer, **built)


def _build_split(config: DataConfig, sources: list[DocumentSource], documents: list[range], wanted: int,
                 cache: IndexCache, split: str):
    def component(i: int, count: int) -> GPTDataset:
        return GPTDataset(sources[i], documents[i], config.seq_len, count, config.seed, cache, split)

    if len(sources) == 1:
        return component(0, wanted)
    if config.weights is not None:
        weights = config.weights
    else:  # the natural mixture: each dataset in proportion to the tokens its split holds
        weights = [float(s.token_count(r.start, r.stop)) for s, r in zip(sources, documents)]
        if sum(weights) == 0:
            raise ValueError(f"{split}: the split holds no tokens in any dataset")
    indices = load_blending_indices(cache, weights, wanted)
    counts = samples_per_dataset(indices, len(sources))
    open_files.make_room_for_maps(3 * sum(1 for c in counts if c), f"data.paths ({split} split of "
                                                                    f"{len(sources)} datasets)")
    return BlendedDataset([component(i, c) if c else None for i, c in enumerate(counts)], indices)

