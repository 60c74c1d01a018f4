"""Request priority: the rank a request holds in the scheduler's queues, and the waiting queue.

Priority follows vLLM: ``priority`` is an int, default 0, and a LOWER value is MORE urgent. The
scheduler orders both its waiting queue (who is admitted next) and its running list (who gets tokens
first, who is preempted last) by one key per request, fixed when the request is first queued:

    key = (queued_time + priority * priority_aging_seconds, arrival number)

This is aging in closed form. Ranking by ``priority - waited / aging`` (priority improves with
time spent waiting) orders requests exactly as ``queued_time + priority * aging`` does, since
``now`` is common to all of them; so the key never changes and needs no re-sorting. What it means:
priority p is a head start of ``p * aging`` seconds, and a request is admitted before every more
urgent request (priority q < p) that arrives more than ``(p - q) * aging`` seconds after it.
That is the starvation bound. ``aging == 0`` ranks by ``(priority, arrival number)``: strict
priority, no bound.

With equal priorities the key is arrival order, which is first come, first served: the behaviour the
scheduler had before priorities existed. A preempted request keeps its key, so it goes back ahead of
everyone who arrived after it (with equal priorities: to the front of the queue, as before).
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from tokenmill.engine.request import Request

QueueKey = tuple[float, int]


class QueueKeys:
    """Hands out queue keys; arrival numbers break ties, so equal priorities stay FCFS."""

    def __init__(self, aging_seconds: float) -> None:
        assert aging_seconds >= 0, aging_seconds
        self.aging_seconds = aging_seconds
        self._num_keys = 0
        self._latest_time = float("-inf")

    def key(self, priority: int, now: float) -> QueueKey:
        number = self._num_keys
        self._num_keys += 1
        if self.aging_seconds == 0:
            return float(priority), number
        # A wall clock may step back; arrival time must not, or an equal-priority later request
        # could overtake an earlier one.
        self._latest_time = max(self._latest_time, now)
        return self._latest_time + priority * self.aging_seconds, number


class WaitingQueue:
    """The waiting requests, most urgent key first.

    A sorted list: admission pops the front, arrivals are inserted by binary search. Both move
    pointers in O(n), which for the queue's bound (``max_waiting_requests``, default 1024) is a few
    microseconds, and buys in-order iteration (request traces number who is ahead of whom) and
    indexing without a second structure.
    """

    def __init__(self) -> None:
        self._requests: list[Request] = []

    def push(self, request: Request) -> None:
        assert request.queue_key is not None, f"{request} was never given a queue key"
        bisect.insort(self._requests, request, key=_queue_key)

    def peek(self) -> Request:
        return self._requests[0]

    def pop(self) -> Request:
        return self._requests.pop(0)

    def remove(self, request: Request) -> None:
        self._requests.remove(request)

    def __getitem__(self, index: int) -> Request:
        return self._requests[index]

    def __iter__(self) -> Iterator[Request]:
        return iter(self._requests)

    def __len__(self) -> int:
        return len(self._requests)

    def __bool__(self) -> bool:
        return bool(self._requests)


def insert_running(running: list[Request], request: Request) -> None:
    """Put ``request`` into the running list by its key: the list's tail is preempted first."""
    bisect.insort(running, request, key=_queue_key)


def _queue_key(request: Request) -> QueueKey:
    return request.queue_key  # type: ignore[return-value]  # set before queuing (asserted)
