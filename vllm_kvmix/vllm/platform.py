"""The CPU platform with kvmix attention.

vLLM's CpuPlatform always answers CPU_ATTN.  ``KvmixCpuPlatform`` is a subclass
that answers the kvmix backend for ``kvmix-*`` cache dtypes and defers every
other question to vLLM's class.  It is installed through the
``vllm.platform_plugins`` entry point, which activates it exactly where vLLM's
own CPU platform would be detected.
"""

from __future__ import annotations

from vllm.platforms.cpu import CpuPlatform

from vllm_kvmix.formats import is_kvmix, parse_format



def kvmix_backend_path(attn_selector_config) -> str | None:
    """The kvmix backend class path for a layer, or None if it is not kvmix."""
    kv_cache_dtype = attn_selector_config.kv_cache_dtype
    if not is_kvmix(kv_cache_dtype):
        return None
    if attn_selector_config.use_mla or attn_selector_config.use_sparse:
        raise NotImplementedError(f"{kv_cache_dtype}: MLA / sparse attention models")
    from vllm_kvmix.vllm.backend import backend_class_path

    return backend_class_path(parse_format(kv_cache_dtype))


class KvmixCpuPlatform(CpuPlatform):
    @classmethod
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None) -> str:
        path = kvmix_backend_path(attn_selector_config)
        if path is not None:
            return path
        return super().get_attn_backend_cls(selected_backend, attn_selector_config, num_heads)
