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


def plan_bits(k_norms: list[float], v_norms: list[float], avg_bits: float) -> list[tuple[int, int]]:
    """(K bits, V bits) per layer, average over all sides <= ``avg_bits``, greedy on the error model."""
    n = len(k_norms)
    if len(v_norms) != n or n == 0:
        raise ValueError("need one K and one V norm per layer")
    if not BITS[0] <= avg_bits <= BITS[-1]:
        raise ValueError(f"average bits must be in [{BITS[0]}, {BITS[-1]}], got {avg_bits}")
    norms = [float(x) for x in k_norms] + [float(x) for x in v_norms]
    bits = [BITS[0]] * (2 * n)
    budget = round(avg_bits * 2 * n)
    used = sum(bits)
    while True:
        best, best_gain = None, 0.0
        for i, b in enumerate(bits):
            if b == BITS[-1]:
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


def plan_error(k_norms, v_norms, plan) -> float:
    """The error model's total for a plan (what :func:`plan_bits` minimizes greedily)."""
    return sum(
        kn**2 * 2.0 ** (-2 * kb) + vn**2 * 2.0 ** (-2 * vb)
        for kn, vn, (kb, vb) in zip(k_norms, v_norms, plan)
    )
