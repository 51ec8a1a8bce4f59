"""Where a decode step's time goes: one request through vLLM with the engine in-process.

    python3 benchmarks/e2e/profile_step.py MODEL_DIR KV_DTYPE [--eager] [--context 8192] [--out DIR]

Warms up (prefill + 16 tokens), then, on the same (prefix-cached) prompt:
  * decode time per token: (generate 288 tokens - generate 32 tokens) / 256, prefill excluded;
  * the GPU kernels of a 32-token generate (torch.profiler, CUDA time by kernel) next to its wall time;
  * host functions of a 64-token generate (cProfile, by own time);
  * every Triton compile during the timed part (a compile there means a shape the warm-up missed).
Prints RESULT lines; with --out writes the tables to DIR/profile-KV_DTYPE.txt.
"""
import cProfile
import io
import json
import os
import pstats
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def _arg(name, default):
    return sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default


def _compile_log():
    """Triton JIT compiles (name, seconds) from now on."""
    from triton import knobs

    log, started = [], {}

    def before(*, key, fn, **kw):
        started[str(key)] = time.time()
        return False

    def after(*, key, fn, **kw):
        log.append((fn.name, round(time.time() - started.pop(str(key), time.time()), 2)))
        return False

    knobs.runtime.jit_cache_hook = before
    knobs.runtime.jit_post_compile_hook = after
    return log


def main():
    model, kvd = sys.argv[1:3]
    out = _arg("--out", None)
    context = int(_arg("--context", 8192))
    from vllm import LLM, SamplingParams

    kw = dict(model=model, load_format="dummy", skip_tokenizer_init=True, max_model_len=context + 320,
              kv_cache_dtype=kvd, max_num_seqs=1, gpu_memory_utilization=0.85, enforce_eager="--eager" in sys.argv)
    llm = LLM(**kw)
    prompt = [{"prompt_token_ids": [1000 + i % 30000 for i in range(context)]}]  # ids inside every vocabulary

    def gen(n):
        t0 = time.time()
        llm.generate(prompt, SamplingParams(max_tokens=n, ignore_eos=True, detokenize=False), use_tqdm=False)
        return time.time() - t0

    gen(16)
    gen(16)  # the prefix-cached variant of the prompt (its own kernel shapes)
    compiles = _compile_log()
    t32, t288 = gen(32), gen(288)
    tpot = 1000 * (t288 - t32) / 256
    report = io.StringIO()

    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        t_prof = gen(32)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70)
    cuda_us = sum(e.self_device_time_total for e in prof.key_averages())
    print(f"torch.profiler, generate 32 tokens: wall {t_prof * 1000:.1f} ms, GPU kernels {cuda_us / 1000:.1f} ms",
          file=report)
    print(table, file=report)

    cp = cProfile.Profile()
    cp.enable()
    t64 = gen(64)
    cp.disable()
    buf = io.StringIO()
    pstats.Stats(cp, stream=buf).sort_stats("tottime").print_stats(30)
    print(f"cProfile, generate 64 tokens: {t64 * 1000:.1f} ms", file=report)
    print(buf.getvalue(), file=report)
    print(f"Triton compiles during the timed runs: {compiles}", file=report)

    cfg = llm.llm_engine.vllm_config
    row = dict(kv_cache_dtype=kvd, context=context, eager="--eager" in sys.argv,
               cudagraph_mode=str(cfg.compilation_config.cudagraph_mode), decode_ms_per_token=round(tpot, 2),
               gpu_ms_per_token_prof=round(cuda_us / 1000 / 32, 2), wall_ms_per_token_prof=round(t_prof * 1000 / 32, 2),
               triton_compiles=len(compiles), blocks=cfg.cache_config.num_gpu_blocks)
    print("RESULT", json.dumps(row), flush=True)
    print(report.getvalue())
    if out:
        with open(os.path.join(out, f"profile-{kvd}{'-eager' if row['eager'] else ''}.txt"), "w") as f:
            f.write(json.dumps(row) + "\n" + report.getvalue())


if __name__ == "__main__":
    main()
