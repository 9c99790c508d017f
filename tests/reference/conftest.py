"""Fixtures of the parity tests against transformers 4.57.6, the last release with MEGA.

transformers cannot share our virtual environment (it pins huggingface_hub<1.0), so it runs in its own one,
`.venv-hf`, as a subprocess: `hf_runner.py` takes a JSON list of jobs and answers with safetensors files. Each test
module batches all its jobs into one call, because importing transformers alone costs seconds.

The reference interpreter is `$MEGA_REFERENCE_PYTHON`, else `<repo>/.venv-hf/bin/python`. When it is missing the
parity tests are skipped, except under CI (`CI=true`), where they fail: CI creates it and must not pass vacuously.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).resolve().parent / "hf_runner.py"
REFERENCE_TRANSFORMERS_VERSION = "4.57.6"
SETUP_HINT = "create it with `bash launch/setup_env.sh --reference` (or point MEGA_REFERENCE_PYTHON at a python " \
             f"that has torch and transformers=={REFERENCE_TRANSFORMERS_VERSION})"


def reference_python_path() -> Path:
    """`$MEGA_REFERENCE_PYTHON`, else the repository's `.venv-hf/bin/python` (found from this file, not the cwd)."""
    configured = os.environ.get("MEGA_REFERENCE_PYTHON")
    if configured:
        return Path(configured).expanduser()
    scripts = "Scripts" if sys.platform == "win32" else "bin"
    return REPO_ROOT / ".venv-hf" / scripts / ("python.exe" if sys.platform == "win32" else "python")


def reference_unavailable(reason: str) -> None:
    """Skip, or fail under CI, where a missing reference environment is a broken setup, not an optional extra."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but the transformers reference is unavailable: {reason}", pytrace=False)
    pytest.skip(f"transformers reference unavailable: {reason}")


@pytest.fixture(scope="session")
def reference_python() -> Path:
    path = reference_python_path()
    source = "MEGA_REFERENCE_PYTHON" if os.environ.get("MEGA_REFERENCE_PYTHON") else "the default location"
    if not path.exists():
        reference_unavailable(f"no interpreter at {path} ({source}); {SETUP_HINT}")
    if not os.access(path, os.X_OK):
        reference_unavailable(f"{path} ({source}) is not executable; {SETUP_HINT}")
    return path


def _subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONSAFEPATH")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               TRANSFORMERS_NO_ADVISORY_WARNINGS="1", TOKENIZERS_PARALLELISM="false",
               # tiny models: one thread is faster than two that spin against each other (and against us)
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


@pytest.fixture(scope="session")
def reference_runner(reference_python: Path) -> Callable[[list[dict], Path], dict]:
    """run(jobs, workdir) -> the runner's status report: {"transformers_version", "jobs": {name: status}}.

    One subprocess for the whole list. A job that raises inside transformers is recorded in its status (some tests
    expect that); a runner that dies, or a wrong transformers version, is reported here."""

    def run(jobs: list[dict], workdir: Path) -> dict:
        workdir = Path(workdir)
        jobs_path, status_path = workdir / "jobs.json", workdir / "status.json"
        jobs_path.write_text(json.dumps(jobs, indent=1), encoding="utf-8")
        try:
            proc = subprocess.run([str(reference_python), str(RUNNER), str(jobs_path), str(status_path)],
                                  cwd=workdir, env=_subprocess_env(), capture_output=True, text=True, timeout=900)
        except OSError as err:
            reference_unavailable(f"cannot start {reference_python}: {err}; {SETUP_HINT}")
        if proc.returncode != 0 or not status_path.exists():
            tail = (proc.stdout + proc.stderr)[-4000:]
            if "No module named 'transformers'" in tail or "No module named 'torch'" in tail:
                reference_unavailable(f"{reference_python} lacks torch/transformers; {SETUP_HINT}")
            pytest.fail(f"hf_runner.py exited with {proc.returncode} under {reference_python}:\n{tail}",
                        pytrace=False)
        status = json.loads(status_path.read_text(encoding="utf-8"))
        version = status.get("transformers_version")
        if version != REFERENCE_TRANSFORMERS_VERSION:
            reference_unavailable(f"{reference_python} has transformers {version}, the parity tests need "
                                  f"{REFERENCE_TRANSFORMERS_VERSION}; {SETUP_HINT}")
        return status

    return run
