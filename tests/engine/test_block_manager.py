"""BlockManager: pool accounting, ref counts, hash-chained prefix cache, LRU eviction, leak check."""

from __future__ import annotations

import pytest

from tokenmill.engine.block_manager import BlockManager
from tokenmill.engine.prefix_cache import hash_block_tokens
from tokenmill.engine.request import Request
from tokenmill.sampling_params import SamplingParams

BLOCK = 4


def make_request(request_id: str, token_ids: list[int], cache_salt: str | None = None) -> Request:
    return Request(request_id, token_ids, SamplingParams(max_tokens=8), cache_salt=cache_salt)


def admit(bm: BlockManager, request: Request) -> int:
    """Admit like the scheduler does (whole prompt in one go); returns the cached token count."""
    hit = bm.get_computed_blocks(request)
    assert bm.allocate_slots(request, request.num_tokens - hit.num_tokens, hit)
    request.num_computed_tokens = request.num_tokens
    return hit.num_tokens


def test_allocate_and_free_return_every_block() -> None:
    bm = BlockManager(num_blocks=10, block_size=BLOCK)
    request = make_request("a", list(range(10)))  # 10 tokens -> 3 blocks of 4
    admit(bm, request)
    assert len(request.block_ids) == 3 and len(set(request.block_ids)) == 3
    assert bm.num_free_blocks == 7 and bm.usage == pytest.approx(0.3)
    # A decode step that stays inside the last block needs no new block; the next one does.
    request.append_output_token_id(99)
    assert bm.allocate_slots(request, 1) and len(request.block_ids) == 3
    request.num_computed_tokens += 1
    request.append_output_token_id(98)
    request.append_output_token_id(97)
    assert bm.allocate_slots(request, 2) and len(request.block_ids) == 4
    bm.free(request)
    assert request.block_ids == [] and bm.num_free_blocks == 10 and bm.usage == 0.0
    bm.check_no_leaks()


def test_allocation_that_does_not_fit_changes_nothing() -> None:
    bm = BlockManager(num_blocks=3, block_size=BLOCK)
    big = make_request("big", list(range(13)))  # needs 4 blocks
    assert not bm.allocate_slots(big, 13)
    assert big.block_ids == [] and bm.num_free_blocks == 3
    assert bm.allocate_slots(big, 12)  # a 12-token chunk fits in exactly 3
    bm.free(big)
    bm.check_no_leaks()


def test_shared_prefix_blocks_are_ref_counted() -> None:
    bm = BlockManager(num_blocks=16, block_size=BLOCK)
    prefix = list(range(100, 112))  # three full blocks
    first = make_request("first", prefix + [1, 2])
    second = make_request("second", prefix + [3, 4, 5])
    assert admit(bm, first) == 0
    assert admit(bm, second) == 12
    assert second.block_ids[:3] == first.block_ids[:3]
    assert second.block_ids[3] != first.block_ids[3]
    assert [bm.blocks[b].ref_cnt for b in first.block_ids] == [2, 2, 2, 1]
    assert bm.num_used_blocks == 5  # 3 shared + one tail block each
    bm.free(first)
    assert [bm.blocks[b].ref_cnt for b in second.block_ids] == [1, 1, 1, 1]
    with pytest.raises(AssertionError, match="4 block"):
        bm.check_no_leaks()
    bm.free(second)
    bm.check_no_leaks()
    assert bm.prefix_cache_queries == 14 + 15 and bm.prefix_cache_hits == 12


def test_hash_is_a_chain_over_the_whole_prefix() -> None:
    bm = BlockManager(num_blocks=16, block_size=BLOCK)
    admit(bm, make_request("a", [1, 1, 1, 1, 2, 2, 2, 2, 9]))
    # Same second block, different first block: no hit at all, not even on block two.
    other = make_request("b", [7, 7, 7, 7, 2, 2, 2, 2, 9])
    assert bm.get_computed_blocks(other).num_tokens == 0
    # Same first block only: a one-block hit.
    partial = make_request("c", [1, 1, 1, 1, 3, 3, 3, 3, 9])
    assert bm.get_computed_blocks(partial).num_tokens == BLOCK
    assert hash_block_tokens(None, [1, 2]) != hash_block_tokens(None, [2, 1])
    assert hash_block_tokens(None, [1, 2], ("salt", "x")) != hash_block_tokens(None, [1, 2])


def test_cache_salt_isolates_tenants() -> None:
    bm = BlockManager(num_blocks=16, block_size=BLOCK)
    tokens = list(range(20))
    admit(bm, make_request("alice-1", tokens, cache_salt="alice"))
    assert bm.get_computed_blocks(make_request("bob", tokens, cache_salt="bob")).num_tokens == 0
    assert bm.get_computed_blocks(make_request("anon", tokens)).num_tokens == 0
    same = make_request("alice-2", tokens, cache_salt="alice")
    assert bm.get_computed_blocks(same).num_tokens == 16


def test_hit_is_capped_at_num_tokens_minus_one() -> None:
    bm = BlockManager(num_blocks=16, block_size=BLOCK)
    tokens = list(range(14))  # three full blocks and a partial one
    admit(bm, make_request("a", tokens))
    bm.end_step()
    again = make_request("b", tokens)
    hit = bm.get_computed_blocks(again)
    assert hit.num_tokens == 12 and len(hit.block_ids) == 3 and hit.copy_source is None
    assert bm.allocate_slots(again, 2, hit)
    assert len(again.block_ids) == 4 and bm.take_block_copies() == []


def test_a_whole_cached_prompt_copies_its_last_block() -> None:
    """All 16 tokens cached: the last one must still run (its logits), so three blocks are shared
    and the fourth is copied into a block of the request's own; the source is held until the
    step has run."""
    bm = BlockManager(num_blocks=16, block_size=BLOCK)
    tokens = list(range(16))
    first = make_request("a", tokens)
    admit(bm, first)
    bm.end_step()
    again = make_request("b", tokens)
    hit = bm.get_computed_blocks(again)
    assert hit.num_tokens == 15 and hit.block_ids == first.block_ids[:3]
    first_ids = list(first.block_ids)
    assert hit.copy_source == first_ids[3]
    bm.free(first)  # the source has no owner now, but the copy pins it
    assert bm.allocate_slots(again, 1, hit)
    (copy,) = bm.take_block_copies()
    assert copy == (first_ids[3], again.block_ids[3])
    assert again.block_ids[3] != first_ids[3]
    assert bm.blocks[copy[0]].ref_cnt == 1 and copy[0] not in bm.free_queue
    bm.end_step()
    assert bm.blocks[copy[0]].ref_cnt == 0 and copy[0] in bm.free_queue
    bm.free(again)
    bm.check_no_leaks()


def test_the_copy_source_is_not_evicted_by_the_allocation_it_serves() -> None:
    bm = BlockManager(num_blocks=5, block_size=BLOCK)
    tokens = list(range(16))
    first = make_request("a", tokens)
    admit(bm, first)
    bm.end_step()
    first_ids = list(first.block_ids)
    bm.free(first)  # all five blocks free; the four cached ones are oldest in the queue
    again = make_request("b", tokens)
    hit = bm.get_computed_blocks(again)
    assert bm.allocate_slots(again, 1, hit)
    ((source, destination),) = bm.take_block_copies()
    assert bm.blocks[source].block_hash is not None, "the source kept its KV"
    assert destination not in first_ids
    bm.end_step()
    bm.free(again)
    bm.check_no_leaks()


def test_a_block_written_in_this_step_is_never_a_copy_source() -> None:
    bm = BlockManager(num_blocks=16, block_size=BLOCK)
    tokens = list(range(16))
    admit(bm, make_request("a", tokens))  # same step: its KV is not computed yet
    hit = bm.get_computed_blocks(make_request("b", tokens))
    assert hit.num_tokens == 12 and hit.copy_source is None


def test_freed_cached_blocks_are_revived_until_evicted_oldest_first() -> None:
    bm = BlockManager(num_blocks=6, block_size=BLOCK)
    old = make_request("old", [1] * 8 + [0])       # 2 full blocks + a partial one
    new = make_request("new", [2] * 8 + [0])
    admit(bm, old)
    bm.free(old)
    admit(bm, new)
    bm.free(new)
    assert bm.num_free_blocks == 6 and bm.num_cached_blocks == 4
    # Still revivable after being freed:
    revived = make_request("old-again", [1] * 8 + [5])
    assert bm.get_computed_blocks(revived).num_tokens == 8

    # Two fresh blocks are needed; the LRU front holds the never-hashed block and old's blocks
    # (freed tail first), so old's last full block goes before anything of new's.
    filler = make_request("filler", [3] * 6)
    admit(bm, filler)
    assert bm.get_computed_blocks(make_request("q-old", [1] * 8 + [5])).num_tokens == 4
    assert bm.get_computed_blocks(make_request("q-new", [2] * 8 + [5])).num_tokens == 8
    bm.free(filler)
    bm.check_no_leaks()


def test_a_hit_takes_revived_blocks_out_of_the_free_pool() -> None:
    bm = BlockManager(num_blocks=4, block_size=BLOCK)
    cached = make_request("cached", list(range(12)) + [0])
    admit(bm, cached)
    bm.free(cached)
    # Reuses 3 cached blocks and needs 1 new one: exactly the pool, nothing may be evicted twice.
    reuse = make_request("reuse", list(range(12)) + [7, 7, 7])
    hit = bm.get_computed_blocks(reuse)
    assert hit.num_tokens == 12
    assert bm.allocate_slots(reuse, 3, hit)
    assert len(set(reuse.block_ids)) == 4 and bm.num_free_blocks == 0
    bm.free(reuse)
    bm.check_no_leaks()


def test_prefix_caching_off_switch() -> None:
    bm = BlockManager(num_blocks=16, block_size=BLOCK, enable_prefix_caching=False)
    tokens = list(range(20))
    first = make_request("a", tokens)
    admit(bm, first)
    second = make_request("b", tokens)
    assert admit(bm, second) == 0
    assert not set(first.block_ids) & set(second.block_ids)
    assert bm.num_cached_blocks == 0
    assert bm.prefix_cache_queries == 0 and bm.prefix_cache_hits == 0
    bm.free(first)
    bm.free(second)
    bm.check_no_leaks()


def test_double_free_is_caught() -> None:
    bm = BlockManager(num_blocks=4, block_size=BLOCK)
    request = make_request("a", [1, 2, 3])
    admit(bm, request)
    block_ids = list(request.block_ids)
    bm.free(request)
    request.block_ids = block_ids  # a bug elsewhere that keeps stale block ids
    with pytest.raises(AssertionError, match="double free"):
        bm.free(request)


def test_leak_report_names_the_blocks() -> None:
    bm = BlockManager(num_blocks=4, block_size=BLOCK)
    admit(bm, make_request("leaky", [1, 2, 3, 4, 5]))
    with pytest.raises(AssertionError, match=r"2 block\(s\) with non-zero ref count") as info:
        bm.check_no_leaks()
    assert "leaky" in str(info.value)
