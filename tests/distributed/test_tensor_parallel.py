"""Tensor parallelism, model side: N ranks spawned here (gloo on 127.0.0.1), each building its shard
of the model, give the unsharded model's logits and greedy tokens through prefill and paged-KV
decode steps, each holding about 1/N of the weights and of the KV heads."""

from __future__ import annotations

import pytest
import torch
from tp_harness import RunSpec, run_parallel, run_single

from tokenmill.distributed.parallel_state import ParallelContext
from tokenmill.errors import ConfigError, UnsupportedModelError
from tokenmill.models.arch_config import ArchConfig
from tokenmill.models.llama import LlamaForCausalLM

# float32 through different summation orders (row-parallel partial sums, all-reduce): measured
# ~4e-5 on logits of magnitude ~30; the bound leaves room, and the greedy tokens must be equal.
LOGITS_TOLERANCE = 1e-3
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 1, "max_position_embeddings": 256,
        "vocab_size": 1000, "tie_word_embeddings": False}
PROMPT = [1, 504, 3458, 282, 4098, 314, 260, 1345, 30, 198, 6121, 28, 1126, 17, 40, 51, 99]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from transformers import LlamaConfig
    from transformers import LlamaForCausalLM as HFLlama

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama-tp")
    HFLlama(LlamaConfig(**TINY)).eval().save_pretrained(folder)
    return folder


def _compare(single: dict, ranks: list[dict]) -> None:
    reference = single["logits"]
    for rank, result in enumerate(ranks):
        # every rank ends with the same (all-gathered) logits, hence the same tokens
        assert result["tokens"] == single["tokens"], f"rank {rank}"
        error = (result["logits"] - reference).abs().max().item()
        assert error < LOGITS_TOLERANCE, f"rank {rank}: max |logit difference| {error}"


def test_tp2_tiny_llama_with_a_replicated_kv_head_matches_tp1(tiny_llama, tmp_path):
    prompt = [i % TINY["vocab_size"] for i in PROMPT]
    spec = RunSpec(str(tiny_llama), prompt, num_decode_steps=2, quantizations=["none"])
    single = run_single(spec)["none"]
    ranks = [r["none"] for r in run_parallel(spec, 2, tmp_path)]
    _compare(single, ranks)

    # weights by hand: every matrix splits in two except the norms and the one KV head, which
    # both ranks hold whole (1 KV head < 2 ranks: replicated)
    h, i, v, layers = TINY["hidden_size"], TINY["intermediate_size"], TINY["vocab_size"], 2
    head_dim = h // TINY["num_attention_heads"]
    kv = TINY["num_key_value_heads"] * head_dim
    per_layer = (h + 2 * kv) * h + h * h + 2 * i * h + i * h
    total = 4 * (layers * per_layer + 2 * v * h)  # + embedding and untied LM head, float32
    replicated = 4 * (2 * layers + 1) * h + 4 * layers * (2 * kv * h) / 2  # norms, other KV half
    assert single["weight_bytes"] == total + 4 * (2 * layers + 1) * h
    for result in ranks:
        assert result["weight_bytes"] <= total / 2 + replicated
        assert result["kv_heads"] == 1


def _arch(heads: int, kv_heads: int, intermediate: int = 128) -> ArchConfig:
    return ArchConfig(architecture="llama", vocab_size=100, hidden_size=heads * 8,
                      intermediate_size=intermediate, num_hidden_layers=1,
                      num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=8,
                      max_position_embeddings=64)


@pytest.mark.parametrize(("heads", "kv_heads", "world_size", "named"), [
    (9, 3, 2, "9 attention heads"),  # the built-in model's heads over 2 ranks
    (12, 6, 4, "6 KV heads"),  # enough KV heads to split, but not evenly
    (12, 4, 6, "4 KV heads"),  # fewer KV heads than ranks, and 6 is not a multiple of 4
])
def test_tp_degree_that_does_not_divide_the_heads_is_refused(heads, kv_heads, world_size, named):
    with pytest.raises(ConfigError) as info:
        LlamaForCausalLM(_arch(heads, kv_heads), torch.float32, "cpu",
                         parallel=ParallelContext(rank=0, world_size=world_size))
    assert f"tensor_parallel_size={world_size}" in info.value.message
    assert named in info.value.message
    assert info.value.param == "tensor_parallel_size"


def test_quantized_weights_split_only_along_whole_blocks():
    from tokenmill.distributed.sharding import slice_cols, slice_rows
    from tokenmill.quant.int4 import quantize_int4

    weight = quantize_int4(torch.randn(48, 128), group_size=32)
    right = slice_cols(weight, 64, 64, "down_proj")  # inputs 64..127: groups 2 and 3
    assert torch.equal(right.dequantize(), weight.dequantize()[:, 64:])
    rows = slice_rows(weight, 16, 16)
    assert torch.equal(rows.dequantize(), weight.dequantize()[16:32])
    with pytest.raises(UnsupportedModelError, match="48 inputs .* 32-input quantization groups"):
        slice_cols(weight, 0, 48, "down_proj")
