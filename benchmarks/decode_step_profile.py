"""Where a decode step's time goes: torch.profiler over a few engine steps of the built-in model.

    .venv/bin/python benchmarks/decode_step_profile.py [--batch-sizes 1 4 16] [--max-tokens 64]
        [--threads 2] [--dtype auto] [--rows 20]

For each batch size (concurrent requests, greedy, ignoring end-of-sequence) it prints the top ops by
self CPU time over the profiled decode steps, the ops per step (top-level calls from Python, and all
recorded events including nested ones), and the mean decode step time with the fused native ops
(tokenmill.layers.kernels.fused_ops) on and off, timed without the profiler. The environment
variable TOKENMILL_FUSED_OPS=0 switches them off for a whole run instead.

Other processes may share the cores: the load average is printed next to every figure, and the
figures are indicative (compare on and off within one run, not across runs).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile, schedule

PROMPT = "<|im_start|>user\nWrite a long story about a lighthouse keeper.<|im_end|>\n" \
         "<|im_start|>assistant\n"


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load avg {one:.2f} (1 min) {five:.2f} (5 min)"


def _set_fused(enabled: bool) -> bool:
    """Switch the fused ops; False when this tree has none (then both runs are the PyTorch path)."""
    try:
        from tokenmill.layers.kernels import fused_ops
    except ImportError:
        return False
    fused_ops.set_enabled(enabled)
    return fused_ops.fused_ops_module() is not None


class StepClock:
    """Wraps the runner's ``execute``: times each pure-decode step, optionally ticks a profiler."""

    def __init__(self, runner: Any):
        self.runner = runner
        self.execute = runner.execute
        self.decode_seconds: list[float] = []
        self.on_decode: Callable[[], None] | None = None
        runner.execute = self

    def __call__(self, scheduler_output: Any) -> Any:
        started = time.perf_counter()
        out = self.execute(scheduler_output)
        elapsed = time.perf_counter() - started
        counts = scheduler_output.num_scheduled_tokens.values()
        if counts and max(counts) == 1:
            self.decode_seconds.append(elapsed)
            if self.on_decode is not None:
                self.on_decode()
        return out


def _generate(llm: Any, prompt_ids: list[int], batch_size: int, max_tokens: int) -> None:
    from tokenmill import SamplingParams

    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    llm.generate([prompt_ids] * batch_size, params, use_tqdm=False)


class Regions:
    """Labels the parts of a step in the profile (``record_function``): input building, linear
    layers (their native kernels are invisible to the profiler otherwise), attention, the LM head,
    the sampler. Installed only while profiling; each label costs a µs or so."""

    NAMES = ("step::build_inputs", "step::model", "layer::linear", "layer::attention",
             "step::logits", "step::sample")

    def __init__(self, runner: Any):
        from tokenmill.layers.linear import MergedLinear
        from tokenmill.models import llama

        self.undo: list[Callable[[], None]] = []
        self._wrap(runner.inputs, "build", "step::build_inputs")
        self._wrap(runner.model, "compute_logits", "step::logits")
        self._wrap(runner.model, "forward", "step::model")
        self._wrap(runner, "sampler", "step::sample")
        self._wrap(llama, "paged_attention", "layer::attention")
        self._wrap(MergedLinear, "forward", "layer::linear")

    def _wrap(self, owner: Any, name: str, label: str) -> None:
        """Route ``owner.name`` (an instance's attribute, or a class's method) through a label."""
        original = getattr(owner, name)
        own = vars(owner).get(name)  # None: the attribute came from the class

        def labelled(*args: Any, **kwargs: Any) -> Any:
            with torch.profiler.record_function(label):
                return original(*args, **kwargs)

        if isinstance(owner, type):
            setattr(owner, name, lambda self_, *a, **k: labelled(self_, *a, **k))
        else:
            object.__setattr__(owner, name, labelled)  # a plain attribute, even on a Module

        def undo() -> None:
            if own is not None:
                object.__setattr__(owner, name, own) if not isinstance(owner, type) else \
                    setattr(owner, name, own)
            else:
                delattr(owner, name)

        self.undo.append(undo)

    def remove(self) -> None:
        for undo in reversed(self.undo):
            undo()


def _region_table(events: list[Any], num_steps: int, step_us: float) -> None:
    print(f"{'region':<22}{'ms/step':>9}{'% step':>8}{'calls/step':>12}{'ops inside':>12}")
    for name in Regions.NAMES:
        hits = [e for e in events if e.name == name]
        if not hits:
            continue
        total = sum(e.cpu_time_total for e in hits) / num_steps
        inner = sum(len(_descendants(e)) for e in hits) / num_steps
        print(f"{name:<22}{total / 1000:>9.2f}{100 * total / step_us:>7.1f}%"
              f"{len(hits) / num_steps:>12.0f}{inner:>12.0f}")


def _descendants(event: Any) -> list[Any]:
    out = []
    for child in event.cpu_children:
        out.append(child)
        out.extend(_descendants(child))
    return out


def profile_steps(llm: Any, clock: StepClock, prompt_ids: list[int], batch_size: int,
                  max_tokens: int, rows: int) -> None:
    # skip prefill and the first decodes (allocator warm-up), then record a few decode steps
    wait, warmup, active = 8, 2, 6
    assert max_tokens > wait + warmup + active + 1, "--max-tokens too small to profile"
    prof = profile(activities=[ProfilerActivity.CPU],
                   schedule=schedule(wait=wait, warmup=warmup, active=active, repeat=1))
    clock.on_decode = prof.step
    regions = Regions(llm.engine.runner)
    try:
        with prof:
            _generate(llm, prompt_ids, batch_size, max_tokens)
    finally:
        regions.remove()
        clock.on_decode = None
    events = list(prof.events())
    steps = [e for e in events if e.name.startswith("ProfilerStep")]
    num_steps = max(len(steps), 1)
    labels = {"ProfilerStep", *Regions.NAMES}
    ops = [e for e in events if not e.name.startswith(tuple(labels))]
    top = [e for e in ops if e.cpu_parent is None or e.cpu_parent.name.startswith(tuple(labels))]
    self_us = sum(e.self_cpu_time_total for e in ops)
    step_us = statistics.mean(e.cpu_time_total for e in steps) if steps else float("nan")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    print(f"ops per decode step: {len(top) / num_steps:.0f} called from Python, "
          f"{len(ops) / num_steps:.0f} recorded in all (nested included)")
    _region_table(events, num_steps, step_us)
    print(f"profiled step {step_us / 1000:.2f} ms, of which op self time "
          f"{self_us / num_steps / 1000:.2f} ms (the rest: Python and dispatch between ops); "
          f"{_load()}")


def time_steps(llm: Any, clock: StepClock, prompt_ids: list[int], batch_size: int,
               max_tokens: int, repeats: int, settings: list[bool]) -> dict[bool, float]:
    """Per setting, the median over ``repeats`` runs of the mean decode step (the first 4 decodes
    of a run skipped). Settings alternate run by run, so a burst of load hits both alike."""
    means: dict[bool, list[float]] = {enabled: [] for enabled in settings}
    for _ in range(repeats):
        for enabled in settings:
            _set_fused(enabled)
            clock.decode_seconds = []
            _generate(llm, prompt_ids, batch_size, max_tokens)
            means[enabled].append(statistics.mean(clock.decode_seconds[4:]))
    return {enabled: statistics.median(values) for enabled, values in means.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per setting")
    parser.add_argument("--rows", type=int, default=20, help="ops shown in the profile table")
    args = parser.parse_args()

    from tokenmill import LLM

    llm = LLM(dtype=args.dtype, kv_cache_memory=2**27, num_threads=args.threads)
    runner = llm.engine.runner
    env_enabled = os.environ.get("TOKENMILL_FUSED_OPS", "1") != "0"
    have_fused = _set_fused(env_enabled)
    print(f"dtype {runner.dtype}, threads {torch.get_num_threads()}, "
          f"fused ops {'on' if have_fused and env_enabled else 'off'}; {_load()}")
    clock = StepClock(runner)
    prompt_ids = llm.tokenizer.encode(PROMPT)
    _generate(llm, prompt_ids, 1, 8)  # warm-up: builds kernels, fills caches
    for batch_size in args.batch_sizes:
        print(f"\n=== {batch_size} concurrent request(s), {args.max_tokens} tokens each ===")
        profile_steps(llm, clock, prompt_ids, batch_size, args.max_tokens, args.rows)
        settings = [env_enabled] + ([False] if have_fused and env_enabled else [])
        means = time_steps(llm, clock, prompt_ids, batch_size, args.max_tokens, args.repeats,
                           settings)
        for enabled, mean in means.items():
            label = "on " if enabled and have_fused else "off"
            print(f"decode step, fused ops {label}: {mean * 1000:.2f} ms "
                  f"({batch_size / mean:.1f} tokens/s); {_load()}")
        _set_fused(env_enabled)


if __name__ == "__main__":
    main()
