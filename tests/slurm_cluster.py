"""A real one-node SLURM cluster on 127.0.0.1 for tests: munged, slurmctld and slurmd started
from a ``slurm.conf`` written into a temporary folder (no cgroups, no accounting database).

``slurm_cluster`` (session fixture) yields a ``SlurmCluster`` and sets ``SLURM_CONF`` so that
``sbatch``, ``squeue``, ``scancel`` (and dask-jobqueue, which calls them) talk to it. It skips,
saying why, where SLURM and munge are not installed (``.ci/run`` installs them with apt-get:
Debian's ``slurm-wlm`` and ``munge``) or cannot start (slurmd runs jobs as their user: root).
Finished jobs stay listed by ``squeue --states=all`` for ``MinJobAge`` and are written to the
job-completion file (``jobs``: job id -> final state), since ``sacct`` needs slurmdbd and a
database this fixture does not run.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from local_dask import free_port

DAEMONS = ("munged", "slurmctld", "slurmd")
COMMANDS = ("sbatch", "squeue", "scancel", "sinfo", "scontrol")

SLURM_CONF = """\
ClusterName=wsiircrtest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={root}/munge.socket
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=task=1
JobAcctGatherParams=OverMemoryKill
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={root}/jobcomp.txt
MpiDefault=none
ReturnToService=2
MinJobAge=3600
KillWait=5
InactiveLimit=0
SchedulerParameters=sched_interval=2
NodeName={host} NodeAddr=127.0.0.1 NodeHostname={host} CPUs={cpus} Boards={boards} SocketsPerBoard={sockets} \
CoresPerSocket={cores} ThreadsPerCore={threads} RealMemory={memory_mb} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def _hardware() -> dict[str, int]:
    """This machine as ``slurmd -C`` sees it: CPUs, boards, sockets, cores, threads, memory (90 %)."""
    text = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, timeout=30).stdout
    fields = dict(item.split("=", 1) for item in text.split() if "=" in item)
    keys = {"cpus": "CPUs", "boards": "Boards", "sockets": "SocketsPerBoard", "cores": "CoresPerSocket",
            "threads": "ThreadsPerCore", "memory_mb": "RealMemory"}
    hw = {k: int(fields[v]) for k, v in keys.items()}
    hw["memory_mb"] = int(hw["memory_mb"] * 0.9)
    return hw


@dataclass
class SlurmCluster:
    """A running one-node cluster: its folder, ``slurm.conf``, the node's CPUs and memory."""

    root: Path
    conf: Path
    host: str
    cpus: int
    memory_mb: int
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def env(self) -> dict[str, str]:
        """The environment of a process that talks to this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    def run(self, *command: str) -> str:
        """stdout of a SLURM command (``squeue``, ``scancel``, ...) against this cluster."""
        done = subprocess.run(command, capture_output=True, text=True, env=self.env, timeout=60)
        if done.returncode:
            raise RuntimeError(f"{' '.join(command)}: exit {done.returncode}: {done.stderr.strip()}")
        return done.stdout

    def queue(self, states: str = "all") -> dict[int, tuple[str, str]]:
        """job id -> (state, name) of the jobs ``squeue --states`` lists."""
        rows = self.run("squeue", "-h", f"--states={states}", "-o", "%i|%T|%j").split()
        return {int(i): (state, name) for i, state, name in (r.split("|", 2) for r in rows)}

    def finished(self) -> dict[int, str]:
        """job id -> final state (COMPLETED, CANCELLED, TIMEOUT, OUT_OF_MEMORY, ...) from the
        job-completion file."""
        path = self.root / "jobcomp.txt"
        jobs = {}
        for line in path.read_text().splitlines() if path.exists() else []:
            fields = dict(item.split("=", 1) for item in line.split() if "=" in item)
            jobs[int(fields["JobId"])] = fields["JobState"]
        return jobs

    def cancel_all(self) -> None:
        """Cancel every job still queued or running and wait (up to 60 s) until none is left."""
        live = [str(j) for j, (state, _) in self.queue("PENDING,RUNNING,CONFIGURING,COMPLETING").items()]
        if live:
            self.run("scancel", *live)
        deadline = time.monotonic() + 60
        while self.queue("PENDING,RUNNING,CONFIGURING,COMPLETING") and time.monotonic() < deadline:
            time.sleep(0.5)

    def wait_idle(self, timeout_s: float = 60) -> None:
        """Wait until the node is idle (``sinfo``), or fail with the daemons' logs."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                break
            try:
                if self.run("sinfo", "-h", "-o", "%T").strip() == "idle":
                    return
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"the SLURM node did not become idle in {timeout_s:.0f} s:\n{self.logs()}")

    def logs(self) -> str:
        """The tails of the daemons' log files."""
        parts = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log"):
            path = self.root / name
            text = path.read_text(errors="replace").splitlines()[-15:] if path.exists() else ["(none)"]
            parts.append(f"--- {name}\n" + "\n".join(text))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel the jobs, then stop slurmd, slurmctld and munged (in that order)."""
        try:
            self.cancel_all()
        except (RuntimeError, subprocess.TimeoutExpired):
            pass
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def start_slurm_cluster(root: Path) -> SlurmCluster:
    """Write the config into ``root`` and start munged, slurmctld and slurmd; wait until the node is idle."""
    root.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool"):
        (root / sub).mkdir(exist_ok=True)
    key = root / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    hw = _hardware()
    host = socket.gethostname().split(".")[0]
    conf = root / "slurm.conf"
    conf.write_text(SLURM_CONF.format(root=root, host=host, ctld_port=free_port(), slurmd_port=free_port(), **hw))
    cluster = SlurmCluster(root, conf, host, hw["cpus"], hw["memory_mb"])
    commands = [
        ["munged", "-F", "--force", f"--key-file={key}", f"--socket={root}/munge.socket",
         f"--pid-file={root}/munged.pid", f"--log-file={root}/munged.log", f"--seed-file={root}/munged.seed"],
        ["slurmctld", "-D", "-c", "-f", str(conf)],
        ["slurmd", "-D", "-f", str(conf)],
    ]
    try:
        for command in commands:
            with open(root / f"{command[0]}.err", "w") as err:
                cluster.procs.append(subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=cluster.env,
                                                      start_new_session=True))
            time.sleep(0.5 if command[0] == "munged" else 0)
        cluster.wait_idle()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _why_not() -> str | None:
    """Why a SLURM cluster cannot run here (None: it can)."""
    missing = [name for name in DAEMONS + COMMANDS if shutil.which(name) is None]
    if missing:
        return (f"SLURM and munge are not installed ({', '.join(missing)} missing): "
                "apt-get install slurm-wlm munge (.ci/run does)")
    if os.geteuid() != 0:
        return "slurmd runs its jobs as their user and must run as root; run the SLURM tests as root (as CI does)"
    return None


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A running one-node SLURM cluster (see the module docstring); SLURM_CONF set for the session."""
    why = _why_not()
    if why:
        pytest.skip(why)
    pytest.importorskip("dask_jobqueue")
    try:
        cluster = start_slurm_cluster(tmp_path_factory.mktemp("slurm"))
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"the one-node SLURM cluster did not start: {e}")
    before = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(cluster.conf)
    try:
        yield cluster
    finally:
        cluster.stop()
        if before is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = before
