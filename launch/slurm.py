"""SLURM batch scripts from a training config: render, print (--dry-run) or submit with sbatch.

Training job (`render_train_script`):
- `--launcher torchrun` (default): `srun` starts one torchrun per node (`--ntasks-per-node=1`); the torchruns meet in a
  c10d rendezvous on the first node of `scontrol show hostnames $SLURM_JOB_NODELIST`, each starts
  `--procs-per-node` workers. `--launcher direct`: `srun` starts one task per process and the trainer reads its rank
  from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID (megatron_mega.training.distributed), MASTER_ADDR = the first node.
- Preemption: `#SBATCH --signal=B:USR1@N` asks SLURM to signal the batch shell N seconds before the time limit. The
  script's USR1 trap sends SIGTERM to the job step's processes (launchers and workers); the trainer finishes its
  step, saves a checkpoint and exits 0; the script then runs `scontrol requeue $SLURM_JOB_ID`, and the requeued job
  resumes from checkpoint.dir automatically. A preempted job that already finished training is not requeued.
  torchrun waits N seconds for its workers (TORCH_ELASTIC_SHUTDOWN_TIMEOUT, 30 s by default) and srun lets the
  other nodes finish for N seconds after the first task ends (`--wait`): a node done saving never kills one still
  saving. Only this run's log lines count (a requeued job appends to the same files).
- Cancel: `scancel` (SIGTERM to the batch shell and the steps) lets the trainer save and stop too, but the job is
  not requeued: only USR1 means preemption. Without a signal (`--signal-before 0`) SLURM's SIGTERM at the time
  limit cannot be told from a scancel, so such a job is not requeued either.
- Failure: the script exits with srun's exit code when srun fails, so the job is FAILED, never COMPLETED; the other
  nodes' tasks are stopped N seconds after the first one failed (or, without a signal, 120 s).
- Logs: LOG_DIR/NAME-JOBID.out (the batch script: resolved config, the command, exit status; appended across
  requeues) and LOG_DIR/NAME-JOBID/node<N>-task<T>.out per srun task (torchrun prefixes each worker's lines with
  its local rank; with `direct` the task id is the rank).

Data preparation (`render_prepare_scripts`): an array job, one task per input part (`prepare tokenize --num-jobs K`,
`--job-index $SLURM_ARRAY_TASK_ID`, so one task resubmitted alone with `sbatch --array=i` redoes part i), and a
merge job submitted with `--dependency=afterok:ARRAY_ID`; with K = 1 the single task writes the dataset itself
and there is no merge job.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Optional, Sequence

from launch.local import TRAIN_MODULE, train_command

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class SlurmError(RuntimeError):
    pass


@dataclass
class JobResources:
    """What the job asks SLURM for, and how its environment is set up."""

    job_name: str = "mega-train"
    nodes: int = 1
    procs_per_node: int = 1
    gpus_per_node: int = 0
    cpus_per_task: Optional[int] = None
    partition: Optional[str] = None
    account: Optional[str] = None
    time: Optional[str] = None
    mem: Optional[str] = None
    log_dir: str = "runs/slurm"
    workdir: str = ROOT
    venv: Optional[str] = None
    container: Optional[str] = None
    container_mounts: Optional[str] = None
    setup: list = field(default_factory=list)
    python: str = "python"
    extra_sbatch: list = field(default_factory=list)


def _q(value: str) -> str:
    return shlex.quote(str(value))


def _directive(value: str) -> str:
    """An #SBATCH value: sbatch splits directives at spaces unless the value is double-quoted."""
    value = str(value)
    if '"' in value:
        raise SlurmError(f"{value!r}: a double quote cannot appear in an #SBATCH value")
    return f'"{value}"' if any(c.isspace() for c in value) else value


def _sbatch_lines(res: JobResources, ntasks_per_node: int, output: str) -> list[str]:
    lines = [f"#SBATCH --job-name={_directive(res.job_name)}", f"#SBATCH --nodes={res.nodes}",
             f"#SBATCH --ntasks-per-node={ntasks_per_node}", f"#SBATCH --output={_directive(output)}",
             "#SBATCH --open-mode=append"]
    if res.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={res.gpus_per_node}")
    if res.cpus_per_task:
        lines.append(f"#SBATCH --cpus-per-task={res.cpus_per_task}")
    for flag, value in (("partition", res.partition), ("account", res.account), ("time", res.time),
                        ("mem", res.mem)):
        if value:
            lines.append(f"#SBATCH --{flag}={value}")
    lines += [f"#SBATCH {arg}" for arg in res.extra_sbatch]
    return lines


def _environment_lines(res: JobResources, threads: Optional[int]) -> list[str]:
    lines = [f"cd {_q(res.workdir)}"]
    lines += list(res.setup)
    if res.venv and not res.container:
        lines.append(f"source {_q(os.path.join(res.venv, 'bin', 'activate'))}")
    lines.append(f"export OMP_NUM_THREADS=${{OMP_NUM_THREADS:-{threads or 1}}}")
    lines.append("export PYTHONUNBUFFERED=1")
    if not res.gpus_per_node:
        lines.append("export DS_ACCELERATOR=${DS_ACCELERATOR:-cpu}")
    return lines


def _srun_container(res: JobResources) -> list[str]:
    if not res.container:
        return []
    args = [f"--container-image={res.container}", f"--container-workdir={res.workdir}"]
    if res.container_mounts:
        args.append(f"--container-mounts={res.container_mounts}")
    return args


def render_train_script(config: str, overrides: Sequence[str], res: JobResources, *, launcher: str = "torchrun",
                        signal_before_s: int = 120, requeue: bool = True, resolved_config: str = "") -> str:
    """The sbatch script for a training run (see the module docstring)."""
    if launcher not in ("torchrun", "direct"):
        raise SlurmError(f"--launcher {launcher!r}: torchrun or direct")
    procs = res.gpus_per_node or res.procs_per_node
    world = res.nodes * procs
    log_dir = os.path.abspath(os.path.join(res.workdir, res.log_dir))
    ntasks_per_node = 1 if launcher == "torchrun" else procs
    head = ["#!/bin/bash", *_sbatch_lines(res, ntasks_per_node, f"{log_dir}/%x-%j.out")]
    if signal_before_s:
        head.append(f"#SBATCH --signal=B:USR1@{signal_before_s}")
    head.append("#SBATCH --requeue" if requeue else "#SBATCH --no-requeue")
    grace = max(30, signal_before_s) if signal_before_s else 120  # seconds to let a stopping job finish
    if launcher == "torchrun":
        cmd = train_command(config, overrides, procs, python=res.python, nnodes=res.nodes,
                            rdzv_endpoint="$MASTER_ADDR:$RDZV_PORT", rdzv_id="$SLURM_JOB_ID")
        # torchrun prefixes each worker's lines with its rank ("[default0]:") so a node's log stays readable
        cmd.insert(cmd.index("-m", 2), "--tee=3")
    else:
        cmd = train_command(config, overrides, python=res.python, launcher="direct")
    # $VARS must expand in the script: quote everything else
    train = " ".join(part if part.startswith("--rdzv") else _q(part) for part in cmd)
    threads = res.cpus_per_task // procs if res.cpus_per_task and launcher == "torchrun" else res.cpus_per_task
    body = [
        "# generated by `megatron-mega slurm train`; edit the config and regenerate rather than this file",
        "set -uo pipefail", *_environment_lines(res, max(1, threads or 1)),
        # after a SIGTERM torchrun waits this long for its workers before killing them mid-save (default 30 s;
        # the variable rather than --shutdown-timeout, which torchrun before 2.11 refuses)
        *([f"export TORCH_ELASTIC_SHUTDOWN_TIMEOUT={grace}"] if launcher == "torchrun" else []),
        f"LOG_DIR={_q(log_dir)}",
        'RUN_LOGS="$LOG_DIR/${SLURM_JOB_NAME}-${SLURM_JOB_ID}"',
        'mkdir -p "$RUN_LOGS"',
        'export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)',
        "# two ports per job id, so jobs sharing a node never collide "
        "(the store for --launcher direct, the rendezvous)",
        "export MASTER_PORT=$((20000 + (SLURM_JOB_ID % 10000) * 2))",
        "RDZV_PORT=$((MASTER_PORT + 1))",
        'echo "=== job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST at $(date -Is); '
        f'{res.nodes} node(s) x {procs} process(es) = world {world}, launcher {launcher}; '
        'master $MASTER_ADDR:$MASTER_PORT"',
        "cat <<'MEGA_RESOLVED_CONFIG'",
        "# resolved training config",
        resolved_config.rstrip("\n"),
        "MEGA_RESOLVED_CONFIG",
        "",
        "PREEMPTED=0",
        "CANCELLED=0",
        "on_preempt() {  # SLURM's --signal before the time limit, or scancel --signal=USR1 --batch",
        '  [ "$PREEMPTED" = 1 ] && return',
        "  PREEMPTED=1",
        '  echo "=== $(date -Is) caught USR1: asking the training to checkpoint and stop"',
        "  # SIGTERM to the job steps' processes (not to srun: srun would kill its tasks at once). torchrun passes",
        "  # it on to its workers and waits for them; the trainer finishes its step, saves and exits 0.",
        '  scancel --signal=TERM "$SLURM_JOB_ID"',
        "}",
        "on_cancel() {  # scancel (or the time limit without --signal): SLURM signals the steps too; never requeued",
        "  CANCELLED=1",
        '  echo "=== $(date -Is) caught SIGTERM (scancel, or the time limit): the training checkpoints and stops; '
        'not requeued"',
        "}",
        "trap on_preempt USR1",
        "trap on_cancel TERM",
        "",
        # kill-on-bad-exit off, --wait on: after a signal, torchrun exits non-zero when its workers are done, and
        # the first node to finish must not kill the others while they are still saving
        f"SRUN=(srun --kill-on-bad-exit=0 --wait={grace} --open-mode=append --ntasks-per-node={ntasks_per_node} "
        f"{' '.join(_q(a) for a in _srun_container(res))} "
        '--output="$RUN_LOGS/node%n-task%t.out")',
        f"TRAIN=({train})",
        "# a requeued job appends to the same task logs: only what this run writes is read after it",
        "declare -A LOG_SIZE=()",
        'for f in "$RUN_LOGS"/node*-task*.out; do [ -e "$f" ] && LOG_SIZE["$f"]=$(stat -c %s "$f"); done',
        "this_run() {",
        '  for f in "$RUN_LOGS"/node*-task*.out; do',
        '    [ -e "$f" ] && tail -c +$(( ${LOG_SIZE["$f"]:-0} + 1 )) "$f"',
        "  done",
        "}",
        'echo "+ ${SRUN[*]} ${TRAIN[*]}"',
        '"${SRUN[@]}" "${TRAIN[@]}" &',
        "SRUN_PID=$!",
        "while true; do",
        '  wait "$SRUN_PID"; rc=$?',
        '  kill -0 "$SRUN_PID" 2>/dev/null || break   # wait returned because of the trap: keep waiting',
        "done",
        'echo "=== $(date -Is) srun exited with $rc"',
        "# rank 0's lines: on whichever node the launcher put it",
        "# grep without -q reads to the end: -q would stop early, tail then dies of SIGPIPE, and pipefail says no",
        'if this_run | grep -F "stopped: finished" >/dev/null; then FINISHED=1; else FINISHED=0; fi',
        'if this_run | grep -F "stopped by signal at iteration" >/dev/null; then SAVED=1; else SAVED=0; fi',
        'if [ "$CANCELLED" = 1 ] && [ "$PREEMPTED" = 0 ]; then',
        '  [ "$SAVED" = 1 ] && echo "=== cancelled; stopped with a checkpoint" || '
        'echo "=== cancelled (srun exit code $rc)"',
        '  exit "$rc"',
        "fi",
        'if [ "$PREEMPTED" = 1 ]; then',
        '  if [ "$FINISHED" = 1 ]; then',
        '    echo "=== training had already finished: not requeued"; exit 0',
        "  fi",
        '  [ "$SAVED" = 1 ] && echo "=== stopped with a checkpoint" || '
        'echo "=== stopped without a new checkpoint (srun exit code $rc)"',
        *(['  echo "=== requeueing job $SLURM_JOB_ID; it resumes from its newest checkpoint"',
           '  scontrol requeue "$SLURM_JOB_ID" && exit 0',
           '  echo "=== scontrol requeue failed" >&2; exit 1'] if requeue else
          ['  echo "=== --no-requeue: resubmit to resume"',
           '  [ "$SAVED" = 1 ] && exit 0 || exit "$rc"']),
        "fi",
        'if [ "$rc" != 0 ]; then echo "=== training failed (srun exit code $rc)" >&2; exit "$rc"; fi',
        'echo "=== training finished"',
    ]
    return "\n".join(head + [""] + body) + "\n"


def render_prepare_scripts(inputs: Sequence[str], output: str, tokenizer: str, res: JobResources, *,
                           num_jobs: Optional[int] = None, workers: int = 1,
                           tokenize_args: Sequence[str] = (), reshard: bool = False) -> tuple[str, str]:
    """(array script, merge script or None): `prepare tokenize --num-jobs K` as an array of K tasks, then `prepare
    merge`; with K = 1 one task writes the dataset itself (no parts, no merge). K defaults to one task per input
    file (globs and folders expanded), at most MAX_DEFAULT_TASKS."""
    if num_jobs is not None and num_jobs < 1:
        raise SlurmError(f"--num-jobs {num_jobs}: must be at least 1")
    if workers < 1:
        raise SlurmError(f"--workers {workers}: must be at least 1")
    k = num_jobs or max(1, min(MAX_DEFAULT_TASKS, len(_input_files(inputs))))
    log_dir = os.path.abspath(os.path.join(res.workdir, res.log_dir))
    cli = [res.python, "-m", "megatron_mega.cli", "prepare"]
    # inputs as absolute paths: the job runs in --workdir, not necessarily here
    tok = [*cli, "tokenize", *(i if os.path.isabs(i) else os.path.abspath(i) for i in inputs), "--output", output,
           "--tokenizer", tokenizer, "--num-jobs", str(k), "--workers", str(workers), "--no-progress",
           *tokenize_args]
    job_index = ["--job-index", "$SLURM_ARRAY_TASK_ID"] if k > 1 else []
    # the worker processes need their cores: one per worker unless --cpus-per-task says otherwise
    array_res = JobResources(**{**res.__dict__, "nodes": 1, "job_name": f"{res.job_name}-tokenize",
                                "cpus_per_task": res.cpus_per_task or (workers if workers > 1 else None)})
    array = ["#!/bin/bash", *_sbatch_lines(array_res, 1, f"{log_dir}/%x-%A_%a.out"), f"#SBATCH --array=0-{k - 1}",
             "# generated by `megatron-mega slurm prepare`: one task per input part",
             "set -euo pipefail", *_environment_lines(res, workers),
             'echo "=== array task $SLURM_ARRAY_TASK_ID of job $SLURM_ARRAY_JOB_ID on $SLURMD_NODENAME"',
             f"CMD=({' '.join(_q(c) for c in tok)} {' '.join(job_index)})", 'echo "+ ${CMD[*]}"', '"${CMD[@]}"']
    if k == 1:
        return "\n".join(array) + "\n", None
    merge_res = JobResources(**{**res.__dict__, "nodes": 1, "job_name": f"{res.job_name}-merge"})
    merge = ["#!/bin/bash", *_sbatch_lines(merge_res, 1, f"{log_dir}/%x-%j.out"),
             "# generated by `megatron-mega slurm prepare`: runs after every array task succeeded",
             "set -euo pipefail", *_environment_lines(res, 1),
             f"CMD=({' '.join(_q(c) for c in [*cli, 'merge', output, *(['--reshard'] if reshard else [])])})",
             'echo "+ ${CMD[*]}"', '"${CMD[@]}"']
    return "\n".join(array) + "\n", "\n".join(merge) + "\n"


MAX_DEFAULT_TASKS = 256  # array tasks when --num-jobs is not given (one per input file up to this)


def _input_files(inputs: Sequence[str]) -> list[str]:
    """The files `prepare tokenize` will read (globs and folders expanded); refuses inputs that do not exist."""
    from data_prep.errors import PrepareError
    from data_prep.sources import expand_inputs

    try:
        return expand_inputs(list(inputs))
    except PrepareError as err:
        raise SlurmError(str(err)) from None


def sbatch(script_path: str, *args: str, env: Optional[dict] = None) -> tuple[str, int]:
    """Submit; return (job id, sbatch's exit code: with --wait, the job's). The log folder (from the script's
    --output line) is created first: SLURM cannot open an output file in a missing folder (the job then fails at
    once with exit code 0:53)."""
    with open(script_path, encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("#SBATCH --output="):
                os.makedirs(os.path.dirname(line.split("=", 1)[1].strip().strip('"')), exist_ok=True)
    try:
        out = subprocess.run(["sbatch", "--parsable", *args, script_path], capture_output=True, text=True, env=env)
    except FileNotFoundError:
        raise SlurmError("sbatch not found: run this on a SLURM login node (or use --dry-run)") from None
    job = out.stdout.strip().split("\n")[0].split(";")[0]
    if out.returncode != 0 and not ("--wait" in args and job.isdigit()):
        raise SlurmError(f"sbatch {script_path} failed (exit code {out.returncode}): "
                         f"{out.stderr.strip() or out.stdout.strip() or 'no message'}")
    return job, out.returncode


def write_script(text: str, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.chmod(path, 0o755)
    return path


def default_venv() -> Optional[str]:
    return sys.prefix if sys.prefix != sys.base_prefix else None


__all__ = ["JobResources", "SlurmError", "render_train_script", "render_prepare_scripts", "sbatch", "write_script",
           "TRAIN_MODULE"]
