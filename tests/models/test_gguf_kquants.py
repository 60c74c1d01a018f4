"""A GGUF file whose matrices are K-quant and 5-bit blocks (what most GGUF files on model hubs hold:
Q4_K_M mixes Q4_K, Q6_K and, for rows that are not whole 256-element super-blocks, Q5_0) loads
without a float copy of those matrices and gives transformers' logits on the same file
(transformers dequantizes every block with the gguf package)."""

from __future__ import annotations

import logging

import pytest
import torch
from gguf_files import write_gguf

from tests.quant.gguf_block_bytes import random_blocks
from tokenmill import LLM, SamplingParams
from tokenmill.layers.attention import causal_metadata
from tokenmill.loader.gguf import open_gguf
from tokenmill.loader.model_source import open_model_source
from tokenmill.models.registry import build_model

PROMPT = "The capital of France is Paris, and the capital of Germany is"
# Per matrix, the block type the file stores (layer 0 / layer 1); Q2_K is not kept in quantized
# form and is dequantized at load, as a file may mix in.
TYPES = {
    "attn_q": ("Q4_K", "Q5_K"), "attn_k": ("Q5_K", "Q4_K"), "attn_v": ("Q6_K", "Q5_0"),
    "attn_output": ("Q5_0", "Q2_K"), "ffn_gate": ("Q5_1", "Q4_K"), "ffn_up": ("Q4_K", "Q6_K"),
    "ffn_down": ("Q6_K", "Q5_1"), "token_embd": ("Q6_K", "Q6_K"),
}
# Q5_0/Q5_1 are exact and Q4_K/Q5_K move a weight by at most 2^-11 of its sub-block's scale and
# offset; Q6_K is requantized to 8 bits per 32, which the reference below reproduces with the gguf
# package's own Q8_0 rounding. What is left: float16 rounding of scales and summation order.
LOGITS_ATOL = 0.01


def _encode(name: str, rows) -> tuple:
    kind = "token_embd" if name == "token_embd.weight" else name.split(".")[2]
    layer = 0 if name == "token_embd.weight" else int(name.split(".")[1])
    type_name = TYPES[kind][layer]
    seed = sum(map(ord, name))
    return random_blocks(type_name, rows.shape[0], rows.shape[1], seed), type_name


@pytest.fixture(scope="module")
def kquant_gguf(tmp_path_factory, builtin_source):
    """(GGUF path, transformers model read from that same file)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=256, vocab_size=49152,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    folder = tmp_path_factory.mktemp("kquants")
    path = write_gguf(model, folder / "tiny-kquants.gguf", open_gguf(builtin_source.path),
                      encode=_encode)
    reference = AutoModelForCausalLM.from_pretrained(folder, gguf_file=path.name,
                                                     dtype=torch.float32).eval()
    return path, reference


def test_kquant_matrices_stay_quantized(kquant_gguf, caplog):
    path, _ = kquant_gguf
    with caplog.at_level(logging.INFO, logger="tokenmill.loader.gguf"):
        model = build_model(open_model_source(path), torch.float32, "cpu")
    report = model.weight_report()
    kept = {part for key in report if key.startswith("gguf:") for part in key.split("+")}
    assert kept == {"gguf:Q4_K", "gguf:Q5_K", "gguf:Q6_K", "gguf:Q5_0", "gguf:Q5_1"}, report
    # q/k/v and gate/up of different types are fused all the same (widened to 8-bit codes);
    # the one float matrix is layer 1's Q2_K attn_output, dequantized
    assert report["float32"] == 256 * 256 * 4, report
    # the tied embedding and LM head read the Q6_K blocks (as 8-bit codes); no float table
    assert model.embed_tokens.table is None
    log = caplog.text
    assert "Q6_K kept requantized to 8 bits per 32 weights" in log
    assert "Q4_K kept as 4-bit codes, scales rounded to float16" in log
    assert "tensors of type Q2_K are dequantized at load" in log


def _q6_k_rounded_like_q8_0(reference):
    """transformers' model of the file, with each Q6_K matrix rounded as the gguf package
    quantizes Q8_0 (int8 per 32 weights, scale max|w| / 127): tokenmill's stated conversion of
    Q6_K, computed by code tokenmill did not write."""
    import gguf
    from gguf.quants import dequantize, quantize

    q8 = gguf.GGMLQuantizationType.Q8_0
    rounded = type(reference)(reference.config).eval()
    state = {}
    for name, tensor in reference.state_dict().items():
        # the tied lm_head.weight is the same matrix as the embedding: rounded the same way
        kind = "token_embd" if name.endswith(("embed_tokens.weight", "lm_head.weight")) else next(
            (k for k, module in _HF_MODULES.items() if f".{module}." in name), None)
        if kind is not None and tensor.ndim == 2 and TYPES[kind][_layer_of(name)] == "Q6_K":
            tensor = torch.from_numpy(dequantize(quantize(tensor.numpy(), q8), q8).copy())
        state[name] = tensor
    rounded.load_state_dict(state)
    return rounded


_HF_MODULES = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj",
               "attn_output": "o_proj", "ffn_gate": "gate_proj", "ffn_up": "up_proj",
               "ffn_down": "down_proj"}


def _layer_of(hf_name: str) -> int:
    return int(hf_name.split(".")[2]) if ".layers." in hf_name else 0


def test_logits_match_transformers_on_the_same_file(kquant_gguf):
    path, file_model = kquant_gguf
    reference = _q6_k_rounded_like_q8_0(file_model)
    source = open_model_source(path)
    model = build_model(source, torch.float32, "cpu")
    ids = source.tokenizer.encode(PROMPT)
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.arange(len(ids)), causal_metadata([len(ids)]))
        ours = model.compute_logits(hidden)
        expected = reference(torch.tensor([ids])).logits[0]
        unrounded = file_model(torch.tensor([ids])).logits[0]
    assert expected.abs().max() > 1  # logits of a real size, so the tolerance means something
    diff = (ours - expected).abs().max().item()
    assert diff < LOGITS_ATOL, f"max |logit diff| {diff:.3e}"
    # the Q6_K rounding is real here (random blocks give each 16-weight sub-block an unrelated
    # scale, the worst case for sharing one scale per 32); its cost on a real model's
    # perplexity is measured by benchmarks/perplexity.py (docs/quantization.md)
    assert (unrounded - expected).abs().max() > LOGITS_ATOL


def test_engine_serves_the_kquant_file_with_the_default_settings(kquant_gguf):
    """Default dtype and quantization, batched decode over the paged cache, no leaked blocks."""
    path, _ = kquant_gguf
    llm = LLM(str(path), kv_cache_memory=2**24)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    outputs = llm.generate([PROMPT, "Hello"], params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [6, 6]
    llm.engine.scheduler.check_no_leaks()
