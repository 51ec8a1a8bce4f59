"""One layer's step on the CPU path, against PyTorch's fused attention over a dense bf16 cache.

    python benchmarks/kernels/cpu_bench.py [--batch 8] [--context 1000] [--prompt 0 512 1024] [--threads 1]

A batch of decode rows at ``--context`` tokens (SmolLM2-135M's attention shape by default: 3 KV heads, 9 query
heads, head size 64), plus one prompt chunk of ``--prompt`` tokens in the same step: ms per layer step for the
C++ decode kernel, for the eager path it falls back to, and for ``scaled_dot_product_attention`` over the same
context in bf16 (vLLM's bf16 CPU cache, no quantization).  ``--threads 1`` is what vLLM's CPU worker gets on a
2-core machine (it reserves the other core).
"""

from __future__ import annotations

import argparse
import time

import torch

from vllm_kvmix import cpu, cpu_kernel
from vllm_kvmix.formats import PAGE_TOKENS as P
from vllm_kvmix.formats import parse_format
from vllm_kvmix.reference.staged import RequestStep
from vllm_kvmix.staging import stage_rows


def timed(fn, reps: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t0) / reps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--format", default="kvmix-k4v2")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=1000)
    ap.add_argument("--prompt", type=int, nargs="+", default=[0, 512, 1024])
    ap.add_argument("--heads", type=int, nargs=3, default=[3, 9, 64], metavar=("KV", "Q", "D"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                    help="the model's dtype: what vLLM passes the attention (the prompt path runs in it)")
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fmt = parse_format(args.format)
    h, hq, d = args.heads
    b, ctx = args.batch, args.context
    width = (ctx + max(args.prompt) + args.reps + 2) // P + 2
    nb = (b + 1) * width + 1
    cache = torch.zeros(nb, h, fmt.layout(d, P).head_page_bytes, dtype=torch.uint8)
    stage = torch.zeros(stage_rows(b + 1), h, fmt.stage_bytes_per_seq_head(d), dtype=torch.uint8)
    table = torch.arange(1, nb).view(b + 1, width).int()
    for i in range(b):
        cpu.step(torch.randn(ctx, hq, d), torch.randn(ctx, h, d), torch.randn(ctx, h, d), cache, stage, fmt,
                 [RequestStep(0, ctx, 0, ctx, i)], table[i : i + 1], d**-0.5)
    built = cpu_kernel.kernel()
    print(f"{args.format}, {b} decode rows at {ctx} tokens, KV heads {h}, query heads {hq}, head size {d}, "
          f"{args.threads} thread(s), {args.dtype} model; ms per layer step")
    print("| prompt tokens in the step | C++ decode kernel | eager decode | bf16 SDPA, same context |")
    print("|---|---|---|---|")
    for prompt in args.prompt:
        reqs = [RequestStep(i, i + 1, ctx, ctx + 1, i) for i in range(b)]
        t = b
        if prompt:
            reqs.append(RequestStep(b, b + prompt, 0, prompt, b))
            t += prompt
        dt = getattr(torch, args.dtype)
        step_args = (torch.randn(t, hq, d, dtype=dt), torch.randn(t, h, d, dtype=dt), torch.randn(t, h, d, dtype=dt),
                     cache, stage, fmt, reqs, table, d**-0.5)
        times = {}
        for name, kernel in (("kernel", lambda: built), ("eager", lambda: None)):
            cpu_kernel.kernel = kernel
            times[name] = timed(lambda: cpu.step(*step_args), args.reps)
        kd = torch.randn(b, h, ctx, d, dtype=torch.bfloat16)
        qd = torch.randn(b, hq, 1, d, dtype=torch.bfloat16)
        kp = torch.randn(1, h, prompt, d, dtype=torch.bfloat16)
        qp = torch.randn(1, hq, prompt, d, dtype=torch.bfloat16)

        def dense():
            torch.nn.functional.scaled_dot_product_attention(qd, kd, kd, enable_gqa=True)
            if prompt:
                torch.nn.functional.scaled_dot_product_attention(qp, kp, kp, is_causal=True, enable_gqa=True)

        ref = timed(dense, args.reps)
        kern = f"{times['kernel']:.2f}" if built is not None else "not built"
        print(f"| {prompt} | {kern} | {times['eager']:.2f} | {ref:.2f} |")


if __name__ == "__main__":
    main()
