"""Reduced quality run (CI): SmolLM2-135M, one 1024-token window of alice29, through vLLM on CPU.

The full run is ``python benchmarks/quality/harness.py`` (benchmarks/results/quality.md).
Bounds come from measurements on this window (bf16 model, fp64 kvmix reference):
see the numbers in each assertion's comment.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "quality"))

pytestmark = [pytest.mark.engine, pytest.mark.slow]


@pytest.fixture(scope="module")
def quality(smollm2_dir):
    import harness

    rows = harness.run(["smollm2-135m"], ["auto", "kvmix-k8v4", "kvmix-k4v2", "kvmix-k2v4"], 1, 1024, "bfloat16")
    return {r["kv_cache_dtype"]: r for r in rows}


def test_reference_row(quality):
    r = quality["auto"]
    assert 15 < r["ppl"] < 26, r  # a real model on real text
    assert r["kl"] == 0 and r["top1"] == 1


def test_k8v4_is_near_lossless(quality):
    r = quality["kvmix-k8v4"]
    assert abs(r["dppl_pct"]) < 0.5, r
    assert r["kl"] < 0.01 and r["top1"] > 0.95, r


def test_k4v2_within_target(quality):
    r = quality["kvmix-k4v2"]
    # +3.18% over 8 windows (docs/results.md); on this one window +4.4% on the 2-core CI machine (the bf16
    # model's CPU matmuls round differently by instruction set)
    assert r["dppl_pct"] < 5.0, r
    assert r["bits_per_element_2k"] <= 3.8, r
    assert r["top1"] > 0.85, r


def test_keys_deserve_the_bits(quality):
    """The paper's claim at equal bytes: k4v2 beats k2v4 by a wide margin."""
    k4v2, k2v4 = quality["kvmix-k4v2"], quality["kvmix-k2v4"]
    assert k4v2["bits_per_element"] == k2v4["bits_per_element"]
    assert k2v4["dppl_pct"] > 3 * k4v2["dppl_pct"], (k4v2, k2v4)
    assert k2v4["kl"] > 3 * k4v2["kl"], (k4v2, k2v4)


def test_prefix_caching_and_chunked_prefill_give_the_same_perplexity(smollm2_dir):
    """fp32 model, k4v2: identical perplexity with prefix caching on/off and 128-token prefill chunks."""
    import harness

    ppl = harness.invariance("smollm2-135m", "kvmix-k4v2", 1, 512)
    assert len(set(ppl.values())) == 1, ppl
