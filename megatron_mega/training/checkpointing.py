"""DeepSpeed checkpoints plus the trainer's own state, resumable exactly.

    <dir>/step00000040/          DeepSpeed's files (model, optimizer partitions, lr schedule) + client state
    <dir>/step00000040/rng-rank00003.pt   each rank's RNG states (python, numpy, torch; CUDA's on a GPU)
    <dir>/step00000040/trainer_state.json  format_version, step, consumed samples, sampler state, layout, config,
                                           tokenizer sha256, weight decay rule, gradient accumulation dtype
    <dir>/latest                 the newest complete tag (the file DeepSpeed's load_checkpoint reads)
    <dir>/step00000040-universal/  made on resume when the layout changed (DeepSpeed's ds_to_universal)

`format_version` (in trainer_state.json and DeepSpeed's client state) numbers the layout of these files as the
converter and the resume path read them; a reader refuses a version newer than FORMAT_VERSION instead of guessing.
Checkpoints written before the field existed have none and are version 1 (the layout they were written in).

Every rank writes its part, then all wait at a barrier; only then does rank 0 move `latest` (atomically) and delete
checkpoints beyond `keep_last`. A run killed while saving leaves `latest` at the previous complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import shutil
import subprocess
import sys
import time
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_mega.atomic_io import atomic_write_text
from megatron_mega.training.config import TrainConfigError

logger = logging.getLogger(__name__)
LATEST = "latest"
TAG_PREFIX = "step"
STATE_FILE = "trainer_state.json"
UNIVERSAL_SUFFIX = "-universal"
# the checkpoint layout this code writes and reads; bump when a reader could misread an older writer's files
FORMAT_VERSION = 1
FORMAT_FIELD = "format_version"


class CheckpointFormatError(TrainConfigError, RuntimeError):
    """A checkpoint written in a format this code does not read (a newer megatron_mega, or a damaged state file).
    A TrainConfigError too: a run told to resume from it stops with this one line, before anything starts."""


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def rng_state() -> dict[str, Any]:
    """This process's generators. On a GPU also the current device's: dropout draws its masks there, from a
    generator torch.get_rng_state does not hold."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> bool:
    """Restores `rng_state()`'s generators; False when this process has a GPU and the state holds none for it
    (saved on the CPU): the caller seeds the device's generator instead."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if not torch.cuda.is_available():
        return True
    if "cuda" not in state:
        return False
    torch.cuda.set_rng_state(state["cuda"])
    return True


def latest_tag(directory: str) -> Optional[str]:
    path = os.path.join(directory, LATEST)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as fh:
        return fh.read().strip() or None


class CheckpointSaveError(RuntimeError):
    """This rank could not write its part of a checkpoint (a full disk, a quota, a lost mount)."""


def save(engine, directory: str, step: int, client_state: dict[str, Any], rank: int, keep_last: int) -> str:
    tag = tag_for(step)
    client_state = {FORMAT_FIELD: FORMAT_VERSION, **client_state}
    folder = os.path.join(directory, tag)
    try:
        engine.save_checkpoint(directory, tag=tag, client_state=client_state, save_latest=False)
        os.makedirs(folder, exist_ok=True)
        torch.save(rng_state(), os.path.join(folder, f"rng-rank{rank:05d}.pt"))
        if rank == 0:
            atomic_write_text(os.path.join(folder, STATE_FILE),
                              json.dumps(client_state, indent=1, default=str) + "\n")
    except (OSError, RuntimeError) as err:
        # torch reports a full disk as "basic_ios::clear: iostream error": say what was being written
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise CheckpointSaveError(f"rank {rank} could not write its part of checkpoint {folder} ({reason}; a full "
                                  f"disk or quota?). {os.path.join(directory, LATEST)} still names the previous "
                                  f"checkpoint") from err
    dist.barrier()  # every rank has written its part
    if rank == 0:
        atomic_write_text(os.path.join(directory, LATEST), tag + "\n")
        if keep_last > 0:
            _prune(directory, keep_last)
    dist.barrier()
    return folder


def _prune(directory: str, keep_last: int) -> None:
    tags = sorted(name for name in os.listdir(directory) if name.startswith(TAG_PREFIX)
                  and not name.endswith(UNIVERSAL_SUFFIX) and os.path.isdir(os.path.join(directory, name)))
    for old in tags[:-keep_last]:
        shutil.rmtree(os.path.join(directory, old), ignore_errors=True)
        shutil.rmtree(os.path.join(directory, old + UNIVERSAL_SUFFIX), ignore_errors=True)


def format_version(state: dict[str, Any], path: str) -> int:
    """The checkpoint format of a trainer state read from `path`; refuses one this code cannot read.

    A state without the field was written before versions existed, in the layout that became version 1."""
    version = state.get(FORMAT_FIELD, 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise CheckpointFormatError(f"{path}: field {FORMAT_FIELD!r} is {version!r}, not a checkpoint format version "
                                    f"(a positive integer)")
    if version > FORMAT_VERSION:
        raise CheckpointFormatError(f"{path}: field {FORMAT_FIELD!r} is {version}, newer than the checkpoint format "
                                    f"this megatron_mega reads ({FORMAT_VERSION}); read it with the megatron_mega "
                                    f"version that wrote it")
    return version


def read_state(directory: str, tag: str) -> dict[str, Any]:
    """The trainer state of `directory/tag` (trainer_state.json), its format version checked."""
    path = os.path.join(directory, tag, STATE_FILE)
    try:
        with open(path, encoding="utf-8") as fh:
            state = json.load(fh)
    except FileNotFoundError:
        raise CheckpointFormatError(f"{path}: missing; {directory}/{tag} is not a checkpoint written by this "
                                    f"trainer") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointFormatError(f"{path}: not a JSON trainer state ({err})") from None
    if not isinstance(state, dict):
        raise CheckpointFormatError(f"{path}: not a JSON object")
    format_version(state, path)
    return state


UNIVERSAL_WORKERS = 4  # ds_to_universal's extract and merge processes (at most the CPUs there are)
_POLL_S = 2.0
RANK_0_WAIT_S = 6 * 3600  # the other ranks' patience: a rank 0 that died without a note fails the job then


def made_by_rank_0(done: str, make: Callable[[], None], rank: int, what: str) -> None:
    """Rank 0 runs `make()` unless `done` (a path it creates last) exists; the other ranks wait for `done`, or for
    rank 0's failure note, on the file system every rank shares, and meet rank 0 in a barrier once it is there.

    Such work (a universal checkpoint, a large checkpoint's weights) takes minutes for a large model, longer than
    the collective timeout (parallel.timeout_s) a barrier would wait. A failure on rank 0 fails every rank with its
    message; a config error stays one (TrainConfigError) everywhere."""
    failed = done + ".failed"
    if rank == 0 and os.path.exists(failed):
        os.remove(failed)  # an earlier attempt's: removed before the others start looking for one
    dist.barrier()
    if rank == 0:
        if not os.path.exists(done):
            try:
                make()
            except BaseException as err:
                atomic_write_text(failed, json.dumps({"config_error": isinstance(err, TrainConfigError),
                                                      "message": str(err)}))
                raise
    else:
        deadline = time.monotonic() + RANK_0_WAIT_S
        while not os.path.exists(done):
            if time.monotonic() > deadline:
                raise RuntimeError(f"{done}: rank 0 has not made {what} in {RANK_0_WAIT_S // 3600} hours")
            if os.path.exists(failed):
                with open(failed, encoding="utf-8") as fh:
                    note = json.load(fh)
                if note.get("config_error"):
                    raise TrainConfigError(note["message"])
                message = note["message"]
                if len(message) > 2000:  # its first line says what failed, its end why
                    message = f"{message[:400]} [...] {message[-1500:]}"
                raise RuntimeError(f"rank 0 could not make {what}: {message}")
            time.sleep(_POLL_S)
    dist.barrier()


def convert_to_universal(directory: str, tag: str, rank: int) -> str:
    """DeepSpeed's universal checkpoint of `tag` (made once, by rank 0, beside it); returns its tag. Needed to
    resume with another data-parallel size or pipeline stage count: the optimizer partitions are re-cut on load."""
    target = tag + UNIVERSAL_SUFFIX
    out = os.path.join(directory, target)
    # the folder is renamed into place complete, so its existence is the sign
    made_by_rank_0(out, lambda: _run_ds_to_universal(directory, tag, out), rank,
                   f"the universal checkpoint of {directory}/{tag}")
    return target


def _run_ds_to_universal(directory: str, tag: str, out: str) -> None:
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    workers = str(max(1, min(UNIVERSAL_WORKERS, os.cpu_count() or 1)))
    command = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
               os.path.join(directory, tag), "--output_folder", tmp, "--inject_missing_state",
               "--num_extract_workers", workers, "--num_merge_workers", workers]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"converting {directory}/{tag} to a universal checkpoint failed:\n"
                           f"{done.stdout[-2000:]}{done.stderr[-2000:]}")
    shutil.copy(os.path.join(directory, tag, STATE_FILE), os.path.join(tmp, STATE_FILE))
    os.replace(tmp, out)


def load(engine, directory: str, rank: int, tag: Optional[str] = None) -> Optional[dict[str, Any]]:
    """Load the checkpoint `tag` (default: `latest`) into the engine; returns the trainer state (None: nothing to
    load). Restores this rank's RNG state when the checkpoint has one for this rank (a universal one has none)."""
    tag = tag or latest_tag(directory)
    if tag is None:
        return None
    try:
        path, client = engine.load_checkpoint(directory, tag=tag, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
    except (EOFError, pickle.UnpicklingError) as err:
        raise CheckpointFormatError(f"{directory}/{tag}: a file cannot be read ({err}); the checkpoint is damaged "
                                    f"or incomplete: resume an earlier step") from None
    except RuntimeError as err:
        if "PytorchStreamReader" not in str(err) and "zip archive" not in str(err):
            raise  # not a damaged file: a real error, with its traceback
        raise CheckpointFormatError(f"{directory}/{tag}: a file cannot be read ({str(err).splitlines()[0]}); the "
                                    f"checkpoint is damaged or incomplete: resume an earlier step") from None
    if path is None:
        raise RuntimeError(f"{directory}/{tag}: DeepSpeed could not load this checkpoint")
    state = read_state(directory, tag)
    rng_file = os.path.join(directory, tag, f"rng-rank{rank:05d}.pt")
    if os.path.exists(rng_file):
        if not set_rng_state(torch.load(rng_file, weights_only=False)):
            logger.warning("%s: no GPU RNG state for rank %d (saved without a GPU); the GPU's reseeded", rng_file,
                           rank)
            state["_device_rng_missing"] = True
    else:
        logger.warning("%s: no RNG state for rank %d (the layout changed); RNG reseeded", rng_file, rank)
        state["_rng_missing"] = True
    return state
