"""The soak's short version: mixed requests above capacity against a real server, then its own
figures must show it came back clean (tokenmill/bench/soak.py, soak_checks.py)."""

from __future__ import annotations

import asyncio

from tokenmill.bench.soak import (
    ABORTED,
    AFTER_DELAY,
    AFTER_EVENTS,
    DONE,
    REJECTED,
    SoakMix,
    plan_requests,
    run_soak,
)
from tokenmill.bench.soak_checks import final_checks, wait_idle

MODEL = "SmolLM2-135M-Instruct"
# Short prompts and outputs keep it well under a minute on 2 shared cores; still two shared
# system prompts, n up to 4, both endpoints, streams, and a fifth of the clients going away.
MIX = SoakMix(seed=7, prompt_words=(1, 40), max_tokens=(1, 12), system_prompt_words=(60, 120),
              abort_fraction=0.2, abort_within_s=0.5)
NUM_REQUESTS = 100
CONCURRENCY = 8  # ~20 choices in flight against room for 4 (2 running + 2 waiting)


def test_plan_covers_the_mix():
    planned = plan_requests(MIX, NUM_REQUESTS, MODEL)
    assert planned == plan_requests(MIX, NUM_REQUESTS, MODEL)  # seeded
    assert {r.path for r in planned} == {"/v1/completions", "/v1/chat/completions"}
    assert {r.stream for r in planned} == {True, False}
    assert {r.n for r in planned} == {1, 2, 3, 4}
    assert {r.abort.kind for r in planned if r.abort} == {AFTER_DELAY, AFTER_EVENTS}
    assert 0.1 < sum(r.abort is not None for r in planned) / NUM_REQUESTS < 0.3
    prompts = [r.body.get("prompt") or r.body["messages"][0]["content"] for r in planned]
    shared = [p for p in prompts if p.startswith("You are assistant number")]
    assert len(shared) > NUM_REQUESTS / 2  # most requests start with a shared system prompt


def test_soak_ends_clean(small_server):
    url = small_server.url
    tally = asyncio.run(run_soak(url, plan_requests(MIX, NUM_REQUESTS, MODEL), CONCURRENCY,
                                 request_timeout_s=120))
    state, _ = asyncio.run(wait_idle(url, deadline_s=60))

    summary = tally.summary()
    assert tally.num_sent == NUM_REQUESTS, summary
    # Every request is done, refused with 429 (with Retry-After) or aborted by its client: no
    # 5xx, no other 4xx, no transport error, no malformed answer (examples say what went wrong).
    assert (tally.outcomes[DONE] + tally.outcomes[REJECTED] + tally.outcomes[ABORTED]
            == tally.num_sent), (summary, tally.examples)
    # The run exercised what it is for: answers, overload, and clients going away.
    assert tally.outcomes[DONE] > 0 and tally.outcomes[REJECTED] > 0, summary
    assert tally.outcomes[ABORTED] > 0, summary
    failed = [c for c in final_checks(tally, state) if not c.ok]
    # Includes running = waiting = 0 and no KV block in use, from /metrics and /dashboard/data.
    assert not failed, failed
