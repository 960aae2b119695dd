"""A real single-node SLURM for the tests: munged, slurmctld and slurmd as root, in a folder the tests own.

Debian's ``slurm-wlm`` and ``munge`` (``apt-get install slurm-wlm munge``; ``.ci/run`` installs them). No cgroups
(``ProctrackType=proctrack/linuxproc``, ``TaskPlugin=task/none``), no accounting database, free ports, its own munge
key and socket: nothing outside ``folder`` is touched. :func:`stop` ends the three daemons by their pid files.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("slurmd", "slurmctld", "munged")


def why_not(binaries: tuple[str, ...] = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scancel")) -> str | None:
    """Why SLURM cannot start here, or None."""
    missing = [name for name in binaries if shutil.which(name) is None and not Path("/usr/sbin", name).exists()]
    if missing:
        return f"{', '.join(missing)} not installed: apt-get install slurm-wlm munge (as root; .ci/run does it)"
    if os.geteuid() != 0:
        return "slurmd must run as root here (it starts jobs as their user); run the tests as root"
    return None


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def _config(folder: Path, host: str) -> str:
    cpus = os.cpu_count() or 1
    return f"""ClusterName=kdrepro-test
SlurmctldHost={host}
AuthType=auth/munge
AuthInfo=socket={folder}/munge/munge.socket
CredType=cred/munge
SlurmUser=root
SlurmdUser=root
StateSaveLocation={folder}/spool/ctld
SlurmdSpoolDir={folder}/spool/d
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/log/slurmctld.log
SlurmdLogFile={folder}/log/slurmd.log
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
MinJobAge=3600
KillWait=5
NodeName={host} CPUs={cpus} RealMemory=4096 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def start(folder: Path, timeout: float = 60.0) -> dict[str, str]:
    """Start the daemons; the environment that points ``sbatch``/``squeue`` at them. Raises RuntimeError with the
    daemons' own last log lines if the node does not come up."""
    for sub in ("munge", "spool/ctld", "spool/d", "log"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    os.chmod(folder / "munge", 0o700)
    host = socket.gethostname().split(".")[0]
    conf = folder / "slurm.conf"
    conf.write_text(_config(folder, host))
    env = {**os.environ, "SLURM_CONF": str(conf)}
    munge = folder / "munge"
    commands = [
        [_binary("mungekey"), "-c", "-f", "-k", str(munge / "munge.key")],
        [_binary("munged"), f"--key-file={munge / 'munge.key'}", f"--socket={munge / 'munge.socket'}",
         f"--pid-file={folder / 'munged.pid'}", f"--log-file={munge / 'munged.log'}", f"--seed-file={munge / 'seed'}", "-f"],
        [_binary("slurmctld"), "-f", str(conf)],
        [_binary("slurmd"), "-f", str(conf)],
    ]
    for command in commands:
        result = subprocess.run(command, capture_output=True, text=True, env=env)
        if result.returncode != 0:
            stop(folder)
            raise RuntimeError(f"{Path(command[0]).name} failed to start: {(result.stderr or result.stdout).strip()[-300:]}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=env).stdout.strip()
        if state in ("idle", "mix", "alloc"):
            return {"SLURM_CONF": str(conf)}
        time.sleep(1)
    logs = " | ".join((folder / "log" / name).read_text()[-200:] for name in ("slurmctld.log", "slurmd.log")
                      if (folder / "log" / name).exists())
    stop(folder)
    raise RuntimeError(f"the SLURM node did not become idle in {timeout:.0f} s: {logs}")


def cancel_all(folder: Path, timeout: float = 30.0) -> None:
    """Cancel every job of this test cluster and wait until the node runs none (slurmd leaves running jobs alone)."""
    env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}
    if not (folder / "slurm.conf").exists() or subprocess.run(["scancel", "--user", str(os.getuid())], env=env,
                                                               capture_output=True).returncode != 0:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        queue = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True)
        if queue.returncode != 0 or not queue.stdout.strip():
            return
        time.sleep(0.5)


def stop(folder: Path) -> None:
    """Cancel the jobs, then end slurmd, slurmctld and munged by their pid files (SIGTERM, SIGKILL after 10 s)."""
    cancel_all(folder)
    for daemon in DAEMONS:
        pid_file = folder / f"{daemon}.pid"
        if not pid_file.exists():
            continue
        try:
            pid = int(pid_file.read_text().strip())
            os.kill(pid, 15)
        except (ValueError, ProcessLookupError):
            continue
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            os.kill(pid, 9)
