"""`megatron-mega convert`: a training checkpoint to a Hugging Face-format directory for any of the six heads."""

from __future__ import annotations

import argparse
import sys


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert", help="training checkpoint -> Hugging Face-format directory (any head), self-checked")
    parser.add_argument("checkpoint", help="the training checkpoint folder (checkpoint.dir of the run)")
    parser.add_argument("output", help="the Hugging Face-format directory to write")
    parser.add_argument("--head", default=None,
                        help="causal-lm, masked-lm, sequence-classification, multiple-choice, token-classification, "
                             "question-answering (default: the training objective's LM head)")
    parser.add_argument("--step", type=int, default=None, help="a saved step (default: the newest)")
    parser.add_argument("--num-labels", type=int, default=None, help="labels of a classification head")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer folder to ship (default: the run's; its sha256 must match the run's)")
    parser.add_argument("--bidirectional-to-causal", action="store_true",
                        help="allow a bidirectional (masked-LM) checkpoint to become a causal LM by keeping the "
                             "EMA's forward half (a starting point for causal training, not an equivalent model)")
    parser.add_argument("--max-shard-size", default="5GB")
    parser.add_argument("--force", action="store_true", help="replace an existing output directory")
    parser.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from megatron_mega.convert.hf_export import ExportError, export_hf
    from megatron_mega.convert.training_checkpoint import (
        TrainingCheckpointError,
        bidirectional_to_causal,
        find_tokenizer,
        read_training_checkpoint,
    )
    from megatron_mega.data.tokenizer import Tokenizer, TokenizerError
    from megatron_mega.model import CheckpointError, ConfigError, MegaForCausalLM

    try:
        from megatron_mega.model.pretrained import parse_size

        try:
            parse_size(args.max_shard_size)
        except ValueError:
            raise ExportError(f"--max-shard-size {args.max_shard_size!r}: use bytes or a size such as 2GB or "
                              f"500MB") from None
        weights = read_training_checkpoint(args.checkpoint, args.step)
        head = args.head or ("causal-lm" if weights.objective == "causal" else "masked-lm")
        tokenizer = None
        tokenizer_path = args.tokenizer or find_tokenizer(weights)
        if tokenizer_path:
            tokenizer = Tokenizer.load(tokenizer_path)
            if weights.tokenizer_sha256 and tokenizer.sha256 != weights.tokenizer_sha256:
                raise ExportError(f"{tokenizer_path}: tokenizer sha256 {tokenizer.sha256[:12]}… is not the one the run "
                                  f"trained with ({weights.tokenizer_sha256[:12]}…)")
        source = weights.model()
        weights.state = {}  # the model holds the weights now: one copy fewer at the export's peak
        if head == "causal-lm" and (weights.config.bidirectional or not weights.config.is_decoder):
            if not args.bidirectional_to_causal:
                what = ("EMA is bidirectional" if weights.config.bidirectional else
                        "attention is not causal (is_decoder false)")
                raise ExportError(f"the checkpoint's {what} (a masked-LM encoder): it reads future tokens, so it is "
                                  f"not a causal LM. Export --head masked-lm (or a classification head), or pass "
                                  f"--bidirectional-to-causal to make it a decoder (keeping the EMA's forward half)")
            state, config = bidirectional_to_causal(source.state_dict(), weights.config)
            source = MegaForCausalLM(config)
            moved = source.load_checkpoint_state(state, source_architecture="MegaForCausalLM")
            if moved.missing_keys or moved.unexpected_keys:  # every trained tensor has its place in the decoder
                raise ExportError(f"--bidirectional-to-causal: tensors without a place in the causal model "
                                  f"{moved.unexpected_keys}, causal tensors not in the checkpoint {moved.missing_keys}")
            source.eval()
        metadata = {"training step": weights.step, "samples seen": weights.consumed_samples,
                    "tokens seen": weights.tokens_seen, "objective": weights.objective,
                    "layout": ", ".join(f"{k}={v}" for k, v in weights.layout.items()),
                    "source": weights.tag_dir}
        report = export_hf(source, args.output, head=head, num_labels=args.num_labels, dtype=args.dtype,
                           tokenizer=tokenizer, metadata=metadata, force=args.force,
                           max_shard_size=args.max_shard_size,
                           protect=[args.checkpoint, weights.tag_dir] + ([tokenizer_path] if tokenizer_path else []))
    except (TrainingCheckpointError, ExportError, TokenizerError, CheckpointError, ConfigError, OSError) as err:
        # one line, whatever the message holds (nothing was written: the export goes through a temporary folder)
        message = " ".join(str(err).split())
        print(f"megatron-mega convert: error: {message}", file=sys.stderr)
        return 2
    print(f"wrote {report.output_dir}: {report.architecture} ({report.dtype}) from step {weights.step}, "
          f"self-check max relative difference {report.max_relative_error:.2e}")
    if tokenizer is None:
        print("  no tokenizer shipped: the run's config names none and its datasets hold none with its sha256 "
              "(pass --tokenizer DIR to add one)")
    for path in report.removed_partial:
        print(f"  removed {path}, the unfinished output of an earlier convert that was killed")
    if report.newly_initialised:
        print(f"  newly initialised head weights: {', '.join(report.newly_initialised)}")
    return 0
