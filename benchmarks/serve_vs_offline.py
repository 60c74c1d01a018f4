"""Does HTTP work stall the engine? The same 16 requests offline (``LLM.generate``) and through
`tokenmill serve` (engine core in a thread of the server process) with 16 streaming clients.

    .venv/bin/python benchmarks/serve_vs_offline.py [--threads 1,2] [--output-len 128]

For each torch-thread count it prints the engine-side time per output token (TPOT: from each
request's first to last token, engine timestamps, mean over requests) offline and served, the
clients' own TPOT, and output tokens/s. If request parsing, detokenizing and SSE writing on the
event loop held the engine back (GIL, CPU), served TPOT would exceed offline TPOT; with 1 torch
thread a core is left for the HTTP side and the clients, with 2 they compete for the 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from serve_load import launched_server

from tokenmill.bench.tokens import load_counting_tokenizer
from tokenmill.bench.workload import LengthDist, WorkloadSpec, build_requests
from tokenmill.sse_parser import aiter_sse


def prompts(num: int, input_len: int) -> list[str]:
    spec = WorkloadSpec(input_len=LengthDist("fixed", input_len),
                        output_len=LengthDist("fixed", 1), seed=7)
    return [r.prompt for r in build_requests(spec, load_counting_tokenizer(None), num)]


def offline(texts: list[str], threads: int, output_len: int) -> dict[str, float]:
    from tokenmill import LLM, SamplingParams

    llm = LLM(kv_cache_memory=2**29, num_threads=threads)
    llm.generate(["warm up"], SamplingParams(max_tokens=4), use_tqdm=False)
    params = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0)
    started = time.perf_counter()
    outputs = llm.generate(texts, params, use_tqdm=False)
    wall = time.perf_counter() - started
    tpots = [(s.last_token_time - s.first_token_time) / (output_len - 1)
             for o in outputs for s in o.metrics]
    del llm
    gc.collect()
    return {"engine_tpot_ms": 1000 * sum(tpots) / len(tpots),
            "tok_per_s": len(texts) * output_len / wall}


def histogram_mean(url: str, name: str) -> tuple[float, float]:
    total = count = 0.0
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + "_sum"):
            total = float(line.rsplit(" ", 1)[1])
        elif line.startswith(name + "_count"):
            count = float(line.rsplit(" ", 1)[1])
    return total, count


async def stream_all(url: str, texts: list[str], output_len: int) -> list[float]:
    """All requests at once, streamed; each client's TPOT in seconds."""
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(text: str) -> float:
            body = {"model": None, "prompt": text, "max_tokens": output_len, "ignore_eos": True,
                    "temperature": 0, "stream": True}
            body["model"] = (await client.get(url + "/v1/models")).json()["data"][0]["id"]
            times = []
            async with client.stream("POST", url + "/v1/completions", json=body) as resp:
                async for sse in aiter_sse(resp):  # the shared SSE parser
                    if sse.data.startswith("{") and json.loads(sse.data)["choices"][0]["text"]:
                        times.append(time.perf_counter())
            return (times[-1] - times[0]) / max(len(times) - 1, 1)

        return await asyncio.gather(*(one(t) for t in texts))


def served(texts: list[str], threads: int, output_len: int) -> dict[str, float]:
    name = "tokenmill:request_time_per_output_token_seconds"
    with launched_server(threads, 2**29) as url:
        asyncio.run(stream_all(url, ["warm up"], 4))
        sum0, count0 = histogram_mean(url, name)
        started = time.perf_counter()
        client_tpots = asyncio.run(stream_all(url, texts, output_len))
        wall = time.perf_counter() - started
        sum1, count1 = histogram_mean(url, name)
    return {"engine_tpot_ms": 1000 * (sum1 - sum0) / (count1 - count0),
            "client_tpot_ms": 1000 * sum(client_tpots) / len(client_tpots),
            "tok_per_s": len(texts) * output_len / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    args = parser.parse_args()
    texts = prompts(args.num_requests, args.input_len)
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        rows.append((threads, offline(texts, threads, args.output_len),
                     served(texts, threads, args.output_len)))
    print(f"\n{args.num_requests} requests at once, {args.input_len}-token prompts, "
          f"{args.output_len} output tokens (ignore_eos, greedy)")
    print(f"{'threads':>7} {'offline TPOT':>13} {'served TPOT':>12} {'ratio':>6} "
          f"{'client TPOT':>12} {'offline tok/s':>14} {'served tok/s':>13}")
    for threads, off, srv in rows:
        print(f"{threads:>7} {off['engine_tpot_ms']:>11.1f}ms {srv['engine_tpot_ms']:>10.1f}ms "
              f"{srv['engine_tpot_ms'] / off['engine_tpot_ms']:>6.2f} "
              f"{srv['client_tpot_ms']:>10.1f}ms {off['tok_per_s']:>14.1f} "
              f"{srv['tok_per_s']:>13.1f}")


if __name__ == "__main__":
    main()
