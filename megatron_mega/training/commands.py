"""`megatron-mega train`: pretrain MEGA with DeepSpeed from a YAML config with dotted overrides.

    megatron-mega train --config configs/train/tiny.yaml optim.lr=1e-3 --dry-run     # check and print, no run
    torchrun --standalone --nproc_per_node=2 -m megatron_mega.training.commands --config configs/train/demo.yaml

Thin: parse, load the config, hand it to the trainer. Config errors become one `error:` line and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

import yaml


def add_commands(subparsers) -> None:
    train = subparsers.add_parser("train", help="pretrain MEGA with DeepSpeed (ZeRO data parallel, pipeline)",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_train_arguments(train)
    train.set_defaults(func=cmd_train)


def _add_train_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="training YAML (see configs/train/)")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the config, the tokenizer, the datasets and the checkpoint to start from, and "
                             "print the resolved config, the DeepSpeed JSON, counts and each split's epochs; no run")
    parser.add_argument("--world-size", type=int, default=None,
                        help="with --dry-run: the number of processes to plan for (default: the launcher's)")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-4 parallel.zero_stage=2")


def dry_run(config, world_size: int, out=None) -> None:
    from megatron_mega.training import preflight
    from megatron_mega.training.ds_config import build_ds_config
    from megatron_mega.training.flops import train_flops
    from megatron_mega.training.trainer import build_model

    out = sys.stdout if out is None else out
    layout = config.layout(world_size)
    ds = build_ds_config(config, world_size)
    # what a run would read, checked before anything is printed: a bad path is the one line of output
    data_lines, tokenizer_sha = preflight.describe_data(config, world_size)
    start_lines = preflight.describe_start(config, world_size, tokenizer_sha)
    model = build_model(config)
    lm = model.lm
    total = sum(p.numel() for p in model.parameters())
    embedding = lm.get_input_embeddings().weight.numel()
    print("# resolved config", file=out)
    print(yaml.safe_dump(config.to_dict(), sort_keys=False), end="", file=out)
    print(f"# DeepSpeed JSON (world size {world_size})", file=out)
    print(json.dumps(ds, indent=2), file=out)
    print(f"layout: {layout.describe()}", file=out)
    print(f"parameters: {total:,} ({total - embedding:,} without the (tied) embedding)", file=out)
    flops = train_flops(config.model, layout.global_batch_size, config.data.seq_len)
    # as on a GPU: selective recomputation replays the attention's query-key product unless the blocks are compiled
    hardware = train_flops(config.model, layout.global_batch_size, config.data.seq_len,
                           activation_checkpointing=config.parallel.activation_checkpointing,
                           selective_recompute=config.parallel.selective_recompute
                           and not config.parallel.compile_blocks)
    print(f"training FLOPs per step: {flops:.4g} ({flops / (layout.global_batch_size * config.data.seq_len):.4g} "
          f"per token; {hardware / flops:.3f}x with recomputation)", file=out)
    for line in data_lines + start_lines:
        print(line, file=out)


def cmd_train(args: argparse.Namespace) -> int:
    from megatron_mega.data.config import DataConfigError
    from megatron_mega.data.gpt_dataset import DatasetError
    from megatron_mega.data.indexed_dataset import IndexedDatasetError
    from megatron_mega.data.manifest import ManifestError
    from megatron_mega.data.sampler import SamplerError
    from megatron_mega.data.tokenizer import TokenizerError
    from megatron_mega.model.pretrained import CheckpointError
    from megatron_mega.training.checkpointing import CheckpointSaveError
    from megatron_mega.training.config import TrainConfigError, load_train_config
    from megatron_mega.training.distributed import env_context, shutdown_distributed
    from megatron_mega.training.trainer import TrainingAborted, run_training

    try:
        if args.world_size is not None and not args.dry_run:
            raise TrainConfigError("--world-size: only with --dry-run (a run takes its world from the launcher)")
        config = load_train_config(args.config, args.overrides)
        if args.dry_run:
            world = args.world_size or env_context()[0].world_size
            dry_run(config, world)
            return 0
        result = run_training(config)
    except (TrainConfigError, DataConfigError, ManifestError, TokenizerError, SamplerError, DatasetError,
            IndexedDatasetError, CheckpointError) as err:
        # a bad config, a missing or mismatched dataset/tokenizer/checkpoint: one line, no traceback
        print(f"megatron-mega: error: {err}", file=sys.stderr)
        return 2
    except (TrainingAborted, CheckpointSaveError) as err:
        print(f"megatron-mega: training stopped: {err}", file=sys.stderr)
        return 1
    shutdown_distributed()
    if env_context()[0].is_main:
        print(f"done: iteration {result.step}, consumed samples {result.consumed_samples}, stopped: "
              f"{result.stopped}", flush=True)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-mega train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_train_arguments(parser)
    return cmd_train(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
