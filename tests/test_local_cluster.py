"""The tests' own Slurm (slurm.local_cluster): a cluster left running by a killed run is reclaimed by
the next start, and two clusters on one machine run jobs side by side."""
import os
import subprocess

import pytest

from slurm import cluster_slots
from slurm.cluster_slots import _pids_mentioning
from slurm.local_cluster import LocalCluster, leftovers
from tests.conftest import start_local_cluster

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def hostnames(cluster: LocalCluster) -> list[str]:
    """`srun -N2 hostname` on the cluster: the hosts its job ran on."""
    r = subprocess.run(["srun", "-N2", "--mem", "100M", "hostname"], env={**os.environ, **cluster.env},
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return sorted(r.stdout.split())


def namespaces() -> set[str]:
    return set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())


def test_a_killed_runs_cluster_is_reclaimed_and_two_clusters_run_side_by_side(tmp_path):
    owner = subprocess.Popen(["sleep", "600"])  # stands for a pytest session that will be killed
    stale = start_local_cluster(tmp_path / "stale", owner=owner.pid)
    stale_ctld = int((stale.root / "slurmctld.pid").read_text())
    owner.kill()
    owner.wait()
    assert _pids_mentioning(f"{stale.root}/"), "the killed run's daemons should still be running"

    first = start_local_cluster(tmp_path / "first", owner=os.getpid())
    try:
        assert cluster_slots.wait_gone(stale_ctld, 0) and not _pids_mentioning(f"{stale.root}/")
        assert not any(ns.endswith(f"-s{stale.slot.index}") for ns in namespaces() - {
            first.slot.netns(n) for n in ("mfnode1", "mfnode2")})
        # a bridge without a record, as another container sharing this network would leave: not touched
        foreign = next(s for s in map(cluster_slots.Slot, range(cluster_slots.SLOTS)) if not s.record.exists())
        subprocess.run(["ip", "link", "add", foreign.bridge, "type", "bridge"], check=True)
        try:
            second = start_local_cluster(tmp_path / "second", owner=os.getpid())
            try:
                assert second.slot not in (first.slot, foreign) and second.slot.ports != first.slot.ports
                assert hostnames(first) == hostnames(second) == ["mfnode1", "mfnode2"]
            finally:
                second.stop()
            assert subprocess.run(["ip", "link", "show", "dev", foreign.bridge]).returncode == 0
        finally:
            subprocess.run(["ip", "link", "del", foreign.bridge])
        assert hostnames(first) == ["mfnode1", "mfnode2"], "stopping one cluster must not touch the other"
    finally:
        first.stop()
    for cluster in (first, second):
        assert cluster_slots.find(cluster.root) is None
        assert not [pid for text in leftovers(cluster.root) for pid in _pids_mentioning(text)]
        assert not {cluster.slot.netns(n) for n in ("mfnode1", "mfnode2")} & namespaces()
