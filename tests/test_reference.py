"""The reference's building blocks: fp64 dense attention vs an independent fp32 oracle, staging slot I/O."""

import torch

from vllm_kvmix.formats import stage_layout
from vllm_kvmix.quant import dequantize, quantize
from vllm_kvmix.reference import dense_attention, read_pages, store_tokens


def _dequant(x, bits, group):
    codes, meta = quantize(x, bits, group)
    return dequantize(codes, meta, group)


def _naive_attention(q, k, v, scale, q_pos, k_pos, sliding_window=None, soft_cap=None):
    """Independent fp32 oracle: one query head at a time, explicit mask."""
    rep = q.shape[1] // k.shape[1]
    out = torch.empty(q.shape)
    mask = k_pos[None, :] <= q_pos[:, None]
    if sliding_window is not None:
        mask &= q_pos[:, None] - k_pos[None, :] < sliding_window
    for hq in range(q.shape[1]):
        s = (q[:, hq].float() @ k[:, hq // rep].float().T) * scale
        if soft_cap:
            s = soft_cap * torch.tanh(s / soft_cap)
        p = torch.softmax(s.masked_fill(~mask, float("-inf")), dim=-1)
        out[:, hq] = p @ v[:, hq // rep].float()
    return out


def test_dense_attention_matches_naive():
    q, k, v = _case(3, 40, 2, 3, 64)
    pos = torch.arange(40)
    for kw in ({}, {"sliding_window": 5}, {"soft_cap": 3.0}):
        torch.testing.assert_close(
            dense_attention(q, k, v, 0.2, pos, pos, **kw), _naive_attention(q, k, v, 0.2, pos, pos, **kw),
            rtol=1e-5, atol=1e-5,
        )


def _case(seed, T, H, rep, D):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(T, H, D, generator=g)
    k[:, :, 3] *= 8  # an outlier channel, as real keys have
    v = torch.randn(T, H, D, generator=g)
    q = torch.randn(T, H * rep, D, generator=g)
    return q, k, v


def test_staging_slot_roundtrip_matches_quantizer():
    """store_tokens / read_pages on staging slots (8 bits per token, 64-channel groups): reading a slot gives
    the quantizer's values, other slots stay untouched."""
    D, H, P = 128, 2, 64
    lay = stage_layout(D)
    stage = torch.full((4, H, lay.head_page_bytes), 0xFF, dtype=torch.uint8)
    _, k, v = _case(5, P, H, 1, D)
    slots = 2 * P + torch.arange(P)
    for side, x in ((lay.k, k), (lay.v, v)):
        store_tokens(stage, side, *quantize(x, side.bits, side.group), slots)
    kd, vd = read_pages(stage, torch.tensor([2]), lay)
    assert torch.equal(kd, _dequant(k, 8, lay.k.group)) and torch.equal(vd, _dequant(v, 8, lay.v.group))
    assert (stage[[0, 1, 3]] == 0xFF).all()
