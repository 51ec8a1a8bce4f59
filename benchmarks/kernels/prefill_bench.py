"""Prefill attention of the kvmix page scheme vs FA3 bf16, in one process on one GPU.

    python benchmarks/kernels/prefill_bench.py [--out DIR]

Llama-3.1-8B heads (32 q / 8 kv / d=128).  Cases: requests x (cached context + new tokens), as
vLLM's scheduler hands them to one layer: fresh 8k prompts (the ``long`` workload), 1k prompts
(``cap``), a chunked-prefill continuation, and a fresh prompt next to 63 decode rows (a mixed
step).  kvmix: one layer's step (stage + pack + attend + keep) with prefill rows on vLLM's
FlashAttention over dequantized pages (``kernels/prefill.py``, as served) and on the Triton page
kernel alone (the path where vLLM has no FlashAttention); the per-step host plan is timed apart (once per step,
not per layer).  Peers: FA3 bf16 and fp8 on a paged cache of 16-token blocks, attention plus
``reshape_and_cache_flash`` of the new tokens (vLLM's two calls per layer).  TFLOP/s counts the
causal attention FLOPs (4 * D per query-key pair and head).
"""

import argparse
import json
import os
import sys
import time

import torch
import triton

try:  # the installed package (wheel or editable); a source tree run without installing: the tree
    import vllm_kvmix  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from vllm_kvmix.formats import PAGE_TOKENS, parse_format  # noqa: E402
from vllm_kvmix.kernels.page import PageStep, StepPlan  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from peers import PEER_BS, bench, reshape_and_cache_ms  # noqa: E402
from page_bench import kvmix_case  # noqa: E402

dev = "cuda"
HQ, HKV, D = 32, 8, 128
# (label, [(cached context, new tokens), ...])
CASES = [
    ("long: 1 x 8k fresh", [(0, 8192)]),
    ("long: 2 x 8k fresh", [(0, 8192)] * 2),
    ("cap: 8 x 1k fresh", [(0, 1024)] * 8),
    ("chunk: 2k new on 30k", [(30720, 2048)]),
    ("mixed: 8k fresh + 63 decodes at 8k", [(0, 8192)] + [(8000, 1)] * 63),
]


def flops(reqs):
    pairs = sum(n * ctx + n * (n + 1) // 2 for ctx, n in reqs)
    return 4 * D * HQ * pairs


def peers(reqs, q, k_new, v_new, gen):
    """FA3 bf16 / fp8 over a paged cache holding context + new tokens, plus reshape_and_cache_flash."""
    res = {}
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func
    except Exception as e:  # noqa: BLE001
        print("FA3 unavailable:", repr(e)[:200])
        return res
    seqs = [c + n for c, n in reqs]
    blocks = [triton.cdiv(s, PEER_BS) for s in seqs]
    nb = sum(blocks)
    k = torch.randn(nb, PEER_BS, HKV, D, dtype=torch.bfloat16, device=dev, generator=gen)
    v = torch.randn_like(k)
    perm = torch.randperm(nb, device=dev, dtype=torch.int32, generator=gen)
    width = max(blocks)
    bt = torch.zeros(len(reqs), width, dtype=torch.int32, device=dev)
    o = 0
    for i, b in enumerate(blocks):
        bt[i, :b] = perm[o : o + b]
        o += b
    cu = torch.tensor([0] + list(torch.tensor([n for _, n in reqs]).cumsum(0)), dtype=torch.int32, device=dev)
    seq = torch.tensor(seqs, dtype=torch.int32, device=dev)
    out = torch.empty_like(q)
    max_q = max(n for _, n in reqs)
    slot_mapping = torch.randperm(nb * PEER_BS, device=dev, generator=gen)[: q.shape[0]]
    rc = reshape_and_cache_ms(k_new, v_new, slot_mapping, nb) or 0.0
    f = lambda: flash_attn_varlen_func(q, k, v, max_q, cu, max(seqs), seqused_k=seq, softmax_scale=D**-0.5,  # noqa: E731
                                       causal=True, block_table=bt, out=out, fa_version=3)
    res["fa3_bf16"] = bench(f) + rc
    k8, v8, q8 = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn), q.to(torch.float8_e4m3fn)
    one = torch.ones(len(reqs), HKV, device=dev, dtype=torch.float32)
    f8 = lambda: flash_attn_varlen_func(q8, k8, v8, max_q, cu, max(seqs), seqused_k=seq,  # noqa: E731
                                        softmax_scale=D**-0.5, causal=True, block_table=bt, out=out, fa_version=3,
                                        q_descale=one, k_descale=one, v_descale=one)
    res["fa3_fp8"] = bench(f8) + rc
    return res


def kvmix(fmt, reqs, q, k_new, v_new, gen, fa):
    """ms of one layer's step with prefill rows on ``fa`` (or the Triton kernel: None); host plan ms."""
    seqs = [c + n for c, n in reqs]
    B, L = len(reqs), max(seqs)
    cache, stage, bt = kvmix_case(fmt, B, L + PAGE_TOKENS, gen)
    qsl_cpu = [0] + torch.tensor([n for _, n in reqs]).cumsum(0).tolist()
    qsl = torch.tensor(qsl_cpu, dtype=torch.int32, device=dev)
    seq = torch.tensor(seqs, dtype=torch.int32, device=dev)
    slots = torch.arange(B, dtype=torch.int32, device=dev)
    max_q = max(n for _, n in reqs)

    def make_plan():
        return StepPlan(qsl, seq, q.shape[0], max_q, qsl_cpu, L, HQ, HKV, seq_lens_cpu=seqs, flash_attn=fa,
                        head_size=D)

    plan = make_plan()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(10):
        make_plan()
    torch.cuda.synchronize()
    plan_ms = (time.perf_counter() - t0) * 100
    out = torch.empty_like(q)

    def step():
        st = PageStep(k_new, cache, stage, fmt, slots, bt, plan)
        st.write(k_new, v_new)
        st.attend(q, out, D**-0.5)
        st.keep()

    return bench(step), plan_ms


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--formats", default="kvmix-k4v2")
    args = ap.parse_args()
    from vllm_kvmix.vllm.flash_prefill import flash_attn_prefill

    fa = flash_attn_prefill()
    print(f"{torch.cuda.get_device_name()}; FlashAttention version {getattr(fa, 'fa_version', None)}", flush=True)
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []
    for label, reqs in CASES:
        T = sum(n for _, n in reqs)
        q = torch.randn(T, HQ, D, dtype=torch.bfloat16, device=dev, generator=gen)
        k_new = torch.randn(T, HKV, D, dtype=torch.bfloat16, device=dev, generator=gen)
        v_new = torch.randn_like(k_new)
        res = {k: (ms, None) for k, ms in peers(reqs, q, k_new, v_new, gen).items()}
        for fname in args.formats.split(","):
            fmt = parse_format(fname)
            if fa is not None:
                res[fname] = kvmix(fmt, reqs, q, k_new, v_new, gen, fa)
            res[fname + " triton"] = kvmix(fmt, reqs, q, k_new, v_new, gen, None)
            torch.cuda.empty_cache()
        base = res.get("fa3_bf16", (None,))[0]
        for name, (ms, plan_ms) in res.items():
            row = dict(case=label, kernel=name, ms=ms, tflops=flops(reqs) / (ms * 1e-3) / 1e12,
                       vs_fa3_bf16=(base / ms) if base else None, plan_ms=plan_ms)
            rows.append(row)
            sp = f"{base / ms:.2f}x" if base else "-"
            pm = f"  plan {plan_ms:.2f} ms/step" if plan_ms is not None else ""
            print(f"{label:<38}{name:<24}{ms:9.3f} ms {row['tflops']:7.1f} TFLOP/s  {sp}{pm}", flush=True)
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "prefill_bench.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
