"""Decode attention of the kvmix page scheme vs vLLM's kernels, in one process on one GPU.

    python benchmarks/kernels/page_bench.py [--out DIR]

Llama-3.1-8B heads (32 q / 8 kv / d=128), one query token per sequence, batch x context in
{1, 16, 64, 256} x {1k, 8k, 32k}.  kvmix: ``PageStep.attend`` alone (packed pages + the 8-bit own
page, output rotated back) -- as served (packed pages in CUDA, ``cuda_decode``) and on the Triton
kernel alone (rows `` triton``) -- and the whole step (``PageStep.run``: one CUDA launch that stages,
attends and merges splits, then the pack kernel; `` step graph``: replayed from a CUDA graph, with each
kernel's GPU time printed for k4v2).  Peers
(need vLLM 0.26.0 on the device): FA3 bf16 / fp8 (vllm_flash_attn, block 16, shuffled blocks)
and vLLM's int4_per_token_head Triton kernel (block 16), through the same entry points vLLM
calls.  GB/s counts the K/V bytes each kernel must read; the device copy bandwidth is measured
in the same run.  Caches hold random bytes with valid fp16 metadata: timing does not depend on
the values (tests/test_page_kernels.py checks the numbers).
"""

import argparse
import json
import os
import sys
import types

import torch
import triton

try:  # the installed package (wheel or editable); a source tree run without installing: the tree
    import vllm_kvmix  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", ".."))
from vllm_kvmix.formats import PAGE_TOKENS, parse_format, stage_layout  # noqa: E402
from vllm_kvmix.options import DECODE_KERNEL_ENV  # noqa: E402
from vllm_kvmix.kernels import cuda_decode  # noqa: E402
from vllm_kvmix.kernels.page import PageStep, StepPlan  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from peers import PEER_BS, bench, copy_bw, reshape_and_cache_ms  # noqa: E402
from peers import peers as fa_peers  # noqa: E402

dev = "cuda"
HQ, HKV, D = 32, 8, 128
FORMATS = ["kvmix-k4v2", "kvmix-k4v4", "kvmix-k8v4"]
# --experiments: builds of csrc/page_decode.cu with other preprocessor defines (e.g. KVMIX_MIN_BLOCKS=3), timed
# beside the served build (rows "... +D1+D2").  A code experiment is a patch (benchmarks/kernels/experiments/*.patch):
# apply it to the tree, then time its defines here.  What was tried and what won: docs/kernels.md.
SHAPES = [(1, 1024), (1, 8192), (1, 32768), (16, 1024), (16, 8192), (16, 32768),
          (64, 1024), (64, 8192), (64, 32768), (256, 1024), (256, 8192)]


def random_pages(n, hkv, nbytes, metas, gen):
    """uint8[n, hkv, nbytes] random codes; fp16 (scale, min) pairs at ``metas`` [(offset, count)]."""
    pages = torch.randint(0, 256, (n, hkv, nbytes), dtype=torch.uint8, device=dev, generator=gen)
    for off, count in metas:
        m = torch.empty(n, hkv, count, 2, dtype=torch.float16, device=dev)
        m[..., 0] = 0.02
        m[..., 1] = -1.0
        pages[:, :, off : off + 4 * count] = m.view(n, hkv, -1).view(torch.uint8)
    return pages


def kvmix_case(fmt, B, L, gen):
    lay = fmt.layout(D, PAGE_TOKENS)
    slay = stage_layout(D)
    n_pages = B * triton.cdiv(L, PAGE_TOKENS)
    cache = random_pages(n_pages, HKV, lay.head_page_bytes,
                         [(lay.k.meta_offset, D), (lay.v.meta_offset, PAGE_TOKENS * D // 64)], gen)
    stage = random_pages(B, HKV, slay.head_page_bytes,
                         [(slay.k.meta_offset, PAGE_TOKENS * D // 64), (slay.v.meta_offset, PAGE_TOKENS * D // 64)], gen)
    bt = torch.randperm(n_pages, device=dev, dtype=torch.int32, generator=gen).view(B, -1)
    return cache, stage, bt


def kvmix_bytes(fmt, B, seq):
    """Bytes attention reads: full pages packed, the own page's tokens at 8 bits."""
    own = (seq - 1) // PAGE_TOKENS
    packed = own * PAGE_TOKENS * fmt.bytes_per_token_head(D)
    staged = (seq - own * PAGE_TOKENS) * fmt.stage_bytes_per_seq_head(D) // PAGE_TOKENS
    return B * HKV * (packed + staged)


def peers(B, L, q, out, gen):
    """FA3 bf16 / fp8 and vLLM's Triton bf16 (peers.peers), plus vLLM's int4_per_token_head."""
    res = fa_peers(B, L, q, out, gen)
    nb = B * L // PEER_BS
    bt = torch.randperm(nb, device=dev, dtype=torch.int32, generator=gen).view(B, L // PEER_BS)
    cu_q = torch.arange(B + 1, device=dev, dtype=torch.int32)
    seq = torch.full((B,), L, device=dev, dtype=torch.int32)
    try:
        from vllm.v1.attention.backends.triton_attn import MIN_LAUNCH_GRID_SIZE_2D, TritonAttentionImpl
        from vllm.v1.attention.ops.triton_unified_attention import unified_attention
        from vllm.v1.kv_cache_interface import KVQuantMode

        content = 2 * (D // 2 + 4)  # [K int4 | K fp32 scale | V int4 | V fp32 scale] per (slot, head)
        kv = torch.randint(0, 256, (nb, HKV, PEER_BS, content), dtype=torch.uint8, device=dev, generator=gen)
        ns = types.SimpleNamespace(_k_scale_cache=None, _v_scale_cache=None)
        TritonAttentionImpl._ensure_scale_caches(ns, kv)
        kc, vc = kv.transpose(1, 2).split(content // 2, dim=-1)
        thr = MIN_LAUNCH_GRID_SIZE_2D // HKV
        segs = 16
        so = torch.empty(thr, HQ, segs, D, dtype=torch.float32, device=dev)
        sm = torch.empty(thr, HQ, segs, dtype=torch.float32, device=dev)
        se = torch.empty_like(sm)
        g = lambda: unified_attention(  # noqa: E731
            q, kc, vc, out, cu_q, 1, seq, L, D**-0.5, True, (-1, -1), bt, 0.0, None, None, None,
            seq_threshold_3D=thr, num_par_softmax_segments=segs, softmax_segm_output=so,
            softmax_segm_max=sm, softmax_segm_expsum=se, kv_quant_mode=KVQuantMode.INT4_PER_TOKEN_HEAD,
            k_scale_cache=ns._k_scale_cache, v_scale_cache=ns._v_scale_cache)
        res["vllm_int4_per_token_head"] = (bench(g), B * L * HKV * content)
    except Exception as e:  # noqa: BLE001
        print("int4_per_token_head unavailable:", repr(e)[:300], flush=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    ap.add_argument("--shapes", default=None, help="e.g. 16x32768,64x8192")
    ap.add_argument("--sweep", action="store_true", help="also time launch-option variants of k4v2 attention")
    ap.add_argument("--experiments", default="none",
                    help="builds of the CUDA source to time beside the served one: ';' between builds, '+' between "
                         "defines, e.g. 'KVMIX_MIN_BLOCKS=3;KVMIX_MIN_BLOCKS=5' (default 'none': the served build only)")
    args = ap.parse_args()
    experiments = [tuple(e.split("+")) for e in args.experiments.split(";") if e and e != "none"]
    shapes = SHAPES if not args.shapes else [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    gen = torch.Generator(device=dev).manual_seed(0)
    bw = copy_bw()
    name = torch.cuda.get_device_name()
    print(f"device copy bandwidth {bw:.0f} GB/s ({name})", flush=True)
    import vllm_kvmix

    where = dict(package=os.path.dirname(vllm_kvmix.__file__), version=vllm_kvmix.__version__,
                 kernel_source=str(cuda_decode.source_path()))
    print("vllm_kvmix {version} from {package}; CUDA decode kernel source {kernel_source}".format(**where), flush=True)
    rows = []
    for B, L in shapes:
        q = torch.randn(B, HQ, D, dtype=torch.bfloat16, device=dev, generator=gen)
        out = torch.empty_like(q)
        res = peers(B, L, q, out, gen)
        torch.cuda.empty_cache()
        seq_len = L - 32  # a typical decode step: the own page half full, nothing to pack
        for fname in FORMATS:
            fmt = parse_format(fname)
            cache, stage, bt = kvmix_case(fmt, B, L, gen)
            k = torch.randn(B, HKV, D, dtype=torch.bfloat16, device=dev, generator=gen)
            v = torch.randn_like(k)
            qsl = torch.arange(B + 1, dtype=torch.int32, device=dev)
            seq = torch.full((B,), seq_len, dtype=torch.int32, device=dev)
            slots = torch.arange(B, dtype=torch.int32, device=dev)
            plan = StepPlan(qsl, seq, B, 1, list(range(B + 1)), seq_len, HQ, HKV, head_size=D)
            st = PageStep(k, cache, stage, fmt, slots, bt, plan)
            res[fname] = (bench(lambda: st.attend(q, out, D**-0.5)), kvmix_bytes(fmt, B, seq_len))
            print(f"  {fname}: {plan.attn[4]} splits", flush=True)
            # as a decode step runs in vLLM: replayed from a CUDA graph (no host launch cost)
            res[fname + " graph"] = (triton.testing.do_bench_cudagraph(lambda: st.attend(q, out, D**-0.5)),
                                     res[fname][1])
            if fname == "kvmix-k4v2":
                kernel_times(lambda: st.attend(q, out, D**-0.5))
            os.environ[DECODE_KERNEL_ENV] = "triton"  # the same step on the Triton kernel alone
            res[fname + " triton"] = (bench(lambda: st.attend(q, out, D**-0.5)), res[fname][1])
            os.environ.pop(DECODE_KERNEL_ENV)
            if args.sweep and fname == "kvmix-k4v2":
                from vllm_kvmix.kernels import page as page_mod

                saved = dict(page_mod.LAUNCH)
                for nw, ns, nreg in [(2, 2, None), (2, 2, 168), (2, 2, 128), (2, 3, None), (4, 2, None), (4, 2, 128),
                                     (4, 3, None)]:
                    page_mod.LAUNCH.update(num_warps=nw, num_stages=ns, maxnreg=nreg)
                    res[f"{fname} w{nw}s{ns}r{nreg or ''}"] = (bench(lambda: st.attend(q, out, D**-0.5)), res[fname][1])
                page_mod.LAUNCH.clear()
                page_mod.LAUNCH.update(saved)
                pages = triton.cdiv(seq_len, PAGE_TOKENS)
                for ns in [1, 2, 4, 8, 16, 32, 64]:  # split-K factors (the rule picked plan.attn[4])
                    if ns * 4 <= pages and ns != plan.attn[4]:
                        st_ns = PageStep(k, cache, stage, fmt, slots, bt,
                                         StepPlan(qsl, seq, B, 1, list(range(B + 1)), seq_len, HQ, HKV, ns,
                                                  head_size=D))
                        res[f"{fname} split{ns}"] = (bench(lambda: st_ns.attend(q, out, D**-0.5)), res[fname][1])

            def full_step(cache=cache, stage=stage):  # one layer's share of a step (plan built once per step)
                PageStep(k, cache, stage, fmt, slots, bt, plan).run(q, k, v, out, D**-0.5)

            res[fname + " step"] = (bench(full_step), kvmix_bytes(fmt, B, seq_len))
            # the whole step as vLLM replays a decode batch (one CUDA graph), and each kernel's GPU time in it
            res[fname + " step graph"] = (triton.testing.do_bench_cudagraph(full_step), res[fname][1])
            # experiments of the CUDA source (csrc/page_decode.cu, off as served), against the rows above
            served = cuda_decode.compiled
            for defines in experiments:
                cuda_decode.compiled = (lambda k_bits, v_bits, bf16, head_size=D, d=defines:
                                        served(k_bits, v_bits, bf16, d, head_size))
                tag = "+" + "+".join(defines)
                try:
                    res[f"{fname} graph {tag}"] = (
                        triton.testing.do_bench_cudagraph(lambda: st.attend(q, out, D**-0.5)), res[fname][1])
                    res[f"{fname} step graph {tag}"] = (triton.testing.do_bench_cudagraph(full_step),
                                                        res[fname][1])
                except Exception as e:  # noqa: BLE001 (keep the served build's rows)
                    print(f"  experiment {tag} failed:", repr(e)[:300], flush=True)
                finally:
                    cuda_decode.compiled = served
            if fname == "kvmix-k4v2":
                print("  step kernels:", flush=True)
                kernel_times(full_step)
            del cache, stage
            torch.cuda.empty_cache()
        base = res.get("fa3_bf16", (None,))[0]
        for kname, (ms, byt) in res.items():
            gbs = byt / (ms * 1e-3) / 1e9
            rows.append(dict(B=B, L=L, kernel=kname, ms=ms, gbs=gbs, pct_copy=100 * gbs / bw,
                             speedup_vs_fa3_bf16=(base / ms) if base else None))
            sp = f"{base / ms:.2f}x" if base else "-"
            print(f"{B:<4}{L:>7}  {kname:<26}{ms:8.3f} {gbs:8.0f}  {100 * gbs / bw:5.1f}  {sp}", flush=True)
        torch.cuda.empty_cache()
    resources()
    try:
        wrows = write_bench(gen)
    except Exception as e:  # noqa: BLE001 (keep the attention rows)
        print("write bench failed:", repr(e)[:500], flush=True)
        wrows = []
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "page_bench.json"), "w") as f:
        json.dump(dict(device=name, copy_gbs=bw, installed=where, attention=rows, write=wrows), f, indent=1)


def kernel_times(fn, n=20):
    """GPU time of each kernel one call of ``fn`` launches (torch profiler), printed."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
    for ev in prof.key_averages():
        if ev.device_type.name == "CUDA" and ev.count >= n:
            us = getattr(ev, "device_time_total", 0.0) / n
            print(f"    kernel {ev.key[:60]:<60} {us:8.1f} us/call", flush=True)


def resources():
    """Registers, spills and shared memory of every compiled page-attention variant (what bounds occupancy)."""
    from vllm_kvmix.kernels import page as page_mod

    for fn in (page_mod._page_attention_kernel, page_mod._stage_kernel, page_mod._pack_kernel):
        for cache in fn.device_caches.values():
            for k in cache[0].values():
                md = k.metadata
                print(f"  {fn.fn.__name__}: warps {md.num_warps} stages {md.num_stages} regs {k.n_regs} "
                      f"spills {k.n_spills} shared {md.shared} B", flush=True)


def write_bench(gen):
    """The page scheme's write (stage + pack) vs reshape_and_cache_flash (bf16, block 16).

    decode: 256 sequences x 1 token, each at offset 63 of its page so every page fills and packs
    (the worst step); prefill: one 4096-token prompt (64 pages staged and packed); and a decode step's write
    as served (:func:`served_decode_write`).  Each case is timed
    launched eagerly (``ms``: host launch cost included, as a prefill step runs) and replayed from a CUDA
    graph (``graph_ms``: GPU time only, as vLLM runs decode batches); ``stage_graph_ms`` / ``pack_graph_ms``
    split kvmix's write into its two kernels.
    """
    rows = []
    for label, B, T in (("decode 256x1 (all pages fill)", 256, 256), ("prefill 1x4096", 1, 4096)):
        k = torch.randn(T, HKV, D, dtype=torch.bfloat16, device=dev, generator=gen)
        v = torch.randn_like(k)
        per = T // B
        qsl = torch.arange(0, T + 1, per, dtype=torch.int32, device=dev)
        seq_len = 64 if per == 1 else T
        seq = torch.full((B,), seq_len, dtype=torch.int32, device=dev)
        slots = torch.arange(B, dtype=torch.int32, device=dev)
        for fname in FORMATS:
            fmt = parse_format(fname)
            cache, stage, bt = kvmix_case(fmt, B, seq_len, gen)
            plan = StepPlan(qsl, seq, T, per, qsl.tolist(), seq_len, HQ, HKV, head_size=D)
            st = PageStep(k, cache, stage, fmt, slots, bt, plan)
            rows.append(dict(case=label, kernel=fname, ms=bench(lambda: st.write(k, v)),
                             graph_ms=triton.testing.do_bench_cudagraph(lambda: st.write(k, v)),
                             pack_graph_ms=triton.testing.do_bench_cudagraph(st.pack)))
            rows[-1]["stage_graph_ms"] = rows[-1]["graph_ms"] - rows[-1]["pack_graph_ms"]
        n_blocks = triton.cdiv(T, PEER_BS) * 2
        slots_bf16 = torch.randperm(n_blocks * PEER_BS, device=dev, generator=gen)[:T]
        ms = reshape_and_cache_ms(k, v, slots_bf16, n_blocks)
        if ms is not None:
            rows.append(dict(case=label, kernel="reshape_and_cache_flash bf16", ms=ms,
                             graph_ms=reshape_and_cache_ms(k, v, slots_bf16, n_blocks, graph=True)))
    rows += served_decode_write(gen, spread=False) + served_decode_write(gen, spread=True)
    print("\nwrite (ms; eager launch / CUDA graph):")
    for r in rows:
        eager = f"{r['ms']:.4f}" if r.get("ms") is not None else "-"
        print(f"  {r['case']:<44} {r['kernel']:<30} {eager} / {r.get('graph_ms', float('nan')):.4f}", flush=True)
    return rows


def served_decode_write(gen, B=256, L=1024, fill=4, spread=True):
    """A decode step's write as served: the CUDA decode launch stages each row's new token, then the pack
    launch packs the pages that filled -- ``fill`` of the ``B`` rows (a sequence fills a page every 64 steps,
    so ~B / 64 a step in a steady batch), rows ``B / fill`` apart (``spread``) or the first ``fill`` rows (one
    pack program packs them one after the other).  ``graph_ms`` = the step (``PageStep.run``) minus attention
    alone (``PageStep.attend``, no staging), both replayed from CUDA graphs; compare with
    reshape_and_cache_flash's row of the decode case (B tokens)."""
    rows = []
    label = f"decode {B}x1 as served ({fill} of {B} pages fill, {'spread' if spread else 'first rows'})"
    q = torch.randn(B, HQ, D, dtype=torch.bfloat16, device=dev, generator=gen)
    out = torch.empty_like(q)
    k = torch.randn(B, HKV, D, dtype=torch.bfloat16, device=dev, generator=gen)
    v = torch.randn_like(k)
    qsl = torch.arange(B + 1, dtype=torch.int32, device=dev)
    seq = torch.full((B,), L - 32, dtype=torch.int32, device=dev)
    seq[torch.arange(fill) * (B // fill if spread else 1)] = L  # these rows' new token is the last of their page
    slots = torch.arange(B, dtype=torch.int32, device=dev)
    for fname in FORMATS:
        fmt = parse_format(fname)
        cache, stage, bt = kvmix_case(fmt, B, L, gen)
        plan = StepPlan(qsl, seq, B, 1, list(range(B + 1)), L, HQ, HKV, head_size=D)
        st = PageStep(k, cache, stage, fmt, slots, bt, plan)
        step = triton.testing.do_bench_cudagraph(lambda: st.run(q, k, v, out, D**-0.5))
        attend = triton.testing.do_bench_cudagraph(lambda: st.attend(q, out, D**-0.5))
        rows.append(dict(case=label, kernel=fname, ms=None, graph_ms=step - attend, step_graph_ms=step,
                         attend_graph_ms=attend, pack_graph_ms=triton.testing.do_bench_cudagraph(st.pack)))
        del cache, stage
    return rows


if __name__ == "__main__":
    main()
