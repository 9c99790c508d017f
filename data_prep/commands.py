"""`megatron-mega prepare ...`: train a tokenizer, tokenize a corpus, merge job parts, inspect a dataset.

Thin: parse options, call data_prep, print. A PrepareError / ManifestError / TokenizerError (or an OSError such
as a full disk) becomes one `megatron-mega: error: ...` line on stderr and exit code 2. Heavy imports happen
inside the handlers.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import time


def _clean_errors(handler):
    @functools.wraps(handler)
    def wrapped(args: argparse.Namespace) -> int:
        from data_prep.errors import PrepareError
        from megatron_mega.data.indexed_dataset import IndexedDatasetError
        from megatron_mega.data.manifest import ManifestError
        from megatron_mega.data.tokenizer import TokenizerError

        try:
            return handler(args)
        except (PrepareError, ManifestError, TokenizerError, IndexedDatasetError, OSError) as err:
            print(f"megatron-mega: error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("megatron-mega: interrupted; finished shards are kept, rerun the same command to resume",
                  file=sys.stderr)
            return 130
    return wrapped


def _count(text: str) -> int:
    """An argparse type: an integer >= 0 (argparse turns the ValueError into its one-line usage error)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value}: must be 0 or more")
    return value


def _add_input_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="*", metavar="INPUT",
                        help="files, folders or globs (quote them): .jsonl .json .txt .csv .tsv .parquet, "
                             "optionally .gz .zst .bz2 .xz")
    parser.add_argument("--text-key", default="text", help="the JSON field / column holding the text (default text)")
    parser.add_argument("--txt-unit", choices=("file", "paragraph", "line"), default="file",
                        help="what one document is in a .txt file (default: the whole file)")
    group = parser.add_argument_group("a `datasets` dataset instead of files")
    group.add_argument("--hf-dataset", metavar="NAME_OR_PATH",
                       help="a save_to_disk folder, or a name for datasets.load_dataset (e.g. json)")
    group.add_argument("--hf-split", default="train")
    group.add_argument("--hf-config", default=None)
    group.add_argument("--hf-data-files", nargs="+", default=None, help="data_files for datasets.load_dataset")


def add_prepare_command(commands) -> None:
    """Register `prepare` and its subcommands on the main parser's subparsers."""
    prepare = commands.add_parser(
        "prepare", help="data preparation: tokenizer, tokenize, merge, inspect",
        description="Train a tokenizer, tokenize a corpus into Megatron .bin/.idx shards (parallel, resumable, "
                    "splittable into SLURM array jobs), merge the jobs' parts, inspect the result.")
    steps = prepare.add_subparsers(dest="prepare_command", required=True, metavar="STEP")

    train = steps.add_parser("tokenizer", help="train a SentencePiece tokenizer on a sample of the corpus")
    _add_input_options(train)
    train.add_argument("--output", required=True, help="folder for tokenizer.model and megatron_mega_tokenizer.json")
    train.add_argument("--model-type", choices=("unigram", "bpe"), default="unigram")
    train.add_argument("--vocab-size", type=int, default=32000)
    train.add_argument("--sample-docs", type=int, default=100_000,
                       help="documents sampled uniformly (seeded) from the whole corpus to train on")
    train.add_argument("--character-coverage", type=float, default=0.9995)
    train.add_argument("--byte-fallback", action=argparse.BooleanOptionalAction, default=True,
                       help="unknown characters become UTF-8 byte tokens, so every text round-trips (default on)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--threads", type=int, default=8,
                       help="SentencePiece threads; part of the result, so fixed rather than the core count")
    train.add_argument("--overwrite", action="store_true", help="replace a different tokenizer already in --output")
    train.set_defaults(func=_cmd_tokenizer)

    tok = steps.add_parser("tokenize", help="tokenize a corpus into Megatron .bin/.idx shards and manifest.json")
    _add_input_options(tok)
    tok.add_argument("--output", required=True, help="dataset folder (resumes if it holds an unfinished run)")
    tok.add_argument("--tokenizer", required=True, help="tokenizer folder or .model file")
    tok.add_argument("--shard-tokens", type=int, default=1 << 28,
                     help="at most this many tokens per shard (a longer document gets a shard of its own)")
    tok.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                     help="tokenizing processes (the output does not depend on it)")
    tok.add_argument("--num-jobs", type=int, default=1, help="split the inputs into this many parts (SLURM array)")
    tok.add_argument("--job-index", type=int, default=None,
                     help="which part this job writes (default: $SLURM_ARRAY_TASK_ID, an array of 0..K-1)")
    tok.add_argument("--strict", action="store_true",
                     help="stop at the first bad record (named by file and line) instead of skipping it")
    tok.add_argument("--no-progress", action="store_true", help="no progress bar (default: one on a terminal)")
    tok.set_defaults(func=_cmd_tokenize)

    merge = steps.add_parser("merge", help="merge the part folders of a --num-jobs run into one verified manifest")
    merge.add_argument("output", help="the --output folder the jobs wrote their part-* folders into")
    merge.add_argument("--reshard", action="store_true",
                       help="rewrite the documents into single-run shards (byte-identical to one process)")
    merge.add_argument("--no-checksums", action="store_true", help="verify counts and sizes only")
    merge.set_defaults(func=_cmd_merge)

    look = steps.add_parser("inspect", help="counts, document lengths, token histogram, samples, checksums")
    look.add_argument("path", help="dataset folder or its manifest.json")
    look.add_argument("--samples", type=_count, default=3, help="documents to decode (the first, then random ones)")
    look.add_argument("--sample-chars", type=_count, default=300)
    look.add_argument("--max-tokens", type=_count, default=10_000_000, help="tokens counted for the histogram")
    look.add_argument("--no-verify", action="store_true", help="skip the sha256 checks")
    look.set_defaults(func=_cmd_inspect)


def _sources(args: argparse.Namespace) -> list:
    from data_prep.errors import PrepareError
    from data_prep.sources import DatasetSource, FileSource, expand_inputs

    if args.hf_dataset:
        if args.inputs:
            raise PrepareError("give either input paths or --hf-dataset, not both")
        return [DatasetSource(args.hf_dataset, split=args.hf_split, config=args.hf_config,
                              data_files=args.hf_data_files, text_key=args.text_key)]
    if not args.inputs:
        raise PrepareError("no inputs: give files, folders or globs, or --hf-dataset")
    return [FileSource(p, text_key=args.text_key, txt_unit=args.txt_unit) for p in expand_inputs(args.inputs)]


@_clean_errors
def _cmd_tokenizer(args: argparse.Namespace) -> int:
    from data_prep.errors import PrepareError
    from data_prep.train_tokenizer import TrainSettings, sample_documents, train
    from megatron_mega.data.tokenizer import MODEL_FILE, Tokenizer

    existing = os.path.join(args.output, MODEL_FILE)
    started = time.perf_counter()
    sources = _sources(args)
    documents, problems, seen = sample_documents(sources, args.text_key, args.sample_docs, args.seed)
    settings = TrainSettings(vocab_size=args.vocab_size, model_type=args.model_type,
                             character_coverage=args.character_coverage, byte_fallback=args.byte_fallback,
                             sample_docs=args.sample_docs, seed=args.seed, threads=args.threads)
    extra = {"documents_seen": seen, "documents_sampled": len(documents), "sources": [s.name for s in sources]}
    if not documents and problems:
        extra["why_none"] = _why_none(problems)
    tokenizer = train(documents, settings, extra=extra)
    if os.path.exists(existing) and not args.overwrite and Tokenizer.load(existing).sha256 != tokenizer.sha256:
        raise PrepareError(f"{existing}: a different tokenizer is already there (datasets made with it would no "
                           f"longer match); choose another --output or pass --overwrite")
    tokenizer.save(args.output)
    check = documents[:1000]
    exact = sum(tokenizer.decode(tokenizer.encode(d)) == d for d in check)
    chars = sum(map(len, check))
    tokens = sum(len(ids) for ids in tokenizer.encode_batch(check))
    print(f"{args.output}: {args.model_type} tokenizer, vocab {tokenizer.vocab_size:,}, sha256 {tokenizer.sha256}")
    print(f"  special ids: {tokenizer.special_ids}")
    print(f"  trained on {len(documents):,} of {seen:,} documents in {time.perf_counter() - started:.1f} s")
    print(f"  on {len(check):,} of them: {chars / max(tokens, 1):.2f} characters per token, "
          f"decode(encode(doc)) == doc for {exact}/{len(check)}")
    if problems:
        print(f"  skipped {problems.total:,} record(s):")
        print("\n".join(problems.report()))
    return 0


def _why_none(problems) -> str:
    """The skipped records' tally and first example, for the error when none was usable."""
    reasons = ", ".join(f"{reason}: {count:,}" for reason, count in sorted(problems.counts.items()))
    first = next(iter(problems.examples.values()), [""])[0]
    return f"{problems.total:,} record(s) skipped, {reasons}; e.g. {first}"


def _job_index(args: argparse.Namespace) -> int:
    from data_prep.errors import PrepareError

    if args.job_index is not None:
        return args.job_index
    if args.num_jobs == 1:
        return 0
    task = os.environ.get("SLURM_ARRAY_TASK_ID")
    if task is None:
        raise PrepareError(f"--num-jobs {args.num_jobs} needs --job-index (or a SLURM array task)")
    # the task id itself: SLURM_ARRAY_TASK_MIN is that of the submission, so a task resubmitted alone
    # (sbatch --array=2) would subtract its own id and redo part 0
    return int(task)


@_clean_errors
def _cmd_tokenize(args: argparse.Namespace) -> int:
    from data_prep.errors import PrepareError
    from data_prep.tokenize import TokenizeOptions, tokenize_corpus

    options = TokenizeOptions(
        output=args.output, tokenizer=args.tokenizer, inputs=list(args.inputs), hf_dataset=args.hf_dataset,
        hf_split=args.hf_split, hf_config=args.hf_config, hf_data_files=args.hf_data_files, text_key=args.text_key,
        txt_unit=args.txt_unit, shard_tokens=args.shard_tokens, workers=args.workers, num_jobs=args.num_jobs,
        job_index=_job_index(args), strict=args.strict, progress=False if args.no_progress else None)
    created = not os.path.exists(args.output)
    summary = tokenize_corpus(options)
    if summary.documents == 0 and args.num_jobs == 1:
        # an empty dataset is no result: say why, and leave nothing behind that a corrected rerun would collide with
        if created:
            shutil.rmtree(args.output, ignore_errors=True)
        why = _why_none(summary.problems) if summary.problems.total else "the inputs hold no records"
        raise PrepareError(f"no document was kept from the inputs ({why})")
    print("\n".join(summary.lines()))
    if args.num_jobs > 1:
        print(f"  part {options.job_index} of {args.num_jobs} done; when all are: "
              f"megatron-mega prepare merge {args.output}")
    return 0


@_clean_errors
def _cmd_merge(args: argparse.Namespace) -> int:
    from data_prep.merge import merge_parts

    print("\n".join(merge_parts(args.output, reshard=args.reshard, checksums=not args.no_checksums).lines()))
    return 0


@_clean_errors
def _cmd_inspect(args: argparse.Namespace) -> int:
    from data_prep.inspect_dataset import inspect_dataset

    print("\n".join(inspect_dataset(args.path, samples=args.samples, verify=not args.no_verify,
                                    max_tokens=args.max_tokens, sample_chars=args.sample_chars)))
    return 0
