"""Per-token page regions (views, store, read) and dense attention, in eager PyTorch.

Pages: ``uint8[num_pages, num_kv_heads, head_page_bytes]``, with the byte layout of
:mod:`vllm_kvmix.formats`.  Everything reads and writes through the layout's
offsets, so attention only ever sees what was stored.
"""

from __future__ import annotations

import torch

from vllm_kvmix.formats import PageLayout, SideLayout
from vllm_kvmix.quant import dequantize, pack, unpack


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


def store_tokens(cache: torch.Tensor, side: SideLayout, codes: torch.Tensor, meta: torch.Tensor, slots: torch.Tensor) -> None:
    """Store one side's per-token ``codes`` (unpacked) and ``meta`` at ``slots`` (all valid)."""
    slots = slots.long()
    blk, off = slots // side.block_size, slots % side.block_size
    codes_view, meta_view = side_views(cache, side)
    codes_view[blk, :, off] = pack(codes, side.bits)
    meta_view[blk, :, off] = meta


def read_pages(cache: torch.Tensor, block_ids: torch.Tensor, layout: PageLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantize whole pages of a per-token layout (a staging slot, :func:`vllm_kvmix.formats.stage_layout`):
    returns K, V as fp32 ``[len(block_ids) * block_size, H, D]``."""
    pages = cache[block_ids.long()]
    out = []
    for side in (layout.k, layout.v):
        codes_view, meta_view = side_views(pages, side)
        x = dequantize(unpack(codes_view, side.bits), meta_view, side.group)  # [n, H, bs, D]
        out.append(x.permute(0, 2, 1, 3).reshape(-1, x.shape[1], side.head_size))
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
