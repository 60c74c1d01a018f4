"""A real `tokenmill serve` process on a loopback port the OS gives it, for tests of the server
and of the gateway in front of it.

It runs the CLI as a user would (``python -m tokenmill.cli serve --port 0 ...``), with one torch
thread so the test process keeps a core for the client side. The server binds port 0 itself and
its log says which port it got ("Uvicorn running on http://127.0.0.1:PORT", written as soon as
the socket is open, before the model loads), so no other process can take the port between a
test choosing it and the server binding it. ``stop()`` sends SIGTERM and waits, which also
exercises the graceful shutdown.
"""

from __future__ import annotations

import os
import re
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


LISTENING = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+) ")


def free_port() -> int:
    """A port that was free a moment ago. Only for programs that cannot bind port 0 and say
    which port they got (an outside binary such as llama-server): another process may take it
    before they bind."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    def __init__(self, *extra_args: str, kv_cache_bytes: int = KV_CACHE_BYTES,
                 env: dict[str, str] | None = None):
        self._port: int | None = None
        self.log_path = Path(tempfile.mkstemp(prefix="tokenmill-serve-", suffix=".log")[1])
        self.health_statuses: list[int] = []
        env = {**os.environ, "TOKENMILL_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
               "HF_HUB_OFFLINE": "1", **(env or {})}
        args = [sys.executable, "-m", "tokenmill.cli", "serve", "--port", "0",
                "--kv-cache-memory", str(kv_cache_bytes), *extra_args]
        self._log = self.log_path.open("w")
        self.process = subprocess.Popen(args, cwd=REPO, env=env, stdout=self._log,
                                        stderr=subprocess.STDOUT)

    @property
    def port(self) -> int:
        """The port the server bound, read from its log (waits for the socket to open)."""
        if self._port is None:
            self._port = self._wait_for_port()
        return self._port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _wait_for_port(self, deadline_s: float = 120.0) -> int:
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            found = LISTENING.search(self.log())
            if found:
                return int(found.group(1))
            if self.process.poll() is not None:
                raise RuntimeError(f"tokenmill serve exited with {self.process.returncode} "
                                   f"before listening:\n{self.log()}")
            time.sleep(0.05)  # polling the log, not waiting for time to pass
        self.stop()
        raise RuntimeError(f"tokenmill serve did not open its socket within {deadline_s}s:\n"
                           f"{self.log()}")

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
