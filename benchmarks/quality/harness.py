"""Quality of KV-cache formats through vLLM's engine on CPU, with real weights and real text.

For each model and KV-cache dtype: perplexity, mean KL divergence of the
next-token distributions from the unquantized cache's, and top-1 agreement,
over windows of real English text.  Every window is one prompt scored with
``prompt_logprobs``: every context token attends to K/V as the cache stores
them (for kvmix page formats: earlier pages packed, the token's own page from
the 8-bit staging copy -- what generation sees).  Full next-token
distributions come from a forward hook on the model's logits processor (the
engine runs in this process); the hook's NLL is checked against vLLM's
``prompt_logprobs`` for every window.

    python benchmarks/quality/harness.py                      # both models, all formats
    python benchmarks/quality/harness.py --models smollm2-135m --formats auto kvmix-k4v2 --windows 2
    python benchmarks/quality/harness.py --from-json a.json b.json   # one table and plot from runs

Writes ``benchmarks/results/quality.{md,json,png}`` (``--out`` prefix).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the logits hook lives in this process

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

# vLLM's own fp8 KV cache is not in the default list: on vLLM 0.26's CPU backend it
# returns NaN prompt logprobs (max_model_len 512) or segfaults (1040) on this machine
# (`--formats auto fp8` reproduces it); vLLM 0.32's CPU backend runs it (docs/results.md, section 5).
FORMATS = [
    "auto",
    "kvmix-k8v8", "kvmix-k8v4", "kvmix-k4v8", "kvmix-k4v4", "kvmix-k4v2", "kvmix-k2v4", "kvmix-k2v2",
]
MODELS = ["smollm2-135m", "gemma3-270m"]
ROW_CHUNK = 256  # logits rows per log-softmax / KL step
TEXTS = ["alice29.txt", "lcet10.txt", "plrabn12.txt", "asyoulik.txt"]


def bits_per_element(kv_cache_dtype: str, head_size: int, context: int) -> float:
    """Stored bits per K/V element with every byte counted; staging amortized over ``context`` tokens."""
    if kv_cache_dtype == "auto":
        return 16.0
    if kv_cache_dtype.startswith("fp8"):
        return 8.0  # one fp32 scale per layer
    from vllm_kvmix.allocation import uniform_split
    from vllm_kvmix.formats import AutoFormat, KVFormat, parse_any

    fmt = parse_any(kv_cache_dtype)
    if isinstance(fmt, AutoFormat):  # per-layer formats, exactly the bytes of the budget's uniform split
        fmt = KVFormat(*uniform_split(fmt.avg_bits))
    stage = fmt.stage_bytes_per_seq_head(head_size) * 8 / (2 * head_size * context)
    return fmt.bits_per_element(head_size) + stage


def auto_variant(label: str | None) -> tuple[str, dict]:
    """``kvmix-auto-b6@even,paper,nohybrid`` -> (name, engine kwargs); installs kvmix-auto's experiment variant.

    ``even`` / ``var``: force the allocation mode; ``paper`` / ``tiers`` / ``reverse``: the allocation rule
    (``paper``: the paper's greedy unchanged, :func:`vllm_kvmix.allocation.plan_bits`; ``reverse``: the tiers,
    smallest norm first, a control for whether the norms' order matters); ``layers=0k8v2+1k4v2``: those layers'
    formats replace the plan's (a hand-made plan; the bytes are the caller's to balance); ``nohybrid``: vLLM's
    hybrid KV-cache
    manager off (one KV-cache group, so per-layer page sizes on sliding-window models); ``kvscales`` (with vLLM's
    ``fp8``): per-layer scales calibrated on held-out text (:func:`calibrate_kv_scales`) instead of 1.0.  The
    variants replace
    ``allocation.plan_layers`` / ``autoplan.choose_mode`` in this process (the engine runs in-process here);
    ``None`` restores the served functions.
    """
    from vllm_kvmix import allocation
    from vllm_kvmix.vllm import autoplan

    global _SERVED
    if _SERVED is None:
        _SERVED = (allocation.plan_layers, autoplan.choose_mode)
    allocation.plan_layers, autoplan.choose_mode = _SERVED
    if label is None:
        return "", {}
    name, _, opts = label.partition("@")
    extra = {}
    for opt in filter(None, opts.split(",")):
        if opt in ("even", "var"):
            autoplan.choose_mode = lambda layers, cfg, mode=opt: mode
        elif opt == "tiers":
            pass
        elif opt == "paper":  # q/k-norm layers' keys at 4 bits: W_K's norm says nothing about them
            allocation.plan_layers = lambda k, v, gain, avg, mode="var": (
                _SERVED[0](k, v, gain, avg, mode) if mode == "even"
                else allocation.plan_bits(k, v, avg, [None if g is None else 4 for g in gain]))
        elif opt == "reverse":
            allocation.plan_layers = lambda k, v, gain, avg, mode="var": _SERVED[0](
                [-x for x in k], [-x for x in v], [None if g is None else -g for g in gain], avg, mode)
        elif opt.startswith("layers="):  # e.g. layers=0k8v2+1k4v2: these layers' formats over the plan
            fixed = {int(m[0]): (int(m[1]), int(m[2]))
                     for m in re.findall(r"(\d+)k(\d+)v(\d+)", opt.removeprefix("layers="))}
            inner = allocation.plan_layers
            allocation.plan_layers = lambda k, v, gain, avg, mode="var", inner=inner, fixed=fixed: [
                fixed.get(i, kv) for i, kv in enumerate(inner(k, v, gain, avg, mode))]
        elif opt == "nohybrid":
            extra["disable_hybrid_kv_cache_manager"] = True
        elif opt == "kvscales":  # vLLM's fp8 with calibrated per-layer scales (calibrate_kv_scales), not 1.0
            pass
        else:
            raise ValueError(f"unknown variant option {opt!r} in {label!r}")
    return name, extra


_SERVED = None  # (allocation.plan_layers, autoplan.choose_mode) as served


def auto_plan_summary(name: str) -> dict:
    """kvmix-auto's plan of the engine just run: per-layer formats and a count per format."""
    from vllm_kvmix.formats import is_auto
    from vllm_kvmix.vllm import autoplan

    if not is_auto(name) or autoplan.LAST_PLAN is None:
        return {}
    per_layer = [f"k{k}v{v}" for _, k, v in autoplan.LAST_PLAN]
    counts = {f: per_layer.count(f) for f in dict.fromkeys(sorted(per_layer, reverse=True))}
    return {"plan": per_layer, "plan_counts": ", ".join(f"{f} x{n}" for f, n in counts.items())}


# vLLM's own rule while it computed fp8 KV scales at run time (calculate_kv_scales, removed by 0.32): the largest
# |K| / |V| of a batch over these constants (its K_SCALE_CONSTANT / V_SCALE_CONSTANT defaults)
K_SCALE_CONSTANT, V_SCALE_CONSTANT = 200.0, 100.0
CALIBRATION_TOKENS = 2048
CALIBRATION_SCALE = 64.0  # 448 x 64: past any K / V of the models here


def calibration_window(model_dir: str) -> list[int]:
    """Held-out text for fp8 scales: the last CALIBRATION_TOKENS tokens of the scored books' last text (the
    windows are taken from the starts of the texts)."""
    from transformers import AutoTokenizer

    from vllm_kvmix.models import ensure_texts

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok(ensure_texts()[TEXTS[-1]], add_special_tokens=False)["input_ids"]
    return ids[-CALIBRATION_TOKENS:]


def calibrate_kv_scales(llm, model_dir: str) -> list[tuple[float, float]]:
    """Set every attention layer's fp8 K / V scale (the floats vLLM's CPU backend reads) from one held-out
    prompt: max |K| / K_SCALE_CONSTANT, max |V| / V_SCALE_CONSTANT per layer.  Returns the scales."""
    from vllm import SamplingParams

    def attach(model):
        layers = [m for _, m in model.named_modules() if type(m).__name__ == "Attention"]
        amax = {id(m): [0.0, 0.0] for m in layers}

        def pre(m, args):
            amax[id(m)][0] = max(amax[id(m)][0], args[1].detach().abs().max().item())
            amax[id(m)][1] = max(amax[id(m)][1], args[2].detach().abs().max().item())

        handles = [m.register_forward_pre_hook(pre) for m in layers]
        for m in layers:  # the calibration prompt's own cache: scales wide enough that no K / V overflows fp8
            m._k_scale_float = m._v_scale_float = CALIBRATION_SCALE
            m._k_scale.fill_(CALIBRATION_SCALE)
            m._v_scale.fill_(CALIBRATION_SCALE)
        model._kvmix_calibration = (layers, amax, handles)
        return True

    def apply(model):
        layers, amax, handles = model._kvmix_calibration
        for h in handles:
            h.remove()
        scales = []
        for m in layers:
            k, v = amax[id(m)][0] / K_SCALE_CONSTANT, amax[id(m)][1] / V_SCALE_CONSTANT
            m._k_scale_float, m._v_scale_float = k, v
            m._k_scale.fill_(k)
            m._v_scale.fill_(v)
            scales.append((k, v))
        return scales

    llm.apply_model(attach)
    llm.generate([{"prompt_token_ids": calibration_window(model_dir)}], SamplingParams(max_tokens=1), use_tqdm=False)
    return llm.apply_model(apply)[0]


class LogitsCapture:
    """Forward hook on the logits processor: keeps every logits row of the current request."""

    def __init__(self) -> None:
        self.rows: list = []

    def hook(self, module, args, output) -> None:
        if output is not None:
            self.rows.append(output.detach().float().cpu())

    def install(self, llm) -> None:
        def attach(model):
            mods = [m for n, m in model.named_modules() if type(m).__name__ == "LogitsProcessor"]
            if len(mods) != 1:
                raise RuntimeError(f"expected one LogitsProcessor, found {len(mods)}")
            mods[0].register_forward_hook(self.hook)
            return True

        llm.apply_model(attach)

    def take(self, n_rows: int | None = None, chunked: bool = False):
        """The prompt's logits (``n_rows`` rows), then forget all captured calls.

        A one-step prefill makes two calls: one row for sampling, then one row per
        prompt position for ``prompt_logprobs``; a chunked prefill (``chunked``) makes one
        call per chunk, whose rows are concatenated (one-row sampling calls left out).
        """
        calls, self.rows = self.rows, []
        if n_rows is None:
            return None
        if chunked:
            import torch

            rows = [c for c in calls if c.shape[0] > 1]
            if sum(c.shape[0] for c in rows) == n_rows:
                return torch.cat(rows)
            raise RuntimeError(f"expected chunks of {n_rows} rows in all, got {[c.shape[0] for c in calls]}")
        match = [c for c in calls if c.shape[0] == n_rows]
        if len(match) != 1:
            raise RuntimeError(f"expected one logits call of {n_rows} rows, got {[c.shape[0] for c in calls]}")
        return match[0]


def score(llm, capture: LogitsCapture, windows: list[list[int]], ref: list | None, ref_dtype=None,
          chunked: bool = False):
    """Per window: logprobs over the vocabulary (fp32, kept for the reference) and the metrics."""
    import torch
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    nll, kl, top1, n_tok, kept = 0.0, 0.0, 0, 0, []
    for i, w in enumerate(windows):
        capture.take()
        out = llm.generate([TokensPrompt(prompt_token_ids=w)], params, use_tqdm=False)[0]
        logits = capture.take(len(w) - 1, chunked)
        target = torch.tensor(w[1:])
        vllm_nll = torch.tensor([-out.prompt_logprobs[t + 1][w[t + 1]].logprob for t in range(len(w) - 1)])
        # in chunks of rows: a 2k window of a 150k vocabulary is 1.2 GB per fp32 copy
        tok_nll, kept_rows = [], []
        for a in range(0, len(w) - 1, ROW_CHUNK):
            lp = torch.log_softmax(logits[a : a + ROW_CHUNK], -1)  # row t predicts token t + 1 (fp32)
            tok_nll.append(-lp.gather(1, target[a : a + ROW_CHUNK, None])[:, 0])
            if ref is None:
                kept_rows.append(lp.to(ref_dtype or lp.dtype))
            else:
                r = ref[i][a : a + ROW_CHUNK].float()
                kl += (r.exp() * (r - lp)).sum(-1).sum().item()
                top1 += (r.argmax(-1) == lp.argmax(-1)).sum().item()
        tok_nll = torch.cat(tok_nll)
        # vLLM's logprobs are float32 from the same logits; anything else means the hook saw other rows
        if not torch.allclose(tok_nll, vllm_nll, atol=2e-2, rtol=1e-3):
            raise RuntimeError(
                f"captured logits disagree with vLLM's prompt_logprobs (max diff "
                f"{(tok_nll - vllm_nll).abs().max():.3g})"
            )
        nll += tok_nll.sum().item()
        n_tok += len(w) - 1
        if ref is None:
            kept.append(torch.cat(kept_rows))
            top1 += len(w) - 1
    return kept, {"ppl": math.exp(nll / n_tok), "kl": kl / n_tok, "top1": top1 / n_tok, "tokens": n_tok}


def model_windows(model_dir: str, n_windows: int, n_tokens: int) -> tuple[list[list[int]], dict]:
    from transformers import AutoConfig, AutoTokenizer

    from vllm_kvmix.evaluate import text_windows
    from vllm_kvmix.models import ensure_texts

    tok = AutoTokenizer.from_pretrained(model_dir)
    bos = [tok.bos_token_id] if tok("a")["input_ids"][0] == tok.bos_token_id else []
    per_text = math.ceil(n_windows / len(TEXTS))
    windows = []
    texts = ensure_texts()
    for name in TEXTS:
        text = texts[name]
        windows += [bos + w for w in text_windows(tok, text, n_tokens - len(bos), per_text)]
    cfg = AutoConfig.from_pretrained(model_dir)
    cfg = getattr(cfg, "text_config", cfg)
    head = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    shape = {"head_size": head, "num_layers": cfg.num_hidden_layers, "num_kv_heads": cfg.num_key_value_heads}
    # interleave texts so a short run still sees several books
    order = [windows[j * per_text + i] for i in range(per_text) for j in range(len(TEXTS)) if j * per_text + i < len(windows)]
    return order[:n_windows], shape


def run(models, formats, n_windows, n_tokens, dtype, ref_dtype: str = "float32", out_json: Path | None = None,
        prefill_chunk: int = 0, ref_file: Path | None = None) -> list[dict]:
    """Every (model, format); the reference (``auto``) runs first per model.

    ``ref_dtype``: precision the reference log-probabilities are kept in (float16
    halves the memory for large vocabularies: Gemma-3's 262k).  Rows are written
    to ``out_json`` after each engine.  ``ref_file`` (one model): the reference's log-probabilities and
    perplexity are saved there when it runs and loaded from there when it exists, so each format can run in a
    process of its own with one engine (fp32 1.5B engines: two in one process exceed 23.5 GiB).
    """
    import torch
    from tqdm import tqdm

    from vllm_kvmix.evaluate import make_llm
    from vllm_kvmix.models import ensure_model

    from benchmarks import provenance

    key = provenance.key()
    rows = []
    bar = tqdm(total=len(models) * len(formats), desc="quality", unit="engine")
    for model in models:
        mdir = str(ensure_model(model, quiet=True))
        windows, shape = model_windows(mdir, n_windows, n_tokens)
        ref = None
        todo = ["auto"] + [f for f in formats if f != "auto"]
        if ref_file is not None and ref_file.exists():
            saved = torch.load(ref_file)
            if saved["setting"] != [model, n_windows, n_tokens, dtype, ref_dtype, prefill_chunk]:
                raise SystemExit(f"{ref_file} holds the reference of {saved['setting']}, not of this run")
            ref, base_ppl, todo = saved["logprobs"], saved["ppl"], [f for f in formats if f != "auto"]
        for fmt in todo:
            bar.set_postfix_str(f"{model} {fmt}")
            t0 = time.time()
            # one prefill step per window unless --prefill-chunk (8k windows: vLLM's prompt logprobs of a
            # whole 8k x 150k-vocabulary step do not fit in this machine's memory)
            name, extra = auto_variant(fmt)
            llm = make_llm(mdir, name, dtype=dtype, max_model_len=n_tokens + 16,
                           max_num_batched_tokens=prefill_chunk or n_tokens + 16, **extra)
            if "@kvscales" in fmt:
                kv_scales = calibrate_kv_scales(llm, mdir)
                print(f"{model} {fmt}: K / V scales per layer", [f"{k:.3g}/{v:.3g}" for k, v in kv_scales], flush=True)
            capture = LogitsCapture()
            capture.install(llm)
            kept, metrics = score(llm, capture, windows, ref, getattr(torch, ref_dtype), chunked=bool(prefill_chunk))
            plan = auto_plan_summary(name)
            auto_variant(None)
            del llm
            gc.collect()
            if fmt == "auto":
                ref = kept
                base_ppl = metrics["ppl"]
                if ref_file is not None:
                    torch.save({"setting": [model, n_windows, n_tokens, dtype, ref_dtype, prefill_chunk],
                                "logprobs": ref, "ppl": base_ppl}, ref_file)
            if fmt in formats:
                rows.append({
                    **key, "model": model, "kv_cache_dtype": fmt, **metrics,
                    "dppl_pct": 100 * (metrics["ppl"] / base_ppl - 1),
                    "bits_per_element": bits_per_element(name, shape["head_size"], n_tokens),
                    "bits_per_element_2k": bits_per_element(name, shape["head_size"], 2048),
                    "windows": len(windows), "window_tokens": n_tokens, "prefill_chunk": prefill_chunk or None,
                    "model_dtype": dtype,
                    "ref_logprobs": ref_dtype, "seconds": round(time.time() - t0, 1),
                    **plan,
                })
                if out_json is not None:
                    out_json.write_text(json.dumps(rows, indent=1) + "\n")
            bar.update(1)
    bar.close()
    return rows


INVARIANCE_SETTINGS = {
    "prefix caching on, one-step prefill": dict(enable_prefix_caching=True),
    "prefix caching off": dict(enable_prefix_caching=False),
    "chunked prefill, 128-token chunks": dict(enable_prefix_caching=True, max_num_batched_tokens=128),
}


def invariance(model: str, fmt: str, n_windows: int, n_tokens: int, dtype: str = "float32") -> dict[str, float]:
    """Perplexity (from vLLM's prompt_logprobs) under each engine setting of ``INVARIANCE_SETTINGS``.

    The page scheme reads every page the same way whatever the step split, so
    these must agree exactly in an fp32 model (in bf16 vLLM's own CPU kernels
    round differently for different batch shapes).  Each window is scored
    twice, so the second pass of the prefix-caching runs hits the cache (full
    pages only) -- vLLM skips cache hits for prompt_logprobs requests, so it
    is the generation tests that exercise hits (tests/test_e2e_cpu.py).
    """
    from vllm_kvmix.evaluate import make_llm, prompt_nll
    from vllm_kvmix.models import ensure_model

    mdir = str(ensure_model(model, quiet=True))
    windows, _ = model_windows(mdir, n_windows, n_tokens)
    out = {}
    for name, kw in INVARIANCE_SETTINGS.items():
        kw = {"max_num_batched_tokens": n_tokens + 16, **kw}
        llm = make_llm(mdir, fmt, dtype=dtype, max_model_len=n_tokens + 16, **kw)
        nll = prompt_nll(llm, windows) + prompt_nll(llm, windows)
        del llm
        gc.collect()
        out[name] = math.exp(sum(nll) / len(nll))
    return out


def markdown(rows: list[dict]) -> str:
    lines = []
    for model in dict.fromkeys(r["model"] for r in rows):
        rs = [r for r in rows if r["model"] == model]
        r0 = rs[0]
        lines += [
            f"### {model} ({r0['windows']} windows x {r0['window_tokens']} tokens, model {r0['model_dtype']}, vLLM CPU)",
            "",
            "| kv_cache_dtype | bits/element @1k | @2k | PPL | ΔPPL | KL (nats/token) | top-1 agreement |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in rs:
            lines.append(
                f"| {r['kv_cache_dtype']} | {r['bits_per_element']:.2f} | {r['bits_per_element_2k']:.2f} | "
                f"{r['ppl']:.3f} | {r['dppl_pct']:+.2f}% | {r['kl']:.4f} | {100 * r['top1']:.1f}% |"
            )
        plans = [r for r in rs if r.get("plan_counts")]
        if plans:
            lines += ["", "kvmix-auto plans (per-layer formats, layer 0 first):", ""]
            lines += [f"- {r['kv_cache_dtype']}: {r['plan_counts']} — {' '.join(r['plan'])}" for r in plans]
        lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vllm_kvmix.formats import is_auto, is_kvmix, parse_format

    models = list(dict.fromkeys(r["model"] for r in rows))
    fig, axes = plt.subplots(2, len(models), figsize=(6.5 * len(models), 8.6), squeeze=False)
    # top: ΔPPL (symmetric log: a quantized cache can lower perplexity on a few windows); bottom: KL (positive)
    for (ax, model), (metric, label) in [((ax, m), spec) for spec, row in zip(
            (("dppl_pct", "ΔPPL vs bf16 KV (%)"), ("kl", "KL vs bf16 KV (nats/token)")), axes)
            for ax, m in zip(row, models)]:
        for r in (r for r in rows if r["model"] == model and r["kv_cache_dtype"] != "auto"):
            name = r["kv_cache_dtype"]
            if is_auto(name.partition("@")[0]):
                kind = "kvmix-auto (per layer)"
            elif is_kvmix(name):
                f = parse_format(name)
                kind = "K-favoured" if f.k_bits > f.v_bits else "V-favoured" if f.k_bits < f.v_bits else "equal K/V"
            else:
                kind = "vLLM"
            style = {
                "K-favoured": ("tab:blue", "o"), "V-favoured": ("tab:red", "s"), "equal K/V": ("tab:gray", "D"),
                "vLLM": ("black", "^"),
                "kvmix-auto (per layer)": ("tab:green", "*"),
            }[kind]
            y = r[metric]
            ax.scatter(r["bits_per_element_2k"], y, color=style[0], marker=style[1], s=50, label=kind)
            ax.annotate(name.removeprefix("kvmix-"), (r["bits_per_element_2k"], y), fontsize=8,
                        xytext=(4, 3), textcoords="offset points")
        handles, labels = ax.get_legend_handles_labels()
        uniq = dict(zip(labels, handles))
        ax.legend(uniq.values(), uniq.keys(), fontsize=8)
        if metric == "kl":
            ax.set_yscale("log")
        else:
            ax.set_yscale("symlog", linthresh=1.0)
            ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_xlabel("bits/element (metadata and staging at 2k tokens included)")
        ax.set_ylabel(label)
        ax.set_title(model)
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--formats", nargs="+", default=FORMATS)
    ap.add_argument("--windows", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--ref-dtype", default="float32", choices=["float32", "float16"])
    ap.add_argument("--prefill-chunk", type=int, default=0,
                    help="prefill windows in chunks of this many tokens (default: one step per window)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/quality"))
    ap.add_argument("--ref-file", type=Path, help="one model: keep the reference there (saved once, then loaded)")
    ap.add_argument("--from-json", nargs="+", metavar="JSON", help="render earlier runs' rows instead of running")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.from_json:
        seen, rows = set(), []
        for r in (r for path in args.from_json for r in json.loads(Path(path).read_text())):
            if (r["model"], r["kv_cache_dtype"]) not in seen:  # split runs each carry their reference row
                seen.add((r["model"], r["kv_cache_dtype"]))
                rows.append(r)
    else:
        rows = run(args.models, args.formats, args.windows, args.tokens, args.dtype, args.ref_dtype,
                   out.parent / (out.name + ".json"), args.prefill_chunk, args.ref_file)
    (out.parent / (out.name + ".json")).write_text(json.dumps(rows, indent=1) + "\n")
    md = markdown(rows)
    (out.parent / (out.name + ".md")).write_text(md)
    plot(rows, out.parent / (out.name + ".png"))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
