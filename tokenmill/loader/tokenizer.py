"""Text <-> token ids, built from a GGUF file's metadata or a Hugging Face ``tokenizer.json``.

The Hugging Face ``tokenizers`` library does the work; this file only assembles it from the GGUF
vocabulary (byte-level BPE with its merges, ``gpt2``; or sentencepiece pieces with their scores,
``llama``: ``sentencepiece_gguf.py``), and carries the special tokens and the chat template along.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from tokenizers import Tokenizer as BackendTokenizer

from tokenmill.errors import CorruptModelFileError, ModelNotFoundError, UnsupportedModelError
from tokenmill.loader.chat_template import render_chat_template
from tokenmill.loader.sentencepiece_gguf import sentencepiece_backend

# GGUF token types (llama.cpp's llama_token_type): 3 = control, 4 = user defined.
_GGUF_CONTROL, _GGUF_USER_DEFINED = 3, 4


class Tokenizer:
    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        bos_token_id: int | None,
        eos_token_ids: tuple[int, ...],
        pad_token_id: int | None = None,
        chat_template: str | None = None,
    ):
        self.backend = backend
        self.bos_token_id = bos_token_id
        self.eos_token_ids = eos_token_ids
        self.pad_token_id = pad_token_id
        self.chat_template = chat_template

    @property
    def eos_token_id(self) -> int | None:
        return self.eos_token_ids[0] if self.eos_token_ids else None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_text(self, token_id: int | None) -> str | None:
        return None if token_id is None else self.backend.id_to_token(token_id)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def convert_ids_to_tokens(self, token_ids: list[int]) -> list[str]:
        return [self.backend.id_to_token(i) for i in token_ids]

    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **extra: Any
    ) -> str:
        if self.chat_template is None:
            raise UnsupportedModelError("this model has no chat template; send a plain prompt")
        special = {
            "bos_token": self.token_text(self.bos_token_id) or "",
            "eos_token": self.token_text(self.eos_token_id) or "",
        }
        return render_chat_template(self.chat_template, messages,
                                    add_generation_prompt=add_generation_prompt,
                                    special_tokens=special, **extra)


def tokenizer_from_gguf(reader: Any, path: Path) -> Tokenizer:
    from tokenmill.loader.gguf import field_value, gguf_eos_token_ids

    kind = field_value(reader, "tokenizer.ggml.model")
    if kind not in ("gpt2", "llama"):
        raise UnsupportedModelError(
            f"{path}: tokenizer model {kind!r} is not supported (tokenmill reads byte-level BPE, "
            "tokenizer.ggml.model = gpt2, and sentencepiece, llama)"
        )
    tokens: list[str] = field_value(reader, "tokenizer.ggml.tokens")
    token_types: list[int] = field_value(reader, "tokenizer.ggml.token_type") or []
    if not tokens:
        raise CorruptModelFileError(f"{path}: the GGUF file holds no tokenizer vocabulary")
    if kind == "llama":
        backend = sentencepiece_backend(
            tokens, field_value(reader, "tokenizer.ggml.scores") or [], token_types,
            bool(field_value(reader, "tokenizer.ggml.add_space_prefix", True)))
        add_bos_default = True  # llama.cpp's default for a sentencepiece vocabulary
    else:
        backend = byte_level_bpe_backend(tokens, field_value(reader, "tokenizer.ggml.merges")
                                         or [], token_types)
        add_bos_default = False
    bos = field_value(reader, "tokenizer.ggml.bos_token_id")
    if field_value(reader, "tokenizer.ggml.add_bos_token", add_bos_default) and bos is not None:
        bos_text = tokens[bos]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos_text} $A", pair=f"{bos_text} $A {bos_text} $B",
            special_tokens=[(bos_text, bos)],
        )
    return Tokenizer(
        backend,
        bos_token_id=bos,
        eos_token_ids=gguf_eos_token_ids(reader),  # eos, then eot / eom (Llama 3.x) if named
        pad_token_id=field_value(reader, "tokenizer.ggml.padding_token_id"),
        chat_template=field_value(reader, "tokenizer.chat_template"),
    )


def byte_level_bpe_backend(tokens: list[str], merges: list[str], token_types: list[int]
                           ) -> BackendTokenizer:
    vocab = {token: index for index, token in enumerate(tokens)}
    bpe = models.BPE(vocab=vocab, merges=[tuple(m.split(" ", 1)) for m in merges],
                     fuse_unk=False, byte_fallback=False)
    backend = BackendTokenizer(bpe)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    specials = [AddedToken(tokens[i], special=True, normalized=False)
                for i, t in enumerate(token_types) if t == _GGUF_CONTROL]
    user_defined = [AddedToken(tokens[i], special=False, normalized=False)
                    for i, t in enumerate(token_types) if t == _GGUF_USER_DEFINED]
    backend.add_special_tokens(specials)
    backend.add_tokens(user_defined)
    return backend


def tokenizer_from_folder(folder: Path, eos_token_ids: tuple[int, ...] = ()) -> Tokenizer:
    """A Hugging Face model folder: ``tokenizer.json`` + ``tokenizer_config.json`` (+ template file)."""
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise ModelNotFoundError(f"{folder} has no tokenizer.json")
    backend = BackendTokenizer.from_file(str(tokenizer_file))
    config: dict[str, Any] = {}
    config_file = folder / "tokenizer_config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
    template = config.get("chat_template")
    template_file = folder / "chat_template.jinja"
    if template_file.is_file():
        template = template_file.read_text()

    def token_id(key: str) -> int | None:
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        return backend.token_to_id(value) if isinstance(value, str) else None

    eos_ids = eos_token_ids or tuple(i for i in [token_id("eos_token")] if i is not None)
    return Tokenizer(backend, bos_token_id=token_id("bos_token"), eos_token_ids=eos_ids,
                     pad_token_id=token_id("pad_token"), chat_template=template)
