"""Offline throughput of one KV-cache format through vLLM 0.26.0, one config per process.

Same workloads as ../shared/gpu/peer_bench.py (so rows compare with vLLM's own formats measured
by it on the same machine):
    cap  = 4 GiB KV budget, 256 x (1024 in + 256 out)   (capacity-bound)
    long = 0.85 GPU memory,  64 x (8192 in + 512 out)     (attention-bound decode)
    tpot = 0.85 GPU memory,  1 x (8192 in + 256 out)      (batch-1 decode latency)
    long-h100 = long with the KV budget bf16 gets on an 80 GB H100 (25756 blocks of 16 tokens, 50.3 GiB;
           ../shared/gpu/README.md): on a 141 GB H200, 0.85 of memory holds all 64 bf16 sequences, so `long`
           there times speed alone; this keeps the H100's capacity pressure (47 bf16 sequences fit) on an H200.

usage: python3 benchmarks/e2e/bench.py MODEL_DIR BACKEND KV_DTYPE WORKLOAD [--out FILE] [--max-num-seqs N]
                                      [--steps] [--eager]
``tpot`` rows: ``tpot_ms`` = the timed generate over its output tokens (the prompt's prefill, prefix-cached
by the warm-up, included once); ``ttft_ms`` = a one-token generate of the same prompt; ``decode_ms_per_token``
= the difference over the other output tokens (decode steps alone).
Prints one RESULT line (JSON) and appends it to FILE if given; the row's "run" is $RUN (e.g.
"commit abc1234, nvidia-h200"), the key the plot scripts select rows by.  --steps: the engine in-process and each
model-runner step timed (synchronized before and after, so the run itself is slower): the row gets
"steps" = {kind: [steps, tokens, seconds]} for steps with a prompt chunk ("prefill": chunked prefill
may carry decode rows too) and decode-only steps -- where the generate time goes.  --eager: no
torch.compile / CUDA graphs (a fresh machine starts in a fraction of the time).

Every format runs with the same max_num_seqs: the workload's concurrency, 128 on cap.  Page-scheme kvmix
formats keep one 8-bit staging page per running sequence and layer (18.5 KiB per KV head at d=128),
reserved for max_num_seqs sequences out of the KV budget: vLLM's H100 default (1024) would take 4.4 GiB
for Llama-3.1-8B, more than cap's whole budget (128 on cap: staging 0.55 GiB of its 4 GiB, 3.96x bf16's
tokens: ~25 bf16 sequences of 1280 tokens fit, ~100 at k4v2, 128 may run).  The engine's step costs more with more
sequences allowed, whatever the KV format (Llama-3.2-1B's bf16 step at 1 x 8k: 2.36 ms at max_num_seqs 1024,
1.70 ms at 1, H100), so the formats a row compares share the setting.  --max-num-seqs overrides it.
"""
import os
import random
import sys
import time

from result import emit

WORKLOADS = {"cap": (256, 1024, 256), "long": (64, 8192, 512), "tpot": (1, 8192, 256), "long-h100": (64, 8192, 512)}
# fixed KV budgets in bytes (the others take 0.85 of GPU memory)
KV_BYTES = {"cap": 4 << 30, "long-h100": 25756 * 16 * 32 * 2 * 8 * 128 * 2}


# kernel-name fragments -> category, first match wins (vLLM 0.26 / FA3 / cuBLAS / our kernels on Hopper)
_KERNEL_KINDS = (
    ("attention", ("flash", "fwd_", "kvmix", "page_decode", "_page", "_dequant", "_stage", "_pack", "_combine",
                   "unified_attention", "reshape_and_cache", "concat_and_cache")),
    ("gemm", ("gemm", "nvjet", "xmma", "cutlass", "matmul", "sm90_", "splitk")),
)
# per kind: (every, offset, at most) -- step i of that kind is traced if i % every == offset, up to `at most`
# steps (spread over the run: the first prompt-chunk steps of bf16 `cap` were small mixed ones)
PROFILE_STEPS = {"prefill": (4, 2, 6), "decode": (48, 24, 16)}


def _kernel_kind(name: str) -> str:
    low = name.lower()
    for kind, frags in _KERNEL_KINDS:
        if any(f in low for f in frags):
            return kind
    return "other"


def _time_steps() -> tuple[dict, dict]:
    """Wrap both of vLLM's GPU model runners' execute_model: synchronized wall time per step, by kind, and
    for some steps of each kind (PROFILE_STEPS) the GPU kernel time by category and by kernel
    (torch.profiler, CUDA activity; kernels replayed from CUDA graphs are traced too)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    kinds = {"prefill": [0, 0, 0.0], "decode": [0, 0, 0.0]}
    traced = {k: {"steps": 0, "tokens": 0, "wall_s": 0.0, "by_kind": {}, "by_kernel": {}} for k in kinds}

    def record(kind, prof, n, wall):
        row = traced[kind]
        row["steps"] += 1
        row["tokens"] += n
        row["wall_s"] += wall
        for ev in prof.key_averages():
            us = getattr(ev, "device_time_total", 0.0) or 0.0
            if us <= 0 or ev.device_type != torch.autograd.DeviceType.CUDA:
                continue
            cat = _kernel_kind(ev.key)
            row["by_kind"][cat] = row["by_kind"].get(cat, 0.0) + us / 1e6
            row["by_kernel"][ev.key[:80]] = row["by_kernel"].get(ev.key[:80], 0.0) + us / 1e6

    def wrap(cls):
        orig = cls.execute_model

        def execute_model(self, scheduler_output, *a, **kw):
            n, reqs = scheduler_output.total_num_scheduled_tokens, len(scheduler_output.num_scheduled_tokens)
            kind = "prefill" if n > reqs else "decode"
            every, offset, most = PROFILE_STEPS[kind]
            trace = n and kinds[kind][0] % every == offset and traced[kind]["steps"] < most
            torch.cuda.synchronize()
            t = time.perf_counter()
            if trace:
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    res = orig(self, scheduler_output, *a, **kw)
                    torch.cuda.synchronize()
            else:
                res = orig(self, scheduler_output, *a, **kw)
                torch.cuda.synchronize()
            wall = time.perf_counter() - t
            if n:
                row = kinds[kind]
                row[0] += 1
                row[1] += n
                row[2] += wall
                if trace:
                    record(kind, prof, n, wall)
            return res

        cls.execute_model = execute_model

    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    wrap(GPUModelRunner)
    try:
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner as RunnerV2
    except ImportError:
        RunnerV2 = None
    if RunnerV2 is not None and RunnerV2 is not GPUModelRunner:
        wrap(RunnerV2)
    return kinds, traced


def _traced_summary(traced: dict) -> dict:
    """Per kind: traced steps' mean wall and GPU time by category (ms per step) and the top kernels."""
    out = {}
    for kind, row in traced.items():
        s = row["steps"]
        if not s:
            continue
        top = sorted(row["by_kernel"].items(), key=lambda kv: -kv[1])[:12]
        out[kind] = {"steps": s, "tokens_per_step": round(row["tokens"] / s, 1),
                     "wall_ms": round(1e3 * row["wall_s"] / s, 3),
                     "gpu_ms": {k: round(1e3 * v / s, 3) for k, v in sorted(row["by_kind"].items())},
                     "top_kernels_ms": {k: round(1e3 * v / s, 3) for k, v in top}}
    return out


def main():
    model, backend, kvd, wl = sys.argv[1:5]
    steps = None
    if "--steps" in sys.argv:
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the worker in this process
        steps, traced = _time_steps()
    out_file = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else None
    from vllm import LLM, SamplingParams

    n, lin, lout = WORKLOADS[wl]
    kw = dict(model=model, load_format="dummy", skip_tokenizer_init=True, max_model_len=lin + lout + 16,
              kv_cache_dtype=kvd, attention_backend=None if backend == "AUTO" else backend)
    if "--max-num-seqs" in sys.argv:
        kw["max_num_seqs"] = int(sys.argv[sys.argv.index("--max-num-seqs") + 1])
    else:  # every format alike (above)
        kw["max_num_seqs"] = 128 if wl == "cap" else n
    if "--eager" in sys.argv:
        kw["enforce_eager"] = True
    if wl in KV_BYTES:
        kw["kv_cache_memory_bytes"] = KV_BYTES[wl]
    else:
        kw["gpu_memory_utilization"] = 0.85
    t0 = time.time()
    llm = LLM(**kw)
    t1 = time.time()
    rnd = random.Random(0)
    prompts = [{"prompt_token_ids": [rnd.randrange(1000, 100000) for _ in range(lin)]} for _ in range(n)]
    sp = SamplingParams(max_tokens=lout, ignore_eos=True, temperature=0.0, detokenize=False)
    warm = SamplingParams(max_tokens=8, ignore_eos=True, detokenize=False)
    llm.generate(prompts[:2], warm, use_tqdm=False)
    # again: the prefix-cached shape of the same prompts (Triton formats JIT-compile each new kernel
    # variant on first use; without this the timed run below paid ~12 s of compiles for kvmix)
    llm.generate(prompts[:2], warm, use_tqdm=False)
    ttft = None
    if wl == "tpot":  # the prompt alone (prefix-cached by the warm-up, as in the timed run): the first token's time
        t = time.time()
        llm.generate(prompts, SamplingParams(max_tokens=1, ignore_eos=True, temperature=0.0, detokenize=False),
                     use_tqdm=False)
        ttft = time.time() - t
    if steps is not None:  # from here on: the timed generate only
        for row in steps.values():
            row[:] = [0, 0, 0.0]
        for row in traced.values():
            row.update(steps=0, tokens=0, wall_s=0.0, by_kind={}, by_kernel={})
    t2 = time.time()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    t3 = time.time()
    ntok = sum(len(o.outputs[0].token_ids) for o in outs)
    cfg = llm.llm_engine.vllm_config.cache_config
    cg = llm.llm_engine.vllm_config.compilation_config.cudagraph_mode
    row = dict(kv_cache_dtype=kvd, backend=backend, workload=wl, blocks=cfg.num_gpu_blocks, cudagraph_mode=str(cg),
               max_num_seqs=llm.llm_engine.vllm_config.scheduler_config.max_num_seqs,
               block_size=cfg.block_size, out_tok_s=round(ntok / (t3 - t2), 1), init_s=round(t1 - t0, 1),
               gen_s=round(t3 - t2, 2))
    import torch
    import vllm

    import vllm_kvmix

    # the run's key (commit, machine; rows.sh passes $RUN) and what ran: vLLM, GPU, where vllm_kvmix came from
    row.update(model=os.path.basename(model.rstrip("/")), run=os.environ.get("RUN", ""), vllm=vllm.__version__,
               gpu=torch.cuda.get_device_name(),
               kvmix=f"{vllm_kvmix.__version__} {os.path.dirname(vllm_kvmix.__file__)}")
    if steps is not None:
        row["steps"] = {k: [c, n, round(sec, 2)] for k, (c, n, sec) in steps.items()}
        row["eager"] = "--eager" in sys.argv
        row["traced"] = _traced_summary(traced)
    if wl == "tpot":  # one request: generation time over its decode tokens (prefill included once)
        row["tpot_ms"] = round(1000 * (t3 - t2) / lout, 2)
        # and without the (cached) prompt: the timed run less a one-token run, over the other lout - 1 tokens
        row["ttft_ms"] = round(1000 * ttft, 2)
        row["decode_ms_per_token"] = round(1000 * (t3 - t2 - ttft) / (lout - 1), 3)
    emit(row, out_file)


if __name__ == "__main__":
    main()
