"""What a GGUF model source keeps between reading the metadata and loading the weights.

The gguf reader builds ~500k small objects for a vocabulary; keeping any of them (its
``ReaderTensor``s, its memory map) for the life of the server pinned ~50 MB of Python's object
arenas. The source keeps plain records instead, and a load reads the file itself."""

from __future__ import annotations

import gc

import torch

from tokenmill.loader.gguf import TensorEntry
from tokenmill.loader.model_source import open_model_source
from tokenmill.models.registry import build_model


def _alive(kind_name: str) -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if type(obj).__name__ == kind_name)


def test_a_gguf_source_keeps_no_reader_objects_and_still_loads_the_model() -> None:
    before = _alive("ReaderTensor"), _alive("GGUFReader")
    entries_before = _alive(TensorEntry.__name__)  # other tests' sources may hold theirs
    source = open_model_source(None)
    assert (_alive("ReaderTensor"), _alive("GGUFReader")) == before
    model = build_model(source, torch.float32, "cpu", max_positions=64)
    assert sum(model.weight_report().values()) > 0
    # a second load (an engine restart) opens the file again
    again = build_model(source, torch.float32, "cpu", max_positions=64)
    first, second = model.state_dict(), again.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first if first[k].is_floating_point())
    assert (_alive("ReaderTensor"), _alive("GGUFReader")) == before
    assert _alive(TensorEntry.__name__) == entries_before  # the records go as a load reads them
