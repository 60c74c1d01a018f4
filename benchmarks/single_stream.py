"""Single-prompt greedy decode speed: tokenmill vs Hugging Face transformers on the same GGUF.

    .venv/bin/python benchmarks/single_stream.py [--threads 2] [--max-tokens 128] [--dtype float32]

Prints the built-in model's load time and decode tokens/s of each (prefill excluded: the clock starts
at the first generated token), on one prompt, greedy, ignoring end-of-sequence.
"""

from __future__ import annotations

import argparse
import time

import torch

PROMPT = "<|im_start|>user\nWrite a long story about a lighthouse keeper.<|im_end|>\n" \
         "<|im_start|>assistant\n"


def tokenmill_speed(args: argparse.Namespace) -> tuple[float, float]:
    from tokenmill import LLM, SamplingParams

    started = time.perf_counter()
    llm = LLM(dtype=args.dtype, kv_cache_memory=2**28, num_threads=args.threads)
    load_seconds = time.perf_counter() - started
    ids = llm.tokenizer.encode(PROMPT)
    llm.generate([ids], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False)  # warm-up
    # Time from the first token on, so prefill is excluded like in the transformers measurement.
    llm.generate([ids], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
    first = time.perf_counter()
    llm.generate([ids], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
    prefill_seconds = time.perf_counter() - first
    started = time.perf_counter()
    out = llm.generate([ids], SamplingParams(max_tokens=args.max_tokens, temperature=0,
                                             ignore_eos=True), use_tqdm=False)
    elapsed = time.perf_counter() - started - prefill_seconds
    return load_seconds, (len(out[0].outputs[0].token_ids) - 1) / elapsed


def transformers_speed(args: argparse.Namespace) -> tuple[float, float]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tokenmill.loader.builtin import builtin_model_path

    path = builtin_model_path()
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                 dtype=getattr(torch, args.dtype)).eval()
    load_seconds = time.perf_counter() - started
    ids = torch.tensor([tokenizer.encode(PROMPT)])
    kwargs = {"do_sample": False, "pad_token_id": 2, "eos_token_id": None}
    with torch.inference_mode():
        model.generate(ids, max_new_tokens=4, **kwargs)
        first = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **kwargs)
        prefill_seconds = time.perf_counter() - first
        started = time.perf_counter()
        out = model.generate(ids, max_new_tokens=args.max_tokens, **kwargs)
        elapsed = time.perf_counter() - started - prefill_seconds
    return load_seconds, (out.shape[1] - ids.shape[1] - 1) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--skip-hf", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"single-stream greedy decode, {args.max_tokens} tokens, {args.dtype}, "
          f"{args.threads} threads")
    load, speed = tokenmill_speed(args)
    print(f"tokenmill     load {load:5.1f} s   decode {speed:6.1f} tokens/s")
    if not args.skip_hf:
        load_hf, speed_hf = transformers_speed(args)
        print(f"transformers  load {load_hf:5.1f} s   decode {speed_hf:6.1f} tokens/s")
        print(f"ratio tokenmill / transformers: {speed / speed_hf:.2f}x")


if __name__ == "__main__":
    main()
