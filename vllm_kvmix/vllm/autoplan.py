"""``kvmix-auto``: each layer's page format from the loaded weights, before vLLM sizes the cache.

Runs in every worker from the model runner's ``get_kv_cache_spec`` (hooked by the
version layer, :mod:`vllm_kvmix.vllm.versions`): weights are loaded, no spec exists yet.  For
each attention layer with a ``kvmix-auto[-bB]`` placeholder it

1. takes W_K and W_V from the layer's fused QKV projection (or separate
   k_proj / v_proj), per KV-head group, and computes their spectral and
   Frobenius norms; under tensor parallelism the per-rank values are reduced
   (max / sum of squares) so every rank plans from the layer's norms, not its
   shard's;
2. chooses (K bits, V bits) per layer (:mod:`vllm_kvmix.allocation`):
   ``var`` mode (every layer its own page size; vLLM 0.26 keeps per-layer page
   sizes in one KV-cache group when all layers are one attention type) or
   ``even`` mode (one page size, per layer the best of the equal-byte pairs, e.g.
   k4v2 / k2v4; for hybrid sliding-window + full-attention models, whose
   KV-cache manager needs one page size);
3. upgrades kinds of sides in a measured order -- keys to 4 bits, values to 4,
   keys to 8, values to 8 (:data:`vllm_kvmix.allocation.TIERS`) -- and within a
   kind the layers with the larger norm first.  Layers that RMS-normalize keys
   after the projection (a ``k_norm`` module: Gemma-3, Qwen3) rank their keys by
   the k_norm gain's length instead of W_K's norm: the normalization divides
   W_K's scale out (``benchmarks/quality/norm_rule.py``: on Gemma-3-270M the
   spectral rule's K/V ratio correlates -0.53 with the measured one, and the
   gain's length tracks the measured key length);
4. sets the layer's ``kv_cache_dtype``, backend class and impl format to the
   concrete ``kvmix-kXvY`` and logs the plan as a table.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vllm_kvmix import allocation
from vllm_kvmix.allocation import EVEN, VAR, group_norms, qk_norm_key_scale, uniform_split
from vllm_kvmix.formats import AutoFormat, KVFormat, is_auto, parse_any

# The plan of the last resolve() in this process: [(layer name, K bits, V bits)] (a record for
# benchmarks/quality and tests; nothing reads it back).
LAST_PLAN: list[tuple[str, int, int]] | None = None


@dataclass
class LayerRow:
    name: str
    k_spectral: float
    v_spectral: float
    k_frobenius: float
    v_frobenius: float
    qk_norm: bool
    k_gain: float | None = None  # length of the k_norm gain (q/k-norm layers)
    k_bits: int = 0
    v_bits: int = 0


def _log(line: str) -> None:
    from vllm.logger import init_logger

    init_logger("vllm.kvmix").info(line)


def auto_layers(vllm_config) -> dict:
    from vllm.config import get_layers_from_vllm_config
    from vllm.model_executor.layers.attention.attention import Attention

    layers = get_layers_from_vllm_config(vllm_config, Attention)
    return {n: layer for n, layer in layers.items() if is_auto(layer.kv_cache_dtype)}


def kv_group_norms(module, name: str, head_size: int) -> tuple[torch.Tensor, ...]:
    """Per KV-head group on this rank: spectral and Frobenius norms of W_K and W_V.

    ``module``: a fused QKV projection (``num_heads`` / ``num_kv_heads``
    attributes).  Norms stashed by :func:`stash_kv_norms` (before vLLM's CPU
    backend repacks the weight and empties ``weight``) take precedence.
    """
    stashed = getattr(module, "_kvmix_kv_norms", None)
    if stashed is not None:
        return stashed
    w = _plain_weight(module, name)
    q = module.num_heads * module.head_size
    kv = module.num_kv_heads * head_size
    ks, kf = group_norms(w[q : q + kv], head_size)
    vs, vf = group_norms(w[q + kv : q + 2 * kv], head_size)
    return ks, kf, vs, vf


def stash_kv_norms(module) -> None:
    """Keep a QKV projection's per-group K/V norms on the module (called before its weight is repacked)."""
    if getattr(module, "_kvmix_kv_norms", None) is None:
        module._kvmix_kv_norms = kv_group_norms(module, type(module).__name__, module.head_size)


def layer_kv_norms(model: torch.nn.Module, layer_name: str, layer) -> tuple[tuple[torch.Tensor, ...], int, object]:
    """This rank's per-group (ks, kf, vs, vf), the KV-head replication factor, and the k_norm module."""
    parent_name = layer_name.rsplit(".", 1)[0]
    try:
        parent = model.get_submodule(parent_name)
    except AttributeError as e:
        raise NotImplementedError(f"kvmix-auto: cannot find the attention module {parent_name!r} of {layer_name}") from e
    k_norm = getattr(parent, "k_norm", None)
    hs = layer.head_size
    qkv = getattr(parent, "qkv_proj", None)
    if qkv is not None:
        return kv_group_norms(qkv, parent_name + ".qkv_proj", hs), getattr(qkv, "num_kv_head_replicas", 1), k_norm
    k_proj, v_proj = getattr(parent, "k_proj", None), getattr(parent, "v_proj", None)
    if k_proj is None or v_proj is None:
        raise NotImplementedError(
            f"kvmix-auto: {parent_name} has neither qkv_proj nor k_proj/v_proj; use a uniform kvmix-kXvY format"
        )
    ks, kf = group_norms(_plain_weight(k_proj, parent_name + ".k_proj"), hs)
    vs, vf = group_norms(_plain_weight(v_proj, parent_name + ".v_proj"), hs)
    return (ks, kf, vs, vf), getattr(k_proj, "num_kv_head_replicas", 1), k_norm


def _plain_weight(module, name: str) -> torch.Tensor:
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dtype not in (torch.float16, torch.bfloat16, torch.float32) or w.ndim != 2:
        raise NotImplementedError(
            f"kvmix-auto reads W_K / W_V norms from unquantized weights; {name}.weight is "
            f"{None if w is None else (w.dtype, tuple(w.shape))}. Use a uniform kvmix-kXvY format"
        )
    return w.detach()


def _reduce(t: torch.Tensor, op: str) -> torch.Tensor:
    """All-reduce over the tensor-parallel group (identity on one rank)."""
    from vllm.distributed.parallel_state import get_tp_group

    tp = get_tp_group()
    if tp.world_size == 1:
        return t
    import torch.distributed as dist

    out = t.detach().float().cpu().clone()
    dist.all_reduce(out, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM, group=tp.cpu_group)
    return out


def layer_rows(model, layers: dict, reduce=_reduce) -> list[LayerRow]:
    """Norms of every auto layer, reduced across tensor-parallel ranks (``reduce(t, "max"|"sum")``)."""
    spec_k, spec_v, fro_k, fro_v, qk, gains = [], [], [], [], [], []
    for name, layer in layers.items():
        (ks, kf, vs, vf), replicas, k_norm = layer_kv_norms(model, name, layer)
        spec_k.append(ks.max())
        spec_v.append(vs.max())
        # a KV head replicated on r ranks is counted r times by the sum
        fro_k.append(kf.square().sum() / replicas)
        fro_v.append(vf.square().sum() / replicas)
        qk.append(k_norm is not None)
        gains.append(None if k_norm is None else qk_norm_key_scale(k_norm_gain(k_norm)))
    sk = reduce(torch.stack(spec_k).float().cpu(), "max")
    sv = reduce(torch.stack(spec_v).float().cpu(), "max")
    fk = reduce(torch.stack(fro_k).float().cpu(), "sum").sqrt()
    fv = reduce(torch.stack(fro_v).float().cpu(), "sum").sqrt()
    return [
        LayerRow(n, float(a), float(b), float(c), float(d), q, g)
        for n, a, b, c, d, q, g in zip(layers, sk, sv, fk, fv, qk, gains)
    ]


def k_norm_gain(module) -> torch.Tensor:
    """The per-channel gain a k_norm module applies (Gemma's RMSNorm scales by ``1 + weight``)."""
    w = module.weight.detach().float()
    return w + 1.0 if "Gemma" in type(module).__name__ else w


def choose_mode(layers: dict, vllm_config) -> str:
    """``var`` (per-layer page sizes) when vLLM keeps all layers in one KV-cache group, else ``even``
    (:func:`vllm_kvmix.allocation.plan_mode`)."""
    return allocation.plan_mode([layer.sliding_window for layer in layers.values()],
                                vllm_config.scheduler_config.disable_hybrid_kv_cache_manager)


def plan_rows(rows: list[LayerRow], auto: AutoFormat, mode: str) -> None:
    """Set each row's bits from :func:`vllm_kvmix.allocation.plan_layers` (what ``kvmix inspect`` prints)."""
    plan = allocation.plan_layers([r.k_spectral for r in rows], [r.v_spectral for r in rows],
                                  [r.k_gain if r.qk_norm else None for r in rows], auto.avg_bits, mode)
    if len(plan) != len(rows):
        raise ValueError(f"kvmix-auto: a plan of {len(plan)} layers for {len(rows)}")
    for r, (kb, vb) in zip(rows, plan):
        r.k_bits, r.v_bits = kb, vb


def plan_table(rows: list[LayerRow], auto: AutoFormat, mode: str, head_size: int) -> list[str]:
    qk = any(r.qk_norm for r in rows)
    if mode == EVEN:
        how = "the K-first equal-byte pair on every layer"
    else:
        how = "upgrades K->4, V->4, K->8, V->8 in turn, larger spectral norm first"
    lines = [
        f"kvmix: {auto.name}: {auto.avg_bits} bits/element on average over K and V, {len(rows)} layers, "
        f"{'per-layer page sizes' if mode == VAR else 'one page size (hybrid KV-cache manager)'}; rule: {how}",
    ]
    if qk and mode == VAR:
        lines.append(
            "kvmix: layers with k_norm (keys RMS-normalized after W_K): keys ranked by the k_norm gain's "
            "length, not W_K's norm (the normalization divides W_K's scale out)"
        )
    lines.append("kvmix: layer | W_K spectral | W_V spectral | W_K Frobenius | W_V Frobenius | k_norm gain | format")
    for r in rows:
        gain = "-" if r.k_gain is None else f"{r.k_gain:.3g}"
        lines.append(
            f"kvmix: {r.name} | {r.k_spectral:.3g} | {r.v_spectral:.3g} | {r.k_frobenius:.3g} | "
            f"{r.v_frobenius:.3g} | {gain} | {KVFormat(r.k_bits, r.v_bits).name}"
        )
    uk, uv = uniform_split(auto.avg_bits)
    total = sum(KVFormat(r.k_bits, r.v_bits).bytes_per_token_head(head_size) for r in rows)
    uniform = len(rows) * KVFormat(uk, uv).bytes_per_token_head(head_size)
    lines.append(f"kvmix: bytes/token/KV head over all layers {total} (uniform k{uk}v{uv}: {uniform})")
    return lines


def resolve(runner) -> list[LayerRow] | None:
    """Assign every ``kvmix-auto`` layer its concrete format (idempotent); None if there is none."""
    layers = auto_layers(runner.vllm_config)
    if not layers:
        return None
    pp = runner.vllm_config.parallel_config.pipeline_parallel_size
    if pp > 1:
        raise NotImplementedError("kvmix-auto plans over all layers; pipeline parallelism is not supported")
    autos = {parse_any(layer.kv_cache_dtype) for layer in layers.values()}
    if len(autos) != 1:
        raise ValueError(f"kvmix-auto: one budget per model, got {sorted(a.name for a in autos)}")
    auto = autos.pop()
    mode = choose_mode(layers, runner.vllm_config)
    rows = layer_rows(runner.get_model(), layers)
    plan_rows(rows, auto, mode)
    head_sizes = {layer.head_size for layer in layers.values()}
    for line in plan_table(rows, auto, mode, max(head_sizes)):
        _log(line)
    global LAST_PLAN
    LAST_PLAN = [(r.name, r.k_bits, r.v_bits) for r in rows]
    page_format = KVFormat(*uniform_split(auto.avg_bits)).name if mode == EVEN else None
    for r, layer in zip(rows, layers.values()):
        assign(layer, KVFormat(r.k_bits, r.v_bits), page_format)
    return rows


def assign(layer, fmt: KVFormat, page_format: str | None = None) -> None:
    """Make an ``Attention`` layer a ``fmt`` layer: dtype name, backend class, impl format.

    ``page_format``: the format whose page size the layer's KV-cache spec
    reports (even mode: every layer reports the same, so vLLM sees one spec).
    The backend class is the page format's (it reports the page; vLLM groups
    layers by it), the impl runs the layer's own format.
    """
    from vllm_kvmix.formats import parse_format
    from vllm_kvmix.vllm.backend import backend_class

    fmt.check_head_size(layer.head_size)
    layer.kv_cache_dtype = fmt.name
    layer.kvmix_page_format = page_format or fmt.name
    layer.attn_backend = backend_class(parse_format(layer.kvmix_page_format))
    layer.impl.fmt = fmt
    layer.impl.kv_cache_dtype = fmt.name
