"""A real `tokenmill serve` process on a free loopback port, for tests of the server and of the
gateway in front of it.

It runs the CLI as a user would (``python -m tokenmill.cli serve ...``), with one torch thread so
the test process keeps a core for the client side. ``stop()`` sends SIGTERM and waits, which also
exercises the graceful shutdown.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
KV_CACHE_BYTES = 2**28  # 256 MiB: 5824 tokens of the built-in model, plenty for the tests


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    def __init__(self, *extra_args: str, kv_cache_bytes: int = KV_CACHE_BYTES,
                 env: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkstemp(prefix="tokenmill-serve-", suffix=".log")[1])
        self.health_statuses: list[int] = []
        env = {**os.environ, "TOKENMILL_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
               "HF_HUB_OFFLINE": "1", **(env or {})}
        args = [sys.executable, "-m", "tokenmill.cli", "serve", "--port", str(self.port),
                "--kv-cache-memory", str(kv_cache_bytes), *extra_args]
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(args, cwd=REPO, env=env, stdout=self._log,
                                        stderr=subprocess.STDOUT)

    def wait_ready(self, deadline_s: float = 180.0) -> ServerProcess:
        """Poll /health until 200; records every status seen (503 while the model loads)."""
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tokenmill serve exited with {self.process.returncode}:\n"
                                   f"{self.log()}")
            try:
                status = httpx.get(self.url + "/health", timeout=5).status_code
            except httpx.TransportError:
                status = 0  # not listening yet
            if status:
                self.health_statuses.append(status)
            if status == 200:
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"tokenmill serve was not ready within {deadline_s}s:\n{self.log()}")

    def log(self) -> str:
        if not self._log.closed:  # stop() closes it; the file stays readable
            self._log.flush()
        return self.log_path.read_text()

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def stop(self, timeout_s: float = 60.0) -> int:
        if self.process.poll() is None:
            self.terminate()
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode
