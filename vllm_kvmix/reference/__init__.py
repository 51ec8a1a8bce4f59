"""Eager PyTorch reference of every kvmix kernel: the test oracle and the CPU path.

``staged.step`` is one layer's step of the page scheme (write + attend); ``paged``
holds the per-token page regions and the fp64 dense attention it is built on.
"""

from vllm_kvmix.reference.paged import dense_attention, read_pages, side_views, store_tokens
from vllm_kvmix.reference.staged import RequestStep, pack_pages, read_packed, step

__all__ = ["RequestStep", "dense_attention", "pack_pages", "read_packed", "read_pages", "side_views", "step",
           "store_tokens"]
