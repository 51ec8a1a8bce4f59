"""The page scheme: packed 64-token pages plus an 8-bit staging slot per sequence.

Pure PyTorch; the CPU execution path and the oracle for future kernels.

State of one attention layer:

* ``cache: uint8[num_pages, H, head_page_bytes]``: full pages, packed
  (:mod:`vllm_kvmix.formats`: keys per channel over the page, rotated values
  per token).
* ``stage: uint8[num_slots, H, stage_page_bytes]``: for each running sequence,
  its last, still-filling page at 8 bits per token (keys and rotated values per
  token, :func:`vllm_kvmix.formats.stage_layout`).

One step of one request (``ctx`` tokens already stored, ``seq`` after this
step) touches pages ``ctx // P .. (seq - 1) // P``:

1. the new tokens' keys and rotated values are quantized to 8 bits per token;
   with the older tokens of the first touched page (read from the staging
   slot) they form the 8-bit copy of every touched page;
2. every touched page that is full after the step is packed from that 8-bit
   copy into the cache (so a page's packed bytes never depend on how the
   tokens were split into steps);
3. the new tokens of a page that is still partial go to the staging slot;
4. attention: a query at position ``p`` reads the pages before ``p // P``
   packed and its own page from the 8-bit copy -- what token-by-token
   generation would see -- and the output is rotated back.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvmix.formats import PAGE_TOKENS, KVFormat, SideLayout, stage_layout
from vllm_kvmix.quant import (
    dequantize,
    dequantize_channels,
    hadamard,
    pack,
    quantize,
    quantize_channels,
    quantize_values,
    unpack,
)
from vllm_kvmix.reference.paged import (
    dense_attention,
    read_pages,
    side_views,
    store_tokens,
)

P = PAGE_TOKENS


@dataclass(frozen=True)
class RequestStep:
    """One request's share of a step: its query rows, context before/after, staging slot."""

    q0: int
    q1: int
    ctx: int  # tokens stored before this step
    seq: int  # tokens stored after this step (ctx + q1 - q0)
    slot: int  # staging slot of the request; -1: none (a step that touches no partial page)


def channel_views(cache: torch.Tensor, side: SideLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """Views of a per-channel side: codes ``uint8[nb, H, P, D*bits/8]``, meta ``fp16[nb, H, D, 2]``."""
    nb, h, _ = cache.shape
    codes = cache[:, :, side.codes_offset : side.codes_offset + side.codes_bytes]
    codes = codes.view(nb, h, side.block_size, side.codes_bytes_per_token)
    meta = cache[:, :, side.meta_offset : side.end].view(torch.float16).view(nb, h, side.head_size, 2)
    return codes, meta


def pack_pages(cache: torch.Tensor, block_ids: torch.Tensor, k8: torch.Tensor, v8: torch.Tensor, fmt: KVFormat) -> None:
    """Pack full pages ``k8, v8[n, P, H, D]`` (8-bit copies; values rotated) into ``cache[block_ids]``."""
    layout = fmt.layout(k8.shape[-1], P)
    kc, km = quantize_channels(k8.permute(0, 2, 1, 3), layout.k.bits)  # [n, H, P, D], [n, H, D, 2]
    k_codes, k_meta = channel_views(cache, layout.k)
    k_codes[block_ids] = pack(kc, layout.k.bits)
    k_meta[block_ids] = km
    vc, vm = quantize_values(v8.permute(0, 2, 1, 3), layout.v.bits, layout.v.group)
    v_codes, v_meta = side_views(cache, layout.v)
    v_codes[block_ids] = pack(vc, layout.v.bits)
    v_meta[block_ids] = vm


def read_packed(cache: torch.Tensor, block_ids: torch.Tensor, fmt: KVFormat, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dequantize packed pages: K and rotated V as fp32 ``[len(block_ids) * P, H, D]``."""
    layout = fmt.layout(head_size, P)
    pages = cache[block_ids.long()]
    k_codes, k_meta = channel_views(pages, layout.k)
    k = dequantize_channels(unpack(k_codes, layout.k.bits), k_meta)  # [n, H, P, D]
    v_codes, v_meta = side_views(pages, layout.v)
    v = dequantize(unpack(v_codes, layout.v.bits), v_meta, layout.v.group)
    h = k.shape[1]
    return (
        k.permute(0, 2, 1, 3).reshape(-1, h, head_size),
        v.permute(0, 2, 1, 3).reshape(-1, h, head_size),
    )


def step(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cache: torch.Tensor,
    stage: torch.Tensor,
    fmt: KVFormat,
    requests: list[RequestStep],
    block_table: torch.Tensor,
    scale: float,
    causal: bool = True,
    sliding_window: int | None = None,
    soft_cap: float | None = None,
) -> torch.Tensor:
    """Store the step's ``key/value[T, H, D]`` and attend ``query[T, Hq, D]``; returns fp32 ``[T, Hq, D]``."""
    if not causal:
        raise NotImplementedError(f"{fmt.name}: the page scheme is for causal decoder attention")
    d = key.shape[-1]
    rot = hadamard(d, torch.float32, key.device)
    out = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    slay = stage_layout(d)
    for i, r in enumerate(requests):
        if r.q1 == r.q0:
            continue
        k_new = key[r.q0 : r.q1].float()
        v_new = (value[r.q0 : r.q1].double() @ rot.double()).float()  # fp64: codes independent of BLAS blocking
        first_page = r.ctx // P
        last_page = (r.seq - 1) // P
        base = first_page * P
        if r.slot < 0 and (r.ctx > base or r.seq % P):
            raise RuntimeError("kvmix: a partial page without a staging slot")
        # 1. the 8-bit copy of every touched page: older tokens from the slot, new ones
        #    quantized here once (step 3 stores these same codes)
        new_q = [quantize(x, side.bits, side.group) for side, x in ((slay.k, k_new), (slay.v, v_new))]
        k8 = torch.zeros(((last_page - first_page + 1) * P, *k_new.shape[1:]), device=key.device)
        v8 = torch.zeros_like(k8)
        if r.ctx > base:
            ks, vs = read_pages(stage, torch.tensor([r.slot]), slay)
            k8[: r.ctx - base] = ks[: r.ctx - base]
            v8[: r.ctx - base] = vs[: r.ctx - base]
        k8[r.ctx - base : r.seq - base] = dequantize(*new_q[0], slay.k.group)
        v8[r.ctx - base : r.seq - base] = dequantize(*new_q[1], slay.v.group)
        # 2. pack the pages that are full now
        n_full = r.seq // P - first_page
        if n_full > 0:
            blocks = block_table[i, first_page : first_page + n_full].long()
            pack_pages(
                cache, blocks, k8[: n_full * P].view(n_full, P, *k8.shape[1:]),
                v8[: n_full * P].view(n_full, P, *v8.shape[1:]), fmt,
            )
        # 3. the still-partial page's new tokens to the staging slot
        if r.seq % P:
            lo = max(r.ctx, last_page * P) - r.ctx  # first new token in that page
            slots = r.slot * P + (r.ctx + torch.arange(lo, r.seq - r.ctx, device=key.device)) % P
            for side, (codes, meta) in zip((slay.k, slay.v), new_q):
                store_tokens(stage, side, codes[lo:], meta[lo:], slots)
        # 4. attention: earlier pages packed, the query's own page from the 8-bit copy
        first_q = r.ctx
        first_k = 0 if sliding_window is None else max(0, first_q - sliding_window + 1)
        first_blk = first_k // P
        n_packed = r.seq // P  # pages full after this step
        start = first_blk * P
        kp = torch.zeros((r.seq - start, *k_new.shape[1:]), device=key.device)
        vp = torch.zeros_like(kp)
        if n_packed > first_blk:
            blocks = block_table[i, first_blk:n_packed]
            kk, vv = read_packed(cache, blocks, fmt, d)
            kp[: kk.shape[0]] = kk
            vp[: vv.shape[0]] = vv
        kd = torch.zeros_like(kp)
        vd = torch.zeros_like(kp)
        lo = max(base, start)
        kd[lo - start :] = k8[lo - base : r.seq - base]
        vd[lo - start :] = v8[lo - base : r.seq - base]
        q_pos = torch.arange(first_q, r.seq, device=key.device)
        k_pos = torch.arange(start, r.seq, device=key.device)
        o = dense_attention(
            query[r.q0 : r.q1], kp, vp, scale, q_pos, k_pos, True, sliding_window, soft_cap,
            k_diag=kd, v_diag=vd, page_size=P, out_rotation=rot,
        )
        out[r.q0 : r.q1] = o
    return out
