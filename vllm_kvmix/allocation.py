"""Per-layer K/V bit allocation from weight norms (the paper's second half).

Error model: quantizing a side (keys or values of one layer) to ``b`` bits
costs ``norm**2 * 2**(-2 b)``, where ``norm`` is the spectral norm of that
layer's W_K or W_V (it bounds how large the keys / values can get).  Under a
budget of average bits per element, start every side at the fewest bits and
repeatedly take the upgrade (2 -> 4, 4 -> 8) with the largest error reduction
per added bit until the next one no longer fits.

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
    min_v: int = BITS[0],
) -> list[tuple[int, int]]:
    """(K bits, V bits) per layer, average over all sides <= ``avg_bits``, greedy on the error model.

    ``fixed_k[i]``: layer ``i``'s key bits are set (not chosen from norms); they
    count against the budget like any other side.  ``min_k`` / ``min_v``: keys /
    values start at this many bits (:func:`floors`) and only go up.
    """
    n = len(k_norms)
    if len(v_norms) != n or n == 0:
        raise ValueError("need one K and one V norm per layer")
    if not BITS[0] <= avg_bits <= BITS[-1]:
        raise ValueError(f"average bits must be in [{BITS[0]}, {BITS[-1]}], got {avg_bits}")
    fixed_k = fixed_k or [None] * n
    norms = [float(x) for x in k_norms] + [float(x) for x in v_norms]
    bits = [f or min_k for f in fixed_k] + [min_v] * n
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


def floors(avg_bits: float) -> tuple[int, int]:
    """Fewest (key, value) bits kvmix-auto gives a layer; the norms only decide upgrades above them.

    Keys: 4 whenever the budget affords k4v2 everywhere (:func:`key_floor`).
    Values: 4 whenever it affords k4v4 everywhere.  Measured on SmolLM2-135M
    (8 windows, benchmarks/results/quality-auto.md): with values allowed down to
    2 bits at a 4-bit budget the spectral plan traded layer 0's values (its
    smallest W_V norm) and one more layer's for 8-bit keys in layer 0, and lost
    to uniform k4v4 (+0.70% vs +0.34% perplexity); uniform k4v2 -> k4v4 is worth
    2.8 points, k4v4 -> k8v4 0.2, far more than the norms' ratios predict.
    """
    return key_floor(avg_bits), (4 if avg_bits >= 4 else BITS[0])


def key_floor(avg_bits: float) -> int:
    """Fewest key bits kvmix-auto gives a layer: 4 whenever the budget affords k4v2 everywhere.

    The error model ``norm^2 * 2^-2b`` treats a 2-bit key like a 2-bit value of
    the same norm; measured through vLLM they are not: uniform k2v4 is +28.5% /
    +17.2% perplexity on SmolLM2 / Gemma-3 against k4v2's +3.2% / +3.4% at the same
    bytes (benchmarks/results/quality.md), while the spectral ratios of those
    layers (~1-3) predict a factor of 1-9 between the two.  A key error moves
    every softmax weight of the row; a value error moves one summand.
    """
    return 4 if avg_bits >= 3 else BITS[0]


def even_pairs(avg_bits: int) -> list[tuple[int, int]]:
    """The (K, V) bit pairs of exactly ``avg_bits`` on average: one page size for every layer."""
    return [(k, v) for k in BITS for v in BITS if k + v == 2 * avg_bits]


def plan_even(
    k_norms: list[float],
    v_norms: list[float],
    avg_bits: int,
    fixed_k: list[int | None] | None = None,
    min_k: int = BITS[0],
    min_v: int = BITS[0],
) -> list[tuple[int, int]]:
    """Per layer the pair of :func:`even_pairs` with the least modelled error (constant bytes per layer).

    Keys get at least ``min_k`` bits where such a pair exists; ``fixed_k[i]``
    pins layer ``i``'s keys where a pair allows it, else the K-favoured pair.

    For models whose KV-cache manager needs one page size for all layers
    (vLLM's hybrid manager: sliding-window + full attention).  Exact, no greedy:
    layers do not compete for bits.
    """
    pairs = even_pairs(avg_bits)
    if not pairs:
        raise ValueError(f"no (K, V) pair from {BITS} averages {avg_bits} bits")
    fixed_k = fixed_k or [None] * len(k_norms)
    plan = []
    for kn, vn, fk in zip(k_norms, v_norms, fixed_k):
        options = [p for p in pairs if p[0] >= min_k and p[1] >= min_v] or [p for p in pairs if p[0] >= min_k] or pairs
        if fk is not None:
            options = [p for p in options if p[0] == fk] or [max(options)]
        plan.append(min(options, key=lambda p: (kn**2 * 2.0 ** (-2 * p[0]) + vn**2 * 2.0 ** (-2 * p[1]), -p[0])))
    return plan


def uniform_split(avg_bits: int) -> tuple[int, int]:
    """The uniform page format of a budget, keys first: b3 -> k4v2, b4 -> k4v4, b5 -> k8v2, b6 -> k8v4."""
    return max(even_pairs(avg_bits))


def plan_error(k_norms, v_norms, plan) -> float:
    """The error model's total for a plan (what :func:`plan_bits` minimizes greedily)."""
    return sum(
        kn**2 * 2.0 ** (-2 * kb) + vn**2 * 2.0 ** (-2 * vb)
        for kn, vn, (kb, vb) in zip(k_norms, v_norms, plan)
    )
