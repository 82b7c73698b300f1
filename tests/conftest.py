import os

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


@pytest.fixture(scope="module")
def tiny_config(test_data, tmp_path_factory):
    """configs/tiny-cpu.yaml pointed at the test shards, with the tokenizer's vocabulary."""
    from tests.launch import REPO, cleanup_shm
    path = tmp_path_factory.mktemp("cfg") / "tiny.yaml"
    text = (REPO / "configs/tiny-cpu.yaml").read_text()
    text = text.replace("runs/demo/data/digits", str(test_data["digits"])).replace(
        "runs/demo/data/text", str(test_data["text"])).replace("vocab_size: 2000", "vocab_size: 1000")
    path.write_text(text)
    yield path
    cleanup_shm()
