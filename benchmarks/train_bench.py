"""Tokens/s and peak memory of training steps of the CPU demo config (configs/train/demo.yaml): plain on 1 and 2
processes vs a 2-stage pipeline, each in fresh spawned processes (gloo, OMP_NUM_THREADS=1 with 2 processes).

    .venv/bin/python benchmarks/train_bench.py [--steps 20] [--out benchmarks/results/train_bench.json]

The data is Python's pydoc topic text, tokenized with a 2000-piece tokenizer in a temporary folder. tokens/s is the
mean over the logged windows after the first (warm-up excluded); peak memory is each process's max RSS. data wait is
rank 0's time blocked on the data loader for the next micro-batch: ms per iteration and its share of the loop's wall
time, over the same windows (the trainer's `data wait` log field; target < 2%).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import sys
import tempfile

import torch
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def prepare(folder: str) -> dict[str, str]:
    from pydoc_data.topics import topics as table

    from data_prep.tokenize import TokenizeOptions, tokenize_corpus
    from data_prep.train_tokenizer import TrainSettings, train

    docs = [table[k] for k in sorted(table)]
    tok = os.path.join(folder, "tokenizer")
    train(docs, TrainSettings(vocab_size=2000, threads=2)).save(tok)
    with open(os.path.join(folder, "docs.jsonl"), "w") as fh:
        for d in docs:
            fh.write(json.dumps({"text": d}) + "\n")
    ds = os.path.join(folder, "dataset")
    tokenize_corpus(TokenizeOptions(output=ds, tokenizer=tok, inputs=[os.path.join(folder, "docs.jsonl")],
                                    progress=False))
    return {"tokenizer": tok, "dataset": ds}


def _worker(rank: int, world: int, port: int, overrides: list[str], out: str) -> None:
    threads = 1  # 2 threads in one process ran 8-20x slower here (OpenMP spinning on a shared, loaded 2-core box)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS=str(threads), DS_ACCELERATOR="cpu")
    torch.set_num_threads(threads)
    from megatron_mega.training.config import load_train_config
    from megatron_mega.training.distributed import shutdown_distributed
    from megatron_mega.training.trainer import run_training

    lines: list[str] = []
    config = load_train_config(os.path.join(ROOT, "configs/train/demo.yaml"), overrides)
    result = run_training(config, print_fn=lambda *a, **k: lines.append(" ".join(map(str, a))))
    logged = [l for l in lines if "] iteration " in l]
    rates = [float(l.split("tokens/s ")[1].split(" ")[0]) for l in logged]
    waits = [float(l.split("data wait ")[1].split(" ")[0]) for l in logged]
    ms_iter = [float(l.split("ms/iter ")[1].split(" ")[0]) for l in logged]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with open(f"{out}.rank{rank}.json", "w") as fh:
        json.dump({"tokens_per_s": sum(rates[1:]) / max(1, len(rates) - 1), "peak_rss_mb": peak,
                   "data_wait_ms": sum(waits[1:]) / max(1, len(waits) - 1),
                   "data_wait_share": sum(waits[1:]) / max(1e-9, sum(ms_iter[1:])),
                   "ms_per_iter": sum(ms_iter[1:]) / max(1, len(ms_iter) - 1),
                   "final_loss": result.losses[max(result.losses)]}, fh)
    shutdown_distributed()


def run(name: str, world: int, overrides: list[str], folder: str) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(folder, name)
    mp.spawn(_worker, args=(world, port, overrides, out), nprocs=world, join=True)
    ranks = [json.load(open(f"{out}.rank{r}.json")) for r in range(world)]
    return {"name": name, "processes": world, "tokens_per_s": round(ranks[0]["tokens_per_s"]),
            "ms_per_iter": round(ranks[0]["ms_per_iter"], 1), "data_wait_ms": round(ranks[0]["data_wait_ms"], 2),
            "data_wait_share": round(ranks[0]["data_wait_share"], 4),
            "peak_rss_mb_per_process": [round(r["peak_rss_mb"]) for r in ranks], "final_loss": ranks[0]["final_loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks/results/train_bench.json"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        data = prepare(folder)
        common = [f"data.paths=[{data['dataset']}]", f"tokenizer={data['tokenizer']}",
                  f"optim.train_steps={args.steps}", "logging.interval=5", "logging.tensorboard_dir=null",
                  "logging.eval_interval=0", "logging.test_iters=0", "checkpoint.dir=null"]
        rows = [run("plain-1proc-zero1", 1, common + ["parallel.zero_stage=1"], folder),
                run("plain-2proc-zero1", 2, common + ["parallel.zero_stage=1"], folder),
                run("pipeline-2stages-zero1", 2, common + ["parallel.pipeline_stages=2", "parallel.zero_stage=1"],
                    folder)]
    for row in rows:
        print(json.dumps(row))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"config": "configs/train/demo.yaml", "steps": args.steps, "machine": f"{os.cpu_count()} cores",
                   "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
