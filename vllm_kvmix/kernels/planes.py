"""Packed pages as tensor-core operands, one bit plane at a time.

A byte of ``BITS``-bit codes holds ``PER = 8 // BITS`` channels: channel ``j * PER + k`` is plane
``k`` of byte ``j`` (low bits first, :func:`vllm_kvmix.kernels.codec.pack_rows`).  Plane ``k`` of a
page, ``(byte >> k * BITS) & mask``, is a ``[P, D // PER]`` tensor of channels ``k, k + PER, ...``:
elementwise work on the loaded bytes only (no join / reshape).  :func:`dequant` turns the codes
into exact fp16 numbers (an OR with the bits of 1024.0 and one subtraction, no int-to-float
conversion) and applies the scale / minimum in fp16, on the key / value tile -- the dot operand
that is split across warps -- never on the query / P operand, which every warp holds whole:

* keys (per-channel scale / minimum over the page): the query is split into the same planes once
  per program (:func:`query_plane`), ``s = sum_k q_k @ dequant(plane_k)^T``;
* values (per-token scale / minimum per 64-channel group): ``o_k = P @ dequant(plane_k)``; the
  output is accumulated per plane (channels ``k::PER``) and put back in channel order when it is
  stored (:func:`store_planes`, :func:`rotate_store_planes`).

Under ``IEEE`` (fp32 queries) the same arithmetic runs on fp32 operands.
"""

import triton
import triton.language as tl

from vllm_kvmix.kernels.codec import FP16_MAX, code_f32


@triton.jit
def meta_halves(w):
    """int32 words of fp16 (scale, minimum) pairs (scale in the low half) -> (scale, minimum) fp16."""
    return w.to(tl.int16).to(tl.float16, bitcast=True), (w >> 16).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def dequant(x, scale, minimum, IEEE: tl.constexpr):
    """Integer codes in [0, 1024) -> ``code * scale + minimum``: fp16 arithmetic on the exact fp16 code
    (the bits of 1024 + code -- an OR -- minus 1024; no int-to-float conversion); fp32 under IEEE.
    ``scale`` / ``minimum``: fp16 metadata, so the result is in the fp16 range by construction."""
    if IEEE:
        return code_f32(x.to(tl.int32)) * scale.to(tl.float32) + minimum.to(tl.float32)
    else:
        code = (x.to(tl.int32) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - 1024.0
        return code * scale.to(tl.float16) + minimum.to(tl.float16)


@triton.jit
def operand(x, IEEE: tl.constexpr):
    """``x`` as the left operand of a dot with :func:`dequant` values: fp16, clamped to its range (fp32 under IEEE)."""
    if IEEE:
        return x.to(tl.float32)
    else:
        return tl.minimum(tl.maximum(x, -FP16_MAX), FP16_MAX).to(tl.float16)


@triton.jit
def pdot(a, b, IEEE: tl.constexpr):
    """``a @ b`` for operands from :func:`operand` / :func:`dequant`, fp32 accumulation."""
    if IEEE:
        return tl.dot(a, b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b.to(tl.float16))


@triton.jit
def query_plane(q_ptr, tok, head, row_ok, stride_qt, stride_qh, k, D: tl.constexpr, BITS: tl.constexpr,
                IEEE: tl.constexpr):
    """Query channels ``k::PER`` as a dot operand ``[M, D // PER]`` (the key plane ``k`` pairs with them)."""
    PER: tl.constexpr = 8 // BITS
    ch = tl.arange(0, D // PER) * PER + k
    q = tl.load(q_ptr + tok[:, None] * stride_qt + head[:, None] * stride_qh + ch[None, :], mask=row_ok[:, None],
                other=0.0)
    return operand(q.to(tl.float32), IEEE)


@triton.jit
def packed_scores(page, t, t_ok, qp0, qp1, qp2, qp3,
                  D: tl.constexpr, BITS: tl.constexpr, CODES_OFF: tl.constexpr, META_OFF: tl.constexpr,
                  IEEE: tl.constexpr):
    """``q . k`` for the ``[P]`` tokens ``t`` of a packed page (keys per channel); ``qp{k}`` = query plane k."""
    PER: tl.constexpr = 8 // BITS
    CB: tl.constexpr = D * BITS // 8
    MASK: tl.constexpr = (1 << BITS) - 1
    j = tl.arange(0, CB)
    kb = tl.load(page + CODES_OFF + t[:, None] * CB + j[None, :], mask=t_ok[:, None], other=0)
    meta = (page + META_OFF).to(tl.pointer_type(tl.float16))
    s = tl.zeros([qp0.shape[0], t.shape[0]], tl.float32)
    for k in tl.static_range(PER):
        if k == 0:
            qk = qp0
        elif k == 1:
            qk = qp1
        elif k == 2:
            qk = qp2
        else:
            qk = qp3
        ch = j * PER + k
        key = dequant((kb >> (k * BITS)) & MASK, tl.load(meta + 2 * ch)[None, :], tl.load(meta + 2 * ch + 1)[None, :],
                      IEEE)
        s += pdot(qk, tl.trans(key), IEEE)
    return s


@triton.jit
def packed_pv(pr, page, t, t_ok,
              D: tl.constexpr, BITS: tl.constexpr, CODES_OFF: tl.constexpr, META_OFF: tl.constexpr,
              IEEE: tl.constexpr):
    """``P @ V`` of a packed page (values per token, 64-channel groups) as planes ``(o0, o1, o2, o3)``.

    ``pr``: P as a dot operand.  ``o_k`` ``[M, D // PER]`` holds channels ``k::PER``; for ``k >= PER``
    it is ``o0`` (unused).
    """
    PER: tl.constexpr = 8 // BITS
    CB: tl.constexpr = D * BITS // 8
    G: tl.constexpr = D // 64
    MASK: tl.constexpr = (1 << BITS) - 1
    j = tl.arange(0, CB)
    vb = tl.load(page + CODES_OFF + t[:, None] * CB + j[None, :], mask=t_ok[:, None], other=0)
    # (scale, minimum) of each code's token and group: one 32-bit word, halves split in registers
    words = (page + META_OFF).to(tl.pointer_type(tl.int32))
    sc, mn = meta_halves(tl.load(words + t[:, None] * G + (j // (64 // PER))[None, :], mask=t_ok[:, None], other=0))
    o0 = pdot(pr, dequant(vb & MASK, sc, mn, IEEE), IEEE)
    o1 = o0
    o2 = o0
    o3 = o0
    if PER > 1:
        o1 = pdot(pr, dequant((vb >> BITS) & MASK, sc, mn, IEEE), IEEE)
    if PER > 2:
        o2 = pdot(pr, dequant((vb >> 2 * BITS) & MASK, sc, mn, IEEE), IEEE)
        o3 = pdot(pr, dequant((vb >> 3 * BITS) & MASK, sc, mn, IEEE), IEEE)
    return o0, o1, o2, o3


@triton.jit
def staged_plane(src, t, t_ok, k, PER: tl.constexpr, D: tl.constexpr, CODES_OFF: tl.constexpr,
                 META_OFF: tl.constexpr, GROUP: tl.constexpr, IEEE: tl.constexpr):
    """Channels ``k::PER`` of one side of an 8-bit staged page (per-token ``GROUP``-channel groups), dequantized
    ``[P, D // PER]`` (fp16; fp32 under IEEE): the own page read in the packed planes' channel order."""
    G: tl.constexpr = D // GROUP
    ch = tl.arange(0, D // PER) * PER + k
    code = tl.load(src + CODES_OFF + t[:, None] * D + ch[None, :], mask=t_ok[:, None], other=0)
    words = (src + META_OFF).to(tl.pointer_type(tl.int32))
    sc, mn = meta_halves(tl.load(words + t[:, None] * G + (ch // GROUP)[None, :], mask=t_ok[:, None], other=0))
    return dequant(code, sc, mn, IEEE)


@triton.jit
def store_planes(ptr, row_off, o0, o1, o2, o3, mask, BITS: tl.constexpr):
    """``ptr[row_off + channel] = o`` for planes ``o{k}`` (channels ``k::PER``), rows where ``mask``."""
    PER: tl.constexpr = 8 // BITS
    j = tl.arange(0, o0.shape[1]) * PER
    tl.store(ptr + row_off[:, None] + j[None, :], o0, mask=mask[:, None])
    if PER > 1:
        tl.store(ptr + row_off[:, None] + j[None, :] + 1, o1, mask=mask[:, None])
    if PER > 2:
        tl.store(ptr + row_off[:, None] + j[None, :] + 2, o2, mask=mask[:, None])
        tl.store(ptr + row_off[:, None] + j[None, :] + 3, o3, mask=mask[:, None])


@triton.jit
def rotate_store_planes(o0, o1, o2, o3, rot_ptr, out_ptr, tok, head, row_ok, stride_ot, stride_oh,
                        D: tl.constexpr, BITS: tl.constexpr, ROT_PRECISION: tl.constexpr):
    """``out[tok, head, :] = o @ H`` from the planes of ``o`` (rows ``k::PER`` of H), 64 columns at a time."""
    PER: tl.constexpr = 8 // BITS
    r = tl.arange(0, D // PER) * PER
    c = tl.arange(0, 64)
    for g in tl.static_range(D // 64):
        h = rot_ptr + r[:, None] * D + g * 64 + c[None, :]
        og = tl.dot(o0, tl.load(h), input_precision=ROT_PRECISION)
        if PER > 1:
            og += tl.dot(o1, tl.load(h + D), input_precision=ROT_PRECISION)
        if PER > 2:
            og += tl.dot(o2, tl.load(h + 2 * D), input_precision=ROT_PRECISION)
            og += tl.dot(o3, tl.load(h + 3 * D), input_precision=ROT_PRECISION)
        tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + g * 64 + c[None, :],
                 og.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
