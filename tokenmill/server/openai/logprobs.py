"""Log probabilities in the two shapes OpenAI uses: the legacy completions one (parallel lists plus
character offsets) and the chat one (a list of per-token objects with UTF-8 bytes)."""

from __future__ import annotations

from typing import Any

from tokenmill.layers.sampler import TokenLogprobs
from tokenmill.loader.tokenizer import Tokenizer

# JSON has no -Infinity; vLLM reports impossible tokens with this floor too.
_LOGPROB_FLOOR = -9999.0


def _finite(logprob: float) -> float:
    return max(_LOGPROB_FLOOR, logprob)


class TokenTexts:
    """Decoded text of single tokens, cached: the same few thousand ids come back all the time."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id])
            self._cache[token_id] = text
        return text


def completion_logprobs(entries: list[TokenLogprobs], texts: TokenTexts, text_offset: int
                        ) -> tuple[dict[str, Any], int]:
    """OpenAI completions ``logprobs`` for ``entries``; returns it and the offset after them."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for entry in entries:
        token = texts(entry.token_id)
        tokens.append(token)
        token_logprobs.append(_finite(entry.logprob))
        # As vLLM: the chosen token plus the k most likely ones (k may be 0).
        top = {token: _finite(entry.logprob)}
        for token_id, logprob in entry.top:
            top.setdefault(texts(token_id), _finite(logprob))
        top_logprobs.append(top)
        offsets.append(text_offset)
        text_offset += len(token)
    return ({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
             "text_offset": offsets}, text_offset)


def _chat_token(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": _finite(logprob), "bytes": list(text.encode("utf-8"))}


def chat_logprobs(entries: list[TokenLogprobs], texts: TokenTexts, num_top: int
                  ) -> dict[str, Any]:
    """OpenAI chat ``logprobs``: ``{"content": [{token, logprob, bytes, top_logprobs}, ...]}``."""
    content = []
    for entry in entries:
        item = _chat_token(texts(entry.token_id), entry.logprob)
        item["top_logprobs"] = [_chat_token(texts(t), lp) for t, lp in entry.top[:num_top]]
        content.append(item)
    return {"content": content}


def echo_logprobs(prompt_ids: list[int], entries: list[TokenLogprobs | None],
                  texts: TokenTexts, num_top: int) -> tuple[dict[str, Any], int]:
    """The prompt's part of OpenAI completions ``logprobs`` with ``echo``: one entry per prompt
    token, the first with ``None`` log probability and top (nothing predicts it), as OpenAI and
    vLLM answer. Returns it and the text offset after the prompt (where the completion starts)."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    text_offset = 0
    for token_id, entry in zip(prompt_ids, entries, strict=True):
        token = texts(token_id)
        tokens.append(token)
        offsets.append(text_offset)
        text_offset += len(token)
        if entry is None:
            token_logprobs.append(None)
            top_logprobs.append(None)
            continue
        token_logprobs.append(_finite(entry.logprob))
        top = {token: _finite(entry.logprob)}
        for top_id, logprob in entry.top[:num_top]:
            top.setdefault(texts(top_id), _finite(logprob))
        top_logprobs.append(top)
    return ({"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs,
             "text_offset": offsets}, text_offset)


def vllm_prompt_logprobs(entries: list[TokenLogprobs | None], texts: TokenTexts, num_top: int
                         ) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's ``prompt_logprobs``: per prompt token None (the first) or ``{token id: {logprob,
    rank, decoded_token}}`` holding the actual token and the ``num_top`` likeliest."""
    rendered: list[dict[str, dict[str, Any]] | None] = []
    for entry in entries:
        if entry is None:
            rendered.append(None)
            continue
        scores = {str(entry.token_id): {"logprob": _finite(entry.logprob), "rank": entry.rank,
                                        "decoded_token": texts(entry.token_id)}}
        for rank, (token_id, logprob) in enumerate(entry.top[:num_top], start=1):
            scores.setdefault(str(token_id), {"logprob": _finite(logprob), "rank": rank,
                                              "decoded_token": texts(token_id)})
        rendered.append(scores)
    return rendered
