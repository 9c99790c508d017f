"""launch.local: N processes through torchrun; a SIGTERM to the launcher reaches the workers, which checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from launch.local import train_command

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "train", "tiny.yaml")


def test_train_command_forms():
    local = train_command("c.yaml", ["a=1"], 2, python="py")
    assert local == ["py", "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone", "-m",
                     "megatron_mega.training.commands", "--config", "c.yaml", "a=1"]
    multi = train_command("c.yaml", [], 8, python="py", nnodes=4, rdzv_endpoint="h:1", rdzv_id="7")
    assert "--nnodes=4" in multi and "--rdzv_endpoint=h:1" in multi and "--standalone" not in multi
    assert train_command("c.yaml", [], python="py", launcher="direct") == \
        ["py", "-m", "megatron_mega.training.commands", "--config", "c.yaml"]


def test_sigterm_to_the_launcher_checkpoints_and_stops(pydoc_dataset, tmp_path):
    ckpt = tmp_path / "ckpt"
    proc = subprocess.Popen(
        [sys.executable, "-m", "launch.local", "--nproc", "2", "--config", TINY,
         f"data.paths=[{pydoc_dataset['dataset']}]", f"tokenizer={pydoc_dataset['tokenizer']}",
         f"checkpoint.dir={ckpt}", "checkpoint.interval=100000", "optim.train_steps=5000", "logging.interval=1"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if "iteration 5/5000" in line:
            proc.send_signal(signal.SIGTERM)
            break
    lines += proc.stdout.readlines()
    rc = proc.wait(timeout=120)
    text = "".join(lines)
    assert "stopped by signal at iteration" in text, text[-3000:]
    assert [d for d in os.listdir(ckpt) if d.startswith("step")], text[-3000:]
    assert rc == 0, text[-3000:]  # torchrun's own exit code after a signal is 1 even when the workers saved


def test_a_bad_config_fails_before_torchrun_starts(capsys):
    from launch.local import main

    assert main(["--nproc", "2", "--config", TINY, "optim.lrr=1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"launch.local: error: {TINY}: optim.lrr: unknown field") and err.count("\n") == 1, err
