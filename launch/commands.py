"""`megatron-mega slurm train|prepare`: render an sbatch script (print it with --dry-run) or submit it.

    megatron-mega slurm train --config configs/train/wikitext103.yaml --nodes 2 --gpus-per-node 8 \\
        --partition gpu --account proj --time 24:00:00 --venv .venv optim.lr=5e-4 --dry-run
    megatron-mega slurm prepare 'corpus/*.jsonl' --output data/corpus --tokenizer data/tok --num-jobs 16
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def _add_resource_options(p: argparse.ArgumentParser, job_name: str) -> None:
    g = p.add_argument_group("SLURM resources and environment")
    g.add_argument("--job-name", default=job_name)
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--partition", default=None)
    g.add_argument("--account", default=None)
    g.add_argument("--time", default=None, help="time limit, e.g. 24:00:00")
    g.add_argument("--mem", default=None, help="memory per node, e.g. 200G")
    g.add_argument("--cpus-per-task", type=int, default=None)
    g.add_argument("--venv", default=None, help="virtual environment to activate (default: the one running this)")
    g.add_argument("--no-venv", action="store_true", help="activate no virtual environment")
    g.add_argument("--container", default=None, help="container image for srun (pyxis --container-image)")
    g.add_argument("--container-mounts", default=None)
    g.add_argument("--setup", action="append", default=[], help="a shell line run first (e.g. 'module load cuda')")
    g.add_argument("--python", default="python", help="the interpreter inside the job (default: python on PATH)")
    g.add_argument("--log-dir", default="runs/slurm", help="relative to --workdir (default runs/slurm)")
    g.add_argument("--workdir", default=os.getcwd(), help="where the job runs (default: here)")
    g.add_argument("--sbatch-arg", action="append", default=[], help="an extra #SBATCH line, e.g. --qos=high")
    g.add_argument("--script", default=None, help="where to write the script (default: LOG_DIR/NAME.sbatch)")
    g.add_argument("--dry-run", action="store_true", help="print the script(s), submit nothing")
    g.add_argument("--wait", action="store_true", help="sbatch --wait: return when the job ends, with its exit code")


def add_commands(subparsers) -> None:
    slurm = subparsers.add_parser("slurm", help="render and submit SLURM jobs: training, data preparation",
                                  description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = slurm.add_subparsers(dest="slurm_command", required=True, metavar="JOB")

    train = kinds.add_parser("train", help="a (multi-node) training job with preemption requeue")
    train.add_argument("--config", required=True, help="training YAML (validated before anything is submitted)")
    _add_resource_options(train, "mega-train")
    train.add_argument("--gpus-per-node", type=int, default=0, help="GPUs per node = processes per node")
    train.add_argument("--procs-per-node", type=int, default=1, help="processes per node without GPUs (CPU)")
    train.add_argument("--launcher", choices=("torchrun", "direct"), default="torchrun",
                       help="torchrun: one torchrun per node with a c10d rendezvous (default); direct: one srun "
                            "task per process, ranks from SLURM variables")
    train.add_argument("--signal-before", type=int, default=120, metavar="SECONDS",
                       help="SLURM signals the job this long before its time limit: checkpoint and requeue "
                            "(0: no signal)")
    train.add_argument("--no-requeue", action="store_true", help="do not requeue after the signal")
    train.add_argument("overrides", nargs="*", help="dotted training overrides")
    train.set_defaults(func=cmd_slurm_train)

    prep = kinds.add_parser("prepare", help="tokenize as an array job (one task per part), then a dependent merge")
    prep.add_argument("inputs", nargs="+", metavar="INPUT")
    prep.add_argument("--output", required=True)
    prep.add_argument("--tokenizer", required=True)
    prep.add_argument("--num-jobs", type=int, default=None,
                      help="array tasks (default: one per input file, globs and folders expanded, at most 256)")
    prep.add_argument("--workers", type=int, default=1, help="tokenizing processes per task")
    prep.add_argument("--tokenize-arg", action="append", default=[],
                      help="extra option for prepare tokenize, e.g. --tokenize-arg=--text-key=content")
    prep.add_argument("--reshard", action="store_true",
                      help="merge rewrites the parts into single-run shards (byte-identical to one process)")
    _add_resource_options(prep, "mega-prepare")
    prep.set_defaults(func=cmd_slurm_prepare)


def _resources(args, **extra):
    from launch.slurm import JobResources, default_venv

    venv = None if args.no_venv else os.path.abspath(args.venv) if args.venv else default_venv()
    return JobResources(job_name=args.job_name, nodes=args.nodes, partition=args.partition, account=args.account,
                        time=args.time, mem=args.mem, cpus_per_task=args.cpus_per_task,
                        log_dir=args.log_dir, workdir=os.path.abspath(args.workdir), venv=venv,
                        container=args.container, container_mounts=args.container_mounts, setup=args.setup,
                        python=args.python, extra_sbatch=args.sbatch_arg, **extra)


def _check_counts(args) -> None:
    """Counts SLURM would take literally (an --array=0--4, a USR1@-5) or divide by: refused before rendering."""
    from launch.slurm import SlurmError

    # (--num-jobs and --workers: render_prepare_scripts checks them)
    positive = [("--nodes", args.nodes)] + [(f"--{n.replace('_', '-')}", getattr(args, n)) for n in
                                            ("procs_per_node", "cpus_per_task") if getattr(args, n, None) is not None]
    for flag, value in positive:
        if value < 1:
            raise SlurmError(f"{flag} {value}: must be at least 1")
    for flag, value in (("--gpus-per-node", getattr(args, "gpus_per_node", 0)),
                        ("--signal-before", getattr(args, "signal_before", 0))):
        if value < 0:
            raise SlurmError(f"{flag} {value}: must be 0 or more")
    if getattr(args, "gpus_per_node", 0) and getattr(args, "procs_per_node", 1) != 1:
        raise SlurmError("--gpus-per-node and --procs-per-node: give one (with GPUs, one process per GPU)")


def _submit(script: str, path: str, args, *sbatch_args: str) -> tuple[str, int]:
    from launch.slurm import sbatch, write_script

    write_script(script, path)
    return sbatch(path, *sbatch_args, *(["--wait"] if args.wait else []))


def cmd_slurm_train(args: argparse.Namespace) -> int:
    import yaml

    from launch.local import checked_config
    from launch.slurm import SlurmError, render_train_script
    from megatron_mega.training.config import TrainConfigError

    try:
        _check_counts(args)
        res = _resources(args, procs_per_node=args.procs_per_node, gpus_per_node=args.gpus_per_node)
        # the batch arithmetic must work for this world size: fail here, not in the queue
        config = checked_config(args.config, args.overrides, args.nodes * (args.gpus_per_node or args.procs_per_node))
        resolved = yaml.safe_dump(config.to_dict(), sort_keys=False)
        script = render_train_script(os.path.abspath(args.config), args.overrides, res, launcher=args.launcher,
                                     signal_before_s=args.signal_before, requeue=not args.no_requeue,
                                     resolved_config=resolved)
        if args.dry_run:
            print(script, end="")
            return 0
        path = args.script or os.path.join(res.workdir, res.log_dir,
                                           f"{args.job_name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch")
        job, code = _submit(script, path, args)
    except (TrainConfigError, SlurmError) as err:
        print(f"megatron-mega slurm: error: {err}", file=sys.stderr)
        return 2
    print(f"submitted job {job}: {path}\n  logs: {os.path.join(res.workdir, res.log_dir)}/{args.job_name}-{job}.out "
          f"and {args.job_name}-{job}/node<N>-task<T>.out")
    if args.wait:
        print(f"job {job} ended with exit code {code}")
    return code


def cmd_slurm_prepare(args: argparse.Namespace) -> int:
    from launch.slurm import SlurmError, render_prepare_scripts, sbatch, write_script

    try:
        _check_counts(args)
        res = _resources(args)
        array, merge = render_prepare_scripts(args.inputs, os.path.abspath(args.output),
                                              os.path.abspath(args.tokenizer), res, num_jobs=args.num_jobs,
                                              workers=args.workers, tokenize_args=args.tokenize_arg,
                                              reshard=args.reshard)
        if args.dry_run:
            print(f"# --- array job (sbatch)\n{array}", end="")
            if merge is not None:
                print(f"\n# --- merge job (sbatch --dependency=afterok:ARRAY_JOB_ID)\n{merge}", end="")
            return 0
        base = args.script or os.path.join(res.workdir, res.log_dir, args.job_name)
        wait = ["--wait"] if args.wait else []
        tasks = array.split("#SBATCH --array=0-", 1)[1].split("\n", 1)[0]
        array_id, code = sbatch(write_script(array, base + "-tokenize.sbatch"), *([] if merge else wait))
        merge_id = None
        if merge is not None:
            merge_id, code = sbatch(write_script(merge, base + "-merge.sbatch"), f"--dependency=afterok:{array_id}",
                                    "--kill-on-invalid-dep=yes", *wait)
    except SlurmError as err:
        print(f"megatron-mega slurm: error: {err}", file=sys.stderr)
        return 2
    print(f"submitted array job {array_id} ({int(tasks) + 1} task(s))"
          + (f" and merge job {merge_id} (after all succeed)" if merge_id else " (one part: no merge)"))
    if args.wait:
        print(f"job {merge_id or array_id} ended with exit code {code}")
    return code
