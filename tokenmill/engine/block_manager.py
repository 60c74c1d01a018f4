"""Paged KV cache bookkeeping: a fixed pool of blocks, ref counts, prefix cache, LRU eviction.

Pure CPU and model-free: it hands out block ids; the model runner owns the tensors they index.

* A block is *in use* while its ref count is above zero (several requests can share a prefix block).
* Blocks with ref count zero sit in ``free_queue`` in eviction order (oldest first). A free block
  that still carries a hash keeps its KV and can be revived by a prefix hit until a new allocation
  evicts it (takes it from the front of the queue and drops its hash).
* A full block's hash is registered as soon as the block is allocated for tokens scheduled in the
  current step, as vLLM v1 does: the runner writes every token's K/V of a layer before that layer's
  attention reads, so a request admitted later in the same step (an ``n > 1`` sibling) may already
  point at those blocks.
* A prompt found whole in the cache (a retry, the same question again, a benchmark's repeated
  prompts) would still recompute its last block: the hit stops a token short, and a block is
  shared whole or not at all. Instead the last cached block is *copied* into a block of the
  request's own (``block_copies``, done by the runner before the forward) and only the last token
  is computed, as llama.cpp's token-level prompt reuse does. The source stays pinned until the
  step has run (``end_step``), and a block whose KV is only being written this step is never a
  source.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from tokenmill.engine.prefix_cache import BlockHash, update_block_hashes
from tokenmill.engine.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass
class KVBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None
    """Set while the block is registered in the prefix cache."""


@dataclass(frozen=True)
class ComputedBlocks:
    """A prefix-cache hit: blocks to reuse and the tokens they cover."""

    block_ids: list[int] = field(default_factory=list)
    num_tokens: int = 0
    copy_source: int | None = None
    """A cached block equal to the request's last prompt block: its KV is copied into a new block
    of the request's, and ``num_tokens`` reaches ``num_tokens - 1`` of the request."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        assert num_blocks >= 1 and block_size >= 1, (num_blocks, block_size)
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [KVBlock(block_id) for block_id in range(num_blocks)]
        # OrderedDict as an O(1) LRU queue: pop the front to evict, delete from the middle on a hit.
        self.free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.cached_blocks: dict[BlockHash, KVBlock] = {}
        # How many leading blocks of each request are already registered in the prefix cache, so
        # a decode step only looks at the one block that may have just filled up.
        self._num_registered_blocks: dict[str, int] = {}
        self.prefix_cache_queries = 0
        """Cumulative tokens looked up at admission (like vLLM, counted in tokens)."""
        self.prefix_cache_hits = 0
        """Cumulative tokens of those found in the cache."""
        self._block_copies: list[tuple[int, int]] = []  # (source, destination) for the runner
        self._pinned_sources: list[int] = []  # copy sources held until the step has run
        self._written_this_step: set[int] = set()  # registered now, KV not computed yet

    # ------------------------------------------------------------------ queries (change nothing)
    @property
    def num_free_blocks(self) -> int:
        """Blocks not held by any request (including cached ones that may still be revived)."""
        return len(self.free_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_queue)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        return len(self.cached_blocks)

    @property
    def pinned_block_ids(self) -> tuple[int, ...]:
        """Copy sources held (one reference each) until the step that copies them has run."""
        return tuple(self._pinned_sources)

    def num_blocks_for_tokens(self, num_tokens: int) -> int:
        return cdiv(num_tokens, self.block_size)

    def get_computed_blocks(self, request: Request) -> ComputedBlocks:
        """Longest cached prefix of the request, capped so at least one token is left to compute.

        The cap (``num_tokens - 1``) exists because the last token must run through the model to
        produce the logits the next token is sampled from.
        """
        if not self.enable_prefix_caching:
            return ComputedBlocks()
        assert not request.block_ids, f"{request} already holds blocks"
        hashes = update_block_hashes(request, self.block_size)
        max_blocks = (request.num_tokens - 1) // self.block_size
        block_ids: list[int] = []
        for block_hash in hashes[:max_blocks]:
            block = self.cached_blocks.get(block_hash)
            if block is None:
                break
            block_ids.append(block.block_id)
        if len(block_ids) == max_blocks and len(hashes) > max_blocks:
            # the whole prompt is cached (it ends on a block boundary): copy the last block
            last = self.cached_blocks.get(hashes[max_blocks])
            if last is not None and last.block_id not in self._written_this_step:
                return ComputedBlocks(block_ids, request.num_tokens - 1, last.block_id)
        return ComputedBlocks(block_ids, len(block_ids) * self.block_size)

    # ------------------------------------------------------------------ allocation
    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed: ComputedBlocks | None = None) -> bool:
        """Make room for ``num_new_tokens`` more tokens after the computed ones (and a hit).

        Returns False, changing nothing, when the pool cannot supply the blocks; the scheduler then
        preempts someone or waits. ``computed`` is passed once, when a request is admitted.
        """
        hit = computed or ComputedBlocks()
        total_tokens = request.num_computed_tokens + hit.num_tokens + num_new_tokens
        assert num_new_tokens >= 1 and total_tokens <= request.num_tokens, (
            f"cannot schedule {num_new_tokens} new tokens for {request}")
        num_held = len(request.block_ids) + len(hit.block_ids)
        num_new_blocks = max(0, self.num_blocks_for_tokens(total_tokens) - num_held)
        # Hit blocks with no owner sit in the free queue; reviving them takes them out of it.
        num_revived = sum(1 for block_id in hit.block_ids if self.blocks[block_id].ref_cnt == 0)
        if hit.copy_source is not None and self.blocks[hit.copy_source].ref_cnt == 0:
            num_revived += 1
        if num_new_blocks > len(self.free_queue) - num_revived:
            return False
        if hit.copy_source is not None:
            self._hold(hit.copy_source)  # before allocating, so it cannot be evicted for them
            self._pinned_sources.append(hit.copy_source)

        for block_id in hit.block_ids:
            self._hold(block_id)
        request.block_ids.extend(hit.block_ids)
        for _ in range(num_new_blocks):
            request.block_ids.append(self._pop_free_block().block_id)
        if hit.copy_source is not None:
            self._block_copies.append((hit.copy_source, request.block_ids[len(hit.block_ids)]))

        if computed is not None and self.enable_prefix_caching:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += hit.num_tokens
        if self.enable_prefix_caching:
            self._register_full_blocks(request, total_tokens)
        return True

    def _hold(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_cnt == 0:
            del self.free_queue[block_id]
        block.ref_cnt += 1

    def take_block_copies(self) -> list[tuple[int, int]]:
        """The (source, destination) block copies the runner must make before this step's
        forward pass; the sources stay held until ``end_step``."""
        copies, self._block_copies = self._block_copies, []
        return copies

    def end_step(self) -> None:
        """The step has run: copy sources are released, this step's blocks hold their KV."""
        for block_id in self._pinned_sources:
            self._release(block_id, "a copy source")
        self._pinned_sources = []
        self._written_this_step.clear()

    def _release(self, block_id: int, holder: str) -> None:
        block = self.blocks[block_id]
        assert block.ref_cnt > 0, f"double free of block {block_id} by {holder}"
        block.ref_cnt -= 1
        if block.ref_cnt == 0:
            self.free_queue[block_id] = None

    def _pop_free_block(self) -> KVBlock:
        block_id, _ = self.free_queue.popitem(last=False)
        block = self.blocks[block_id]
        assert block.ref_cnt == 0, f"block {block_id} in the free queue has ref_cnt {block.ref_cnt}"
        if block.block_hash is not None:
            # Evicted: its KV is about to be overwritten, so no later request may hit it.
            if self.cached_blocks.get(block.block_hash) is block:
                del self.cached_blocks[block.block_hash]
            block.block_hash = None
        block.ref_cnt = 1
        return block

    def _register_full_blocks(self, request: Request, num_tokens: int) -> None:
        num_full = num_tokens // self.block_size
        start = self._num_registered_blocks.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = update_block_hashes(request, self.block_size)
        for index in range(start, num_full):
            block = self.blocks[request.block_ids[index]]
            block_hash = hashes[index]
            # A block reached through a hit is already registered; an identical block computed
            # twice (a sibling's last prompt block) stays unregistered: one copy per hash suffices.
            if block.block_hash is None and block_hash not in self.cached_blocks:
                block.block_hash = block_hash
                self.cached_blocks[block_hash] = block
                self._written_this_step.add(block.block_id)
        self._num_registered_blocks[request.request_id] = num_full

    # ------------------------------------------------------------------ release
    def free(self, request: Request) -> None:
        """Release the request's blocks; cached ones stay revivable until evicted."""
        # Tail blocks go to the queue first so they are evicted first: a prefix shared by many
        # requests outlives the per-request suffixes that hang off it.
        for block_id in reversed(request.block_ids):
            self._release(block_id, request.request_id)
        request.block_ids = []
        self._num_registered_blocks.pop(request.request_id, None)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (for benchmarks); only possible while no block is in use."""
        if self.num_used_blocks:
            return False
        for block in self.blocks:
            block.block_hash = None
        self.cached_blocks.clear()
        return True

    # ------------------------------------------------------------------ invariants
    def check_no_leaks(self) -> None:
        """Raise AssertionError with details if any block is still held by anyone."""
        held = {block.block_id: block.ref_cnt for block in self.blocks if block.ref_cnt != 0}
        problems: list[str] = []
        if held:
            sample = dict(list(held.items())[:10])
            problems.append(f"{len(held)} block(s) with non-zero ref count (id: ref_cnt) {sample}")
        if len(self.free_queue) != self.num_blocks:
            missing = sorted(set(range(self.num_blocks)) - set(self.free_queue))[:10]
            problems.append(f"free queue holds {len(self.free_queue)} of {self.num_blocks} blocks; "
                            f"missing e.g. {missing}")
        if self._num_registered_blocks:
            problems.append(f"requests still registered: {sorted(self._num_registered_blocks)[:10]}")
        for block_hash, block in self.cached_blocks.items():
            if block.block_hash != block_hash:
                problems.append(f"cache entry points at block {block.block_id} with another hash")
                break
        if problems:
            raise AssertionError("KV block leak: " + "; ".join(problems))
