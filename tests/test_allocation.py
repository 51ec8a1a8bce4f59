"""Per-layer bit allocation from weight norms (pure: vllm_kvmix.allocation; the engine side is tests/test_autoplan.py)."""

import itertools

import pytest
import torch

from vllm_kvmix.allocation import (
    BITS,
    group_norms,
    layer_norms,
    plan_bits,
    plan_error,
    reduce_groups,
)


def _brute_force(k, v, avg):
    n = len(k)
    best = None
    for combo in itertools.product(BITS, repeat=2 * n):
        if sum(combo) > round(avg * 2 * n):
            continue
        plan = list(zip(combo[:n], combo[n:]))
        err = plan_error(k, v, plan)
        if best is None or err < best[0] - 1e-12:
            best = (err, plan)
    return best


def test_keys_with_larger_norms_get_the_bits():
    plan = plan_bits([10.0, 10.0, 10.0], [1.0, 1.0, 1.0], 3.0)
    assert plan == [(4, 2)] * 3


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("avg", [2.5, 3.0, 4.0, 5.0])
def test_greedy_matches_the_optimum_on_small_cases(seed, avg):
    g = torch.Generator().manual_seed(seed)
    k = (torch.rand(3, generator=g) * 20 + 0.5).tolist()
    v = (torch.rand(3, generator=g) * 20 + 0.5).tolist()
    plan = plan_bits(k, v, avg)
    err_opt, _ = _brute_force(k, v, avg)
    assert sum(kb + vb for kb, vb in plan) <= round(avg * 6)
    # greedy on a convex per-side error curve with unequal step sizes is near, not always at, the optimum
    assert plan_error(k, v, plan) <= 1.25 * err_opt


def test_budget_is_met_exactly_when_reachable():
    k, v = [5.0, 4.0, 3.0, 2.0], [1.0, 2.0, 3.0, 4.0]
    for avg in (2.0, 3.0, 4.0, 5.0, 6.0, 8.0):
        plan = plan_bits(k, v, avg)
        assert sum(kb + vb for kb, vb in plan) == round(avg * 8), (avg, plan)


def test_invalid_budgets():
    with pytest.raises(ValueError):
        plan_bits([1.0], [1.0], 1.0)
    with pytest.raises(ValueError):
        plan_bits([1.0], [], 3.0)


def test_tensor_parallel_shards_reduce_to_the_same_norms():
    """Each rank holds some KV-head groups; max / sum-of-squares reductions give one plan everywhere."""
    g = torch.Generator().manual_seed(0)
    hs, hidden, groups = 16, 64, 4
    w_k = torch.randn(groups * hs, hidden, generator=g)
    w_k[hs : 2 * hs] *= 5  # one group dominates
    w_v = torch.randn(groups * hs, hidden, generator=g)
    full = layer_norms(w_k, w_v, hs)
    for tp in (2, 4):
        spec, fro = [], []
        for rank in range(tp):
            shard = w_k.chunk(tp, dim=0)[rank]
            s, f = group_norms(shard, hs)
            spec.append(s)
            fro.append(f)
        ks, kf = reduce_groups(torch.cat(spec), torch.cat(fro))
        assert ks == pytest.approx(full.k_spectral) and kf == pytest.approx(full.k_frobenius)
    # the spectral norm of the largest group, the Frobenius norm of the whole matrix
    assert full.k_spectral == pytest.approx(torch.linalg.matrix_norm(w_k[hs : 2 * hs], ord=2).item(), rel=1e-5)
    assert full.k_frobenius == pytest.approx(torch.linalg.matrix_norm(w_k, ord="fro").item(), rel=1e-5)


def test_inspect_cli_on_a_real_model(smollm2_dir, tmp_path, capsys):
    from vllm_kvmix.cli import main

    png = tmp_path / "plan.png"
    assert main(["inspect", smollm2_dir, "--budget", "3", "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    import re

    assert len(re.findall(r"^\| \d+ \|", out, flags=re.M)) == 30  # one row per layer
    assert "5040 bytes/token vs bf16 23040 (4.57x)" in out
    assert png.stat().st_size > 10_000


def test_tiers_meet_the_budget_and_order_upgrades():
    g = torch.Generator().manual_seed(3)
    from vllm_kvmix.allocation import TIERS, plan_even, plan_tiers, tier_rank

    k = (torch.rand(9, generator=g) * 20 + 1).tolist()
    v = (torch.rand(9, generator=g) * 20 + 1).tolist()
    for avg in (2, 3, 4, 5, 6, 8):
        plan = plan_tiers(k, v, avg)
        used = sum(a + b for a, b in plan)
        # exactly the budget where the +2 / +4 steps can reach it (9 layers at 5 bits: 88 of 90)
        assert 2 * avg * 9 - 4 < used <= 2 * avg * 9, (avg, plan)
        assert sum(a + b for a, b in plan_tiers(k + [1.0], v + [1.0], avg)) == 2 * avg * 10
        # no side is upgraded past a tier while another layer still waits for an earlier one
        for side, frm, to in TIERS:
            idx = 0 if side == "k" else 1
            if any(p[idx] > to for p in plan):
                assert all(p[idx] >= to for p in plan), (avg, plan)
    # within a tier: larger norm first
    plan = plan_tiers(k, v, 5)
    got8 = [i for i, p in enumerate(plan) if p[0] == 8]
    assert sorted(got8) == sorted(sorted(range(9), key=lambda i: -k[i])[: len(got8)])
    assert plan_even(3) == (4, 2) and plan_even(5) == (8, 2) and plan_even(6) == (8, 4)
    assert tier_rank((4, 2)) > tier_rank((2, 4))
