"""Gateway latency: upstream direct vs through the gateway (miss, exact hit, semantic hit), and
the time each stage adds (p50/p99 from the gateway's own stage histogram samples), with the
semantic injection detector on, plus the two parts inside stages that the embedding feeds: the
detector (inside ``guardrails``) and the semantic cache's word-level verifier (inside
``semantic_cache``).

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gateway_latency.py [--requests 200]
        [--upstream-delay-ms 50] [--upstream-url URL] [--with-limits] [--redis-url URL]

By default the upstream is the tests' fake OpenAI server with a fixed answer delay, so the
numbers isolate what the gateway adds; --upstream-url measures against a real server instead.
--with-limits gives the tenant (never reached) requests/min and tokens/min limits, so the
ratelimit stage does its window work; --redis-url (implies --with-limits) keeps the windows and
the exact cache in that Redis (shared_state), to compare its ratelimit and exact_cache stage
times with the in-memory ones (e.g. a local `redis-server --port 6390 --save ''`).
The request's text is embedded once and reused by the detector, the semantic cache and RAG
(``embedding_memo``); the embedder's misses per request are printed to show it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timed(fn: Any, n: int) -> list[float]:
    samples = []
    for i in range(n):
        t0 = time.perf_counter()
        fn(i)
        samples.append(time.perf_counter() - t0)
    return samples


class StageTimer:
    """Wraps each composed stage's histogram so individual samples can be kept for p99."""

    def __init__(self, gw: Any) -> None:
        self.samples: dict[str, list[float]] = {}
        original = gw.metrics.stage_seconds.labels

        def labels(stage: str) -> Any:
            child = original(stage)
            bucket = self.samples.setdefault(stage, [])

            class Observer:
                def observe(self, value: float) -> None:
                    bucket.append(value)
                    child.observe(value)

            return Observer()

        gw.metrics.stage_seconds.labels = labels


class CallTimer:
    """Stands in for ``target`` and keeps the time of each call of its method ``method``."""

    def __init__(self, target: Any, method: str, samples: list[float]) -> None:
        self._target = target
        self._method = getattr(target, method)
        self._samples = samples
        setattr(self, method, self._timed)

    def _timed(self, *args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return self._method(*args, **kwargs)
        finally:
            self._samples.append(time.perf_counter() - start)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._target, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--upstream-delay-ms", type=float, default=50.0)
    parser.add_argument("--upstream-url", default=None)
    parser.add_argument("--with-limits", action="store_true")
    parser.add_argument("--redis-url", default=None)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import openai

    from tests.gateway.helpers import KEY_ACME, base_config
    from tests.gateway.upstream_server import FakeUpstream, ServerThread
    from tokenmill.gateway.app import create_app
    from tokenmill.gateway.config import config_from_dict

    upstream = None
    url = args.upstream_url
    if url is None:
        fake = FakeUpstream("bench")
        fake.delay_s = args.upstream_delay_ms / 1000
        fake.reply = "a fixed answer of a few words for the benchmark"
        upstream = ServerThread(fake.app).start()
        url = upstream.url
    config = base_config([url])
    config["tenants"][0]["models"] = ["*"]
    prefix = f"bench-{os.getpid()}"
    if args.with_limits or args.redis_url:
        config["tenants"][0].update(requests_per_minute=10**6, tokens_per_minute=10**9)
    if args.redis_url:
        config["shared_state"] = {"redis_url": args.redis_url, "key_prefix": prefix}
    config["guardrails"] = {"injection_detector": {"enabled": True}}
    app = create_app(config_from_dict(config))
    gw = app.state.gateway
    timer = StageTimer(gw)
    inner: dict[str, list[float]] = {"injection detector (in guardrails)": [],
                                     "query verifier (in semantic_cache)": []}
    guardrails = next(s for s in gw.stages if s.name == "guardrails")
    guardrails.detector = CallTimer(guardrails.detector, "score",
                                    inner["injection detector (in guardrails)"])
    semantic = next(s for s in gw.stages if s.name == "semantic_cache")
    semantic.index.verifier = CallTimer(semantic.index.verifier, "verify",
                                        inner["query verifier (in semantic_cache)"])
    gateway = ServerThread(app).start()
    model = "tiny"
    direct = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    via = openai.OpenAI(base_url=gateway.url + "/v1", api_key=KEY_ACME, max_retries=0)
    n = args.requests

    def ask(client: openai.OpenAI, text: str, temperature: float = 0) -> None:
        client.chat.completions.create(model=model, temperature=temperature, max_tokens=16,
                                       messages=[{"role": "user", "content": text}])

    rows = [("upstream direct", timed(lambda i: ask(direct, f"question {i}"), n))]
    rows.append(("gateway, cache miss", timed(lambda i: ask(via, f"miss question {i} "
                                                                 f"about topic {i * 7}"), n)))
    ask(via, "What is the capital of France?")
    rows.append(("gateway, exact hit", timed(lambda i: ask(via, "What is the capital of "
                                                                "France?"), n)))
    exact = next(s for s in gw.stages if s.name == "exact_cache")

    def clear_exact() -> None:
        """A paraphrase asked twice would otherwise be an exact hit."""
        if not args.redis_url:
            exact.store._items.clear()
            return
        import redis

        client = redis.Redis.from_url(args.redis_url)
        for key in client.scan_iter(f"{prefix}:exact:*"):
            client.delete(key)

    def semantic_hit(i: int) -> None:
        clear_exact()
        ask(via, "What's the capital of France?")  # a paraphrase the verifier explains

    rows.append(("gateway, semantic hit", timed(semantic_hit, n)))
    verifier_samples = list(inner["query verifier (in semantic_cache)"])  # from the hits
    for v in [*timer.samples.values(), *inner.values()]:
        v.clear()  # stage times are reported for the miss path only (every stage runs)
    misses_before = gw.embedder.num_misses
    timed(lambda i: ask(via, f"stage timing question {i} on subject {i * 13}"), n)
    misses_per_request = (gw.embedder.num_misses - misses_before) / n
    miss_stages = {k: list(v) for k, v in timer.samples.items()}
    print(f"state: {'redis ' + args.redis_url if args.redis_url else 'memory'}, limits "
          f"{'on' if args.with_limits or args.redis_url else 'off'}")
    inner["query verifier (in semantic_cache)"] = verifier_samples
    print(f"{n} sequential requests per row, upstream answer delay "
          f"{args.upstream_delay_ms if upstream else 'real'} ms")
    print(f"{'path':<24} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8}")
    for name, samples in rows:
        print(f"{name:<24} {pct(samples, 0.5) * 1e3:8.2f} {pct(samples, 0.99) * 1e3:8.2f} "
              f"{statistics.mean(samples) * 1e3:8.2f}")
    print("\ntime in each stage itself on a cache miss (excludes the stages after it)")
    print(f"{'stage':<24} {'p50 ms':>8} {'p99 ms':>8}")
    for stage, samples in miss_stages.items():
        if samples:
            print(f"{stage:<24} {pct(samples, 0.5) * 1e3:8.3f} {pct(samples, 0.99) * 1e3:8.3f}")
    print("\ninside the stages: the detector on the miss path, the verifier on the semantic hits")
    print(f"{'part':<36} {'p50 ms':>8} {'p99 ms':>8} {'calls':>6}")
    for part, samples in inner.items():
        if samples:
            print(f"{part:<36} {pct(samples, 0.5) * 1e3:8.3f} {pct(samples, 0.99) * 1e3:8.3f} "
                  f"{len(samples):6d}")
    print(f"embedding model calls per miss request (detector, semantic cache and RAG share "
          f"one memo): {misses_per_request:.2f}")
    gateway.stop()
    if upstream:
        upstream.stop()


if __name__ == "__main__":
    main()
