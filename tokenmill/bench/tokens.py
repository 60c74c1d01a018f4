"""The tokenizer the bench counts prompt lengths with.

By default it is the served model's tokenizer as tokenmill loads it (the built-in SmolLM2 one);
``--tokenizer PATH`` takes any Hugging Face ``tokenizer.json`` for benching another model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from tokenmill.errors import BenchError, TokenmillError


class CountingTokenizer(Protocol):
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class _JsonTokenizer:
    """``tokenizers.Tokenizer`` behind the same two methods tokenmill's own tokenizer has."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON
            raise BenchError(f"cannot load tokenizer {path}: {exc}") from exc
        # Some tokenizer.json files carry truncation/padding for a fixed model input size
        # (e.g. 128 for sentence encoders); counting prompt lengths needs neither.
        self._tok.no_truncation()
        self._tok.no_padding()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def load_counting_tokenizer(path: str | None) -> CountingTokenizer:
    if path is not None:
        file = Path(path).expanduser()
        if file.is_dir():
            file = file / "tokenizer.json"
        if not file.is_file():
            raise BenchError(f"--tokenizer {path}: no tokenizer.json there")
        return _JsonTokenizer(file)
    try:
        from tokenmill.loader.model_source import load_tokenizer
    except ImportError as exc:
        raise BenchError("tokenmill's built-in tokenizer is not available in this build; pass "
                         "--tokenizer PATH/tokenizer.json") from exc
    try:
        return load_tokenizer(None)
    except TokenmillError as exc:
        raise BenchError(f"cannot load the built-in tokenizer: {exc.message}") from exc
