"""Ray Serve path figures: 1 vs 2 replicas throughput, Ray path vs `tokenmill serve` direct latency
(p50/p99), and the straggler experiment's p99 with and without straggler handling.

    .venv/bin/python benchmarks/ray_serve.py                  # default workload
    .venv/bin/python benchmarks/ray_serve.py --requests 4 --concurrency 2 --max-tokens 4  # smoke

The script re-runs itself inside a fresh network namespace (``unshare -n``, only ``lo`` up; needs
root), as the tests do, so Ray can only use 127.0.0.1. One local Ray cluster (2 CPUs) is started;
each scenario deploys the application again (replicas load the built-in model, one torch thread
each) and is warmed up before it is measured. Every scenario sends the same workload: --requests
non-streaming /v1/completions at --concurrency, --max-tokens tokens each, temperature 0.

On 2 cores expect little gain from a second replica: both replicas share the same two cores.
"to slow" is the share of a slowed scenario's requests (warm-up included) the router sent to the
slowed replica: with handling on and --concurrency below the replica capacity (the engine's
max_num_seqs, 64, within --max-ongoing-requests, 32) it should be 0% once it is marked.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MODEL = "SmolLM2-135M-Instruct"
IN_NAMESPACE_ENV = "TOKENMILL_BENCH_IN_NETNS"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_load(url: str, args: argparse.Namespace, tag: str) -> dict[str, float]:
    """Send the workload; returns requests/s, output tokens/s and latency percentiles."""
    import httpx

    def one(i: int) -> tuple[float, int]:
        started = time.perf_counter()
        response = httpx.post(url + "/v1/completions", timeout=600, json={
            "model": MODEL, "prompt": f"{tag} request {i}: write about the sea and ships",
            "max_tokens": args.max_tokens, "temperature": 0})
        response.raise_for_status()
        return time.perf_counter() - started, response.json()["usage"]["completion_tokens"]

    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(one, range(args.concurrency)))  # warm-up
        started = time.perf_counter()
        results = list(pool.map(one, range(args.requests)))
        elapsed = time.perf_counter() - started
    latencies = sorted(seconds for seconds, _ in results)
    return {"requests_per_s": len(results) / elapsed,
            "tokens_per_s": sum(n for _, n in results) / elapsed,
            "p50_s": statistics.median(latencies),
            "p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))]}


def wait_for_degraded(url: str, args: argparse.Namespace, max_rounds: int = 10) -> bool:
    """Load the replicas until the router marks the slowed one (so the measured run is the
    steady state with handling on); False if it never did."""
    import httpx

    for _ in range(max_rounds):
        replicas = httpx.get(url + "/ray/fleet", timeout=30).json()["replicas"].values()
        if any(r.get("degraded") for r in replicas):
            return True
        run_load(url, args, "detect")
    return False


def routed_to_rank0(url: str) -> tuple[int, int]:
    """(requests routed to the rank-0 replica, to all), from the ingress's /ray/fleet (recovery
    probes are not counted there)."""
    import httpx

    fleet = httpx.get(url + "/ray/fleet", timeout=30).json()
    rank0 = {name for name, r in fleet["replicas"].items() if r.get("rank") == 0}
    routed = fleet["routed"]
    return sum(n for name, n in routed.items() if name in rank0), sum(routed.values())


def direct_server(args: argparse.Namespace) -> dict[str, float]:
    import httpx

    port = free_port()
    env = {**os.environ, "TOKENMILL_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "tokenmill.cli", "serve", "--port",
                                str(port), "--kv-cache-memory", str(2**27), "--num-threads", "1"],
                               cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError("tokenmill serve did not become ready")
            time.sleep(0.2)
        return run_load(url, args, "direct")
    finally:
        process.terminate()
        process.wait(60)


def ray_scenarios(args: argparse.Namespace) -> list[tuple[str, dict[str, float]]]:
    import ray
    from ray import serve

    from tokenmill.config import CacheConfig, EngineConfig
    from tokenmill.distributed.ray_serve import APP_NAME, build_application
    from tokenmill.distributed.ray_serve_config import FaultSettings, RayServeSettings
    from tokenmill.server.state import ServerSettings

    server = ServerSettings(engine=EngineConfig(cache=CacheConfig(kv_cache_memory=2**27),
                                                num_threads=1))
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
             log_to_driver=False)
    assert ray.util.get_node_ip_address() == "127.0.0.1"
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    slow = FaultSettings(step_delay_factor=args.slow_factor, replica_ranks=(0,))
    scenarios = [
        ("ray, 1 replica", RayServeSettings(num_replicas=1)),
        ("ray, 2 replicas", RayServeSettings(num_replicas=2)),
        (f"ray, 2 replicas, rank 0 slowed {args.slow_factor:g}x, straggler handling on",
         RayServeSettings(num_replicas=2, router_policy="least_loaded", faults=slow,
                          stats_period_s=0.5, straggler_persistence=2)),
        (f"ray, 2 replicas, rank 0 slowed {args.slow_factor:g}x, straggler handling off",
         RayServeSettings(num_replicas=2, router_policy="least_loaded", faults=slow,
                          stats_period_s=0.5, straggler_handling=False)),
    ]
    rows = []
    try:
        for name, settings in scenarios:
            serve.run(build_application(server, settings), name=APP_NAME, route_prefix="/")
            slowed = settings.faults.step_delay_factor > 1
            if slowed and settings.straggler_handling:
                name += "" if wait_for_degraded(url, args) else " (NOT marked in time)"
            to_slow, total = routed_to_rank0(url) if slowed else (0, 0)
            row = run_load(url, args, name)
            if slowed:  # share of the run's requests (its warm-up included) on the slowed one
                now_slow, now_total = routed_to_rank0(url)
                row["slow_share"] = (now_slow - to_slow) / max(1, now_total - total)
            rows.append((name, row))
    finally:
        serve.shutdown()
        ray.shutdown()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--slow-factor", type=float, default=2.0)
    args = parser.parse_args()
    if os.environ.get(IN_NAMESPACE_ENV) != "1":
        env = {**os.environ, IN_NAMESPACE_ENV: "1", "RAY_USAGE_STATS_ENABLED": "0"}
        command = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$@"', "sh",
                   sys.executable, *sys.argv]
        sys.exit(subprocess.run(command, env=env, check=False).returncode)
    assert [name for _, name in socket.if_nameindex()] == ["lo"]
    rows = [("tokenmill serve (direct)", direct_server(args)), *ray_scenarios(args)]
    print(f"\n{args.requests} requests, concurrency {args.concurrency}, {args.max_tokens} tokens "
          f"each, built-in model, 1 torch thread per engine\n")
    print(f"{'scenario':<64} {'req/s':>7} {'tok/s':>8} {'p50 s':>7} {'p99 s':>7} "
          f"{'to slow':>7}")
    for name, row in rows:
        share = f"{row['slow_share']:.0%}" if "slow_share" in row else "-"
        print(f"{name:<64} {row['requests_per_s']:>7.2f} {row['tokens_per_s']:>8.1f} "
              f"{row['p50_s']:>7.3f} {row['p99_s']:>7.3f} {share:>7}")
    one, two = rows[1][1], rows[2][1]
    print(f"\n2 vs 1 replica throughput: {two['tokens_per_s'] / one['tokens_per_s']:.2f}x; "
          f"Ray path added latency p50 {one['p50_s'] - rows[0][1]['p50_s']:+.3f} s, "
          f"p99 {one['p99_s'] - rows[0][1]['p99_s']:+.3f} s (1 replica vs direct)")


if __name__ == "__main__":
    main()
