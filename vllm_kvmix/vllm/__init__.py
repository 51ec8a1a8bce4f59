"""kvmix inside vLLM: the only subpackage that touches vLLM's internals (``evaluate.py`` and
``serve.py`` use vLLM's public ``LLM`` and CLI).

``register()`` is the ``vllm.general_plugins`` entry point and
``platform_plugin()`` the ``vllm.platform_plugins`` one.  Both go through
:mod:`vllm_kvmix.vllm.versions`: on a vLLM release kvmix supports they install
its adaptation; on any other they change nothing (one warning), so installing
the plugin never breaks vLLM for its own formats.

Modules: ``backend`` (attention backend: metadata builder = plan, impl = run),
``spec`` (KV-cache specs with the packed page size), ``platform`` (backend
selection for kvmix dtypes), ``autoplan`` (kvmix-auto after weight load),
``budget`` (staging bytes, startup summary), ``flash_prefill`` (vLLM's
FlashAttention for prefill rows), ``device`` (device checks, decode kernel
choice), ``versions`` (everything that depends on the vLLM release).
"""

from __future__ import annotations


def register() -> None:
    from vllm_kvmix.vllm import versions

    versions.apply()


def platform_plugin() -> str | None:
    """Activate a kvmix platform exactly where vLLM would pick CpuPlatform / CudaPlatform.

    Runs while vLLM resolves ``current_platform``: it must not import modules
    that need the platform (vLLM imports the returned class path afterwards).
    Returns None (vLLM's own platform) on a vLLM kvmix does not support.
    """
    from vllm_kvmix.vllm import versions

    if not versions.supported():
        return None
    from vllm.platforms import cpu_platform_plugin, cuda_platform_plugin

    if cpu_platform_plugin() == "vllm.platforms.cpu.CpuPlatform":
        return "vllm_kvmix.vllm.platform.KvmixCpuPlatform"
    if cuda_platform_plugin() == "vllm.platforms.cuda.CudaPlatform":
        return "vllm_kvmix.vllm.platform.KvmixCudaPlatform"
    return None  # another platform, or a CPU variant (e.g. zentorch): leave it
