"""One tiny random Llama per session: the float model every quantized checkpoint here comes from."""

from __future__ import annotations

import pytest

from tests.quant.quant_checkpoints import save_tiny_llama


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    """(folder, state dict) of the float model."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    return folder, save_tiny_llama(folder)
