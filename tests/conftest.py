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
