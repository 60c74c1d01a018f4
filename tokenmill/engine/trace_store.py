"""The frontend's store of request traces: live ones while they run, finished ones for a while.

Keyed by the frontend's request id (what ``AsyncLLM.add_request`` was given); each entry holds the
traces of its engine requests (the ``n`` samples). While a request runs the entry holds its
``Request`` objects (alive anyway, in the output processor) and reads their traces on demand;
when it finishes only the traces are kept, and at most ``max_finished`` of them for at most
``max_age_seconds`` (whichever limit is reached first drops the oldest). Runs on the event loop.

An owner (the gateway's tenant) can be attached; a reader that names a tenant only sees that
tenant's requests, a reader that names none sees all (direct access to the server).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tokenmill.engine.request import Request
from tokenmill.engine.trace import RequestTrace
from tokenmill.engine.trace_report import describe, snapshot, status, summarize, summarize_group

DEFAULT_MAX_FINISHED = 1000
DEFAULT_MAX_AGE_SECONDS = 600.0


@dataclass
class _Entry:
    children: list[Request]
    owner: str | None = None
    traces: list[tuple[str, RequestTrace | None]] = field(default_factory=list)
    finished_at: float | None = None

    def child_traces(self) -> list[tuple[str, RequestTrace | None]]:
        if self.finished_at is not None:
            return self.traces
        return [(c.request_id, c.trace) for c in self.children]


class TraceStore:
    def __init__(self, enabled: bool = True, max_finished: int = DEFAULT_MAX_FINISHED,
                 max_age_seconds: float = DEFAULT_MAX_AGE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.enabled = enabled
        self.max_finished = max_finished
        self.max_age_seconds = max_age_seconds
        self.clock = clock
        self._live: dict[str, _Entry] = {}
        self._finished: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._live) + len(self._finished)

    def add(self, request_id: str, children: list[Request]) -> None:
        if self.enabled:
            self._live[request_id] = _Entry(list(children))

    def discard(self, request_id: str) -> None:
        """Forget a request that was never admitted."""
        self._live.pop(request_id, None)

    def set_owner(self, request_id: str, owner: str | None) -> None:
        entry = self._entry(request_id)
        if entry is not None:
            entry.owner = owner

    def finish(self, request_id: str) -> None:
        """The request is done (finished, aborted, or the engine died): keep only its traces."""
        entry = self._live.pop(request_id, None)
        if entry is None:
            return
        entry.traces = entry.child_traces()
        entry.children = []
        entry.finished_at = self.clock()
        self._finished[request_id] = entry
        self._prune()

    def finish_all(self) -> None:
        for request_id in list(self._live):
            self.finish(request_id)

    def report(self, request_id: str, tenant: str | None = None, now: float | None = None,
               member_ids: list[str] | None = None) -> dict[str, Any] | None:
        """The trace as JSON, or None when unknown, expired, or another tenant's.

        ``member_ids``: the stored requests that make up ``request_id`` when it is not stored
        under that id itself (a completion with several prompts); unknown members are skipped.
        """
        entries = [e for e in (self._visible(i, tenant) for i in member_ids or [request_id])
                   if e is not None]
        if not entries:
            return None
        now = time.time() if now is None else now
        children, timelines = [], []
        for entry in entries:
            for child_id, trace in entry.child_traces():
                events = [] if trace is None else snapshot(trace, now)
                timelines.append(events)
                children.append({"id": child_id, "status": status(events),
                                 "arrival_time": None if trace is None else trace.origin,
                                 "summary": summarize(events),
                                 "events": [describe(e, child_id) for e in events]})
        finished = all(c["status"] == "finished" for c in children)
        return {"id": request_id, "object": "request.trace",
                "status": "finished" if finished else "running",
                "summary": summarize_group(timelines), "requests": children}

    def summary(self, request_id: str, now: float | None = None) -> str | None:
        """The one-phrase summary (for the finished-request log line), None if untraced."""
        entry = self._entry(request_id)
        if entry is None:
            return None
        now = time.time() if now is None else now
        traces = [snapshot(t, now) for _, t in entry.child_traces() if t is not None]
        return summarize_group(traces) if traces else None

    # ------------------------------------------------------------------ internals
    def _entry(self, request_id: str) -> _Entry | None:
        self._prune()
        return self._live.get(request_id) or self._finished.get(request_id)

    def _visible(self, request_id: str, tenant: str | None) -> _Entry | None:
        entry = self._entry(request_id)
        if entry is None or (tenant is not None and entry.owner != tenant):
            return None
        return entry

    def _prune(self) -> None:
        finished = self._finished
        while len(finished) > self.max_finished:
            finished.popitem(last=False)
        oldest_allowed = self.clock() - self.max_age_seconds
        while finished:
            entry = next(iter(finished.values()))
            if entry.finished_at is None or entry.finished_at >= oldest_allowed:
                break
            finished.popitem(last=False)
