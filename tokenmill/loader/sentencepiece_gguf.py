"""A GGUF file's sentencepiece tokenizer (``tokenizer.ggml.model = llama``: Llama 2, Mistral, Mixtral,
Gemma) as a Hugging Face ``tokenizers`` BPE.

GGUF keeps what the ``.model`` file had: the pieces, a score per piece and a type per piece. A
sentencepiece BPE model merges, at each step, the adjacent pair whose merged piece scores highest;
``tokenizers``' BPE merges by rank in a merge list. So the merge list is every way of splitting a
piece into two pieces of the vocabulary, ranked by the merged piece's score (then by the halves'
ids: the order sentencepiece breaks ties in). Text is normalized as Llama's sentencepiece does it
(spaces become "▁", and one "▁" is prepended unless the file says ``add_space_prefix = false``);
characters outside the vocabulary fall back to their UTF-8 bytes (``<0xNN>`` pieces).
"""

from __future__ import annotations

from tokenizers import AddedToken, decoders, models, normalizers
from tokenizers import Tokenizer as BackendTokenizer

SPACE = "\u2581"  # "▁": sentencepiece's visible space
# sentencepiece piece types as GGUF stores them (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


def sentencepiece_backend(tokens: list[str], scores: list[float], token_types: list[int],
                          add_space_prefix: bool) -> BackendTokenizer:
    types = token_types or [NORMAL] * len(tokens)
    vocab = {token: index for index, token in enumerate(tokens)}
    unk = next((tokens[i] for i, t in enumerate(types) if t == UNKNOWN), None)
    bpe = models.BPE(vocab=vocab, merges=_merges(tokens, scores, types), unk_token=unk,
                     fuse_unk=True, byte_fallback=True)
    backend = BackendTokenizer(bpe)
    steps = [normalizers.Prepend(SPACE)] if add_space_prefix else []
    backend.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", SPACE)])
    decode_steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        decode_steps.append(decoders.Strip(" ", 1, 0))  # the prepended space
    backend.decoder = decoders.Sequence(decode_steps)
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i, t in enumerate(types) if t in (CONTROL, UNKNOWN)])
    backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                        for i, t in enumerate(types) if t == USER_DEFINED])
    return backend


def _merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    vocab = {token: index for index, token in enumerate(tokens)}
    mergeable = {token for token, kind in zip(tokens, types) if kind in (NORMAL, USER_DEFINED)}
    ranked: list[tuple[float, int, int, str, str]] = []
    for index, piece in enumerate(tokens):
        if piece not in mergeable or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                ranked.append((-_score(scores, index), vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def _score(scores: list[float], index: int) -> float:
    # a file without scores: earlier pieces were learned first, so they merge first
    return scores[index] if scores else -float(index)

