"""Quantize-on-write: new tokens' K and V into the paged kvmix cache, one launch.

    key, value: [T, H, D] fp16/bf16/fp32   slot_mapping: [T] int (block * block_size + offset, -1 = skip)
    cache:      uint8[num_blocks, H, head_page_bytes]  (layout: vllm_kvmix.formats)

Grid: (T, H); each program encodes one token's K and V for one KV head.
"""

import torch
import triton
import triton.language as tl

from vllm_kvmix.formats import KVFormat
from vllm_kvmix.kernels.codec import encode_token


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr, slot_ptr, cache_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_cb, stride_ch,
    BLOCK_SIZE: tl.constexpr, D: tl.constexpr, GROUP: tl.constexpr,
    K_BITS: tl.constexpr, K_CODES: tl.constexpr, K_META: tl.constexpr,
    V_BITS: tl.constexpr, V_CODES: tl.constexpr, V_META: tl.constexpr,
):
    t = tl.program_id(0)
    h = tl.program_id(1)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot >= 0:  # negative slots are padding
        blk = slot // BLOCK_SIZE
        off = slot % BLOCK_SIZE
        page = cache_ptr + blk * stride_cb + h * stride_ch
        encode_token(key_ptr + t * stride_kt + h * stride_kh, page, off, D, K_BITS, GROUP, K_CODES, K_META)
        encode_token(value_ptr + t * stride_vt + h * stride_vh, page, off, D, V_BITS, GROUP, V_CODES, V_META)


def write_kv(cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
             slot_mapping: torch.Tensor, fmt: KVFormat, block_size: int) -> None:
    """Launcher; same contract as :func:`vllm_kvmix.reference.write_kv`."""
    t, h, d = key.shape
    if t == 0:
        return
    assert key.stride(-1) == 1 and value.stride(-1) == 1 and cache.is_contiguous()
    lay = fmt.layout(d, block_size)
    _write_kv_kernel[(t, h)](
        key, value, slot_mapping, cache,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        cache.stride(0), cache.stride(1),
        BLOCK_SIZE=block_size, D=d, GROUP=fmt.group,
        K_BITS=fmt.k_bits, K_CODES=lay.k.codes_offset, K_META=lay.k.meta_offset,
        V_BITS=fmt.v_bits, V_CODES=lay.v.codes_offset, V_META=lay.v.meta_offset,
    )
