"""kvmix-auto's startup hook without an engine: norms from fused QKV shards, TP reductions, plans.

The engine-level checks (LLM(...) and `vllm serve` on CPU) are in tests/test_e2e_cpu.py.
"""

import types

import pytest
import torch

from vllm_kvmix.allocation import plan_bits, plan_tiers
from vllm_kvmix.formats import AutoFormat, KVFormatError, is_auto, parse_any, parse_format
from vllm_kvmix.vllm import autoplan

HS, HIDDEN, NQ, NKV, LAYERS = 64, 128, 8, 4, 6


def _weights(seed=0):
    """Per layer: full W_Q, W_K, W_V ([heads * HS, HIDDEN]); keys loud in early layers, values late."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(LAYERS):
        wq = torch.randn(NQ * HS, HIDDEN, generator=g)
        wk = torch.randn(NKV * HS, HIDDEN, generator=g) * (8.0 if i < 2 else 1.0)
        wv = torch.randn(NKV * HS, HIDDEN, generator=g) * (3.0 if i >= 4 else 1.0)
        wk[HS : 2 * HS] *= 3  # one KV head dominates: the spectral norm is a max over groups
        out.append((wq, wk, wv))
    return out


class _QKV(torch.nn.Module):
    """What vLLM's QKVParallelLinear exposes on one rank: its shard and head counts."""

    def __init__(self, wq, wk, wv, rank, tp):
        super().__init__()
        nq, nkv = NQ // tp, max(NKV // tp, 1)
        replicas = max(tp // NKV, 1)
        kv_rank = rank // replicas
        q = wq[rank * nq * HS : (rank + 1) * nq * HS]
        k = wk[kv_rank * nkv * HS : (kv_rank + 1) * nkv * HS]
        v = wv[kv_rank * nkv * HS : (kv_rank + 1) * nkv * HS]
        self.weight = torch.nn.Parameter(torch.cat([q, k, v]), requires_grad=False)
        self.num_heads, self.num_kv_heads, self.head_size, self.num_kv_head_replicas = nq, nkv, HS, replicas


def _model(weights, rank=0, tp=1, k_norm=False):
    root = torch.nn.Module()
    root.layers = torch.nn.ModuleList()
    for wq, wk, wv in weights:
        attn = torch.nn.Module()
        attn.qkv_proj = _QKV(wq, wk, wv, rank, tp)
        if k_norm:
            attn.k_norm = torch.nn.LayerNorm(HS)
        root.layers.append(attn)
    layers = {f"layers.{i}.attn": types.SimpleNamespace(head_size=HS, sliding_window=None) for i in range(LAYERS)}
    return root, layers


def _plan(rows, avg=3, mode="var"):
    autoplan.plan_rows(rows, AutoFormat(avg), mode)
    return [(r.k_bits, r.v_bits) for r in rows]


def test_names():
    assert parse_any("kvmix-auto") == AutoFormat(3) and parse_any("kvmix-auto-b6") == AutoFormat(6)
    assert is_auto("kvmix-auto-b4") and not is_auto("kvmix-k4v2")
    with pytest.raises(KVFormatError, match="b7"):
        parse_any("kvmix-auto-b7")
    with pytest.raises(KVFormatError, match="resolved to a format per layer"):
        parse_format("kvmix-auto")


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_every_tensor_parallel_rank_plans_the_same(tp):
    """Simulated TP (KV heads split, and replicated at tp=8 > 4 KV heads): the reductions give
    every rank the layer's norms, hence the unsplit model's plan."""
    w = _weights()
    want_rows = autoplan.layer_rows(*_model(w), reduce=lambda t, op: t)
    want = _plan(want_rows, 5)
    # pass 1: every rank's local values, in call order
    local = []
    for rank in range(tp):
        calls = []
        autoplan.layer_rows(*_model(w, rank, tp), reduce=lambda t, op, c=calls: c.append(t) or t)
        local.append(calls)
    # pass 2: each call answered with the all-reduce of that call over the ranks
    for rank in range(tp):
        answers = iter(range(len(local[0])))

        def reduce_rank(t, op):
            j = next(answers)
            stacked = torch.stack([calls[j] for calls in local])
            return stacked.amax(0) if op == "max" else stacked.sum(0)

        rows = autoplan.layer_rows(*_model(w, rank, tp), reduce=reduce_rank)
        for a, b in zip(rows, want_rows):
            assert a.k_spectral == pytest.approx(b.k_spectral, rel=1e-5)
            assert a.v_frobenius == pytest.approx(b.v_frobenius, rel=1e-5)
        assert _plan(rows, 5) == want
    # a rank's shard alone does not give the layer's norms (the reduction matters)
    alone = autoplan.layer_rows(*_model(w, 1, tp), reduce=lambda t, op: t)
    assert [r.k_frobenius for r in alone] != pytest.approx([r.k_frobenius for r in want_rows], rel=1e-3)


def test_plan_follows_the_tiers_and_the_norms():
    rows = autoplan.layer_rows(*_model(_weights()), reduce=lambda t, op: t)
    assert _plan(rows, 3) == [(4, 2)] * LAYERS  # keys to 4 first
    assert _plan(rows, 4) == [(4, 4)] * LAYERS  # then values to 4
    b5 = _plan(rows, 5)
    assert sum(k + v for k, v in b5) == 10 * LAYERS  # exactly the budget
    assert b5[0] == (8, 4) and b5[1] == (8, 4)  # then keys to 8, loudest first
    assert sorted(b5) == [(4, 4)] * (LAYERS // 2) + [(8, 4)] * (LAYERS // 2)
    assert _plan(rows, 6) == [(8, 4)] * LAYERS
    assert _plan(rows, 5, "even") == [(8, 2)] * LAYERS  # one page size: the K-first pair of 5 bits


def test_k_norm_layers_rank_keys_by_their_gain():
    model, layers = _model(_weights(), k_norm=True)
    for i, layer in enumerate(model.layers):  # gains grow with the layer index; W_K's norms fall
        layer.k_norm.weight.data.fill_(1.0 + i)
    rows = autoplan.layer_rows(model, layers, reduce=lambda t, op: t)
    assert all(r.qk_norm for r in rows)
    assert [round(r.k_gain, 3) for r in rows] == [round((1.0 + i) * HS**0.5, 3) for i in range(LAYERS)]
    plan = _plan(rows, 5)
    assert [k for k, _ in plan] == [4, 4, 4, 8, 8, 8]  # by gain, not by W_K (loud in layers 0-1)


def test_plan_table():
    rows = autoplan.layer_rows(*_model(_weights()), reduce=lambda t, op: t)
    _plan(rows, 5)
    lines = autoplan.plan_table(rows, AutoFormat(5), "var", HS)
    assert "per-layer page sizes" in lines[0] and "K->4, V->4, K->8, V->8" in lines[0]
    assert sum("| kvmix-k" in line for line in lines) == LAYERS
    assert lines[-1].endswith(f"(uniform k8v2: {LAYERS * parse_format('kvmix-k8v2').bytes_per_token_head(HS)})")
    even = autoplan.plan_table(rows, AutoFormat(5), "even", HS)
    assert "one page size" in even[0] and "K-first equal-byte pair" in even[0]


def test_engine_and_inspect_share_one_planning_function(monkeypatch):
    """autoplan.plan_rows (the engine) goes through allocation.plan_layers, the function `kvmix inspect` calls."""
    from vllm_kvmix import allocation

    rows = autoplan.layer_rows(*_model(_weights()), reduce=lambda t, op: t)
    calls = []
    monkeypatch.setattr(allocation, "plan_layers", lambda *a: calls.append(a) or [(2, 2)] * LAYERS)
    assert _plan(rows, 5) == [(2, 2)] * LAYERS and len(calls) == 1
    monkeypatch.setattr(allocation, "plan_layers", lambda *a: [(2, 2)] * (LAYERS - 1))
    with pytest.raises(ValueError, match="a plan of 5 layers for 6"):
        _plan(rows, 5)


def test_modes():
    cfg = types.SimpleNamespace(scheduler_config=types.SimpleNamespace(disable_hybrid_kv_cache_manager=False))
    full = {"a": types.SimpleNamespace(sliding_window=None), "b": types.SimpleNamespace(sliding_window=None)}
    hybrid = {"a": types.SimpleNamespace(sliding_window=512), "b": types.SimpleNamespace(sliding_window=None)}
    assert autoplan.choose_mode(full, cfg) == "var"
    assert autoplan.choose_mode(hybrid, cfg) == "even"
    cfg.scheduler_config.disable_hybrid_kv_cache_manager = True
    assert autoplan.choose_mode(hybrid, cfg) == "var"


def test_tiers_against_the_paper_rule():
    """The paper's greedy gives 2-bit keys where W_V's norm exceeds W_K's, and 8-bit keys to a loud
    layer before every layer has 4-bit values; the tiers do neither."""
    k, v = [40.0, 9.0, 3.0, 2.0], [2.0, 3.0, 8.0, 9.0]
    assert any(kb == 2 for kb, _ in plan_bits(k, v, 3))
    assert plan_tiers(k, v, 3) == [(4, 2)] * 4
    assert (8, 2) in plan_bits(k, v, 4, min_k=4)
    assert plan_tiers(k, v, 4) == [(4, 4)] * 4
    with pytest.raises(ValueError):
        plan_tiers(k, v[:3], 3)
