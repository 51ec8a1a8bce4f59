"""Long contexts through one engine per KV format: prefill time of fresh 32k / 120k prompts and time per output
token at 1 x 128k and 4 x 100k (prompts prefix-cached), vLLM 0.26.0 offline ``LLM.generate``.

usage: python3 benchmarks/e2e/longctx.py MODEL_DIR BACKEND KV_DTYPE [--out FILE]

One engine, ``max_model_len`` 131072, 0.85 of GPU memory, ``max_num_seqs`` 4 for every format (the most
that run at once here; kvmix reserves staging per running sequence), dummy weights, CUDA graphs on.
- ``prefill_32k_s`` / ``prefill_120k_s``: wall time of ``generate`` with one output token for a prompt of
  32,768 / 122,880 tokens no earlier request shares (vLLM's chunked prefill; the 32k figure is the faster of
  two fresh prompts, the first 32k prompt having warmed the kernels up).
- ``tpot_1x128k_ms``: one request, 130,816 prompt tokens (prefilled once before, so cached) + 256 output
  tokens: the timed generate's time over 256.  ``tpot_4x100k_ms``: four such requests of 102,400 tokens
  decoding together, time over 256 steps.
--steps: the engine in-process and every prompt-chunk step plus every 16th decode step traced as ``bench.py
--steps`` does (synchronized steps, so the timed figures are slower); the row gets ``traced`` = {phase: the
traced steps' mean wall and GPU time by category and the top kernels}, where each prefill phase's chunks run
over a growing cached context.  --phases: a comma-separated subset of prefill_32k, prefill_120k, 1x128k, 4x100k
(default: all).
Prints one RESULT line (JSON) and appends it to FILE; the row's "run" is $RUN.
"""
import os
import random
import sys
import time

from result import emit

MAX_LEN = 131072
PREFILL = (32768, 122880)
TPOT = {"1x128k": (1, MAX_LEN - 256), "4x100k": (4, 102400)}
OUT_TOKENS = 256


def main():
    model, backend, kvd = sys.argv[1:4]
    out_file = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else None
    known = ["prefill_32k", "prefill_120k", *TPOT]
    phases = sys.argv[sys.argv.index("--phases") + 1].split(",") if "--phases" in sys.argv[:-1] else known
    if "--phases" in sys.argv[-1:] or set(phases) - set(known):
        sys.exit(f"--phases: a comma-separated subset of {','.join(known)}")
    traced = None
    if "--steps" in sys.argv:
        import bench

        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the worker in this process
        bench.PROFILE_STEPS.update(prefill=(1, 0, 1 << 30), decode=(16, 8, 1 << 30))
        _, traced = bench._time_steps()
    from vllm import LLM, SamplingParams

    t0 = time.time()
    llm = LLM(model=model, load_format="dummy", skip_tokenizer_init=True, max_model_len=MAX_LEN,
              kv_cache_dtype=kvd, attention_backend=None if backend == "AUTO" else backend,
              gpu_memory_utilization=0.85, max_num_seqs=4)
    init_s = time.time() - t0
    rnd = random.Random(0)

    def prompt(n):
        return {"prompt_token_ids": [rnd.randrange(1000, 100000) for _ in range(n)]}

    def timed(prompts, max_tokens):
        sp = SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0, detokenize=False)
        t = time.time()
        outs = llm.generate(prompts, sp, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == max_tokens for o in outs)
        return time.time() - t

    timed([prompt(8192)], 8)  # compiles / first launches of every kernel variant
    row = {}

    def put(key, value):  # each figure as soon as it is measured (a run stopped by its time limit keeps them)
        row[key] = round(value, 3)
        print("PART", key, row[key], flush=True)

    profiles = {}

    def traced_from_here():
        if traced is not None:
            for t in traced.values():
                t.update(steps=0, tokens=0, wall_s=0.0, by_kind={}, by_kernel={})

    def keep_traced(phase):
        if traced is not None:
            import bench

            profiles[phase] = bench._traced_summary(traced)

    if "prefill_32k" in phases:
        first = timed([prompt(PREFILL[0])], 1)
        traced_from_here()
        second = timed([prompt(PREFILL[0])], 1)
        keep_traced("prefill_32k")
        put("prefill_32k_s", min(first, second))
    if "prefill_120k" in phases:
        traced_from_here()
        put("prefill_120k_s", timed([prompt(PREFILL[1])], 1))
        keep_traced("prefill_120k")
    for name, (n, lin) in TPOT.items():
        if name not in phases:
            continue
        prompts = [prompt(lin) for _ in range(n)]
        put(f"fill_{name}_s", timed(prompts, 1))  # prefill once: cached for the timed run
        traced_from_here()
        put(f"tpot_{name}_ms", 1000 * timed(prompts, OUT_TOKENS) / OUT_TOKENS)
        keep_traced(name)

    import torch
    import vllm

    import vllm_kvmix

    cfg = llm.llm_engine.vllm_config
    row.update(kv_cache_dtype=kvd, backend=backend, workload="longctx", blocks=cfg.cache_config.num_gpu_blocks,
               block_size=cfg.cache_config.block_size, max_num_seqs=cfg.scheduler_config.max_num_seqs,
               max_num_batched_tokens=cfg.scheduler_config.max_num_batched_tokens,
               cudagraph_mode=str(cfg.compilation_config.cudagraph_mode), init_s=round(init_s, 1),
               model=os.path.basename(model.rstrip("/")), run=os.environ.get("RUN", ""), vllm=vllm.__version__,
               gpu=torch.cuda.get_device_name(),
               kvmix=f"{vllm_kvmix.__version__} {os.path.dirname(vllm_kvmix.__file__)}")
    if traced is not None:
        row.update(steps_synchronized=True, traced=profiles)
    emit(row, out_file)


if __name__ == "__main__":
    main()
