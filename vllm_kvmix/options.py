"""User options of kvmix: the only ones, read where they apply (never at import).

``KVMIX_DECODE_KERNEL``  ``cuda`` (default) or ``triton``: the kernel of decode rows on a CUDA GPU.
    ``cuda`` runs the CUDA decode kernel (``csrc/page_decode.cu``) wherever it covers the layer
    (:func:`vllm_kvmix.kernels.cuda_decode.covers`: head sizes 64 / 128 / 256, keys 4 / 8 bits, values
    2 / 4 bits, with or without a sliding window, no soft cap) and the Triton page kernel elsewhere; ``triton`` runs every decode
    row on the Triton kernel (slower; for comparison, or where the CUDA kernel cannot be compiled).
    The engine logs the choice per format at startup.

``KVMIX_CACHE``  where ``python -m vllm_kvmix models`` keeps models and texts (default
    ``~/.cache/vllm-kvmix``).
"""

from __future__ import annotations

import os

CUDA, TRITON = "cuda", "triton"
DECODE_KERNEL_ENV = "KVMIX_DECODE_KERNEL"


def decode_kernel() -> str:
    """``cuda`` or ``triton`` (:data:`DECODE_KERNEL_ENV`); anything else is an error naming the choices."""
    value = os.environ.get(DECODE_KERNEL_ENV, CUDA).strip().lower() or CUDA
    if value not in (CUDA, TRITON):
        raise ValueError(f"{DECODE_KERNEL_ENV}={value!r}: choose {CUDA!r} (default) or {TRITON!r}")
    return value
