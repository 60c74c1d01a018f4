"""The GGUF-built tokenizer and chat template behave exactly like transformers' on the same file."""

from __future__ import annotations

import pytest

CORPUS = [
    "Hello, world!",
    "  leading spaces and trailing   ",
    "multiple\n\n\nnewlines\r\nand\ttabs\t\t",
    "naïve café résumé — “quotes” ‘single’ …",
    "日本語のテキストと中文文本，한국어 텍스트",
    "emoji 🎉🚀👩‍👩‍👧‍👦 and flags 🇫🇷🇯🇵",
    "def f(x: int) -> int:\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>special<repo_name>tokens<file_sep>inline",
    "numbers 1234567890 3.14159 -42 1e-10 0x1F",
    "MiXeD CaSe, punctuation!?;:... and URLs https://example.com/a?b=c&d=e",
    "",
    " ",
    "a" * 300,
]


@pytest.mark.parametrize("text", CORPUS)
def test_encode_matches_transformers(text, builtin_source, hf_builtin_tokenizer):
    ours = builtin_source.tokenizer.encode(text)
    assert ours == hf_builtin_tokenizer.encode(text)


@pytest.mark.parametrize("text", CORPUS)
def test_decode_matches_transformers(text, builtin_source, hf_builtin_tokenizer):
    ids = hf_builtin_tokenizer.encode(text)
    for skip in (False, True):
        assert builtin_source.tokenizer.decode(ids, skip_special_tokens=skip) == \
            hf_builtin_tokenizer.decode(ids, skip_special_tokens=skip)


def test_special_tokens_match_transformers(builtin_source, hf_builtin_tokenizer):
    tokenizer = builtin_source.tokenizer
    assert tokenizer.bos_token_id == hf_builtin_tokenizer.bos_token_id
    assert tokenizer.eos_token_id == hf_builtin_tokenizer.eos_token_id
    assert tokenizer.pad_token_id == hf_builtin_tokenizer.pad_token_id
    assert tokenizer.vocab_size == len(hf_builtin_tokenizer)


CONVERSATIONS = {
    "user only": [{"role": "user", "content": "What is 2 + 2?"}],
    "with system": [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "Say hello."},
    ],
    "multi turn": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name a color."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another, with émoji 🎨?"},
    ],
}


@pytest.mark.parametrize("name", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_apply_chat_template(name, add_generation_prompt, builtin_source,
                                                   hf_builtin_tokenizer):
    messages = CONVERSATIONS[name]
    ours = builtin_source.tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt)
    reference = hf_builtin_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == reference
