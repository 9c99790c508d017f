"""Exact-resume check of a real training run on whatever device this machine has (CUDA with NCCL, else CPU).

Run A trains `--steps` steps, logging every step and checkpointing every steps/2. Run B starts from a copy of A's
checkpoint folder with `latest` moved back to the middle checkpoint, so it resumes there and trains to the end.
The check prints the largest difference between A's and B's losses over the resumed steps (the log prints 4
decimals). On the CPU the tests assert bit-exact resume (tests/training); this script is how the GPU path is checked
(benchmarks/gpu_check.sh), where cuBLAS and atomics in some backward kernels may differ run to run.

    python3 benchmarks/resume_check.py --data runs/quickstart/dataset --tokenizer runs/quickstart/tokenizer \
        --work /tmp/resume --steps 20 precision.dtype=bf16
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from launch.local import launch_env, run_streaming, train_command  # noqa: E402
from megatron_mega.training.checkpointing import LATEST, tag_for  # noqa: E402

LINE = re.compile(r"iteration (\d+)/\d+ .*\| loss ([\d.naif]+) ")


def train(config: str, work: str, overrides: list[str], log: str) -> dict[int, float]:
    losses: dict[int, float] = {}

    def on_line(line: str) -> None:
        if m := LINE.search(line):
            losses[int(m.group(1))] = float(m.group(2))

    rc = run_streaming(train_command(config, overrides + [f"checkpoint.dir={work}"], 1), log, on_line=on_line,
                       env=launch_env(), echo=False)
    if rc != 0:
        raise SystemExit(f"training failed (exit {rc}); see {log}")
    return losses


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=os.path.join(ROOT, "configs", "train", "demo.yaml"))
    p.add_argument("--data", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--work", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    half = args.steps // 2
    shutil.rmtree(args.work, ignore_errors=True)
    os.makedirs(args.work)
    common = [f"data.paths={json.dumps([args.data])}", f"tokenizer={args.tokenizer}",
              f"optim.train_steps={args.steps}", f"checkpoint.interval={half}", "checkpoint.keep_last=4",
              "logging.interval=1", f"logging.eval_interval={10 * args.steps}", "logging.tensorboard_dir=null",
              *args.overrides]
    run_a, run_b = os.path.join(args.work, "a"), os.path.join(args.work, "b")
    losses_a = train(args.config, run_a, common, os.path.join(args.work, "a.log"))
    shutil.copytree(run_a, run_b)
    shutil.rmtree(os.path.join(run_b, tag_for(args.steps)), ignore_errors=True)
    with open(os.path.join(run_b, LATEST), "w") as fh:
        fh.write(tag_for(half) + "\n")
    losses_b = train(args.config, run_b, common, os.path.join(args.work, "b.log"))
    resumed = sorted(s for s in losses_b if s > half)
    if not resumed or min(losses_b) <= half:
        raise SystemExit(f"run B did not resume at step {half}: it logged steps {sorted(losses_b)}")
    diffs = {s: abs(losses_a[s] - losses_b[s]) for s in resumed}
    worst = max(diffs.values())
    print(f"resume check: steps {half + 1}-{args.steps}, losses A {[losses_a[s] for s in resumed]}")
    print(f"                                     losses B {[losses_b[s] for s in resumed]}")
    print(f"resume check: largest |loss A - loss B| = {worst:.4g} "
          f"({'exact to the 4 logged decimals' if worst == 0 else 'differs'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
