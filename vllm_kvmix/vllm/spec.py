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


class _KvmixPage:
    """Packed page size and format-checked merge; mixed in before vLLM's spec class."""

    kvmix_format: str

    @property
    def real_page_size_bytes(self) -> int:
        fmt = parse_format(self.kvmix_format)
        return self.block_size * self.num_kv_heads * fmt.bytes_per_token_head(self.head_size)

    @classmethod
    def merge(cls, specs: list[Self]) -> Self:
        fmts = {s.kvmix_format for s in specs}
        if len(fmts) != 1:
            raise ValueError(f"one KV cache group cannot mix kvmix formats: {sorted(fmts)}")
        return replace(super().merge(specs), kvmix_format=specs[0].kvmix_format)


@dataclass(frozen=True, kw_only=True)
class KvmixFullAttentionSpec(_KvmixPage, FullAttentionSpec):
    kvmix_format: str = ""


@dataclass(frozen=True, kw_only=True)
class KvmixSlidingWindowSpec(_KvmixPage, SlidingWindowSpec):
    kvmix_format: str = ""


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
