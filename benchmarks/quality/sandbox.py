"""Run untrusted generated code in a separate, limited Python process -- never in the caller's.

``run(program, timeout)`` writes ``program`` into a fresh temporary directory and runs it with ``python -I``
(isolated: no user site directory, no PYTHON* variables) in its own session, with the directory as working directory and an empty environment, under resource limits
set in the child before it starts: address space, CPU seconds, file size, open files and no new processes.
On timeout the child's whole process group is killed.  Returns whether it exited 0 and why not.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass

MEMORY_BYTES = 1 << 30  # address space of the child
FILE_BYTES = 16 << 20  # largest file it may write
OPEN_FILES = 64


@dataclass
class Outcome:
    passed: bool
    reason: str  # "passed", "failed: <last stderr line>", "timeout"


def _limits(timeout: float) -> None:
    """In the child, before exec: resource limits (no new processes, bounded memory, CPU, files)."""
    import resource

    cpu = int(timeout) + 1
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_BYTES, FILE_BYTES))
    resource.setrlimit(resource.RLIMIT_NOFILE, (OPEN_FILES, OPEN_FILES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if os.getuid() != 0:  # root ignores RLIMIT_NPROC; the CPU and time limits still end a fork bomb's parent
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))


def run(program: str, timeout: float = 10.0) -> Outcome:
    with tempfile.TemporaryDirectory(prefix="kvmix-sandbox-") as tmp:
        path = os.path.join(tmp, "program.py")
        with open(path, "w", encoding="utf-8") as f:
            f.write(program)
        proc = subprocess.Popen(
            [sys.executable, "-I", path], cwd=tmp, env={"PATH": "/usr/bin:/bin", "HOME": tmp},
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            start_new_session=True, preexec_fn=lambda: _limits(timeout),
        )
        try:
            _, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            return Outcome(False, "timeout")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if proc.returncode == 0:
            return Outcome(True, "passed")
        lines = err.decode(errors="replace").strip().splitlines()
        return Outcome(False, "failed: " + (lines[-1][:200] if lines else f"exit {proc.returncode}"))
