"""KV-cache specs whose page size is the packed kvmix page.

vLLM sizes the cache as ``num_blocks * page_size_bytes`` per layer, so a smaller
page is all it takes for the block count to grow by the compression ratio.
Subclasses of FullAttentionSpec / SlidingWindowSpec are found by vLLM's spec
registry through their MRO and managed like their parents.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
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
        # vLLM's contract (kv_cache_utils.is_kv_cache_spec_uniform): AssertionError means
        # "not one spec", after which per-layer page sizes go to UniformTypeKVCacheSpecs.
        assert len(fmts) == 1, f"one KV cache spec cannot mix kvmix page formats: {sorted(fmts)}"
        return replace(super().merge(specs), kvmix_format=specs[0].kvmix_format)


@dataclass(frozen=True, kw_only=True)
class KvmixFullAttentionSpec(_KvmixPage, FullAttentionSpec):
    kvmix_format: str = ""
    # the layer's own format where it differs from the page format (kvmix-auto, even mode); logs only
    kvmix_layer_format: str = field(default="", compare=False)
    # staging slots per layer for running sequences (set where vLLM sizes the cache; 0: max_num_seqs)
    kvmix_stage_slots: int = field(default=0, compare=False)


@dataclass(frozen=True, kw_only=True)
class KvmixSlidingWindowSpec(_KvmixPage, SlidingWindowSpec):
    kvmix_format: str = ""
    kvmix_layer_format: str = field(default="", compare=False)
    kvmix_stage_slots: int = field(default=0, compare=False)


def layer_specs(kv_cache_spec) -> list:
    """The specs of a KV-cache group's layers: the per-layer ones of a UniformTypeKVCacheSpecs (kvmix-auto, var
    mode), else the group's one spec."""
    inner = getattr(kv_cache_spec, "kv_cache_specs", None)
    return list(inner.values()) if inner else [kv_cache_spec]


def set_stage_slots(kv_cache_config, slots: int) -> None:
    """Record the staging slots in the kvmix specs of a worker's KV-cache config (in place), so that the
    worker's attention metadata builders use the count the engine core's scheduler runs with."""
    for group in kv_cache_config.kv_cache_groups:
        for s in layer_specs(group.kv_cache_spec):
            if isinstance(s, _KvmixPage):
                object.__setattr__(s, "kvmix_stage_slots", slots)  # frozen dataclass; a compare=False field


def stage_slots_of(kv_cache_spec) -> int:
    """The staging slots recorded by :func:`set_stage_slots` (0: none recorded)."""
    return max((getattr(s, "kvmix_stage_slots", 0) for s in layer_specs(kv_cache_spec)), default=0)


def group_window(kv_cache_spec) -> int | None:
    """The sliding window of every layer of a KV-cache group (the largest where they differ), or None where a
    layer of the group may attend its whole context.  Only sliding-window specs count: a full-attention spec
    that carries a window (the hybrid manager off) shares its group with full-attention layers, so there the
    split-K count stays the context's (correct, not the fastest for a model whose every layer is windowed)."""
    specs = layer_specs(kv_cache_spec)
    if not all(isinstance(s, SlidingWindowSpec) for s in specs):
        return None
    return max(s.sliding_window for s in specs)


def group_head_size(kv_cache_spec) -> int:
    """The head size of a KV-cache group's layers (the largest where they differ: its decode programs fit
    fewest to an SM, which is what the group's shared split-K plan counts,
    :func:`vllm_kvmix.kernels.splitk.programs_per_sm`)."""
    return max(s.head_size for s in layer_specs(kv_cache_spec))


def kvmix_spec_for_layer(layer, vllm_config):
    """The kvmix spec of an ``Attention`` layer (decoder self-attention).

    ``kvmix_format`` sets the page size; a kvmix-auto layer in even mode reports
    its budget's uniform format there (same bytes) so that vLLM sees one spec.
    """
    fmt = parse_format(layer.kv_cache_dtype)
    page_fmt = parse_format(getattr(layer, "kvmix_page_format", None) or fmt.name)
    if page_fmt.bytes_per_token_head(layer.head_size) != fmt.bytes_per_token_head(layer.head_size):
        raise ValueError(f"{layer.layer_name}: {fmt.name} does not have the page size of {page_fmt.name}")
    fmt.check_head_size(layer.head_size)
    if layer.head_size_v != layer.head_size:
        raise ValueError(
            f"{fmt.name}: layers with different K and V head sizes are not supported "
            f"({layer.layer_name}: {layer.head_size} vs {layer.head_size_v})"
        )
    common = dict(
        block_size=vllm_config.cache_config.block_size,
        num_kv_heads=layer.num_kv_heads,
        head_size=layer.head_size,
        dtype=layer.kv_cache_torch_dtype,
        kvmix_format=page_fmt.name,
        kvmix_layer_format=fmt.name if page_fmt != fmt else "",
    )
    if layer.sliding_window is not None and not vllm_config.scheduler_config.disable_hybrid_kv_cache_manager:
        return KvmixSlidingWindowSpec(sliding_window=layer.sliding_window, **common)
    # With the hybrid manager disabled vLLM would turn a sliding-window spec into a
    # plain FullAttentionSpec (bf16 page size, kvmix lost); give it the full-attention
    # kvmix spec with the window (what unify_hybrid_kv_cache_specs does, keeping the page).
    return KvmixFullAttentionSpec(head_size_v=layer.head_size, sliding_window=layer.sliding_window, **common)
