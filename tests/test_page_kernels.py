"""Page-scheme Triton kernels (stage, pack, attention, keep-partial) vs the reference step.

The same schedules as tests/test_staged.py run through ``kernels.page.page_step``
and through ``reference.staged.step`` on twin caches; outputs must agree and the
caches must hold the same pages.  Caches, staging slots and outputs start
poisoned (0xFF bytes / NaN), so an element a kernel forgets to write shows.

Tolerances: the kernel rotates values with an fp32 tensor-core-free dot whose
summation order differs from torch's, so an 8-bit code can land one level away
from the reference's on a rounding tie (rare); everything downstream is
otherwise the same arithmetic.  Outputs are compared to the fp64 dense oracle of
test_staged.py with a relative Frobenius error bound, and packed pages by
dequantized value.  On CPU this runs under TRITON_INTERPRET=1 (conftest.py).
"""

import os
import re
import shutil

import pytest
import torch

CUDA = torch.cuda.is_available()
assert CUDA or os.environ.get("TRITON_INTERPRET") == "1"
triton = pytest.importorskip("triton")

from test_staged import P, Seqs, _case, _oracle  # noqa: E402

from vllm_kvmix.formats import STAGE_KEY_GROUP, parse_format, stage_layout  # noqa: E402
from vllm_kvmix.options import DECODE_KERNEL_ENV  # noqa: E402
from vllm_kvmix.kernels.page import page_step  # noqa: E402
from vllm_kvmix.kernels.prefill import PrefillPlan, max_pages_for, plan_groups, reference_flash_attn  # noqa: E402
from vllm_kvmix.reference.staged import read_packed  # noqa: E402

DEV = "cuda" if CUDA else "cpu"


class KernelSeqs(Seqs):
    """Seqs whose steps run the Triton kernels on DEV."""

    def __init__(self, *a, num_splits=None, flash_attn=None, max_prefill_pages=1 << 30, **kw):
        super().__init__(*a, **kw)
        self.cache = self.cache.to(DEV)
        self.stage = self.stage.to(DEV)
        self.num_splits = num_splits
        self.fa = dict(flash_attn=flash_attn, max_prefill_pages=max_prefill_pages)

    def run(self, chunks, q, k, v, scale, dtype=torch.float32, sliding_window=None, soft_cap=None):
        rows, qs, ks, vs, qsl, seqs, slots, t = {}, [], [], [], [0], [], [], 0
        for r, n in chunks:
            ctx = self.done[r]
            while len(self.tables[r]) * P < ctx + n:
                self.tables[r].append(self.free.pop())
            qs.append(q[r][ctx : ctx + n])
            ks.append(k[r][ctx : ctx + n])
            vs.append(v[r][ctx : ctx + n])
            rows[r] = (t, ctx, n)
            t += n
            qsl.append(t)
            seqs.append(ctx + n)
            slots.append(r)
            self.done[r] += n
        width = max(len(self.tables[r]) for r, _ in chunks)
        table = torch.tensor([self.tables[r] + [0] * (width - len(self.tables[r])) for r, _ in chunks],
                             dtype=torch.int32, device=DEV)
        query = torch.cat(qs).to(DEV, dtype)
        out = torch.full_like(query, float("nan"))
        page_step(
            query, torch.cat(ks).to(DEV, dtype), torch.cat(vs).to(DEV, dtype), self.cache, self.stage, self.fmt,
            torch.tensor(qsl, dtype=torch.int32, device=DEV), torch.tensor(seqs, dtype=torch.int32, device=DEV),
            torch.tensor(slots, dtype=torch.int32, device=DEV), table, scale,
            max_query_len=max(n for _, n in chunks), sliding_window=sliding_window, soft_cap=soft_cap,
            out=out, num_splits=self.num_splits, query_start_loc_cpu=qsl, seq_lens_cpu=seqs, **self.fa,
        )
        out = out.float().cpu()
        return {r: (out[t0 : t0 + n], ctx) for r, (t0, ctx, n) in rows.items()}


def _run(seqs, q, k, v, split, **kw):
    r = seqs.add()
    out = torch.full(q.shape, float("nan"))
    for n in split:
        (rows, ctx), = seqs.run([(r, n)], [q], [k], [v], 0.125, **kw).values()
        out[ctx : ctx + n] = rows
    return out


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _same_pages(ref: Seqs, ker: KernelSeqs, fmt, d, n_full_pages):
    """Every page a sequence filled holds the same values in both caches (dequantized)."""
    _same_blocks(ref, ker, fmt, d, torch.tensor([b for t in ref.tables for b in t[:n_full_pages]]))


def _same_blocks(ref: Seqs, ker: KernelSeqs, fmt, d, ids):
    """Cache blocks ``ids`` hold the same values in both caches (dequantized), the value bytes all but equal."""
    kr, vr = read_packed(ref.cache, ids, fmt, d)
    kk, vk = read_packed(ker.cache.cpu(), ids, fmt, d)
    assert torch.isfinite(kk).all() and torch.isfinite(vk).all()
    assert _rel(kk, kr) < 1e-3 and _rel(vk, vr) < 1e-3
    # the value side byte for byte: the kernel's clip search (values below 8 bits) picks the reference's ranges
    v = fmt.layout(d, P).v
    got, want = ker.cache.cpu()[ids, :, v.codes_offset : v.end], ref.cache[ids, :, v.codes_offset : v.end]
    assert (got == want).float().mean() > 0.999, (got != want).nonzero()[:5]


@pytest.mark.parametrize("name", ["kvmix-k4v2", "kvmix-k8v4", "kvmix-k2v4"])
@pytest.mark.parametrize("split", [[150], [37, 27, 1, 1, 64, 20], [1] * 70 + [80]])
def test_page_step_matches_reference(name, split):
    fmt = parse_format(name)
    q, k, v = _case(1, 150)
    ref, ker = Seqs(fmt, 2, 64), KernelSeqs(fmt, 2, 64)
    want = _run(ref, q, k, v, split)
    got = _run(ker, q, k, v, split)
    assert torch.isfinite(got).all()
    assert _rel(got, want) < 2e-3
    assert _rel(got, _oracle(q, k, v, fmt, 0.125)) < 2e-3
    _same_pages(ref, ker, fmt, 64, 150 // P)


@pytest.mark.parametrize("name, d", [("kvmix-k8v8", 128), ("kvmix-k2v2", 128), ("kvmix-k4v4", 256),
                                     ("kvmix-k8v2", 256)])
def test_pack_kernel_matches_the_reference_per_format(name, d):
    """Every key and value width through the pack kernel's parts at head sizes with several 64-channel groups
    (8-bit values take the plain quantizer, narrower ones the clip search): a prompt that fills two pages."""
    fmt = parse_format(name)
    q, k, v = _case(7, 140, h=1, rep=2, d=d)
    ref, ker = Seqs(fmt, 1, d), KernelSeqs(fmt, 1, d)
    _run(ref, q, k, v, [140])
    _run(ker, q, k, v, [140])
    _same_pages(ref, ker, fmt, d, 140 // P)


def test_decode_step_packs_the_pages_that_fill():
    """A decode step of 40 rows (3 blocks of the pack kernel's PACK_DECODE_ROWS requests, the last partial)
    where 5 rows' new token is the last of their page -- two in one block, one in the partial block: exactly
    those pages are packed, as the reference packs them, and no other page of the cache is written."""
    from vllm_kvmix.kernels.page import PACK_DECODE_ROWS

    fmt, n, fill = parse_format("kvmix-k4v2"), 40, {0, 5, 17, 18, 39}
    assert n > 2 * PACK_DECODE_ROWS and n % PACK_DECODE_ROWS
    cases = [_case(40 + i, 64, h=2, rep=2, d=64) for i in range(n)]
    q, k, v = ([c[i] for c in cases] for i in range(3))
    ref, ker = Seqs(fmt, 2, 64, n_pages=2 * n, n_slots=n), KernelSeqs(fmt, 2, 64, n_pages=2 * n, n_slots=n)
    prompt = [(r, 63 if r in fill else 30) for r in range(n)]
    for seqs in (ref, ker):
        assert [seqs.add() for _ in range(n)] == list(range(n))
        seqs.run(prompt, q, k, v, 0.125)
        seqs.run([(r, 1) for r in range(n)], q, k, v, 0.125)
    ids = torch.tensor([ref.tables[r][0] for r in sorted(fill)])
    _same_blocks(ref, ker, fmt, 64, ids)
    rest = torch.ones(ker.cache.shape[0], dtype=torch.bool)
    rest[ids] = False
    assert (ker.cache.cpu()[rest] == 0xFF).all()


MIXED_SCHEDULE = [[(0, 70), (1, 5)], [(0, 1), (1, 100), (2, 64)], [(0, 129), (1, 95), (2, 1)], [(2, 135)]]


def _mixed_schedule(seqs, q, k, v, dtype):
    """Three sequences through MIXED_SCHEDULE (prefill, continuation and decode rows in one batch)."""
    out = [torch.full(x.shape, float("nan")) for x in q]
    ids = [seqs.add() for _ in q]
    for chunks in MIXED_SCHEDULE:
        for r, (rows, ctx) in seqs.run([(ids[r], n) for r, n in chunks], q, k, v, 0.125, dtype=dtype).items():
            out[r][ctx : ctx + rows.shape[0]] = rows
    return out


def test_mixed_batch_split_k_and_fp16():
    """Prefill, continuation and decode rows in one launch; split-K partials merged and rotated back."""
    fmt = parse_format("kvmix-k4v2")
    cases = [_case(10 + i, 200) for i in range(3)]
    q, k, v = ([c[j] for c in cases] for j in range(3))
    runs = [(torch.float32, 3), (torch.float16, None)] + ([(torch.bfloat16, 2)] if CUDA else [])
    for dtype, splits in runs:
        seqs = KernelSeqs(fmt, 2, 64, num_splits=splits)
        out = _mixed_schedule(seqs, q, k, v, dtype)
        # The oracle sees the same inputs rounded to `dtype`: rounding q/k/v alone moves its output
        # by 1.2% (fp16) / 4-6% (bf16) on this data (8-bit codes flip).  What is left is the
        # kernel's own rounding of K, V and P to `dtype` inside its dots.
        tol = {torch.float32: 2e-3, torch.float16: 4e-3, torch.bfloat16: 6e-3}[dtype]
        for r in range(3):
            want = _oracle(*(x[r].to(dtype).float() for x in (q, k, v)), fmt, 0.125)
            assert _rel(out[r], want) < tol, (dtype, r)


class CountingFlashAttn:
    """A ``flash_attn`` for ``kernels.prefill`` that records the query rows it was given keys for."""

    def __init__(self, impl):
        self.impl, self.rows = impl, 0
        self.dtypes = getattr(impl, "dtypes", (torch.float16, torch.bfloat16))

    def __call__(self, q, k, v, out, cu, max_q, used, max_k, *rest):
        c, u = cu.tolist(), used.tolist()
        self.rows += sum(c[e + 1] - c[e] for e in range(len(u)) if u[e] > 0)
        self.impl(q, k, v, out, cu, max_q, used, max_k, *rest)


def _flash_attn(kind):
    if kind == "torch":
        return reference_flash_attn
    if not CUDA:
        pytest.skip("vLLM's FlashAttention needs a GPU")
    pytest.importorskip("vllm.vllm_flash_attn")
    from vllm_kvmix.vllm.flash_prefill import flash_attn_prefill

    fa = flash_attn_prefill()
    assert fa is not None, "vLLM's FlashAttention is not available on this GPU"
    return fa


def test_prefill_plan_entries():
    """One request, 37 tokens cached, 100 new: three entries (pages 0, 1, 2), each query sees keys <= itself."""
    plan = PrefillPlan([0, 2, 102, 103], [50, 137, 9], [1], 103, torch.device("cpu"))
    assert plan.cu_seqlens_q.tolist() == [0, 2, 29, 93, 102, 103]  # rows 0-1 and 102: another kernel's
    assert plan.seqused_k.tolist() == [0, 64, 128, 137, 0]
    pages = plan.pages.tolist()  # (request, page, staged, destination, valid tokens)
    assert pages == [[1, 0, 0, 0, 64], [1, 1, 0, 1, 64], [1, 0, 1, 2, 64], [1, 1, 1, 3, 64], [1, 2, 1, 4, 9]]
    bt = plan.block_table.tolist()
    assert bt[1][:1] == [2] and bt[2][:2] == [0, 3] and bt[3][:3] == [0, 1, 4]
    assert plan.row_ranges == [(2, 102)]
    # groups of at most max_pages dequantized pages; a request that alone needs more goes elsewhere
    qsl, seq = [0, 50, 150, 160, 220], [50, 137, 10, 160]  # pages needed: 1, 5, 1, 4
    groups, rest = plan_groups(qsl, seq, [0, 1, 2, 3], 220, torch.device("cpu"), max_pages=4)
    assert [g.reqs for g in groups] == [[0, 2], [3]] and rest == [1]
    groups, rest = plan_groups(qsl, seq, [0, 1, 2, 3], 220, torch.device("cpu"), max_pages=6)
    assert [g.reqs for g in groups] == [[0, 1], [2, 3]] and rest == []
    assert max_pages_for(8192 + 256, 16384) == 132 + 256 + 1


@pytest.mark.parametrize("strided", [False, True])
def test_prefill_output_rotation(strided, monkeypatch):
    """``prefill.attend`` rotates FlashAttention's output back (times the +-1 matrix, in runs of ``ROT_ROWS``
    tokens, into a strided ``out`` too): attention over the pages' values rotated back, and no other row of
    ``out`` written."""
    from vllm_kvmix.kernels import prefill
    from vllm_kvmix.quant import hadamard

    monkeypatch.setattr(prefill, "ROT_ROWS", 7)
    g = torch.Generator().manual_seed(5)
    d, h, rep = 64, 2, 3
    plan = PrefillPlan([0, 5, 155], [40, 160], [1], 155, torch.device("cpu"))  # request 0's rows: not here
    k = torch.randn(plan.num_pages, 64, h, d, generator=g)
    v = torch.randn(plan.num_pages, 64, h, d, generator=g)  # as dequantize_pages leaves them: rotated / sqrt(d)
    q = torch.randn(155, h * rep, d, generator=g)
    want = torch.full_like(q, float("nan"))
    signs = torch.sign(hadamard(d, torch.float32, "cpu"))
    reference_flash_attn(q, k, v @ signs, want, plan.cu_seqlens_q, plan.max_seqlen_q, plan.seqused_k,
                         plan.max_seqlen_k, plan.block_table, 0.125)
    big = torch.full((155, h * rep, d + 8), float("nan"))
    out = big[..., :d] if strided else big[..., :d].contiguous()
    assert out.is_contiguous() != strided
    prefill.attend(plan, q, out, k, v, 0.125, reference_flash_attn)
    assert torch.isnan(out[:5]).all()
    torch.testing.assert_close(out[5:], want[5:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fa", ["torch", "vllm"])
@pytest.mark.parametrize("max_pages", [1 << 30, 5, 3])
def test_prefill_on_flash_attn(fa, max_pages):
    """Prefill rows through dequantized pages + a FlashAttention kernel, decode rows on the decode kernels,
    requests past the page bound on the Triton kernel -- one batch; same answers as the oracle."""
    flash = _flash_attn(fa)
    fmt = parse_format("kvmix-k4v2")
    cases = [_case(20 + i, 200) for i in range(3)]
    q, k, v = ([c[j] for c in cases] for j in range(3))
    dtypes = [torch.float32, torch.float16] if fa == "torch" else [torch.float16, torch.bfloat16]
    for dtype in dtypes:
        counted = CountingFlashAttn(flash)
        seqs = KernelSeqs(fmt, 2, 64, flash_attn=counted, max_prefill_pages=max_pages)
        out = _mixed_schedule(seqs, q, k, v, dtype)
        # rows with more than one new token went to flash_attn unless past the page bound
        want_rows = 70 + 5 + 100 + 64 + 129 + 95 + 135 if max_pages > 100 else 70 + 5 + 100 + 64
        assert counted.rows == want_rows
        tol = {torch.float32: 2e-3, torch.float16: 4e-3, torch.bfloat16: 8e-3}[dtype]
        for r in range(3):
            assert torch.isfinite(out[r]).all()
            want = _oracle(*(x[r].to(dtype).float() for x in (q, k, v)), fmt, 0.125)
            assert _rel(out[r], want) < tol, (dtype, r)


@pytest.mark.parametrize("fa", ["torch", "vllm"])
def test_prefill_on_flash_attn_window_and_head_size(fa):
    flash = _flash_attn(fa)
    fmt = parse_format("kvmix-k4v2")
    q, k, v = _case(3, 160, h=1, rep=3, d=256)
    dtype = torch.float32 if fa == "torch" else torch.float16
    counted = CountingFlashAttn(flash)
    got = _run(KernelSeqs(fmt, 1, 256, flash_attn=counted), q, k, v, [100, 1, 59], sliding_window=70, dtype=dtype)
    assert counted.rows == 159
    want = _oracle(*(x.to(dtype).float() for x in (q, k, v)), fmt, 0.125, 70)
    assert _rel(got, want) < (2e-3 if fa == "torch" else 4e-3)


def test_split_count_divides_the_pages_a_window_spans(monkeypatch):
    """Split-K counts divide the pages a row reads: with a sliding window those its keys span, not the context's
    (the kernels split from the window's first page), at least 2 a split against a full context's 4.
    ``pages_read`` against a brute-force count over every start in a page; then the count planned for
    Gemma-3-4B's shape (4 KV heads, one sequence, vLLM's decode graph planned for `tpot`'s 8192 + 256 + 16
    tokens, 132 SMs): 33 splits of the whole context, 8 of a 1024-token window (33 of a page or none before it
    counted the window, 4 at a floor of 4 pages); and every plan passes the window and its floor on."""
    from vllm_kvmix.kernels import page, splitk

    for window in (1, 10, 63, 64, 65, 66, 70, 1024):
        for bq in (1, 4, 16):
            spans = [(x + bq - 1) // P - max(0, x - window + 1) // P + 1 for x in range(window + 2 * P)]
            assert splitk.pages_read(1 << 20, window, bq) == max(spans), (window, bq)
            assert splitk.pages_read(100, window, bq) == min(max(spans), 2)
    assert splitk.pages_read(8464) == 133 and splitk.pages_read(8464, None, 64) == 133
    assert splitk.split_count(4, splitk.pages_read(8464), 132) == 33
    assert splitk.split_count(4, splitk.pages_read(8464, 1024), 132, splitk.split_min_pages(1024)) == 8
    assert splitk.split_count(4, splitk.pages_read(8464, 1024), 132) == 4
    assert splitk.split_count(528, splitk.pages_read(8464), 132) == 1  # a full wave: no split
    # a wave of 2 programs an SM at head size 256, 4 below: 8 KV heads at 1 x 128k, 32 programs at 4 x 32k
    assert [splitk.programs_per_sm(d) for d in (64, 128, 256)] == [4, 4, 2]
    assert splitk.split_count(8, splitk.pages_read(131072), 132, 4, splitk.programs_per_sm(256)) == 33
    assert splitk.split_count(8, splitk.pages_read(131072), 132, 4, splitk.programs_per_sm(128)) == 64
    assert splitk.split_count(32, splitk.pages_read(32768), 132, 4, splitk.programs_per_sm(256)) == 8

    seen = []
    monkeypatch.setattr(splitk, "num_splits_for",
                        lambda programs, pages, device, floor, per_sm: seen.append((pages, floor, per_sm)) or 1)
    qsl = torch.arange(3, dtype=torch.int32, device=DEV)
    seq = torch.tensor([9000, 40], dtype=torch.int32, device=DEV)
    page.StepPlan.decode(page.DecodeBuffers(4, 3, DEV), qsl, seq, 2, 8464, 8, 4, window=1024, head_size=256)
    page.StepPlan(qsl, seq, 2, 1, [0, 1, 2], 8464, 8, 4, window=1024, head_size=256)
    page.StepPlan(qsl, seq, 2, 1, [0, 1, 2], 8464, 8, 4, head_size=128)
    assert seen == [(17, 2, 2), (17, 2, 2), (133, 4, 4)]
    # a prompt step: the plan of every row, then its one-token rows' (the prefill split's decode_attn)
    seen.clear()
    qsl5 = torch.tensor([0, 1, 5], dtype=torch.int32, device=DEV)
    plan = page.StepPlan(qsl5, seq, 5, 4, [0, 1, 5], 8464, 8, 4, seq_lens_cpu=[9000, 40],
                         flash_attn=reference_flash_attn, head_size=256)
    assert plan.decode_attn is not None and [x[2] for x in seen] == [2, 2]


@pytest.mark.parametrize("d, window", [(128, 50), (256, 70)])
def test_sliding_window_and_head_sizes(d, window):
    fmt = parse_format("kvmix-k4v2")
    q, k, v = _case(3, 160, h=1, rep=3, d=d)
    ref, ker = Seqs(fmt, 1, d), KernelSeqs(fmt, 1, d)
    got = _run(ker, q, k, v, [100, 1, 59], sliding_window=window)
    assert _rel(got, _oracle(q, k, v, fmt, 0.125, window)) < 2e-3
    _run(ref, q, k, v, [100, 1, 59], sliding_window=window)
    _same_pages(ref, ker, fmt, d, 160 // P)  # the pack kernel goes 64 channels at a time past d = 64


def _decode_inputs(seqs: KernelSeqs, reqs, q, k, v, n_pad, dtype):
    """One decode step of ``reqs`` (one token each) as a batch padded to ``n_pad`` rows the way vLLM pads a
    CUDA-graph batch: padded rows have no tokens (query_start_loc repeats the total), seq_len 0 and garbage
    query / key / value rows; their block-table rows point at a live page (a stray write would show)."""
    n = len(reqs)
    qsl = list(range(n + 1)) + [n] * (n_pad - n)
    seq_lens, rows = [], []
    for r in reqs:
        ctx = seqs.done[r]
        while len(seqs.tables[r]) * P < ctx + 1:
            seqs.tables[r].append(seqs.free.pop())
        seq_lens.append(ctx + 1)
        rows.append(ctx)
        seqs.done[r] += 1
    width = 4
    live = seqs.tables[reqs[0]][0]
    table = [seqs.tables[r] + [0] * (width - len(seqs.tables[r])) for r in reqs] + [[live] * width] * (n_pad - n)
    g = torch.Generator().manual_seed(len(seq_lens) + sum(seq_lens))

    def rows_of(x, h):
        real = torch.stack([x[r][c] for r, c in zip(reqs, rows)])
        return torch.cat([real, 1e3 * torch.randn(n_pad - n, h, x[0].shape[2], generator=g)]).to(DEV, dtype)

    as_dev = dict(dtype=torch.int32, device=DEV)
    return (rows_of(q, q[0].shape[1]), rows_of(k, k[0].shape[1]), rows_of(v, v[0].shape[1]),
            torch.tensor(qsl, **as_dev), torch.tensor(seq_lens + [0] * (n_pad - n), **as_dev),
            torch.tensor(table, **as_dev), rows)


@pytest.mark.parametrize("graph, dtype, d", [(False, torch.float32, 64)]
                         + ([(True, torch.float32, 64), (True, torch.float16, 128), (False, torch.bfloat16, 128)]
                            if CUDA else []))
def test_decode_plan_with_padded_rows(graph, dtype, d):
    """Decode steps through ``StepPlan.decode`` (what a CUDA-graph batch runs): rows padded past the real
    requests change nothing; with ``graph``, the step is captured once on dummy rows (as vLLM captures)
    and replayed on real ones, crossing page boundaries (packing) between replays.  fp16 / bf16 at head
    size 128 run each step as one CUDA launch (csrc/page_decode.cu: stage, attend, merge splits) + the
    pack kernel; the reference sees the same rounded inputs, and the kernel rounds q, K, V and P to fp16
    inside its dots (bf16: and the output to bf16, 2^-9 relative)."""
    from vllm_kvmix.kernels.page import DecodeBuffers, StepPlan

    fmt = parse_format("kvmix-k4v2")
    cases = [_case(30 + i, 150, d=d) for i in range(2)]
    q, k, v = ([c[j].to(dtype).float() for c in cases] for j in range(3))  # both sides see `dtype` inputs
    n_pad, hq, h, dummy = 4, 4, 2, 2
    ref, ker = Seqs(fmt, h, d, n_slots=3), KernelSeqs(fmt, h, d, n_slots=3)
    for s in (ref, ker):
        s.add(), s.add()
    ref.run([(0, 60), (1, 3)], q, k, v, 0.125)  # prefill (the general plan)
    ker.run([(0, 60), (1, 3)], q, k, v, 0.125)
    bufs = DecodeBuffers(n_pad, dummy, DEV)
    tol = {torch.float32: 2e-3, torch.float16: 4e-3, torch.bfloat16: 6e-3}[dtype]
    static = None
    if graph:  # capture on dummy rows: one token each, seq_len 1, the dummy slot, block 0
        blank = KernelSeqs(fmt, h, d)
        blank.add()
        qd, kd, vd, _, _, table, _ = _decode_inputs(blank, [0], [x[:1] for x in q], [x[:1] for x in k],
                                                   [x[:1] for x in v], n_pad, dtype)
        static = dict(q=qd, k=kd, v=vd, qsl=torch.arange(n_pad + 1, dtype=torch.int32, device=DEV),
                      seq=torch.ones(n_pad, dtype=torch.int32, device=DEV), table=torch.zeros_like(table),
                      out=torch.empty_like(qd))

        # as vLLM does: metadata (plan, slots) built outside the capture, kernels captured
        plan = StepPlan.decode(bufs, static["qsl"], static["seq"], n_pad, 4096, hq, h, head_size=d)
        slots = bufs.set_slots([dummy] * n_pad)

        def launch():
            page_step(static["q"], static["k"], static["v"], ker.cache, ker.stage, fmt, static["qsl"], static["seq"],
                      slots, static["table"], 0.125, 1, out=static["out"], plan=plan)

        launch()  # warm-up: compiles, allocates the decode scratch page
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            launch()
    for step in range(90):  # request 1 crosses pages 64 and 128 (packs), request 0 crosses 64 early on
        reqs = [0, 1] if step % 3 else [1]
        want = ref.run([(r, 1) for r in reqs], q, k, v, 0.125)
        qd, kd, vd, qsl, seq, table, _ = _decode_inputs(ker, reqs, q, k, v, n_pad, dtype)
        slots = reqs + [dummy] * (n_pad - len(reqs))
        if graph:
            for name, x in dict(q=qd, k=kd, v=vd, qsl=qsl, seq=seq, table=table).items():
                static[name].copy_(x)
            bufs.set_slots(slots)
            static["out"].fill_(float("nan"))
            g.replay()
            out = static["out"]
        else:
            out = torch.full_like(qd, float("nan"))
            plan = StepPlan.decode(bufs, qsl, seq, n_pad, 4096, hq, h, head_size=d)
            page_step(qd, kd, vd, ker.cache, ker.stage, fmt, qsl, seq, bufs.set_slots(slots), table, 0.125, 1,
                      out=out, plan=plan)
        out = out.float().cpu()
        for i, r in enumerate(reqs):
            assert _rel(out[i : i + 1], want[r][0]) < tol, (step, r)
    _same_pages(ref, ker, fmt, d, 1)


def test_cuda_decode_entry_point_exists():
    """The CUDA decode kernel is compiled through torch's private NVRTC wrapper (torch 2.11); fail loudly if it
    moves (vllm_kvmix.kernels.cuda_decode.compile_cuda is the one caller)."""
    import inspect

    from vllm_kvmix.kernels import cuda_decode

    params = inspect.signature(torch.cuda._compile_kernel).parameters
    assert list(params)[:2] == ["kernel_source", "kernel_name"] and "nvcc_options" in params
    assert cuda_decode.source_path().read_text().count("kvmix_page_decode(") == 1


# defines of a source experiment under trial (e.g. an applied benchmarks/kernels/experiments/*.patch), comma
# separated: the NVRTC, nvcc and GPU oracle tests below also build every format built with them
_TRIAL_DEFINES = tuple(d for d in os.environ.get("KVMIX_TEST_DEFINES", "").split(",") if d)


@pytest.mark.skipif(torch.version.cuda is None, reason="this torch has no NVRTC (a CPU build)")
@pytest.mark.parametrize("defines", [(), *([_TRIAL_DEFINES] if _TRIAL_DEFINES else [])])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_cuda_decode_compiles_with_nvrtc(defines, d):
    """The runtime compile path on a CPU: torch's NVRTC step (``cuda_decode.nvrtc_cubin``: the one
    ``torch.cuda._compile_kernel`` runs before loading the module; libnvrtc ships in torch's CUDA wheels and
    needs no GPU) builds every instantiation the launcher names for sm_90 with the launcher's options, for
    each head size it covers (both S layouts: S^T for 4-bit keys, S for 8-bit), as served
    and with a trial's defines when ``KVMIX_TEST_DEFINES`` is set.  nvcc accepting the source does not prove
    NVRTC does (another front end, no host compiler)."""
    from torch.cuda import _utils

    from vllm_kvmix.kernels import cuda_decode

    try:
        _utils._get_gpu_rtc_library()
    except OSError as e:  # a CPU-only torch wheel: no libnvrtc
        pytest.skip(f"no NVRTC library: {e}")
    assert d in cuda_decode.HEAD_SIZES
    src = cuda_decode.source_path().read_text()
    for k_bits, v_bits in ((4, 2), (4, 4), (8, 4)):
        for bf16 in ((True, False) if not defines else (True,)):
            cubin, mangled = cuda_decode.nvrtc_cubin(src, k_bits, v_bits, bf16, defines, head_size=d)
            assert len(cubin) > 10_000 and mangled.startswith("_Z17kvmix_page_decodeI"), (k_bits, v_bits, bf16)
            assert mangled.endswith(f"ELi{d}ELb0EEv12DecodeParams"), mangled
    for k_bits, v_bits in ((4, 2), (8, 4)):  # sliding-window layers, both S layouts
        cubin, mangled = cuda_decode.nvrtc_cubin(src, k_bits, v_bits, True, defines, head_size=d, window=True)
        assert len(cubin) > 10_000 and mangled.endswith(f"ELi{d}ELb1EEv12DecodeParams"), mangled


def _decode_pages(fmt, seq_lens, h, d, gen):
    """A cache of packed pages (reference packer, outlier channels) and one staged page per request."""
    from vllm_kvmix.quant import quantize
    from vllm_kvmix.reference.paged import store_tokens
    from vllm_kvmix.reference.staged import pack_pages

    n_pages = sum((s + P - 1) // P for s in seq_lens) + 1
    lay, slay = fmt.layout(d, P), stage_layout(d)
    cache = torch.full((n_pages, h, lay.head_page_bytes), 0xFF, dtype=torch.uint8)
    stage = torch.full((len(seq_lens), h, slay.head_page_bytes), 0xFF, dtype=torch.uint8)
    free = torch.randperm(n_pages, generator=gen).tolist()
    tables = []
    for i, s in enumerate(seq_lens):
        tables.append([free.pop() for _ in range((s + P - 1) // P)])
        own = (s - 1) // P
        k = torch.randn(s, h, d, generator=gen) * (1 + 4 * torch.rand(1, h, d, generator=gen))
        k[:, :, 3] += 30.0  # an outlier key channel
        v = torch.randn(s, h, d, generator=gen)
        v[: s // 3] *= 8.0  # some large-valued tokens
        if own:
            pack_pages(cache, torch.tensor(tables[i][:own]), k[: own * P].view(own, P, h, d),
                       v[: own * P].view(own, P, h, d), fmt)
        n = s - own * P
        for side, x in ((slay.k, k[own * P :]), (slay.v, v[own * P :])):
            codes, meta = quantize(x, side.bits, side.group)
            store_tokens(stage, side, codes, meta, i * P + torch.arange(n))
    width = max(len(t) for t in tables)
    table = torch.tensor([t + [t[0]] * (width - len(t)) for t in tables], dtype=torch.int32)
    return cache, stage, table


def _decode_oracle(q, cache, stage, table, seq_lens, fmt, d, scale, window=None):
    """fp64 attention of each request's query over its pages as the reference reads them, rotated back
    (``window``: over its last ``window`` tokens)."""
    from vllm_kvmix.quant import hadamard
    from vllm_kvmix.reference.paged import read_pages

    rot = hadamard(d, torch.float64, "cpu")
    out = torch.zeros(q.shape, dtype=torch.float64)
    h = cache.shape[1]
    for i, s in enumerate(seq_lens):
        own = (s - 1) // P
        ks, vs = [], []
        if own:
            kp, vp = read_packed(cache, table[i, :own], fmt, d)
            ks.append(kp), vs.append(vp)
        kst, vst = read_pages(stage, torch.tensor([i]), stage_layout(d))
        ks.append(kst[: s - own * P]), vs.append(vst[: s - own * P])
        k, v = torch.cat(ks).double(), torch.cat(vs).double()
        if window is not None:
            k, v = k[-window:], v[-window:]
        qi = q[i].double().view(h, -1, d)  # [H, rep, D]
        w = torch.softmax(torch.einsum("hrd,thd->hrt", qi, k) * scale, dim=-1)
        out[i] = (torch.einsum("hrt,thd->hrd", w, v) @ rot).reshape(-1, d)
    return out


# (head size, GQA group) of the oracle tests: head size 64 at a group of 7 (Qwen2.5-0.5B), 128 at 4 (Llama-3.1-8B),
# 256 at 2 (Gemma-3-4B)
_DECODE_SHAPES = {64: 7, 128: 4, 256: 2}


@pytest.mark.cuda
@pytest.mark.parametrize("name, defines, d, window, rep", [
    *[(f, (), d, None, None) for d in (64, 128, 256) for f in ("kvmix-k4v2", "kvmix-k4v4", "kvmix-k8v4")],
    # sliding windows: starting inside a packed page (70) or inside the staged own page (10), both S layouts
    *[(f, (), d, w, None) for f, d in (("kvmix-k4v2", 256), ("kvmix-k8v4", 128), ("kvmix-k4v4", 64)) for w in (10, 70)],
    # GQA groups over 8 query heads: blocks of 8 (12 = 8 + 4, 16 = 8 + 8), both S layouts
    ("kvmix-k4v2", (), 128, None, 12), ("kvmix-k8v4", (), 64, None, 16), ("kvmix-k4v2", (), 256, 70, 12),
    ("kvmix-k4v2", ("KVMIX_MIN_BLOCKS=3",), 128, None, None),
    *[(f, _TRIAL_DEFINES, 128, None, None) for f in ("kvmix-k4v2", "kvmix-k4v4", "kvmix-k8v4") if _TRIAL_DEFINES]])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_decode_matches_oracle_and_triton(name, defines, d, window, rep, dtype, monkeypatch):
    """Decode steps through the CUDA packed-page kernel (csrc/page_decode.cu) + the Triton own-page split,
    against the fp64 oracle and against the Triton-only path on the same caches, for each head size the kernel
    covers (its GQA group from ``_DECODE_SHAPES`` unless ``rep`` is given: groups over 8 run in blocks of 8) and
    with sliding windows; rows padded past the real requests (qsl repeats, seq_len 0), 1-3000 token contexts, automatic and forced split-K; also
    built with ``KVMIX_MIN_BLOCKS=3`` (another register allocation, no spills) and with a trial's defines
    (``KVMIX_TEST_DEFINES``, e.g. after applying a patch of benchmarks/kernels/experiments).  As served, k4v2 / k4v4 run the S-transposed page loop, k8v4 the S = Q K^T one.

    Tolerance: both paths round q (to ``dtype`` and then fp16), K, V and P to fp16 inside their dots;
    the CUDA kernel also rounds q * key scale to fp16 (the scale is folded into the query), which is
    the same relative error (2^-11) on the other operand.  Measured on H100: see the assertions."""
    from vllm_kvmix.kernels import cuda_decode
    from vllm_kvmix.kernels.page import PageStep, StepPlan

    served = cuda_decode.compiled
    monkeypatch.setattr(cuda_decode, "compiled", lambda k_bits, v_bits, bf16, head_size, window:
                        served(k_bits, v_bits, bf16, defines, head_size, window))
    fmt = parse_format(name)
    h, rep, scale = 2, rep or _DECODE_SHAPES[d], 0.09
    seq_lens = [1, 64, 65, 700, 3000, 129]
    n, n_pad = len(seq_lens), len(seq_lens) + 2
    gen = torch.Generator().manual_seed(7)
    cache, stage, table = _decode_pages(fmt, seq_lens, h, d, gen)
    q = torch.randn(n_pad, h * rep, d, generator=gen).to(dtype)
    q[:, :, 3] *= 4.0
    want = _decode_oracle(q[:n].float(), cache, stage, table, seq_lens, fmt, d, scale, window)
    cache, stage = cache.to(DEV), stage.to(DEV)
    table = torch.cat([table, table[:1].expand(n_pad - n, -1)]).to(DEV)
    qsl = torch.tensor(list(range(n + 1)) + [n] * (n_pad - n), dtype=torch.int32, device=DEV)
    seq = torch.tensor(seq_lens + [0] * (n_pad - n), dtype=torch.int32, device=DEV)
    slots = torch.arange(n_pad, dtype=torch.int32, device=DEV).clamp(max=n - 1)
    query = q.to(DEV)
    outs = {}
    for path, splits in (("cuda", None), ("cuda", 5), ("triton", None)):
        monkeypatch.setenv(DECODE_KERNEL_ENV, path)
        plan = StepPlan(qsl, seq, n_pad, 1, qsl.tolist(), max(seq_lens), h * rep, h, num_splits=splits,
                        head_size=d)
        step = PageStep(query[:, :h], cache, stage, fmt, slots, table, plan)
        out = torch.full_like(query, float("nan"))
        step.attend(query, out, scale, window)
        outs[(path, splits)] = out[:n].double().cpu()
        assert torch.isfinite(outs[(path, splits)]).all(), (path, splits)
    errs = {key: _rel(got, want) for key, got in outs.items()}
    errs["cuda-triton"] = _rel(outs[("cuda", None)], outs[("triton", None)])
    errs["split5-auto"] = _rel(outs[("cuda", 5)], outs[("cuda", None)])
    print(name, d, window, rep, dtype, errs)
    assert all(e < 1e-2 for e in errs.values()), errs
    # split-K merges in another order: the output's last bit differs on some elements (bf16's unit is 8x fp16's;
    # measured on H200 up to 1.6e-4 for bf16 at head size 64, 3e-5 for fp16)
    assert errs["cuda-triton"] < 4e-3 and errs["split5-auto"] < (1e-4 if dtype == torch.float16 else 4e-4), errs


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d, window", [(64, None), (128, None), (256, None), (256, 70)])
def test_cuda_decode_stages_like_the_triton_kernel(dtype, d, window):
    """A decode step as one CUDA launch (``PageStep.run``: the kernel stages the new key / value itself)
    against the Triton stage kernel + the same attention on twin caches: the staged bytes (keys: the same
    arithmetic, identical; values: a fast Walsh-Hadamard transform instead of a tf32x3 dot, so a code may
    sit one level away on a rounding tie), the packed pages of the requests whose page filled, the output."""
    from vllm_kvmix.kernels.page import PageStep, StepPlan

    fmt = parse_format("kvmix-k4v2")
    h, rep, scale = 2, _DECODE_SHAPES[d], 0.09
    seq_lens = [1, 64, 65, 700, 3000, 128]  # 64 and 128: the new token fills the page (packed after)
    n, n_pad = len(seq_lens), len(seq_lens) + 2
    gen = torch.Generator().manual_seed(11)
    cache, stage, table = _decode_pages(fmt, seq_lens, h, d, gen)
    table = torch.cat([table, table[:1].expand(n_pad - n, -1)]).to(DEV)
    q = torch.randn(n_pad, h * rep, d, generator=gen).to(DEV, dtype)
    k = (torch.randn(n_pad, h, d, generator=gen) * 3).to(DEV, dtype)
    v = torch.randn(n_pad, h, d, generator=gen).to(DEV, dtype)
    k[:, :, 3] += 30.0
    v[:, 1] *= 50.0
    qsl = torch.tensor(list(range(n + 1)) + [n] * (n_pad - n), dtype=torch.int32, device=DEV)
    seq = torch.tensor(seq_lens + [0] * (n_pad - n), dtype=torch.int32, device=DEV)
    slots = torch.arange(n_pad, dtype=torch.int32, device=DEV).clamp(max=n - 1)
    twins, outs = {}, {}
    for path in ("fused", "triton-stage"):
        c, s_ = cache.clone().to(DEV), stage.clone().to(DEV)
        plan = StepPlan(qsl, seq, n_pad, 1, qsl.tolist(), max(seq_lens), h * rep, h, head_size=d)
        step = PageStep(k, c, s_, fmt, slots, table, plan)
        out = torch.full_like(q, float("nan"))
        assert step._fused_decode(q, k, window, None)
        if path == "fused":
            step.run(q, k, v, out, scale, window)
        else:
            step.write(k, v)
            step.attend(q, out, scale, window)
        twins[path], outs[path] = (c.cpu(), s_.cpu()), out[:n].float().cpu()
    (cf, sf), (ct, st) = twins["fused"], twins["triton-stage"]
    slay = stage_layout(d)
    for i, s in enumerate(seq_lens):  # the staged token's bytes
        off = (s - 1) % P
        kb = slice(off * d, (off + 1) * d)
        assert torch.equal(sf[i, :, kb], st[i, :, kb]), i
        mb = 4 * (d // 64)  # meta bytes per token
        km = slice(slay.k.meta_offset + off * mb, slay.k.meta_offset + (off + 1) * mb)
        assert torch.equal(sf[i, :, km], st[i, :, km]), i
        vc = slice(slay.v.codes_offset + off * d, slay.v.codes_offset + (off + 1) * d)
        diff = (sf[i, :, vc].int() - st[i, :, vc].int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() < 0.02, i
    full = [table[i, (s - 1) // P].item() for i, s in enumerate(seq_lens) if s % P == 0]
    kf, vf = read_packed(cf, torch.tensor(full), fmt, d)
    kt, vt = read_packed(ct, torch.tensor(full), fmt, d)
    assert _rel(kf, kt) < 1e-3 and _rel(vf, vt) < 1e-2
    assert torch.isfinite(outs["fused"]).all()
    assert _rel(outs["fused"], outs["triton-stage"]) < 2e-3


def test_cuda_decode_constants_match_the_source():
    """The launcher's bounds and workspace sizing are the kernel's shared-memory shapes (csrc/page_decode.cu)."""
    from vllm_kvmix.kernels import cuda_decode, splitk

    src = cuda_decode.source_path().read_text()
    assert f"#define KVMIX_ROWS {cuda_decode.ROWS} " in src
    assert f"#define KVMIX_MAX_SPLITS {cuda_decode.MAX_SPLITS} " in src
    assert f"#define KVMIX_SKG {STAGE_KEY_GROUP} " in src  # staged key groups (formats.stage_layout)
    sizes = "static_assert(" + " || ".join(f"D == {d}" for d in cuda_decode.HEAD_SIZES) + ", "
    assert sizes in src  # HeadShape's head sizes
    built = re.findall(r"^KVMIX_HEAD_SIZE\((\d+)\)$", src, re.M)  # the nvcc build's instantiations
    assert sorted(map(int, built)) == sorted(cuda_decode.HEAD_SIZES)
    assert f"#define KVMIX_RING_STAGES {cuda_decode.RING_STAGES}\n" in src  # the ring's depth (smem_bytes)
    assert "static constexpr int T = D > 128 ? 32 : KVMIX_P;" in src  # page passes (pass_tokens)
    assert "static constexpr bool RING = D > 128;" in src  # which head sizes read packed pages via the ring (ring)
    # the blocks an SM holds, which split-K plans a wave of (splitk.programs_per_sm)
    assert f"#define KVMIX_MIN_BLOCKS {splitk.PROGRAMS_PER_SM}\n" in src
    assert f"#define KVMIX_MIN_BLOCKS_256 {splitk.PROGRAMS_PER_SM_HEAD_256}\n" in src
    assert "MIN_BLOCKS = D > 128 ? KVMIX_MIN_BLOCKS_256 : KVMIX_MIN_BLOCKS;" in src


@pytest.mark.parametrize("d", [64, 128, 256])
def test_cuda_decode_shared_memory_holds_the_ring(d):
    """The dynamic shared memory the launcher asks for (``cuda_decode.smem_bytes``): a pass of a whole page is the
    packed page itself (KVFormat.layout); a half-page pass (head size 256) has half its codes and value meta and
    all its key meta; the launch fits the H200 / H100 per-block limit (227 KiB) with the kernel's static arrays."""
    from vllm_kvmix.formats import KVFormat
    from vllm_kvmix.kernels import cuda_decode

    for kb, vb in ((4, 2), (4, 4), (8, 2), (8, 4)):
        lay = KVFormat(kb, vb).layout(d)
        t = cuda_decode.pass_tokens(d)
        codes = lay.k.meta_offset - lay.k.codes_offset + lay.v.meta_offset - lay.v.codes_offset
        v_meta = lay.v.end - lay.v.meta_offset
        k_meta = lay.k.end - lay.k.meta_offset
        assert cuda_decode.pass_bytes(kb, vb, d) == (codes + v_meta) * t // P + k_meta
        smem = cuda_decode.smem_bytes(kb, vb, d)
        acc = cuda_decode.WARPS * cuda_decode.ROWS * (d + 4) * 4
        if cuda_decode.ring(d):
            assert smem == max(acc, cuda_decode.WARPS * cuda_decode.RING_STAGES * cuda_decode.pass_bytes(kb, vb, d))
        else:
            assert smem == acc
        assert smem + 4 * cuda_decode.MAX_SPLITS * cuda_decode.ROWS + 8 * cuda_decode.WARPS * cuda_decode.ROWS < 227 * 1024


def test_cuda_decode_params_struct_matches_the_source():
    """``DecodeParams`` (ctypes) is ``struct DecodeParams`` of page_decode.cu field for field: same names, order
    and C types, so the one struct the launcher passes lands where the kernel reads it."""
    import ctypes
    import re

    from vllm_kvmix.kernels import cuda_decode

    src = cuda_decode.source_path().read_text()
    body = re.search(r"struct DecodeParams \{(.*?)\};", src, re.S).group(1)
    fields = re.findall(r"^\s*([\w\s\*]+?)\s*(\w+);", body, re.M)
    kinds = {"double": ctypes.c_double, "int": ctypes.c_int}
    want = [(name, ctypes.c_void_p if "*" in ctype else kinds[ctype.strip()]) for ctype, name in fields]
    assert [(n, t) for n, t in cuda_decode.DecodeParams._fields_] == want
    assert len(want) == 38
    assert "kvmix_page_decode(const DecodeParams args)" in src


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine")
@pytest.mark.parametrize("defines", [[], ["-DKVMIX_MIN_BLOCKS=3"],
                                     *([[f"-D{d}" for d in _TRIAL_DEFINES]] if _TRIAL_DEFINES else [])])
def test_cuda_decode_source_compiles_for_sm90(tmp_path, defines):
    """csrc/page_decode.cu builds for sm_90 in every variant the launcher names (each head size), as served and
    with another
    register bound (``KVMIX_MIN_BLOCKS=3``) and with a trial's defines (``KVMIX_TEST_DEFINES``).  NVRTC compiles the same source on the GPU at first
    use; this catches a broken source on a CPU machine."""
    import subprocess

    from vllm_kvmix.kernels import cuda_decode

    res = subprocess.run(["nvcc", "-DKVMIX_INSTANTIATE", *defines, "-std=c++17", "-gencode=arch=compute_90,code=sm_90",
                          "-cubin", "-Xptxas", "-v", "-o", str(tmp_path / "k.cubin"), str(cuda_decode.source_path())],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    # k4v2 fp16/bf16, k4v4, k8v4 per head size, and two sliding-window builds
    assert res.stderr.count("Compiling entry function") == 4 * len(cuda_decode.HEAD_SIZES) + 2


_CODE_FIELDS_MAIN = r"""
#include <cmath>
#include <cstdio>
#include "page_decode.cu"

static double half_value(u32 h) {
  const int e = (h >> 10) & 31, m = h & 1023;
  const double v = e ? std::ldexp(1.0 + m / 1024.0, e - 15) : std::ldexp(m / 1024.0, -14);
  return (h & 0x8000u) ? -v : v;
}

static u32 rng = 12345u;
static u32 next() { rng = rng * 1664525u + 1013904223u; return rng; }

// every field position o of a BITS-bit code in both 16-bit halves, every code pair, random neighbouring bits:
// code_field + field_offset_neg and code_pair - 1024 must give the code exactly
template <int BITS>
static long check(long& n) {
  long bad = 0;
  for (int o = 0; o + BITS <= 16; o += BITS)
    for (u32 lo = 0; lo < (1u << BITS); ++lo)
      for (u32 hi = 0; hi < (1u << BITS); ++hi)
        for (int rep = 0; rep < 4; ++rep) {
          const u32 field = ((1u << BITS) - 1) << o;
          u32 w = next() & ~(field | (field << 16));
          w |= (lo << o) | (hi << (16 + o));
          const u32 r = code_field<BITS>(w, o), neg = field_offset_neg<BITS>(o), rp = code_pair<BITS>(w, o);
          const double off_lo = -half_value(neg & 0xffffu), off_hi = -half_value(neg >> 16);
          ++n;
          if (half_value(r & 0xffffu) - off_lo != (double)lo || half_value(r >> 16) - off_hi != (double)hi ||
              off_lo != off_hi || off_lo <= 0 || half_value(rp & 0xffffu) != 1024.0 + lo ||
              half_value(rp >> 16) != 1024.0 + hi) {
            if (bad < 5) printf("BITS %d o %d lo %u hi %u: %08x offset %g\n", BITS, o, lo, hi, r, off_lo);
            ++bad;
          }
        }
  return bad;
}

int main() {
  long n = 0;
  const long bad = check<2>(n) + check<4>(n) + check<8>(n);
  printf("checked %ld, wrong %ld\n", n, bad);
  return bad != 0;
}
"""


@pytest.mark.skipif(shutil.which("nvcc") is None or shutil.which("c++") is None, reason="no nvcc / host C++ compiler")
def test_cuda_decode_code_fields_are_exact(tmp_path):
    """The CUDA kernel's code-field helpers (csrc/page_decode.cu, compiled for the host): for 2-, 4- and 8-bit
    codes at every field position of both 16-bit halves, with random neighbouring bits, the fp16 pair read
    back minus the offset is the code exactly -- code_field / field_offset_neg (fields read in place, offsets
    2^(10 - o)) and code_pair (shifted to bit 0, offset 1024).  Fails if a mask takes a neighbour's bit or an
    exponent gives a unit other than 1."""
    import subprocess

    from vllm_kvmix.kernels import cuda_decode

    (tmp_path / "main.cu").write_text(_CODE_FIELDS_MAIN)
    exe = tmp_path / "fields"
    res = subprocess.run(["nvcc", "-std=c++17", "-arch=sm_90", f"-I{cuda_decode.source_path().parent}",
                          "-o", str(exe), str(tmp_path / "main.cu")], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and "wrong 0" in run.stdout, run.stdout[-2000:]


_SM90_SHARED = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from vllm_kvmix.formats import parse_format
from vllm_kvmix.kernels import page, prefill
name, d = sys.argv[1], int(sys.argv[2])
stage, bits = page._constants(parse_format("kvmix-k4v2"), d)
if name == "dequant":
    fn, consts = prefill._dequant_kernel, dict(D=d, **bits, **stage)
elif name.startswith("pack"):  # "pack" as a prompt step launches it, "pack-decode" as a decode step does
    rows, value_rows = page.pack_launch_rows("decode" in name)
    fn, consts = page._pack_kernel, dict(D=d, **stage, **bits, R=rows, VR=value_rows)
else:  # the stage kernel as a step with a prompt launches it
    fn, consts = page._stage_kernel, dict(D=d, TB=page.STAGE_TOKENS_PREFILL, **stage)
ptrs = {"k_out_ptr": "*bf16", "v_out_ptr": "*bf16", "key_ptr": "*bf16", "value_ptr": "*bf16"}
u8 = ("cache_ptr", "stage_ptr", "scratch_ptr")
sig = {n: "constexpr" if n in consts else "*u8" if n in u8 else ptrs.get(n, "*i32") if n.endswith("_ptr")
       else "fp32" if n == "v_scale" else "i32" for n in fn.arg_names}
# what the JIT specializes on in a real launch: 16-byte aligned tensors, strides multiple of 16
attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in fn.arg_names
         if n.endswith("_ptr") or n.startswith("stride_")}
k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
print("SHARED", k.metadata.shared)
import re
sys.path.insert(0, "benchmarks/kernels")
from sass import resources  # cuobjdump's resource line of the cubin
print("STACK", re.search(r"STACK:([0-9]+)", resources(k)).group(1))
"""


def _sm90_resources(kernel, d) -> dict:
    """``{"SHARED": bytes, "STACK": bytes a thread}`` of a write or prefill kernel compiled for sm_90 as a
    prompt step launches it (Triton's own ptxas and cuobjdump, no GPU needed; a subprocess, outside the interpreter)."""
    import subprocess
    import sys

    tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    if not all(os.path.exists(os.path.join(tools, t)) for t in ("ptxas", "cuobjdump")):
        pytest.skip("this Triton install has no ptxas / cuobjdump")
    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run([sys.executable, "-c", _SM90_SHARED, kernel, str(d)], capture_output=True, text=True, env=env,
                         cwd=os.path.join(os.path.dirname(__file__), ".."))
    assert res.returncode == 0, res.stderr[-2000:]
    return {ln.split()[0]: int(ln.split()[1]) for ln in res.stdout.splitlines() if ln.split()[:1] in (["SHARED"], ["STACK"])}


@pytest.mark.parametrize("kernel", ["dequant", "stage"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_prefill_kernels_fit_hopper_shared_memory(kernel, d):
    """The prefill dequant kernel and the stage kernel at a prompt step's 64 tokens per program compile for
    sm_90 within a block's 227 KiB of shared memory: a dequant kernel that rotated values with fp32 dots
    needed 256 KiB at d=256, and the launch failed on an H200."""
    assert _sm90_resources(kernel, d)["SHARED"] <= 227 * 1024


@pytest.mark.parametrize("kernel", ["stage", "pack", "pack-decode"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_write_kernels_keep_their_registers(kernel, d):
    """The stage kernel at a prompt step's launch (64 tokens, 4 warps) and the pack kernel (as prompt and
    decode steps launch it) spill nothing on sm_90.  The stage kernel, with the Hadamard matrix loaded in fp32 and multiplied in "tf32x3", took 255
    registers and 48 / 1,576 bytes of stack a thread at d = 128 / 256 (``page._hadamard_columns``); the pack
    kernel, one program per (page, KV head) with whole [64, D] key and value tiles, 255 registers and 376 bytes
    at d = 256."""
    assert _sm90_resources(kernel, d)["STACK"] == 0


def test_prefill_kernels_compile_before_the_first_prompt(monkeypatch):
    """``compile_prefill_kernels`` (the backend calls it during vLLM's profiling step) runs the dequant
    kernel on blank pages with the real tensors' strides: a cache page and a
    staging page of the format's layout and a block table of the width given (vLLM's:
    ``flash_prefill.block_table_width``)."""
    from vllm_kvmix.formats import PAGE_TOKENS
    from vllm_kvmix.kernels import prefill
    from vllm_kvmix.kernels.page import compile_prefill_kernels

    real, seen = prefill._dequant_kernel, []

    class Recorder:
        def __getitem__(self, grid):
            def launch(*args, **kw):
                seen.append((args[6].stride(0), args[7].stride(0), args[5].stride(0), args[9].dtype))
                return real[grid](*args, **kw)

            return launch

    monkeypatch.setattr(prefill, "_dequant_kernel", Recorder())
    fmt, d, h = parse_format("kvmix-k4v2"), 64, 2
    compile_prefill_kernels(fmt, d, h, torch.float16, 16, DEV)
    page_bytes = fmt.layout(d, PAGE_TOKENS).head_page_bytes
    stage_bytes = stage_layout(d).head_page_bytes
    assert seen == [(h * page_bytes, h * stage_bytes, 16, torch.float16)]
