"""KV-cache specs whose page size is the packed kvmix page.

vLLM sizes the cache as ``num_blocks * page_size_bytes`` per layer, so a smaller
page is all it takes for the block count to grow by the compression ratio.
Subclasses of FullAttentionSpec / SlidingWindowSpec are found by vLLM's spec
registry through their MRO and managed like their parents.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Self

from vllm.v1.kv_cache_interface import FullAttentionSpec, SlidingWindowSpec

from vllm_kvmix.formats import parse_format


def _kvmix_page_bytes(spec) -> int:
    fmt = parse_format(spec.kvmix_format)
    return spec.block_size * spec.num_kv_heads * fmt.bytes_per_token_head(spec.head_size)


def _merge_format(merged, specs):
    fmts = {s.kvmix_format for s in specs}
    if len(fmts) != 1:
        raise ValueError(f"one KV cache group cannot mix kvmix formats: {sorted(fmts)}")
    return replace(merged, kvmix_format=specs[0].kvmix_format)


@dataclass(frozen=True, kw_only=True)
class KvmixFullAttentionSpec(FullAttentionSpec):
    kvmix_format: str = ""

    @property
    def real_page_size_bytes(self) -> int:
        return _kvmix_page_bytes(self)

    @classmethod
    def merge(cls, specs: list[Self]) -> Self:
        return _merge_format(super().merge(specs), specs)


@dataclass(frozen=True, kw_only=True)
class KvmixSlidingWindowSpec(SlidingWindowSpec):
    kvmix_format: str = ""

    @property
    def real_page_size_bytes(self) -> int:
        return _kvmix_page_bytes(self)

    @classmethod
    def merge(cls, specs: list[Self]) -> Self:
        return _merge_format(super().merge(specs), specs)


def kvmix_spec_for_layer(layer, block_size: int):
    """The kvmix spec of an ``Attention`` layer (decoder self-attention)."""
    fmt = parse_format(layer.kv_cache_dtype)
    fmt.check_head_size(layer.head_size)
    if layer.head_size_v != layer.head_size:
        raise ValueError(
            f"{fmt.name}: layers with different K and V head sizes are not supported "
            f"({layer.layer_name}: {layer.head_size} vs {layer.head_size_v})"
        )
    common = dict(
        block_size=block_size,
        num_kv_heads=layer.num_kv_heads,
        head_size=layer.head_size,
        dtype=layer.kv_cache_torch_dtype,
        kvmix_format=fmt.name,
    )
    if layer.sliding_window is not None:
        return KvmixSlidingWindowSpec(sliding_window=layer.sliding_window, **common)
    return KvmixFullAttentionSpec(head_size_v=layer.head_size, **common)
