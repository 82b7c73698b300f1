"""A real Slurm cluster on this machine, for the tests and `make slurm-up`: munged, slurmctld and
one slurmd (node `localhost`), or two slurmd each in a network and UTS namespace of its own
(nodes `mfnode1`, `mfnode2` on a private /24 behind a bridge), so that a job's ranks rendezvous
across two hosts. Every file (config, state, spool, logs) lives in one folder; munged's (it runs as user munge)
in a folder of its own under the system's temp folder. Ports, bridge, subnet and namespaces come from
a host-wide slot (slurm.cluster_slots): clusters on one machine do not collide, and what a killed
run left behind is cleaned up by the next start.

    python -m slurm.local_cluster up --dir /tmp/mf-slurm [--nodes 2]
    python -m slurm.local_cluster down --dir /tmp/mf-slurm

`up` prints the environment (SLURM_CONF) that sbatch, srun, squeue and submitit need.
Needs root and Debian's slurm-wlm and munge (installed when missing).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from slurm import cluster_slots
from slurm.cluster_slots import Slot, SlotError, run

PACKAGES = ("slurm-wlm", "munge")


class ClusterError(RuntimeError):
    """Slurm could not be installed or started here (the message says why)."""


def ensure_installed() -> None:
    """apt-get install slurm-wlm and munge when slurmctld or munged is missing."""
    if shutil.which("slurmctld") and shutil.which("munged"):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise ClusterError("slurmctld/munged are missing and cannot be installed (needs root and apt-get)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        run(["apt-get", "update", "-qq"], env=env, timeout=600)
        run(["apt-get", "install", "-y", "-qq", *PACKAGES], env=env, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        raise ClusterError(f"apt-get install {' '.join(PACKAGES)} failed: {getattr(e, 'stderr', e)}") from e


def node_names(nodes: int) -> list[str]:
    return ["localhost"] if nodes == 1 else [f"mfnode{i + 1}" for i in range(nodes)]


def hostname() -> str:
    return socket.gethostname().split(".")[0]


def slurm_conf(root: Path, munge_socket: Path, nodes: int, cpus: int, memory_mb: int, slot: Slot) -> str:
    """slurm.conf for `nodes` nodes of `cpus` CPUs each, every path under `root`, ports and
    addresses from `slot`."""
    names = node_names(nodes)
    if nodes == 1:
        ctld, node_lines = "localhost", [f"NodeName=localhost NodeAddr=127.0.0.1"]
    else:
        ctld = f"{hostname()}({slot.subnet}.1)"  # slurmctld wants its own hostname
        node_lines = [f"NodeName={n} NodeAddr={slot.subnet}.{i + 2}" for i, n in enumerate(names)]
    hw = f"CPUs={cpus} Sockets=1 CoresPerSocket={cpus} ThreadsPerCore=1 RealMemory={memory_mb} State=UNKNOWN"
    lines = [
        "ClusterName=monofusion",
        f"SlurmctldHost={ctld}",
        f"SlurmctldPort={slot.ports[0]}",
        f"SlurmdPort={slot.ports[1]}",
        "SlurmUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={munge_socket},cred_expire=10",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",
        "MpiDefault=none",
        "MailProg=/bin/true",
        "ReturnToService=2",
        "SlurmdParameters=config_overrides",  # two nodes share this machine's cores
        "JobRequeue=1",
        "KillWait=10",  # seconds between SIGTERM and SIGKILL (scancel, preemption, time limit)
        "SlurmdTimeout=20",  # a lost node is marked down after 20 s
        "OverTimeLimit=0",
        "MinJobAge=300",
        "InactiveLimit=0",
        "SchedulerParameters=sched_interval=2",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool/%n",
        f"SlurmctldPidFile={root}/slurmctld.pid",
        f"SlurmdPidFile={root}/slurmd.%n.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log",
        f"SlurmdLogFile={root}/log/slurmd.%n.log",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        *[f"{line} {hw}" for line in node_lines],
        f"PartitionName=debug Nodes={','.join(names)} Default=YES MaxTime=INFINITE State=UP",
    ]
    return "\n".join(lines) + "\n"


class LocalCluster:
    """Start and stop the daemons of a cluster whose files all live in `root`. With `owner` (a pid)
    the cluster is stale once that process is gone: the next start on this machine removes it."""

    def __init__(self, root: Path, nodes: int = 1, cpus: int = 2, owner: int | None = None):
        if nodes not in (1, 2):
            raise ValueError(f"nodes: 1 or 2, got {nodes}")
        self.root, self.nodes, self.cpus, self.owner = Path(root).resolve(), nodes, cpus, owner
        self.conf = self.root / "slurm.conf"
        self.munge_dir = munge_dir(self.root)
        self.slot: Slot | None = None

    @property
    def env(self) -> dict:
        """What a client (sbatch, srun, squeue, submitit) needs to reach this cluster."""
        return {"SLURM_CONF": str(self.conf)}

    # ---- start -------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> "LocalCluster":
        try:
            return self._start(timeout)
        except BaseException:  # nothing half-started stays behind, whatever stopped it
            self.stop()
            raise

    def _start(self, timeout: float) -> "LocalCluster":
        ensure_installed()
        if os.geteuid() != 0:
            raise ClusterError("starting slurmd needs root")
        for sub in ("state", "log", *(f"spool/{n}" for n in node_names(self.nodes))):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        memory_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 20 * 0.8 / self.nodes)
        try:
            # owned by this process while it starts, so that no other start takes it for stale meanwhile
            self.slot = cluster_slots.claim(self.root, self.owner or os.getpid(), node_names(self.nodes), leftovers)
        except SlotError as e:
            raise ClusterError(str(e)) from None
        self.conf.write_text(slurm_conf(self.root, self.munge_dir / "munge.socket", self.nodes, self.cpus,
                                        memory_mb, self.slot))
        self._start_munge()
        if self.nodes > 1:  # the nodes' /etc/hosts
            hosts = cluster_slots.make_network(self.slot, node_names(self.nodes), hostname())
            (self.root / "hosts").write_text("\n".join(hosts) + "\n")
        run(["slurmctld", "-f", str(self.conf)])
        for name in node_names(self.nodes):
            self.start_node(name)
        self.wait_idle(timeout)
        if self.owner is None:  # from now on alive while its slurmctld is
            cluster_slots.write_record(self.slot, self.root, node_names(self.nodes), None)
        return self

    def start_node(self, name: str) -> None:
        """Start the slurmd of node `name` (again, after `kill_node`)."""
        cmd = ["slurmd", "-f", str(self.conf), "-N", name]
        if self.nodes > 1:  # its own network, hostname and /etc/hosts, as on a separate host
            cmd = ["unshare", "--mount", "--uts", "sh", "-c",
                   f"mount --bind {self.root}/hosts /etc/hosts && hostname {name} && "
                   f"exec nsenter --net=/run/netns/{self.slot.netns(name)} {' '.join(cmd)}"]
        run(cmd)

    def kill_node(self, name: str) -> int:
        """SIGKILL everything running on node `name` (two-node cluster): its slurmd, its job steps and
        their tasks, as when a host dies. Returns how many processes were killed."""
        pids = cluster_slots.netns_pids(self.slot.netns(name))
        for pid in pids:
            _kill(pid, 9)
        return len(pids)

    def _start_munge(self) -> None:
        m = self.munge_dir
        m.mkdir(exist_ok=True)
        key = m / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        shutil.chown(m, "munge", "munge")
        m.chmod(0o700)
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        run(["runuser", "-u", "munge", "--", "munged", f"--socket={m}/munge.socket", f"--key-file={key}",
             f"--pid-file={m}/munged.pid", f"--log-file={m}/munged.log", f"--seed-file={m}/munged.seed", "--force"])

    def wait_idle(self, timeout: float) -> None:
        """Until every node is idle (ClusterError naming the states and the log otherwise)."""
        deadline, states = time.time() + timeout, ""
        while time.time() < deadline:
            p = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True, text=True,
                               env={**os.environ, **self.env})
            states = p.stdout.strip() or p.stderr.strip()
            if p.returncode == 0 and len(states.splitlines()) == self.nodes and \
                    all(line.split()[1] == "idle" for line in states.splitlines()):
                return
            time.sleep(0.5)
        raise ClusterError(f"nodes not idle after {timeout:.0f}s ({states}); see {self.root}/log")

    # ---- stop --------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop the daemons (and the job steps they left), remove the network it made, free its slot."""
        if self.conf.exists() and (self.root / "slurmctld.pid").exists():  # end this cluster's jobs first
            subprocess.run(["scancel", "--full", "--user", str(os.geteuid())], env={**os.environ, **self.env},
                           capture_output=True, timeout=30)
            time.sleep(1)
        for pid_file in [*self.root.glob("slurmd.*.pid"), self.root / "slurmctld.pid",
                         self.munge_dir / "munged.pid"]:
            _kill_pid_file(pid_file)
        found = cluster_slots.find(self.root)
        if found:
            cluster_slots.reclaim(*found, leftovers(self.root))
        shutil.rmtree(self.munge_dir, ignore_errors=True)


def munge_dir(root: Path) -> Path:
    """munged's folder for the cluster in `root`: munged runs as user munge, which may not reach
    into `root` (pytest's tmp is 0700)."""
    return Path(tempfile.gettempdir()) / f"monofusion-munge-{hashlib.sha1(bytes(root)).hexdigest()[:10]}"


def leftovers(root: Path) -> list[str]:
    """What names the processes of the cluster in `root` on their command lines."""
    return [f"{root}/", str(munge_dir(root))]


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _kill_pid_file(path: Path, wait: float = 10.0) -> None:
    if not path.exists():
        return
    try:
        pid = int(path.read_text().split()[0])
    except (ValueError, IndexError):
        return
    _kill(pid, 15)
    deadline = time.time() + wait
    while time.time() < deadline and Path(f"/proc/{pid}").exists():
        time.sleep(0.1)
    _kill(pid, 9)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("action", choices=("up", "down"))
    p.add_argument("--dir", default="/tmp/monofusion-slurm", help="folder of the cluster's files")
    p.add_argument("--nodes", type=int, default=1, choices=(1, 2))
    p.add_argument("--cpus", type=int, default=2, help="CPUs of each node")
    args = p.parse_args(argv)
    cluster = LocalCluster(Path(args.dir), args.nodes, args.cpus)
    if args.action == "down":
        cluster.stop()
        return 0
    try:
        cluster.start()
    except (ClusterError, subprocess.CalledProcessError) as e:
        cluster.stop()
        print(f"error: {getattr(e, 'stderr', None) or e}", file=sys.stderr)
        return 1
    print(f"export SLURM_CONF={cluster.conf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
