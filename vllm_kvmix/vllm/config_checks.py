"""Engine settings kvmix cannot serve, refused when vLLM builds its configuration.

The kvmix platforms (:mod:`vllm_kvmix.vllm.platform`) call :func:`check` from vLLM's platform hook
``check_and_update_config``, in the process that parses the arguments, before any worker starts: a wrong
combination ends there with one message that names the cause and the fix, never in a worker's traceback.
vLLM's own dtypes are not looked at.
"""

from __future__ import annotations

from vllm_kvmix.formats import KVFormatError, is_kvmix, parse_any, stage_layout
from vllm_kvmix.staging import max_num_seqs_is_default, stage_rows


class KvmixConfigError(ValueError):
    """A configuration kvmix refuses; the message names the cause and the fix."""


def _refuse(name: str, cause: str, fix: str) -> KvmixConfigError:
    return KvmixConfigError(f"--kv-cache-dtype {name}: {cause}. {fix}")


def check(vllm_config) -> None:
    name = getattr(vllm_config.cache_config, "cache_dtype", None)
    if not is_kvmix(name):
        return
    other = "or serve it with --kv-cache-dtype auto / fp8"
    if vllm_config.speculative_config is not None:
        raise _refuse(name, "speculative decoding is not supported (a draft token the verifier rejects would "
                      "already be packed into a page)", f"Remove --speculative-config, {other}")
    parallel = vllm_config.parallel_config
    if getattr(parallel, "enable_dbo", False) or getattr(parallel, "use_ubatching", False):
        raise _refuse(name, "dual-batch overlap / micro-batching is not supported (two micro-batches would share "
                      "the staging slots of one step)", "Remove --enable-dbo")
    model = vllm_config.model_config
    if model is None:
        return
    if getattr(model, "use_mla", False):
        raise _refuse(name, "this model uses multi-head latent attention (MLA), whose compressed latent cache "
                      "kvmix does not store", f"Use a model with standard attention, {other}")
    if getattr(model, "is_encoder_decoder", False):
        raise _refuse(name, "encoder-decoder models are not supported (kvmix stores decoder self-attention "
                      "only)", f"Use a decoder-only model, {other}")
    if getattr(model, "is_attention_free", False):
        raise _refuse(name, "this model has no attention layers, so there is no KV cache to quantize",
                      "Leave --kv-cache-dtype at auto")
    try:
        parse_any(name).check_head_size(model.get_head_size())
    except KVFormatError as e:
        raise _refuse(name, str(e).removeprefix(f"{name}: "), f"Use a model with such a head size, {other}") from None
    _check_staging_fits(name, vllm_config, model)


def _check_staging_fits(name: str, vllm_config, model) -> None:
    """With an explicit KV budget (``--kv-cache-memory-bytes``; on CPU always): the staging slots of
    ``max_num_seqs`` sequences must leave room for blocks.  A budget found by profiling (GPU) is checked where
    vLLM sizes the cache (the version layer's ``get_kv_cache_configs`` wrapper)."""
    budget = getattr(vllm_config.cache_config, "kv_cache_memory_bytes", None)
    if not budget or max_num_seqs_is_default(vllm_config):
        return  # vLLM's default max_num_seqs: lowered to fit where the cache is sized
    parallel = vllm_config.parallel_config
    seqs = vllm_config.scheduler_config.max_num_seqs
    try:
        per_seq = (model.get_num_layers(parallel) * model.get_num_kv_heads(parallel)
                   * stage_layout(model.get_head_size()).head_page_bytes)
    except Exception:  # noqa: BLE001 -- a model shape vLLM computes differently: the later check still runs
        return
    staging = stage_rows(seqs) * per_seq
    if staging >= budget:
        raise _refuse(name, f"the 8-bit staging pages of --max-num-seqs {seqs} running sequences need "
                      f"{staging / 2**20:.1f} MiB, the whole KV-cache budget ({budget / 2**20:.1f} MiB)",
                      f"Lower --max-num-seqs (at most {max(budget // per_seq - 2, 0)} here) or raise "
                      f"--kv-cache-memory-bytes")
