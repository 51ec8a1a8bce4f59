"""Design exploration: simulated KV quantization in transformers (fp32), causal page semantics.

Not the harness (that is ``harness.py``, through vLLM's engine).  This script
is how the kvmix page recipe was chosen: it replaces each attention layer's
K/V by what a paged cache with a given recipe would return, with the same
semantics as the kvmix cache in vLLM:

* pages of ``P`` tokens; a query at position ``p`` reads every earlier page in
  packed form and its own page (``p // P``) from the 8-bit staging copy
  ("staging"), exactly what token-by-token generation sees;
* keys per channel over a page (``kaxis=channel``) or per token (``token``);
* values per token, optionally Hadamard-rotated (``vrot``), with min-max or
  std-clipped levels (``vclip``);
* optional sink tokens kept at 8 bits.

    python benchmarks/quality/explore.py --model smollm2-135m --windows 8
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from vllm_kvmix.quant import dequantize, quantize  # noqa: E402


def hadamard(d: int) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < d:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(d)


def fake_token(x, bits, group=64, clip=None, sym=False):
    """Per-token groups; ``clip`` = std multiple for the level spacing (None: min-max).

    ``sym``: levels symmetric around 0, one fp16 scale per group (absmax-based).
    """
    if sym:
        *lead, d = x.shape
        xg = x.reshape(*lead, d // group, group)
        half = ((1 << bits) - 1) / 2
        s = (xg.abs().amax(-1, keepdim=True) / half).half().float()
        inv = torch.where(s > 0, 1 / s, torch.zeros_like(s))
        code = torch.floor(xg * inv + half + 0.5).clamp(0, 2 * half)
        return ((code - half) * s).reshape(*lead, d)
    if clip is None or bits == 8:
        c, m = quantize(x, bits, group)
        return dequantize(c, m, group)
    *lead, d = x.shape
    xg = x.reshape(*lead, d // group, group)
    mu = xg.mean(-1, keepdim=True)
    sd = xg.std(-1, keepdim=True, unbiased=False)
    levels = (1 << bits)
    step = (clip * sd / (levels / 2)).half().float()  # clip*sd spans half the levels
    lo = (mu - step * (levels - 1) / 2).half().float()
    inv = torch.where(step > 0, 1 / step, torch.zeros_like(step))
    code = torch.floor((xg - lo) * inv + 0.5).clamp(0, levels - 1)
    return (code * step + lo).reshape(*lead, d)


def fake_channel(x, bits, page, sinks=0):
    """Keys per channel over each page of ``page`` tokens: x[B, H, L, D]."""
    b, h, L, d = x.shape
    pad = (-L) % page
    xp = torch.nn.functional.pad(x, (0, 0, 0, pad))
    xp = xp.reshape(b, h, -1, page, d)
    # padded rows must not widen the range: fill with the page's first row
    n_real = torch.full((xp.shape[2],), page)
    n_real[-1] = page - pad
    mask = (torch.arange(page).view(1, -1) < n_real.view(-1, 1))  # [npages, page]
    if sinks:
        mask[0, :sinks] = False
    m = mask.view(1, 1, -1, page, 1)
    big = torch.finfo(x.dtype).max
    mn = torch.where(m, xp, big).amin(3, keepdim=True)
    mx = torch.where(m, xp, -big).amax(3, keepdim=True)
    mn = torch.where(mn > mx, 0, mn)
    mx = torch.where(mn > mx, 0, mx)
    levels = (1 << bits) - 1
    mn16 = mn.half().float()
    scale = ((mx - mn16) / levels).half().float()
    inv = torch.where(scale > 0, 1 / scale, torch.zeros_like(scale))
    code = torch.floor((xp - mn16) * inv + 0.5).clamp(0, levels)
    out = (code * scale + mn16).reshape(b, h, -1, d)[:, :, :L]
    return out


RECIPE = {}


def kvsim_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kw):
    r = RECIPE
    b, hq, L, d = query.shape
    h = key.shape[1]
    page = r["page"]
    k, v = key.float(), value.float()
    if r.get("exact"):
        kp = ks = k
        vp = vs = v
        rot = None
    else:
        rot = hadamard(d) if r["vrot"] else None
        if rot is not None:
            v = v @ rot
        if r.get("krot"):
            k = k @ hadamard(d)
            query = query @ hadamard(d)
        ks = fake_token(k, 8, d)
        vs = fake_token(v, 8, d)
        if r["kaxis"] == "channel":
            kp = fake_channel(k, r["kb"], page, r["sinks"])
        else:
            kp = fake_token(k, r["kb"], 64)
        vp = fake_token(v, r["vb"], 64, r["vclip"], r.get("vsym", False))
        if r["sinks"]:
            kp[:, :, : r["sinks"]] = ks[:, :, : r["sinks"]]
            vp[:, :, : r["sinks"]] = vs[:, :, : r["sinks"]]
        if not r["staging"]:
            ks, vs = kp, vp
    rep = hq // h
    kp, ks, vp, vs = (t.repeat_interleave(rep, 1) for t in (kp, ks, vp, vs))
    q = query.float()
    pos = torch.arange(L)
    same = (pos.view(-1, 1) // page) == (pos.view(1, -1) // page)
    s = torch.where(same, q @ ks.transpose(-1, -2), q @ kp.transpose(-1, -2)) * scaling
    softcap = kw.get("softcap")
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            s = s.masked_fill(~attention_mask, float("-inf"))
        else:
            s = s + attention_mask
    else:
        s = s.masked_fill(pos.view(-1, 1) < pos.view(1, -1), float("-inf"))
    p = torch.softmax(s, -1)
    o = (p * same) @ vs + (p * ~same) @ vp
    if rot is not None:
        o = o @ rot.T
    return o.transpose(1, 2).contiguous().to(query.dtype), None


def main() -> None:
    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--only", nargs="*")
    args = ap.parse_args()
    root = Path.home() / ".cache/vllm-kvmix"
    mdir = root / "models" / args.model
    tok = AutoTokenizer.from_pretrained(mdir)
    model = AutoModelForCausalLM.from_pretrained(mdir, torch_dtype=torch.float32)
    AttentionInterface.register("kvsim", kvsim_attention)
    AttentionMaskInterface.register("kvsim", sdpa_mask)  # boolean masks, sliding windows included
    model.config._attn_implementation = "kvsim"
    for m in model.modules():
        if hasattr(m, "config"):
            m.config._attn_implementation = "kvsim"
    torch.set_num_threads(2)
    wins = []
    for name in ("alice29.txt", "lcet10.txt"):
        ids = tok((root / "text" / name).read_text(encoding="latin-1")[3000:], add_special_tokens=False)["input_ids"]
        per = args.windows // 2
        bos = [tok.bos_token_id] if tok("a")["input_ids"][0] == tok.bos_token_id else []
        wins += [bos + ids[i * args.tokens : (i + 1) * args.tokens] for i in range(per)]
    base = dict(page=64, kaxis="channel", kb=4, vb=2, vrot=True, vclip=None, sinks=0, staging=True)
    configs = {
        "exact": dict(exact=True, page=64),
        "k4v2 token minmax (legacy)": dict(base, kaxis="token", vrot=False, staging=False),
        "k4v2 ch": dict(base, vrot=False, staging=False),
        "k4v2 ch vrot": dict(base, staging=False),
        "k4v2 ch vrot clip1.5": dict(base, staging=False, vclip=1.5),
        "k4v2 ch vrot +stage": dict(base),
        "k4v2 ch vrot clip1.5 +stage": dict(base, vclip=1.5),
        "k4v2 ch vrot clip2 +stage": dict(base, vclip=2.0),
        "k4v2 ch vrot clip2 +stage +4sinks": dict(base, vclip=2.0, sinks=4),
        "k4v2 ch +stage (no vrot)": dict(base, vrot=False),
        "k4v2 ch vrot vsym +stage": dict(base, vsym=True),
        "k4v2 ch vrot +stage +4sinks": dict(base, sinks=4),
        "k4v4 ch vrot +stage": dict(base, vb=4),
        "k8v4 ch vrot +stage": dict(base, kb=8, vb=4),
        "k2v4 ch vrot +stage": dict(base, kb=2, vb=4),
        "k2v4 ch vrot clip2.7 +stage": dict(base, kb=2, vb=4, vclip=2.7),
        "k4v4 ch vrot clip2.7 +stage": dict(base, vb=4, vclip=2.7),
    }
    if args.only:
        configs = {k: v for k, v in configs.items() if k in args.only or k == "exact"}
    ref = None
    for name, cfg in configs.items():
        RECIPE.clear()
        RECIPE.update(cfg)
        nll, kl = [], []
        ref_lp = []
        with torch.no_grad():
            for i, w in enumerate(wins):
                ids = torch.tensor([w])
                lp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
                nll.append(-lp.gather(1, ids[0, 1:, None]).mean().item())
                if ref is None:
                    ref_lp.append(lp)
                else:
                    kl.append((ref[i].exp() * (ref[i] - lp)).sum(-1).mean().item())
        if ref is None:
            ref = ref_lp
            ppl0 = math.exp(sum(nll) / len(nll))
        ppl = math.exp(sum(nll) / len(nll))
        klm = sum(kl) / len(kl) if kl else 0.0
        print(f"{name:40s} ppl {ppl:8.3f}  dppl {100 * (ppl / ppl0 - 1):+7.2f}%  KL {klm:.4f}", flush=True)


if __name__ == "__main__":
    main()
