"""Tokenizing throughput of `prepare tokenize`: tokens/s with 1 and 2 (or more) workers.

The corpus is pydoc's topic help texts (shipped with Python) repeated into a JSON Lines file of --mb megabytes; the
tokenizer is trained on the topics once (or given with --tokenizer). Runs alternate between worker counts (A B A B),
because these machines are noisy, and the median per worker count is reported. The outputs of all runs are checked
to be byte-identical.

    .venv/bin/python benchmarks/data_bench.py --mb 8 --workers 1 2 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data_prep.tokenize import TokenizeOptions, tokenize_corpus  # noqa: E402
from data_prep.train_tokenizer import TrainSettings, train  # noqa: E402
from megatron_mega.data.manifest import Manifest  # noqa: E402


def build_corpus(path: Path, megabytes: float) -> int:
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)]
    written, copy = 0, 0
    with open(path, "w", encoding="utf-8") as fh:
        while written < megabytes * 1e6:
            for key, doc in zip(sorted(topics), docs):
                line = json.dumps({"text": doc, "id": f"{key}-{copy}"}) + "\n"
                fh.write(line)
                written += len(line.encode())
            copy += 1
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=8.0, help="corpus size in megabytes")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--vocab-size", type=int, default=4000, help="(the topics support up to ~4800)")
    parser.add_argument("--tokenizer", help="a tokenizer folder (default: train one on the topics)")
    parser.add_argument("--shard-tokens", type=int, default=1 << 22)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="data_bench_") as tmp:
        tmp = Path(tmp)
        size = build_corpus(tmp / "corpus.jsonl", args.mb)
        tokenizer = args.tokenizer
        if tokenizer is None:
            from pydoc_data.topics import topics

            started = time.perf_counter()
            tokenizer = str(tmp / "tokenizer")
            train([topics[k] for k in sorted(topics)], TrainSettings(vocab_size=args.vocab_size, threads=2)).save(
                tokenizer)
            print(f"trained a {args.vocab_size}-piece unigram tokenizer in {time.perf_counter() - started:.1f} s")
        print(f"corpus: {size / 1e6:.1f} MB of JSON Lines; cpus: {os.cpu_count()}")
        rates: dict[int, list[float]] = {w: [] for w in args.workers}
        manifests = set()
        for repeat in range(args.repeats):
            for workers in args.workers:
                out = tmp / f"out-{workers}-{repeat}"
                summary = tokenize_corpus(TokenizeOptions(output=str(out), tokenizer=tokenizer,
                                                          inputs=[str(tmp / "corpus.jsonl")], workers=workers,
                                                          shard_tokens=args.shard_tokens, progress=False))
                rate = summary.new_tokens / summary.seconds
                rates[workers].append(rate)
                manifests.add((out / "manifest.json").read_text())
                print(f"  workers {workers}, run {repeat + 1}: {summary.new_tokens:,} tokens in {summary.seconds:.2f} s"
                      f" = {rate:,.0f} tokens/s ({size / 1e6 / summary.seconds:.1f} MB/s)")
                tokens = Manifest.load(str(out)).tokens
        assert len(manifests) == 1, "outputs differ between runs"
        results = {"corpus_mb": round(size / 1e6, 2), "tokens": tokens, "cpus": os.cpu_count(),
                   "tokens_per_s": {str(w): round(statistics.median(r)) for w, r in rates.items()}}
        print("median tokens/s: " + ", ".join(f"{w} worker(s): {r:,}" for w, r in results["tokens_per_s"].items())
              + "; outputs byte-identical: yes")
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
