"""Reading a ``RequestTrace``: JSON-ready events with a sentence each, and a one-phrase summary.

Runs on the frontend (event loop) thread while the engine may still be writing: every function
here works on ``list(trace.events)``, one atomic copy (see ``trace.py``), so what it reports is a
consistent timeline even for a request that is still waiting or decoding.
"""

from __future__ import annotations

from typing import Any

from tokenmill.engine.trace import (
    BATCH_FULL,
    KV_BLOCKS_SHORT,
    PREEMPTING,
    TOKEN_BUDGET_SPENT,
    RequestTrace,
    TraceEvent,
)

_REASON_LABELS = {
    KV_BLOCKS_SHORT: "KV full",
    PREEMPTING: "KV full (preempting)",
    TOKEN_BUDGET_SPENT: "token budget spent",
    BATCH_FULL: "batch full",
}


def snapshot(trace: RequestTrace, now: float) -> list[TraceEvent]:
    """The events so far; a wait in progress becomes a "wait" event up to ``now`` marked ongoing
    (its last field is True), with steps counted up to the latest step."""
    events = list(trace.events)  # the one read of the shared list
    if events and events[-1][0] == "waiting":
        _, start, start_step, cause, num_ahead = events[-1]
        end = max(start, now - trace.origin)
        events[-1] = ("wait", start, end, end - start, max(0, cause.last_step - start_step + 1),
                      cause.reason, dict(cause.numbers), num_ahead, True)
    return events


def reason_text(reason: str, numbers: dict[str, int]) -> str:
    if reason == KV_BLOCKS_SHORT:
        return (f"KV blocks short (needed {numbers['blocks_needed']}, "
                f"free {numbers['blocks_free']})")
    if reason == PREEMPTING:
        return (f"KV blocks short for older running requests (needed "
                f"{numbers['blocks_needed']}, free {numbers['blocks_free']}), preempting; "
                f"nobody admitted")
    if reason == TOKEN_BUDGET_SPENT:
        return (f"token budget spent ({numbers['token_budget']} tokens on "
                f"{_count(numbers['num_scheduled'], 'request')})")
    if reason == BATCH_FULL:
        return f"batch full ({_count(numbers['max_num_seqs'], 'request')} running)"
    return reason


def _count(num: int, noun: str) -> str:
    return f"{num} {noun}" if num == 1 else f"{num} {noun}s"


def describe(event: TraceEvent, request_id: str | None = None) -> dict[str, Any]:
    """One event as JSON: its time, its kind, its numbers by name, and a sentence.
    ``request_id`` is the traced request's own id (to say "itself" when it preempted itself)."""
    kind, t = event[0], round(event[1], 6)
    if kind == "queued":
        return {"t": t, "event": kind, "num_waiting_ahead": event[2],
                "text": f"queued with {_count(event[2], 'request')} ahead"}
    if kind == "wait":
        _, _, until, seconds, num_steps, reason, numbers, num_ahead, *ongoing = event
        text = (f"waited {_count(num_steps, 'step')} ({seconds:.3f} s): "
                f"{reason_text(reason, numbers)}")
        if num_ahead:
            text += f", {_count(num_ahead, 'request')} ahead"
        described = {"t": t, "event": kind, "until": round(until, 6),
                     "seconds": round(seconds, 6), "num_steps": num_steps, "reason": reason,
                     **numbers, "num_requests_ahead": num_ahead, "text": text}
        if ongoing:
            described["ongoing"] = True
            described["text"] = "waiting: " + text[len("waited "):]
        return described
    if kind in ("admitted", "resumed"):
        verb = "admitted" if kind == "admitted" else "resumed after preemption"
        hit = f"{event[2]} tokens from the prefix cache" if event[2] else "no prefix-cache hit"
        return {"t": t, "event": kind, "num_cached_tokens": event[2], "text": f"{verb}; {hit}"}
    if kind == "prefill":
        first, num = event[2], event[3]
        return {"t": t, "event": kind, "first_position": first, "num_tokens": num,
                "text": f"prefill chunk of {num} tokens (positions {first}..{first + num - 1})"}
    if kind == "first_token":
        return {"t": t, "event": kind, "text": "first token"}
    if kind == "preempted":
        _, _, by, needed, free, dropped = event
        who = ("it was the youngest running request and needed" if by == request_id
               else f"older request {by} needed")
        return {"t": t, "event": kind, "by_request_id": by, "blocks_needed": needed,
                "blocks_free": free, "num_tokens_dropped": dropped,
                "text": f"preempted: {who} {_count(needed, 'more KV block')} with {free} free; "
                        f"{dropped} computed tokens dropped, to be recomputed"}
    if kind == "finished":
        return {"t": t, "event": kind, "finish_reason": event[2], "num_output_tokens": event[3],
                "text": f"finished ({event[2]}) after {event[3]} output tokens"}
    return {"t": t, "event": kind}


def status(events: list[TraceEvent]) -> str:
    if not events:
        return "arrived"
    last = events[-1]
    if last[0] == "finished":
        return "finished"
    if last[0] in ("wait", "queued", "preempted"):
        return "waiting"
    return "running"


def _times(count: int) -> str:
    return {1: "once", 2: "twice"}.get(count, f"{count} times")


def queued_seconds(events: list[TraceEvent]) -> float:
    return sum(e[3] for e in events if e[0] == "wait")


def summarize(events: list[TraceEvent]) -> str:
    """One phrase for the log line, e.g. "queued 1.8 s: KV full behind 12 requests; preempted
    once"."""
    parts = []
    waits = [e for e in events if e[0] == "wait"]
    if waits:
        by_reason: dict[str, list[TraceEvent]] = {}
        for wait in waits:
            by_reason.setdefault(wait[5], []).append(wait)
        reason, group = max(by_reason.items(), key=lambda item: sum(w[3] for w in item[1]))
        num_ahead = max(w[7] for w in group)
        why = _REASON_LABELS.get(reason, reason)
        if num_ahead:
            why += f" behind {_count(num_ahead, 'request')}"
        elif reason in (KV_BLOCKS_SHORT, PREEMPTING):
            numbers = group[-1][6]
            why += f" (needed {numbers['blocks_needed']} blocks, {numbers['blocks_free']} free)"
        parts.append(f"queued {queued_seconds(events):.1f} s: {why}")
    else:
        parts.append("not queued")
    cached = next((e[2] for e in events if e[0] == "admitted"), 0)
    if cached:
        parts.append(f"{cached} prompt tokens from the prefix cache")
    num_preemptions = sum(1 for e in events if e[0] == "preempted")
    if num_preemptions:
        parts.append(f"preempted {_times(num_preemptions)}")
    first_admission = next((i for i, e in enumerate(events) if e[0] == "admitted"), None)
    if first_admission is not None:
        num_chunks = 0
        for event in events[first_admission + 1:]:
            if event[0] != "prefill":
                break  # later chunks belong to recomputes after a preemption
            num_chunks += 1
        if num_chunks > 1:
            parts.append(f"prompt prefilled in {num_chunks} chunks")
    return "; ".join(parts)


def summarize_group(traces: list[list[TraceEvent]]) -> str:
    """The phrase for a request with several engine requests (n > 1 samples, or several prompts):
    the one that waited longest speaks for the group."""
    if not traces:
        return "no trace"
    if len(traces) == 1:
        return summarize(traces[0])
    slowest = max(traces, key=lambda events: (queued_seconds(events),
                                              sum(1 for e in events if e[0] == "preempted")))
    return f"{len(traces)} samples, slowest: {summarize(slowest)}"
