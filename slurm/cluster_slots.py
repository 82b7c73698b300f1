"""Host-wide slots for local Slurm clusters, so that two clusters on one machine (two test runs,
a test run beside `make slurm-up`) never share ports, a bridge or a network namespace, and so that
what a killed run left behind (daemons, namespaces, a bridge) is reclaimed by the next one.

Slot k owns the ports BASE_PORT + 10k (slurmctld) and + 1 (slurmd), the bridge `mfbr<k>`, the
subnet 10.213.(100+k).0/24 and the namespaces `<node>-s<k>`. Its record, `/run/monofusion-slurm/
slot<k>.json`, names the cluster's folder and its owner: the process whose life bounds the cluster
(a pytest session), or none for a cluster that lives until `down` (then it is alive while its
daemons are). A slot whose owner is gone is stale: its leftovers are killed and removed before reuse.
A slot whose bridge or namespaces exist without a record (another container sharing this network
namespace) or whose ports are taken is skipped.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

REGISTRY = Path("/run/monofusion-slurm")
SLOTS = 8
BASE_PORT = 16900


class SlotError(RuntimeError):
    """No slot could be claimed (the message names what holds them)."""


@dataclass(frozen=True)
class Slot:
    index: int

    @property
    def ports(self) -> tuple[int, int]:
        """(slurmctld, slurmd)."""
        return BASE_PORT + 10 * self.index, BASE_PORT + 10 * self.index + 1

    @property
    def bridge(self) -> str:
        return f"mfbr{self.index}"

    @property
    def subnet(self) -> str:
        return f"10.213.{100 + self.index}"

    def netns(self, node: str) -> str:
        return f"{node}-s{self.index}"

    def veth(self, i: int) -> tuple[str, str]:
        """(host end, node end) of node i's link; interface names have at most 15 characters."""
        return f"mf{self.index}v{i}h", f"mf{self.index}v{i}n"

    @property
    def record(self) -> Path:
        return REGISTRY / f"slot{self.index}.json"


def claim(root: Path, owner: int | None, nodes: list[str], leftovers: Callable[[Path], list[str]]) -> Slot:
    """The slot of the cluster in `root`: its own if it has one, else the first free or stale one.
    A stale slot's leftovers are removed first: processes whose command line names one of
    `leftovers(its root)` and the slot's network for `nodes` (the node names)."""
    REGISTRY.mkdir(parents=True, exist_ok=True)
    with open(REGISTRY / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        held = []
        for slot in map(Slot, range(SLOTS)):  # this folder's own cluster first: one cluster per folder
            record = _read(slot)
            if record and record["root"] == str(root):
                if _alive(record) and record.get("owner") != owner:
                    raise SlotError(f"{root}: its cluster is running (slot {slot.index}); stop it first with "
                                    f"python -m slurm.local_cluster down --dir {root}")
                reclaim(slot, record.get("nodes", nodes), leftovers(root))
        for slot in map(Slot, range(SLOTS)):
            record = _read(slot)
            if record and _alive(record):
                held.append(f"slot {slot.index}: {record['root']}")
                continue
            if record:
                reclaim(slot, record.get("nodes", nodes), leftovers(Path(record["root"])))
            elif _network_exists(slot, nodes):  # not ours to remove: it has no record here
                held.append(f"slot {slot.index}: {slot.bridge} exists without a record")
                continue
            if not all(_port_free(p) for p in slot.ports):
                held.append(f"slot {slot.index}: ports {slot.ports} in use")
                continue
            write_record(slot, root, nodes, owner)
            return slot
    raise SlotError(f"all {SLOTS} local Slurm slots are held ({'; '.join(held)}); "
                    f"stop one with python -m slurm.local_cluster down --dir DIR")


def write_record(slot: Slot, root: Path, nodes: list[str], owner: int | None) -> None:
    """Record the slot's cluster: `owner` bounds its life (None: alive while its slurmctld is)."""
    slot.record.write_text(json.dumps({"root": str(root), "nodes": nodes, "owner": owner,
                                       "owner_start": _start_time(owner) if owner else None}))


def find(root: Path) -> tuple[Slot, list[str]] | None:
    """The slot recorded for the cluster in `root` and its node names, if any."""
    for slot in map(Slot, range(SLOTS)):
        record = _read(slot)
        if record and record["root"] == str(root):
            return slot, record["nodes"]
    return None


def reclaim(slot: Slot, nodes: list[str], mentions: list[str]) -> None:
    """Kill what a gone cluster left running (processes whose command line names one of
    `mentions`, the tasks in its namespaces) and remove its network and record."""
    pids = [pid for text in mentions for pid in _pids_mentioning(text)]
    for pid in pids:
        _kill(pid, 9)
    for pid in pids:
        wait_gone(pid, 10)
    remove_network(slot, nodes)
    slot.record.unlink(missing_ok=True)


def make_network(slot: Slot, nodes: list[str], hostname: str) -> list[str]:
    """A bridge with the host at .1 and each node's namespace (veth) at .(i+2); returns the
    lines of the nodes' /etc/hosts."""
    run(["ip", "link", "add", slot.bridge, "type", "bridge"])
    run(["ip", "addr", "add", f"{slot.subnet}.1/24", "dev", slot.bridge])
    run(["ip", "link", "set", slot.bridge, "up"])
    for i, node in enumerate(nodes):
        host_end, node_end = slot.veth(i + 1)
        ns = slot.netns(node)
        run(["ip", "netns", "add", ns])
        run(["ip", "link", "add", host_end, "type", "veth", "peer", "name", node_end])
        run(["ip", "link", "set", host_end, "master", slot.bridge, "up"])
        run(["ip", "link", "set", node_end, "netns", ns])
        inside = ["ip", "netns", "exec", ns]
        run(inside + ["ip", "addr", "add", f"{slot.subnet}.{i + 2}/24", "dev", node_end])
        run(inside + ["ip", "link", "set", node_end, "up"])
        run(inside + ["ip", "link", "set", "lo", "up"])
    return ["127.0.0.1 localhost", f"{slot.subnet}.1 {hostname}",
            *(f"{slot.subnet}.{i + 2} {n}" for i, n in enumerate(nodes))]


def netns_pids(name: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def remove_network(slot: Slot, nodes: list[str]) -> None:
    """Kill every process in the slot's namespaces, then remove them, the veths and the bridge
    (whatever of them exists)."""
    for i, node in enumerate(nodes):
        ns = slot.netns(node)
        if Path(f"/run/netns/{ns}").exists():
            for pid in netns_pids(ns):
                _kill(pid, 9)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", slot.veth(i + 1)[0]], capture_output=True)
    subprocess.run(["ip", "link", "del", slot.bridge], capture_output=True)


def _network_exists(slot: Slot, nodes: list[str]) -> bool:
    bridge = subprocess.run(["ip", "link", "show", "dev", slot.bridge], capture_output=True).returncode == 0
    return bridge or any(Path(f"/run/netns/{slot.netns(n)}").exists() for n in nodes)


def run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    """Run `cmd`; a failure raises CalledProcessError whose stderr names the command."""
    p = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if p.returncode:
        raise subprocess.CalledProcessError(p.returncode, cmd, p.stdout,
                                            f"`{' '.join(cmd)}` failed: {p.stderr.strip()}")
    return p


def _read(slot: Slot) -> dict | None:
    try:
        return json.loads(slot.record.read_text())
    except (OSError, ValueError):
        return None


def _alive(record: dict) -> bool:
    owner = record.get("owner")
    if owner:
        return _start_time(owner) == record.get("owner_start")
    return bool(_pids_mentioning(f"{record['root']}/slurm.conf", ("slurmctld",)))


def _start_time(pid: int) -> int | None:
    """The process's start time (clock ticks since boot), which tells it from a later one with its pid."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


DAEMONS = ("slurmctld", "slurmd", "munged", "slurmstepd")


def _pids_mentioning(text: str, names: tuple = DAEMONS) -> list[int]:
    """Live processes named one of `names` (Slurm's and munge's daemons: never a shell, an editor or
    an ancestor of this process) whose command line contains `text`."""
    pids = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            if (proc / "comm").read_text().strip() in names and not _zombie(int(proc.name)) and \
                    text in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def wait_gone(pid: int, timeout: float) -> bool:
    """Whether process `pid` ended within `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline and not _zombie(pid):  # a zombie is gone (a PID 1 may never reap it)
        time.sleep(0.1)
    return _zombie(pid)
