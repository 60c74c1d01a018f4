"""tokenmill's forward pass on the built-in GGUF equals Hugging Face transformers' on the same file."""

from __future__ import annotations

import pytest
import torch

from tokenmill.layers.attention import causal_metadata

# fp32 on both sides, same dequantized weights: differences come only from summation order.
LOGITS_ATOL = 1e-3

PROMPTS = [
    "The capital of France is Paris. The capital of Germany is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return",
    "Once upon a time, in a small village by the sea, there lived",
    "1, 2, 3, 4, 5, 6, 7,",
    "Les fleurs du jardin sont très belles au printemps, et",
    "<|im_start|>user\nName three primary colors.<|im_end|>\n<|im_start|>assistant\n",
    "🎉 Emoji and unicode: naïve café, 日本語のテキスト, and then",
    "SELECT name, COUNT(*) FROM users WHERE age > 30 GROUP BY",
    "   lots   of    spaces\n\n\n\tand tabs\t\there",
]


def _reference_logits(hf_model, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf_model(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_logits_match_transformers_at_every_position(prompt, builtin_source, builtin_model,
                                                      hf_builtin_model):
    ids = builtin_source.tokenizer.encode(prompt)
    with torch.inference_mode():
        hidden = builtin_model(torch.tensor(ids), torch.arange(len(ids)),
                               causal_metadata([len(ids)]))
        ours = builtin_model.compute_logits(hidden)
    reference = _reference_logits(hf_builtin_model, ids)
    assert ours.shape == reference.shape
    diff = (ours - reference).abs().max().item()
    assert diff < LOGITS_ATOL, f"max |logit diff| {diff:.2e} over {len(ids)} positions"


def test_batched_sequences_do_not_leak_into_each_other(builtin_source, builtin_model):
    """Several prompts flattened into one batch give each prompt's own logits."""
    tokenizer = builtin_source.tokenizer
    all_ids = [tokenizer.encode(p) for p in PROMPTS[:4]]
    flat = torch.tensor([t for ids in all_ids for t in ids])
    positions = torch.cat([torch.arange(len(ids)) for ids in all_ids])
    with torch.inference_mode():
        batched = builtin_model.compute_logits(
            builtin_model(flat, positions, causal_metadata([len(i) for i in all_ids])))
        start = 0
        for ids in all_ids:
            alone = builtin_model.compute_logits(
                builtin_model(torch.tensor(ids), torch.arange(len(ids)), causal_metadata([len(ids)])))
            assert (batched[start:start + len(ids)] - alone).abs().max().item() < LOGITS_ATOL
            start += len(ids)
