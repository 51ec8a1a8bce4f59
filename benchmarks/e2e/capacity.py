"""KV capacity at vLLM's defaults: one engine per process, nothing set but the KV dtype and the GPU memory share.

    python3 benchmarks/e2e/capacity.py MODEL_DIR KV_DTYPE GPU_MEMORY_UTILIZATION [--out FILE]

Starts ``LLM(model, load_format="dummy", kv_cache_dtype=..., gpu_memory_utilization=...)`` with vLLM's default
``max_num_seqs`` and CUDA graphs, ``max_model_len`` 16384 (a 128k context does not fit the smaller shares in
bf16), then runs 256 requests (512 prompt + 16 generated tokens), more than a lowered max_num_seqs, to show that
they all complete.  Prints one RESULT line (JSON: KV blocks, block size, KV tokens, requests completed, seconds) and
appends it to FILE; the row's "run" is $RUN (commit, machine).  The engine core's log says which max_num_seqs its
scheduler runs ("kvmix: max_num_seqs 1024 (vLLM's default) -> N"); this process's config keeps vLLM's default.
"""
import os
import sys
import time

from result import emit

MAX_MODEL_LEN = 16384


def main():
    model, kvd, util = sys.argv[1], sys.argv[2], float(sys.argv[3])
    out = sys.argv[sys.argv.index("--out") + 1] if "--out" in sys.argv else None
    from vllm import LLM, SamplingParams

    t0 = time.time()
    llm = LLM(model=model, load_format="dummy", skip_tokenizer_init=True, kv_cache_dtype=kvd,
              gpu_memory_utilization=util, max_model_len=MAX_MODEL_LEN, seed=0)
    start_s = time.time() - t0
    cfg = llm.llm_engine.vllm_config
    n = 256
    prompts = [{"prompt_token_ids": [(7 * i + j) % 30000 + 100 for j in range(512)]} for i in range(n)]
    t0 = time.time()
    outs = llm.generate(prompts, SamplingParams(max_tokens=16, ignore_eos=True, detokenize=False), use_tqdm=False)
    gen_s = time.time() - t0
    done = sum(len(o.outputs[0].token_ids) == 16 for o in outs)
    row = dict(kv_dtype=kvd, gpu_memory_utilization=util, blocks=cfg.cache_config.num_gpu_blocks,
               block_size=cfg.cache_config.block_size,
               kv_tokens=cfg.cache_config.num_gpu_blocks * cfg.cache_config.block_size,
               requests=n, completed=done, start_s=round(start_s, 1), generate_s=round(gen_s, 1),
               model=os.path.basename(model.rstrip("/")), run=os.environ.get("RUN", ""))
    emit(row, out)


if __name__ == "__main__":
    main()
