"""The checks a run makes before its first step that need neither DeepSpeed nor weights, for the trainer and for
`train --dry-run`: the tokenizer and datasets open and agree with the model, and the checkpoint the run would
start from exists and fits. A dry run on a login node then fails on a mistyped path or a changed model field, not
a job that waited in the queue. No index is built and no weight is read (`data.verify_checksums` is not hashed).
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Optional

from megatron_mega.training import checkpointing
from megatron_mega.training.config import TrainConfig, TrainConfigError

AS_SAVED, ZERO_0_ANY_DP, UNIVERSAL = "as saved", "ZeRO-0, any data-parallel size", "a universal checkpoint"


def check_tokenizer_fits_model(config: TrainConfig, tokenizer) -> None:
    """The data's tokenizer (a manifest's TokenizerInfo, or None for bare prefixes) must fit the model: its ids
    inside the vocabulary, and the special ids the converted config.json will name."""
    if tokenizer is None:
        return
    if tokenizer.vocab_size > config.model.vocab_size:
        raise TrainConfigError(f"model.vocab_size: {config.model.vocab_size} is smaller than the tokenizer's "
                               f"{tokenizer.vocab_size}")
    for ours, theirs in (("pad_token_id", "pad_id"), ("bos_token_id", "bos_id"), ("eos_token_id", "eos_id")):
        wanted, have = getattr(tokenizer, theirs), getattr(config.model, ours)
        if wanted is not None and wanted >= 0 and isinstance(have, int) and have != wanted:
            raise TrainConfigError(f"model.{ours}: {have}, but the data's tokenizer has {theirs} {wanted}; "
                                   f"set model.{ours}={wanted}")


def resume_source(config: TrainConfig) -> tuple[Optional[str], Optional[str]]:
    """(folder, tag) of the checkpoint a run resumes from, or (None, None) for a fresh start."""
    ck = config.checkpoint
    load_dir = ck.dir if ck.load == "auto" else ck.load
    tag = checkpointing.latest_tag(load_dir) if load_dir else None
    if tag is None:
        if ck.load not in (None, "auto"):
            raise TrainConfigError(f"checkpoint.load: {ck.load} holds no checkpoint ('latest' is missing)")
        return None, None
    return load_dir, tag


def resume_route(saved: dict[str, int], now: dict[str, int], universal: bool, where: str) -> str:
    """How a checkpoint saved under layout `saved` resumes under `now` (pipeline_stages, data_parallel_size,
    zero_stage): AS_SAVED, ZERO_0_ANY_DP (ZeRO-0 state is whole in every rank's file) or UNIVERSAL (through a
    DeepSpeed universal checkpoint, converted without the user doing anything)."""
    if (saved["pipeline_stages"] > 1) != (now["pipeline_stages"] > 1):
        raise TrainConfigError(
            f"parallel.pipeline_stages: {where} was saved with {saved['pipeline_stages']} pipeline stage(s); "
            f"resuming a pipeline checkpoint without a pipeline (or the reverse) is not supported")
    if saved["zero_stage"] == 0 or now["zero_stage"] == 0:
        if saved["zero_stage"] != now["zero_stage"] or universal:
            # DeepSpeed's universal checkpoint is made from ZeRO's optimizer partitions, which ZeRO-0 has not
            raise TrainConfigError(
                f"parallel.zero_stage: {where} was saved with ZeRO-{saved['zero_stage']}, this run uses "
                f"ZeRO-{now['zero_stage']}; a ZeRO-0 checkpoint resumes only under ZeRO-0 (any data-parallel "
                f"size). Start a new run from its weights with checkpoint.init_from_checkpoint")
        return AS_SAVED if saved == now else ZERO_0_ANY_DP
    return UNIVERSAL if universal or saved != now else AS_SAVED


def data_tokenizer_sha256(tokenizer) -> Optional[str]:
    """The tokenizer a run records in its checkpoints and compares on resume: the manifests' (None when every path
    is a bare prefix, whatever `tokenizer` the config names: nothing ties a bare prefix to it)."""
    return tokenizer.sha256 if tokenizer is not None else None


def check_resumable(saved: dict, config: TrainConfig, tokenizer_sha256: Optional[str], where: str) -> None:
    """A saved trainer state the run can resume: the model it saved, data of its tokenizer, and steps to train
    (0 steps means a fresh run's step-0 checkpoint)."""
    if config.optim.train_steps == 0 and saved.get("step") != 0:
        raise TrainConfigError(
            f"optim.train_steps: 0 writes the initial weights of a fresh run as a step-0 checkpoint, but {where} "
            f"holds a checkpoint of step {saved.get('step')} to resume from (use a new checkpoint.dir or "
            f"checkpoint.load=null)")
    check_same_architecture(saved, config, where)
    check_same_tokenizer(saved, tokenizer_sha256, where)


def check_same_architecture(saved: dict, config: TrainConfig, where: str) -> None:
    """A run resumes with the architecture it was saved with: a changed model field is one error naming it, not
    DeepSpeed's size-mismatch traceback from deep inside the load (or a silent change, for fields that keep the
    shapes, such as the attention's activation)."""
    from megatron_mega.convert.hf_import import architecture_differences
    from megatron_mega.model.config import ConfigError, MegaConfig

    model = (saved.get("config") or {}).get("model")
    try:  # the saved section lists the fields that differ from MegaConfig's defaults
        theirs = MegaConfig.from_dict(model) if isinstance(model, dict) else None
    except (ConfigError, TypeError):
        theirs = None
    if theirs is None:
        return
    changed = [f"model.{name}: {here!r} here, {there!r} in the checkpoint"
               for name, there, here in architecture_differences(theirs, config.model)]
    if changed:
        raise TrainConfigError(f"{'; '.join(changed)} ({where}); a run resumes with the model it saved: use "
                               f"another checkpoint.dir, or checkpoint.load=null to start afresh")


def check_same_tokenizer(saved: dict, tokenizer_sha256: Optional[str], where: str) -> None:
    saved_sha = saved.get("tokenizer_sha256")
    if saved_sha and tokenizer_sha256 and saved_sha != tokenizer_sha256:
        raise TrainConfigError(f"data.paths: {where} was trained on data tokenized with tokenizer sha256 "
                               f"{saved_sha[:12]}…, the configured data uses {tokenizer_sha256[:12]}…")


def layout_of(config: TrainConfig, world_size: int) -> dict[str, int]:
    layout = config.layout(world_size)
    return {"pipeline_stages": layout.pipeline_stages, "data_parallel_size": layout.data_parallel_size,
            "zero_stage": config.parallel.zero_stage}


# ---- what --dry-run reports ------------------------------------------------------------------------------------

def describe_data(config: TrainConfig, world_size: int) -> tuple[list[str], Optional[str]]:
    """(report lines, the data's tokenizer sha256) after opening the tokenizer and every dataset and checking them
    as a run does; each split's samples against the tokens it holds."""
    from megatron_mega.data.blended import normalize_weights
    from megatron_mega.data.builder import check_objective, open_sources
    from megatron_mega.data.config import SPLIT_NAMES
    from megatron_mega.data.gpt_dataset import split_document_ranges
    from megatron_mega.data.tokenizer import Tokenizer
    from megatron_mega.training.trainer import samples_wanted

    data = config.data
    lines = []
    given = None
    if config.tokenizer:
        tokenizer = Tokenizer.load(config.tokenizer)
        given = tokenizer.sha256
        lines.append(f"tokenizer: {config.tokenizer} (sha256 {given[:12]}…, {tokenizer.vocab_size:,} tokens)")
    # the shards' checksums are not hashed: a run deals them over its processes, one process here would read all
    sources, info = open_sources(replace(data, verify_checksums=False), given)
    check_objective(data, info)
    check_tokenizer_fits_model(config, info)
    if info is not None and not config.tokenizer:
        lines.append(f"tokenizer: none given; the manifests name sha256 {info.sha256[:12]}… "
                     f"({info.vocab_size:,} tokens)")
    for i, source in enumerate(sources):
        lines.append(f"data.paths[{i}]: {source.path}: {source.num_documents:,} documents, "
                     f"{source.token_count():,} tokens in {len(source.shards)} shard(s)")
    ranges = [split_document_ranges(s.num_documents, data.split_fractions) for s in sources]
    wanted = samples_wanted(config, config.layout(world_size))
    for split_id, split in enumerate(SPLIT_NAMES):
        if data.split_fractions[split_id] == 0:
            lines.append(f"{split}: no share in data.split")
            continue
        tokens = [s.token_count(r[split_id].start, r[split_id].stop) for s, r in zip(sources, ranges)]
        documents = sum(len(r[split_id]) for r in ranges)
        if data.weights is not None:
            shares = normalize_weights(data.weights)
        else:  # the natural mixture
            shares = [t / max(sum(tokens), 1) for t in tokens]
        needed = wanted[split] * data.seq_len
        epochs = [share * needed / t if t else (float("inf") if share else 0.0) for share, t in zip(shares, tokens)]
        sample = data.seq_len + (1 if config.objective == "causal" else 0)  # a causal sample's last token is shared
        line = (f"{split}: {wanted[split]:,} samples of {sample} tokens from {documents:,} documents, "
                f"{sum(tokens):,} tokens")
        if any(e == float("inf") for e in epochs):
            empty = [i for i, e in enumerate(epochs) if e == float("inf")]
            raise TrainConfigError(f"data.split: the {split} split of data.paths{empty} holds no tokens, and the "
                                   f"blend weights ask samples of it")
        if len(sources) == 1:
            line += f" (~{epochs[0]:.3g} epochs)"
        else:
            line += " (epochs per dataset: " + ", ".join(f"{e:.3g}" for e in epochs) + ")"
        lines.append(line)
    if data.verify_checksums:
        lines.append("data.verify_checksums: the run hashes every shard against its manifest (not the dry run)")
    return lines, data_tokenizer_sha256(info)


def describe_start(config: TrainConfig, world_size: int, tokenizer_sha256: Optional[str]) -> list[str]:
    """Where the run starts: the checkpoint it resumes (and how, for a changed layout), or the weights it starts
    from, each checked from its trainer state or config.json."""
    ck = config.checkpoint
    load_dir, tag = resume_source(config)
    if tag is not None:
        where = f"{load_dir}/{tag}"
        saved = checkpointing.read_state(load_dir, tag)
        check_resumable(saved, config, tokenizer_sha256, where)
        route = resume_route(saved["layout"], layout_of(config, world_size), ck.universal, where)
        layout = saved["layout"]
        how = "" if route == AS_SAVED else (
            f", saved with {layout['pipeline_stages']} pipeline stage(s) x {layout['data_parallel_size']} "
            f"data-parallel, ZeRO-{layout['zero_stage']}: resumes through {route}")
        return [f"start: resumes {where} (iteration {saved.get('step')}, {saved.get('consumed_samples', 0):,} "
                f"samples consumed{how})"]
    if ck.init_from_hf:
        from megatron_mega.convert.hf_import import check_init_from_hf

        check_init_from_hf(ck.init_from_hf, config.model)
        return [f"start: iteration 0 from the weights of {ck.init_from_hf}"]
    if ck.init_from_checkpoint:
        from megatron_mega.convert.training_checkpoint import TrainingCheckpointError, check_init_checkpoint

        try:
            header = check_init_checkpoint(ck.init_from_checkpoint, config.model, config.objective)
        except TrainingCheckpointError as err:
            raise TrainConfigError(str(err)) from None
        return [f"start: iteration 0 from the weights of {header.tag_dir} (its iteration {header.step})"]
    saves = f"; checkpoints go to {os.path.abspath(ck.dir)}" if ck.dir else "; checkpoint.dir is null: nothing is saved"
    return [f"start: iteration 0, seeded weights (seed {config.seed}){saves}"]
