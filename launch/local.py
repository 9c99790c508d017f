"""Local launcher: N training processes on this machine through torchrun, the same module the SLURM jobs start.

    python -m launch.local --nproc 2 --config configs/train/demo.yaml optim.train_steps=50

`train_command` is shared with `launch.slurm` (which adds the multi-node rendezvous), so a local run and a cluster
run execute the same command line.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import threading
from typing import Callable, Optional, Sequence

TRAIN_MODULE = "megatron_mega.training.commands"


def train_command(config: str, overrides: Sequence[str] = (), nproc: int = 1, *, python: str = sys.executable,
                  nnodes: int = 1, rdzv_endpoint: Optional[str] = None, rdzv_id: Optional[str] = None,
                  launcher: str = "torchrun") -> list[str]:
    """The command that starts training. launcher 'torchrun': one torchrun (per node) with `nproc` workers;
    'direct': the training module itself (ranks from SLURM variables or a single process)."""
    tail = ["-m", TRAIN_MODULE, "--config", config, *overrides]
    if launcher == "direct":
        return [python, *tail]
    if launcher != "torchrun":
        raise ValueError(f"unknown launcher {launcher!r} (torchrun or direct)")
    cmd = [python, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}"]
    if nnodes == 1 and rdzv_endpoint is None:
        cmd.append("--standalone")
    else:
        cmd += [f"--nnodes={nnodes}", "--rdzv_backend=c10d", f"--rdzv_endpoint={rdzv_endpoint}",
                f"--rdzv_id={rdzv_id or 'megatron-mega'}"]
    return cmd + tail


def checked_config(config: str, overrides: Sequence[str], world_size: int):
    """The training config for `world_size` processes, checked once by the launcher before any worker starts
    (a typo would otherwise be reported by every worker, or after minutes of other work); TrainConfigError."""
    from megatron_mega.training.config import load_train_config

    loaded = load_train_config(config, list(overrides))
    loaded.layout(world_size)
    return loaded


def launch_env(base: Optional[dict] = None) -> dict:
    """Environment for CPU workers: one OpenMP thread each (4 processes on 2 cores: 0.7 s instead of 8.4 s)."""
    env = dict(os.environ if base is None else base)
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("DS_ACCELERATOR", "cpu" if not _cuda() else "cuda")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def run_streaming(cmd: Sequence[str], log_path: Optional[str] = None, on_line: Optional[Callable[[str], None]] = None,
                  env: Optional[dict] = None, echo: bool = True) -> int:
    """Run `cmd`, echo its output as it comes, append it to `log_path`, hand each line to `on_line`."""
    if log_path:
        os.makedirs(os.path.dirname(os.path.abspath(log_path)), exist_ok=True)
    log = open(log_path, "a", encoding="utf-8") if log_path else None
    try:
        if log:
            log.write(f"$ {shlex.join(cmd)}\n")
        proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                bufsize=1)
        # SIGTERM to this process (a kill, a scheduler) goes on to the child: torchrun hands it to its workers,
        # which checkpoint and stop, instead of being orphaned
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: proc.send_signal(signal.SIGTERM)) \
            if main_thread else None
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                if echo:
                    sys.stdout.write(line)
                    sys.stdout.flush()
                if log:
                    log.write(line)
                    log.flush()
                if on_line:
                    on_line(line.rstrip("\n"))
            return proc.wait()
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)
            if proc.poll() is None:  # an exception here (Ctrl-C): stop the child too, and wait for it
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    proc.kill()
    finally:
        if log:
            log.close()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.local", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nproc", type=int, default=2, help="training processes on this machine")
    parser.add_argument("--config", required=True)
    parser.add_argument("--log", default=None, help="also append the output to this file")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    if args.nproc < 1:
        parser.error(f"--nproc {args.nproc}: must be at least 1")
    from megatron_mega.training.config import TrainConfigError

    try:
        checked_config(args.config, args.overrides, args.nproc)
    except TrainConfigError as err:
        print(f"launch.local: error: {err}", file=sys.stderr)
        return 2
    cmd = train_command(args.config, args.overrides, args.nproc)
    print(f"+ {shlex.join(cmd)}", flush=True)
    stopped = []
    # torchrun kills its workers 30 s after a SIGTERM by default: give a saving worker time (the variable, not
    # --shutdown-timeout, which torchrun before 2.11 refuses)
    env = {**launch_env(), "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "600")}
    rc = run_streaming(cmd, args.log, env=env,
                       on_line=lambda line: stopped.append(line) if "stopped by signal at iteration" in line else None)
    if rc != 0 and stopped:
        # torchrun exits non-zero after forwarding a signal even when every worker saved and exited 0
        print(f"launch.local: the training stopped on a signal with a checkpoint (torchrun exit code {rc})",
              flush=True)
        return 0
    return rc


if __name__ == "__main__":
    sys.exit(main())
