"""The only subpackage that imports vLLM.

``register()`` is the ``vllm.general_plugins`` entry point: it applies the
version patches in :mod:`vllm_kvmix.vllm.compat` (idempotent) in every vLLM
process.  ``cpu_platform()`` is the ``vllm.platform_plugins`` entry point.
"""

from __future__ import annotations


def register() -> None:
    from vllm_kvmix.vllm.compat import apply_compat_patches

    apply_compat_patches()


def cpu_platform() -> str | None:
    """Activate ``KvmixCpuPlatform`` exactly where vLLM would pick its CpuPlatform.

    Runs while vLLM resolves ``current_platform``: it must not import modules
    that need the platform (the class path is imported by vLLM afterwards).
    """
    from vllm.platforms import cpu_platform_plugin

    if cpu_platform_plugin() != "vllm.platforms.cpu.CpuPlatform":
        return None  # not a CPU build, or a CPU variant (e.g. zentorch): leave it
    return "vllm_kvmix.vllm.platform.KvmixCpuPlatform"
