"""vLLM 0.32: the official hooks kvmix uses there, and the patches still needed.

Compared with 0.26 (:mod:`vllm_kvmix.vllm.versions.v0_26`):

* **Official hook, no patch:** a backend's ``customize_spec`` (vLLM >= 0.28) receives each layer's spec from
  the model runner; kvmix's returns its own spec class with ``state_content_bytes`` = the packed bytes of one
  token and KV head, from which vLLM computes the page size.  This replaces 0.26's patch of
  ``Attention.get_kv_cache_spec`` (whose ``real_page_size_bytes`` override 0.32 no longer reads: the page
  would come out at bf16's size).  ``supported_kv_cache_layouts`` (LBHNC: head-major pages) makes vLLM hand
  the impl ``uint8[blocks, heads, 64, bytes/token]``, which is kvmix's ``[blocks, heads, head_page_bytes]``.
  Both are installed on kvmix's own backend class by :func:`adapt_backend`.
* **Unchanged targets, the same patches:** the dtype Literal and the name -> dtype map (vLLM has no dtype
  registry before 0.33), ``EngineArgs.create_engine_config``, ``get_kv_cache_configs``, the model runners' step
  and spec methods, the CPU linear layers' post-load repacking, the CUSTOM backend registration.
* **New patches:** the argparse choices cache (``arg_utils._compute_kwargs``), the CPU platform's backend
  choice (out-of-tree platform plugins are skipped when ``VLLM_TARGET_DEVICE=cpu``), a 64-token default
  block size for kvmix dtypes (the CPU platform defaults to 128 and splits blocks only for dense layouts),
  and sliding-window kvmix specs kept as kvmix specs when the hybrid KV-cache manager is disabled.

``tests/test_versions.py`` pins every target here; :data:`PATCHES` lists them with the upstream hook that
replaces each.
"""

from __future__ import annotations

import functools
from dataclasses import fields

from vllm_kvmix.formats import KVFormat, is_kvmix
from vllm_kvmix.vllm.versions import v0_26

VERSIONS = ("0.32.0",)


def patch_cache_dtype_literal() -> None:
    """0.26's Literal patch (:func:`v0_26.patch_cache_dtype_literal`), then clear argparse's cached choices.

    0.32 computes ``--kv-cache-dtype``'s choices once per config class (``vllm.engine.arg_utils._compute_kwargs``
    is ``functools.lru_cache``d); a parser built before the plugin loaded would keep the old list.  Remove
    with the Literal patch when vLLM's ``register_kv_cache_dtype`` (0.33) is the way in.
    """
    from vllm.engine import arg_utils

    v0_26.patch_cache_dtype_literal()
    cache_clear = getattr(arg_utils._compute_kwargs, "cache_clear", None)
    if cache_clear is None:
        raise RuntimeError("vllm.engine.arg_utils._compute_kwargs is no longer an lru_cache")
    cache_clear()


def patch_engine_args_validation() -> None:
    """0.26's check of kvmix names in ``EngineArgs.create_engine_config``, and a 64-token block size for them.

    A kvmix page is 64 tokens.  vLLM's CPU platform defaults to 128-token blocks and splits them into kernel
    blocks only for dense, unpadded layouts; asking for 64 when the user set no ``--block-size`` keeps one
    page per block on every platform.  Remove with the Literal patch (0.33: ``register_kv_cache_dtype``
    validates names; the block size then comes from the backend's ``get_preferred_block_size``).
    """
    from vllm.engine.arg_utils import EngineArgs

    from vllm_kvmix.formats import PAGE_TOKENS

    v0_26.patch_engine_args_validation()
    original = EngineArgs.create_engine_config
    if getattr(original, "_kvmix_block_size", False):
        return

    @functools.wraps(original)
    def create_engine_config(self, *args, **kwargs):
        if is_kvmix(self.kv_cache_dtype) and self.block_size is None:
            self.block_size = PAGE_TOKENS
        return original(self, *args, **kwargs)

    create_engine_config._kvmix_patched = True
    create_engine_config._kvmix_block_size = True
    EngineArgs.create_engine_config = create_engine_config


def patch_cpu_backend_selection() -> None:
    """Answer the kvmix backend for kvmix dtypes in vLLM's ``CpuPlatform.get_attn_backend_cls``.

    kvmix's platform plugin does this where vLLM loads platform plugins; from 0.28 vLLM skips them when
    ``VLLM_TARGET_DEVICE=cpu``, and ``CpuPlatform`` answers CPU_ATTN whatever backend is asked for.  Other
    dtypes go to the original.  Remove when the CPU platform honours the CUSTOM backend.
    """
    from vllm.platforms.cpu import CpuPlatform

    from vllm_kvmix.vllm.platform import kvmix_backend_path

    original = CpuPlatform.__dict__["get_attn_backend_cls"].__func__
    if getattr(original, "_kvmix_patched", False):
        return

    @functools.wraps(original)
    def get_attn_backend_cls(cls, selected_backend, attn_selector_config, num_heads=None):
        path = kvmix_backend_path(attn_selector_config)
        return path if path is not None else original(cls, selected_backend, attn_selector_config, num_heads)

    get_attn_backend_cls._kvmix_patched = True
    CpuPlatform.get_attn_backend_cls = classmethod(get_attn_backend_cls)


def patch_auto_plan() -> None:
    """0.26's kvmix-auto hook on the model runners' ``get_kv_cache_spec``, plus sliding-window kvmix specs with the
    hybrid manager disabled.

    With ``--disable-hybrid-kv-cache-manager`` vLLM rebuilds every sliding-window spec as a plain
    ``FullAttentionSpec`` (``replace_as``), which cannot take kvmix's ``kvmix_format`` field; the runner's specs
    are turned into kvmix full-attention specs with the window here first (what vLLM would do, keeping the
    packed page).  Remove with the post-load hook 0.26's patch waits for.
    """
    from vllm_kvmix.vllm.spec import KvmixFullAttentionSpec, KvmixSlidingWindowSpec

    v0_26.patch_auto_plan()

    def as_full(spec):
        kw = {f.name: getattr(spec, f.name) for f in fields(spec) if f.init and f.name != "extra_retained_tokens"}
        return KvmixFullAttentionSpec(**kw)

    def make(original):
        @functools.wraps(original)
        def get_kv_cache_spec(self):
            specs = original(self)
            if not self.vllm_config.scheduler_config.disable_hybrid_kv_cache_manager:
                return specs
            return {name: as_full(spec) if isinstance(spec, KvmixSlidingWindowSpec) else spec
                    for name, spec in specs.items()}

        return get_kv_cache_spec

    v0_26.wrap_runners("get_kv_cache_spec", make, "_kvmix_windows")


def adapt_backend() -> None:
    """vLLM >= 0.28's backend hooks on kvmix's backend class (official API, not a patch of vLLM).

    ``customize_spec(spec)``: the layer's plain spec -> kvmix's spec class of the same kind with the packed
    bytes per token and KV head (``state_content_bytes``), the page format's name, and uint8 pages.
    ``supported_kv_cache_layouts()``: head-major pages (LBHNC).
    """
    import torch
    from vllm.v1.kv_cache_interface import KVCacheLayout, SlidingWindowSpec, replace_as

    from vllm_kvmix.vllm.backend import KvmixAttentionBackend
    from vllm_kvmix.vllm.spec import KvmixFullAttentionSpec, KvmixSlidingWindowSpec

    def customize_spec(cls, spec):
        fmt = cls.FORMAT
        if not isinstance(fmt, KVFormat):
            raise TypeError(f"{cls.__name__}: kvmix-auto layers get a per-format backend before their spec is built")
        if isinstance(spec, (KvmixFullAttentionSpec, KvmixSlidingWindowSpec)):
            return spec
        if spec.head_size_v != spec.head_size:
            raise ValueError(f"{fmt.name}: layers with different K and V head sizes are not supported "
                             f"({spec.head_size} vs {spec.head_size_v})")
        target = KvmixSlidingWindowSpec if isinstance(spec, SlidingWindowSpec) else KvmixFullAttentionSpec
        return replace_as(spec, target, kvmix_format=fmt.name, dtype=torch.uint8,
                          state_content_bytes=fmt.bytes_per_token_head(spec.head_size))

    def supported_kv_cache_layouts(cls):
        return (KVCacheLayout.LBHNC,)

    KvmixAttentionBackend.customize_spec = classmethod(customize_spec)
    KvmixAttentionBackend.supported_kv_cache_layouts = classmethod(supported_kv_cache_layouts)


# (patch, what it touches, the upstream hook that replaces it)
PATCHES = (
    (patch_cache_dtype_literal, "vllm.config.cache.CacheDType (Literal) + CacheConfig/VllmConfig rebuilt, "
     "arg_utils._compute_kwargs cache cleared", "vllm.config.cache.register_kv_cache_dtype (0.33)"),
    (v0_26.patch_str_dtype_map, "vllm.utils.torch_utils.STR_DTYPE_TO_TORCH_DTYPE (dict entries)",
     "register_kv_cache_dtype (0.33)"),
    (patch_engine_args_validation, "EngineArgs.create_engine_config (kvmix names validated, block size 64)",
     "register_kv_cache_dtype validation (0.33)"),
    (v0_26.patch_kv_cache_config_logging, "vllm.v1.engine.core.get_kv_cache_configs (staging reserved, default max_num_seqs "
     "fitted to it, summary)",
     "none yet: no per-spec side allocation in vLLM"),
    (v0_26.patch_step_requests, "GPUModelRunner._update_states (V1, CPU runner), V2 prepare_inputs/finish_requests",
     "none on V1; V2's CommonAttentionMetadata.req_idx could replace the V2 wraps"),
    (patch_auto_plan, "GPUModelRunner.get_kv_cache_spec (V1, V2): kvmix-auto's plan, windows without hybrid",
     "none yet: no post-load hook for plugins"),
    (v0_26.patch_stash_qkv_norms, "UnquantizedLinearMethod.process_weights_after_loading (kvmix-auto only)",
     "none yet: no post-load hook before weight processing"),
    (patch_cpu_backend_selection, "CpuPlatform.get_attn_backend_cls (kvmix dtypes only)",
     "a CPU platform that honours the CUSTOM backend"),
    (v0_26.register_custom_backend, "AttentionBackendEnum.CUSTOM via vLLM's public register_backend (not a patch)",
     "-"),
    (adapt_backend, "KvmixAttentionBackend.customize_spec / supported_kv_cache_layouts (vLLM's hooks, not a patch)",
     "-"),
)


def apply() -> None:
    """Install every patch and hook (each is idempotent)."""
    for patch, _, _ in PATCHES:
        patch()
