"""`megatron-mega finetune`: train a converted MEGA directory on a labelled dataset and report eval accuracy."""

from __future__ import annotations

import argparse
import sys


def add_commands(subparsers) -> None:
    parser = subparsers.add_parser("finetune", help="fine-tune a Hugging Face-format MEGA directory on labelled data")
    parser.add_argument("model", help="a directory written by `megatron-mega convert` (or save_pretrained)")
    parser.add_argument("--task", default="sequence-classification",
                        choices=["sequence-classification", "token-classification"])
    parser.add_argument("--train", required=True, help="jsonl/json/csv/parquet file, save_to_disk folder or hub name")
    parser.add_argument("--eval", default=None, help="as --train; default: the last 10%% of --train")
    parser.add_argument("--split", default=None, help="split of a dataset with several")
    parser.add_argument("--text-key", default="text")
    parser.add_argument("--text-pair-key", default=None)
    parser.add_argument("--label-key", default="label")
    parser.add_argument("--num-labels", type=int, default=None,
                        help="default: from the labels (class names, distinct strings, largest int + 1; float "
                             "labels are regression, 1)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", default=None, help="default: the model directory's tokenizer")
    parser.add_argument("--output", default=None, help="where to save the fine-tuned model (a new folder)")
    parser.add_argument("--force", action="store_true", help="replace an existing --output folder")
    parser.set_defaults(func=run_finetune)


def run_finetune(args: argparse.Namespace) -> int:
    from megatron_mega.data.tokenizer import Tokenizer, TokenizerError
    from megatron_mega.finetune.examples import ExamplesError, load_examples
    from megatron_mega.finetune.loop import FinetuneSettings, check_model_dir, finetune
    from megatron_mega.model.config import ConfigError
    from megatron_mega.model.pretrained import CheckpointError

    try:
        settings = FinetuneSettings(task=args.task, num_labels=args.num_labels, epochs=args.epochs,
                                    batch_size=args.batch_size, lr=args.lr, max_length=args.max_length,
                                    seed=args.seed, text_key=args.text_key, text_pair_key=args.text_pair_key,
                                    label_key=args.label_key)
        check_model_dir(args.model)  # before the tokenizer, whose error would not say what is wrong
        tokenizer = Tokenizer.load(args.tokenizer or args.model)
        train_set = load_examples(args.train, args.split)
        if args.eval:
            eval_set = load_examples(args.eval, args.split)
        else:
            split = train_set.train_test_split(test_size=0.1, seed=args.seed)
            train_set, eval_set = split["train"], split["test"]
        result = finetune(args.model, train_set, eval_set, settings, tokenizer, output_dir=args.output,
                          force=args.force)
    except (ExamplesError, TokenizerError, CheckpointError, ConfigError) as err:
        print(f"megatron-mega finetune: error: {err}", file=sys.stderr)
        return 2
    print(f"finished in {result.seconds:.1f} s: eval {result.eval_before} -> {result.eval_after}")
    return 0
