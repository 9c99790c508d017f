"""The rendered sbatch scripts (no cluster needed): resources, launchers, preemption, failure handling, logs."""

from __future__ import annotations

import os
import subprocess

from megatron_mega.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "configs", "train", "tiny.yaml")


def _render(capsys, *args):
    assert main(["slurm", *args, "--dry-run"]) == 0
    return capsys.readouterr().out


def _bash_syntax_ok(text, tmp_path):
    path = tmp_path / "s.sh"
    path.write_text(text)
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_torchrun_script(capsys, tmp_path):
    text = _render(capsys, "train", "--config", TINY, "--nodes", "4", "--gpus-per-node", "8", "--partition", "gpu",
                   "--account", "proj", "--time", "24:00:00", "--venv", "/opt/venv", "--signal-before", "300",
                   "--sbatch-arg=--qos=high", "optim.global_batch_size=64")
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --time=24:00:00",
                 "#SBATCH --signal=B:USR1@300", "#SBATCH --requeue", "#SBATCH --qos=high",
                 "source /opt/venv/bin/activate", 'scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1',
                 "--nproc_per_node=8 --nnodes=4 --rdzv_backend=c10d --rdzv_endpoint=$MASTER_ADDR:$RDZV_PORT",
                 "optim.global_batch_size=64", "trap on_signal USR1 TERM", 'scontrol requeue "$SLURM_JOB_ID"',
                 'exit "$rc"', "global_batch_size: 64", "node%n-task%t.out"):
        assert line in text, line
    assert "DS_ACCELERATOR" not in text  # GPUs: DeepSpeed picks cuda itself
    _bash_syntax_ok(text, tmp_path)


def test_direct_script_on_cpus(capsys, tmp_path):
    text = _render(capsys, "train", "--config", TINY, "--nodes", "2", "--procs-per-node", "2", "--launcher",
                   "direct", "--no-requeue", "--signal-before", "0", "--container", "nvcr.io/x:1", "--setup",
                   "module load foo", "optim.global_batch_size=8")
    assert "#SBATCH --ntasks-per-node=2" in text and "torch.distributed.run" not in text
    assert "-m megatron_mega.training.commands --config" in text
    assert "#SBATCH --no-requeue" in text and "#SBATCH --signal=" not in text
    assert "scontrol requeue" not in text and "no-requeue: resubmit to resume" in text
    assert "--container-image=nvcr.io/x:1" in text and "module load foo" in text and "activate" not in text
    assert "export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}" in text
    _bash_syntax_ok(text, tmp_path)


def test_bad_config_is_refused_before_submission(capsys):
    # 3 processes cannot split a global batch of 4 into micro-batches of 2
    assert main(["slurm", "train", "--config", TINY, "--nodes", "3", "--dry-run"]) == 2
    assert "error" in capsys.readouterr().err


def test_prepare_scripts(capsys, tmp_path):
    text = _render(capsys, "prepare", "a.jsonl", "b.jsonl", "c.jsonl", "--output", "out", "--tokenizer", "tok",
                   "--reshard")
    array, merge = text.split("# --- merge job")
    assert "#SBATCH --array=0-2" in array and "--num-jobs 3" in array and "prepare tokenize a.jsonl b.jsonl" in array
    assert "%A_%a.out" in array and "set -euo pipefail" in array
    assert "prepare merge" in merge and "--reshard" in merge and "afterok" in merge
    _bash_syntax_ok(array, tmp_path)
