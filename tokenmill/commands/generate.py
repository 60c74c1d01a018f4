"""`tokenmill generate "prompt"`: greedy (or sampled) text from the command line."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from tokenmill.config import add_engine_arguments

    parser = subparsers.add_parser("generate", help="generate text for one or more prompts")
    parser.add_argument("prompts", nargs="+", help="prompt text (several prompts run as a batch)")
    parser.add_argument("--chat", action="store_true",
                        help="wrap each prompt as a user message in the model's chat template")
    parser.add_argument("--system", default=None, help="system message (with --chat)")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens to generate at most")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--sampling-seed", type=int, default=None, help="per-request seed")
    add_engine_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging
    import time

    from tokenmill.config import engine_config_from_args
    from tokenmill.engine.llm import LLM
    from tokenmill.sampling_params import SamplingParams

    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature,
                            top_p=args.top_p, top_k=args.top_k, seed=args.sampling_seed)
    started = time.perf_counter()
    llm = LLM(config=engine_config_from_args(args))
    loaded = time.perf_counter()
    if args.chat:
        conversations = []
        for prompt in args.prompts:
            messages = [{"role": "user", "content": prompt}]
            if args.system:
                messages.insert(0, {"role": "system", "content": args.system})
            conversations.append(messages)
        outputs = llm.chat(conversations, params, use_tqdm=False)
    else:
        outputs = llm.generate(args.prompts, params, use_tqdm=False)
    finished = time.perf_counter()
    num_tokens = 0
    for output in outputs:
        completion = output.outputs[0]
        num_tokens += len(completion.token_ids)
        if len(outputs) > 1:
            print(f"--- {output.prompt!r}")
        print(completion.text)
    print(f"[{num_tokens} tokens in {finished - loaded:.2f}s = "
          f"{num_tokens / max(finished - loaded, 1e-9):.1f} tokens/s; model loaded in "
          f"{loaded - started:.1f}s]", file=sys.stderr)
    return 0
