"""The page scheme on CPU: what vLLM's CPU engine runs for a kvmix layer.

The stored bytes are the reference's (:mod:`vllm_kvmix.reference.staged`, the oracle): the same 8-bit staging
codes and the same packed pages, written by the reference's own quantizers.  Attention differs in how, not what:

* all of a step's decode rows attend in one call of the C++ kernel (:mod:`vllm_kvmix.cpu_kernel`), which reads
  each packed page once and the own page from the staging slot; where it is not built, on :func:`attend`, which
  dequantizes pages in chunks into a bounded workspace (:data:`CHUNK_BYTES`) and merges them with an online
  softmax;
* a prompt's rows attend per page on PyTorch's fused attention (the rows of page j see the pages before j
  packed and page j at 8 bits), in the model's precision as vLLM's own CPU attention: fp32 for an fp32 model,
  else bf16;
* fp32 instead of the reference's fp64 elsewhere; the output rotation row by row in a fixed order (the kernel's
  fast Walsh-Hadamard transform, or fp64), so a row's result does not depend on how many rows share the step.
  Decode rows and an fp32 model's prompt rows agree with the reference to fp32 rounding, a bf16 model's prompt
  rows to bf16's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from vllm_kvmix import cpu_kernel
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
    own_k: torch.Tensor | None  # [n, H, P, D] fp32: the block's own page at 8 bits (values rotated); None: read by
    own_v: torch.Tensor | None  # the decode kernel from the staging slots (``slots``)
    own_pos: torch.Tensor  # [n] int64: position of the own page's first token
    own_len: torch.Tensor  # [n] int64: tokens of the own page stored after this step
    slots: torch.Tensor | None = None  # [n] int64: decode rows' staging slots (their own pages)


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
    kernel = cpu_kernel.kernel()
    decodes = [(i, r) for i, r in live if r.q1 - r.q0 == 1]
    prompts = [(i, r) for i, r in live if r.q1 - r.q0 > 1]
    # a prompt's 8-bit page copies need the slot's older tokens before this step's stores overwrite them
    copies = [_page_copies(stage, slay, r, k_new, v_new) for _, r in prompts]
    _store_last_pages(stage, slay, live, k_new, v_new, kernel)
    blocks = []
    if decodes:
        blocks.append(_decode_blocks(query, cache, stage, slay, fmt, decodes, block_table, sliding_window,
                                     dequantize_own=kernel is None))
    for (i, r), (k8, v8) in zip(prompts, copies):
        if soft_cap:  # SDPA has no soft cap: the page blocks
            blocks.append(_prompt_blocks(query, cache, fmt, i, r, k8, v8, block_table, sliding_window))
        else:
            out[r.q0 : r.q1] = _rotate_back(_prompt_attention(query, cache, fmt, i, r, k8, v8, block_table, scale,
                                                               sliding_window), rot, kernel)
    for rows, blk in blocks:
        if blk.own_k is None:
            o = decode_kernel(kernel, cache, stage, fmt, blk, scale, sliding_window, soft_cap)
        else:
            o = attend(cache, fmt, blk, scale, sliding_window, soft_cap)
        o = _rotate_back(o, rot, kernel)  # [n, R, Hq, D]
        valid = blk.q_pos >= 0
        out[rows[valid]] = o[valid]
    return out


def _rotate_back(o: torch.Tensor, rot: torch.Tensor, kernel) -> torch.Tensor:
    """``o @ rot`` row by row in a fixed order (the C++ kernel's fast Walsh-Hadamard transform; without it, in
    fp64, rounded to fp32): each row's result then does not depend on how many rows share the product (BLAS picks
    its blocking by shape; in fp32 that moves last bits, so tensor-parallel ranks, which hold fewer query heads,
    would round differently and a code written from the result could flip)."""
    if kernel is None:
        return (o.double() @ rot.double()).float()
    x = o.float().contiguous()
    kernel.rotate_rows(x.view(-1, x.shape[-1]))
    return x


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


def _store_last_pages(stage, slay, live, k_new, v_new, kernel) -> None:
    """Each request's new tokens of its last touched page go to its staging slot (dead data once that page
    is full: the next step starts a page and reads nothing from the slot).  ``k_new``, ``v_new``: codes ``[T, H,
    D]`` and meta ``[T, H, G, 2]`` of the keys and the rotated values; copied by the C++ kernel's ``store_stage``
    where it is built."""
    rows, at = [], []
    for _, r in live:
        lo = max(r.ctx, ((r.seq - 1) // P) * P)
        rows.extend(range(r.q0 + lo - r.ctx, r.q1))
        at.extend(r.slot * P + pos % P for pos in range(lo, r.seq))
    rows_t = torch.tensor(rows)
    at_t = torch.tensor(at)
    for side, (codes, meta) in ((slay.k, k_new), (slay.v, v_new)):
        if kernel is not None:
            kernel.store_stage(stage, codes, meta.view(torch.int16), rows_t, at_t, side.codes_offset, side.meta_offset)
        else:
            store_tokens(stage, side, codes[rows_t], meta[rows_t], at_t)


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


def _decode_blocks(query, cache, stage, slay, fmt, decodes, block_table, window, dequantize_own: bool):
    """One block per decode row; the rows whose page filled this step have it packed here.  ``dequantize_own``:
    the own pages as fp32 tensors (the eager path); else the decode kernel reads them from the slots."""
    idx = [i for i, _ in decodes]
    seq = torch.tensor([r.seq for _, r in decodes])
    own_page = (seq - 1) // P
    first = torch.tensor([_first_page(r.seq - 1, window) for _, r in decodes])
    num_pages = own_page - first
    width = int(num_pages.max())
    cols = (first.unsqueeze(1) + torch.arange(width)).clamp_(max=block_table.shape[1] - 1)
    pages = block_table[torch.tensor(idx).unsqueeze(1), cols].long()
    slots = torch.tensor([r.slot for _, r in decodes])
    own_k = own_v = None
    if dequantize_own:
        own_k, own_v = _dequant_stage(stage, slay, slots)
    full = [n for n, (_, r) in enumerate(decodes) if r.seq % P == 0]
    if full:  # the 8-bit copy of a page that just filled is its slot: pack it
        sel = torch.tensor(full)
        blocks = block_table[torch.tensor([idx[n] for n in full]), own_page[sel]].long()
        k8, v8 = (own_k[sel], own_v[sel]) if dequantize_own else _dequant_stage(stage, slay, slots[sel])
        pack_pages(cache, blocks, k8.transpose(1, 2), v8.transpose(1, 2), fmt)
    rows = torch.tensor([r.q0 for _, r in decodes]).unsqueeze(1)
    blk = QueryBlocks(
        q=query[rows.squeeze(1)].float().unsqueeze(1), q_pos=(seq - 1).unsqueeze(1), pages=pages,
        num_pages=num_pages, first_pos=first * P, own_k=own_k, own_v=own_v, own_pos=own_page * P,
        own_len=seq - own_page * P, slots=slots,
    )
    return rows, blk


def _prompt_attention(query, cache, fmt, i, r: RequestStep, k8, v8, block_table, scale, window) -> torch.Tensor:
    """A prompt step's rows through PyTorch's fused attention (``scaled_dot_product_attention``), one call per
    touched page: its rows see the pages before theirs packed and their own page at 8 bits.  Packs the pages
    that are full after the step.  Returns fp32 ``[q1 - q0, Hq, D]`` (values still rotated).

    Runs in the model's precision as vLLM's own CPU attention does: fp32 for an fp32 model, else bf16 (keys and
    values dequantized to fp32, then rounded to bf16; bf16 products on the CPU's matrix units where it has them,
    at about twice fp32's speed).  Holds the request's visible context (keys and values) in that dtype while it
    runs."""
    dt = torch.float32 if query.dtype == torch.float32 else torch.bfloat16
    first_page, last_page = r.ctx // P, (r.seq - 1) // P
    n_full = r.seq // P - first_page
    h, d = k8.shape[1:]
    if n_full > 0:
        pack_pages(cache, block_table[i, first_page : first_page + n_full].long(), k8[: n_full * P].view(-1, P, h, d),
                   v8[: n_full * P].view(-1, P, h, d), fmt)
    first = _first_page(r.ctx, window)  # the first page any row of this step sees
    span = (last_page - first + 1) * P
    keys = torch.empty((h, span, d), dtype=dt)
    values = torch.empty((h, span, d), dtype=dt)
    if last_page > first:  # pages before the last touched one are packed (now): dequantize them once
        pages = read_pages(cache, block_table[i, first:last_page].long().view(1, -1), fmt, d)
        keys[:, : span - P] = pages.keys()[0].transpose(0, 1).reshape(h, -1, d)
        values[:, : span - P] = pages.values()[0].transpose(0, 1).reshape(h, -1, d)
    k8 = k8.view(-1, P, h, d).permute(2, 0, 1, 3)  # [H, pages, P, D]
    v8 = v8.view(-1, P, h, d).permute(2, 0, 1, 3)
    out = torch.empty((r.q1 - r.q0, *query.shape[1:]))
    for j in range(first_page, last_page + 1):
        lo = (j - first) * P
        packed = (keys[:, lo : lo + P].clone(), values[:, lo : lo + P].clone()) if j < last_page else None
        keys[:, lo : lo + P] = k8[:, j - first_page]  # the rows of page j see it at 8 bits
        values[:, lo : lo + P] = v8[:, j - first_page]
        q_lo, q_hi = max(j * P, r.ctx), min((j + 1) * P, r.seq)
        start = (_first_page(q_lo, window) - first) * P
        q_pos = torch.arange(q_lo, q_hi).unsqueeze(1)
        k_pos = first * P + torch.arange(start, lo + P)
        allowed = k_pos <= q_pos  # causal inside page j; the packed pages all lie before
        if window is not None:
            allowed &= q_pos - k_pos < window
        rows = query[r.q0 + q_lo - r.ctx : r.q0 + q_hi - r.ctx].to(dt).transpose(0, 1).unsqueeze(0)
        o = torch.nn.functional.scaled_dot_product_attention(
            rows, keys[None, :, start : lo + P], values[None, :, start : lo + P], attn_mask=allowed, scale=scale,
            enable_gqa=True)
        out[q_lo - r.ctx : q_hi - r.ctx] = o[0].transpose(0, 1)
        if packed is not None:  # later pages see page j packed
            keys[:, lo : lo + P], values[:, lo : lo + P] = packed
    return out


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


@functools.lru_cache(maxsize=4)
def _lut(bits: int) -> torch.Tensor:
    """fp32 ``[256, 8 // bits]``: the codes packed in a byte, low bits first."""
    per = 8 // bits
    return ((torch.arange(256).unsqueeze(-1) >> (torch.arange(per) * bits)) & ((1 << bits) - 1)).float()


def _unpack_into(codes: torch.Tensor, bits: int, name: str) -> torch.Tensor:
    """``uint8[..., B]`` packed codes -> fp32 codes ``[..., B * 8 // bits]`` in workspace ``name`` (one table
    lookup per byte)."""
    if bits == 8:
        out = _WORK.get(name, codes.shape)
        return out.copy_(codes)
    idx = _WORK.get(name + "-idx", codes.shape, torch.int32)
    idx.copy_(codes)
    out = _WORK.get(name, (codes.numel(), 8 // bits))
    torch.index_select(_lut(bits), 0, idx.view(-1), out=out)
    return out.view(*codes.shape[:-1], -1)


@dataclass
class PackedPages:
    """Packed pages as fp32 codes and their fp32 scales / minima (``k = kc * ks + km`` per channel; ``v = vc * vs
    + vm`` per token and group), head-major: ``kc, vc [n, c, H, P, D]``, ``ks, km [n, c, H, 1, D]``, ``vs, vm
    [n, c, H, P, G]``."""

    kc: torch.Tensor
    ks: torch.Tensor
    km: torch.Tensor
    vc: torch.Tensor
    vs: torch.Tensor
    vm: torch.Tensor
    group: int

    def keys(self) -> torch.Tensor:
        return self.kc.mul_(self.ks).add_(self.km)

    def values(self) -> torch.Tensor:
        *lead, d = self.vc.shape
        v = self.vc.view(*lead, -1, self.group)
        return v.mul_(self.vs.unsqueeze(-1)).add_(self.vm.unsqueeze(-1)).view(*lead, d)

    def zero_scales(self, used: torch.Tensor) -> None:
        """Zero the scales and minima of keys no row uses (a stale page may hold NaN there; 0 * NaN is NaN)."""
        for x in (self.ks, self.km):
            x.masked_fill_(~used.any(dim=-2, keepdim=True), 0.0)
        for x in (self.vs, self.vm):
            x.masked_fill_(~used, 0.0)


def read_pages(cache: torch.Tensor, ids: torch.Tensor, fmt: KVFormat, head_size: int) -> PackedPages:
    """Packed pages ``cache[ids]`` (``ids [n, c]``), unpacked into the workspace (valid until the next call)."""
    layout = fmt.layout(head_size, P)
    n, c = ids.shape
    flat = ids.reshape(-1)
    pages = torch.index_select(cache, 0, flat, out=_WORK.get("pages", (flat.numel(), *cache.shape[1:]), torch.uint8))
    k_codes, k_meta = channel_views(pages, layout.k)  # [m, H, P, D*kb/8], [m, H, D, 2]
    v_codes, v_meta = side_views(pages, layout.v)  # [m, H, P, D*vb/8], [m, H, P, G, 2]
    h = k_codes.shape[1]
    kc = _unpack_into(k_codes, layout.k.bits, "k").view(n, c, h, P, head_size)
    vc = _unpack_into(v_codes, layout.v.bits, "v").view(n, c, h, P, head_size)
    k_meta = k_meta.float().view(n, c, h, 1, head_size, 2)
    v_meta = v_meta.float().view(n, c, h, P, -1, 2)
    return PackedPages(kc, k_meta[..., 0], k_meta[..., 1], vc, v_meta[..., 0], v_meta[..., 1], layout.v.group)


def attend(cache: torch.Tensor, fmt: KVFormat, blk: QueryBlocks, scale: float, window: int | None,
           soft_cap: float | None) -> torch.Tensor:
    """Attention of each block's rows over its packed pages and own page: fp32 ``[n, R, Hq, D]`` (values still
    rotated).  Rows with position -1 come back 0.

    Few rows per KV head (decode): the scales stay out of the codes -- the scores are ``(q * ks) . kc + q . km``
    and the output ``(p * vs) @ vc + p @ vm`` -- so a page is touched once, by the table lookup.  Many rows (a
    prompt's page): the pages are dequantized in place, cheaper than scaling every row."""
    n, rows, hq, d = blk.q.shape
    h = blk.own_k.shape[1]
    g = hq // h
    # [n, H, g*R, D], grouped-query rows of one KV head together
    q = (blk.q * scale).view(n, rows, h, g, d).permute(0, 2, 3, 1, 4).reshape(n, h, g * rows, d)
    q_pos = blk.q_pos.view(n, 1, 1, rows, 1).expand(n, 1, g, rows, 1).reshape(n, 1, g * rows, 1)
    fold = g * rows <= P
    state = _Softmax(n, h, g * rows, d)
    width = blk.pages.shape[1]
    per_page = h * P * (2 * d + 2 * g * rows + (0 if fold else 2 * g * rows)) * 4  # codes, scores, probabilities
    pages_per_chunk = max(1, CHUNK_BYTES // (per_page * max(n, 1)))
    for c0 in range(0, width, pages_per_chunk):
        ids = blk.pages[:, c0 : c0 + pages_per_chunk]
        c = ids.shape[1]
        page_ok = (c0 + torch.arange(c)) < blk.num_pages.unsqueeze(1)  # [n, c]
        if not bool(page_ok.any()):
            break
        pages = read_pages(cache, ids, fmt, d)
        allowed = page_ok.view(n, c, 1, 1, 1)
        if window is not None:
            k_pos = blk.first_pos.view(n, 1, 1) + (c0 + torch.arange(c)).view(1, -1, 1) * P + torch.arange(P)
            allowed = allowed & (q_pos.unsqueeze(1) - k_pos.view(n, c, 1, 1, P) < window)
        if not bool(allowed.all()):
            pages.zero_scales(_key_used(allowed))
        qc = q.unsqueeze(1)  # [n, 1, H, gR, D]
        if fold:
            s = (qc * pages.ks) @ pages.kc.transpose(-1, -2) + (qc * pages.km).sum(-1, keepdim=True)
            state.add(s, allowed, soft_cap, lambda p: _folded_values(p, pages))
        else:
            s = qc @ pages.keys().transpose(-1, -2)  # [n, c, H, gR, P]
            v = pages.values()
            state.add(s, allowed, soft_cap, lambda p: p @ v)
    k_pos = blk.own_pos.view(n, 1, 1, 1) + torch.arange(P)  # [n, 1, 1, P]
    allowed = (torch.arange(P) < blk.own_len.view(n, 1, 1, 1)) & (k_pos <= q_pos)
    if window is not None:
        allowed = allowed & (q_pos - k_pos < window)
    allowed = allowed.unsqueeze(1)  # [n, 1, 1, gR, P]
    own_v = blk.own_v.unsqueeze(1)
    if not bool(allowed.all()):
        own_v = own_v.masked_fill(~_key_used(allowed), 0.0)
    s = (q @ blk.own_k.transpose(-1, -2)).unsqueeze(1)  # [n, 1, H, gR, P]
    state.add(s, allowed, soft_cap, lambda p: p @ own_v)
    o = state.result()  # [n, H, g*R, D]
    return o.view(n, h, g, rows, d).permute(0, 3, 1, 2, 4).reshape(n, rows, hq, d)


def decode_kernel(ext, cache: torch.Tensor, stage: torch.Tensor, fmt: KVFormat, blk: QueryBlocks, scale: float,
                  window: int | None, soft_cap: float | None) -> torch.Tensor:
    """:func:`attend` for one-row blocks on the C++ kernel (:mod:`vllm_kvmix.cpu_kernel`), own pages read from
    the staging slots."""
    d = blk.q.shape[-1]
    layout, slay = fmt.layout(d, P), stage_layout(d)
    out = ext.decode(
        blk.q[:, 0].contiguous(), cache, blk.pages.contiguous(), blk.num_pages, blk.first_pos, stage, blk.slots,
        blk.own_len, blk.q_pos[:, 0].contiguous(), layout.k.codes_offset, layout.k.meta_offset,
        layout.v.codes_offset, layout.v.meta_offset, slay.k.codes_offset, slay.k.meta_offset, slay.v.codes_offset,
        slay.v.meta_offset, layout.k.bits, layout.v.bits, layout.v.group, slay.k.group, float(scale), int(window or 0),
        float(soft_cap or 0.0),
    )
    return out.unsqueeze(1)


def _folded_values(p: torch.Tensor, pages: PackedPages) -> torch.Tensor:
    """``p @ v`` for ``p [n, c, H, rows, P]`` without forming ``v``: per channel group, ``(p * vs) @ vc + p @ vm``."""
    groups = pages.vs.shape[-1]
    if groups == 1:
        return (p * pages.vs.transpose(-1, -2)) @ pages.vc + p @ pages.vm
    out = []
    for j in range(groups):
        cols = slice(j * pages.group, (j + 1) * pages.group)
        out.append((p * pages.vs[..., j].unsqueeze(-2)) @ pages.vc[..., cols] + p @ pages.vm[..., j : j + 1])
    return torch.cat(out, dim=-1)


class _Softmax:
    """Online softmax over key chunks ``s[n, c, H, rows, P]`` (the chunk's keys: dims 1 and 4)."""

    def __init__(self, n, h, rows, d):
        self.m = torch.full((n, h, rows), float("-inf"))
        self.l = torch.zeros((n, h, rows))
        self.acc = torch.zeros((n, h, rows, d))

    def add(self, s, allowed, soft_cap, times_values):
        """Merge a chunk: scores ``s``, ``allowed`` (broadcastable to ``s``), ``times_values(p)`` = ``p @ v``.
        Keys no row may see must already contribute finite values (the callers zero them): p is 0 there."""
        if soft_cap:
            s = soft_cap * torch.tanh(s / soft_cap)
        if not bool(allowed.all()):
            s = s.masked_fill(~allowed, float("-inf"))
        m_new = torch.maximum(self.m, s.amax(dim=(1, 4)))
        base = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
        p = torch.exp(s - base.unsqueeze(1).unsqueeze(-1))
        alpha = torch.exp(self.m - base)
        self.l = self.l * alpha + p.sum(dim=(1, 4))
        self.acc = self.acc * alpha.unsqueeze(-1) + times_values(p).sum(dim=1)
        self.m = m_new

    def result(self):
        return torch.where(self.l.unsqueeze(-1) > 0, self.acc / self.l.unsqueeze(-1), torch.zeros_like(self.acc))


def _key_used(allowed: torch.Tensor) -> torch.Tensor:
    """``[n, c, 1, P, 1]``: keys some row may attend (``allowed``: ``[n, c, *, rows, P]``, broadcastable)."""
    n, c = allowed.shape[:2]
    used = allowed.any(dim=-2)  # [n, c, *, P]
    return used.reshape(n, c, -1, used.shape[-1]).any(dim=2).view(n, c, 1, used.shape[-1], 1).expand(
        n, c, 1, P, 1)
