"""Per-request scheduling trace: what the scheduler did with one request, and why.

The scheduler records it on the engine thread as it decides, so it costs a few tuple appends per
request, not per step: a decode step records nothing (the output token count says how many there
were), and waiting is recorded once per *run of identical steps*, not once per step.

Events, each a tuple; ``t`` is seconds since the request's arrival, by the scheduler's clock
(wall-clock seconds, the same clock as ``RequestStats``, so a frontend in another process agrees)::

    ("queued",      t, num_waiting_ahead)
    ("wait",        t, until, seconds, num_steps, reason, numbers, num_ahead)
    ("waiting",     t, start_step, cause, num_ahead)   the wait in progress (always the last event)
    ("admitted",    t, num_cached_tokens)       first admission; cached = prefix-cache hit tokens
    ("resumed",     t, num_cached_tokens)       admission again after a preemption
    ("prefill",     t, first_position, num_tokens)   one prefill (or recompute) chunk
    ("first_token", t)
    ("preempted",   t, by_request_id, blocks_needed, blocks_free, num_tokens_dropped)
    ("finished",    t, finish_reason, num_output_tokens)

Waits: while a request waits, each step the scheduler names why the queue's head could not start
(``WAIT_REASONS``). All waiting requests share one ``WaitCause`` per run of steps with the same
reason; a request's last event is then a ``"waiting"`` placeholder pointing at it, replaced by a
``"wait"`` event when the run ends for that request (admitted, reason changed, finished). Within
one waiting episode (from queued or preempted to admitted) segments with the same reason and the
same number of requests ahead fold into one event (keeping the latest numbers), and past a few
events any with the same reason do, so a queue that flaps between reasons stays a short trace.

Reading from the frontend thread while the engine writes: events are immutable tuples, and every
change to the list is one append, one item assignment or one slice assignment, each atomic under
the GIL, as is the reader's ``list(trace.events)``: a copy is always a consistent timeline (see
``trace_report``).
"""

from __future__ import annotations

KV_BLOCKS_SHORT = "kv_blocks_short"
"""The queue's head needs more KV blocks than are free (numbers: blocks_needed, blocks_free)."""
PREEMPTING = "preempting"
"""Running requests were short of KV blocks this step and preempted those ranked below them (less
urgent, or equally urgent and younger: ``request_queue.py``); nobody is admitted while that happens (numbers: blocks_needed, blocks_free of the request that preempted)."""
TOKEN_BUDGET_SPENT = "token_budget_spent"
"""Running requests used the whole step's token budget (numbers: token_budget, num_scheduled)."""
BATCH_FULL = "batch_full"
"""``max_num_seqs`` requests are already running (numbers: max_num_seqs)."""

WAIT_REASONS = (KV_BLOCKS_SHORT, PREEMPTING, TOKEN_BUDGET_SPENT, BATCH_FULL)

MAX_WAITS_PER_EPISODE = 8
"""Wait events one waiting episode may write before segments with the same reason fold together
whatever their queue position."""

TraceEvent = tuple


class WaitCause:
    """Why the waiting queue's head could not start, shared by every waiting request for a run of
    consecutive steps with the same reason. ``numbers`` is replaced each step (the latest)."""

    __slots__ = ("last_step", "numbers", "reason")

    def __init__(self, reason: str, numbers: dict[str, int], step: int) -> None:
        self.reason = reason
        self.numbers = numbers
        self.last_step = step


class RequestTrace:
    __slots__ = ("_episode_start", "events", "open_wait", "origin")
    # ``open_wait`` is the engine thread's shortcut to the "waiting" placeholder; readers on other
    # threads look at ``events`` only.

    def __init__(self, origin: float) -> None:
        self.origin = origin
        """The request's arrival time; every event's time is an offset from it."""
        self.events: list[TraceEvent] = []
        self.open_wait: WaitCause | None = None
        """The cause of the wait in progress (the last event is its placeholder)."""
        self._episode_start = 0
        """Index in ``events`` where the current waiting episode began."""

    # ------------------------------------------------------------------ recorded by the scheduler
    def queued(self, now: float, num_ahead: int) -> None:
        self._episode_start = len(self.events)
        self.events.append(("queued", now - self.origin, num_ahead))

    def wait(self, cause: WaitCause, now: float, step: int, num_ahead: int) -> None:
        """Start (or switch to) a wait under ``cause`` from this step on."""
        self.close_wait(now, step)
        self.open_wait = cause
        self.events.append(("waiting", now - self.origin, step, cause, num_ahead))

    def close_wait(self, now: float, step: int) -> None:
        """End the wait in progress (its last waited step is ``step - 1``)."""
        if self.open_wait is None:
            return
        events = self.events
        last = len(events) - 1
        kind, start, start_step, cause, num_ahead = events[last]
        assert kind == "waiting", events[last]
        end = now - self.origin
        seconds, num_steps = end - start, step - start_step
        index = self._fold_target(cause.reason, num_ahead, last)
        if index is None:
            events[last] = ("wait", start, end, seconds, num_steps, cause.reason, cause.numbers,
                            num_ahead)
        else:
            old = events[index]
            merged = ("wait", old[1], end, old[3] + seconds, old[4] + num_steps, cause.reason,
                      cause.numbers, max(old[7], num_ahead))
            events[index:] = [merged, *events[index + 1:last]]  # one atomic change
        self.open_wait = None

    def _fold_target(self, reason: str, num_ahead: int, last: int) -> int | None:
        """The event of this episode a finished wait segment folds into: one with the same
        reason and the same queue position; past ``MAX_WAITS_PER_EPISODE`` events, any with the
        same reason (so the trace stays bounded however often the reason flips)."""
        events = self.events
        same_reason = None
        num_waits = 0
        for index in range(last - 1, self._episode_start - 1, -1):
            old = events[index]
            if old[0] != "wait":
                continue
            num_waits += 1
            if old[5] == reason:
                if old[7] == num_ahead:
                    return index
                if same_reason is None:
                    same_reason = index
        return same_reason if num_waits >= MAX_WAITS_PER_EPISODE else None

    def admitted(self, now: float, step: int, num_cached_tokens: int, resumed: bool) -> None:
        self.close_wait(now, step)
        self.events.append(("resumed" if resumed else "admitted", now - self.origin,
                            num_cached_tokens))

    def prefill(self, now: float, first_position: int, num_tokens: int) -> None:
        self.events.append(("prefill", now - self.origin, first_position, num_tokens))

    def first_token(self, now: float) -> None:
        self.events.append(("first_token", now - self.origin))

    def preempted(self, now: float, by_request_id: str, blocks_needed: int, blocks_free: int,
                  num_tokens_dropped: int) -> None:
        self._episode_start = len(self.events)
        self.events.append(("preempted", now - self.origin, by_request_id, blocks_needed,
                            blocks_free, num_tokens_dropped))

    def finished(self, now: float, step: int, finish_reason: str | None,
                 num_output_tokens: int) -> None:
        self.close_wait(now, step)
        self.events.append(("finished", now - self.origin, finish_reason, num_output_tokens))
