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
                 "optim.global_batch_size=64", "trap on_preempt USR1", "trap on_cancel TERM",
                 'scontrol requeue "$SLURM_JOB_ID"', 'exit "$rc"', "global_batch_size: 64", "node%n-task%t.out",
                 # torchrun's 30 s default killed workers mid-save; a node done first must not kill the others
                 "export TORCH_ELASTIC_SHUTDOWN_TIMEOUT=300", "srun --kill-on-bad-exit=0 --wait=300",
                 # rank 0 may be on any node, and only this run's lines count (a requeued job appends)
                 'for f in "$RUN_LOGS"/node*-task*.out', 'this_run | grep -F "stopped: finished" >/dev/null'):
        assert line in text, line
    # only USR1 (preemption) leads to a requeue; a scancel's SIGTERM does not
    cancel = text.split("on_cancel() {")[1].split("\n}\n")[0]
    assert "CANCELLED=1" in cancel and "scontrol" not in cancel and "PREEMPTED" not in cancel
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
    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.jsonl").write_text('{"text": "x"}\n')
    text = _render(capsys, "prepare", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl"), str(tmp_path / "c.jsonl"),
                   "--output", "out", "--tokenizer", "tok", "--reshard", "--workers", "4")
    array, merge = text.split("# --- merge job")
    assert "#SBATCH --array=0-2" in array and "--num-jobs 3" in array
    assert f"prepare tokenize {tmp_path}/a.jsonl {tmp_path}/b.jsonl" in array
    # the task id itself (a task resubmitted alone with --array=2 redoes part 2), and a core per worker
    assert "--job-index $SLURM_ARRAY_TASK_ID" in array and "#SBATCH --cpus-per-task=4" in array
    assert "%A_%a.out" in array and "set -euo pipefail" in array
    assert "prepare merge" in merge and "--reshard" in merge and "afterok" in merge
    _bash_syntax_ok(array, tmp_path)
    # one quoted glob: one task per file it matches
    text = _render(capsys, "prepare", f"{tmp_path}/*.jsonl", "--output", "out", "--tokenizer", "tok")
    assert "#SBATCH --array=0-2" in text and "--num-jobs 3" in text
    # one part: the task writes the dataset itself, and there is no merge job (it failed: no parts to merge)
    text = _render(capsys, "prepare", str(tmp_path / "a.jsonl"), "--output", "out", "--tokenizer", "tok")
    assert "--num-jobs 1" in text and "merge job" not in text and "--job-index" not in text


def test_counts_missing_inputs_and_spaces(capsys, tmp_path):
    for args, message in ((["train", "--config", TINY, "--nodes", "0"], "--nodes 0: must be at least 1"),
                          (["train", "--config", TINY, "--signal-before", "-5"], "--signal-before -5: must be 0"),
                          (["train", "--config", TINY, "--gpus-per-node", "8", "--procs-per-node", "2"],
                           "give one"),
                          (["prepare", str(tmp_path / "nope.jsonl"), "--output", "o", "--tokenizer", "t"],
                           "nope.jsonl (no such file)"),
                          (["prepare", TINY, "--output", "o", "--tokenizer", "t", "--num-jobs", "-3"],
                           "--num-jobs -3: must be at least 1")):
        assert main(["slurm", *args, "--dry-run"]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("megatron-mega slurm: error: ") and message in err, err
    # sbatch splits an unquoted directive at a space ("Invalid directive found in batch script")
    text = _render(capsys, "train", "--config", TINY, "--workdir", str(tmp_path / "my dir"), "--job-name", "a b")
    assert f'#SBATCH --output="{tmp_path}/my dir/runs/slurm/%x-%j.out"' in text
    assert '#SBATCH --job-name="a b"' in text
