"""The KV-cache budget ``python -m vllm_kvmix serve`` gives vLLM's CPU engine when the user sets none.

vLLM's CPU worker reserves ``--gpu-memory-utilization`` (0.9 by default) of the machine's memory and gives the
KV cache all of it that the worker itself does not hold when it sizes the cache.  That leaves the API server,
the engine-core process and every transient allocation of the serving steps a tenth of the machine -- 2.3 GiB
of 24 -- and under a long-prompt load the worker gets OOM-killed (every in-flight request then fails); it also
refuses to start at all when other processes hold more than that tenth.

The rule here: **KV cache = available memory - 2 x the checkpoint's bytes - 4 GiB, at most half the machine's
memory and at least 1 GiB**, measured when the server starts, on NUMA node 0 where the kernel lists nodes
(vLLM's CPU worker binds its memory to a node).  The checkpoint counts twice (the weights and their load-time
copy); the 4 GiB hold the three processes' own memory and the steps' transients; the half leaves room for
whatever else the machine starts later (the budget is fixed when the cache is allocated, other processes'
memory is not).  It applies only on a CPU machine and only when none of ``--kv-cache-memory-bytes``,
``--gpu-memory-utilization`` or ``VLLM_CPU_KVCACHE_SPACE`` is given: any of them overrides it.  vLLM's GPU
engine sizes its cache from GPU memory and is left alone.
"""

from __future__ import annotations

import os
from pathlib import Path

RESERVE_BYTES = 4 << 30
MIN_KV_BYTES = 1 << 30
USER_FLAGS = ("--kv-cache-memory-bytes", "--gpu-memory-utilization")
USER_ENV = "VLLM_CPU_KVCACHE_SPACE"


def checkpoint_bytes(model: str) -> int:
    """Bytes of the weight files of a local model directory (0 for a name that is not one)."""
    path = Path(model)
    if not path.is_dir():
        return 0
    return sum(f.stat().st_size for pattern in ("*.safetensors", "*.bin", "*.pt") for f in path.glob(pattern))


def available_bytes() -> int:
    """Memory the worker can get: the machine's available memory, or NUMA node 0's where the kernel lists it
    (vLLM's CPU worker binds its memory to one node; node 0 here, as in vLLM's single-node default)."""
    import psutil

    available = psutil.virtual_memory().available
    node = Path("/sys/devices/system/node/node0/meminfo")
    if node.exists():
        info = {}
        for line in node.read_text().splitlines():
            parts = line.split()  # "Node 0 MemFree: 10257804 kB"
            if len(parts) >= 4:
                info[parts[2].rstrip(":")] = int(parts[3]) * 1024
        keys = ("MemFree", "Active(file)", "Inactive(file)", "SReclaimable")
        if all(k in info for k in keys):
            available = min(available, sum(info[k] for k in keys))
    return available


def default_kv_cache_bytes(model: str, available: int | None = None, total: int | None = None) -> int:
    import psutil

    available = available_bytes() if available is None else available
    total = psutil.virtual_memory().total if total is None else total
    return max(MIN_KV_BYTES, min(available - 2 * checkpoint_bytes(model) - RESERVE_BYTES, total // 2))


def user_sets_kv_budget(args: list[str]) -> bool:
    if os.environ.get(USER_ENV, "") != "":
        return True
    return any(a == flag or a.startswith(flag + "=") for a in args for flag in USER_FLAGS)


def serve_args_with_kv_budget(args: list[str], on_cpu: bool) -> tuple[list[str], str | None]:
    """``vllm serve`` arguments with the CPU default budget added where it applies, and the line that says so."""
    if not on_cpu or user_sets_kv_budget(args):
        return args, None
    model = next((a for a in args if not a.startswith("-")), "")
    kv = default_kv_cache_bytes(model)
    note = (f"kvmix: KV cache budget {kv / 2**30:.1f} GiB on this CPU machine (available memory - 2 x checkpoint "
            f"- {RESERVE_BYTES >> 30} GiB, at most half the memory; set --kv-cache-memory-bytes, "
            f"--gpu-memory-utilization or {USER_ENV} to choose another)")
    return [*args, "--kv-cache-memory-bytes", str(kv)], note
