"""Latent extraction as a Slurm job array (slurm/write_shards.sbatch) on the real local Slurm."""
import subprocess

import pytest

from data_pipelines.shards import load_manifest
from tests.launch import REPO
from tests.test_ingest import extract_args, laion, shard_bytes, write  # noqa: F401  (laion: a fixture)
from tests.test_slurm import client_env, wait_done

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_a_job_array_of_two_extracts_and_merges_like_one_process(slurm_cluster, laion, test_data, tmp_path):
    shards, _ = laion
    out = tmp_path / "array"
    r = subprocess.run(["sbatch", "--parsable", "--array=0-1", "--partition", "debug", "--mem", "1G",
                        f"--output={tmp_path}/extract-%a.out", "slurm/write_shards.sbatch",
                        *map(str, extract_args(shards, out, test_data, None, "--tasks", 2))],
                       cwd=REPO, env=client_env(slurm_cluster), capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    job = r.stdout.strip().split(";")[0]
    for task in (0, 1):
        info = wait_done(slurm_cluster, f"{job}_{task}", timeout=300)
        log = (tmp_path / f"extract-{task}.out").read_text()
        assert info["JobState"] == "COMPLETED", log[-3000:]
        assert f"task {task} of 2" in log
    alone = tmp_path / "alone"
    assert write(extract_args(shards, alone, test_data)).returncode == 0
    assert load_manifest(out).fingerprint == load_manifest(alone).fingerprint
    assert shard_bytes(out) == shard_bytes(alone)
