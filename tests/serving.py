"""A ``python -m vllm_kvmix serve`` process on 127.0.0.1 for the tests that talk to a server."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``with Server(model, log_path, *serve_args, env={...}) as s:`` -- up and healthy inside, stopped after."""

    def __init__(self, model: str, log: Path, *args: str, env: dict | None = None, start_timeout: float = 300):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self.cmd = [sys.executable, "-m", "vllm_kvmix", "serve", model, "--host", "127.0.0.1",
                    "--port", str(self.port), "--served-model-name", "m", *args]
        self.env = {**os.environ, "VLLM_LOGGING_LEVEL": "INFO", **(env or {})}
        self.start_timeout = start_timeout

    def __enter__(self) -> Server:
        import requests

        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=self.env)
        deadline = time.time() + self.start_timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.logs()[-3000:]}")
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(self.base + "/health", timeout=2).status_code == 200:
                    return self
            time.sleep(1)
        self.__exit__(None, None, None)
        raise AssertionError(f"server not up after {self.start_timeout:.0f} s:\n{self.logs()[-3000:]}")

    def __exit__(self, *exc) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._log.close()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def complete(self, prompt: str, max_tokens: int, **kw) -> str:
        import requests

        r = requests.post(self.base + "/v1/completions", json={
            "model": "m", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **kw}, timeout=300)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    def metric(self, name: str) -> float:
        """A counter or gauge from the server's Prometheus ``/metrics`` (summed over its label sets)."""
        import requests

        text = requests.get(self.base + "/metrics", timeout=10).text
        values = re.findall(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", text, flags=re.M)
        return sum(float(v) for v in values)
