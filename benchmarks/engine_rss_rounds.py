"""Does the engine alone (``LLM``, no server) grow resident memory over rounds of the soak's mix?

    .venv/bin/python benchmarks/engine_rss_rounds.py --rounds 6
    .venv/bin/python benchmarks/engine_rss_rounds.py --rounds 6 --same-mix
    ONEDNN_PRIMITIVE_CACHE_CAPACITY=0 .venv/bin/python benchmarks/engine_rss_rounds.py --rounds 6

The KV pool is touched first (it is allocated untouched and would otherwise grow RSS by up to its
size as blocks are first used), then each round generates the soak's mix (tokenmill/bench/soak.py:
random prompt lengths, max_tokens and n, shared system prompts) for ``--requests`` prompts.
After each round it prints RSS before and after ``gc.collect()`` + glibc's ``malloc_trim(0)``,
and the number of live Python objects, to tell a Python leak (objects grow), freed memory glibc
keeps (trim gives it back) and native memory still held (neither) apart.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import psutil
import torch

from tokenmill.bench.soak import SoakMix, plan_requests
from tokenmill.bench.soak_checks import mib
from tokenmill.config import CacheConfig, EngineConfig, SchedulerConfig
from tokenmill.engine.llm import LLM
from tokenmill.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--requests", type=int, default=30, help="prompts per round")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--same-mix", action="store_true",
                        help="the same prompts every round (same shapes): a per-shape cache "
                        "then stops growing after the first round, a leak does not")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    llm = LLM(config=EngineConfig(cache=CacheConfig(kv_cache_memory=2**28),
                                  scheduler=SchedulerConfig(max_num_seqs=8)))
    process = psutil.Process()
    print(f"loaded: RSS {mib(process.memory_info().rss)}")
    for tensor in llm.engine.runner.kv_caches:
        tensor.zero_()
    print(f"KV pool touched: RSS {mib(process.memory_info().rss)}", flush=True)
    libc = ctypes.CDLL("libc.so.6")
    for round_index in range(args.rounds):
        planned = plan_requests(SoakMix(seed=100 + (0 if args.same_mix else round_index),
                                        abort_fraction=0.0),
                                args.requests, "unused")
        prompts = [r.body.get("prompt") or r.body["messages"][-1]["content"] for r in planned]
        params = [SamplingParams(n=r.n, max_tokens=r.body["max_tokens"],
                                 temperature=r.body["temperature"],
                                 ignore_eos=r.body["ignore_eos"]) for r in planned]
        llm.generate(prompts, params, use_tqdm=False)
        llm.engine.scheduler.check_no_leaks()
        before = process.memory_info().rss
        gc.collect()
        libc.malloc_trim(0)
        print(f"round {round_index + 1}: RSS {mib(before)}, after gc + malloc_trim "
              f"{mib(process.memory_info().rss)}, Python objects {len(gc.get_objects())}",
              flush=True)


if __name__ == "__main__":
    main()
