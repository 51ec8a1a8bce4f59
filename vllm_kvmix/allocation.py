"""Per-layer K/V bit allocation from weight norms (the paper's second half).

The paper's error model (:func:`plan_bits`): quantizing a side (keys or values
of one layer) to ``b`` bits costs ``norm**2 * 2**(-2 b)``, where ``norm`` is the
spectral norm of that layer's W_K or W_V (it bounds how large the keys / values
can get); greedy by error reduction per added bit under an average-bits budget.
kvmix-auto's default (:func:`plan_tiers`) keeps the norms but upgrades kinds of
sides in a measured order (:data:`TIERS`); see there for why.

Norms per layer are reduced over KV-head groups in a way every tensor-parallel
rank can reproduce from its shard: spectral norm = max over groups (a
``max`` all-reduce), Frobenius norm = sqrt of the sum of squares (a ``sum``
all-reduce).  Pure torch; no vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BITS = (2, 4, 8)


@dataclass(frozen=True)
class LayerNorms:
    k_spectral: float
    v_spectral: float
    k_frobenius: float
    v_frobenius: float


def group_norms(weight: torch.Tensor, head_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Spectral and Frobenius norms of each KV-head group ``weight[g*hs:(g+1)*hs, :]``."""
    w = weight.float().reshape(-1, head_size, weight.shape[-1])
    return torch.linalg.matrix_norm(w, ord=2), torch.linalg.matrix_norm(w, ord="fro")


def reduce_groups(spectral: torch.Tensor, frobenius: torch.Tensor) -> tuple[float, float]:
    """The layer's norms from its groups' (any split of the groups across ranks gives the same)."""
    return float(spectral.max()), float(frobenius.square().sum().sqrt())


def layer_norms(w_k: torch.Tensor, w_v: torch.Tensor, head_size: int) -> LayerNorms:
    ks, kf = reduce_groups(*group_norms(w_k, head_size))
    vs, vf = reduce_groups(*group_norms(w_v, head_size))
    return LayerNorms(ks, vs, kf, vf)


def value_scale(w_v: torch.Tensor, gamma_in: torch.Tensor, head_size: int) -> float:
    """Typical length of one value vector: RMS over KV-head groups of ``||W_V diag(gamma_in)||_F``.

    The attention input is ``gamma_in * x_hat`` with ``x_hat`` of unit RMS per
    element (RMSNorm); for such inputs ``E|W x|^2 = ||W diag(gamma_in)||_F^2``.
    """
    w = w_v.float() * gamma_in.float()[None, :]
    g = torch.linalg.matrix_norm(w.reshape(-1, head_size, w.shape[-1]), ord="fro")
    return float(g.square().mean().sqrt())


def qk_norm_key_scale(gamma_k: torch.Tensor) -> float:
    """Length of a key RMS-normalized per head and scaled by the gain ``gamma_k``: ``||gamma_k||_2``.

    W_K's norm does not bound such keys (the normalization divides it out);
    their length is set by the k_norm gain alone.
    """
    return float(gamma_k.float().norm())


def plan_bits(
    k_norms: list[float],
    v_norms: list[float],
    avg_bits: float,
    fixed_k: list[int | None] | None = None,
    min_k: int = BITS[0],
) -> list[tuple[int, int]]:
    """(K bits, V bits) per layer, average over all sides <= ``avg_bits``, greedy on the error model.

    ``fixed_k[i]``: layer ``i``'s key bits are set (not chosen from norms); they
    count against the budget like any other side.  ``min_k``: keys start at this
    many bits and only go up.
    """
    n = len(k_norms)
    if len(v_norms) != n or n == 0:
        raise ValueError("need one K and one V norm per layer")
    if not BITS[0] <= avg_bits <= BITS[-1]:
        raise ValueError(f"average bits must be in [{BITS[0]}, {BITS[-1]}], got {avg_bits}")
    fixed_k = fixed_k or [None] * n
    norms = [float(x) for x in k_norms] + [float(x) for x in v_norms]
    bits = [f or min_k for f in fixed_k] + [BITS[0]] * n
    frozen = {i for i, f in enumerate(fixed_k) if f is not None}
    budget = round(avg_bits * 2 * n)
    used = sum(bits)
    if used > budget:
        raise ValueError(f"the fixed key bits alone exceed the budget of {avg_bits} bits on average")
    while True:
        best, best_gain = None, 0.0
        for i, b in enumerate(bits):
            if b == BITS[-1] or i in frozen:
                continue
            nb = BITS[BITS.index(b) + 1]
            if used + nb - b > budget:
                continue
            gain = norms[i] ** 2 * (2.0 ** (-2 * b) - 2.0 ** (-2 * nb)) / (nb - b)
            if gain > best_gain:
                best, best_gain = i, gain
        if best is None:
            break
        nb = BITS[BITS.index(bits[best]) + 1]
        used += nb - bits[best]
        bits[best] = nb
    return list(zip(bits[:n], bits[n:]))


# The order in which kvmix-auto upgrades sides, measured through vLLM on SmolLM2-135M and
# Gemma-3-270M (benchmarks/results/quality.md, quality-auto.md; KL per token, uniform formats):
# keys 2 -> 4 is worth 0.26 / 0.14 (k2v4 -> k4v4), values 2 -> 4 0.027 / 0.024 (k4v2 -> k4v4),
# keys 4 -> 8 0.0055 / 0.0032 (k4v4 -> k8v4), values 4 -> 8 0.0012 / 0.0006 (k4v4 -> k4v8):
# each kind is worth 4-10x the next one per bit, on both models, while the layers' norms
# differ by less than that (SmolLM2's W_K spectral norms: 7.9-14 except layer 0's 55).
TIERS = (("k", 2, 4), ("v", 2, 4), ("k", 4, 8), ("v", 4, 8))


def plan_tiers(k_norms: list[float], v_norms: list[float], avg_bits: float) -> list[tuple[int, int]]:
    """(K bits, V bits) per layer: upgrades in :data:`TIERS` order, larger norm first within a tier.

    kvmix-auto's default.  The paper's error model (:func:`plan_bits`) lets a
    large norm buy an upgrade of a later tier before every layer has had the
    earlier one; measured, that loses (SmolLM2, 4 bits: layer 0's keys to 8 bits
    for two layers' values at 2: +0.70% perplexity vs uniform k4v4's +0.34%; 3 bits:
    2-bit keys in 7 layers, +7.0% vs k4v2's +3.2%).  Here the norms decide which
    layers get an upgrade when the budget covers only some of them.
    """
    n = len(k_norms)
    if len(v_norms) != n or n == 0:
        raise ValueError("need one K and one V norm per layer")
    if not BITS[0] <= avg_bits <= BITS[-1]:
        raise ValueError(f"average bits must be in [{BITS[0]}, {BITS[-1]}], got {avg_bits}")
    budget = round(avg_bits * 2 * n)
    bits = {"k": [BITS[0]] * n, "v": [BITS[0]] * n}
    norms = {"k": [float(x) for x in k_norms], "v": [float(x) for x in v_norms]}
    used = 2 * BITS[0] * n
    for side, frm, to in TIERS:
        for i in sorted(range(n), key=lambda i: -norms[side][i]):
            if bits[side][i] == frm and used + to - frm <= budget:
                bits[side][i] = to
                used += to - frm
    return list(zip(bits["k"], bits["v"]))


def tier_rank(pair: tuple[int, int]) -> tuple[int, ...]:
    """How far up :data:`TIERS` a (K, V) pair is (larger is preferred at equal bytes)."""
    k, v = pair
    return (min(k, 4), min(v, 4), k, v)


def even_pairs(avg_bits: int) -> list[tuple[int, int]]:
    """The (K, V) bit pairs of exactly ``avg_bits`` on average: one page size for every layer."""
    return [(k, v) for k in BITS for v in BITS if k + v == 2 * avg_bits]


def plan_even(avg_bits: int) -> tuple[int, int]:
    """The equal-byte pair kvmix-auto gives every layer when vLLM needs one page size.

    Among the (K, V) pairs of exactly ``avg_bits`` (:func:`even_pairs`: k4v2 /
    k2v4, k8v2 / k2v8, k8v4 / k4v8), the one furthest up :data:`TIERS` -- so the
    K-first uniform split.  Measured on SmolLM2 (8 windows), choosing per layer
    by norms among the equal-byte pairs did not beat it: 6 bits, k8v4 / k4v8 by
    the norms +0.26% perplexity vs uniform k8v4 +0.15%.
    """
    pairs = even_pairs(avg_bits)
    if not pairs:
        raise ValueError(f"no (K, V) pair from {BITS} averages {avg_bits} bits")
    return max(pairs, key=tier_rank)


def uniform_split(avg_bits: int) -> tuple[int, int]:
    """The uniform page format of a budget, keys first: b3 -> k4v2, b4 -> k4v4, b5 -> k8v2, b6 -> k8v4."""
    return max(even_pairs(avg_bits))


def plan_error(k_norms, v_norms, plan) -> float:
    """The error model's total for a plan (what :func:`plan_bits` minimizes greedily)."""
    return sum(
        kn**2 * 2.0 ** (-2 * kb) + vn**2 * 2.0 ** (-2 * vb)
        for kn, vn, (kb, vb) in zip(k_norms, v_norms, plan)
    )


VAR, EVEN = "var", "even"  # per-layer page sizes / one page size for every layer


def plan_mode(layer_windows: list, hybrid_manager_disabled: bool = False) -> str:
    """:data:`VAR` where vLLM keeps all layers in one KV-cache group, else :data:`EVEN`.

    One group: every layer has the same attention window (``None``: full attention), or vLLM's hybrid
    KV-cache manager is disabled (sliding-window layers then keep full-attention blocks).  Used by the
    engine (:func:`vllm_kvmix.vllm.autoplan.choose_mode`) and ``kvmix inspect``.
    """
    return VAR if len(set(layer_windows)) <= 1 or hybrid_manager_disabled else EVEN


def plan_layers(k_spectral: list[float], v_spectral: list[float], k_gain: list[float | None], avg_bits: int,
                mode: str = VAR) -> list[tuple[int, int]]:
    """kvmix-auto's plan, (K bits, V bits) per layer: the one function the engine
    (:mod:`vllm_kvmix.vllm.autoplan`) and ``kvmix inspect`` both call.

    ``k_gain[i]``: the length of layer ``i``'s k_norm gain where keys are RMS-normalized after
    W_K (Gemma-3, Qwen3), else None; such a layer's keys rank by the gain, not by W_K's norm.
    ``mode``: :data:`VAR` (:func:`plan_tiers` over the norms) or :data:`EVEN` (:func:`plan_even`
    on every layer: vLLM needs one page size, e.g. hybrid sliding-window models).
    """
    if mode == EVEN:
        return [plan_even(avg_bits)] * len(k_spectral)
    if mode != VAR:
        raise ValueError(f"kvmix-auto mode must be {VAR!r} or {EVEN!r}, got {mode!r}")
    k_rank = [k if g is None else g for k, g in zip(k_spectral, k_gain)]
    return plan_tiers(k_rank, v_spectral, avg_bits)
