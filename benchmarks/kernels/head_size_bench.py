"""Decode attention at head sizes 64, 128 and 256: the kvmix page scheme vs a bf16 baseline, in one process.

    python benchmarks/kernels/head_size_bench.py [--shapes 64x32768,256x8192] [--formats kvmix-k4v2] [--out DIR]
    python benchmarks/kernels/head_size_bench.py --head-sizes 256 --shapes 1x8192 --window 1024 --plan-len 8464

``--window W``: every kernel attends the last W tokens only (a sliding-window layer, e.g. Gemma-3's 1024); with
``--plan-len`` the split-K count is the one vLLM's decode graphs plan (the model's maximum length); row ``graph
ctx-splits``: the same step with the split-K count of the whole context (what the plan chose before it counted
the window's pages).  ``--splits 2,4,8,...``: the same graph at each of these split-K counts too (rows ``graph
splits=N``; every row records the count it ran with), to see which count each head size and shape wants.

Heads (query / KV) per head size: 64 -> Llama-3.2-1B (32 / 8), 128 -> Llama-3.1-8B (32 / 8), 256 -> Gemma-3-12B
(16 / 8); one query token per sequence, batch x context as given.  kvmix: ``PageStep.attend`` (packed pages + the
8-bit own page, output rotated back), on the CUDA decode kernel as served (row ``graph``: replayed from a CUDA
graph, as vLLM runs decode) and on the Triton page kernel alone (``triton``).  Baselines: FA3 bf16 and FA3
fp8 with scales 1.0 (vllm_flash_attn, paged, block 16, shuffled blocks) where vLLM is installed, else torch's
``scaled_dot_product_attention`` on contiguous bf16 K / V (``sdpa_bf16``: no paging, whichever backend torch
picks for GQA).  GB/s counts the K/V bytes each kernel must read; the device copy bandwidth is measured in the
same run.  Caches hold random bytes with valid fp16 metadata, as in page_bench.py (timing does not depend on
the values; tests/test_page_kernels.py checks the numbers).
"""

import argparse
import json
import os
import sys

import torch
import triton

try:  # the installed package (wheel or editable); a source tree run without installing: the tree
    import vllm_kvmix  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from vllm_kvmix.formats import PAGE_TOKENS, parse_format, stage_layout  # noqa: E402
from vllm_kvmix.options import DECODE_KERNEL_ENV  # noqa: E402
from vllm_kvmix.kernels.page import PageStep, StepPlan  # noqa: E402
from vllm_kvmix.kernels import cuda_decode  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from page_bench import random_pages  # noqa: E402
from peers import bench, copy_bw, paged_bf16  # noqa: E402

dev = "cuda"
HEADS = {64: (32, 8), 128: (32, 8), 256: (16, 8)}  # head size -> (query heads, KV heads)


def kvmix_case(fmt, d, hkv, B, L, gen):
    """(cache, staging, block table) of B sequences of L tokens at head size d."""
    lay, slay = fmt.layout(d, PAGE_TOKENS), stage_layout(d)
    n_pages = B * triton.cdiv(L, PAGE_TOKENS)
    groups = PAGE_TOKENS * d // 64
    cache = random_pages(n_pages, hkv, lay.head_page_bytes, [(lay.k.meta_offset, d), (lay.v.meta_offset, groups)], gen)
    stage = random_pages(B, hkv, slay.head_page_bytes, [(slay.k.meta_offset, groups), (slay.v.meta_offset, groups)],
                         gen)
    bt = torch.randperm(n_pages, device=dev, dtype=torch.int32, generator=gen).view(B, -1)
    return cache, stage, bt


def kvmix_bytes(fmt, d, hkv, B, seq, window=0):
    """Bytes attention reads: full pages packed (from the window's first page), the own page's tokens at 8 bits."""
    own = (seq - 1) // PAGE_TOKENS
    first = max(seq - window, 0) // PAGE_TOKENS if window else 0
    packed = (own - first) * PAGE_TOKENS * fmt.bytes_per_token_head(d)
    staged = (seq - own * PAGE_TOKENS) * fmt.stage_bytes_per_seq_head(d) // PAGE_TOKENS
    return B * hkv * (packed + staged)


def baselines(B, L, d, hq, hkv, q, out, gen, window=0):
    """{name: (ms, bytes)} of vLLM's attention over B x L tokens (the last ``window`` of them if given) -- FA3 bf16
    and FA3 fp8 (scales 1.0) if vLLM is installed, else torch SDPA bf16 -- and the name of the bf16 baseline."""
    kv_bytes = 2 * 2 * B * (min(window, L) if window else L) * hkv * d
    win = [window - 1, 0] if window else None
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func

        k, v, bt, cu_q, seq = paged_bf16(B, L, hkv, d, gen)
        f = lambda: flash_attn_varlen_func(q, k, v, 1, cu_q, L, seqused_k=seq, softmax_scale=d**-0.5,  # noqa: E731
                                           causal=True, block_table=bt, out=out, fa_version=3, window_size=win)
        res = {"fa3_bf16": (bench(f), kv_bytes)}
        try:
            k8, v8, q8 = (x.to(torch.float8_e4m3fn) for x in (k, v, q))
            del k, v
            one = torch.ones(B, hkv, device=dev, dtype=torch.float32)
            f8 = lambda: flash_attn_varlen_func(q8, k8, v8, 1, cu_q, L, seqused_k=seq,  # noqa: E731
                                                softmax_scale=d**-0.5, causal=True, block_table=bt, out=out,
                                                fa_version=3, q_descale=one, k_descale=one, v_descale=one,
                                                window_size=win)
            res["fa3_fp8"] = (bench(f8), kv_bytes // 2)
        except Exception as e:  # noqa: BLE001 (keep the bf16 row)
            print("FA3 fp8 unavailable:", repr(e)[:200], flush=True)
        return "fa3_bf16", res
    except Exception as e:  # noqa: BLE001
        print("FA3 unavailable, timing torch SDPA bf16 instead:", repr(e)[:200], flush=True)
    k = torch.randn(B, hkv, min(window, L) if window else L, d, dtype=torch.bfloat16, device=dev, generator=gen)
    v = torch.randn_like(k)
    qq = q.view(B, hq, 1, d)
    f = lambda: torch.nn.functional.scaled_dot_product_attention(qq, k, v, scale=d**-0.5, enable_gqa=True)  # noqa: E731
    ms = bench(f)
    del k, v
    return "sdpa_bf16", {"sdpa_bf16": (ms, kv_bytes)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shapes", default="64x32768,256x8192", help="batch x context, e.g. 64x32768,256x8192")
    ap.add_argument("--head-sizes", default="64,128,256")
    ap.add_argument("--formats", default="kvmix-k4v2,kvmix-k4v4,kvmix-k8v4")
    ap.add_argument("--plan-len", type=int, default=0,
                    help="the length the split-K count is planned for (vLLM's decode graphs: the model's maximum "
                         "length, e.g. 131072); default: each shape's context")
    ap.add_argument("--window", type=int, default=0, help="sliding window in tokens (0: none)")
    ap.add_argument("--splits", default="", help="split-K counts to time beside the planned one, e.g. 2,4,8,16,32,64")
    ap.add_argument("--experiments", default="none",
                    help="builds of the CUDA source to time beside the served one (graph rows '... graph +D1+D2'): "
                         "';' between builds, '+' between defines, as page_bench.py")
    args = ap.parse_args()
    experiments = [tuple(e.split("+")) for e in args.experiments.split(";") if e and e != "none"]
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    sweep = [int(x) for x in args.splits.split(",") if x]
    gen = torch.Generator(device=dev).manual_seed(0)
    bw = copy_bw()
    name = torch.cuda.get_device_name()
    print(f"device copy bandwidth {bw:.0f} GB/s ({name})", flush=True)
    print(f"{'d':>4} {'B':>4} {'L':>7}  {'kernel':<32}{'splits':>6}{'ms':>8} {'GB/s':>7} {'%copy':>6} {'vs bf16':>8} "
          f"{'vs fp8':>7}",
          flush=True)
    rows = []
    for d in map(int, args.head_sizes.split(",")):
        hq, hkv = HEADS[d]
        for B, L in shapes:
            q = torch.randn(B, hq, d, dtype=torch.bfloat16, device=dev, generator=gen)
            out = torch.empty_like(q)
            base_name, res = baselines(B, L, d, hq, hkv, q, out, gen, args.window)
            splits = {}  # kernel row -> the split-K count it ran with
            base_ms = res[base_name][0]
            fp8_ms = res.get("fa3_fp8", (None,))[0]
            torch.cuda.empty_cache()
            seq_len = L - 32  # a typical decode step: the own page half full
            window = args.window or None
            for fname in args.formats.split(","):
                fmt = parse_format(fname)
                cache, stage, bt = kvmix_case(fmt, d, hkv, B, L, gen)
                k = torch.randn(B, hkv, d, dtype=torch.bfloat16, device=dev, generator=gen)
                qsl = torch.arange(B + 1, dtype=torch.int32, device=dev)
                seq = torch.full((B,), seq_len, dtype=torch.int32, device=dev)
                slots = torch.arange(B, dtype=torch.int32, device=dev)
                plan = StepPlan(qsl, seq, B, 1, list(range(B + 1)), max(seq_len, args.plan_len), hq, hkv,
                                window=window, head_size=d)
                st = PageStep(k, cache, stage, fmt, slots, bt, plan)
                nbytes = kvmix_bytes(fmt, d, hkv, B, seq_len, args.window)
                attend = lambda: st.attend(q, out, d**-0.5, window)  # noqa: E731
                res[fname] = (bench(attend), nbytes)
                res[fname + " graph"] = (triton.testing.do_bench_cudagraph(attend), nbytes)
                splits[fname] = splits[fname + " graph"] = splits[fname + " triton"] = plan.attn[4]
                for ns in sweep:
                    if ns != plan.attn[4]:
                        st_ns = PageStep(k, cache, stage, fmt, slots, bt, StepPlan(
                            qsl, seq, B, 1, list(range(B + 1)), seq_len, hq, hkv, ns, window=window, head_size=d))
                        res[f"{fname} graph splits={ns}"] = (
                            triton.testing.do_bench_cudagraph(lambda: st_ns.attend(q, out, d**-0.5, window)), nbytes)
                        splits[f"{fname} graph splits={ns}"] = ns
                if window:  # the split-K count of the whole context, as planned before windows were counted
                    ctx_plan = StepPlan(qsl, seq, B, 1, list(range(B + 1)), max(seq_len, args.plan_len), hq, hkv,
                                        head_size=d)
                    st_ctx = PageStep(k, cache, stage, fmt, slots, bt, ctx_plan)
                    res[fname + " graph ctx-splits"] = (
                        triton.testing.do_bench_cudagraph(lambda: st_ctx.attend(q, out, d**-0.5, window)), nbytes)
                    splits[fname + " graph ctx-splits"] = ctx_plan.attn[4]
                served = cuda_decode.compiled
                for defines in experiments:  # builds with other defines, the same step
                    cuda_decode.compiled = (lambda k_bits, v_bits, bf16, head_size=d, window=False, dd=defines:
                                            served(k_bits, v_bits, bf16, dd, head_size, window))
                    tag = "+" + "+".join(defines)
                    try:
                        res[f"{fname} graph {tag}"] = (
                            triton.testing.do_bench_cudagraph(attend), nbytes)
                        splits[f"{fname} graph {tag}"] = plan.attn[4]
                    except Exception as e:  # noqa: BLE001 (keep the served build's rows)
                        print(f"  experiment {tag} failed:", repr(e)[:300], flush=True)
                    finally:
                        cuda_decode.compiled = served
                os.environ[DECODE_KERNEL_ENV] = "triton"  # the same step on the Triton kernel alone
                res[fname + " triton"] = (bench(attend), nbytes)
                os.environ.pop(DECODE_KERNEL_ENV)
                del cache, stage
                torch.cuda.empty_cache()
            for kname, (ms, byt) in res.items():
                gbs = byt / (ms * 1e-3) / 1e9
                rows.append(dict(d=d, hq=hq, hkv=hkv, B=B, L=L, window=args.window, plan_len=args.plan_len,
                                 splits=splits.get(kname), kernel=kname, ms=ms, gbs=gbs, pct_copy=100 * gbs / bw,
                                 baseline=base_name, speedup_vs_baseline=base_ms / ms,
                                 speedup_vs_fa3_fp8=fp8_ms / ms if fp8_ms else None))
                vs8 = f"{fp8_ms / ms:7.2f}x" if fp8_ms else "      -"
                ns_txt = splits.get(kname) or ""
                print(f"{d:>4} {B:>4} {L:>7}  {kname:<32}{ns_txt:>6}{ms:8.3f} {gbs:7.0f} {100 * gbs / bw:6.1f} "
                      f"{base_ms / ms:7.2f}x {vs8}", flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "head_size_bench.json"), "w") as f:
        json.dump(dict(device=name, copy_gbs=bw, attention=rows), f, indent=1)


if __name__ == "__main__":
    main()
