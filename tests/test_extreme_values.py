"""Extreme K/V values on every path: the reference step, the CPU path (C++ decode kernel and eager), the Triton
kernels (on CPU under TRITON_INTERPRET=1) and, on a GPU, the CUDA decode kernel.

Finite inputs -- constant pages, a single huge outlier, subnormals, values beyond fp16's range -- never come
out as NaN or inf, and the packed pages stay finite.  A non-finite token (NaN in one token's K and V) affects
only its own sequence, from the step it enters on: the other sequence of the batch gets bit-identical outputs
to a run without it, and its own earlier steps are unchanged.  (Within the step it enters, queries before it in
its page may see it as bf16 attention's 0 * NaN does; later ones do, as in bf16.)
"""

import pytest
import torch

from test_staged import P, Seqs

from vllm_kvmix import cpu, cpu_kernel
from vllm_kvmix.formats import parse_format
from vllm_kvmix.reference import staged
from vllm_kvmix.reference.staged import read_packed

CUDA = torch.cuda.is_available()
L = 130
# prompt 70 rows, 5 decodes, a 54-row chunk (with token 100), a decode
SPLIT = [70, 1, 1, 1, 1, 1, 54, 1]
NAN_AT = 100
CASES = ["constant", "outlier", "subnormal", "beyond-fp16"]


def _inputs(case: str, d: int, h: int = 2, rep: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(L, h * rep, d, generator=g)
    k = torch.randn(L, h, d, generator=g)
    v = torch.randn(L, h, d, generator=g)
    if case == "constant":
        k.fill_(3.0)
        v.fill_(-2.0)
    elif case == "outlier":
        k[37, 0, 5] = 1e4
        v[80, 1, 7] = -1e4
    elif case == "subnormal":
        k *= 1e-40
        v *= 1e-40
    elif case == "beyond-fp16":
        k *= 1e5
        v *= 1e5
    elif case == "nan-token":
        k[NAN_AT] = float("nan")
        v[NAN_AT] = float("nan")
    return q, k, v


class PathSeqs(Seqs):
    """Seqs stepping on one path: "reference", "cpu", "cpu-eager" (run on CPU tensors), "triton", "cuda"."""

    def __init__(self, path, fmt, h, d, monkeypatch):
        super().__init__(fmt, h, d)
        self.path = path
        self.mp = monkeypatch
        if path in ("triton", "cuda"):
            from test_page_kernels import KernelSeqs

            self.kernel = KernelSeqs(fmt, h, d)

    def add(self) -> int:
        if self.path in ("triton", "cuda"):
            self.kernel.add()
        return super().add()

    def run(self, chunks, q, k, v, scale, **kw):
        if self.path in ("triton", "cuda"):
            from vllm_kvmix.options import DECODE_KERNEL_ENV

            self.mp.setenv(DECODE_KERNEL_ENV, self.path)
            return self.kernel.run(chunks, q, k, v, scale, dtype=torch.bfloat16 if CUDA else torch.float32)
        import test_staged

        fn = staged.step if self.path == "reference" else cpu.step
        self.mp.setattr(test_staged, "step", fn)
        if self.path == "cpu-eager":
            self.mp.setattr(cpu_kernel, "kernel", lambda: None)
        return super().run(chunks, q, k, v, scale, **kw)

    def pages(self):
        return (self.kernel.cache.cpu(), self.kernel.tables) if self.path in ("triton", "cuda") else (
            self.cache, self.tables)


def _run(path, case, d, monkeypatch, clean_other=True):
    """Sequence 0 gets the case, sequence 1 ordinary values; both in every step.  Outputs per sequence."""
    fmt = parse_format("kvmix-k4v2")
    seqs = PathSeqs(path, fmt, 2, d, monkeypatch)
    inputs = [_inputs(case, d), _inputs("plain", d, seed=1)]
    ids = [seqs.add(), seqs.add()]
    outs = [torch.full((L, 8, d), float("nan")) for _ in ids]
    for n in SPLIT:
        res = seqs.run([(i, n) for i in ids], *[[x[j] for x in inputs] for j in range(3)], 0.125)
        for i in ids:
            rows, ctx = res[i]
            outs[i][ctx : ctx + n] = rows.float().cpu()
    return outs, seqs


def _paths():
    paths = ["reference", "cpu", "cpu-eager", "triton"]
    return paths + (["cuda"] if CUDA else [])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("path", _paths())
def test_finite_inputs_stay_finite(path, case, monkeypatch):
    if path in ("triton", "cuda") and not CUDA and case != "outlier":
        pytest.skip("the Triton interpreter is slow; one case on CPU, all on the GPU")
    d = 128 if path == "cuda" else 64
    outs, seqs = _run(path, case, d, monkeypatch)
    for o in outs:
        assert torch.isfinite(o).all(), (path, case)
    cache, tables = seqs.pages()
    full = torch.tensor([b for t in tables for b in t[: L // P]])
    k, v = read_packed(cache, full, seqs.fmt, d)
    assert torch.isfinite(k).all() and torch.isfinite(v).all()
    if case == "constant":  # a constant page stores exactly (scale 0)
        assert torch.equal(k[: P], torch.full_like(k[: P], 3.0))


@pytest.mark.parametrize("path", _paths())
def test_a_nan_token_stays_in_its_sequence(path, monkeypatch):
    if path == "triton" and not CUDA:
        pytest.skip("the Triton interpreter is slow; the GPU runs this path")
    d = 128 if path == "cuda" else 64
    nan_outs, _ = _run(path, "nan-token", d, monkeypatch)
    clean_outs, _ = _run(path, "plain", d, monkeypatch)
    assert torch.equal(nan_outs[1], clean_outs[1]), "the NaN token reached the other sequence"
    before = sum(SPLIT[:6])  # the steps before the one that brings token 100
    assert torch.equal(nan_outs[0][:before], clean_outs[0][:before])
    assert torch.isfinite(nan_outs[0][:before]).all()
