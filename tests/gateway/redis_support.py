"""A real ``redis-server`` (Debian's package) for the shared-state tests, and real gateway
processes (``python -m tokenmill.cli gateway``) in front of the fake upstream.

Redis listens on a unix socket in a temporary folder and on no TCP port (``--port 0``), so there
is no port to race for; persistence is off (``--save '' --appendonly no``). Without the package
the tests skip and say how to get it (``make test`` installs it when run as root).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.server_fixture import LISTENING

REPO = Path(__file__).resolve().parents[2]


def redis_server_path() -> str:
    path = shutil.which("redis-server")
    if path is None:
        pytest.skip("redis-server is not installed; `apt-get install -y redis-server` (make "
                    "test does it when run as root)")
    return path


class RedisServer:
    """One redis-server process on a unix socket; ``kill``/``pause`` simulate it going away."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.socket = folder / "redis.sock"
        self.url = f"unix://{self.socket}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        self.socket.unlink(missing_ok=True)
        self._log = (self.folder / "redis.log").open("ab")
        self.process = subprocess.Popen(
            [redis_server_path(), "--port", "0", "--unixsocket", str(self.socket),
             "--unixsocketperm", "700", "--save", "", "--appendonly", "no",
             "--dir", str(self.folder)],
            stdout=self._log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while not self.can_ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not start: "
                                   f"{(self.folder / 'redis.log').read_text()[-2000:]}")
            time.sleep(0.02)
        return self

    def client(self) -> Any:
        import redis

        return redis.Redis(unix_socket_path=str(self.socket), socket_timeout=5)

    def can_ping(self) -> bool:
        import redis

        try:
            return bool(self.client().ping())
        except (redis.RedisError, OSError):
            return False

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would: no goodbye to the clients."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        self._log.close()

    def pause(self) -> None:
        """SIGSTOP: Redis still accepts connections in the kernel but never answers (a hang)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)


class GatewayProcess:
    """``tokenmill gateway --config FILE --port P`` as a user runs it, on 127.0.0.1."""

    def __init__(self, config: dict[str, Any], folder: Path, name: str) -> None:
        self.config_path = folder / f"{name}.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = Path(tempfile.mkstemp(prefix=f"tokenmill-gateway-{name}-",
                                              suffix=".log")[1])
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def launch(self) -> GatewayProcess:
        """Start the process (returns at once; ``wait_ready`` waits for it). It binds port 0 and
        its log says which port it got, so no other process can take the port first."""
        env = {**os.environ, "TOKENMILL_NUM_THREADS": "1", "OMP_NUM_THREADS": "1",
               "HF_HUB_OFFLINE": "1"}
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "tokenmill.cli", "gateway", "--config",
                 str(self.config_path), "--host", "127.0.0.1", "--port", "0"],
                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        return self

    def wait_ready(self, deadline_s: float = 600.0) -> GatewayProcess:
        """Wait for the socket (the embedding model loads first; slow on a busy machine), then
        for /health to answer 200."""
        assert self.process is not None
        deadline = time.monotonic() + deadline_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if not self.url:
                found = LISTENING.search(self.log())
                if found:
                    self.url = f"http://127.0.0.1:{found.group(1)}"
            else:
                try:
                    if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                        return self
                except httpx.TransportError:
                    pass  # not answering yet
            time.sleep(0.1)  # polling the log and /health, not waiting for time to pass
        self.stop()
        raise RuntimeError(f"tokenmill gateway did not start:\n{self.log()[-4000:]}")

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
