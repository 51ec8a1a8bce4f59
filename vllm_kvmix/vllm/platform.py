"""vLLM's platforms, with kvmix attention for kvmix cache dtypes.

vLLM's CpuPlatform always answers CPU_ATTN, and CudaPlatform knows nothing of
kvmix.  ``KvmixCpuPlatform`` / ``KvmixCudaPlatform`` subclass vLLM's class,
answer the kvmix backend for ``kvmix-*`` cache dtypes, refuse the settings kvmix
cannot serve when vLLM checks its configuration (:mod:`vllm_kvmix.vllm.config_checks`),
and defer every other question to vLLM.  They are installed through the ``vllm.platform_plugins``
entry point (:func:`vllm_kvmix.vllm.platform_plugin`), which activates one
exactly where vLLM would detect its own CPU or CUDA platform.  The classes are
built on first access so that importing this module on a CPU machine never
imports vLLM's CUDA platform (and vice versa).
"""

from __future__ import annotations

import importlib

from vllm_kvmix.formats import is_kvmix, parse_any

# kvmix class name -> vLLM's platform class it extends
BASES = {
    "KvmixCpuPlatform": "vllm.platforms.cpu.CpuPlatform",
    "KvmixCudaPlatform": "vllm.platforms.cuda.CudaPlatform",
}


def kvmix_backend_path(attn_selector_config) -> str | None:
    """The kvmix backend class path for a layer, or None if it is not kvmix."""
    kv_cache_dtype = attn_selector_config.kv_cache_dtype
    if not is_kvmix(kv_cache_dtype):
        return None
    if attn_selector_config.use_mla or attn_selector_config.use_sparse:
        raise NotImplementedError(f"{kv_cache_dtype}: MLA / sparse attention models")
    from vllm_kvmix.vllm.backend import backend_class_path

    return backend_class_path(parse_any(kv_cache_dtype))


def _make(name: str, base_path: str) -> type:
    module, cls_name = base_path.rsplit(".", 1)
    base = getattr(importlib.import_module(module), cls_name)

    @classmethod
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None) -> str:
        path = kvmix_backend_path(attn_selector_config)
        if path is not None:
            return path
        return super(new_cls, cls).get_attn_backend_cls(
            selected_backend, attn_selector_config, num_heads
        )

    @classmethod
    def check_and_update_config(cls, vllm_config) -> None:
        super(new_cls, cls).check_and_update_config(vllm_config)
        from vllm_kvmix.vllm.config_checks import check

        check(vllm_config)  # kvmix dtypes only: settings kvmix cannot serve end here, with the fix

    new_cls = type(name, (base,), {"get_attn_backend_cls": get_attn_backend_cls,
                                   "check_and_update_config": check_and_update_config, "__module__": __name__})
    new_cls.__qualname__ = name
    globals()[name] = new_cls
    return new_cls


def __getattr__(name: str):
    if name in BASES:
        return _make(name, BASES[name])
    raise AttributeError(name)
