"""The page scheme in Triton: 8-bit staging, pack on fill, attention over packed + 8-bit pages.

Same semantics as :func:`vllm_kvmix.reference.staged.step` (the oracle):

    query: [T, Hq, D]   key, value: [T, H, D]   (fp16 / bf16 / fp32)
    cache: uint8[num_blocks, H, head_page_bytes]   packed 64-token pages (formats.PageLayout)
    stage: uint8[num_slots, H, stage_bytes]        each running request's filling page, k8v8 per token
    qsl: [B + 1] int32   seq_lens: [B] int32   slots: [B] int32   block_table: [B, max_pages] int32

A step touches pages ``ctx // 64 .. (seq - 1) // 64`` of each request.  The
8-bit copy of the first touched page is the request's staging slot (its older
tokens are already there); further touched pages (a prefill crossing page
boundaries) get pages of a per-step scratch buffer.  Four launches:

1. ``_stage_kernel`` (token blocks x KV heads): rotate values (Hadamard,
   ~fp32: :func:`_hadamard_columns`), quantize new keys and values to 8 bits per token (keys in groups of
   16 channels, values of 64), store into the slot
   or scratch page of their position;
2. ``_pack_kernel`` (blocks of requests x touched pages x KV heads x ``pack_parts``):
   every touched page that is full after the step is re-quantized from its
   8-bit copy -- keys per channel over the page (one program per 64 channels), values
   per token (one program per 64-channel group, and in decode steps per 16 tokens) -- and stored packed
   in the cache;
3. ``_page_attention_kernel`` (query blocks x KV heads x splits): a query at
   position ``p`` reads pages before ``p // 64`` packed and its own page from
   the 8-bit copy, all by bit planes (:mod:`vllm_kvmix.kernels.planes`: the
   output accumulates per value plane); it is rotated back (``o @ H``) at the end;
   (split-K partials merged by ``splitk.combine_kernel`` with ``ROTATE``).
   Rows of one new token run instead on the CUDA kernel (``cuda_decode``, where
   it supports the format), which merges its splits itself; a step of only such
   rows is one CUDA launch that also stages the new tokens (1 and 3 together),
   then 2 (:meth:`PageStep.run`); when the step plan has a FlashAttention
   kernel (:class:`StepPlan` ``flash_attn``), rows of more new tokens run on it
   over dequantized pages (:mod:`vllm_kvmix.kernels.prefill`);
4. ``_keep_partial_kernel`` (requests x KV heads): a last page that is still
   partial and lives in scratch is copied into the slot for the next step
   (after attention, which may still read the slot's old page).

Nothing here reads device values on the host: all per-request quantities are
computed on the device from ``qsl`` / ``seq_lens`` (the FlashAttention prefill
plan takes the sequence lengths on the host, as vLLM's builder has them).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from vllm_kvmix.formats import PAGE_TOKENS, KVFormat, stage_layout
from vllm_kvmix.kernels import cuda_decode, prefill
from vllm_kvmix.kernels.codec import (
    ROT_PRECISION,
    decode_cols,
    minmax_meta,
    pack_rows,
    quant_rows,
    quant_rows_clipped,
    softmax_step,
)
from vllm_kvmix.kernels.splitk import block_q_for, combine_kernel, plan_query_blocks, plan_splits
from vllm_kvmix.kernels.planes import (
    operand,
    packed_pv,
    packed_scores,
    pdot,
    query_plane,
    rotate_store_planes,
    staged_plane,
    store_planes,
)
from vllm_kvmix.quant import hadamard

P: tl.constexpr = tl.constexpr(PAGE_TOKENS)


@triton.jit
def _store_cols(base_ptr, page_off, off, row_mask, codes, scale16, mn16, C0, D: tl.constexpr,
                BITS: tl.constexpr, CODES_OFF: tl.constexpr, META_OFF: tl.constexpr):
    """Store per-token codes of channels ``[C0, C0 + W)`` (``codes[R, W]``) and their groups' meta
    (``scale16`` / ``mn16`` ``[R, W // GROUP]``) at token offsets ``off[R]`` of pages ``base_ptr + page_off[R]``
    whose rows hold ``D`` channels."""
    W: tl.constexpr = codes.shape[1]
    NG: tl.constexpr = scale16.shape[1]
    GROUP: tl.constexpr = W // NG
    G: tl.constexpr = D // GROUP
    CB: tl.constexpr = D * BITS // 8
    page_ptr = base_ptr + page_off
    cols = tl.arange(0, W * BITS // 8) + C0 * BITS // 8
    tl.store(page_ptr[:, None] + CODES_OFF + off[:, None] * CB + cols[None, :], pack_rows(codes, BITS),
             mask=row_mask[:, None])
    meta = (page_ptr[:, None] + META_OFF + off[:, None] * (G * 4)).to(tl.pointer_type(tl.float16))
    g = (tl.arange(0, NG) + C0 // GROUP)[None, :]
    tl.store(meta + 2 * g, scale16, mask=row_mask[:, None])
    tl.store(meta + 2 * g + 1, mn16, mask=row_mask[:, None])


@triton.jit
def _hadamard_columns(row_ptr, row_ok, g, D: tl.constexpr):
    """fp32 ``(x @ H)[:, 64 g : 64 g + 64]`` of the rows ``x[R, D]`` at ``row_ptr[:, None] + channel`` (H:
    the normalized Sylvester Hadamard matrix, ``vllm_kvmix.quant.hadamard``).  H's entries are generated, not
    loaded: ``(-1) ** popcount(i & j)`` is exact in TF32, and so are fp16 / bf16 values, so one TF32 product
    with fp32 accumulation is exact up to the sums' rounding; fp32 values take two (their top 10 mantissa
    bits, then the rest).  The 1 / sqrt(D) comes after.  The channels go 32 at a time (x reloaded per chunk,
    from L1), which keeps the kernel within its registers: loading H as fp32 and multiplying in "tf32x3"
    took 255 registers and spilled (48 / 1,576 bytes of stack a thread at D = 128 / 256)."""
    KC: tl.constexpr = 32
    i = tl.arange(0, KC)
    j = g * 64 + tl.arange(0, 64)
    acc = tl.zeros([row_ok.shape[0], 64], tl.float32)
    for k0 in range(0, D, KC):
        raw = tl.load(row_ptr + (k0 + i)[None, :], mask=row_ok[:, None], other=0.0)
        b = (k0 + i)[:, None] & j[None, :]  # channel indices < 256: parity of 8 bits
        b = b ^ (b >> 4)
        b = b ^ (b >> 2)
        b = b ^ (b >> 1)
        sign = tl.where((b & 1) == 0, 1.0, -1.0)
        if raw.dtype == tl.float32:
            x_hi = (raw.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)  # exact in TF32
            acc = tl.dot(x_hi, sign, acc, input_precision="tf32")
            acc = tl.dot(raw - x_hi, sign, acc, input_precision="tf32")
        else:
            acc = tl.dot(raw.to(tl.float32), sign, acc, input_precision="tf32")
    INV_SQRT_D: tl.constexpr = 1.0 / D ** 0.5
    return acc * INV_SQRT_D


@triton.jit(do_not_specialize=["T"])
def _stage_kernel(
    key_ptr, value_ptr, tok_req_ptr, qsl_ptr, seq_ptr, slot_ptr, sbase_ptr,
    stage_ptr, scratch_ptr, T,
    stride_kt, stride_kh, stride_vt, stride_vh, stride_ss, stride_sh, stride_xs, stride_xh,
    D: tl.constexpr, TB: tl.constexpr,
    SK_META: tl.constexpr, SK_GROUP: tl.constexpr, SV_CODES: tl.constexpr, SV_META: tl.constexpr,
):
    tb = tl.program_id(0)
    h = tl.program_id(1)
    t = tb * TB + tl.arange(0, TB)
    t_ok = t < T
    req = tl.load(tok_req_ptr + t, mask=t_ok, other=0)
    q0 = tl.load(qsl_ptr + req)
    q1 = tl.load(qsl_ptr + req + 1)
    seq = tl.load(seq_ptr + req)
    ctx = seq - (q1 - q0)
    t_ok = t_ok & (t >= q0) & (t < q1)  # padded tokens (CUDA-graph batches) belong to no request
    pos = ctx + t - q0
    j = pos // P - ctx // P  # touched-page index of the token's page
    off = pos % P
    slot = tl.load(slot_ptr + req).to(tl.int64)
    sbase = tl.load(sbase_ptr + req).to(tl.int64)
    in_slot = t_ok & (j == 0)
    in_scratch = t_ok & (j > 0)
    slot_page = tl.where(in_slot, slot, 0) * stride_ss + h * stride_sh
    scratch_page = tl.where(in_scratch, sbase + j - 1, 0) * stride_xs + h * stride_xh
    d = tl.arange(0, D)
    k = tl.load(key_ptr + t[:, None] * stride_kt + h * stride_kh + d[None, :], mask=t_ok[:, None], other=0.0)
    kc, ks, km = quant_rows(k.to(tl.float32), 8, SK_GROUP)
    _store_cols(stage_ptr, slot_page, off, in_slot, kc, ks, km, 0, D, 8, 0, SK_META)
    _store_cols(scratch_ptr, scratch_page, off, in_scratch, kc, ks, km, 0, D, 8, 0, SK_META)
    # values: rotate and quantize one 64-channel group (= one column block of H) at a time
    G: tl.constexpr = D // 64
    for g in tl.static_range(G):
        vg = _hadamard_columns(value_ptr + t[:, None] * stride_vt + h * stride_vh, t_ok, g, D)
        vc, vs, vm = quant_rows(vg, 8, 64)
        _store_cols(stage_ptr, slot_page, off, in_slot, vc, vs, vm, g * 64, D, 8, SV_CODES, SV_META)
        _store_cols(scratch_ptr, scratch_page, off, in_scratch, vc, vs, vm, g * 64, D, 8, SV_CODES, SV_META)


def pack_parts(d: int, value_rows: int) -> int:
    """Programs that pack one (page, KV head): the keys per 64-channel block (per channel over the page's
    tokens), and the values per 64-channel group and block of ``value_rows`` tokens."""
    return d // 64 * (1 + PAGE_TOKENS // value_rows)


@triton.jit
def _pack_page(b, j, h, part, qsl_ptr, seq_ptr, slot_ptr, sbase_ptr, block_table_ptr, stage_ptr, scratch_ptr,
               cache_ptr, stride_ss, stride_sh, stride_xs, stride_xh, stride_cb, stride_ch, stride_bt,
               D: tl.constexpr, SK_META: tl.constexpr, SK_GROUP: tl.constexpr, SV_CODES: tl.constexpr,
               SV_META: tl.constexpr, K_BITS: tl.constexpr, K_CODES: tl.constexpr, K_META: tl.constexpr,
               V_BITS: tl.constexpr, V_CODES: tl.constexpr, V_META: tl.constexpr, VR: tl.constexpr):
    """Part ``part`` of request ``b``'s touched page ``j``, KV head ``h``, from its 8-bit copy into the cache
    (the caller checked that the page is full): parts ``c < D / 64`` the keys' channels ``[64 c, 64 c + 64)``
    over the page's 64 tokens, the others ``D / 64 + g * (64 / VR) + i`` the values' channel group ``g`` of
    tokens ``[VR i, VR i + VR)`` (:func:`pack_parts`)."""
    q0 = tl.load(qsl_ptr + b)
    q1 = tl.load(qsl_ptr + b + 1)
    seq = tl.load(seq_ptr + b)
    pg = (seq - (q1 - q0)) // P + j
    if j == 0:
        src = stage_ptr + tl.load(slot_ptr + b).to(tl.int64) * stride_ss + h * stride_sh
    else:
        src = scratch_ptr + (tl.load(sbase_ptr + b).to(tl.int64) + j - 1) * stride_xs + h * stride_xh
    blk = tl.load(block_table_ptr + b.to(tl.int64) * stride_bt + pg).to(tl.int64)
    dst_off = blk * stride_cb + h * stride_ch
    C: tl.constexpr = 64
    KP: tl.constexpr = D // C
    if part < KP:  # keys per channel over the page's 64 tokens: channels [64 c, 64 c + 64)
        kt = tl.arange(0, P)
        c = part
        dst = cache_ptr + dst_off
        K_LEVELS: tl.constexpr = (1 << K_BITS) - 1
        CBK: tl.constexpr = D * K_BITS // 8
        kmeta = (dst + K_META).to(tl.pointer_type(tl.float16))
        k8 = decode_cols(src, kt, kt < P, c * C, C, D, 8, SK_GROUP, 0, SK_META)
        ks, km, kinv = minmax_meta(tl.min(k8, axis=0), tl.max(k8, axis=0), K_LEVELS)
        y = tl.floor((k8 - km.to(tl.float32)[None, :]) * kinv[None, :] + 0.5)
        kc = tl.minimum(tl.maximum(y, 0.0), K_LEVELS * 1.0).to(tl.int32)
        cols = tl.arange(0, C * K_BITS // 8) + c * C * K_BITS // 8
        tl.store(dst + K_CODES + kt[:, None] * CBK + cols[None, :], pack_rows(kc, K_BITS))
        d = tl.arange(0, C) + c * C
        tl.store(kmeta + 2 * d, ks)
        tl.store(kmeta + 2 * d + 1, km)
    else:  # values (rotated) per token; below 8 bits with clipped ranges (the reference's rule)
        vp = part - KP
        c0 = vp // (P // VR) * C
        vt = vp % (P // VR) * VR + tl.arange(0, VR)
        v8 = decode_cols(src, vt, vt < P, c0, C, D, 8, 64, SV_CODES, SV_META)
        if V_BITS < 8:
            vc, vs, vm = quant_rows_clipped(v8, V_BITS, 64)
        else:
            vc, vs, vm = quant_rows(v8, V_BITS, 64)
        _store_cols(cache_ptr, tl.zeros([VR], tl.int64) + dst_off, vt, vt < P, vc, vs, vm, c0, D, V_BITS, V_CODES,
                    V_META)


@triton.jit(do_not_specialize=["n_req"])
def _pack_kernel(
    qsl_ptr, seq_ptr, slot_ptr, sbase_ptr, block_table_ptr,
    stage_ptr, scratch_ptr, cache_ptr, n_req,
    stride_ss, stride_sh, stride_xs, stride_xh, stride_cb, stride_ch, stride_bt,
    D: tl.constexpr, SK_META: tl.constexpr, SK_GROUP: tl.constexpr, SV_CODES: tl.constexpr, SV_META: tl.constexpr,
    K_BITS: tl.constexpr, K_CODES: tl.constexpr, K_META: tl.constexpr,
    V_BITS: tl.constexpr, V_CODES: tl.constexpr, V_META: tl.constexpr, R: tl.constexpr, VR: tl.constexpr,
):
    """Grid (blocks of ``R`` requests, touched pages, KV heads x ``pack_parts(D, VR)``): every touched page
    that is full after the step, in parts side by side (:func:`_pack_page`; the values' clip search is the long part,
    and no program holds more than one [64, 64] fp32 tile: whole [64, D] key and value tiles took 255
    registers and spilled at D = 256).  A program packs the full pages among its ``R`` requests one after
    the other: ``R`` = 1 for steps with a prompt (many pages each), :data:`PACK_DECODE_ROWS` for decode
    steps, where a request fills a page once in 64 steps and nearly every program only looks and exits.
    A value program packs ``VR`` tokens: 64 in steps with a prompt, :data:`PACK_DECODE_VALUE_ROWS` in
    decode steps."""
    j = tl.program_id(1)
    PARTS: tl.constexpr = D // 64 * (1 + P // VR)  # pack_parts(D, VR)
    h = tl.program_id(2) // PARTS
    part = tl.program_id(2) % PARTS
    r = tl.program_id(0) * R + tl.arange(0, R)
    r_ok = r < n_req
    q0 = tl.load(qsl_ptr + r, mask=r_ok, other=0)
    q1 = tl.load(qsl_ptr + r + 1, mask=r_ok, other=0)
    seq = tl.load(seq_ptr + r, mask=r_ok, other=0)
    full = r_ok & (q1 > q0) & (((seq - (q1 - q0)) // P + j + 1) * P <= seq)  # touched page j full after the step
    NONE: tl.constexpr = 1 << 30
    b = tl.min(tl.where(full, r, NONE))
    while b < NONE:
        _pack_page(b, j, h, part, qsl_ptr, seq_ptr, slot_ptr, sbase_ptr, block_table_ptr, stage_ptr, scratch_ptr,
                   cache_ptr, stride_ss, stride_sh, stride_xs, stride_xh, stride_cb, stride_ch, stride_bt,
                   D, SK_META, SK_GROUP, SV_CODES, SV_META, K_BITS, K_CODES, K_META, V_BITS, V_CODES, V_META, VR)
        full = full & (r != b)
        b = tl.min(tl.where(full, r, NONE))


@triton.jit
def _keep_partial_kernel(
    qsl_ptr, seq_ptr, slot_ptr, sbase_ptr, stage_ptr, scratch_ptr,
    stride_ss, stride_sh, stride_xs, stride_xh,
    NBYTES: tl.constexpr, CHUNK: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    q0 = tl.load(qsl_ptr + b)
    q1 = tl.load(qsl_ptr + b + 1)
    seq = tl.load(seq_ptr + b)
    ctx = seq - (q1 - q0)
    j_last = (seq - 1) // P - ctx // P
    if (q1 > q0) & (seq % P != 0) & (j_last > 0):
        src = scratch_ptr + (tl.load(sbase_ptr + b).to(tl.int64) + j_last - 1) * stride_xs + h * stride_xh
        dst = stage_ptr + tl.load(slot_ptr + b).to(tl.int64) * stride_ss + h * stride_sh
        for c in range(0, NBYTES, CHUNK):
            i = c + tl.arange(0, CHUNK)
            tl.store(dst + i, tl.load(src + i, mask=i < NBYTES), mask=i < NBYTES)


@triton.jit(do_not_specialize=["num_splits", "window"])
def _page_attention_kernel(
    q_ptr, out_ptr, cache_ptr, stage_ptr, scratch_ptr, rot_ptr, block_table_ptr,
    qsl_ptr, seq_lens_ptr, slot_ptr, sbase_ptr, qb_req_ptr, qb_tok_ptr,
    ws_acc_ptr, ws_ml_ptr, num_splits,
    scale, soft_cap, window,
    stride_qt, stride_qh, stride_ot, stride_oh, stride_cb, stride_ch, stride_bt,
    stride_ss, stride_sh, stride_xs, stride_xh,
    D: tl.constexpr, REP: tl.constexpr, REP_P: tl.constexpr, BLOCK_Q: tl.constexpr,
    K_BITS: tl.constexpr, K_CODES: tl.constexpr, K_META: tl.constexpr,
    V_BITS: tl.constexpr, V_CODES: tl.constexpr, V_META: tl.constexpr,
    SK_META: tl.constexpr, SK_GROUP: tl.constexpr, SV_CODES: tl.constexpr, SV_META: tl.constexpr,
    USE_WINDOW: tl.constexpr, USE_SOFTCAP: tl.constexpr, IEEE_DOT: tl.constexpr,
    SPLIT: tl.constexpr,
):
    qb = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    req = tl.load(qb_req_ptr + qb)
    tok0 = tl.load(qb_tok_ptr + qb)
    q_begin = tl.load(qsl_ptr + req)
    q_end = tl.load(qsl_ptr + req + 1)
    seq_len = tl.load(seq_lens_ptr + req)
    ctx = seq_len - (q_end - q_begin)
    first_touched = ctx // P
    slot = tl.load(slot_ptr + req).to(tl.int64)
    sbase = tl.load(sbase_ptr + req).to(tl.int64)

    BLOCK_M: tl.constexpr = BLOCK_Q * REP_P
    m = tl.arange(0, BLOCK_M)
    tok = tok0 + m // REP_P
    r = m % REP_P
    row_ok = (tok < q_end) & (r < REP)
    head = kvh * REP + r
    # the query split into the key planes (planes.packed_scores)
    PER_K: tl.constexpr = 8 // K_BITS
    qp0 = query_plane(q_ptr, tok, head, row_ok, stride_qt, stride_qh, 0, D, K_BITS, IEEE_DOT)
    qp1 = qp0
    qp2 = qp0
    qp3 = qp0
    if PER_K > 1:
        qp1 = query_plane(q_ptr, tok, head, row_ok, stride_qt, stride_qh, 1, D, K_BITS, IEEE_DOT)
    if PER_K > 2:
        qp2 = query_plane(q_ptr, tok, head, row_ok, stride_qt, stride_qh, 2, D, K_BITS, IEEE_DOT)
        qp3 = query_plane(q_ptr, tok, head, row_ok, stride_qt, stride_qh, 3, D, K_BITS, IEEE_DOT)
    pos = ctx + tok - q_begin
    own = pos // P

    last = tl.minimum(tok0 + BLOCK_Q, q_end) - 1
    hi = ctx + last - q_begin + 1
    own_lo = (ctx + tok0 - q_begin) // P
    own_hi = (hi - 1) // P
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(ctx + tok0 - q_begin - window + 1, 0)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    # the output accumulates per value plane: acc{k} = channels k::PER_V (planes.packed_pv)
    PER_V: tl.constexpr = 8 // V_BITS
    acc0 = tl.zeros([BLOCK_M, D // PER_V], tl.float32)
    acc1 = tl.zeros([BLOCK_M, D // PER_V], tl.float32)
    acc2 = tl.zeros([BLOCK_M, D // PER_V], tl.float32)
    acc3 = tl.zeros([BLOCK_M, D // PER_V], tl.float32)
    t = tl.arange(0, P)
    t_all = t < P
    first_page = lo // P
    end_page = tl.where(q_end > q_begin, own_hi + 1, first_page)  # a padded request reads nothing
    if SPLIT:
        per = tl.cdiv(end_page - first_page, num_splits)
        first_page = first_page + split * per
        end_page = tl.minimum(end_page, first_page + per)
    # Pages every row reads packed: no branches, so the loads pipeline.
    for p in range(first_page, tl.minimum(end_page, own_lo)):
        blk = tl.load(block_table_ptr + req * stride_bt + p).to(tl.int64)
        page = cache_ptr + blk * stride_cb + kvh * stride_ch
        kpos = p * P + t
        s = packed_scores(page, t, t_all, qp0, qp1, qp2, qp3, D, K_BITS, K_CODES, K_META, IEEE_DOT) * scale
        if USE_SOFTCAP:
            s = soft_cap * (2.0 / (1.0 + tl.exp(-2.0 * s / soft_cap)) - 1.0)
        ok = row_ok[:, None]
        if USE_WINDOW:
            ok = ok & (pos[:, None] - kpos[None, :] < window)
        s = tl.where(ok, s, float("-inf"))
        pr, alpha, m_new, l_i = softmax_step(s, m_i, l_i)
        o0, o1, o2, o3 = packed_pv(operand(pr, IEEE_DOT), page, t, t_all, D, V_BITS, V_CODES, V_META, IEEE_DOT)
        acc0 = acc0 * alpha[:, None] + o0
        if PER_V > 1:
            acc1 = acc1 * alpha[:, None] + o1
        if PER_V > 2:
            acc2 = acc2 * alpha[:, None] + o2
            acc3 = acc3 * alpha[:, None] + o3
        m_i = m_new
    # Pages that are some row's own page (at most two per block): the 8-bit copy for those
    # rows, the packed page for rows further on.
    for p in range(tl.maximum(first_page, own_lo), end_page):
        kpos = p * P + t
        t_ok = kpos < hi
        own_here = own[:, None] == p
        blk = tl.load(block_table_ptr + req * stride_bt + p).to(tl.int64)
        page = cache_ptr + blk * stride_cb + kvh * stride_ch  # packed: for rows further on
        jj = p - first_touched
        if jj == 0:  # the 8-bit copy: the slot for the step's first page, scratch after it
            src = stage_ptr + slot * stride_ss + kvh * stride_sh
        else:
            src = scratch_ptr + (sbase + jj - 1) * stride_xs + kvh * stride_xh
        s = tl.zeros([BLOCK_M, P], tl.float32)
        if p < own_hi:  # some row reads this page packed
            s = packed_scores(page, t, t_ok, qp0, qp1, qp2, qp3, D, K_BITS, K_CODES, K_META, IEEE_DOT)
        if p >= own_lo:  # some row's own page: the 8-bit copy, read in the key planes' channel order
            s_own = pdot(qp0, tl.trans(staged_plane(src, t, t_ok, 0, PER_K, D, 0, SK_META, SK_GROUP, IEEE_DOT)),
                         IEEE_DOT)
            if PER_K > 1:
                s_own += pdot(qp1, tl.trans(staged_plane(src, t, t_ok, 1, PER_K, D, 0, SK_META, SK_GROUP, IEEE_DOT)),
                              IEEE_DOT)
            if PER_K > 2:
                s_own += pdot(qp2, tl.trans(staged_plane(src, t, t_ok, 2, PER_K, D, 0, SK_META, SK_GROUP, IEEE_DOT)),
                              IEEE_DOT)
                s_own += pdot(qp3, tl.trans(staged_plane(src, t, t_ok, 3, PER_K, D, 0, SK_META, SK_GROUP, IEEE_DOT)),
                              IEEE_DOT)
            s = tl.where(own_here, s_own, s)
        s = s * scale
        if USE_SOFTCAP:
            s = soft_cap * (2.0 / (1.0 + tl.exp(-2.0 * s / soft_cap)) - 1.0)
        ok = row_ok[:, None] & t_ok[None, :] & (kpos[None, :] <= pos[:, None])
        if USE_WINDOW:
            ok = ok & (pos[:, None] - kpos[None, :] < window)
        s = tl.where(ok, s, float("-inf"))
        pr, alpha, m_new, l_i = softmax_step(s, m_i, l_i)
        acc0 = acc0 * alpha[:, None]
        if PER_V > 1:
            acc1 = acc1 * alpha[:, None]
        if PER_V > 2:
            acc2 = acc2 * alpha[:, None]
            acc3 = acc3 * alpha[:, None]
        if p < own_hi:
            o0, o1, o2, o3 = packed_pv(operand(tl.where(own_here, 0.0, pr), IEEE_DOT), page, t, t_ok,
                                       D, V_BITS, V_CODES, V_META, IEEE_DOT)
            acc0 += o0
            if PER_V > 1:
                acc1 += o1
            if PER_V > 2:
                acc2 += o2
                acc3 += o3
        if p >= own_lo:
            p_own = operand(tl.where(own_here, pr, 0.0), IEEE_DOT)
            acc0 += pdot(p_own, staged_plane(src, t, t_ok, 0, PER_V, D, SV_CODES, SV_META, 64, IEEE_DOT), IEEE_DOT)
            if PER_V > 1:
                acc1 += pdot(p_own, staged_plane(src, t, t_ok, 1, PER_V, D, SV_CODES, SV_META, 64, IEEE_DOT), IEEE_DOT)
            if PER_V > 2:
                acc2 += pdot(p_own, staged_plane(src, t, t_ok, 2, PER_V, D, SV_CODES, SV_META, 64, IEEE_DOT), IEEE_DOT)
                acc3 += pdot(p_own, staged_plane(src, t, t_ok, 3, PER_V, D, SV_CODES, SV_META, 64, IEEE_DOT), IEEE_DOT)
        m_i = m_new
    if SPLIT:
        base = (qb * tl.num_programs(1) + kvh) * num_splits + split
        store_planes(ws_acc_ptr, (base * BLOCK_M + m) * D, acc0, acc1, acc2, acc3, m >= 0, V_BITS)
        tl.store(ws_ml_ptr + (base * BLOCK_M + m) * 2, m_i)
        tl.store(ws_ml_ptr + (base * BLOCK_M + m) * 2 + 1, l_i)
    else:
        inv = 1.0 / tl.where(l_i > 0, l_i, 1.0)[:, None]
        rotate_store_planes(acc0 * inv, acc1 * inv, acc2 * inv, acc3 * inv, rot_ptr, out_ptr, tok, head, row_ok,
                            stride_ot, stride_oh, D, V_BITS, ROT_PRECISION)  # values were stored rotated


# Launch options (benchmarks may sweep them).  Decode tiles (16 rows): page_bench.py --sweep on H100
# (2026-11-23, bit-plane kernel) -- 4 warps capped at 128 registers (4 programs per SM) 1.33x / 1.45x /
# 0.98x FA3 bf16 at 16 x 32k / 64 x 32k / 256 x 1k, against 1.30x / 1.34x / 0.92x for 2 warps and
# 1.0x / 1.02x / 0.81x for 4 uncapped warps (2 programs per SM).  Prefill tiles (64 rows x D fp32
# accumulators) spill on 2 warps, which also makes ptxas slow.
LAUNCH = {"num_warps": 4, "num_stages": 2, "maxnreg": 128}
LAUNCH_PREFILL = {"num_warps": 4, "num_stages": 2}
LAUNCH_PACK = {"num_warps": 4}
# requests per _pack_kernel program in a decode step: a 256-row step launches 16 x KV heads x parts programs, not
# 256 x ..., of which all but the few with a filling page exit at once (R in _pack_kernel)
PACK_DECODE_ROWS = 16
# tokens per value program of the pack kernel in decode steps (values are quantized per token): a page that
# fills waits for the clip search of 16 tokens, not 64 (k4v2, 4 of 256 decode rows filling, H200: the pack
# launch 9.7 us against 16.9 us); steps with a prompt keep whole pages, whose 16-token programs pack 1.45x
# slower in bulk (74.6 against 51.2 us for a 4096-token prompt) -- benchmarks/kernels/page_bench.py
PACK_DECODE_VALUE_ROWS = 16


def pack_launch_rows(decode: bool) -> tuple[int, int]:
    """``(R, VR)`` of a ``_pack_kernel`` launch: requests per program and tokens per value program, for a decode
    step or a step with a prompt."""
    return (PACK_DECODE_ROWS, PACK_DECODE_VALUE_ROWS) if decode else (1, PAGE_TOKENS)


STAGE_TOKENS = 16  # tokens per _stage_kernel program (tl.dot needs >= 16 rows) in a step of one-token rows
# ... and in a step with a prompt (H200, 16k-token step, when the kernel still loaded the fp32 rotation: 0.17 ms
# against 0.26 ms at 16, benchmarks/kernels/prefill_parts.py)
STAGE_TOKENS_PREFILL = 64
FA_DTYPES = (torch.float16, torch.bfloat16)  # FlashAttention's inputs (prefill path)


def launch_for(block_m: int) -> dict:
    return LAUNCH if block_m <= 16 else LAUNCH_PREFILL


@functools.cache
def _rotation(d: int, device: torch.device) -> torch.Tensor:
    return hadamard(d, torch.float32, device)


@functools.cache
def _constants(fmt: KVFormat, d: int) -> tuple[dict, dict]:
    """Byte offsets of the staging page and of the packed page (constexprs of the kernels)."""
    lay, slay = fmt.layout(d, PAGE_TOKENS), stage_layout(d)
    stage = dict(SK_META=slay.k.meta_offset, SK_GROUP=slay.k.group, SV_CODES=slay.v.codes_offset,
                 SV_META=slay.v.meta_offset)
    bits = dict(K_BITS=fmt.k_bits, K_CODES=lay.k.codes_offset, K_META=lay.k.meta_offset,
                V_BITS=fmt.v_bits, V_CODES=lay.v.codes_offset, V_META=lay.v.meta_offset)
    return stage, bits


def max_touched_pages(max_query_len: int) -> int:
    """Pages ``n`` new tokens can touch: from offset 63 of a page, ``(n + 62) // 64 + 1``."""
    return (max_query_len + PAGE_TOKENS - 2) // PAGE_TOKENS + 1


class DecodeBuffers:
    """Device tensors that decode plans point into, the same tensors every step.

    A CUDA graph replays the addresses it captured, so what changes from step
    to step (each row's staging slot) is written into ``slots`` before the
    replay, and what does not (row ``i`` is request ``i`` and its token ``i``;
    no scratch pages) is built once.  ``max_reqs`` bounds the rows of a plan;
    ``dummy_slot`` is the staging slot of padded rows (graph capture, batches
    padded to a captured size), never a request's.
    """

    def __init__(self, max_reqs: int, dummy_slot: int, device):
        self.max_reqs, self.dummy_slot = max_reqs, dummy_slot
        self.rows = torch.arange(max_reqs, dtype=torch.int32, device=device)
        self.zeros = torch.zeros(max_reqs, dtype=torch.int32, device=device)
        self.slots = torch.full((max_reqs,), dummy_slot, dtype=torch.int32, device=device)
        self.scratch: dict[tuple[int, int], torch.Tensor] = {}  # decode touches no scratch page; a pointer

    def set_slots(self, slots: list[int]) -> torch.Tensor:
        """Rows' slots into ``self.slots`` (stream-ordered copy from pinned memory); returns the used rows."""
        n = len(slots)
        if n > self.max_reqs:
            raise ValueError(f"kvmix: {n} decode rows, buffers for {self.max_reqs}")
        self.slots[:n].copy_(torch.tensor(slots, dtype=torch.int32, pin_memory=self.slots.is_cuda), non_blocking=True)
        return self.slots[:n]


class StepPlan:
    """What every layer of one step shares: per-request device quantities, query blocks, scratch.

    Built once per batch (the metadata builder does it): ``sbase`` = each
    request's first scratch page (touched pages after the first, back to back),
    ``tok_req`` = each new token's request; the query-block plan of the
    attention kernel; scratch pages sized by host arithmetic only (an upper
    bound), allocated on first use and reused by every layer of the step.
    No host reads of device values.  :meth:`decode` builds the plan of a batch
    of one-token requests from :class:`DecodeBuffers` (CUDA-graph safe).

    With ``flash_attn`` and ``seq_lens_cpu`` (a batch with a row of more than one
    new token): ``prefill`` = the :class:`~vllm_kvmix.kernels.prefill.PrefillPlan`
    of those rows, ``decode_attn`` = query blocks of the one-token rows,
    ``rest_attn`` = query blocks of the rows past ``max_prefill_pages`` (each None
    when empty); ``attn`` (every row) stays for models FlashAttention cannot take.

    ``window``: the sliding window of every layer the plan serves (None: any layer attends its whole
    context); split-K counts then divide the pages a window spans, not the context's.
    """

    def __init__(self, query_start_loc: torch.Tensor, seq_lens: torch.Tensor, num_tokens: int, max_query_len: int,
                 query_start_loc_cpu: list[int], max_seq_len: int, num_heads: int, num_kv_heads: int,
                 num_splits: int | None = None, seq_lens_cpu: list[int] | None = None, flash_attn=None,
                 max_prefill_pages: int = 1 << 30, window: int | None = None, *, head_size: int):
        b = seq_lens.shape[0]
        device = seq_lens.device
        qsl = query_start_loc[: b + 1].to(torch.int32)
        seq = seq_lens[:b].to(torch.int32)
        qlen = qsl[1:] - qsl[:-1]
        ctx = seq - qlen
        touched = torch.where(qlen > 0, (seq - 1).div(PAGE_TOKENS, rounding_mode="floor") - ctx // PAGE_TOKENS + 1, 0)
        extra = (touched - 1).clamp(min=0)
        sbase = (torch.cumsum(extra, 0) - extra).to(torch.int32)
        tok = torch.arange(num_tokens, device=device, dtype=torch.int32)
        # tokens past the last request's end (padding) map to it and are masked by the kernels
        tok_req = torch.searchsorted(qsl[1:], tok, right=True).clamp_(max=b - 1).to(torch.int32)
        rep_p = triton.next_power_of_2(num_heads // num_kv_heads)
        qb_req, qb_tok, bq = plan_query_blocks(query_start_loc_cpu, block_q_for(num_heads, num_kv_heads, max_query_len),
                                               device)
        if num_splits is None:
            # a block's tokens are one request's
            num_splits = plan_splits(qb_req.numel() * num_kv_heads, max_seq_len, window, min(bq, max_query_len), device,
                                     head_size)
        self._set(qsl, seq, sbase, tok_req, num_tokens, max_query_len, num_tokens // PAGE_TOKENS + b + 1, {},
                  (qb_req, qb_tok, bq, rep_p, num_splits))
        if flash_attn is not None and seq_lens_cpu is not None and max_query_len > 1:
            self._plan_prefill(query_start_loc_cpu[: b + 1], seq_lens_cpu[:b], num_tokens, max_seq_len, num_heads,
                               num_kv_heads, flash_attn, max_prefill_pages, window, head_size)

    def _plan_prefill(self, qsl, seq, num_tokens, max_seq_len, num_heads, num_kv_heads, flash_attn, max_pages,
                      window, head_size):
        """Split the batch: one-token rows (decode kernels), prefill rows (``flash_attn`` over dequantized
        pages, :mod:`vllm_kvmix.kernels.prefill`), prefill rows past the page bound (Triton kernel)."""
        device = self.seq.device
        qlen = [qsl[r + 1] - qsl[r] for r in range(len(qsl) - 1)]
        ones = [r for r, n in enumerate(qlen) if n == 1]
        groups, rest = prefill.plan_groups(qsl, seq, [r for r, n in enumerate(qlen) if n > 1], num_tokens, device,
                                           max_pages)
        rep_p = triton.next_power_of_2(num_heads // num_kv_heads)

        def blocks(reqs, max_q):
            if not reqs:
                return None
            req, tok, bq = plan_query_blocks(qsl, block_q_for(num_heads, num_kv_heads, max_q), device, reqs)
            splits = plan_splits(req.numel() * num_kv_heads, max_seq_len, window, min(bq, max_q), device, head_size)
            return req, tok, bq, rep_p, splits

        self.prefill, self.flash_attn = groups, flash_attn
        self.decode_attn = blocks(ones, 1)
        self.rest_attn = blocks(rest, max(qlen[r] for r in rest) if rest else 1)

    def _set(self, qsl, seq, sbase, tok_req, num_tokens, max_query_len, scratch_pages, scratch, attn):
        self.qsl, self.seq, self.sbase, self.tok_req = qsl, seq, sbase, tok_req
        self.n_req, self.num_tokens, self.max_query_len = seq.shape[0], num_tokens, max_query_len
        self.scratch_pages, self._scratch, self.attn = scratch_pages, scratch, attn
        self.prefill = self.flash_attn = self.decode_attn = self.rest_attn = None

    @classmethod
    def decode(cls, bufs: DecodeBuffers, query_start_loc: torch.Tensor, seq_lens: torch.Tensor, n: int,
               max_seq_len: int, num_heads: int, num_kv_heads: int, window: int | None = None, *,
               head_size: int) -> "StepPlan":
        """``n`` rows of one new token each (rows past the real ones: zero tokens, padding).

        Every tensor is a view of ``bufs`` or of the caller's (persistent) ``query_start_loc`` /
        ``seq_lens``; the grid depends on ``n``, ``max_seq_len`` and ``window`` only (pass a bound, e.g. the
        model's maximum length, so a graph captured once stays valid).
        """
        plan = cls.__new__(cls)
        rows = bufs.rows[:n]
        rep_p = triton.next_power_of_2(num_heads // num_kv_heads)
        num_splits = plan_splits(n * num_kv_heads, max_seq_len, window, 1, seq_lens.device, head_size)
        plan._set(query_start_loc[: n + 1].to(torch.int32), seq_lens[:n].to(torch.int32), bufs.zeros[:n], rows,
                  n, 1, 1, bufs.scratch, (rows, rows, block_q_for(num_heads, num_kv_heads, 1), rep_p, num_splits))
        return plan

    def scratch(self, h: int, nbytes: int, device) -> torch.Tensor:
        buf = self._scratch.get((h, nbytes))
        if buf is None:
            if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing() and self.scratch_pages == 1:
                raise RuntimeError("kvmix: decode scratch allocated during CUDA-graph capture (warm up first)")
            buf = torch.empty((self.scratch_pages, h, nbytes), dtype=torch.uint8, device=device)
            self._scratch[(h, nbytes)] = buf
        return buf


class PageStep:
    """One layer's step of the page scheme (:meth:`run`), in launches that can be timed apart: ``write``
    (``stage`` + ``pack``), ``attend``, ``keep``."""

    def __init__(self, key, cache, stage, fmt: KVFormat, slots, block_table, plan: StepPlan):
        t, h, d = key.shape
        self.t, self.h, self.d = t, h, d
        self.cache, self.stage, self.fmt, self.block_table = cache, stage, fmt, block_table
        self.stage_consts, self.bits = _constants(fmt, d)
        self.plan = plan
        self.n_req = plan.n_req
        self.scratch = plan.scratch(h, stage.shape[2], key.device)
        self.rot = _rotation(d, key.device)
        self.slots = slots[: self.n_req]
        self.common = (plan.qsl, plan.seq, self.slots, plan.sbase)

    def run(self, query, key, value, out, scale: float, sliding_window=None, soft_cap=None) -> None:
        """The layer's step: ``write``, ``attend``, ``keep``.  A step of one-token rows that the CUDA decode
        kernel takes is one launch (stage the new tokens, attend, merge the splits, rotate back) and then
        ``pack`` (the kernel writes the 8-bit copy that packing reads)."""
        if self._fused_decode(query, key, sliding_window, soft_cap):
            self._attend_blocks(query, out, scale, sliding_window, None, self.plan.attn, True, new_kv=(key, value))
            self.pack()
            return
        self.write(key, value)
        self.attend(query, out, scale, sliding_window, soft_cap)
        self.keep()

    def _fused_decode(self, query, key, sliding_window, soft_cap) -> bool:
        plan = self.plan
        return (plan.max_query_len == 1 and plan.prefill is None and key.dtype == query.dtype
                and cuda_decode.supports(self.fmt, query, self.d, self.h, sliding_window, soft_cap))

    def write(self, key, value) -> None:
        """Stage the new tokens at 8 bits, then pack every page that is full after the step."""
        stage, scratch = self.stage, self.scratch
        tb = STAGE_TOKENS if self.plan.max_query_len == 1 else STAGE_TOKENS_PREFILL
        _stage_kernel[(triton.cdiv(self.t, tb), self.h)](
            key, value, self.plan.tok_req, *self.common, stage, scratch, self.t,
            key.stride(0), key.stride(1), value.stride(0), value.stride(1),
            stage.stride(0), stage.stride(1), scratch.stride(0), scratch.stride(1),
            D=self.d, TB=tb, **self.stage_consts,
        )
        self.pack()

    def pack(self) -> None:
        """Every page that is full after the step, from its 8-bit copy into the cache."""
        stage, scratch, cache = self.stage, self.scratch, self.cache
        rows, value_rows = pack_launch_rows(self.plan.max_query_len == 1)
        _pack_kernel[(triton.cdiv(self.n_req, rows), max_touched_pages(self.plan.max_query_len),
                      self.h * pack_parts(self.d, value_rows))](
            *self.common, self.block_table, stage, scratch, cache, self.n_req,
            stage.stride(0), stage.stride(1), scratch.stride(0), scratch.stride(1),
            cache.stride(0), cache.stride(1), self.block_table.stride(0),
            D=self.d, **self.stage_consts, **self.bits, R=rows, VR=value_rows, **LAUNCH_PACK,
        )

    def attend(self, query, out, scale: float, sliding_window=None, soft_cap=None) -> None:
        plan = self.plan
        fa = plan.prefill is not None and query.dtype in getattr(plan.flash_attn, "dtypes", FA_DTYPES)
        if not fa:  # every row in one launch (plus the combine of the Triton kernel's splits)
            self._attend_blocks(query, out, scale, sliding_window, soft_cap, plan.attn, plan.max_query_len == 1)
            return
        for group in plan.prefill:  # each group writes its own rows of out, the kernels below the others
            k, v = prefill.dequantize_pages(group, self.cache, self.stage, self.scratch, self.block_table,
                                            self.common, (self.stage_consts, self.bits), self.d, query.dtype)
            prefill.attend(group, query, out, k, v, scale, plan.flash_attn, sliding_window, soft_cap)
            del k, v
        if plan.decode_attn is not None:
            self._attend_blocks(query, out, scale, sliding_window, soft_cap, plan.decode_attn, True)
        if plan.rest_attn is not None:
            self._attend_blocks(query, out, scale, sliding_window, soft_cap, plan.rest_attn, False)

    def _attend_blocks(self, query, out, scale, sliding_window, soft_cap, attn, one_token: bool, new_kv=None) -> None:
        """The page kernels over query blocks ``attn`` (``one_token``: each block is one request's single token;
        ``new_kv``: the CUDA kernel stages the step's keys and values first, :meth:`run`)."""
        qb_req, qb_tok, bq, rep_p, num_splits = attn
        hq, d, h = query.shape[1], self.d, self.h
        nqb = qb_req.numel()
        stage, scratch, cache = self.stage, self.scratch, self.cache
        # one-token rows: every page (packed + the staged own page) in CUDA (csrc/page_decode.cu), split-K
        # merged and the output rotated back in the same launch
        if one_token and cuda_decode.supports(self.fmt, query, d, h, sliding_window, soft_cap):
            cuda_decode.launch(query, cache, stage, self.slots, self.block_table, self.plan.qsl, self.plan.seq, qb_req,
                               out, num_splits, scale, self.fmt, self.bits, self.stage_consts, new_kv, sliding_window)
            return
        if new_kv is not None:
            raise ValueError("kvmix: only the CUDA decode kernel stages new tokens in its launch")
        block_m = bq * rep_p
        if num_splits > 1:
            ws_acc = torch.empty(nqb * h * num_splits * block_m * d, dtype=torch.float32, device=query.device)
            ws_ml = torch.empty(nqb * h * num_splits * block_m * 2, dtype=torch.float32, device=query.device)
        else:
            ws_acc = ws_ml = out  # unused
        _page_attention_kernel[(nqb, h, num_splits)](
            query, out, cache, stage, scratch, self.rot, self.block_table,
            *self.common, qb_req, qb_tok,
            ws_acc, ws_ml, num_splits,
            float(scale), float(soft_cap or 0.0), int(sliding_window or 0),
            query.stride(0), query.stride(1), out.stride(0), out.stride(1),
            cache.stride(0), cache.stride(1), self.block_table.stride(0),
            stage.stride(0), stage.stride(1), scratch.stride(0), scratch.stride(1),
            D=d, REP=hq // h, REP_P=rep_p, BLOCK_Q=bq, **self.bits, **self.stage_consts,
            USE_WINDOW=sliding_window is not None, USE_SOFTCAP=bool(soft_cap),
            IEEE_DOT=query.dtype == torch.float32, SPLIT=num_splits > 1, **launch_for(block_m),
        )
        if num_splits > 1:
            combine_kernel[(nqb, h)](
                out, ws_acc, ws_ml, self.plan.qsl, qb_req, qb_tok, num_splits, self.rot,
                out.stride(0), out.stride(1), D=d, REP=hq // h, REP_P=rep_p, BLOCK_Q=bq, ROTATE=True,
            )

    def keep(self) -> None:
        """A still-partial last page that lives in scratch goes to the request's slot (after attention)."""
        if self.plan.max_query_len == 1:  # one new token never leaves the slot's page
            return
        stage, scratch = self.stage, self.scratch
        _keep_partial_kernel[(self.n_req, self.h)](
            *self.common, stage, scratch,
            stage.stride(0), stage.stride(1), scratch.stride(0), scratch.stride(1),
            NBYTES=stage.shape[2], CHUNK=1024,
        )


def compile_prefill_kernels(fmt: KVFormat, d: int, h: int, dtype: torch.dtype, block_table_width: int,
                            device) -> None:
    """Compile the prefill dequant kernel for one layer (format, head size, KV heads, model dtype) before the
    first prompt: vLLM's warm-up runs no prompt through it, and a compile on the first request is a latency
    spike of seconds.  Runs it on a one-page plan over blank tensors with the strides the real ones have
    (cache and staging pages of this layout, a block table of ``block_table_width`` columns), which is what
    Triton specializes on."""
    device = torch.device(device)
    stage_consts, bits = _constants(fmt, d)
    lay, slay = fmt.layout(d, PAGE_TOKENS), stage_layout(d)
    cache = torch.zeros((1, h, lay.head_page_bytes), dtype=torch.uint8, device=device)
    stage = torch.zeros((1, h, slay.head_page_bytes), dtype=torch.uint8, device=device)
    block_table = torch.zeros((1, block_table_width), dtype=torch.int32, device=device)
    common = tuple(torch.tensor(x, dtype=torch.int32, device=device) for x in ([0, PAGE_TOKENS], [PAGE_TOKENS], [0], [0]))
    plan = prefill.PrefillPlan([0, PAGE_TOKENS], [PAGE_TOKENS], [0], PAGE_TOKENS, device)
    prefill.dequantize_pages(plan, cache, stage, stage, block_table, common, (stage_consts, bits), d, dtype)


def page_step(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    cache: torch.Tensor, stage: torch.Tensor, fmt: KVFormat,
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, slots: torch.Tensor, block_table: torch.Tensor,
    scale: float, max_query_len: int, sliding_window: int | None = None, soft_cap: float | None = None,
    out: torch.Tensor | None = None, num_splits: int | None = None, max_seq_len: int | None = None,
    query_start_loc_cpu: list[int] | None = None, plan: StepPlan | None = None,
    seq_lens_cpu: list[int] | None = None, flash_attn=None, max_prefill_pages: int = 1 << 30,
) -> torch.Tensor:
    """Store the step's K/V (stage, pack full pages) and attend; same contract as the reference ``step``.

    ``plan``: the step's :class:`StepPlan` (shared by all layers); built here when not given
    (``query_start_loc_cpu`` and ``max_seq_len`` then spare a device read each; with ``flash_attn``
    and ``seq_lens_cpu``, prefill rows run on it, :mod:`vllm_kvmix.kernels.prefill`).
    """
    out = torch.empty_like(query) if out is None else out
    if query.shape[0] == 0:
        return out
    if plan is None:
        b = seq_lens.shape[0]
        qsl_cpu = query_start_loc_cpu if query_start_loc_cpu is not None else query_start_loc[: b + 1].tolist()
        msl = max_seq_len if max_seq_len is not None else int(seq_lens.max())
        plan = StepPlan(query_start_loc, seq_lens, query.shape[0], max_query_len, qsl_cpu, msl,
                        query.shape[1], key.shape[1], num_splits, seq_lens_cpu, flash_attn, max_prefill_pages,
                        sliding_window, head_size=query.shape[2])
    st = PageStep(key, cache, stage, fmt, slots.to(torch.int32), block_table, plan)
    st.run(query, key, value, out, scale, sliding_window, soft_cap)
    return out
