"""Stepping the engine by hand: per-step deltas, and aborts that free a request's blocks at once,
whether it is decoding, in the middle of a chunked prefill or still waiting."""

from __future__ import annotations

from typing import Any

from tokenmill import SamplingParams

PROMPTS = ["Once upon a time, in a small village by the sea, there lived",
           "The three most important inventions of the last century are",
           "1, 2, 3, 4, 5, 6, 7, 8,"]


def _child(llm: Any, request_id: str) -> Any:
    (child_id,) = llm.output_processor.child_ids(request_id)
    return llm.engine.scheduler.requests[child_id]


def _abort(llm: Any, request_id: str) -> None:
    """What a client disconnect does: the core frees the blocks, the frontend forgets the request."""
    llm.engine.abort_requests(llm.output_processor.child_ids(request_id))
    llm.output_processor.abort(request_id)


def test_deltas_add_up_to_the_final_output(llm: Any, driver: Any) -> None:
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    request_ids = driver.add(llm, PROMPTS, params, prefix="deltas")
    run = driver.SteppedRun()
    token_deltas: dict[str, list[int]] = {rid: [] for rid in request_ids}
    while llm.engine.has_unfinished_requests():
        for output in driver.step(llm, run):
            delta = output.outputs[0].delta_token_ids
            assert len(delta) == 1, "one new token per request per step"
            token_deltas[output.request_id].extend(delta)
            assert output.finished == (output.outputs[0].finish_reason is not None)
    for request_id in request_ids:
        final = run.final[request_id].outputs[0]
        assert token_deltas[request_id] == final.token_ids
        assert "".join(run.deltas[request_id]) == final.text
        assert len(run.deltas[request_id]) == 10  # one output per step, the last one finished


def test_abort_while_decoding_frees_blocks_at_once(llm: Any, driver: Any) -> None:
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    request_ids = driver.add(llm, PROMPTS, params, prefix="abort-decode", cache_salt="abort")
    run = driver.SteppedRun()
    for _ in range(4):
        driver.step(llm, run)
    victim = _child(llm, request_ids[1])
    block_manager = llm.engine.scheduler.block_manager
    own_blocks = [b for b in victim.block_ids if block_manager.blocks[b].ref_cnt == 1]
    assert own_blocks and victim.num_output_tokens == 4
    used_before = block_manager.num_used_blocks

    _abort(llm, request_ids[1])
    assert block_manager.num_used_blocks == used_before - len(own_blocks)
    assert all(block_manager.blocks[b].ref_cnt == 0 for b in own_blocks)
    assert victim.request_id not in llm.engine.scheduler.requests
    assert victim.finish_reason == "abort"

    outputs_before = len(run.deltas[request_ids[1]])
    driver.run(llm, run)
    assert len(run.deltas[request_ids[1]]) == outputs_before, "an aborted request stays silent"
    for request_id in (request_ids[0], request_ids[2]):
        assert len(run.final[request_id].outputs[0].token_ids) == 12


def test_abort_mid_prefill_and_while_waiting(make_llm: Any, driver: Any) -> None:
    llm = make_llm(enable_prefix_caching=True, max_num_batched_tokens=16)
    long_prompt = " ".join(f"word{i}" for i in range(60))  # far more than one 16-token chunk
    params = SamplingParams(temperature=0, max_tokens=4)
    first, second = driver.add(llm, [long_prompt, PROMPTS[0]], params, prefix="abort-prefill",
                               cache_salt="abort-prefill")
    run = driver.SteppedRun()
    driver.step(llm, run)
    in_prefill, waiting = _child(llm, first), _child(llm, second)
    assert 0 < in_prefill.num_computed_tokens < in_prefill.num_prompt_tokens
    assert in_prefill.block_ids and not waiting.block_ids
    assert llm.engine.get_stats().num_waiting == 1

    _abort(llm, first)
    assert llm.engine.scheduler.block_manager.num_used_blocks == 0
    _abort(llm, second)
    assert not llm.engine.has_unfinished_requests()
    assert run.final == {}, "neither request produced a token"
