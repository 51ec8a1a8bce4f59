"""Decode attention and KV write on one GPU: kvmix Triton kernels vs vLLM's own kernels,
measured in the same process (Llama-3.1-8B heads: 32 q / 8 kv / d=128).

    python benchmarks/kernels/decode_bench.py [--out DIR]

Peers (need vLLM 0.26.0 on the device, see ../shared/gpu/README.md): FA3 bf16 and fp8 through
vllm_flash_attn (paged, block 16, shuffled blocks), vLLM's Triton unified attention bf16.
GB/s counts the K/V bytes each kernel must read (kvmix: packed codes + metadata).
Also checks every kvmix kernel against the PyTorch reference first (poisoned outputs).
"""

import argparse
import json
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from vllm_kvmix import reference  # noqa: E402
from vllm_kvmix.formats import parse_format  # noqa: E402
from vllm_kvmix.kernels.attention import paged_attention  # noqa: E402
from vllm_kvmix.kernels.write import write_kv  # noqa: E402

dev = "cuda"
HQ, HKV, D = 32, 8, 128
FORMATS = ["kvmix-k4v2-tok", "kvmix-k4v4-tok", "kvmix-k8v4-tok"]
KV_BS = 64  # kvmix page size
PEER_BS = 16


def bench(f):
    return triton.testing.do_bench(f, warmup=25, rep=200, return_mode="median")


def reshape_and_cache_ms(k, v, slot_mapping, n_blocks):
    """vLLM's bf16 cache write (block PEER_BS) of ``k`` / ``v`` at ``slot_mapping``; None without vLLM."""
    try:
        from vllm import _custom_ops as ops
    except Exception as e:  # noqa: BLE001
        print("reshape_and_cache_flash unavailable:", repr(e)[:200])
        return None
    kc = torch.zeros(n_blocks, PEER_BS, k.shape[1], k.shape[2], dtype=torch.bfloat16, device=k.device)
    vc = torch.zeros_like(kc)
    one = torch.ones((), device=k.device)
    return bench(lambda: ops.reshape_and_cache_flash(k, v, kc, vc, slot_mapping, "auto", one, one))


def copy_bw():
    x = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    y = torch.empty_like(x)
    return 2 * x.numel() / (bench(lambda: y.copy_(x)) * 1e-3) / 1e9


def kvmix_cache(fmt, B, L, bs, gen):
    """Pages for B requests of L tokens, shuffled; filled by the kvmix write kernel."""
    nb = B * L // bs
    lay = fmt.layout(D, bs)
    cache = torch.empty(nb, HKV, lay.head_page_bytes, dtype=torch.uint8, device=dev)
    bt = torch.randperm(nb, device=dev, dtype=torch.int32, generator=gen).view(B, L // bs)
    chunk = 1 << 16
    slots_all = (bt.long()[:, :, None] * bs + torch.arange(bs, device=dev)).view(-1)
    for i in range(0, B * L, chunk):
        n = min(chunk, B * L - i)
        k = torch.randn(n, HKV, D, device=dev, dtype=torch.bfloat16, generator=gen)
        k[:, :, 5] *= 8
        v = torch.randn(n, HKV, D, device=dev, dtype=torch.bfloat16, generator=gen)
        write_kv(cache, k, v, slots_all[i : i + n], fmt, bs)
    return cache, bt


def check_correctness(gen):
    """kvmix kernels vs the reference on GPU: mixed batch, poisoned output, fresh random data."""
    rows = []
    for name in FORMATS:
        fmt = parse_format(name)
        for B, L, qlen in [(4, 3000, 1), (3, 700, 37)]:
            cache, bt = kvmix_cache(fmt, B, ((L + KV_BS - 1) // KV_BS) * KV_BS, KV_BS, gen)
            # write check: the same tokens through kernel and reference
            k = torch.randn(50, HKV, D, device=dev, dtype=torch.bfloat16, generator=gen) * 3
            v = torch.randn(50, HKV, D, device=dev, dtype=torch.bfloat16, generator=gen)
            slots = torch.randperm(cache.shape[0] * KV_BS, device=dev, generator=gen)[:50]
            c1, c2 = cache.clone(), cache.clone()
            write_kv(c1, k, v, slots, fmt, KV_BS)
            reference.write_kv(c2, k, v, slots, fmt, KV_BS)
            write_exact = bool(torch.equal(c1, c2))
            seq = torch.full((B,), L, dtype=torch.int32, device=dev)
            qsl = [i * qlen for i in range(B + 1)]
            q = torch.randn(B * qlen, HQ, D, device=dev, dtype=torch.bfloat16, generator=gen)
            out = torch.full_like(q, float("nan"))
            paged_attention(q, cache, fmt, KV_BS, qsl, seq, bt, D**-0.5, out=out)
            ref = reference.paged_attention(q, cache, fmt, KV_BS, qsl, [L] * B, bt, D**-0.5)
            rel = ((out.float() - ref).norm() / ref.norm()).item()
            rows.append(dict(format=name, B=B, L=L, qlen=qlen, write_exact=write_exact, rel_err=rel,
                             nan=bool(torch.isnan(out).any())))
            print(f"check {name:12} B={B} L={L} qlen={qlen}: write bit-exact={write_exact} "
                  f"attention rel err={rel:.2e} nan={rows[-1]['nan']}", flush=True)
    return rows


def peers(B, L, q, out, gen):
    res = {}
    nb = B * L // PEER_BS
    k = torch.randn(nb, PEER_BS, HKV, D, dtype=torch.bfloat16, device=dev, generator=gen)
    v = torch.randn_like(k)
    bt = torch.randperm(nb, device=dev, dtype=torch.int32, generator=gen).view(B, L // PEER_BS)
    cu_q = torch.arange(B + 1, device=dev, dtype=torch.int32)
    seq = torch.full((B,), L, device=dev, dtype=torch.int32)
    kv_bytes = 2 * B * L * HKV * D
    try:
        from vllm.vllm_flash_attn import flash_attn_varlen_func

        f = lambda: flash_attn_varlen_func(q, k, v, 1, cu_q, L, seqused_k=seq, softmax_scale=D**-0.5,  # noqa: E731
                                           causal=True, block_table=bt, out=out, fa_version=3)
        res["fa3_bf16"] = (bench(f), kv_bytes * 2)
        k8, v8, q8 = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn), q.to(torch.float8_e4m3fn)
        one = torch.ones(B, HKV, device=dev, dtype=torch.float32)
        f8 = lambda: flash_attn_varlen_func(q8, k8, v8, 1, cu_q, L, seqused_k=seq, softmax_scale=D**-0.5,  # noqa: E731
                                            causal=True, block_table=bt, out=out, fa_version=3,
                                            q_descale=one, k_descale=one, v_descale=one)
        res["fa3_fp8"] = (bench(f8), kv_bytes)
    except Exception as e:  # noqa: BLE001
        print("FA3 unavailable:", repr(e)[:200])
    try:
        from vllm.v1.attention.ops.triton_unified_attention import unified_attention

        g = lambda: unified_attention(q, k, v, out, cu_q, 1, seq, L, D**-0.5, True, (-1, -1), bt, 0.0,  # noqa: E731
                                      None, None, None)
        res["vllm_triton_bf16"] = (bench(g), kv_bytes * 2)
    except Exception as e:  # noqa: BLE001
        print("vLLM Triton unavailable:", repr(e)[:200])
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="also time launch-option variants of k4v2")
    args = ap.parse_args()
    gen = torch.Generator(device=dev).manual_seed(0)
    checks = [] if args.skip_check else check_correctness(gen)
    bw = copy_bw()
    name = torch.cuda.get_device_name()
    print(f"device copy bandwidth {bw:.0f} GB/s ({name})", flush=True)
    rows = []
    for B, L in [(1, 32768), (16, 32768), (64, 8192), (256, 1024), (64, 32768)]:
        q = torch.randn(B, HQ, D, dtype=torch.bfloat16, device=dev, generator=gen)
        out = torch.empty_like(q)
        res = peers(B, L, q, out, gen)
        torch.cuda.empty_cache()
        for fname in FORMATS:
            fmt = parse_format(fname)
            cache, bt = kvmix_cache(fmt, B, L, KV_BS, gen)
            seq = torch.full((B,), L, dtype=torch.int32, device=dev)
            qsl = list(range(B + 1))
            from vllm_kvmix.kernels.attention import block_q_for, plan_query_blocks

            plan = plan_query_blocks(qsl, block_q_for(HQ, HKV, 1), dev)
            f = lambda: paged_attention(q, cache, fmt, KV_BS, qsl, seq, bt, D**-0.5, out=out,  # noqa: E731
                                        plan=plan, max_seq_len=L)
            res[fname] = (bench(f), B * L * HKV * fmt.bytes_per_token_head(D))
            if args.sweep and fname == "kvmix-k4v2-tok":
                from vllm_kvmix.kernels import attention as attn_mod

                saved = dict(attn_mod.LAUNCH)
                for nw, ns in [(4, 1), (4, 3), (8, 2), (2, 2)]:
                    attn_mod.LAUNCH.update(num_warps=nw, num_stages=ns)
                    res[f"{fname}-w{nw}s{ns}"] = (bench(f), res[fname][1])
                attn_mod.LAUNCH.clear()
                attn_mod.LAUNCH.update(saved)
            del cache
            torch.cuda.empty_cache()
        base = res.get("fa3_bf16", (None,))[0]
        for kname, (ms, byt) in res.items():
            gbs = byt / (ms * 1e-3) / 1e9
            rows.append(dict(B=B, L=L, kernel=kname, ms=ms, gbs=gbs, pct_copy=100 * gbs / bw,
                             speedup_vs_fa3_bf16=(base / ms) if base else None))
        torch.cuda.empty_cache()
    # write kernel vs reshape_and_cache_flash, one decode step of 256 sequences and a 4k prefill
    wrows = []
    for T in (256, 4096):
        k = torch.randn(T, HKV, D, dtype=torch.bfloat16, device=dev, generator=gen)
        v = torch.randn_like(k)
        slots = torch.randperm(T * 4, device=dev, generator=gen)[:T]
        for fname in FORMATS:
            fmt = parse_format(fname)
            cache = torch.zeros(T * 4 // KV_BS, HKV, fmt.layout(D, KV_BS).head_page_bytes, dtype=torch.uint8, device=dev)
            wrows.append(dict(T=T, kernel=fname, ms=bench(lambda: write_kv(cache, k, v, slots, fmt, KV_BS))))
        ms = reshape_and_cache_ms(k, v, slots, T * 4 // PEER_BS)
        if ms is not None:
            wrows.append(dict(T=T, kernel="reshape_and_cache_flash bf16", ms=ms))
    print("\nB      L  kernel              ms     GB/s  %copy  vs FA3 bf16")
    for r in rows:
        sp = f"{r['speedup_vs_fa3_bf16']:.2f}x" if r["speedup_vs_fa3_bf16"] else "-"
        print(f"{r['B']:<4}{r['L']:>7}  {r['kernel']:<18}{r['ms']:7.3f} {r['gbs']:8.0f}  {r['pct_copy']:5.1f}  {sp}")
    print("\nwrite kernels (ms):")
    for r in wrows:
        print(f"  T={r['T']:<5} {r['kernel']:<30} {r['ms']:.4f}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "decode_bench.json"), "w") as f:
        json.dump(dict(device=name, copy_gbs=bw, checks=checks, attention=rows, write=wrows), f, indent=1)


if __name__ == "__main__":
    main()
