import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_dir():
    from vllm_kvmix import models

    return str(models.ensure_model("smollm2-135m"))


@pytest.fixture(scope="session")
def texts():
    from vllm_kvmix import models

    return models.ensure_texts()


os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
