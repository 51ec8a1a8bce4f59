"""What a result row is keyed by: the commit (``+changes`` when tracked files differ from it), vLLM's version,
the machine and the command that produced it."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return out.stdout.strip() + ("+changes" if dirty else "")
    except OSError:
        return "unknown"


def key() -> dict:
    """``commit``, ``vllm``, ``machine`` (host, CPUs, memory) and ``command`` of this process."""
    import psutil
    import vllm

    return {"commit": commit(), "vllm": vllm.__version__,
            "machine": f"{platform.node()} ({os.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.1f} GiB)",
            "command": " ".join(["python", *sys.argv])}
