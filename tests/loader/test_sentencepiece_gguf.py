"""A GGUF file's sentencepiece tokenizer (``tokenizer.ggml.model = llama``, as in Llama 2, Mistral and
Mixtral GGUFs) tokenizes and detokenizes exactly as the ``sentencepiece`` library does with the
model the GGUF fields were taken from. The model is trained here (BPE with byte fallback, identity
normalization, as Llama's) on the repo's Alice chapters; the texts compared are other texts:
unseen words, digits, runs of spaces, newlines, and characters outside the vocabulary."""

from __future__ import annotations

from pathlib import Path

import pytest

from tokenmill.loader.gguf import open_gguf
from tokenmill.loader.tokenizer import tokenizer_from_gguf

REPO = Path(__file__).resolve().parents[2]
TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "  two leading spaces, and  two  inside",
    "Tabs\tand\nnewlines\n\nkeep their place",
    "Numbers: 3.14159, 2026-12-04 and 1,000,000",
    "naïve café, 東京, emoji 🙂 fall back to bytes",
    "Alice was beginning to get very tired of sitting by her sister on the bank",
    "tokenmill",
    "",
]


@pytest.fixture(scope="module")
def sentencepiece_gguf(tmp_path_factory) -> tuple[object, Path]:
    import gguf
    import numpy as np
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("spm")
    spm.SentencePieceTrainer.train(
        input=str(REPO / "benchmarks/data/alice_ch1-2.txt"), model_prefix=str(folder / "m"),
        vocab_size=800, model_type="bpe", byte_fallback=True, character_coverage=1.0,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        bos_id=1, eos_id=2, unk_id=0, minloglevel=2)
    processor = spm.SentencePieceProcessor(model_file=str(folder / "m.model"))
    pieces = [processor.id_to_piece(i) for i in range(processor.get_piece_size())]
    types = []
    for i in range(len(pieces)):
        types.append(2 if processor.is_unknown(i) else 3 if processor.is_control(i)
                     else 6 if processor.is_byte(i) else 5 if processor.is_unused(i) else 1)
    path = folder / "spm.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model("llama")  # as llama.cpp's converter writes a .model file
    writer.add_token_list(pieces)
    writer.add_token_scores([processor.get_score(i) for i in range(len(pieces))])
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_tensor("token_embd.weight", np.zeros((len(pieces), 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return processor, path


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_sentencepiece_matches_the_sentencepiece_library(sentencepiece_gguf, text):
    processor, path = sentencepiece_gguf
    tokenizer = tokenizer_from_gguf(open_gguf(path), path)
    expected = processor.encode(text)
    assert tokenizer.encode(text, add_special_tokens=False) == expected
    assert tokenizer.encode(text) == [1, *expected]  # llama.cpp adds BOS by default
    assert tokenizer.decode(expected) == processor.decode(expected)
    assert tokenizer.decode([1, *expected], skip_special_tokens=True) == processor.decode(expected)


def test_out_of_vocabulary_characters_become_their_utf8_bytes(sentencepiece_gguf):
    processor, path = sentencepiece_gguf
    tokenizer = tokenizer_from_gguf(open_gguf(path), path)
    ids = tokenizer.encode("🙂", add_special_tokens=False)
    assert [processor.id_to_piece(i) for i in ids if processor.is_byte(i)] == [
        "<0xF0>", "<0x9F>", "<0x99>", "<0x82>"]
    assert tokenizer.decode(ids) == "🙂"
