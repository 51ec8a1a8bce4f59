"""Reference paged write + attention vs dense fp32 attention over dequantized K/V."""

import pytest
import torch

from vllm_kvmix.formats import parse_format
from vllm_kvmix.quant import dequantize, quantize
from vllm_kvmix.reference import dense_attention, paged_attention, read_pages, write_kv


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


def _dense_ref(q, k, v, fmt, q_pos, k_pos, **kw):
    kd = _dequant(k, fmt.k_bits, fmt.group)
    vd = _dequant(v, fmt.v_bits, fmt.group)
    return _naive_attention(q, kd, vd, q_pos=q_pos, k_pos=k_pos, **kw)


def test_dense_attention_matches_naive():
    q, k, v = _case(3, 40, 2, 3, 64)
    pos = torch.arange(40)
    for kw in ({}, {"sliding_window": 5}, {"soft_cap": 3.0}):
        torch.testing.assert_close(
            dense_attention(q, k, v, 0.2, pos, pos, **kw), _naive_attention(q, k, v, 0.2, pos, pos, **kw),
            rtol=1e-5, atol=1e-5,
        )


class PagedSim:
    """Allocates shuffled pages per request and writes chunks like vLLM does."""

    def __init__(self, fmt, head_size, num_kv_heads, block_size, num_blocks, seed=0):
        self.fmt, self.d, self.h, self.bs = fmt, head_size, num_kv_heads, block_size
        lay = fmt.layout(head_size, block_size)
        self.cache = torch.full((num_blocks, num_kv_heads, lay.head_page_bytes), 0xFF, dtype=torch.uint8)
        self.free = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
        self.tables: list[list[int]] = []

    def add_request(self) -> int:
        self.tables.append([])
        return len(self.tables) - 1

    def slots(self, req, start, n):
        table = self.tables[req]
        while len(table) * self.bs < start + n:
            table.append(self.free.pop())
        return [table[p // self.bs] * self.bs + p % self.bs for p in range(start, start + n)]

    def block_table(self):
        width = max(len(t) for t in self.tables)
        return torch.tensor([t + [0] * (width - len(t)) for t in self.tables], dtype=torch.int32)


def _case(seed, T, H, rep, D):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(T, H, D, generator=g)
    k[:, :, 3] *= 8  # an outlier channel, as real keys have
    v = torch.randn(T, H, D, generator=g)
    q = torch.randn(T, H * rep, D, generator=g)
    return q, k, v


@pytest.mark.parametrize("name", ["kvmix-k4v2-tok", "kvmix-k8v4-tok", "kvmix-k2v4-tok-g32", "kvmix-k8v8-tok-g128"])
@pytest.mark.parametrize("block_size", [16, 32, 64])
@pytest.mark.parametrize("rep", [1, 3, 4])
def test_prefill_matches_dense(name, block_size, rep):
    fmt = parse_format(name)
    D, H, T = 128, 2, 77
    q, k, v = _case(0, T, H, rep, D)
    sim = PagedSim(fmt, D, H, block_size, num_blocks=16)
    r = sim.add_request()
    write_kv(sim.cache, k, v, torch.tensor(sim.slots(r, 0, T)), fmt, block_size)
    out = paged_attention(q, sim.cache, fmt, block_size, [0, T], [T], sim.block_table(), scale=D**-0.5)
    pos = torch.arange(T)
    ref = _dense_ref(q, k, v, fmt, pos, pos, scale=D**-0.5)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("splits", [(40, 25, 1, 1, 1), (1,) * 9, (16, 16, 17), (64, 5)])
@pytest.mark.parametrize("window", [None, 7, 33])
@pytest.mark.parametrize("soft_cap", [None, 5.0])
def test_chunked_prefill_and_decode_match_dense(splits, window, soft_cap):
    """A request written chunk by chunk; each step's queries see the whole stored context."""
    fmt = parse_format("kvmix-k4v2-tok")
    D, H, rep, bs = 64, 3, 3, 16
    T = sum(splits)
    q, k, v = _case(1, T, H, rep, D)
    sim = PagedSim(fmt, D, H, bs, num_blocks=32, seed=1)
    r = sim.add_request()
    start = 0
    for n in splits:
        sl = slice(start, start + n)
        write_kv(sim.cache, k[sl], v[sl], torch.tensor(sim.slots(r, start, n)), fmt, bs)
        out = paged_attention(
            q[sl], sim.cache, fmt, bs, [0, n], [start + n], sim.block_table(),
            scale=0.125, sliding_window=window, soft_cap=soft_cap,
        )
        ref = _dense_ref(
            q[sl], k[: start + n], v[: start + n], fmt, torch.arange(start, start + n),
            torch.arange(start + n), scale=0.125, sliding_window=window, soft_cap=soft_cap,
        )
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        start += n


def test_mixed_batch_with_padding_slots():
    """Decode, chunked continuation and a fresh prefill in one batch; padded slots skipped."""
    fmt = parse_format("kvmix-k8v4-tok")
    D, H, rep, bs = 64, 2, 4, 32
    sim = PagedSim(fmt, D, H, bs, num_blocks=40, seed=2)
    ctx = [70, 33, 0]
    new = [1, 20, 45]
    data = [_case(10 + i, c + n, H, rep, D) for i, (c, n) in enumerate(zip(ctx, new))]
    for i, c in enumerate(ctx):
        r = sim.add_request()
        if c:
            _, k, v = data[i]
            write_kv(sim.cache, k[:c], v[:c], torch.tensor(sim.slots(r, 0, c)), fmt, bs)
    # one step: concatenate the new tokens of all requests, plus 3 padding tokens
    qs, ks, vs, slots = [], [], [], []
    for i, (c, n) in enumerate(zip(ctx, new)):
        q, k, v = data[i]
        qs.append(q[c:]); ks.append(k[c:]); vs.append(v[c:])
        slots += sim.slots(i, c, n)
    pad = 3
    key = torch.cat(ks + [torch.full((pad, H, D), float("nan"))])
    val = torch.cat(vs + [torch.full((pad, H, D), float("nan"))])
    write_kv(sim.cache, key, val, torch.tensor(slots + [-1] * pad), fmt, bs)
    qsl = [0, 1, 21, 66]
    seq = [c + n for c, n in zip(ctx, new)]
    out = paged_attention(torch.cat(qs), sim.cache, fmt, bs, qsl, seq, sim.block_table(), scale=0.1)
    for i, (c, n) in enumerate(zip(ctx, new)):
        q, k, v = data[i]
        ref = _dense_ref(q[c:], k, v, fmt, torch.arange(c, c + n), torch.arange(c + n), scale=0.1)
        torch.testing.assert_close(out[qsl[i] : qsl[i + 1]], ref, rtol=1e-5, atol=1e-5)
    assert torch.isfinite(out).all()


def test_read_pages_roundtrip_matches_quantizer():
    fmt = parse_format("kvmix-k2v8-tok-g32")
    D, H, bs = 64, 2, 16
    _, k, v = _case(5, 48, H, 1, D)
    sim = PagedSim(fmt, D, H, bs, num_blocks=8)
    r = sim.add_request()
    write_kv(sim.cache, k, v, torch.tensor(sim.slots(r, 0, 48)), fmt, bs)
    kd, vd = read_pages(sim.cache, torch.tensor(sim.tables[r]), fmt, D, bs)
    assert torch.equal(kd, _dequant(k, 2, 32)) and torch.equal(vd, _dequant(v, 8, 32))
    # pages of other requests untouched (still the 0xFF poison)
    untouched = [b for b in range(8) if b not in sim.tables[r]]
    assert (sim.cache[untouched] == 0xFF).all()
