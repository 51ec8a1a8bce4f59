"""Per-token group quantizer pieces shared by the page kernels, in Triton.

``quant_rows`` / ``pack_rows`` turn rows of ``[D]`` vectors into packed codes +
fp16 (scale, minimum) per 64-channel group (staging, packed values; ``quant_rows_clipped``
for values below 8 bits);
``decode_cols`` / ``decode_tile`` load channels of a ``[TILE, D]`` tile of per-token codes back as fp32.
Also ``softmax_step`` (online softmax) and ``rotate_store`` (output times the
Hadamard matrix, for rotated values).  Bit-for-bit the same arithmetic
as :func:`vllm_kvmix.quant.quantize` (fp16-rounded metadata, round half up,
IEEE division), so kernel and reference agree exactly.
"""

import triton
import triton.language as tl

from vllm_kvmix.quant import CLIP_STEPS as _CLIP_STEPS

FP16_MAX = tl.constexpr(65504.0)
# The Triton kernels' output rotation (x H after attention) as fp32 dots: "tf32x3" (three tensor-core TF32
# products, ~fp32 accuracy).  "ieee" spilled hundreds of registers on H100 (the combine kernel 100 us) --
# benchmarks/results/page-decode-h100.json.  Value staging generates H's signs instead
# (page._hadamard_columns).
ROT_PRECISION = tl.constexpr("tf32x3")
CLIP_STEPS = tl.constexpr(_CLIP_STEPS)
# the clip search's squared errors are summed in this type (fp64: +27% pack time on the H200, same choices
# but for ties at fp32 rounding)
CLIP_ERR_DTYPE = tl.constexpr(tl.float32)


@triton.jit
def minmax_meta(mn, mx, LEVELS: tl.constexpr):
    """fp16-rounded (scale, minimum) and the fp32 inverse scale; :func:`vllm_kvmix.quant.quantize`'s arithmetic."""
    mn16 = mn.to(tl.float16)
    scale16 = tl.minimum(tl.math.div_rn(mx - mn16.to(tl.float32), tl.full(mx.shape, LEVELS, tl.float32)), FP16_MAX)
    scale16 = scale16.to(tl.float16)
    top = mn16.to(tl.float32) + LEVELS * scale16.to(tl.float32)
    down = (scale16.to(tl.int16, bitcast=True) - 1).to(tl.float16, bitcast=True)
    scale16 = tl.where(top > FP16_MAX, down, scale16)
    scale = scale16.to(tl.float32)
    inv = tl.where(scale > 0, tl.math.div_rn(tl.full(scale.shape, 1.0, tl.float32), scale), 0.0)
    return scale16, mn16, inv


@triton.jit
def _groups(x, GROUP: tl.constexpr):
    """``x[R, D]`` clamped to the fp16 range, as ``[R, D // GROUP, GROUP]``."""
    x = tl.minimum(tl.maximum(x, -FP16_MAX), FP16_MAX)
    return tl.reshape(x, (x.shape[0], x.shape[1] // GROUP, GROUP))


@triton.jit
def _group_codes(xg, mn16, inv, LEVELS: tl.constexpr):
    """fp32 codes (integral, saturated to ``[0, LEVELS]``) of ``xg[R, G, GROUP]``: round half up."""
    y = tl.floor((xg - mn16.to(tl.float32)[:, :, None]) * inv[:, :, None] + 0.5)
    return tl.minimum(tl.maximum(y, 0.0), LEVELS * 1.0)


@triton.jit
def quant_rows(x, BITS: tl.constexpr, GROUP: tl.constexpr):
    """Per-token groups: ``x[R, D]`` -> codes int32 ``[R, D]``, scale16 / min16 ``[R, D // GROUP]``."""
    LEVELS: tl.constexpr = (1 << BITS) - 1
    xg = _groups(x, GROUP)
    scale16, mn16, inv = minmax_meta(tl.min(xg, axis=2), tl.max(xg, axis=2), LEVELS)
    codes = _group_codes(xg, mn16, inv, LEVELS).to(tl.int32)
    return tl.reshape(codes, x.shape), scale16, mn16


@triton.jit
def quant_rows_clipped(x, BITS: tl.constexpr, GROUP: tl.constexpr):
    """:func:`quant_rows` with each group's range clipped to its least-squared-error ratio: the arithmetic of
    :func:`vllm_kvmix.quant.quantize_clipped` (candidate ranges in fp64, the first candidate of least error
    wins).  The errors are summed in fp32 as the reference does, in another order: the two pick different
    candidates only where two errors tie to fp32 rounding; fp64 sums made the pack kernel 27% slower on the H200."""
    LEVELS: tl.constexpr = (1 << BITS) - 1
    xg = _groups(x, GROUP)
    mn = tl.min(xg, axis=2).to(tl.float64)
    mx = tl.max(xg, axis=2).to(tl.float64)
    mid = (mn + mx) * 0.5
    half = (mx - mn) * 0.5
    best_err = tl.full(mn.shape, float("inf"), CLIP_ERR_DTYPE)
    best_lo = tl.zeros(mn.shape, tl.float32)
    best_hi = tl.zeros(mn.shape, tl.float32)
    for k in range(CLIP_STEPS):
        r = 1.0 - k / 64.0  # exact in fp32; ``half * r`` is exact in fp64
        lo = (mid - half * r).to(tl.float32)
        hi = (mid + half * r).to(tl.float32)
        scale16, mn16, inv = minmax_meta(lo, hi, LEVELS)
        c = _group_codes(xg, mn16, inv, LEVELS)
        diff = (c * scale16.to(tl.float32)[:, :, None] + mn16.to(tl.float32)[:, :, None] - xg).to(CLIP_ERR_DTYPE)
        err = tl.sum(diff * diff, axis=2)
        take = err < best_err
        best_err = tl.where(take, err, best_err)
        best_lo = tl.where(take, lo, best_lo)
        best_hi = tl.where(take, hi, best_hi)
    scale16, mn16, inv = minmax_meta(best_lo, best_hi, LEVELS)
    codes = _group_codes(xg, mn16, inv, LEVELS).to(tl.int32)
    return tl.reshape(codes, x.shape), scale16, mn16


@triton.jit
def pack_rows(codes, BITS: tl.constexpr):
    """int32 codes ``[R, D]`` -> uint8 ``[R, D * BITS // 8]``, low bits first along D."""
    R: tl.constexpr = codes.shape[0]
    D: tl.constexpr = codes.shape[1]
    PER: tl.constexpr = 8 // BITS
    c = tl.reshape(codes, (R, D // PER, PER))
    shifts = tl.arange(0, PER) * BITS
    return tl.sum(c << shifts[None, None, :], axis=2).to(tl.uint8)


@triton.jit
def _unpack(byte, BITS: tl.constexpr):
    """``int32[R, C]`` bytes -> ``int32[R, C * 8 // BITS]`` codes, low bits first."""
    if BITS == 8:
        return byte
    elif BITS == 4:
        return tl.reshape(tl.join(byte & 15, byte >> 4), (byte.shape[0], byte.shape[1] * 2))
    else:
        even = tl.join(byte & 3, (byte >> 4) & 3)  # codes 0 and 2 of each byte
        odd = tl.join((byte >> 2) & 3, (byte >> 6) & 3)  # codes 1 and 3
        return tl.reshape(tl.join(even, odd), (byte.shape[0], byte.shape[1] * 4))


@triton.jit
def code_f32(code):
    """int32 codes in [0, 2**23) -> fp32, exactly: the bits of 2**23 + code, minus 2**23 (an OR and an
    add instead of an int-to-float conversion, which runs at a quarter of the FMA rate)."""
    return (code | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def decode_cols(
    head_page_ptr,  # *u8: start of the (page, kv head) byte range
    t,  # [TILE] token offsets inside the page
    t_mask,  # [TILE] which offsets to load
    C0,  # first channel (a multiple of W)
    W: tl.constexpr,  # channels (a multiple of GROUP and of 8 // BITS)
    D: tl.constexpr,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    CODES_OFF: tl.constexpr,
    META_OFF: tl.constexpr,
):
    """Dequantize channels ``[C0, C0 + W)`` of ``[TILE, D]`` per-token codes as fp32 ``[TILE, W]`` (rows
    outside ``t_mask`` are 0).

    Loads each packed byte once (``W * BITS / 8`` contiguous bytes a row) and each group's (scale, minimum)
    once, then unpacks and broadcasts in registers.
    """
    G: tl.constexpr = D // GROUP
    NG: tl.constexpr = W // GROUP
    CB: tl.constexpr = D * BITS // 8
    TILE: tl.constexpr = t.shape[0]
    byte = tl.load(
        head_page_ptr + CODES_OFF + t[:, None] * CB + (tl.arange(0, W * BITS // 8) + C0 * BITS // 8)[None, :],
        mask=t_mask[:, None], other=0,
    ).to(tl.int32)
    code = _unpack(byte, BITS)
    meta_ptr = (head_page_ptr + META_OFF).to(tl.pointer_type(tl.float16))
    m_off = t[:, None] * (2 * G) + 2 * (tl.arange(0, NG) + C0 // GROUP)[None, :]
    scale = tl.load(meta_ptr + m_off, mask=t_mask[:, None], other=0.0).to(tl.float32)
    mn = tl.load(meta_ptr + m_off + 1, mask=t_mask[:, None], other=0.0).to(tl.float32)
    scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (TILE, NG, GROUP)), (TILE, W))
    mn = tl.reshape(tl.broadcast_to(mn[:, :, None], (TILE, NG, GROUP)), (TILE, W))
    return code_f32(code) * scale + mn


@triton.jit
def decode_tile(head_page_ptr, t, t_mask, D: tl.constexpr, BITS: tl.constexpr, GROUP: tl.constexpr,
                CODES_OFF: tl.constexpr, META_OFF: tl.constexpr):
    """Dequantize the whole ``[TILE, D]`` tile (:func:`decode_cols` of every channel)."""
    return decode_cols(head_page_ptr, t, t_mask, 0, D, D, BITS, GROUP, CODES_OFF, META_OFF)


@triton.jit
def softmax_step(s, m_i, l_i):
    """One online-softmax step over a tile of scores ``s[M, N]`` (-inf where masked).

    Returns the tile's probabilities (relative to the new running max), the
    factor that rescales the old accumulator, the new max and the new sum.
    """
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    pr = tl.exp(s - m_safe[:, None])
    alpha = tl.exp(m_i - m_safe)
    return pr, alpha, m_new, l_i * alpha + tl.sum(pr, axis=1)


@triton.jit
def rotate_store(o, rot_ptr, out_ptr, tok, head, row_ok, stride_ot, stride_oh, D: tl.constexpr):
    """``out[tok, head, :] = o @ H``, one 64-column block of H at a time (H of D=256 is 256 KiB)."""
    d = tl.arange(0, D)
    c = tl.arange(0, 64)
    for g in tl.static_range(D // 64):
        h_g = tl.load(rot_ptr + d[:, None] * D + g * 64 + c[None, :])
        og = tl.dot(o, h_g, input_precision=ROT_PRECISION)
        tl.store(out_ptr + tok[:, None] * stride_ot + head[:, None] * stride_oh + g * 64 + c[None, :],
                 og.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
