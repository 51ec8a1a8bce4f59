"""``kvmix inspect MODEL_DIR``: per-layer W_K / W_V norms and the bits they earn, without vLLM.

Reads a local safetensors model directory (Llama-style ``k_proj`` / ``v_proj``
weights), computes each layer's spectral and Frobenius norms of W_K and W_V
(:mod:`vllm_kvmix.allocation`), plans (K bits, V bits) per layer for an
average-bits budget and prints a table; ``--plot`` writes a PNG.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from vllm_kvmix.allocation import EVEN, LayerNorms, layer_norms, plan_layers, plan_mode, qk_norm_key_scale
from vllm_kvmix.formats import AUTO_BITS, AUTO_DEFAULT_BITS, BF16_BYTES, KVFormat

_KEY = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.([kv])_proj\.weight$")
_KNORM = re.compile(r"(?:^|\.)layers\.(\d+)\.self_attn\.k_norm\.weight$")


def read_norms(model_dir: str | Path) -> tuple[list[LayerNorms], dict]:
    from safetensors import safe_open

    model_dir = Path(model_dir)
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    head = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    weights: dict[int, dict[str, object]] = {}
    qk_norm: dict[int, object] = {}  # layer -> k_norm weight
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                m = _KEY.search(name)
                if m:
                    weights.setdefault(int(m.group(1)), {})[m.group(2)] = f.get_tensor(name)
                elif _KNORM.search(name):
                    qk_norm[int(_KNORM.search(name).group(1))] = f.get_tensor(name).float()
    if not weights:
        raise ValueError(f"{model_dir}: no layers.N.self_attn.k_proj/v_proj weights found")
    norms = [layer_norms(weights[i]["k"], weights[i]["v"], head) for i in sorted(weights)]
    types = cfg.get("layer_types") or [None] * len(norms)
    windows = [cfg.get("sliding_window") if t == "sliding_attention" else None for t in types]
    shape = {"head_size": head, "num_kv_heads": cfg["num_key_value_heads"], "num_layers": len(norms),
             "windows": windows,
             "qk_norm": [i in qk_norm for i in sorted(weights)],
             # Gemma's RMSNorm scales by 1 + weight
             "k_gain": [qk_norm_key_scale(qk_norm[i] + (1.0 if cfg.get("model_type", "").startswith("gemma") else 0.0))
                        if i in qk_norm else None for i in sorted(weights)]}
    return norms, shape


def plan(norms: list[LayerNorms], shape: dict, avg_bits: int, hybrid_manager_disabled: bool = False
         ) -> list[tuple[int, int]]:
    """The plan kvmix-auto-b{avg_bits} gives this model at startup: the engine's own mode and planning functions
    (``hybrid_manager_disabled``: vLLM's ``--disable-hybrid-kv-cache-manager``)."""
    mode = plan_mode(shape.get("windows") or [None], hybrid_manager_disabled)
    qk = shape.get("qk_norm") or [False] * len(norms)
    gains = shape.get("k_gain") or [None] * len(norms)
    return plan_layers([n.k_spectral for n in norms], [n.v_spectral for n in norms],
                       [g if q else None for q, g in zip(qk, gains)], avg_bits, mode)


def report(norms: list[LayerNorms], shape: dict, avg_bits: int, hybrid_manager_disabled: bool = False
           ) -> tuple[str, list[tuple[int, int]]]:
    qk = shape.get("qk_norm") or [False] * len(norms)
    plan_ = plan(norms, shape, avg_bits, hybrid_manager_disabled)
    even = plan_mode(shape.get("windows") or [None], hybrid_manager_disabled) == EVEN
    d, h = shape["head_size"], shape["num_kv_heads"]
    rows = [
        "| layer | W_K spectral | W_V spectral | W_K Frobenius | W_V Frobenius | K/V spectral | k_norm | K bits | V bits |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    total = 0
    for i, (n, (kb, vb)) in enumerate(zip(norms, plan_)):
        total += h * KVFormat(kb, vb).bytes_per_token_head(d)
        rows.append(
            f"| {i} | {n.k_spectral:.2f} | {n.v_spectral:.2f} | {n.k_frobenius:.2f} | {n.v_frobenius:.2f} | "
            f"{n.k_spectral / n.v_spectral:.2f} | {'yes' if qk[i] else 'no'} | {kb} | {vb} |"
        )
    bf16 = len(norms) * h * 2 * d * BF16_BYTES
    rows += [
        "",
        f"kvmix-auto-b{avg_bits}: {avg_bits} bits/element on average over K and V (codes; metadata adds 0.5): "
        f"{total} bytes/token vs bf16 {bf16} ({bf16 / total:.2f}x), "
        + ("one page size: sliding-window and full-attention layers are separate KV-cache groups in vLLM "
           "(--disable-hybrid-kv-cache-manager allows per-layer sizes)" if even else "per-layer page sizes"),
    ]
    return "\n".join(rows), plan_


def plot(norms: list[LayerNorms], plan: list[tuple[int, int]], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(len(norms)))
    fig, (a, b) = plt.subplots(2, 1, figsize=(9, 6), sharex=True)
    a.plot(x, [n.k_spectral for n in norms], "o-", label="W_K spectral")
    a.plot(x, [n.v_spectral for n in norms], "s-", label="W_V spectral")
    a.set_yscale("log")
    a.set_ylabel("norm")
    a.legend()
    a.set_title(title)
    a.grid(alpha=0.3)
    b.bar([i - 0.2 for i in x], [p[0] for p in plan], width=0.4, label="K bits")
    b.bar([i + 0.2 for i in x], [p[1] for p in plan], width=0.4, label="V bits")
    b.set_ylabel("bits")
    b.set_xlabel("layer")
    b.set_yticks([2, 4, 8])
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="kvmix inspect", description=__doc__.split("\n")[0])
    ap.add_argument("model", help="local safetensors model directory")
    ap.add_argument("--budget", type=int, default=AUTO_DEFAULT_BITS, choices=AUTO_BITS,
                    help="kvmix-auto-bB: average code bits per element over K and V (default 3: k4v2's bytes)")
    ap.add_argument("--disable-hybrid-kv-cache-manager", action="store_true",
                    help="plan as vLLM would with this option (per-layer page sizes on sliding-window models)")
    ap.add_argument("--plot", help="write a PNG of norms and bits by layer")
    args = ap.parse_args(argv)
    norms, shape = read_norms(args.model)
    text, plan = report(norms, shape, args.budget, args.disable_hybrid_kv_cache_manager)
    print(text)
    if args.plot:
        plot(norms, plan, args.plot, f"{Path(args.model).name}: budget {args.budget:g} bits")
        print(f"plot: {args.plot}")
    return 0
