"""Hash chain over full KV blocks: the key of the automatic prefix cache.

A block's hash covers its parent's hash, its own token ids and extra keys, so equal hashes mean an
equal *whole prefix*, not just equal blocks. The request's ``cache_salt`` goes into the first block's
extra keys; through the chain it changes every later hash too, so tenants never share KV.

SHA-256 rather than Python's ``hash``: a 64-bit collision would silently hand one request another
request's KV (wrong text, or a leak across tenants), and SHA-256 over a 16-token block costs about a
microsecond.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from tokenmill.engine.request import Request

BlockHash = bytes

# Parent of a request's first block; any fixed value works as long as it is not a real hash.
_ROOT_HASH = b"tokenmill-prefix-root"


def hash_block_tokens(parent_hash: BlockHash | None, token_ids: Sequence[int],
                      extra_keys: tuple[object, ...] | None = None) -> BlockHash:
    """Hash of one full block given its parent's hash (None for the first block)."""
    digest = hashlib.sha256(_ROOT_HASH if parent_hash is None else parent_hash)
    digest.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    if extra_keys:
        # Length-prefixed so ("ab",) and ("a", "b") cannot collide.
        encoded = repr(extra_keys).encode()
        digest.update(struct.pack("<q", len(encoded)) + encoded)
    return digest.digest()


def block_extra_keys(request: Request, block_index: int) -> tuple[object, ...] | None:
    """Extra keys of a block; the salt only needs to enter the chain once, at the first block.

    An adapter id (LoRA) would also go here, on every block it changes.
    """
    if block_index == 0 and request.cache_salt is not None:
        return ("salt", request.cache_salt)
    return None


def update_block_hashes(request: Request, block_size: int) -> list[BlockHash]:
    """Extend ``request.block_hashes`` to cover every full block of its tokens; returns it.

    Tokens only ever get appended (preemption keeps the output), so earlier hashes stay valid.
    """
    hashes = request.block_hashes
    tokens = request.all_token_ids
    num_full_blocks = len(tokens) // block_size
    for index in range(len(hashes), num_full_blocks):
        parent = hashes[index - 1] if index else None
        start = index * block_size
        hashes.append(hash_block_tokens(parent, tokens[start:start + block_size],
                                        block_extra_keys(request, index)))
    return hashes
