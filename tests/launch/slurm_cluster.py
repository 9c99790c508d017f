"""A real Slurm cluster on this machine for the tests: one slurmctld and two slurmd "nodes" (node1, node2), all
as root, state in a temporary folder (see ../shared/notes/slurm-in-ci.md). `auth/none`, so no munge daemon."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from typing import Optional

BINARIES = ("slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "scancel", "sacct")
NODES = ("node1", "node2")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES[:-1] if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")]


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def ensure_hosts(names=NODES) -> Optional[str]:
    """node1/node2 must resolve (torchrun's rendezvous and MASTER_ADDR use them): add them to /etc/hosts as root.
    Returns None when they resolve, else why not."""
    missing = []
    for name in names:
        try:
            socket.gethostbyname(name)
        except OSError:
            missing.append(name)
    if not missing:
        return None
    if os.geteuid() != 0:
        return (f"{' '.join(missing)} do not resolve and this is not root: "
                f"add '127.0.0.1 {' '.join(missing)}' to /etc/hosts")
    with open("/etc/hosts", "a", encoding="utf-8") as fh:
        fh.write(f"\n127.0.0.1 {' '.join(missing)}  # megatron_mega tests: Slurm's virtual nodes\n")
    return None


@dataclass
class SlurmCluster:
    root: str
    cpus_per_node: int = 2
    procs: list = field(default_factory=list)
    env: dict = field(default_factory=dict)

    @property
    def conf(self) -> str:
        return os.path.join(self.root, "slurm.conf")

    def write_config(self) -> None:
        ctld, d1, d2 = _free_ports(3)
        for sub in ("state", "spool", "log"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        r = self.root
        lines = [
            "ClusterName=mega-ci", "SlurmctldHost=localhost(127.0.0.1)", f"SlurmctldPort={ctld}",
            "SlurmUser=root", "SlurmdUser=root", "AuthType=auth/none", "CredType=cred/none",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core", "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none", "MpiDefault=none", "MailProg=/bin/true",
            "SchedulerType=sched/backfill", "ReturnToService=2", "SlurmdParameters=config_overrides",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool/%n",
            f"SlurmctldPidFile={r}/slurmctld.pid", f"SlurmdPidFile={r}/slurmd-%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log", f"SlurmdLogFile={r}/log/slurmd-%n.log",
            "SlurmctldDebug=info", "SlurmdDebug=info", "KillWait=10", "MinJobAge=300",
            "SchedulerParameters=sched_interval=1,bf_interval=1,sched_min_interval=100000", "MessageTimeout=20",
            "JobRequeue=1", "AuthInfo=cred_expire=5",  # a requeued job waits cred_expire (default 120 s)
            "InactiveLimit=0", "KillOnBadExit=1",
            f"NodeName=node[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[{d1}-{d1}] CPUs={self.cpus_per_node} "
            f"RealMemory=4000 State=UNKNOWN",
            "PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
        ]
        # two slurmd on one host need two ports: node1 d1, node2 d1+1 (Port=[a-b] assigns them in order)
        lines[-2] = lines[-2].replace(f"Port=[{d1}-{d1}]", f"Port=[{d1}-{d1 + 1}]")
        with open(self.conf, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
        self.env = {**os.environ, "SLURM_CONF": self.conf}

    def start(self, timeout: float = 30.0) -> None:
        self.write_config()
        run = lambda *cmd: subprocess.run(list(cmd), env=self.env, check=True, capture_output=True, text=True)
        run("slurmctld", "-c", "-f", self.conf)  # -c: ignore any saved state
        for node in NODES:
            run("slurmd", "-f", self.conf, "-N", node)
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True,
                                 text=True).stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if len(states) == 2 and all(s.startswith("idle") for s in states.values()):
                return
            time.sleep(0.3)
        raise RuntimeError(f"slurm nodes did not become idle in {timeout} s: {out!r}; logs in {self.root}/log")

    def stop(self) -> None:
        subprocess.run(["scancel", "--user", "root"], env=self.env, capture_output=True)
        subprocess.run(["scontrol", "shutdown"], env=self.env, capture_output=True)
        for pidfile in ["slurmctld.pid"] + [f"slurmd-{n}.pid" for n in NODES]:
            path = os.path.join(self.root, pidfile)
            deadline = time.time() + 10
            try:
                pid = int(open(path).read().strip())
            except (OSError, ValueError):
                continue
            while time.time() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.2)
            else:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def sbatch(self, *args: str, cwd: Optional[str] = None) -> str:
        out = subprocess.run(["sbatch", "--parsable", *args], env=self.env, cwd=cwd, capture_output=True, text=True)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed: {out.stderr}")
        return out.stdout.strip().split(";")[0]

    def job_state(self, job_id: str) -> tuple[str, str, int]:
        """(state, exit code 'a:b', restart count) from scontrol."""
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=self.env, capture_output=True,
                             text=True).stdout
        fields = dict(tok.split("=", 1) for tok in out.split() if "=" in tok)
        return fields.get("JobState", "?"), fields.get("ExitCode", "?"), int(fields.get("Restarts", "0"))

    def wait(self, job_id: str, timeout: float = 120.0) -> tuple[str, str, int]:
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.job_state(job_id)
            if state[0] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                            "BOOT_FAIL", "DEADLINE", "PREEMPTED"):
                return state
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} not finished after {timeout} s: {self.job_state(job_id)}")
