import os
import re
import subprocess

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def test_data(tmp_path_factory):
    from tests.data_fixtures import build_test_data
    return build_test_data(tmp_path_factory.mktemp("data"))


@pytest.fixture
def www(test_data, tmp_path):
    """The test digits and text shard folders, copied under one root (to be served over HTTP)."""
    import shutil
    for name in ("digits", "text"):
        shutil.copytree(test_data[name], tmp_path / "www" / name)
    return tmp_path / "www"


@pytest.fixture(scope="module")
def tiny_config(test_data, tmp_path_factory):
    """configs/tiny-cpu.yaml pointed at the test shards, with the tokenizer's vocabulary."""
    from tests.launch import REPO, cleanup_shm
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    text = (REPO / "configs/tiny-cpu.yaml").read_text()
    text = text.replace("runs/demo/data/digits-heldout", str(test_data["digits"])).replace(
        "runs/demo/data/digits", str(test_data["digits"])).replace(
        "runs/demo/data/text", str(test_data["text"])).replace("vocab_size: 2000", "vocab_size: 1000")
    # both modalities in most batches (the demo's mix is nearly all digits by document)
    for old, new in (("weight: 0.99,", "weight: 0.6,"), ("weight: 0.01}", "weight: 0.4}")):
        assert old in text, old
        text = text.replace(old, new)
    # no evaluation unless a test asks for one; then its sampling is quick, and no captions unless asked
    for key, value in (("eval_interval", 0), ("samples_per_prompt", 1), ("sample_steps", 2), ("caption_quality", "''")):
        text, n = re.subn(rf"^(\s+{key}:) \S+", rf"\g<1> {value}", text, flags=re.M)
        assert n == 1, key
    path.write_text(text)
    yield path
    cleanup_shm()


@pytest.fixture(scope="session")
def tiny_vae(tmp_path_factory):
    """A randomly initialised diffusers AutoencoderKL saved to a local folder (factor-2 downsampling)."""
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=16, scaling_factor=0.5)
    path = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_wan_vae(tmp_path_factory):
    """A randomly initialised diffusers AutoencoderKLWan in a local folder: clips of 1 + 4k frames
    become 1 + k latent frames, 4x smaller per side, 4 channels."""
    from tests.video_vaes import save_video_vae
    return save_video_vae("AutoencoderKLWan", tmp_path_factory.mktemp("vae"))


def start_local_cluster(root, nodes: int = 2, owner: int | None = None):
    """Start a slurm.local_cluster in `root`; where it cannot be installed or started the test is
    skipped with the reason, except on CI (CI set), where it fails."""
    from slurm.local_cluster import ClusterError, LocalCluster
    cluster = LocalCluster(root, nodes=nodes, owner=owner)
    try:
        return cluster.start()
    except (ClusterError, OSError, subprocess.CalledProcessError) as e:
        cluster.stop()
        why = f"no local Slurm: {(getattr(e, 'stderr', None) or str(e)).strip()}"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real two-node Slurm (slurm.local_cluster): nodes mfnode1 and mfnode2, each slurmd in a
    network and UTS namespace of its own. Started once per test session, owned by it."""
    cluster = start_local_cluster(tmp_path_factory.mktemp("slurm"), owner=os.getpid())
    yield cluster
    cluster.stop()
