"""Run a model through vLLM's engine with one KV-cache dtype and measure it.

Used by the demo, the tests and the quality benchmarks.  Everything goes
through ``vllm.LLM`` (the path users run): perplexity comes from
``prompt_logprobs``, so every context token attends to K/V as stored in the
cache.  Call from a ``__main__``-guarded script (vLLM spawns processes).
"""

from __future__ import annotations

import gc
import math
import time
from dataclasses import dataclass, field

DEFAULT_PROMPTS = [
    "The capital of France is",
    "Alice was beginning to get very tired of sitting by her sister on the bank, and",
    "def fibonacci(n):",
    "The three primary colors are",
]

KV_BUDGET_BYTES = 256 << 20
# Page formats reserve an 8-bit staging page per layer for each of max_num_seqs
# running sequences out of the budget; evaluation runs a handful at a time.
MAX_NUM_SEQS = 16


@dataclass
class EngineResult:
    kv_cache_dtype: str
    num_blocks: int
    block_size: int
    init_s: float
    completions: list[str] = field(default_factory=list)
    completion_ids: list[list[int]] = field(default_factory=list)
    ppl: float | None = None
    nll_per_token: list[float] = field(default_factory=list)


def text_windows(tokenizer, text: str, n_tokens: int, n_windows: int, skip_chars: int = 3000) -> list[list[int]]:
    """Consecutive, non-overlapping token windows of a text (Gutenberg header skipped)."""
    ids = tokenizer(text[skip_chars:], add_special_tokens=False)["input_ids"]
    windows = [ids[i * n_tokens : (i + 1) * n_tokens] for i in range(n_windows)]
    return [w for w in windows if len(w) == n_tokens]


def make_llm(model: str, kv_cache_dtype: str, **overrides):
    from vllm import LLM

    kwargs = dict(
        model=model,
        dtype="bfloat16",
        kv_cache_dtype=kv_cache_dtype,
        max_model_len=2048,
        kv_cache_memory_bytes=KV_BUDGET_BYTES,
        enforce_eager=True,
        max_num_seqs=MAX_NUM_SEQS,
        seed=0,
    )
    kwargs.update(overrides)
    return LLM(**kwargs)


def run(
    model: str,
    kv_cache_dtype: str,
    prompts: list[str] | None = None,
    max_tokens: int = 24,
    ppl_windows: list[list[int]] | None = None,
    progress=None,
    **engine_overrides,
) -> EngineResult:
    """One engine: greedy completions of ``prompts`` and perplexity on ``ppl_windows``.

    ``progress(next_stage)``, if given, is called as each stage ends: engine started, completions done.
    """
    progress = progress or (lambda stage: None)
    from vllm import SamplingParams

    t0 = time.time()
    llm = make_llm(model, kv_cache_dtype, **engine_overrides)
    cache_config = llm.llm_engine.vllm_config.cache_config
    res = EngineResult(
        kv_cache_dtype=kv_cache_dtype,
        num_blocks=cache_config.num_gpu_blocks,
        block_size=cache_config.block_size,
        init_s=time.time() - t0,
    )
    progress("generate")
    try:
        if prompts:
            outs = llm.generate(
                prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0), use_tqdm=False
            )
            res.completions = [o.outputs[0].text for o in outs]
            res.completion_ids = [list(o.outputs[0].token_ids) for o in outs]
        progress("perplexity")
        if ppl_windows:
            res.nll_per_token = prompt_nll(llm, ppl_windows)
            res.ppl = math.exp(sum(res.nll_per_token) / len(res.nll_per_token))
    finally:
        del llm
        gc.collect()
    return res


def prompt_nll(llm, windows: list[list[int]]) -> list[float]:
    """Negative log-likelihood of every token after the first, over all windows."""
    from vllm import SamplingParams, TokensPrompt

    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], params, use_tqdm=False)
    nll = []
    for window, out in zip(windows, outs):
        for tok, lp in zip(window[1:], out.prompt_logprobs[1:]):
            nll.append(-lp[tok].logprob)
    return nll
