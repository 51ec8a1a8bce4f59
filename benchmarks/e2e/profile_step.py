"""Where a decode step's time goes: one request through vLLM with the engine in-process, cProfile'd.

    python3 benchmarks/e2e/profile_step.py MODEL_DIR KV_DTYPE [--out DIR]

Warms up (prefill + 16 tokens), then profiles a generate of 2048 prompt + 64 output tokens and
prints the wall time and the top functions by cumulative and by own time (host side; GPU time
shows up as time spent waiting in synchronizing calls).
"""
import cProfile
import io
import os
import pstats
import sys
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def main():
    model, kvd = sys.argv[1:3]
    out = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else None
    from vllm import LLM, SamplingParams

    kw = dict(model=model, load_format="dummy", skip_tokenizer_init=True, max_model_len=4096,
              kv_cache_dtype=kvd, max_num_seqs=1, gpu_memory_utilization=0.85)
    llm = LLM(**kw)
    prompt = [{"prompt_token_ids": [1000 + i for i in range(2048)]}]
    llm.generate(prompt, SamplingParams(max_tokens=16, ignore_eos=True, detokenize=False), use_tqdm=False)
    prof = cProfile.Profile()
    t0 = time.time()
    prof.enable()
    llm.generate(prompt, SamplingParams(max_tokens=64, ignore_eos=True, detokenize=False), use_tqdm=False)
    prof.disable()
    dt = time.time() - t0
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("cumulative").print_stats(35)
    stats.sort_stats("tottime").print_stats(25)
    print(f"RESULT {kvd}: 2048 prefill + 64 decode tokens in {dt:.2f} s ({1000 * dt / 64:.1f} ms per output token)")
    print(buf.getvalue())
    if out:
        stats.dump_stats(os.path.join(out, f"profile-{kvd}.pstats"))


if __name__ == "__main__":
    main()
