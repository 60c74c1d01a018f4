"""Start-up, overload and shutdown of a real `tokenmill serve` process of its own (a small one:
two running requests at most, one waiting), so SIGTERM can be tested without touching the
session server."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import httpx
import pytest

from tests.server.conftest import MODEL
from tests.server.test_load_and_metrics import wait_for
from tests.server_fixture import REPO, ServerProcess
from tokenmill.sse_parser import iter_sse

LONG = {"model": MODEL, "prompt": "Count forever:", "max_tokens": 1000, "ignore_eos": True,
        "temperature": 0, "stream": True}


class Stream:
    """A streaming completion read on a thread: the events it got and how it ended."""

    def __init__(self, url: str, body: dict):
        self.events: list[dict | str] = []
        self.first_event = threading.Event()
        self.status: int | None = None
        self.error: BaseException | None = None
        self._cancel = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(url, body), daemon=True)
        self.thread.start()

    def _run(self, url: str, body: dict) -> None:
        try:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as resp:
                self.status = resp.status_code
                for sse in iter_sse(resp):
                    data = sse.data
                    self.events.append(data if data == "[DONE]" else json.loads(data))
                    self.first_event.set()
                    if self._cancel.is_set():
                        return
        except BaseException as exc:  # noqa: BLE001 - inspected by the test
            self.error = exc
        finally:
            self.first_event.set()

    def cancel(self) -> None:
        self._cancel.set()

    def join(self) -> Stream:
        self.thread.join(120)
        assert not self.thread.is_alive()
        return self

    @property
    def text(self) -> str:
        return "".join(e["choices"][0]["text"] for e in self.events
                       if isinstance(e, dict) and e.get("choices"))


@pytest.fixture(scope="module")
def small_server():
    server = ServerProcess("--max-num-seqs", "2", "--max-waiting-requests", "1",
                           "--shutdown-timeout", "5", kv_cache_bytes=2**27)
    server.wait_ready()
    yield server
    server.stop()


def waiting(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    line = next(ln for ln in text.splitlines() if ln.startswith("tokenmill:num_requests_waiting"))
    return float(line.rsplit(" ", 1)[1])


def test_health_is_503_while_the_model_loads(small_server):
    # The socket opens before the model has loaded; the fixture saw that phase while polling.
    assert small_server.health_statuses[0] == 503
    assert small_server.health_statuses[-1] == 200
    assert "KV pool" in small_server.log() and small_server.url in small_server.log()


def test_full_waiting_queue_gives_429_with_retry_after(small_server):
    url = small_server.url
    # One at a time: two arrivals within one engine step would both be waiting at once, and
    # with max_waiting_requests=1 the second would (rightly) be refused.
    running: list[Stream] = []
    queued: Stream | None = None
    try:
        for _ in range(2):
            running.append(stream := Stream(url, LONG))
            assert stream.first_event.wait(60), "no first token"
            assert stream.status == 200, (stream.status, stream.error, stream.events)
        queued = Stream(url, LONG)  # max_num_seqs=2: this one waits
        wait_for(lambda: waiting(url) == 1, what="the third request to wait")
        refused = httpx.post(url + "/v1/completions", json={**LONG, "stream": False})
        assert refused.status_code == 429, refused.text
        assert int(refused.headers["retry-after"]) >= 1
        assert refused.headers["x-request-id"].startswith("cmpl-")  # quotable, like an answer's
        error = refused.json()["error"]
        assert error["type"] == "rate_limit_error"
        assert "max_waiting_requests=1" in error["message"]
    finally:
        streams = [*running, *([queued] if queued else [])]
        for stream in streams:
            stream.cancel()
        for stream in streams:
            stream.join()
    wait_for(lambda: waiting(url) == 0, what="the queue to empty")
    ok = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "Hi",
                                                   "max_tokens": 2}, timeout=60)
    assert ok.status_code == 200


def test_sigterm_lets_running_requests_finish_then_exits_cleanly(small_server):
    url = small_server.url
    short = Stream(url, {**LONG, "max_tokens": 40})
    assert short.first_event.wait(60)
    # 2500 tokens: finishing them within the 5 s shutdown timeout would take 500 tokens/s beside
    # another stream (a 2-core Xeon with AMX does ~185 alone; 1000 tokens in 10 s was reachable)
    endless = Stream(url, {**LONG, "max_tokens": 2500})
    assert endless.first_event.wait(60)
    small_server.terminate()
    # From now on new requests are refused (503 while draining, or the socket is closed).
    try:
        late = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "Hi",
                                                         "max_tokens": 2}, timeout=30)
        assert late.status_code == 503
    except httpx.TransportError:
        pass
    short.join()
    assert short.error is None and short.events[-1] == "[DONE]"
    finish = [e["choices"][0]["finish_reason"] for e in short.events
              if isinstance(e, dict) and e.get("choices")]
    assert finish[-1] == "length"
    endless.join()
    assert endless.status == 200, (endless.status, endless.error)
    assert "[DONE]" not in endless.events  # cut off after the timeout...
    last = endless.events[-1]
    assert isinstance(last, dict) and "shut down" in last["error"]["message"]  # ...and told why
    assert small_server.process.wait(60) == 0
    log = small_server.log()
    assert "shutting down" in log and "Traceback" not in log


def test_a_model_that_cannot_load_exits_with_a_clear_error(tmp_path):
    missing = tmp_path / "missing.gguf"
    done = subprocess.run(
        [sys.executable, "-m", "tokenmill.cli", "serve", "--port", "0",
         "--model", str(missing)], cwd=REPO, capture_output=True, text=True, timeout=120,
        check=False)
    assert done.returncode == 1
    assert "tokenmill: error:" in done.stderr and str(missing) in done.stderr


def test_a_negative_price_is_refused_before_loading():
    done = subprocess.run(
        [sys.executable, "-m", "tokenmill.cli", "serve", "--port", "0",
         "--price-per-hour", "-1"], cwd=REPO, capture_output=True, text=True, timeout=120,
        check=False)
    assert done.returncode == 1
    assert "--price-per-hour=-1.0 must be a finite number >= 0" in done.stderr
