"""Dispatch of kvmix cache operations to the kernel for the tensor's device.

CPU tensors run the eager reference (:mod:`vllm_kvmix.reference`).
"""

from __future__ import annotations

import torch

from vllm_kvmix import reference
from vllm_kvmix.formats import KVFormat


def write_kv(cache, key, value, slot_mapping, fmt: KVFormat, block_size: int) -> None:
    """Quantize-on-write of ``key/value[T, H, D]`` into the paged cache."""
    reference.write_kv(cache, key, value, slot_mapping, fmt, block_size)


def paged_attention(
    query, cache, fmt: KVFormat, block_size: int, metadata, scale: float,
    sliding_window: int | None = None, soft_cap: float | None = None,
) -> torch.Tensor:
    """Attention of ``query[T, Hq, D]`` over the paged cache; fp32 ``[T, Hq, D]``."""
    return reference.paged_attention(
        query, cache, fmt, block_size,
        metadata.query_start_loc_cpu, metadata.seq_lens_cpu, metadata.block_table,
        scale, causal=metadata.causal, sliding_window=sliding_window, soft_cap=soft_cap,
    )
