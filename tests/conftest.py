import os

# Without a GPU the Triton kernels run in Triton's interpreter.  It must be on before triton
# is first imported anywhere in this process (vLLM imports it during collection): triton's own
# @jit library functions (tl.sum, ...) are built at import time.  vLLM's CPU path ignores it.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="package")
def smollm2_dir():
    from vllm_kvmix import models

    return str(models.ensure_model("smollm2-135m"))


@pytest.fixture(scope="package")
def texts():
    from vllm_kvmix import models

    return models.ensure_texts()


os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
