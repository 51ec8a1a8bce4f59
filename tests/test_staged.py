"""The page scheme's reference step (pack on fill, 8-bit staging, own page at 8 bits).

Oracle: a dense re-statement of the scheme's semantics with no pages, bytes or
slots -- keys (groups of 16 channels) and rotated values (groups of 64) rounded to 8 bits per token; every full
64-token page re-quantized (keys per channel, values per token with clipped ranges below 8 bits); a query at
position p reads its own page at 8 bits and every earlier page re-quantized.
"""

import math

import pytest
import torch

from vllm_kvmix.formats import parse_format, stage_layout
from vllm_kvmix.quant import dequantize, quantize, quantize_values
from vllm_kvmix.reference.staged import RequestStep, step
from vllm_kvmix.staging import StagingSlots, StagingSlotsExhausted

P = 64


def _rt(x, bits, group=64):
    c, m = quantize(x, bits, group)
    return dequantize(c, m, group)


def _rt_values(x, bits, group=64):
    """Packed values: below 8 bits each group's range is clipped to its least-squared-error ratio."""
    c, m = quantize_values(x, bits, group)
    return dequantize(c, m, group)


def _hadamard(d):
    h = torch.tensor([[1.0]], dtype=torch.float64)
    base = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while h.shape[0] < d:
        h = torch.kron(h, base)
    return h / math.sqrt(d)


def _oracle(q, k, v, fmt, scale, sliding_window=None):
    """Every position of one sequence, queries at all positions: fp64, explicit loops over heads."""
    L, h, d = k.shape
    rot = _hadamard(d)
    k8 = _rt(k.float(), 8, 16)
    v8 = _rt((v.double() @ rot).float(), 8)
    kp, vp = k8.clone(), v8.clone()
    for p0 in range(0, L - L % P, P):
        page_k = k8[p0 : p0 + P].transpose(0, 2)  # [D, H, P]: channel-major, groups of P tokens
        kp[p0 : p0 + P] = _rt(page_k, fmt.k_bits, P).transpose(0, 2)
        vp[p0 : p0 + P] = _rt_values(v8[p0 : p0 + P], fmt.v_bits)
    pos = torch.arange(L)
    rep = q.shape[1] // h
    out = torch.empty(q.shape, dtype=torch.float64)
    for i in range(L):
        own = pos // P == i // P
        seen = pos <= i
        if sliding_window is not None:
            seen &= i - pos < sliding_window
        kk = torch.where(own[:, None, None], k8, kp).double()
        vv = torch.where(own[:, None, None], v8, vp).double()
        for hq in range(q.shape[1]):
            s = (kk[:, hq // rep] @ q[i, hq].double()) * scale
            w = torch.softmax(s.masked_fill(~seen, float("-inf")), 0)
            out[i, hq] = (w @ vv[:, hq // rep]) @ rot
    return out.float()


class Seqs:
    """Pages and staging slots for a few sequences, fed in steps of any split."""

    def __init__(self, fmt, h, d, n_pages=64, n_slots=4, seed=0):
        self.fmt, self.h, self.d = fmt, h, d
        lay = fmt.layout(d, P)
        self.cache = torch.full((n_pages, h, lay.head_page_bytes), 0xFF, dtype=torch.uint8)
        stage_page = stage_layout(d).head_page_bytes
        self.stage = torch.full((n_slots, h, stage_page), 0xFF, dtype=torch.uint8)
        self.free = torch.randperm(n_pages, generator=torch.Generator().manual_seed(seed)).tolist()
        self.tables: list[list[int]] = []
        self.done: list[int] = []

    def add(self) -> int:
        self.tables.append([])
        self.done.append(0)
        return len(self.tables) - 1

    def run(self, chunks, q, k, v, scale, **kw):
        """``chunks``: list of (request, n_new); q/k/v: per-request full tensors. Returns per-request rows."""
        rows = {}
        reqs, qs, ks, vs, t = [], [], [], [], 0
        for r, n in chunks:
            ctx = self.done[r]
            while len(self.tables[r]) * P < ctx + n:
                self.tables[r].append(self.free.pop())
            reqs.append(RequestStep(q0=t, q1=t + n, ctx=ctx, seq=ctx + n, slot=r))
            qs.append(q[r][ctx : ctx + n])
            ks.append(k[r][ctx : ctx + n])
            vs.append(v[r][ctx : ctx + n])
            rows[r] = (t, ctx, n)
            t += n
            self.done[r] += n
        width = max(len(self.tables[r]) for r, _ in chunks)
        table = torch.tensor([self.tables[r] + [0] * (width - len(self.tables[r])) for r, _ in chunks])
        out = step(torch.cat(qs), torch.cat(ks), torch.cat(vs), self.cache, self.stage, self.fmt, reqs, table, scale, **kw)
        return {r: (out[t0 : t0 + n], ctx) for r, (t0, ctx, n) in rows.items()}


def _case(seed, L, h=2, rep=2, d=64):
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(L, h, d, generator=g)
    k[:, :, 5] *= 10  # an outlier key channel
    k[:, :, 9] += 4
    v = torch.randn(L, h, d, generator=g)
    q = torch.randn(L, h * rep, d, generator=g)
    return q, k, v


def _run_split(fmt, q, k, v, split, scale=0.125, **kw):
    seqs = Seqs(fmt, k.shape[1], k.shape[2])
    r = seqs.add()
    out = torch.empty(q.shape)
    done = 0
    for n in split:
        (rows, ctx), = seqs.run([(r, n)], [q], [k], [v], scale, **kw).values()
        out[ctx : ctx + n] = rows
        done += n
    assert done == q.shape[0]
    return out


@pytest.mark.parametrize("name", ["kvmix-k4v2", "kvmix-k8v4", "kvmix-k2v4", "kvmix-k4v8"])
def test_one_step_matches_oracle(name):
    fmt = parse_format(name)
    q, k, v = _case(1, 150)
    got = _run_split(fmt, q, k, v, [150])
    torch.testing.assert_close(got, _oracle(q, k, v, fmt, 0.125), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("split", [[1] * 140, [37, 27, 1, 1, 64, 10], [64, 64, 12], [63, 2, 75]])
def test_any_split_gives_identical_outputs(split):
    """Token-by-token (decode), chunked prefill and one-shot prefill: bit-identical rows."""
    fmt = parse_format("kvmix-k4v2")
    q, k, v = _case(2, 140)
    one = _run_split(fmt, q, k, v, [140])
    got = _run_split(fmt, q, k, v, split)
    assert torch.equal(got, one)


def test_sliding_window_and_head_sizes():
    fmt = parse_format("kvmix-k4v2")
    for d, window in ((128, 50), (256, 70)):
        q, k, v = _case(3, 160, h=1, rep=3, d=d)
        got = _run_split(fmt, q, k, v, [100, 1, 59], sliding_window=window)
        torch.testing.assert_close(got, _oracle(q, k, v, fmt, 0.125, window), rtol=1e-4, atol=1e-4)


def test_batch_of_requests_matches_each_alone():
    """Mixed batch (prefill, continuation, decode) on shared page and slot pools."""
    fmt = parse_format("kvmix-k4v2")
    cases = [_case(10 + i, 200) for i in range(3)]
    q, k, v = ([c[j] for c in cases] for j in range(3))
    seqs = Seqs(fmt, 2, 64)
    out = [torch.empty(c[0].shape) for c in cases]
    ids = [seqs.add() for _ in cases]
    schedule = [[(0, 70), (1, 5)], [(0, 1), (1, 100), (2, 64)], [(0, 129), (1, 95), (2, 1)], [(2, 135)]]
    for chunks in schedule:
        for r, (rows, ctx) in seqs.run([(ids[r], n) for r, n in chunks], q, k, v, 0.125).items():
            out[r][ctx : ctx + rows.shape[0]] = rows
    for r in range(3):
        torch.testing.assert_close(out[r], _oracle(q[r], k[r], v[r], fmt, 0.125), rtol=1e-4, atol=1e-4)


def test_k4v2_beats_per_token_k4v2_on_outlier_keys():
    """What the scheme is for: keys with outlier channels lose far less than with per-token groups."""
    fmt = parse_format("kvmix-k4v2")
    q, k, v = _case(4, 192)

    def attend(kk, vv):
        out = torch.empty(q.shape)
        for i in range(192):
            for hq in range(4):
                s = (kk[: i + 1, hq // 2] @ q[i, hq]) * 0.125
                out[i, hq] = torch.softmax(s, 0) @ vv[: i + 1, hq // 2]
        return out

    exact = attend(k, v)
    page = _run_split(fmt, q, k, v, [192])
    tok = attend(_rt(k, 4), _rt(v, 2))
    err_page = ((page - exact).norm() / exact.norm()).item()
    err_tok = ((tok - exact).norm() / exact.norm()).item()
    assert err_page < 0.75 * err_tok, (err_page, err_tok)


def test_staging_slots():
    slots = StagingSlots()
    slots.configure(2)
    slots.on_step(["a", "b"], set())
    assert slots.slots_for_rows(2) == [0, 1]
    slots.on_step(["b", "c"], {"a"})  # a finished: its slot goes to c
    assert slots.slots_for_rows(2) == [1, 0]
    slots.on_step(["b", "c", "d"], set())
    with pytest.raises(StagingSlotsExhausted):
        slots.slots_for_rows(3)
    with pytest.raises(RuntimeError, match="announced"):
        slots.slots_for_rows(4)
    slots.on_step(["d"], {"b", "c", "zzz"})  # unknown ids are ignored
    assert slots.slots_for_rows(1) in ([0], [1])
    g = slots.generation
    slots.on_step([], set())
    assert slots.generation == g + 1
    slots.on_step(["d", "e"], set())  # an engine whose last finished requests are never reported...
    assert sorted(slots.slots_for_rows(2)) == [0, 1] and slots.in_use == 2
    slots.reset(2)  # ...is followed by a new one: every slot free, no rows announced
    assert slots.in_use == 0 and slots.rows == [] and slots.capacity == 2
    slots.on_step(["x", "y"], set())
    assert sorted(slots.slots_for_rows(2)) == [0, 1]
