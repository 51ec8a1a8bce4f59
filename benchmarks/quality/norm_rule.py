"""Data behind kvmix-auto's norm rules: do weight norms predict key/value magnitudes?

For each layer, measures the RMS length of the key and value vectors (one per
token and KV head, keys after q/k-norm where the model has one, before RoPE,
which preserves length) on real text, and compares the measured K/V ratio with
what each rule predicts:

* ``spectral``: sigma(W_K) / sigma(W_V) (the paper's rule; kvmix-auto's default)
* ``qk-norm``: for models that RMS-normalize keys after the projection,
  ||gamma_k||_2 / RMS_heads ||W_V diag(gamma_in)||_F (the typical lengths of both) --
  a normalized key's length is its gain vector's norm, whatever W_K is.

Prints a table and the Pearson correlation (over layers) of log predicted
vs log measured ratio for each rule.  Transformers, fp32, CPU.

    python benchmarks/quality/norm_rule.py --model gemma3-270m
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from vllm_kvmix.allocation import qk_norm_key_scale, value_scale  # noqa: E402


def corr(a: list[float], b: list[float]) -> float:
    x, y = torch.tensor(a).log(), torch.tensor(b).log()
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / (x.norm() * y.norm()))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--tokens", type=int, default=1024)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from vllm_kvmix.models import ensure_model, ensure_texts

    path = ensure_model(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    text = ensure_texts()["alice29.txt"]
    ids = tok(text, return_tensors="pt").input_ids[:, : args.tokens]
    layers = model.model.layers
    cfg = model.config
    hs = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    measured: dict[int, dict[str, float]] = {}

    def hook(i: int, side: str):
        def fn(_mod, _inp, out):
            v = out.reshape(*out.shape[:-1], -1, hs) if out.shape[-1] != hs else out
            measured.setdefault(i, {})[side] = float(v.float().norm(dim=-1).square().mean().sqrt())

        return fn

    for i, layer in enumerate(layers):
        att = layer.self_attn
        k_src = att.k_norm if hasattr(att, "k_norm") else att.k_proj
        k_src.register_forward_hook(hook(i, "k"))
        att.v_proj.register_forward_hook(hook(i, "v"))
    with torch.no_grad():
        model(ids)

    gemma = "gemma" in cfg.model_type
    rows, pred_s, pred_q, meas = [], [], [], []
    for i, layer in enumerate(layers):
        att = layer.self_attn
        wk, wv = att.k_proj.weight.float(), att.v_proj.weight.float()
        sk = float(torch.linalg.matrix_norm(wk.reshape(-1, hs, wk.shape[1]), ord=2).max())
        sv = float(torch.linalg.matrix_norm(wv.reshape(-1, hs, wv.shape[1]), ord=2).max())
        gin = layer.input_layernorm.weight.float() + (1.0 if gemma else 0.0)
        v_typ = value_scale(wv, gin, hs)
        r = measured[i]["k"] / measured[i]["v"]
        row = f"| {i} | {measured[i]['k']:.2f} | {measured[i]['v']:.2f} | {r:.2f} | {sk / sv:.2f} |"
        if hasattr(att, "k_norm"):
            gk = att.k_norm.weight.float() + (1.0 if gemma else 0.0)
            q = qk_norm_key_scale(gk) / v_typ
            pred_q.append(q)
            row += f" {q:.2f} |"
        rows.append(row)
        pred_s.append(sk / sv)
        meas.append(r)
    has_q = bool(pred_q)
    print(f"{args.model}: RMS length of key / value vectors per layer ({ids.shape[1]} tokens of alice29)\n")
    print("| layer | |k| | |v| | measured K/V | spectral rule K/V |" + (" qk-norm rule K/V |" if has_q else ""))
    print("|---|---|---|---|---|" + ("---|" if has_q else ""))
    print("\n".join(rows))
    print(f"\ncorrelation over layers, log predicted vs log measured K/V: spectral {corr(pred_s, meas):+.2f}", end="")
    print(f", qk-norm {corr(pred_q, meas):+.2f}" if has_q else "")
    _ = math


if __name__ == "__main__":
    main()
