"""The CPU path (:mod:`vllm_kvmix.cpu`) against the reference step: the same bytes, outputs within fp32 rounding,
with decode rows on the C++ kernel (:mod:`vllm_kvmix.cpu_kernel`) and on the eager path.

Every case runs a whole mixed schedule on both -- prompts in chunks of odd sizes next to one-token decodes,
pages filling mid-step -- from caches full of stale bytes (0xFF: NaN scales), so a key the CPU path reads but
must not use would show up.
"""

import random

import pytest
import torch

from vllm_kvmix import cpu, cpu_kernel
from vllm_kvmix.formats import PAGE_TOKENS as P
from vllm_kvmix.formats import parse_format
from vllm_kvmix.reference import staged
from vllm_kvmix.reference.staged import RequestStep
from vllm_kvmix.staging import stage_rows


@pytest.fixture(autouse=True, params=["kernel", "eager"])
def decode_path(request, monkeypatch):
    """Every case twice: decode rows on the C++ kernel, and on the eager path it falls back to."""
    if request.param == "eager":
        monkeypatch.setattr(cpu_kernel, "kernel", lambda: None)
    return request.param


def test_the_decode_kernel_builds(decode_path):
    if decode_path == "kernel":
        assert cpu_kernel.kernel() is not None, "csrc/cpu_decode.cpp did not build (see the warning logged)"


def _schedule(prompts, decode_steps, seed):
    """Steps of (query rows, context before) per request: prompt chunks of random sizes, then decodes."""
    rng = random.Random(seed)
    ctx = [0] * len(prompts)
    left = list(prompts)
    steps = []
    while any(left) or decode_steps:
        if not any(left):
            decode_steps -= 1
        step = []
        for b in range(len(prompts)):
            n = min(left[b], rng.choice([1, 7, 63, 64, 100])) if left[b] else 1
            left[b] -= n if left[b] else 0
            step.append((n, ctx[b]))
            ctx[b] += n
        steps.append(step)
    return steps


def _run_both(name, heads, q_heads, d, prompts, decodes, window=None, soft_cap=None, seed=0, dtype=torch.float32,
              by_kind=False):
    """Largest difference to the reference over all steps (``by_kind``: ``(decode rows, prompt rows)``)."""
    torch.manual_seed(seed)
    fmt = parse_format(name)
    b = len(prompts)
    width = (max(prompts) + decodes) // P + 2
    nb = b * width + 3
    page = fmt.layout(d, P).head_page_bytes
    caches = [torch.full((nb, heads, page), 0xFF, dtype=torch.uint8) for _ in range(2)]
    stages = [torch.full((stage_rows(b), heads, fmt.stage_bytes_per_seq_head(d)), 0xFF, dtype=torch.uint8)
              for _ in range(2)]
    table = (torch.randperm(nb - 1) + 1)[: b * width].view(b, width).int()
    worst = {True: 0.0, False: 0.0}  # one-row (decode) request steps, prompt steps
    for step in _schedule(prompts, decodes, seed):
        reqs, t = [], 0
        for i, (n, ctx) in enumerate(step):
            reqs.append(RequestStep(t, t + n, ctx, ctx + n, i))
            t += n
        q = torch.randn(t, q_heads, d).to(dtype)
        k = (torch.randn(t, heads, d) * 3 + torch.linspace(-2, 2, d)).to(dtype)  # per-channel offsets, as in keys
        v = torch.randn(t, heads, d).to(dtype)
        want = staged.step(q, k, v, caches[0], stages[0], fmt, reqs, table, d**-0.5,
                           sliding_window=window, soft_cap=soft_cap)
        got = cpu.step(q, k, v, caches[1], stages[1], fmt, reqs, table, d**-0.5,
                       sliding_window=window, soft_cap=soft_cap)
        assert torch.isfinite(got).all()
        for r in reqs:
            if r.q1 > r.q0:
                one = r.q1 - r.q0 == 1
                worst[one] = max(worst[one], (want[r.q0 : r.q1] - got[r.q0 : r.q1]).abs().max().item())
        assert torch.equal(caches[0], caches[1]), "packed pages differ"
    return (worst[True], worst[False]) if by_kind else max(worst.values())


@pytest.mark.parametrize("name", ["kvmix-k4v2", "kvmix-k2v4", "kvmix-k8v4", "kvmix-k4v4", "kvmix-k8v8"])
def test_formats_match_the_reference(name):
    assert _run_both(name, 2, 6, 64, [130, 5, 64, 200], 70) < 1e-4


@pytest.mark.parametrize("d,heads,q_heads", [(64, 1, 8), (128, 2, 2), (256, 1, 4), (128, 4, 28)])
def test_head_sizes_and_gqa_ratios(d, heads, q_heads):
    assert _run_both("kvmix-k4v2", heads, q_heads, d, [150, 40], 30) < 1e-4


@pytest.mark.parametrize("window", [1, 50, 64, 130])
def test_sliding_window(window):
    assert _run_both("kvmix-k4v2", 2, 4, 64, [300, 70], 40, window=window) < 1e-4


def test_soft_cap():
    assert _run_both("kvmix-k8v4", 2, 4, 128, [140, 3], 20, soft_cap=30.0) < 1e-4


@pytest.mark.parametrize("name", ["kvmix-k4v2", "kvmix-k8v4"])
def test_a_bf16_model_runs_its_prompts_in_bf16(name):
    """bf16 inputs (a bf16 model): the same bytes; decode rows within fp32 rounding, prompt rows within bf16's
    (their attention runs in bf16, as vLLM's own CPU attention does for a bf16 model: keys and values rounded to
    8 significant bits, |v| ~ 1-3 here; measured worst 0.023 over these schedules)."""
    decode, prompt = _run_both(name, 2, 6, 64, [130, 5, 64, 200], 70, dtype=torch.bfloat16, by_kind=True)
    assert decode < 1e-4
    assert 1e-4 < prompt < 0.05  # above fp32 rounding: the bf16 path did run


def test_bounded_chunks_give_the_same_answer(monkeypatch):
    """A chunk bound smaller than one page per block: every call runs many chunks, same outputs."""
    free = _run_both("kvmix-k4v2", 2, 6, 64, [300, 129, 1], 66, seed=3)
    monkeypatch.setattr(cpu, "CHUNK_BYTES", 1)
    assert _run_both("kvmix-k4v2", 2, 6, 64, [300, 129, 1], 66, seed=3) == pytest.approx(free, abs=1e-5)


def test_workspace_stays_within_the_chunk_bound():
    cpu._WORK._bufs.clear()
    _run_both("kvmix-k4v2", 4, 16, 128, [2000, 1500, 900, 1200], 3)
    biggest = max(b.numel() * b.element_size() for b in cpu._WORK._bufs.values())
    assert biggest <= cpu.CHUNK_BYTES


def test_requests_without_tokens_and_without_slot():
    fmt = parse_format("kvmix-k4v2")
    cache = torch.zeros((4, 1, fmt.layout(64, P).head_page_bytes), dtype=torch.uint8)
    stage = torch.zeros((2, 1, fmt.stage_bytes_per_seq_head(64)), dtype=torch.uint8)
    q, k, v = torch.randn(1, 2, 64), torch.randn(1, 1, 64), torch.randn(1, 1, 64)
    table = torch.tensor([[1, 2]], dtype=torch.int32)
    out = cpu.step(q, k, v, cache, stage, fmt, [RequestStep(0, 0, 5, 5, 0)], table, 0.125)
    assert torch.equal(out, torch.zeros_like(out))
    with pytest.raises(RuntimeError, match="staging slot"):
        cpu.step(q, k, v, cache, stage, fmt, [RequestStep(0, 1, 0, 1, -1)], table, 0.125)
