"""Fixtures for the launch tests: a real Slurm cluster (session-scoped; skipped when Slurm is not installed, an
error under CI=true) and the pydoc dataset of the training tests."""

from __future__ import annotations

import os

import pytest

from tests.launch.slurm_cluster import SlurmCluster, ensure_hosts, missing_binaries
from tests.training.conftest import pydoc_dataset, tiny_dict  # noqa: F401


def _unavailable(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true but the Slurm cluster cannot run: {reason} (.ci/run installs slurmctld slurmd "
                    f"slurm-client munge)")
    pytest.skip(f"no Slurm cluster: {reason}; install Debian's slurmctld slurmd slurm-client (see .ci/run)")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    missing = missing_binaries()
    if missing:
        _unavailable(f"missing {', '.join(missing)}")
    why = ensure_hosts()
    if why:
        _unavailable(why)
    cluster = SlurmCluster(str(tmp_path_factory.mktemp("slurm")))
    try:
        cluster.start()
    except Exception as err:  # noqa: BLE001 - a cluster that cannot start is a skip locally, a failure in CI
        cluster.stop()
        _unavailable(f"it did not start: {err}")
    yield cluster
    cluster.stop()
