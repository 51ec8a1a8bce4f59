"""vLLM 0.34 (unit level: tested with vLLM's CUDA wheel installed on a CPU machine; no engine runs here).

Compared with 0.32 (:mod:`vllm_kvmix.vllm.versions.v0_32`):

* **Official hook, no patch:** kvmix's names are registered with ``vllm.config.cache.register_kv_cache_dtype``
  (vLLM >= 0.33): the handler maps each to ``torch.uint8`` and ``KVQuantMode.NONE`` (kvmix quantizes inside
  its own backend; vLLM's quantized-cache paths must not touch the bytes).  This replaces 0.26 / 0.32's
  patches of the ``CacheDType`` Literal and of ``STR_DTYPE_TO_TORCH_DTYPE``.
* **Same as 0.32:** the page size through ``customize_spec`` and head-major pages (vLLM's backend hooks), the
  engine-args check with a 64-token default block size, ``get_kv_cache_configs``, kvmix-auto's hook and
  windowed specs, the CPU linear layers' norms, the CPU backend choice, the CUSTOM registration.
* **Gone in 0.34:** the V1 GPU model runner (``vllm.v1.worker.gpu_model_runner``): only the V2 runner's
  step hooks are patched.
"""

from __future__ import annotations

from vllm_kvmix.formats import all_format_names
from vllm_kvmix.vllm.versions import v0_26, v0_32

VERSIONS = ("0.34.0",)


def register_kv_cache_dtypes() -> None:
    """Register every kvmix name through vLLM's ``register_kv_cache_dtype`` (official; idempotent)."""
    import torch
    from vllm.config.cache import is_known_kv_cache_dtype, register_kv_cache_dtype
    from vllm.v1.kv_cache_interface import KVQuantMode

    class KvmixDtype:
        """kvmix pages are raw bytes, quantized by the kvmix backend itself."""

        def torch_dtype(self):
            return torch.uint8

        def quant_mode(self):
            return KVQuantMode.NONE

    for name in all_format_names():
        if not is_known_kv_cache_dtype(name):
            register_kv_cache_dtype(name)(type("KvmixDtype", (KvmixDtype,), {"name": name}))


# (patch, what it touches, the upstream hook that replaces it)
PATCHES = (
    (register_kv_cache_dtypes, "vllm.config.cache.register_kv_cache_dtype (vLLM's hook, not a patch)", "-"),
    (v0_32.patch_engine_args_validation, "EngineArgs.create_engine_config (kvmix names validated, block size 64)",
     "the backend's preferred block size on every platform"),
    (v0_26.patch_kv_cache_config_logging, "vllm.v1.engine.core.get_kv_cache_configs (staging reserved, default max_num_seqs "
     "fitted to it, summary)",
     "none yet: no per-spec side allocation in vLLM"),
    (v0_26.patch_v2_step_requests, "V2 GPUModelRunner.prepare_inputs / finish_requests: the step's request ids",
     "CommonAttentionMetadata.req_idx (a stable per-request slot)"),
    (v0_32.patch_auto_plan, "GPUModelRunner.get_kv_cache_spec (V2): kvmix-auto's plan, windows without hybrid",
     "none yet: no post-load hook for plugins"),
    (v0_26.patch_stash_qkv_norms, "UnquantizedLinearMethod.process_weights_after_loading (kvmix-auto only)",
     "none yet: no post-load hook before weight processing"),
    (v0_32.patch_cpu_backend_selection, "CpuPlatform.get_attn_backend_cls (kvmix dtypes only)",
     "a CPU platform that honours the CUSTOM backend"),
    (v0_26.register_custom_backend, "AttentionBackendEnum.CUSTOM via vLLM's public register_backend (not a patch)",
     "-"),
    (v0_32.adapt_backend, "KvmixAttentionBackend.customize_spec / supported_kv_cache_layouts (vLLM's hooks)", "-"),
)


def apply() -> None:
    """Install every patch and hook (each is idempotent)."""
    for patch, _, _ in PATCHES:
        patch()
