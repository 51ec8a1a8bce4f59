import pytest
import torch

from vllm_kvmix.quant import FP16_MAX, dequantize, pack, quantize, quantize_clipped, unpack


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_unpack_exact(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (5, 3, 64), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.shape == (5, 3, 64 * bits // 8) and packed.dtype == torch.uint8
    assert torch.equal(unpack(packed, bits), codes)


def test_pack_bit_order():
    codes = torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8)
    assert pack(codes, 2).tolist() == [[1 | 2 << 2 | 3 << 4]]
    assert pack(codes, 4).tolist() == [[1 | 2 << 4, 3]]


def _bound(x, meta, group):
    """Per-element error bound: half a step, plus fp16 rounding of min and scale."""
    scale = meta[..., 0].float().repeat_interleave(group, dim=-1)
    mn = meta[..., 1].float().repeat_interleave(group, dim=-1)
    return 0.5 * scale + 1e-3 * scale * (1 << 8) + 1e-3 * mn.abs() + 1e-6


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_error_bound_random(bits, group):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 4, 128, generator=g) * torch.rand(64, 4, 1, generator=g) * 10
    codes, meta = quantize(x, bits, group)
    assert int(codes.max()) < (1 << bits)
    xh = dequantize(codes, meta, group)
    err = (xh - x).abs()
    assert (err <= _bound(x, meta, group)).all()
    # the step shrinks 2^bits-fold: mean error tracks it
    rel = err.mean() / x.abs().mean()
    assert rel < {2: 0.7, 4: 0.15, 8: 0.01}[bits]


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_edge_cases_are_finite(bits):
    x = torch.zeros(6, 64)
    x[1] = 3.25  # constant group: exact
    x[2, 5] = 1e6  # outlier beyond fp16 range
    x[3] = torch.linspace(-1e-8, 1e-8, 64)  # tiny range (scale underflows)
    x[4, :] = -7.0
    x[4, 0] = 7.0
    x[5] = torch.randn(64) * 1e4
    codes, meta = quantize(x, bits, 64)
    xh = dequantize(codes, meta, 64)
    assert torch.isfinite(meta.float()).all() and torch.isfinite(xh).all()
    assert torch.equal(xh[0], x[0]) and torch.equal(xh[1], x[1])
    assert FP16_MAX * 0.99 < xh[2].max() <= FP16_MAX
    assert torch.isfinite(xh.half()).all()
    assert (xh[3].abs() < 1e-7).all()
    assert (xh[4, 1:] == -7.0).all()  # the minimum is stored exactly
    assert ((xh - x.clamp(-FP16_MAX, FP16_MAX)).abs()[4:] <= _bound(x, meta, 64)[4:]).all()


def test_error_bound_real_kv(smollm2_dir, texts):
    """K (after RoPE) and V of SmolLM2 on real text: bound holds, error falls with bits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    ids = tok(texts["alice29.txt"][3000:6000], return_tensors="pt").input_ids[:, :256]
    with torch.no_grad():
        cache = model(ids, use_cache=True).past_key_values
    layer = cache.layers[len(cache.layers) // 2]
    for x in (layer.keys[0].transpose(0, 1), layer.values[0].transpose(0, 1)):  # [T, H, D]
        errs = []
        for bits in (2, 4, 8):
            codes, meta = quantize(x, bits, 64)
            xh = dequantize(codes, meta, 64)
            assert ((xh - x).abs() <= _bound(x, meta, 64)).all()
            errs.append(((xh - x) ** 2).mean() / (x**2).mean())
        assert errs[0] > 4 * errs[1] > 16 * errs[2]


def _group_sq_err(x, codes, meta, group):
    return (dequantize(codes, meta, group) - x).double().square().reshape(*x.shape[:-1], -1, group).sum(-1)


@pytest.mark.parametrize("bits", [2, 4])
def test_clipped_ranges_never_lose_and_win_at_two_bits(bits):
    """Per group, the clipped encoder's squared error is at most min-max's (ratio 1 is a candidate); on
    Gaussian data (what rotated values look like) it removes a quarter of the 2-bit error."""
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(512, 4, 128, generator=g) * torch.rand(512, 4, 1, generator=g) * 10
    plain = _group_sq_err(x, *quantize(x, bits, 64), 64)
    codes, meta = quantize_clipped(x, bits, 64)
    assert int(codes.max()) < (1 << bits)
    clipped = _group_sq_err(x, codes, meta, 64)
    assert (clipped <= plain).all()
    assert (clipped < plain).float().mean() > 0.5
    gain = 1 - (clipped.sum() / plain.sum()).sqrt()
    assert gain > {2: 0.15, 4: 0.03}[bits], gain


def test_clipped_ranges_keep_min_max_where_clipping_hurts():
    """Two-level groups (every value at the minimum or the maximum) are exact under min-max; the clip search
    keeps them exact.  Edge cases stay finite, as in quantize."""
    x = torch.zeros(5, 64)
    x[0, ::2] = 1.5
    x[1] = 3.25
    x[2, 5] = 1e6
    x[3] = torch.linspace(-1e-8, 1e-8, 64)
    x[4] = torch.randn(64) * 1e4
    codes, meta = quantize_clipped(x, 2, 64)
    xh = dequantize(codes, meta, 64)
    assert torch.isfinite(meta.float()).all() and torch.isfinite(xh.half()).all()
    assert torch.equal(xh[0], x[0]) and torch.equal(xh[1], x[1])
    assert torch.equal(codes[0], quantize(x, 2, 64)[0][0])
