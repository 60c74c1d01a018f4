"""Freezing start-up objects keeps full collections off them; a thaw lets a dropped engine's
cyclic garbage go."""

from __future__ import annotations

import gc
import weakref


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def _cycle() -> weakref.ref:
    a, b = Node(), Node()
    a.other, b.other = b, a
    return weakref.ref(a)


def test_frozen_objects_are_skipped_until_thawed() -> None:
    from tokenmill.gc_policy import collect_everything, freeze_long_lived_objects

    held = Node()
    held.other = held
    survivor = weakref.ref(held)
    try:
        freeze_long_lived_objects()
        assert gc.get_freeze_count() > 0
        del held  # garbage now, but frozen: a collection does not reach it
        gc.collect()
        assert survivor() is not None
        fresh = _cycle()  # made after the freeze: collected as usual
        gc.collect()
        assert fresh() is None
        collect_everything()  # what the server does before loading a new engine
        assert survivor() is None
        assert gc.get_freeze_count() == 0
    finally:
        gc.unfreeze()
