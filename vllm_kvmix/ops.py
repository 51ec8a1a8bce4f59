"""Dispatch of kvmix cache operations to the kernel for the tensor's device.

CUDA tensors run the Triton kernels (:mod:`vllm_kvmix.kernels`); CPU tensors
run the eager reference (:mod:`vllm_kvmix.reference`), which is also the
oracle the kernels are tested against.
"""

from __future__ import annotations

import torch

from vllm_kvmix import reference
from vllm_kvmix.formats import KVFormat


def write_kv(cache, key, value, slot_mapping, fmt: KVFormat, block_size: int) -> None:
    """Quantize-on-write of ``key/value[T, H, D]`` into the paged cache."""
    if cache.is_cuda:
        from vllm_kvmix.kernels.write import write_kv as triton_write_kv

        triton_write_kv(cache, key, value, slot_mapping, fmt, block_size)
    else:
        reference.write_kv(cache, key, value, slot_mapping, fmt, block_size)


def paged_attention(
    query, cache, fmt: KVFormat, block_size: int, metadata, scale: float,
    sliding_window: int | None = None, soft_cap: float | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``query[T, Hq, D]`` over the paged cache, into ``out`` (or a new tensor)."""
    if cache.is_cuda:
        from vllm_kvmix.kernels.attention import paged_attention as triton_attention

        return triton_attention(
            query, cache, fmt, block_size, metadata.query_start_loc_cpu, metadata.seq_lens,
            metadata.block_table, scale, causal=metadata.causal, sliding_window=sliding_window,
            soft_cap=soft_cap, out=out, max_seq_len=metadata.max_seq_len, plan=metadata.plan,
            query_start_loc_dev=metadata.query_start_loc,
        )
    res = reference.paged_attention(
        query, cache, fmt, block_size,
        metadata.query_start_loc_cpu, metadata.seq_lens_cpu, metadata.block_table,
        scale, causal=metadata.causal, sliding_window=sliding_window, soft_cap=soft_cap,
    )
    if out is None:
        return res
    out.copy_(res)
    return out
