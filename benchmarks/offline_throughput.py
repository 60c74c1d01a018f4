"""Offline throughput: tokenmill's continuous batching vs transformers' static-batch ``generate``.

    .venv/bin/python benchmarks/offline_throughput.py            # 128 requests, ~5-10 minutes
    .venv/bin/python benchmarks/offline_throughput.py --skip-hf --num-requests 32

The workload: prompts of random token ids with lengths uniform in 16-512, ``max_tokens`` uniform
in 16-256 with ``ignore_eos`` (so every request generates exactly its ``max_tokens``), seeded.
tokenmill gets all requests at once through ``LLM.generate``; transformers runs them in static
batches of 32 in arrival order (left padding; a batch runs until its longest request is done, and
only each request's own ``max_tokens`` count as useful output: the rest is the waste static
batching pays). Both use the built-in GGUF in float32 with the same number of torch threads.

Also printed: KV memory used vs allocated at the peak (used = tokens whose K/V is stored;
allocated = blocks held x block size, the paged cache's only waste is the unfilled tail of each
request's last block) and the peak resident memory of the process after each phase.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import psutil
import torch

# Token ids below this are special/control tokens in the built-in vocabulary (and the first
# byte-level pieces); random prompts stay clear of them.
FIRST_ORDINARY_TOKEN = 1000


@dataclass(frozen=True)
class Workload:
    prompts: list[list[int]]
    max_tokens: list[int]

    @property
    def num_prompt_tokens(self) -> int:
        return sum(len(p) for p in self.prompts)

    @property
    def num_output_tokens(self) -> int:
        return sum(self.max_tokens)


def make_workload(num_requests: int, seed: int, vocab_size: int) -> Workload:
    rng = random.Random(seed)
    prompts = [[rng.randrange(FIRST_ORDINARY_TOKEN, vocab_size)
                for _ in range(rng.randint(16, 512))] for _ in range(num_requests)]
    max_tokens = [rng.randint(16, 256) for _ in range(num_requests)]
    return Workload(prompts, max_tokens)


@dataclass
class KVPeak:
    used_tokens: int = 0
    allocated_tokens: int = 0

    @property
    def waste(self) -> float:
        return 1 - self.used_tokens / self.allocated_tokens if self.allocated_tokens else 0.0


def peak_rss_mib() -> float:
    # Linux reports ru_maxrss in KiB.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_tokenmill(workload: Workload, args: argparse.Namespace) -> tuple[float, KVPeak, int]:
    from tokenmill import LLM, SamplingParams

    llm = LLM(num_threads=args.num_threads, max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens,
              kv_cache_memory=args.kv_cache_memory)
    scheduler = llm.engine.scheduler
    block_size = scheduler.block_manager.block_size
    print(f"tokenmill: {llm.engine.runner.kv_spec.describe(768)}")
    llm.generate([workload.prompts[0][:32]], SamplingParams(max_tokens=4), use_tqdm=False)  # warm
    scheduler.block_manager.reset_prefix_cache()

    # Sample the KV pool after every step of LLM.generate: wrap the engine's step, nothing else.
    peak = KVPeak()
    original_step = llm.engine.step

    def step_and_measure() -> list:
        outputs = original_step()
        allocated = scheduler.block_manager.num_used_blocks * block_size
        if allocated > peak.allocated_tokens:
            peak.allocated_tokens = allocated
            peak.used_tokens = sum(r.num_computed_tokens for r in scheduler.running)
        return outputs

    llm.engine.step = step_and_measure  # type: ignore[method-assign]
    params = [SamplingParams(max_tokens=m, temperature=0, ignore_eos=True)
              for m in workload.max_tokens]
    started = time.perf_counter()
    outputs = llm.generate(workload.prompts, params, use_tqdm=not args.no_progress)
    seconds = time.perf_counter() - started
    generated = sum(o.num_generated_tokens for o in outputs)
    assert generated == workload.num_output_tokens, (generated, workload.num_output_tokens)
    scheduler.check_no_leaks()
    stats = scheduler.get_stats()
    print(f"tokenmill: {stats.num_steps} steps, {stats.num_preemptions} preemptions")
    del llm
    gc.collect()
    return seconds, peak, stats.num_preemptions


def run_transformers(workload: Workload, batch_size: int) -> float:
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from tokenmill.loader.model_source import open_model_source

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    source = open_model_source(None)
    model = AutoModelForCausalLM.from_pretrained(source.path.parent, gguf_file=source.path.name,
                                                 dtype=torch.float32).eval()
    pad_id = source.tokenizer.pad_token_id or source.tokenizer.eos_token_id or 0

    def generate(prompts: list[list[int]], max_new_tokens: int) -> None:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt):] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt):] = 1
        # min_new_tokens = max_new_tokens is transformers' ignore_eos: the batch runs to the end.
        with torch.inference_mode():
            model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                           max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                           pad_token_id=pad_id)

    generate([workload.prompts[0][:32]], 4)  # warm-up, as for tokenmill
    started = time.perf_counter()
    for start in range(0, len(workload.prompts), batch_size):
        batch = workload.prompts[start:start + batch_size]
        longest = max(workload.max_tokens[start:start + batch_size])
        batch_started = time.perf_counter()
        generate(batch, longest)
        print(f"transformers: batch {start // batch_size + 1}: {len(batch)} requests, "
              f"{longest} steps, {time.perf_counter() - batch_started:.1f}s", flush=True)
    return time.perf_counter() - started


def report(name: str, workload: Workload, seconds: float) -> float:
    output_rate = workload.num_output_tokens / seconds
    total_rate = (workload.num_prompt_tokens + workload.num_output_tokens) / seconds
    # Other processes on a small machine can halve these figures; the load average says so.
    print(f"{name:>13}: {seconds:7.1f}s  output {output_rate:7.1f} tok/s  "
          f"total {total_rate:7.1f} tok/s  (1-min load average now {os.getloadavg()[0]:.2f})")
    return output_rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-requests", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-hf", action="store_true", help="only run tokenmill")
    parser.add_argument("--max-num-seqs", type=int, default=128)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--kv-cache-memory", type=float, default=4 * 2**30,
                        help="KV pool in bytes (default 4 GiB: every request fits at once)")
    parser.add_argument("--hf-batch-size", type=int, default=32)
    parser.add_argument("--num-threads", type=int, default=2)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()

    torch.set_num_threads(args.num_threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tokenmill.loader.model_source import open_model_source

    vocab_size = open_model_source(None).arch.vocab_size
    workload = make_workload(args.num_requests, args.seed, vocab_size)
    print(f"workload: {args.num_requests} requests, {workload.num_prompt_tokens} prompt tokens, "
          f"{workload.num_output_tokens} output tokens (seed {args.seed}); "
          f"{args.num_threads} threads", flush=True)

    seconds, peak, _ = run_tokenmill(workload, args)
    tokenmill_rate = report("tokenmill", workload, seconds)
    print(f"KV at peak: {peak.used_tokens} tokens stored in {peak.allocated_tokens} allocated "
          f"slots ({peak.waste:.1%} waste)")
    print(f"peak RSS after tokenmill: {peak_rss_mib():.0f} MiB "
          f"(current {psutil.Process().memory_info().rss / 2**20:.0f} MiB)", flush=True)
    if args.skip_hf:
        return
    hf_seconds = run_transformers(workload, args.hf_batch_size)
    hf_rate = report("transformers", workload, hf_seconds)
    print(f"peak RSS after transformers: {peak_rss_mib():.0f} MiB")
    print(f"tokenmill / transformers output tok/s: {tokenmill_rate / hf_rate:.2f}x (target >= 2x)")


if __name__ == "__main__":
    main()
