"""Eager PyTorch reference of every kvmix kernel: the test oracle and the CPU path."""

from vllm_kvmix.reference.paged import (
    dense_attention,
    paged_attention,
    read_pages,
    side_views,
    write_kv,
)

__all__ = ["dense_attention", "paged_attention", "read_pages", "side_views", "write_kv"]
