"""The kvmix launches of one layer's prefill step, timed apart, with launch variants (no vLLM needed).

    python benchmarks/kernels/prefill_parts.py [--out DIR]

The e2e step profile (``bench.py --steps``, H200) put kvmix's own prefill launches at ~7% of a 16k-token
step (per step of 32 layers: ``_dequant_kernel`` 20 ms, ``_stage_kernel`` 10 ms, ``_pack_kernel`` 3 ms,
next to FA3's 70 ms).  This times each of them on the e2e workloads' fresh prompts (Llama-3.1-8B heads,
k4v2) against the bytes it must move, and the variants a change would pick from:

* ``_stage_kernel`` with TB tokens per program and num_warps (served: TB=16 for steps of one-token rows that
  the CUDA decode kernel does not take, 64 with a prompt);
* ``_dequant_kernel`` with 4 / 8 warps;
* the output rotation: a GEMM on the +-1 matrix in bf16 (served: exact products, fp32 accumulation), in
  bf16 with an fp32 output and a scale after it, and in fp32 (served before commit 97e1043).

H200 (``benchmarks/results/prefill-parts-h200.json``, the kernels before commit 97e1043): rotating
values in the dequant kernel took 0.35 of its 0.42 ms per 16k-token step and layer; the bf16 output GEMM
0.08 ms.  Values now stay rotated in the pages and the output GEMM rotates them back.

Prints one line per launch (median ms over triton.testing.do_bench, GB/s on the bytes it must move) and
writes DIR/prefill_parts.json.
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
from vllm_kvmix.kernels import page, prefill  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from page_bench import kvmix_case  # noqa: E402

dev = "cuda"
HQ, HKV, D = 32, 8, 128
CASES = [("long: 2 x 8k fresh", [(0, 8192)] * 2), ("cap: 16 x 1k fresh", [(0, 1024)] * 16)]


def ms(fn):
    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    fmt = parse_format("kvmix-k4v2")
    gen = torch.Generator(device=dev).manual_seed(0)
    rows = []

    def report(case, name, t, nbytes=None):
        gbs = nbytes / (t * 1e-3) / 1e9 if nbytes else None
        rows.append(dict(case=case, launch=name, ms=t, gb_s=gbs))
        print(f"{case:<22}{name:<44}{t:8.4f} ms" + (f" {gbs:7.0f} GB/s" if gbs else ""), flush=True)

    for label, reqs in CASES:
        seqs = [c + n for c, n in reqs]
        B, L, T = len(reqs), max(seqs), sum(n for _, n in reqs)
        k_new = torch.randn(T, HKV, D, dtype=torch.bfloat16, device=dev, generator=gen)
        v_new = torch.randn_like(k_new)
        cache, stage, bt = kvmix_case(fmt, B, L + PAGE_TOKENS, gen)
        qsl_cpu = [0] + torch.tensor([n for _, n in reqs]).cumsum(0).tolist()
        qsl = torch.tensor(qsl_cpu, dtype=torch.int32, device=dev)
        seq = torch.tensor(seqs, dtype=torch.int32, device=dev)
        slots = torch.arange(B, dtype=torch.int32, device=dev)
        plan = page.StepPlan(qsl, seq, T, max(n for _, n in reqs), qsl_cpu, L, HQ, HKV, seq_lens_cpu=seqs,
                             flash_attn=prefill.reference_flash_attn, head_size=D)
        st = page.PageStep(k_new, cache, stage, fmt, slots, bt, plan)
        slay = stage_layout(D)
        staged_bytes = T * HKV * slay.head_page_bytes // PAGE_TOKENS

        def stage(tb, warps):
            page._stage_kernel[(triton.cdiv(T, tb), HKV)](
                k_new, v_new, plan.tok_req, *st.common, st.stage, st.scratch, T,
                k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1),
                st.stage.stride(0), st.stage.stride(1), st.scratch.stride(0), st.scratch.stride(1),
                D=D, TB=tb, num_warps=warps, **st.stage_consts)

        ref = None
        for tb, warps in [(16, 4), (32, 4), (64, 4), (64, 8), (128, 8)]:
            st.scratch.zero_()
            stage(tb, warps)
            got = st.scratch.clone()
            same = "" if ref is None else f" ({int((got != ref).sum())} scratch bytes differ from TB=16)"
            ref = got if ref is None else ref
            report(label, f"_stage_kernel TB={tb} warps={warps}{same}", ms(lambda: stage(tb, warps)),
                   2 * k_new.numel() * 2 + staged_bytes)
        report(label, "_pack_kernel", ms(st.pack), staged_bytes + T * HKV * fmt.bytes_per_token_head(D))

        group = plan.prefill[0]
        assert len(plan.prefill) == 1, "one dequant group expected"
        n_out = group.num_pages * PAGE_TOKENS * HKV * D * 2 * 2

        def dequant(warps):
            k = torch.empty((group.num_pages, PAGE_TOKENS, HKV, D), dtype=torch.bfloat16, device=dev)
            v = torch.empty_like(k)
            return lambda: prefill._dequant_kernel[(group.num_pages, HKV)](
                group.pages, *st.common, bt, cache, st.stage, st.scratch, k, v, D**-0.5,
                cache.stride(0), cache.stride(1), bt.stride(0), st.stage.stride(0), st.stage.stride(1),
                st.scratch.stride(0), st.scratch.stride(1), k.stride(0), k.stride(1), k.stride(2),
                D=D, **st.bits, **st.stage_consts, num_warps=warps)

        report(label, f"pages {group.num_pages}", 0.0)
        for warps in (4, 8):
            report(label, f"_dequant_kernel warps={warps}", ms(dequant(warps)), n_out)
        o = torch.randn(T, HQ, D, dtype=torch.bfloat16, device=dev, generator=gen)
        out = torch.empty_like(o)
        s16 = prefill._sign_matrix(D, torch.bfloat16, o.device)
        signs = prefill._sign_matrix(D, torch.float32, o.device)
        rot_bytes = 2 * o.numel() * 2

        def rot_served():
            prefill.rotate_rows(o, out, [(0, T)])

        def rot_fp32():
            for c0 in range(0, T, prefill.ROT_ROWS):
                c1 = min(T, c0 + prefill.ROT_ROWS)
                out[c0:c1] = ((o[c0:c1].float() @ signs) * (1.0 / D**0.5)).to(out.dtype)

        report(label, "output rotation bf16 GEMM on +-1 (served)", ms(rot_served), rot_bytes)
        report(label, "output rotation fp32 (before commit 97e1043)", ms(rot_fp32), rot_bytes)
        try:
            torch.mm(o.view(-1, D), s16, out_dtype=torch.float32)
            report(label, "output rotation bf16 GEMM, fp32 out + scale",
                   ms(lambda: out.copy_((torch.mm(o.view(-1, D), s16, out_dtype=torch.float32) * D**-0.5).view_as(o))),
                   rot_bytes)
        except Exception as e:  # noqa: BLE001
            print("mm out_dtype unavailable:", repr(e)[:200])
        del cache, stage, st, plan
        torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "prefill_parts.json"), "w") as f:
        json.dump(dict(device=torch.cuda.get_device_name(), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
