"""Where a model comes from: resolves a path (or the built-in default) to its architecture numbers, a
tensor stream and a tokenizer, whichever the file format. Models only ever see this."""

from __future__ import annotations

import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokenmill.errors import ModelNotFoundError
from tokenmill.loader.builtin import BUILTIN_MODEL_NAME, builtin_model_path
from tokenmill.loader.tokenizer import Tokenizer, tokenizer_from_folder, tokenizer_from_gguf
from tokenmill.models.arch_config import ArchConfig


@dataclass
class ModelSource:
    path: Path
    name: str  # what clients call the model by default
    arch: ArchConfig
    tokenizer: Tokenizer
    iter_tensors: Callable[[], Iterator[tuple[str, torch.Tensor]]]


def resolve_model_path(model: str | Path | None) -> Path:
    if model is None:
        return builtin_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"model path {path} does not exist")
    return path


def load_tokenizer(model_path: str | Path | None = None) -> Tokenizer:
    """The tokenizer of a GGUF file or HF folder, without the weights; ``None`` is the built-in
    model's."""
    from tokenmill.loader.gguf import open_gguf

    path = resolve_model_path(model_path)
    if path.is_dir():
        return tokenizer_from_folder(path)
    return tokenizer_from_gguf(open_gguf(path), path)


def open_model_source(model: str | Path | None) -> ModelSource:
    path = resolve_model_path(model)
    if path.is_dir():
        return _folder_source(path)
    if path.suffix != ".gguf":
        raise ModelNotFoundError(
            f"{path} is neither a .gguf file nor a Hugging Face model folder"
        )
    return _gguf_source(path, name=BUILTIN_MODEL_NAME if model is None else path.stem)


def _gguf_source(path: Path, name: str) -> ModelSource:
    from tokenmill.loader.gguf import iter_gguf_tensors, open_gguf, read_arch_config, tensor_entries

    reader = open_gguf(path)
    arch = read_arch_config(reader, path)  # first: an unsupported architecture is the error
    tokenizer = tokenizer_from_gguf(reader, path)  # its tables live in the library, not Python
    # Neither the reader nor its memory map outlives the load: the reader's metadata fields (the
    # vocabulary and merges as ~500k small numpy views) held ~180 MB, and the mapped file pages
    # another ~95 MB of resident memory, for the life of the server. What is kept is copied
    # once the reader is gone: Python objects made while it was alive sit among its freed ones
    # and keep their 1 MB arenas resident (this copy: ~5 MB less RSS after the built-in model
    # loads).
    # The first load reads the tensors listed here; a later one (an engine restart) opens the
    # file again.
    kept = pickle.dumps((arch, tensor_entries(reader)))
    del reader, arch
    arch, entries = pickle.loads(kept)
    listed = [entries]

    def weights() -> Iterator[tuple[str, Any]]:
        tensors = listed.pop() if listed else tensor_entries(open_gguf(path))
        return iter_gguf_tensors(tensors, arch, path)

    return ModelSource(path, name, arch, tokenizer, weights)


def _folder_source(folder: Path) -> ModelSource:
    from tokenmill.loader.safetensors import iter_safetensors, read_hf_config

    arch = read_hf_config(folder)
    if not any(folder.glob("*.safetensors")):
        raise ModelNotFoundError(f"{folder} has no *.safetensors weight files")
    tokenizer = tokenizer_from_folder(folder, eos_token_ids=arch.eos_token_ids)
    return ModelSource(folder, folder.name, arch, tokenizer, lambda: iter_safetensors(folder))
