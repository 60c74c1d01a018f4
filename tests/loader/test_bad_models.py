"""Models that cannot be loaded give a tokenmill error naming the file and the problem; the CLI
prints it on one line, without a traceback, and exits non-zero."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tokenmill.errors import (
    CorruptModelFileError,
    ModelLoadError,
    ModelNotFoundError,
    UnsupportedModelError,
)
from tokenmill.loader.model_source import open_model_source
from tokenmill.models.registry import build_model


def _load(path: Path) -> None:
    import torch

    build_model(open_model_source(path), torch.float32, "cpu")


def _truncated_copy(source: Path, target: Path, fraction: float) -> Path:
    with open(source, "rb") as src:
        data = src.read(int(source.stat().st_size * fraction))
    target.write_bytes(data)
    return target


def _tiny_gguf(path: Path, architecture: str) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_head_count(2)
    writer.add_feed_forward_length(16)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_missing_file(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does-not-exist.gguf"):
        _load(tmp_path / "does-not-exist.gguf")


@pytest.mark.parametrize("fraction", [0.0001, 0.3, 0.97])
def test_truncated_gguf(tmp_path, builtin_source, fraction):
    path = _truncated_copy(builtin_source.path, tmp_path / "truncated.gguf", fraction)
    with pytest.raises(CorruptModelFileError, match="truncated.gguf"):
        _load(path)


def test_garbage_file_with_gguf_suffix(tmp_path):
    path = tmp_path / "garbage.gguf"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(CorruptModelFileError, match="garbage.gguf"):
        _load(path)


def test_unsupported_gguf_architecture(tmp_path):
    path = _tiny_gguf(tmp_path / "bert.gguf", "bert")
    with pytest.raises(UnsupportedModelError, match=r"bert.gguf.*'bert' is not supported"):
        _load(path)


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 4}))
    with pytest.raises(ModelNotFoundError, match=r"no \*\.safetensors"):
        _load(tmp_path)


def test_folder_with_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
    with pytest.raises(UnsupportedModelError, match="BertModel"):
        _load(tmp_path)


def test_corrupt_safetensors(tmp_path, builtin_source):
    from tests_support import tiny_llama_folder

    folder = tiny_llama_folder(tmp_path)
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CorruptModelFileError, match=weights.name):
        _load(folder)


def test_file_that_is_not_a_model(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    with pytest.raises(ModelLoadError, match="notes.txt"):
        _load(path)


def test_cli_prints_the_error_without_traceback(tmp_path, builtin_source):
    path = _truncated_copy(builtin_source.path, tmp_path / "cut.gguf", 0.3)
    for model in (str(tmp_path / "missing.gguf"), str(path)):
        result = subprocess.run(
            [sys.executable, "-m", "tokenmill.cli", "generate", "--model", model, "hello"],
            capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode != 0
        assert "Traceback" not in result.stderr
        assert result.stderr.startswith("tokenmill: error:")
        assert Path(model).name in result.stderr
