"""Triton kernels vs the PyTorch reference.

On a CUDA machine they run natively (fp16/bf16, larger shapes).  On CPU they run
under TRITON_INTERPRET=1 on tiny shapes with fp32/fp16 inputs (the interpreter
mishandles bf16 tl.dot), which is how CI covers them.
"""

import os

import pytest
import torch

CUDA = torch.cuda.is_available()
# conftest.py turns the interpreter on (before triton is imported) when there is no GPU
assert CUDA or os.environ.get("TRITON_INTERPRET") == "1"
triton = pytest.importorskip("triton")

from vllm_kvmix import reference  # noqa: E402
from vllm_kvmix.formats import parse_format  # noqa: E402
from vllm_kvmix.kernels import attention as tri_attn  # noqa: E402
from vllm_kvmix.kernels import write as tri_write  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
DTYPES = [torch.float16, torch.bfloat16] if CUDA else [torch.float32, torch.float16]


def _batch(fmt, D, H, bs, ctx, new, seed, dtype, poison=True):
    """Requests with `ctx` cached tokens (written by the reference) and `new` tokens to write."""
    g = torch.Generator().manual_seed(seed)
    lay = fmt.layout(D, bs)
    tables, n_pages = [], 0
    for c, n in zip(ctx, new):
        tables.append(list(range(n_pages, n_pages + (c + n + bs - 1) // bs)))
        n_pages += len(tables[-1])
    perm = torch.randperm(n_pages + 3, generator=g)
    tables = [[int(perm[i]) for i in t] for t in tables]
    cache = torch.full((n_pages + 3, H, lay.head_page_bytes), 0xFF if poison else 0, dtype=torch.uint8)
    width = max(len(t) for t in tables)
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    kv, slots = [], []
    for b, (c, n) in enumerate(zip(ctx, new)):
        k = torch.randn(c + n, H, D, generator=g)
        k[:, :, 1] *= 10  # outlier channel
        v = torch.randn(c + n, H, D, generator=g)
        s = [tables[b][i // bs] * bs + i % bs for i in range(c + n)]
        kv.append((k.to(dtype), v.to(dtype)))
        slots.append(s)
        reference.write_kv(cache, k[:c].to(dtype), v[:c].to(dtype), torch.tensor(s[:c]), fmt, bs)
    return cache, bt, kv, slots


FORMATS = ["kvmix-k4v2-tok", "kvmix-k8v4-tok-g32", "kvmix-k2v8-tok-g128", "kvmix-k4v4-tok"]


@pytest.mark.parametrize("name", FORMATS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_write_matches_reference_bit_for_bit(name, dtype):
    fmt = parse_format(name)
    D, H, bs = 128, 2, 16
    cache, _, kv, slots = _batch(fmt, D, H, bs, [0, 0], [19, 7], 0, dtype)
    key = torch.cat([k for k, _ in kv])
    val = torch.cat([v for _, v in kv])
    key[3, 0, :64] = 2.5  # a constant group
    sl = torch.tensor(slots[0] + slots[1])
    sl[5] = -1  # padding slot
    ref = cache.clone()
    reference.write_kv(ref, key, val, sl, fmt, bs)
    out = cache.to(DEV)
    tri_write.write_kv(out, key.to(DEV), val.to(DEV), sl.to(DEV), fmt, bs)
    assert torch.equal(out.cpu(), ref)


CASES = [  # (context tokens, new tokens) per request: decode, prefill, chunked continuation
    ([77], [1]),
    ([0], [45]),
    ([20, 0, 33, 64], [1, 18, 5, 1]),
]


def test_attention_rejects_pages_it_cannot_run():
    fmt = parse_format("kvmix-k4v2-tok")
    q = torch.zeros(1, 2, 64, device=DEV)
    with pytest.raises(ValueError, match="multiple of 32"):
        tri_attn.paged_attention(q, torch.zeros(1, 2, 16 * 56, dtype=torch.uint8, device=DEV), fmt, 16,
                                 [0, 1], torch.ones(1, dtype=torch.int32, device=DEV),
                                 torch.zeros(1, 1, dtype=torch.int32, device=DEV), 0.1)


@pytest.mark.parametrize("name", ["kvmix-k4v2-tok", "kvmix-k8v4-tok-g32"])
@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("rep", [1, 4])
@pytest.mark.parametrize("extra", [{}, {"sliding_window": 9}, {"soft_cap": 5.0}], ids=["plain", "window", "softcap"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("splits", [None, 3], ids=["nosplit", "split3"])
def test_attention_matches_reference(name, case, rep, extra, dtype, splits):
    fmt = parse_format(name)
    D, H, bs = 64, 2, 32
    ctx, new = CASES[case]
    cache, bt, kv, slots = _batch(fmt, D, H, bs, ctx, new, 1 + case, dtype)
    for b, (c, n) in enumerate(zip(ctx, new)):  # the step's own tokens are written first
        k, v = kv[b]
        reference.write_kv(cache, k[c:], v[c:], torch.tensor(slots[b][c:]), fmt, bs)
    qsl = [0]
    for n in new:
        qsl.append(qsl[-1] + n)
    seq = [c + n for c, n in zip(ctx, new)]
    q = torch.randn(qsl[-1], H * rep, D, generator=torch.Generator().manual_seed(7)).to(dtype)
    ref = reference.paged_attention(q, cache, fmt, bs, qsl, seq, bt, D**-0.5, **extra)
    out = torch.full_like(q, float("nan"), device=DEV)  # poison: every row must be written
    tri_attn.paged_attention(
        q.to(DEV), cache.to(DEV), fmt, bs, qsl, torch.tensor(seq, dtype=torch.int32, device=DEV),
        bt.to(DEV), D**-0.5, out=out, num_splits=splits, **extra,
    )
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(out.float().cpu(), ref, rtol=tol, atol=tol)
