"""Paged KV cache in the kvmix layout: quantize-on-write and attention from pages.

Cache: ``uint8[num_blocks, num_kv_heads, head_page_bytes]``, see
:mod:`vllm_kvmix.formats` for the byte layout of a head page.  Everything here
reads and writes through the layout's offsets, so attention only ever sees what
was stored (also for the tokens written in the same step).
"""

from __future__ import annotations

import torch

from vllm_kvmix.formats import KVFormat, SideLayout
from vllm_kvmix.quant import dequantize, pack, quantize, unpack


def side_views(cache: torch.Tensor, side: SideLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of one side's regions of ``cache[nb, H, head_page_bytes]``.

    Returns ``codes: uint8[nb, H, block_size, D * bits // 8]`` and
    ``meta: float16[nb, H, block_size, D // group, 2]``, both aliasing ``cache``.
    """
    nb, h, _ = cache.shape
    bs = side.block_size
    codes = cache[:, :, side.codes_offset : side.codes_offset + side.codes_bytes]
    codes = codes.view(nb, h, bs, side.codes_bytes_per_token)
    meta = cache[:, :, side.meta_offset : side.end].view(torch.float16)
    meta = meta.view(nb, h, bs, side.groups_per_token, 2)
    return codes, meta


def write_kv(
    cache: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    slot_mapping: torch.Tensor,
    fmt: KVFormat,
    block_size: int,
) -> None:
    """Quantize ``key``/``value`` ``[T, H, D]`` into ``cache`` at ``slot_mapping[T]``.

    Slots are ``block * block_size + offset``; negative slots (padding) are skipped.
    """
    layout = fmt.layout(key.shape[-1], block_size)
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    for side, x in ((layout.k, key[keep]), (layout.v, value[keep])):
        store_tokens(cache, side, *quantize(x, side.bits, side.group), slots)


def store_tokens(cache: torch.Tensor, side: SideLayout, codes: torch.Tensor, meta: torch.Tensor, slots: torch.Tensor) -> None:
    """Store one side's per-token ``codes`` (unpacked) and ``meta`` at ``slots`` (all valid)."""
    slots = slots.long()
    blk, off = slots // side.block_size, slots % side.block_size
    codes_view, meta_view = side_views(cache, side)
    codes_view[blk, :, off] = pack(codes, side.bits)
    meta_view[blk, :, off] = meta


def read_pages(
    cache: torch.Tensor, block_ids: torch.Tensor, fmt: KVFormat, head_size: int, block_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantize whole pages: returns K, V as fp32 ``[len(block_ids) * block_size, H, D]``."""
    layout = fmt.layout(head_size, block_size)
    pages = cache[block_ids.long()]
    out = []
    for side in (layout.k, layout.v):
        codes_view, meta_view = side_views(pages, side)
        x = dequantize(unpack(codes_view, side.bits), meta_view, side.group)  # [n, H, bs, D]
        out.append(x.permute(0, 2, 1, 3).reshape(-1, x.shape[1], head_size))
    return out[0], out[1]


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    q_pos: torch.Tensor,
    k_pos: torch.Tensor,
    causal: bool = True,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
    k_diag: torch.Tensor | None = None,
    v_diag: torch.Tensor | None = None,
    page_size: int | None = None,
    out_rotation: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of ``q[Tq, Hq, D]`` over ``k, v[Tk, H, D]`` with GQA, in fp64.

    With ``k_diag/v_diag`` (same shape as ``k, v``) and ``page_size``, a key in
    the query's own page (``pos // page_size`` equal) is read from the diag
    tensors instead (the page scheme's 8-bit copy of the filling page), and
    ``out_rotation[D, D]`` multiplies the output (in fp64) from the right.

    A query at position p sees keys at positions ``p - sliding_window < k <= p``
    (vLLM's convention: the window counts the query token itself).

    fp64 makes each output row independent of how many query rows share the
    call (BLAS blocking varies with the row count; in fp32 that flips the last
    bit, and a flipped bit can flip a quantization code in the next layer), so
    chunked prefill and prefix-cache hits reproduce unchunked results exactly.
    Returns fp32.
    """
    tq, hq, d = q.shape
    h = k.shape[1]
    qg = q.double().reshape(tq, h, hq // h, d)
    s = torch.einsum("qhrd,khd->hrqk", qg, k.double()) * scale
    same = None
    if k_diag is not None:
        same = (q_pos.view(-1, 1) // page_size) == (k_pos.view(1, -1) // page_size)  # [Tq, Tk]
        s_diag = torch.einsum("qhrd,khd->hrqk", qg, k_diag.double()) * scale
        s = torch.where(same, s_diag, s)
    if soft_cap:
        s = soft_cap * torch.tanh(s / soft_cap)
    diff = q_pos.view(-1, 1) - k_pos.view(1, -1)  # [Tq, Tk]
    allowed = torch.ones_like(diff, dtype=torch.bool)
    if causal:
        allowed &= diff >= 0
    if sliding_window is not None:
        allowed &= diff < sliding_window
    s = s.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num_(0.0)  # fully masked rows -> 0
    if same is None:
        o = torch.einsum("hrqk,khd->qhrd", p, v.double())
    else:
        o = torch.einsum("hrqk,khd->qhrd", p * ~same, v.double())
        o += torch.einsum("hrqk,khd->qhrd", p * same, v_diag.double())
    o = o.reshape(tq, hq, v.shape[-1])
    if out_rotation is not None:
        o = o @ out_rotation.double()
    return o.float()


def paged_attention(
    query: torch.Tensor,
    cache: torch.Tensor,
    fmt: KVFormat,
    block_size: int,
    query_start_loc: list[int],
    seq_lens: list[int],
    block_table: torch.Tensor,
    scale: float,
    causal: bool = True,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> torch.Tensor:
    """Attention for a batch of requests whose K/V live in the paged kvmix cache.

    ``query[T, Hq, D]`` holds each request's new tokens back to back
    (``query_start_loc[B + 1]``); request ``b`` has ``seq_lens[b]`` tokens of
    context including its new ones, stored in pages ``block_table[b]``.  Covers
    prefill, chunked-prefill continuation and decode in one batch.  Every key
    and value is dequantized from the cache.  Returns fp32 ``[T, Hq, D]``.
    """
    head_size = query.shape[-1]
    out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    for b, seq_len in enumerate(seq_lens):
        q0, q1 = query_start_loc[b], query_start_loc[b + 1]
        if q1 == q0 or seq_len == 0:
            continue
        first_q = seq_len - (q1 - q0)
        # Only pages that some query can see: pages before the window may hold
        # another request's data (vLLM frees them), never read them.
        first_k = 0 if sliding_window is None else max(0, first_q - sliding_window + 1)
        first_blk = first_k // block_size
        n_blk = (seq_len + block_size - 1) // block_size
        k, v = read_pages(cache, block_table[b, first_blk:n_blk], fmt, head_size, block_size)
        start = first_blk * block_size
        k, v = k[: seq_len - start], v[: seq_len - start]
        dev = query.device
        q_pos = torch.arange(first_q, seq_len, device=dev)
        k_pos = torch.arange(start, seq_len, device=dev)
        out[q0:q1] = dense_attention(
            query[q0:q1], k, v, scale, q_pos, k_pos, causal, sliding_window, soft_cap
        )
    return out
