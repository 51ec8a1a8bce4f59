"""The CPU decode kernel (``csrc/cpu_decode.cpp``), built with the machine's C++ compiler at first use.

:mod:`vllm_kvmix.cpu` runs a step's decode rows on it: it reads each packed page once, with no dequantized copy
(the eager path writes one per page and reads it back).  ``torch.utils.cpp_extension`` compiles it on first use
(under a minute on 2 cores; cached in ``TORCH_EXTENSIONS_DIR``, by default ``~/.cache/torch_extensions``) with the compiler
vLLM's CPU engine already needs for its own compiled graphs.  Where no compiler works, :func:`kernel` logs why
once and returns None, and the decode rows take the eager path: same results, slower.
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
from pathlib import Path

logger = logging.getLogger("vllm.kvmix")

SOURCE_NAME = "cpu_decode.cpp"


def source_path() -> Path:
    """The kernel source as installed with the package (``vllm_kvmix.csrc``), or the checkout's ``csrc/``."""
    try:
        path = Path(str(importlib.resources.files("vllm_kvmix.csrc") / SOURCE_NAME))
    except ModuleNotFoundError:  # a source tree on sys.path, not installed: csrc/ is not a package there
        path = Path(__file__).resolve().parents[1] / "csrc" / SOURCE_NAME
    if not path.exists():
        path = Path(__file__).resolve().parents[1] / "csrc" / SOURCE_NAME
    return path


def build():
    """Compile and load the extension (raises on any compiler error)."""
    from torch.utils.cpp_extension import load_inline

    return load_inline(
        name="kvmix_cpu_decode", cpp_sources=[source_path().read_text()],
        functions=["decode", "store_stage", "rotate_rows"],
        extra_cflags=["-O3", "-march=native", "-ffast-math", "-fno-finite-math-only"], verbose=False,
    )


@functools.cache
def kernel():
    """The loaded extension, or None (logged once) where it cannot be built."""
    try:
        return build()
    except Exception as e:  # noqa: BLE001 -- the compiler's own message is in it
        logger.warning("kvmix: the CPU decode kernel did not build (%s); decode rows run the eager path "
                       "(same results, slower)", str(e).splitlines()[0] if str(e) else repr(e))
        return None
