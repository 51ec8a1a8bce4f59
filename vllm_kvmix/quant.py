"""Reference quantization: asymmetric min-max over groups, bit packing, Hadamard.

Pure PyTorch, any device.  This is the oracle the Triton kernels are tested
against and the arithmetic the CPU path runs.

Shapes: ``x: [..., D]`` with ``D % group == 0``.  Codes are ``uint8[..., D]``
(one code per byte, unpacked); metadata is ``float16[..., D // group, 2]``
holding ``(scale, minimum)`` per group; ``x ~= code * scale + minimum``.
"""

from __future__ import annotations

import functools
import math

import torch

FP16_MAX = 65504.0


def quantize(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x[..., D]`` to ``bits``-bit codes per group of ``group`` channels.

    The fp16 scale and minimum are rounded first and the codes computed from
    the rounded values, so ``dequantize`` reproduces exactly what was encoded.
    Constant groups get scale 0 (exact); values beyond the fp16 range are
    clamped to it, so no code or metadata is ever NaN or inf.
    """
    xg = _groups(x, group)
    codes, scale16, mn16 = _encode(xg, xg.amin(dim=-1), xg.amax(dim=-1), bits)
    return codes.to(torch.uint8).reshape(x.shape), torch.stack([scale16, mn16], dim=-1)


# Clip ratios tried by :func:`quantize_clipped`: 1 - k/64, k = 0 .. 15 (1.0 down to 0.77).  k/64 has six
# significant bits, so ``half * ratio`` is exact in fp64 (for any group whose min and max are within a factor
# 2^23 in magnitude) and a kernel's fused multiply-add rounds the candidate range as this code does.  A wider
# search lowers the per-element error further but not what the model sees: down to 0.52, the least-error clip
# raised k4v2's KL on Qwen2.5-Coder-1.5B where this range lowers it (docs/results.md, section 5).
CLIP_STEPS = 16


def quantize_clipped(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`quantize` with each group's range shrunk about its centre to the ratio of least squared error.

    Candidate ``k`` encodes over ``[mid - half * r, mid + half * r]``, ``r = 1 - k / 64`` (``mid`` and
    ``half`` of the group's min-max range, in fp64, then rounded to fp32 and encoded as :func:`quantize`
    does: codes beyond the range saturate).  The error of a candidate is the fp32 sum of the squared fp32
    differences between the dequantized and the input values; the first candidate of least error wins, so
    ``k = 0`` (plain min-max) is kept unless a clip is strictly better.  Same layout, same decoders: only
    the encoder changes.  (The Triton pack kernel sums in another order: the two can pick different
    candidates only where two errors tie to fp32 rounding.)
    """
    levels = (1 << bits) - 1
    xg = _groups(x, group)
    mn, mx = xg.amin(dim=-1).double(), xg.amax(dim=-1).double()
    mid, half = (mn + mx) * 0.5, (mx - mn) * 0.5
    best_err = torch.full_like(xg[..., 0], float("inf"))
    best_lo, best_hi = torch.zeros_like(xg[..., 0]), torch.zeros_like(xg[..., 0])
    work = torch.empty_like(xg)
    for k in range(CLIP_STEPS):
        r = 1.0 - k / 64
        lo, hi = (mid - half * r).float(), (mid + half * r).float()
        scale16, mn16, inv = _meta(lo, hi, levels)
        # the squared error of this candidate's codes, in place: (code * scale + min - x)^2 summed per group
        _codes_into(work, xg, mn16, inv, levels)
        work.mul_(scale16.float().unsqueeze(-1)).add_(mn16.float().unsqueeze(-1)).sub_(xg)
        err = work.square_().sum(-1)
        take = err < best_err
        best_err = torch.where(take, err, best_err)
        best_lo = torch.where(take, lo, best_lo)
        best_hi = torch.where(take, hi, best_hi)
    codes, scale16, mn16 = _encode(xg, best_lo, best_hi, bits)
    return codes.to(torch.uint8).reshape(x.shape), torch.stack([scale16, mn16], dim=-1)


def quantize_values(x: torch.Tensor, bits: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed values' encoder: :func:`quantize_clipped` below 8 bits, :func:`quantize` at 8 (the Triton pack
    kernel follows the same rule)."""
    return (quantize_clipped if bits < 8 else quantize)(x, bits, group)


def _groups(x: torch.Tensor, group: int) -> torch.Tensor:
    """``x[..., D]`` as fp32 ``[..., D // group, group]``, clamped to the fp16 range."""
    *lead, d = x.shape
    if d % group:
        raise ValueError(f"last dim {d} is not divisible by group {group}")
    return x.float().reshape(*lead, d // group, group).clamp(-FP16_MAX, FP16_MAX)


def _meta(mn: torch.Tensor, mx: torch.Tensor, levels: int):
    """fp16 scale and minimum of a range ``[mn, mx]`` and the fp32 inverse scale."""
    mn16 = mn.to(torch.float16)
    # The range is measured from the rounded minimum so the top code still
    # reaches the maximum.
    scale16 = ((mx - mn16.float()) / levels).clamp(max=FP16_MAX).to(torch.float16)
    # Rounding the scale up can push the top level past the fp16 range; one
    # ulp down keeps every dequantized value representable in fp16.
    top = mn16.float() + levels * scale16.float()
    scale16 = torch.where(top > FP16_MAX, torch.nextafter(scale16, torch.zeros_like(scale16)), scale16)
    scale = scale16.float()
    inv = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    return scale16, mn16, inv


def _codes_into(out: torch.Tensor, xg: torch.Tensor, mn16: torch.Tensor, inv: torch.Tensor, levels: int) -> torch.Tensor:
    """Codes (fp32, integral) of ``xg[..., G, group]`` written into ``out``: round half up (floor(y + 0.5)),
    the rule the Triton kernels use, saturated to ``[0, levels]``."""
    torch.sub(xg, mn16.float().unsqueeze(-1), out=out)
    return out.mul_(inv.unsqueeze(-1)).add_(0.5).floor_().clamp_(0, levels)


def _encode(xg: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor, bits: int):
    """Codes (fp32, integral), fp16 scale and minimum of groups ``xg[..., G, group]`` over ``[mn, mx]``."""
    levels = (1 << bits) - 1
    scale16, mn16, inv = _meta(mn, mx, levels)
    return _codes_into(torch.empty_like(xg), xg, mn16, inv, levels), scale16, mn16


def dequantize(codes: torch.Tensor, meta: torch.Tensor, group: int) -> torch.Tensor:
    """Inverse of :func:`quantize`: ``uint8[..., D]`` + ``fp16[..., G, 2]`` -> fp32."""
    *lead, d = codes.shape
    cg = codes.reshape(*lead, d // group, group).float()
    scale = meta[..., 0].float().unsqueeze(-1)
    mn = meta[..., 1].float().unsqueeze(-1)
    return (cg * scale + mn).reshape(*lead, d)


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack ``uint8[..., D]`` codes into ``uint8[..., D * bits // 8]``, low bits first."""
    if bits == 8:
        return codes.to(torch.uint8)
    per = 8 // bits
    *lead, d = codes.shape
    c = codes.to(torch.int32).reshape(*lead, d // per, per)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int32) * bits
    return (c << shifts).sum(dim=-1).to(torch.uint8)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`pack`: ``uint8[..., B]`` -> ``uint8[..., B * 8 // bits]``."""
    if bits == 8:
        return packed
    per = 8 // bits
    *lead, b = packed.shape
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    c = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return c.to(torch.uint8).reshape(*lead, b * per)


def quantize_channels(x: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x[..., P, D]`` per channel over its ``P`` tokens.

    Returns codes ``uint8[..., P, D]`` and meta ``float16[..., D, 2]`` (scale,
    minimum per channel); ``x[..., t, c] ~= codes[..., t, c] * scale[c] + min[c]``.
    Same rounding rules as :func:`quantize` (it is :func:`quantize` on the
    transposed tensor with one group per channel).
    """
    p = x.shape[-2]
    codes, meta = quantize(x.transpose(-1, -2), bits, p)  # [..., D, P], [..., D, 1, 2]
    return codes.transpose(-1, -2).contiguous(), meta.squeeze(-2)


def dequantize_channels(codes: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_channels`: ``uint8[..., P, D]`` + ``fp16[..., D, 2]`` -> fp32."""
    return codes.float() * meta[..., 0].float().unsqueeze(-2) + meta[..., 1].float().unsqueeze(-2)


@functools.lru_cache(maxsize=16)
def _hadamard_cpu(d: int) -> torch.Tensor:
    if d < 1 or d & (d - 1):
        raise ValueError(f"Hadamard rotation needs a power-of-two head size, got {d}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(d)


def hadamard(d: int, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
    """The normalized Sylvester Hadamard matrix ``H[d, d]``: symmetric, ``H @ H = I``."""
    return _hadamard_cpu(d).to(dtype=dtype, device=device)
