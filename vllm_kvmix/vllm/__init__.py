"""The only subpackage that imports vLLM.

``register()`` is the ``vllm.general_plugins`` entry point: it applies the
version patches in :mod:`vllm_kvmix.vllm.compat` (idempotent) in every vLLM
process.  ``platform_plugin()`` is the ``vllm.platform_plugins`` entry point.
"""

from __future__ import annotations


def register() -> None:
    from vllm_kvmix.vllm.compat import apply_compat_patches

    apply_compat_patches()


def platform_plugin() -> str | None:
    """Activate a kvmix platform exactly where vLLM would pick CpuPlatform / CudaPlatform.

    Runs while vLLM resolves ``current_platform``: it must not import modules
    that need the platform (vLLM imports the returned class path afterwards).
    """
    from vllm.platforms import cpu_platform_plugin, cuda_platform_plugin

    if cpu_platform_plugin() == "vllm.platforms.cpu.CpuPlatform":
        return "vllm_kvmix.vllm.platform.KvmixCpuPlatform"
    if cuda_platform_plugin() == "vllm.platforms.cuda.CudaPlatform":
        return "vllm_kvmix.vllm.platform.KvmixCudaPlatform"
    return None  # another platform, or a CPU variant (e.g. zentorch): leave it
