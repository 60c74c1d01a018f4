"""Keep Python's cyclic garbage collector off the objects a server holds for its whole life.

After start-up a serving process holds a few hundred thousand long-lived Python objects (the
tokenizer's vocabulary, torch's, FastAPI's and pydantic's module state, the gateway's models). A
full (generation 2) collection walks every one of them while holding the GIL, so the event loop
and the engine thread's Python between kernels stop for its whole length: measured in `tokenmill
serve` at 4 streaming clients, one full collection took 0.27-0.55 s, and py-spy put 29 % of the
event loop's time in ``gc_collect_main``. ``gc.freeze()`` moves everything alive at that moment
into a permanent generation that collections skip (CPython's advice for long-running servers;
vLLM does the same after start-up). Objects created later are collected as before.

Frozen objects are never collected, so a server that drops a dead engine to load a new one thaws
them first (``collect_everything``); otherwise the old engine's cyclic garbage would stay.
"""

from __future__ import annotations

import gc


def freeze_long_lived_objects() -> None:
    """Once start-up is done: collect what start-up left behind, then freeze the rest."""
    gc.collect()
    gc.freeze()


def collect_everything() -> None:
    """Thaw the frozen objects and run a full collection (before replacing an engine)."""
    gc.unfreeze()
    gc.collect()
