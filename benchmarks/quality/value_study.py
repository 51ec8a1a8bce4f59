"""Where the KV error of a real model comes from: attention-output error of key and value quantization variants.

One forward pass of the model (transformers, bf16, CPU) over text windows records every layer's queries, keys
and values after RoPE.  Then, per layer, the exact causal attention output O is compared with the output when
only the values (or only the keys) go through a quantizer, as the page scheme serves them: a query reads the
pages before its own at the format's bits and its own page from the 8-bit staging copy.  The error of a layer is
``||O' - O|| / ||O||`` over all heads and positions; the table gives its mean over layers and the worst layer.

    python benchmarks/quality/value_study.py --model qwen2.5-coder-1.5b --windows 1 --tokens 2048

Variants (values; the same bytes as the served format unless the row says otherwise):
  served          Hadamard-rotated, per token in 64-channel groups, fp16 scale + minimum, from the 8-bit copy
  no-rotation     as served without the Hadamard rotation
  direct          as served, quantized from the values themselves instead of the 8-bit copy
  clip-mse        as served, each group's range shrunk to the one of 16 clip ratios (1.0 .. 0.7) with least MSE
  sink-exact      as served, token 0 (the attention sink) kept exact (a few bytes per sequence)
  sink-exact + clip-mse   both
  group-32        32-channel groups (more metadata: +0.5 bit/element at fp16 scale + minimum)
  bias-removed    v_proj's bias (a weight) subtracted before quantizing and added to the output (attention
                  weights sum to 1, so this is exact without quantization); also with clip-mse
  mean-removed    the window's own per-channel mean of each head's values instead (not weight-only: a bound)
  own page exact  as served, the query's own page exact instead of its 8-bit staging copy
and keys: served (per channel over the 64-token page, from the 8-bit copy in 16-channel groups), sink-exact, and
own page exact.

Also prints the share of attention that lands on token 0 and the norm of its value against the others'.
Writes ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from vllm_kvmix.formats import PAGE_TOKENS as P  # noqa: E402
from vllm_kvmix.formats import stage_layout  # noqa: E402
from vllm_kvmix.quant import dequantize, dequantize_channels, hadamard, quantize, quantize_channels  # noqa: E402

CLIPS = torch.linspace(1.0, 0.7, 16)


def q_tokens(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Per-token groups: the reference quantizer, dequantized."""
    codes, meta = quantize(x, bits, group)
    return dequantize(codes, meta, group)


def q_tokens_clipped(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Per-token groups with each group's [min, max] shrunk about its centre to the clip ratio of least MSE."""
    *lead, d = x.shape
    xg = x.float().reshape(*lead, d // group, group)
    mn, mx = xg.amin(-1, keepdim=True), xg.amax(-1, keepdim=True)
    mid, half = (mn + mx) / 2, (mx - mn) / 2
    levels = (1 << bits) - 1
    best, best_err = None, None
    for c in CLIPS:
        lo = mid - half * c
        scale = (2 * half * c / levels).clamp(min=1e-12)
        deq = (torch.floor((xg - lo) / scale + 0.5).clamp(0, levels) * scale + lo).half().float()
        err = (deq - xg).pow(2).sum(-1, keepdim=True)
        if best is None:
            best, best_err = deq, err
        else:
            take = err < best_err
            best = torch.where(take, deq, best)
            best_err = torch.where(take, err, best_err)
    return best.reshape(*lead, d)


def q_keys_pages(k: torch.Tensor, bits: int) -> torch.Tensor:
    """Keys ``[H, T, D]`` per channel over 64-token pages, from the 8-bit copy (as served)."""
    h, t, d = k.shape
    k8 = q_tokens(k, 8, stage_layout(d).k.group)
    n = t // P
    pages = k8[:, : n * P].reshape(h, n, P, d)
    codes, meta = quantize_channels(pages, bits)
    out = k8.clone()
    out[:, : n * P] = dequantize_channels(codes, meta).reshape(h, n * P, d)
    return out


def attention_parts(q: torch.Tensor, k_old: torch.Tensor, k_own: torch.Tensor, groups: int):
    """Causal attention weights ``[Hq, T, T]`` of one softmax over the earlier pages' keys ``k_old`` and the query's
    own page's keys ``k_own``, split into those two parts."""
    t = q.shape[1]
    pos = torch.arange(t)
    own = (pos[None, :] // P) == (pos[:, None] // P)
    scores = lambda k: q @ k.repeat_interleave(groups, 0).transpose(-1, -2) / q.shape[-1] ** 0.5  # noqa: E731
    s = torch.where(own, scores(k_own), scores(k_old)).masked_fill(pos[None, :] > pos[:, None], float("-inf"))
    a = torch.softmax(s, -1)
    return a * ~own, a * own


def run_layer(q, k, v, fmt_bits, rot, v_bias=None):
    """Errors of the variants for one layer: ``q [Hq, T, D]``, ``k, v [Hkv, T, D]`` (fp32); ``v_bias [Hkv, D]``:
    v_proj's bias per KV head, if the model has one."""
    groups = q.shape[0] // k.shape[0]
    a_old, a_own = attention_parts(q, k, k, groups)
    a = a_old + a_own
    rep = lambda x: x.repeat_interleave(groups, 0)  # noqa: E731
    o = a @ rep(v)
    norm = o.norm()
    out = {"sink_attention": a[:, 1:, 0].mean().item(),
           "sink_value_norm_ratio": (v[:, 0].norm(dim=-1) / v[:, 1:].norm(dim=-1).mean(-1)).mean().item()}
    vr = v @ rot  # rotated values (H symmetric: x @ H, back with @ H)
    v8r, v8, k8 = q_tokens(vr, 8, 64), q_tokens(v, 8, 64), q_tokens(k, 8, stage_layout(k.shape[-1]).k.group)
    eye = torch.eye(v.shape[-1])
    for bits in fmt_bits:
        def err_v(v_low_rot, own_rot=v8r, back=rot):
            o2 = a_old @ rep(v_low_rot @ back) + a_own @ rep(own_rot @ back)
            return ((o2 - o).norm() / norm).item()

        served = q_tokens(v8r, bits, 64)
        out[f"v{bits} served"] = err_v(served)
        out[f"v{bits} no-rotation"] = err_v(q_tokens(v8, bits, 64), own_rot=v8, back=eye)
        out[f"v{bits} direct"] = err_v(q_tokens(vr, bits, 64))
        out[f"v{bits} own page exact"] = err_v(served, own_rot=vr)
        clipped = q_tokens_clipped(v8r, bits, 64)
        out[f"v{bits} clip-mse"] = err_v(clipped)
        sink = served.clone()
        sink[:, 0] = vr[:, 0]
        out[f"v{bits} sink-exact"] = err_v(sink)
        both = clipped.clone()
        both[:, 0] = vr[:, 0]
        out[f"v{bits} sink-exact + clip-mse"] = err_v(both)
        out[f"v{bits} group-32"] = err_v(q_tokens(v8r, bits, 32))
        offsets = {"mean-removed": v.mean(1)}
        if v_bias is not None:
            offsets["bias-removed"] = v_bias
        for name, off in offsets.items():  # quantize v - off, add off back to the output (sum of weights = 1)
            cr = (v - off[:, None]) @ rot
            c8r = q_tokens(cr, 8, 64)
            for tag, low in (("", q_tokens(c8r, bits, 64)), (" + clip-mse", q_tokens_clipped(c8r, bits, 64))):
                o2 = a_old @ rep(low @ rot) + a_own @ rep(c8r @ rot) + rep(off)[:, None]
                out[f"v{bits} {name}{tag}"] = ((o2 - o).norm() / norm).item()
        # keys (values exact): the attention weights change; the own page from the 8-bit copy
        kq = q_keys_pages(k, bits)
        k_sink = kq.clone()
        k_sink[:, 0] = k[:, 0]
        for name, k_old, k_own in (("served", kq, k8), ("sink-exact", k_sink, k8), ("own page exact", kq, k)):
            o2 = sum(attention_parts(q, k_old, k_own, groups)) @ rep(v)
            out[f"k{bits} {name}"] = ((o2 - o).norm() / norm).item()
    return out


def capture(model_dir: str, windows: list[list[int]]):
    """Per window and layer: (q [Hq, T, D], k [Hkv, T, D], v [Hkv, T, D]) after RoPE, fp32."""
    from transformers import AutoModelForCausalLM
    from transformers.models.qwen2 import modeling_qwen2 as mq

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    model.eval()
    cfg = model.config
    hq, hkv = cfg.num_attention_heads, cfg.num_key_value_heads
    d = getattr(cfg, "head_dim", None) or cfg.hidden_size // hq
    layers = model.model.layers
    seen: list[dict] = []

    def pre_hook(i):
        def hook(module, args, kwargs):
            h = kwargs.get("hidden_states", args[0] if args else None)
            cos, sin = kwargs["position_embeddings"]
            t = h.shape[1]
            q = module.q_proj(h).view(1, t, hq, d).transpose(1, 2)
            k = module.k_proj(h).view(1, t, hkv, d).transpose(1, 2)
            v = module.v_proj(h).view(1, t, hkv, d).transpose(1, 2)
            q, k = mq.apply_rotary_pos_emb(q, k, cos, sin)
            b = module.v_proj.bias
            seen[-1][i] = (q[0].float(), k[0].float(), v[0].float(),
                           None if b is None else b.float().view(hkv, d))
        return hook

    handles = [layer.self_attn.register_forward_pre_hook(pre_hook(i), with_kwargs=True)
               for i, layer in enumerate(layers)]
    with torch.no_grad():
        for w in windows:
            seen.append({})
            model(torch.tensor([w]), use_cache=False)
            yield seen.pop()
    for h in handles:
        h.remove()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--windows", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 2])
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/value-study"))
    args = ap.parse_args(argv)
    from harness import model_windows

    from benchmarks.provenance import key
    from tqdm import tqdm

    from vllm_kvmix.models import ensure_model

    torch.set_grad_enabled(False)
    model_dir = ensure_model(args.model)
    windows, _ = model_windows(model_dir, args.windows, args.tokens)
    t0 = time.time()
    per_layer: list[dict] = []
    for layers in capture(model_dir, windows):
        d = next(iter(layers.values()))[0].shape[-1]
        rot = hadamard(d)
        for i in tqdm(sorted(layers), desc="layers", unit="layer"):
            q, k, v, v_bias = layers[i]
            row = run_layer(q, k, v, args.bits, rot, v_bias)
            row["layer"] = i
            per_layer.append(row)
    names = [n for n in per_layer[0] if n not in ("layer",)]
    summary = {}
    for n in names:
        vals = [r[n] for r in per_layer]
        worst = max(range(len(vals)), key=lambda j: vals[j])
        summary[n] = {"mean": sum(vals) / len(vals), "max": vals[worst], "max_layer": per_layer[worst]["layer"]}
    result = dict(model=args.model, windows=args.windows, tokens=args.tokens, seconds=round(time.time() - t0, 1),
                  summary=summary, per_layer=per_layer, **key())
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    (out.parent / (out.name + ".json")).write_text(json.dumps(result, indent=1))
    lines = [f"### {args.model}: attention-output error by variant ({args.windows} x {args.tokens} tokens, "
             f"commit {result.get('commit', '?')})", "",
             "| variant | mean over layers | worst layer |", "|---|---|---|"]
    for n in names:
        s = summary[n]
        lines.append(f"| {n} | {s['mean']:.4f} | {s['max']:.4f} (layer {s['max_layer']}) |")
    (out.parent / (out.name + ".md")).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
