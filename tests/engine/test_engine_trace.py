"""Request traces through the whole engine on the built-in model: with a 16-block KV pool, the
third request waits for KV and the second is preempted, and their traces say exactly that."""

from __future__ import annotations

from typing import Any

from tokenmill import SamplingParams
from tokenmill.engine.trace_report import describe, snapshot, summarize

POOL_BLOCKS = 16
PROMPT_TOKENS = 100  # 7 blocks of 16; with 60 generated tokens a request grows to 10 blocks


def test_trace_of_a_request_queued_behind_a_full_pool_and_preempted(make_llm: Any, plain_llm: Any,
                                                                     driver: Any) -> None:
    bytes_per_block = plain_llm.engine.runner.kv_spec.bytes_per_block
    llm = make_llm(kv_cache_memory=POOL_BLOCKS * bytes_per_block, enable_prefix_caching=False)
    assert llm.engine.runner.kv_spec.num_blocks == POOL_BLOCKS
    prompts = [list(range(start, start + PROMPT_TOKENS)) for start in (1000, 2000, 3000)]
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True)
    ids = driver.add(llm, prompts, params, prefix="trace")
    traces = {rid: llm.output_processor.states[rid].children[0].trace for rid in ids}
    driver.run(llm)
    a, b, c = (traces[rid] for rid in ids)

    def events(trace: Any, kind: str) -> list[dict]:
        return [d for d in (describe(e, "self") for e in snapshot(trace, 0.0))
                if d["event"] == kind]

    first_wait = events(c, "wait")[0]
    assert (first_wait["reason"], first_wait["blocks_needed"]) == ("kv_blocks_short", 7)
    [preempted] = events(b, "preempted")
    assert preempted["by_request_id"] == "trace-0#0"
    assert (preempted["blocks_needed"], preempted["blocks_free"]) == (1, 0)
    assert preempted["num_tokens_dropped"] == PROMPT_TOKENS + 28
    assert summarize(snapshot(b, 0.0)).endswith(
        "KV full (needed 9 blocks, 6 free); preempted once")
    assert "KV full behind 1 request; preempted once" in summarize(snapshot(c, 0.0))
    assert summarize(snapshot(a, 0.0)) == "not queued"
    for trace in (a, b, c):
        assert events(trace, "finished")[0]["num_output_tokens"] == 60
        assert len(events(trace, "first_token")) == 1
