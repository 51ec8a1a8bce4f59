"""The page scheme on CPU, batched: what vLLM's CPU engine runs for a kvmix layer.

The stored bytes are the reference's (:mod:`vllm_kvmix.reference.staged`, the oracle): the same 8-bit staging
codes, the same packed pages, computed by the reference's own quantizers.  Attention differs in how, not what:

* all of a step's decode rows attend in one batch, and a prompt's rows in one batch of page blocks (the rows of
  one request inside one page: they see the pages before theirs packed and their own page at 8 bits);
* pages are dequantized in chunks straight into head-major fp32 tiles and merged with an online softmax, so
  the transient memory of a layer call is bounded by :data:`CHUNK_BYTES` whatever the batch and context;
* fp32 instead of the reference's fp64 (outputs agree to fp32 rounding; a code written from them in the next
  layer may differ by one level where a value sits on a rounding edge).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvmix.formats import PAGE_TOKENS, KVFormat, stage_layout
from vllm_kvmix.quant import dequantize, hadamard, quantize
from vllm_kvmix.reference.paged import side_views, store_tokens
from vllm_kvmix.reference.staged import RequestStep, channel_views, pack_pages

P = PAGE_TOKENS
# Upper bound on the fp32 tiles one chunk of an attention call holds (keys, values, scores).
CHUNK_BYTES = 32 << 20


@dataclass
class QueryBlocks:
    """Query rows grouped by (request, page): ``n`` blocks of at most ``R`` rows (padding: position -1)."""

    q: torch.Tensor  # [n, R, Hq, D] fp32
    q_pos: torch.Tensor  # [n, R] int64
    pages: torch.Tensor  # [n, max_pages] int64: the packed pages the block reads, in order (padding: 0)
    num_pages: torch.Tensor  # [n] int64
    first_pos: torch.Tensor  # [n] int64: position of the first token of pages[:, 0]
    own_k: torch.Tensor  # [n, H, P, D] fp32: the block's own page at 8 bits (values rotated)
    own_v: torch.Tensor
    own_pos: torch.Tensor  # [n] int64: position of the own page's first token
    own_len: torch.Tensor  # [n] int64: tokens of the own page stored after this step


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
    """:func:`vllm_kvmix.reference.staged.step`'s contract: store ``key/value[T, H, D]``, attend ``query[T, Hq, D]``;
    returns fp32 ``[T, Hq, D]``."""
    if not causal:
        raise NotImplementedError(f"{fmt.name}: the page scheme is for causal decoder attention")
    t, hq, d = query.shape
    out = torch.zeros((t, hq, d), dtype=torch.float32)
    live = [(i, r) for i, r in enumerate(requests) if r.q1 > r.q0]
    if not live:
        return out
    for _, r in live:
        if r.slot < 0:
            raise RuntimeError("kvmix: a request step without a staging slot")
    slay = stage_layout(d)
    rot = hadamard(d, torch.float32)
    # the reference's 8-bit codes of every new token (values rotated in fp64 by the fp32 matrix, as there)
    k_new = quantize(key[:t].float(), slay.k.bits, slay.k.group)
    v_new = quantize((value[:t].double() @ rot.double()).float(), slay.v.bits, slay.v.group)
    decodes = [(i, r) for i, r in live if r.q1 - r.q0 == 1]
    prompts = [(i, r) for i, r in live if r.q1 - r.q0 > 1]
    # a prompt's 8-bit page copies need the slot's older tokens before this step's stores overwrite them
    copies = [_page_copies(stage, slay, r, k_new, v_new) for _, r in prompts]
    _store_last_pages(stage, slay, live, k_new, v_new)
    blocks = []
    if decodes:
        blocks.append(_decode_blocks(query, cache, stage, slay, fmt, decodes, block_table, sliding_window))
    for (i, r), (k8, v8) in zip(prompts, copies):
        blocks.append(_prompt_blocks(query, cache, fmt, i, r, k8, v8, block_table, sliding_window))
    for rows, blk in blocks:
        o = attend(cache, fmt, blk, scale, sliding_window, soft_cap) @ rot  # [n, R, Hq, D]
        valid = blk.q_pos >= 0
        out[rows[valid]] = o[valid]
    return out


def _page_copies(stage, slay, r: RequestStep, k_new, v_new) -> tuple[torch.Tensor, torch.Tensor]:
    """The 8-bit copy of every page a prompt step touches, ``[pages * P, H, D]`` (the reference's ``k8, v8``)."""
    base = (r.ctx // P) * P
    n_pages = (r.seq - 1) // P - r.ctx // P + 1
    h, d = k_new[0].shape[1:]
    k8 = torch.zeros((n_pages * P, h, d))
    v8 = torch.zeros_like(k8)
    if r.ctx > base:
        ks, vs = _dequant_stage(stage, slay, torch.tensor([r.slot]))
        k8[: r.ctx - base] = ks[0].transpose(0, 1)[: r.ctx - base]
        v8[: r.ctx - base] = vs[0].transpose(0, 1)[: r.ctx - base]
    k8[r.ctx - base : r.seq - base] = dequantize(k_new[0][r.q0 : r.q1], k_new[1][r.q0 : r.q1], slay.k.group)
    v8[r.ctx - base : r.seq - base] = dequantize(v_new[0][r.q0 : r.q1], v_new[1][r.q0 : r.q1], slay.v.group)
    return k8, v8


def _store_last_pages(stage, slay, live, k_new, v_new) -> None:
    """Each request's new tokens of its last touched page go to its staging slot (dead data once that page
    is full: the next step starts a page and reads nothing from the slot)."""
    rows, slots = [], []
    for _, r in live:
        lo = max(r.ctx, ((r.seq - 1) // P) * P)
        rows.extend(range(r.q0 + lo - r.ctx, r.q1))
        slots.extend(r.slot * P + pos % P for pos in range(lo, r.seq))
    rows_t = torch.tensor(rows)
    slots_t = torch.tensor(slots)
    for side, (codes, meta) in zip((slay.k, slay.v), (k_new, v_new)):
        store_tokens(stage, side, codes[rows_t], meta[rows_t], slots_t)


def _dequant_stage(stage, slay, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Staging slots as head-major fp32 ``[n, H, P, D]`` keys and rotated values."""
    pages = stage[slots]
    out = []
    for side in (slay.k, slay.v):
        codes, meta = side_views(pages, side)  # [n, H, P, D] (8 bits), [n, H, P, G, 2]
        out.append(dequantize(codes, meta, side.group))
    return out[0], out[1]


def _first_page(first_query_pos, window: int | None):
    return 0 if window is None else max(0, first_query_pos - window + 1) // P


def _decode_blocks(query, cache, stage, slay, fmt, decodes, block_table, window):
    """One block per decode row; the rows whose page filled this step have it packed here."""
    idx = [i for i, _ in decodes]
    seq = torch.tensor([r.seq for _, r in decodes])
    own_page = (seq - 1) // P
    first = torch.tensor([_first_page(r.seq - 1, window) for _, r in decodes])
    num_pages = own_page - first
    width = int(num_pages.max())
    cols = (first.unsqueeze(1) + torch.arange(width)).clamp_(max=block_table.shape[1] - 1)
    pages = block_table[torch.tensor(idx).unsqueeze(1), cols].long()
    own_k, own_v = _dequant_stage(stage, slay, torch.tensor([r.slot for _, r in decodes]))
    full = [n for n, (_, r) in enumerate(decodes) if r.seq % P == 0]
    if full:  # the 8-bit copy of a page that just filled is its slot: pack it
        sel = torch.tensor(full)
        blocks = block_table[torch.tensor([idx[n] for n in full]), own_page[sel]].long()
        pack_pages(cache, blocks, own_k[sel].transpose(1, 2), own_v[sel].transpose(1, 2), fmt)
    rows = torch.tensor([r.q0 for _, r in decodes]).unsqueeze(1)
    blk = QueryBlocks(
        q=query[rows.squeeze(1)].float().unsqueeze(1), q_pos=(seq - 1).unsqueeze(1), pages=pages,
        num_pages=num_pages, first_pos=first * P, own_k=own_k, own_v=own_v, own_pos=own_page * P,
        own_len=seq - own_page * P,
    )
    return rows, blk


def _prompt_blocks(query, cache, fmt, i, r: RequestStep, k8, v8, block_table, window):
    """A prompt step's rows as one block per touched page; the pages full after the step are packed here."""
    first_page = r.ctx // P
    n_full = r.seq // P - first_page
    h, d = k8.shape[1:]
    k8 = k8.view(-1, P, h, d)
    v8 = v8.view(-1, P, h, d)
    if n_full > 0:
        pack_pages(cache, block_table[i, first_page : first_page + n_full].long(), k8[:n_full], v8[:n_full], fmt)
    n = k8.shape[0]
    page = torch.arange(first_page, first_page + n)
    q_lo = torch.maximum(page * P, torch.tensor(r.ctx))  # first query row of each block
    q_hi = torch.minimum((page + 1) * P, torch.tensor(r.seq))
    pos = page.unsqueeze(1) * P + torch.arange(P)  # [n, P]
    q_pos = torch.where((pos >= q_lo.unsqueeze(1)) & (pos < q_hi.unsqueeze(1)), pos, -1)
    rows = (r.q0 + pos - r.ctx).clamp(min=r.q0, max=r.q1 - 1)
    first = torch.tensor([_first_page(int(lo), window) for lo in q_lo])
    num_pages = page - first
    width = max(int(num_pages.max()), 1)
    cols = (first.unsqueeze(1) + torch.arange(width)).clamp_(max=block_table.shape[1] - 1)
    blk = QueryBlocks(
        q=query[rows.reshape(-1)].float().view(n, P, *query.shape[1:]), q_pos=q_pos,
        pages=block_table[i, cols].long(), num_pages=num_pages, first_pos=first * P,
        own_k=k8.transpose(1, 2), own_v=v8.transpose(1, 2), own_pos=page * P, own_len=q_hi - page * P,
    )
    return rows, blk


class _Workspace:
    """Named fp32 / uint8 buffers reused across calls (a fresh multi-MB tensor per call costs its page faults
    every time, more than the arithmetic); each is at most one chunk's size."""

    def __init__(self):
        self._bufs: dict[str, torch.Tensor] = {}

    def get(self, name: str, shape, dtype=torch.float32) -> torch.Tensor:
        numel = 1
        for x in shape:
            numel *= x
        buf = self._bufs.get(name)
        if buf is None or buf.dtype != dtype or buf.numel() < numel:
            buf = self._bufs[name] = torch.empty(numel, dtype=dtype)
        return buf[:numel].view(shape)


_WORK = _Workspace()


def _unpack_into(codes: torch.Tensor, bits: int, name: str) -> torch.Tensor:
    """``uint8[..., B]`` packed codes (low bits first) -> fp32 ``[..., B * 8 // bits]`` in workspace ``name``."""
    per = 8 // bits
    out = _WORK.get(name, (*codes.shape, per))
    if bits == 8:
        out.squeeze(-1).copy_(codes)
        return out.squeeze(-1)
    lane = _WORK.get(name + "-lane", codes.shape, torch.uint8)
    for j in range(per):
        torch.bitwise_right_shift(codes, j * bits, out=lane)
        lane.bitwise_and_((1 << bits) - 1)
        out[..., j].copy_(lane)
    return out.flatten(-2)


def dequant_pages(cache: torch.Tensor, ids: torch.Tensor, fmt: KVFormat, head_size: int):
    """Packed pages ``cache[ids]`` as head-major fp32 keys and rotated values ``[*ids.shape, H, P, D]``, in the
    workspace (valid until the next call)."""
    layout = fmt.layout(head_size, P)
    flat = ids.reshape(-1)
    pages = torch.index_select(cache, 0, flat, out=_WORK.get("pages", (flat.numel(), *cache.shape[1:]), torch.uint8))
    k_codes, k_meta = channel_views(pages, layout.k)  # [m, H, P, D*kb/8], [m, H, D, 2]
    k = _unpack_into(k_codes, layout.k.bits, "k")
    k.mul_(k_meta[..., 0].unsqueeze(-2)).add_(k_meta[..., 1].unsqueeze(-2))
    v_codes, v_meta = side_views(pages, layout.v)  # [m, H, P, D*vb/8], [m, H, P, G, 2]
    m, h = v_codes.shape[:2]
    v = _unpack_into(v_codes, layout.v.bits, "v").view(m, h, P, -1, layout.v.group)
    v.mul_(v_meta[..., 0:1]).add_(v_meta[..., 1:2])
    return k.view(*ids.shape, *k.shape[1:]), v.view(*ids.shape, h, P, head_size)


def attend(cache: torch.Tensor, fmt: KVFormat, blk: QueryBlocks, scale: float, window: int | None,
           soft_cap: float | None) -> torch.Tensor:
    """Attention of each block's rows over its packed pages and own page: fp32 ``[n, R, Hq, D]`` (values still
    rotated).  Rows with position -1 come back 0."""
    n, rows, hq, d = blk.q.shape
    h = blk.own_k.shape[1]
    g = hq // h
    # [n, H, g*R, D], grouped-query rows of one KV head together
    q = (blk.q * scale).view(n, rows, h, g, d).permute(0, 2, 3, 1, 4).reshape(n, h, g * rows, d)
    q_pos = blk.q_pos.view(n, 1, 1, rows, 1).expand(n, 1, g, rows, 1).reshape(n, 1, g * rows, 1)
    state = _Softmax(n, h, g * rows, d)
    width = blk.pages.shape[1]
    per_page = h * P * (2 * d + 2 * g * rows) * 4  # keys, values, scores, probabilities
    pages_per_chunk = max(1, CHUNK_BYTES // (per_page * max(n, 1)))
    for c0 in range(0, width, pages_per_chunk):
        ids = blk.pages[:, c0 : c0 + pages_per_chunk]
        page_ok = (c0 + torch.arange(ids.shape[1])) < blk.num_pages.unsqueeze(1)  # [n, c]
        if not bool(page_ok.any()):
            break
        k, v = dequant_pages(cache, ids, fmt, d)  # [n, c, H, P, D]
        s = q.unsqueeze(1) @ k.transpose(-1, -2)  # [n, c, H, gR, P]
        allowed = page_ok.view(n, -1, 1, 1, 1)
        if window is not None:
            k_pos = blk.first_pos.view(n, 1, 1) + (c0 + torch.arange(ids.shape[1])).view(1, -1, 1) * P + torch.arange(P)
            allowed = allowed & (q_pos.unsqueeze(1) - k_pos.view(n, -1, 1, 1, P) < window)
        state.add(s, v, allowed, soft_cap)
    k_pos = blk.own_pos.view(n, 1, 1, 1) + torch.arange(P)  # [n, 1, 1, P]
    allowed = (torch.arange(P) < blk.own_len.view(n, 1, 1, 1)) & (k_pos <= q_pos)
    if window is not None:
        allowed = allowed & (q_pos - k_pos < window)
    s = q @ blk.own_k.transpose(-1, -2)  # [n, H, gR, P]
    state.add(s.unsqueeze(1), blk.own_v.unsqueeze(1), allowed.unsqueeze(1), soft_cap)
    o = state.result()  # [n, H, g*R, D]
    return o.view(n, h, g, rows, d).permute(0, 3, 1, 2, 4).reshape(n, rows, hq, d)


class _Softmax:
    """Online softmax over key chunks ``s[n, c, H, rows, P]`` (the chunk's keys: dims 1 and 4)."""

    def __init__(self, n, h, rows, d):
        self.m = torch.full((n, h, rows), float("-inf"))
        self.l = torch.zeros((n, h, rows))
        self.acc = torch.zeros((n, h, rows, d))

    def add(self, s, v, allowed, soft_cap):
        if soft_cap:
            s = soft_cap * torch.tanh(s / soft_cap)
        if not bool(allowed.all()):
            s = s.masked_fill(~allowed, float("-inf"))
            # a masked key's probability is 0, and 0 * (anything stale in an unused page) must stay 0
            v = v.masked_fill(~_key_used(allowed), 0.0)
        m_new = torch.maximum(self.m, s.amax(dim=(1, 4)))
        base = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(s - base.unsqueeze(1).unsqueeze(-1))
        alpha = torch.exp(self.m - base)
        self.l = self.l * alpha + p.sum(dim=(1, 4))
        self.acc = self.acc * alpha.unsqueeze(-1) + (p @ v).sum(dim=1)
        self.m = m_new

    def result(self):
        return torch.where(self.l.unsqueeze(-1) > 0, self.acc / self.l.unsqueeze(-1), torch.zeros_like(self.acc))


def _key_used(allowed: torch.Tensor) -> torch.Tensor:
    """``[n, c, 1, P, 1]``: keys some row may attend (``allowed``: ``[n, c, *, rows, P]``, broadcastable)."""
    used = allowed.any(dim=-2)  # [n, c, *, P]
    return used.reshape(used.shape[0], used.shape[1], -1, used.shape[-1]).any(dim=2).view(
        used.shape[0], used.shape[1], 1, used.shape[-1], 1)
