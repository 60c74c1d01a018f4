"""The native decode stack (one C++ call for all decoder layers of a decode-only step) gives
exactly what the Python layers give: same tokens, same log-probabilities, bit for bit."""

from __future__ import annotations

import pytest
import torch

from tokenmill import LLM, SamplingParams
from tokenmill.models import llama_decode_stack
from tokenmill.models.llama_decode_stack import LlamaDecodeStack

PROMPTS = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time, in a small village"]


def _run(llm: LLM, enabled: bool, monkeypatch: pytest.MonkeyPatch) -> tuple[list, int]:
    """Greedy continuations with top-5 log-probabilities, and how many steps the stack ran."""
    calls = []
    original = LlamaDecodeStack.__call__

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LlamaDecodeStack, "__call__", counting)
    llama_decode_stack.set_enabled(enabled)
    try:
        params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=5)
        outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    finally:
        llama_decode_stack.set_enabled(True)
        monkeypatch.setattr(LlamaDecodeStack, "__call__", original)
    result = [(o.outputs[0].token_ids, [(lp.logprob, lp.top) for lp in o.outputs[0].logprobs])
              for o in outputs]
    return result, len(calls)


def _same_with_and_without(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    assert llm.engine.runner.model.decode_stack is not None, "the model should run the stack"
    python_path, python_calls = _run(llm, False, monkeypatch)
    native_path, native_calls = _run(llm, True, monkeypatch)
    assert python_calls == 0
    assert native_calls >= 10  # every decode step of the 12-token continuations
    assert native_path == python_path


def test_builtin_model_float32_exact_kernels(llm, monkeypatch, assert_no_leaked_blocks):
    _same_with_and_without(llm, monkeypatch)


def test_builtin_model_bfloat16_int8_kernels(monkeypatch):
    llm = LLM(dtype="bfloat16", kv_cache_memory=2**26)
    _same_with_and_without(llm, monkeypatch)
    llm.engine.scheduler.check_no_leaks()


@pytest.fixture(scope="module")
def qwen2_folder(tmp_path_factory, hf_builtin_tokenizer):
    """A tiny Qwen2 (q/k/v biases, untied head) saved by transformers."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=6, num_key_value_heads=2, head_dim=64,
                         max_position_embeddings=256, vocab_size=49152,
                         tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    for layer in model.model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            proj.bias.data.normal_(0, 0.5)
    folder = tmp_path_factory.mktemp("qwen2-biases")
    model.save_pretrained(folder)
    hf_builtin_tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(("dtype", "quantization"),
                         [("float32", "none"), ("bfloat16", "none"), ("bfloat16", "int4"),
                          ("float32", "int8")])
def test_tiny_qwen2_dense_and_quantized(qwen2_folder, dtype, quantization, monkeypatch):
    llm = LLM(str(qwen2_folder), dtype=dtype, quantization=quantization, kv_cache_memory=2**24)
    _same_with_and_without(llm, monkeypatch)


@pytest.fixture(scope="module")
def qwen3_folder(tmp_path_factory, hf_builtin_tokenizer):
    """A tiny Qwen3 (per-head q/k RMSNorm with non-trivial weights) saved by transformers."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(0)
    config = Qwen3Config(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                         max_position_embeddings=256, vocab_size=49152,
                         tie_word_embeddings=False)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    for layer in model.model.layers:
        for norm in (layer.self_attn.q_norm, layer.self_attn.k_norm):
            norm.weight.data.normal_(1.0, 0.3)
    folder = tmp_path_factory.mktemp("qwen3-qk-norm")
    model.save_pretrained(folder)
    hf_builtin_tokenizer.save_pretrained(folder)
    return folder


@pytest.mark.parametrize(("dtype", "quantization"), [("float32", "none"), ("bfloat16", "int4")])
def test_tiny_qwen3_qk_norm(qwen3_folder, dtype, quantization, monkeypatch):
    llm = LLM(str(qwen3_folder), dtype=dtype, quantization=quantization, kv_cache_memory=2**24)
    _same_with_and_without(llm, monkeypatch)
