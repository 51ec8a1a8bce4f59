"""``python -m vllm_kvmix demo`` (``make demo``): SmolLM2-135M on CPU with bf16 and a kvmix format side by side.

Prints KV bytes/token, KV blocks (same memory budget), greedy continuations and
perplexity on a real text excerpt for each format.  The engines' own logs go to a
file (named at the start; ``--verbose`` shows them instead); the terminal shows a
progress bar per engine and then the result table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from pathlib import Path

from vllm_kvmix import evaluate, models
from vllm_kvmix.formats import BF16_BYTES, is_kvmix, parse_any, parse_format
from vllm_kvmix.model_shape import model_shape

STAGES = ("start the engine", "generate", "perplexity")


def bytes_per_token(shape: dict, kv_cache_dtype: str) -> str:
    n, h, d = shape["num_layers"], shape["num_kv_heads"], shape["head_size"]
    if not is_kvmix(kv_cache_dtype):
        return str(n * h * 2 * d * BF16_BYTES)
    fmt = parse_any(kv_cache_dtype)
    if not hasattr(fmt, "k_bits"):  # kvmix-auto: per layer, the bytes of its budget's uniform split
        from vllm_kvmix.allocation import uniform_split

        fmt = parse_format("kvmix-k{}v{}".format(*uniform_split(fmt.avg_bits)))
    return str(n * h * fmt.bytes_per_token_head(d))


@contextlib.contextmanager
def engine_output_to(log_path: Path | None):
    """Send everything written to this process's (and its children's) stdout / stderr to ``log_path``; yield a
    stream to the terminal.  ``None``: leave the output where it is."""
    if log_path is None:
        yield sys.stdout
        return
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log_path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
        terminal = os.fdopen(os.dup(saved[0]), "w", buffering=1)
        try:
            yield terminal
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            terminal.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m vllm_kvmix demo", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="local model dir (default: SmolLM2-135M from PyPI)")
    ap.add_argument("--formats", nargs="+", default=["auto", "kvmix-k4v2"])
    ap.add_argument("--ppl-tokens", type=int, default=1024)
    ap.add_argument("--log", default=None, help="file for the engines' logs (default: under $KVMIX_CACHE)")
    ap.add_argument("--verbose", action="store_true", help="show the engines' logs here instead of in a file")
    args = ap.parse_args(argv)
    for name in args.formats:  # a misspelt format fails before any download or engine
        if is_kvmix(name):
            parse_any(name)

    from tqdm import tqdm

    model = args.model or str(models.ensure_model(models.DEFAULT_MODEL))
    shape = model_shape(model)
    log_path = None
    if not args.verbose:
        log_path = Path(args.log) if args.log else models.cache_dir() / "logs" / f"demo-{time.strftime('%Y%m%d-%H%M%S')}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        print(f"engine logs: {log_path}", flush=True)

    results = []
    with engine_output_to(log_path) as terminal:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model)
        text = models.ensure_texts()["alice29.txt"]
        windows = evaluate.text_windows(tok, text, args.ppl_tokens, 1)
        for i, dtype in enumerate(args.formats, 1):
            label = f"engine {i}/{len(args.formats)} {dtype}"
            bar = tqdm(total=len(STAGES), file=terminal, dynamic_ncols=True, desc=f"{label}: {STAGES[0]}",
                       bar_format="{desc} |{bar:12}| {n}/{total} [{elapsed}]")

            def stage(name, bar=bar, label=label):
                bar.set_description_str(f"{label}: {name}")

            results.append(evaluate.run(model, dtype, evaluate.DEFAULT_PROMPTS, ppl_windows=windows,
                                        progress=lambda name, bar=bar, stage=stage: (bar.update(1), stage(name))))
            bar.update(bar.total - bar.n)
            stage("done")
            bar.close()

    base = results[0]
    base_tokens = base.num_blocks * base.block_size
    print(f"\nModel: {shape['name']}  (KV budget {evaluate.KV_BUDGET_BYTES >> 20} MiB; "
          f"perplexity on {args.ppl_tokens} tokens of alice29.txt)\n")
    print("| kv_cache_dtype | bytes/token | KV blocks x tokens | KV tokens | vs first | perplexity | ΔPPL |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        tokens = r.num_blocks * r.block_size
        print(
            f"| {r.kv_cache_dtype} | {bytes_per_token(shape, r.kv_cache_dtype)} | {r.num_blocks} x {r.block_size} | "
            f"{tokens} | {tokens / base_tokens:.2f}x | {r.ppl:.3f} | {100 * (r.ppl / base.ppl - 1):+.1f}% |"
        )
    for i, prompt in enumerate(evaluate.DEFAULT_PROMPTS):
        print(f"\nPrompt: {prompt!r}")
        for r in results:
            print(f"  {r.kv_cache_dtype:>12}: {r.completions[i]!r}")
    return 0
