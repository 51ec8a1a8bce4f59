"""Prefill rows on vLLM's own FlashAttention kernel, over pages dequantized per step (CUDA).

Reads vLLM's ``v1.attention.backends.fa_utils`` (a public module, not a patch) for
the kernel and the FA version vLLM's own FLASH_ATTN backend would use on this GPU,
and the engine's limits from the config vLLM sets as current while it builds the
model.  :mod:`vllm_kvmix.kernels.prefill` does the rest.
"""

from __future__ import annotations

import functools

import torch


def scheduler_limits() -> tuple[int, int] | None:
    """(max_model_len, max_num_batched_tokens) of the engine being built (vLLM sets its config as current
    while it constructs the model's layers), or None outside one."""
    from vllm.config import get_current_vllm_config_or_none

    cfg = get_current_vllm_config_or_none()
    if cfg is None or cfg.model_config is None:
        return None
    return cfg.model_config.max_model_len, cfg.scheduler_config.max_num_batched_tokens


def block_table_width(max_model_len: int, block_size: int) -> int:
    """Columns of the block table vLLM's GPU model runner hands attention (0.26,
    ``v1/worker/gpu/model_runner.py`` ``initialize_kv_cache``; no DCP, decoder-only): max_model_len in
    blocks, rounded up to a multiple of 128 // block_size."""
    blocks = -(-max_model_len // block_size)
    if block_size <= 128:
        align = 128 // block_size
        blocks = -(-blocks // align) * align
    return blocks


@functools.cache
def flash_attn_prefill():
    """vLLM's FlashAttention varlen kernel (paged K/V) as the page scheme's prefill attention.

    Returns a callable with :func:`vllm_kvmix.kernels.prefill.reference_flash_attn`'s signature, or
    None where vLLM has none (CPU builds).  Reads vLLM's
    ``v1.attention.backends.fa_utils`` (not a patch): the kernel and the FA version vLLM's own
    FLASH_ATTN backend would use on this GPU (3 on Hopper).
    """
    if not torch.cuda.is_available():
        return None
    from vllm.v1.attention.backends import fa_utils

    if not fa_utils.is_flash_attn_varlen_func_available():
        return None
    version = fa_utils.get_flash_attn_version()
    varlen = fa_utils.flash_attn_varlen_func

    def flash_attn(q, k, v, out, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k, block_table, scale,
                   sliding_window=None, soft_cap=None):
        varlen(q=q, k=k, v=v, out=out, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q, seqused_k=seqused_k,
               max_seqlen_k=max_seqlen_k, softmax_scale=scale, causal=True,
               window_size=[sliding_window - 1, 0] if sliding_window else None, softcap=soft_cap or 0.0,
               block_table=block_table, fa_version=version)

    flash_attn.fa_version = version
    return flash_attn
