"""What each weight quantization costs in quality: perplexity and top-1 agreement with fp32.

    TOKENMILL_NUM_THREADS=2 .venv/bin/python benchmarks/perplexity.py \
        [--methods none,auto,int8,int4] [--window 512] [--stride 256] [--group-size 32] \
        [--max-tokens N] [--dtype float32] [--text benchmarks/data/alice_ch1-2.txt] [--model PATH]

Runs the model teacher-forced over a shipped public-domain text (``benchmarks/data/README.md``) once per
``LLM(quantization=...)`` method:

* ``none``: every weight dequantized to fp32 (the reference row),
* ``auto``: the GGUF blocks kept and computed natively (Q4_1 linears, Q8_0 embeddings here),
* ``int8``: per-channel weight-only int8, ``int4``: group-wise int4 (``--group-size``).

Perplexity follows the usual sliding-window recipe: windows of ``--window`` tokens start every
``--stride`` tokens, each scores only the tokens the previous window did not, so (with stride <
window) every token but the first is scored exactly once with at least ``window - stride`` tokens of
context. Top-1 agreement is the fraction of those positions where the method's argmax equals the
fp32 run's, so fp32 always runs first. A method this build does not offer is reported as "not
available" instead of failing the run.
Weight bytes are the model's own ``weight_report()`` (bytes by format, as held in memory) when it has
one, else every parameter and buffer but the rotary tables.
"""

from __future__ import annotations

import argparse
import gc
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DEFAULT_TEXT = Path(__file__).parent / "data" / "alice_ch1-2.txt"
METHODS = ("none", "auto", "int8", "int4")
REFERENCE = "none"
KV_CACHE_BYTES = 16 * 2**20  # the engine wants a pool; this script never uses it


@dataclass(frozen=True)
class WindowSpan:
    """One forward pass over ``token_ids[begin:end]`` scoring the tokens ``[first_scored, end)``."""

    begin: int
    end: int
    first_scored: int


@dataclass
class MethodResult:
    method: str
    perplexity: float | None = None
    top1_agreement: float | None = None
    weight_bytes: int | None = None
    weight_formats: str = ""  # e.g. "gguf:Q4_1 77%, gguf:Q8_0 23%"
    load_seconds: float | None = None
    eval_seconds: float | None = None
    unavailable: str | None = None  # why the method could not be loaded


def window_spans(num_tokens: int, window: int, stride: int) -> list[WindowSpan]:
    """Hugging Face's perplexity recipe: token 0 has nothing to predict it, every other is scored once.

    With ``stride == window`` the windows do not overlap and each one's first token goes unscored too.
    """
    if not 0 < stride <= window:
        raise ValueError(f"stride={stride} must be in 1..window ({window})")
    spans: list[WindowSpan] = []
    scored_until = 1
    for begin in range(0, max(num_tokens - 1, 1), stride):
        end = min(begin + window, num_tokens)
        if end > scored_until:
            spans.append(WindowSpan(begin, end, max(scored_until, begin + 1)))
            scored_until = end
        if end == num_tokens:
            break
    return spans


def load_llm(method: str, args: argparse.Namespace) -> tuple[Any, str | None]:
    """``(llm, None)``, or ``(None, reason)`` when this build cannot load ``method``."""
    from tokenmill import LLM
    from tokenmill.errors import TokenmillError

    kwargs: dict[str, Any] = {"quantization": method, "dtype": args.dtype,
                              "kv_cache_memory": KV_CACHE_BYTES, "attention_backend": "torch",
                              "num_threads": args.threads}
    if method == "int4" and args.group_size is not None:
        kwargs["quantization_group_size"] = args.group_size
    try:
        return LLM(args.model, **kwargs), None
    except TypeError as error:
        if "quantization" not in str(error):
            raise
        if method == REFERENCE:
            # Before quantization support every weight is dequantized to fp32: that *is* "none".
            kwargs.pop("quantization")
            return LLM(args.model, **kwargs), None
        return None, f"this build has no LLM({str(error).split('argument ')[-1]})"
    except (TokenmillError, NotImplementedError) as error:
        return None, str(error).splitlines()[0]


def model_of(llm: Any) -> torch.nn.Module:
    return llm.engine.runner.model


def weight_formats(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of weights by format ("gguf:Q4_1", "float32", ...) as the model holds them in memory.

    Quantization-aware models report this themselves (``weight_report``); for one that does not,
    every parameter and buffer counts, except the rotary cos/sin tables (derived, not weights).
    """
    report = getattr(model, "weight_report", None)
    if callable(report):
        return dict(report())
    from tokenmill.layers.rotary import RotaryEmbedding

    formats: dict[str, int] = {}
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            continue
        for tensor in [*module.parameters(recurse=False), *module.buffers(recurse=False)]:
            if tensor.data_ptr() in seen:
                continue  # a tied head shares the embedding's storage
            seen.add(tensor.data_ptr())
            key = str(tensor.dtype).removeprefix("torch.")
            formats[key] = formats.get(key, 0) + tensor.numel() * tensor.element_size()
    return formats


@torch.inference_mode()
def score(model: torch.nn.Module, token_ids: list[int], spans: list[WindowSpan]
          ) -> tuple[float, torch.Tensor]:
    """Summed negative log-likelihood of the scored tokens and the argmax at each scored position."""
    from tokenmill.layers.attention import causal_metadata

    ids = torch.tensor(token_ids)
    nll_sum = 0.0
    argmaxes: list[torch.Tensor] = []
    for span in spans:
        window_ids = ids[span.begin:span.end]
        length = span.end - span.begin
        hidden = model(window_ids, torch.arange(length), causal_metadata([length]))
        # Row j predicts token j + 1: only the rows before scored tokens reach the vocabulary head.
        rows = slice(span.first_scored - span.begin - 1, length - 1)
        logits = model.compute_logits(hidden[rows]).float()
        targets = ids[span.first_scored:span.end]
        nll_sum += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        argmaxes.append(logits.argmax(dim=-1))
    return nll_sum, torch.cat(argmaxes)


def run_method(method: str, token_ids: list[int], spans: list[WindowSpan],
               reference_argmax: torch.Tensor | None, args: argparse.Namespace
               ) -> tuple[MethodResult, torch.Tensor | None]:
    started = time.perf_counter()
    llm, reason = load_llm(method, args)
    if llm is None:
        return MethodResult(method, unavailable=reason), None
    result = MethodResult(method, load_seconds=time.perf_counter() - started)
    model = model_of(llm)
    formats = weight_formats(model)
    result.weight_bytes = sum(formats.values())
    result.weight_formats = ", ".join(
        f"{name} {100 * size / result.weight_bytes:.0f}%"
        for name, size in sorted(formats.items(), key=lambda item: -item[1]) if size)
    started = time.perf_counter()
    nll_sum, argmax = score(model, token_ids, spans)
    result.eval_seconds = time.perf_counter() - started
    result.perplexity = math.exp(nll_sum / len(argmax))
    if reference_argmax is not None:
        result.top1_agreement = (argmax == reference_argmax).float().mean().item()
    del llm, model
    gc.collect()  # one model in memory at a time
    return result, argmax


def format_table(results: list[MethodResult], reference_ppl: float | None) -> str:
    header = (f"{'method':<8} {'perplexity':>10} {'vs fp32':>8} {'top-1 agree':>11} "
              f"{'weights MiB':>11} {'load s':>7} {'eval s':>7}  formats")
    lines = [header, "-" * len(header)]
    for r in results:
        if r.unavailable is not None:
            lines.append(f"{r.method:<8} not available: {r.unavailable}")
            continue
        change = (f"{100 * (r.perplexity / reference_ppl - 1):+.2f}%"
                  if reference_ppl and r.perplexity is not None else "-")
        agree = ("reference" if r.method == REFERENCE
                 else f"{100 * r.top1_agreement:.2f}%" if r.top1_agreement is not None else "-")
        mib = f"{r.weight_bytes / 2**20:.1f}" if r.weight_bytes else "-"
        lines.append(f"{r.method:<8} {r.perplexity:>10.3f} {change:>8} {agree:>11} {mib:>11} "
                     f"{r.load_seconds:>7.1f} {r.eval_seconds:>7.1f}  {r.weight_formats}")
    return "\n".join(lines)


def parse_methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown}; choose from {METHODS}")
    # fp32 first: every other row's top-1 agreement is measured against it.
    return [REFERENCE] + [m for m in dict.fromkeys(methods) if m != REFERENCE]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", type=parse_methods, default=list(METHODS),
                        help="comma-separated quantization methods (fp32 'none' always runs first)")
    parser.add_argument("--window", type=int, default=512, help="tokens per forward pass")
    parser.add_argument("--stride", type=int, default=256, help="tokens between window starts")
    parser.add_argument("--group-size", type=int, default=None,
                        help="int4 group size (LLM's quantization_group_size; default: its own)")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="UTF-8 text to score")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="score only the first N tokens of the text (quick runs)")
    parser.add_argument("--dtype", default="float32",
                        help="compute dtype of activations and unquantized weights; float32 keeps "
                             "the 'none' row a true fp32 reference")
    parser.add_argument("--model", default=None, help="GGUF file or HF folder (default: built-in)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: TOKENMILL_NUM_THREADS or all cores)")
    args = parser.parse_args(argv)

    if not 0 < args.stride <= args.window:
        parser.error(f"--stride {args.stride} must be in 1..--window ({args.window})")

    token_ids, spans = _tokenize(args)
    results: list[MethodResult] = []
    reference_argmax: torch.Tensor | None = None
    for method in args.methods:
        result, argmax = run_method(method, token_ids, spans, reference_argmax, args)
        if method == REFERENCE:
            reference_argmax = argmax
        results.append(result)
        print(f"{method}: " + (f"not available ({result.unavailable})" if result.unavailable
                               else f"perplexity {result.perplexity:.3f} in "
                                    f"{result.eval_seconds:.1f}s"), flush=True)
    reference_ppl = results[0].perplexity if results and results[0].method == REFERENCE else None
    print(f"\n{args.text.name}: {len(token_ids)} tokens, window {args.window}, stride "
          f"{args.stride}, {len(spans)} windows, dtype {args.dtype}, torch threads "
          f"{torch.get_num_threads()}")
    print(format_table(results, reference_ppl))


def _tokenize(args: argparse.Namespace) -> tuple[list[int], list[WindowSpan]]:
    from tokenmill.loader.model_source import open_model_source

    text = args.text.read_text(encoding="utf-8")
    token_ids = open_model_source(args.model).tokenizer.encode(text, add_special_tokens=False)
    if args.max_tokens is not None:
        token_ids = token_ids[:args.max_tokens]
    if len(token_ids) < 2:
        raise SystemExit(f"{args.text} has {len(token_ids)} tokens; need at least 2")
    return token_ids, window_spans(len(token_ids), args.window, args.stride)


if __name__ == "__main__":
    main()
