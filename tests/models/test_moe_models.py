"""Tiny random Mixtral, Qwen2-MoE and Qwen3-MoE models give transformers' logits (float32, max
absolute difference < 1e-4 on logits of magnitude ~1-10) and its greedy tokens, loaded from
safetensors in both layouts transformers writes and from GGUF files named as llama.cpp names them;
the routed-token counters add up; broken checkpoints fail with errors naming what is wrong."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from tests.models.moe_support import (
    FAMILIES,
    hf_greedy,
    make_hf_moe,
    round_trip_experts,
    router_margin,
    save_folder,
    write_moe_gguf,
)
from tokenmill.errors import CorruptModelFileError
from tokenmill.layers.attention import causal_metadata
from tokenmill.loader.model_source import open_model_source
from tokenmill.models.registry import build_model

LAYOUTS = ("per_expert", "fused", "gguf")
TOLERANCE = 1e-4
PROMPT = "Experts route each token: a short prompt with a few words."


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory, hf_builtin_tokenizer, builtin_source):
    """{family: (hf_model, {layout: path})}"""
    models = {}
    for family in FAMILIES:
        model = make_hf_moe(family)
        root = tmp_path_factory.mktemp(family)
        paths = {
            "per_expert": save_folder(model, root / "per_expert", hf_builtin_tokenizer, False),
            "fused": save_folder(model, root / "fused", hf_builtin_tokenizer, True),
            "gguf": write_moe_gguf(model, family, root / f"{family}.gguf", builtin_source.path),
        }
        models[family] = (model, paths)
    return models


def _logits(path, ids):
    source = open_model_source(path)
    model = build_model(source, torch.float32, "cpu")
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.arange(len(ids)),
                       causal_metadata([len(ids)], source.arch.sliding_window))
        return model, model.compute_logits(hidden)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_moe_logits_match_transformers(family, layout, moe_models, hf_builtin_tokenizer):
    reference, paths = moe_models[family]
    ids = hf_builtin_tokenizer.encode(PROMPT)
    # the routing must be unambiguous for the comparison to mean anything
    assert router_margin(reference, ids) > 100 * TOLERANCE  # in router-logit units
    model, ours = _logits(paths[layout], ids)
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]
    assert expected.abs().max() > 1.0  # experts weigh enough that a wrong one would show
    assert (ours - expected).abs().max().item() < TOLERANCE
    assert model.decode_stack is None  # the native dense decode path steps aside for MoE
    load = model.expert_load()
    top_k = reference.config.num_experts_per_tok
    assert all(sum(row) == len(ids) * top_k for row in load.routed_tokens)


@pytest.mark.parametrize("layout", ["per_expert", "gguf"])
@pytest.mark.parametrize("family", FAMILIES)
def test_moe_greedy_tokens_through_llm(family, layout, moe_models, hf_builtin_tokenizer):
    from tokenmill.engine.llm import LLM
    from tokenmill.sampling_params import SamplingParams

    reference, paths = moe_models[family]
    ids = hf_builtin_tokenizer.encode(PROMPT)
    num_tokens = 8
    expected, margin = hf_greedy(reference, ids, num_tokens)
    assert margin > 10 * TOLERANCE  # top-1 vs top-2 logit; rounding differences are ~1e-6
    llm = LLM(str(paths[layout]), dtype="float32", kv_cache_memory=2**24)
    outputs = llm.generate([ids], SamplingParams(temperature=0, max_tokens=num_tokens,
                                                 ignore_eos=True), use_tqdm=False)
    assert outputs[0].outputs[0].token_ids == expected
    llm.engine.scheduler.check_no_leaks()
    # every forwarded token went to top-k experts in every sparse layer: the prompt, and each
    # sampled token but the last (never fed back)
    load = llm.engine.get_stats().expert_load
    top_k = reference.config.num_experts_per_tok
    assert load.layer_ids == tuple(range(reference.config.num_hidden_layers))
    assert [sum(row) for row in load.routed_tokens] == [
        (len(ids) + num_tokens - 1) * top_k] * len(load.layer_ids)
    assert all(1.0 <= ratio <= 4 / top_k for ratio in load.imbalance)


def test_routing_rule_matters(moe_models, hf_builtin_tokenizer):
    """The logit test can tell routing rules apart: renormalizing Qwen2-MoE's top-k (which it
    must not) moves the logits by far more than the tolerance."""
    _, paths = moe_models["qwen2_moe"]
    ids = hf_builtin_tokenizer.encode(PROMPT)
    model, ours = _logits(paths["fused"], ids)
    for layer in model.layers:
        layer.mlp.gate.renormalize = True
    with torch.inference_mode():
        wrong = model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)),
                                           causal_metadata([len(ids)], None)))
    assert (wrong - ours).abs().max().item() > 100 * TOLERANCE


def test_qwen2_moe_dense_layers(tmp_path, hf_builtin_tokenizer):
    """``mlp_only_layers`` / ``decoder_sparse_step`` keep some layers dense."""
    reference = make_hf_moe("qwen2_moe", seed=1, num_hidden_layers=4, decoder_sparse_step=2,
                            mlp_only_layers=[3])
    folder = save_folder(reference, tmp_path / "mixed", hf_builtin_tokenizer, False)
    ids = hf_builtin_tokenizer.encode(PROMPT)
    model, ours = _logits(folder, ids)
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]
    assert (ours - expected).abs().max().item() < TOLERANCE
    assert model.arch.moe.dense_layers == (0, 2, 3)
    assert model.expert_load().layer_ids == (1,)


def test_gguf_quantized_experts_stay_quantized(tmp_path, hf_builtin_tokenizer, builtin_source):
    """Q8_0 expert blocks are kept as stored (one packed weight per expert, the dense layers'
    kernel); dequantized (``quantization="none"``) they give the reference's logits exactly."""
    reference = make_hf_moe("mixtral", seed=2)
    path = write_moe_gguf(reference, "mixtral", tmp_path / "q8.gguf", builtin_source.path,
                          expert_type="Q8_0")
    round_trip_experts(reference, "Q8_0")  # the reference holds what the file holds
    ids = hf_builtin_tokenizer.encode(PROMPT)
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]
    source = open_model_source(path)
    for quantization, tolerance in (("none", TOLERANCE), ("auto", 0.05)):
        model = build_model(source, torch.float32, "cpu", quantization=quantization)
        with torch.inference_mode():
            ours = model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)),
                                              causal_metadata([len(ids)], None)))
        assert (ours - expected).abs().max().item() < tolerance, quantization
        assert ("gguf:Q8_0" in model.weight_report()) == (quantization == "auto")


@pytest.mark.parametrize("expert_type, kept", [("Q5_0", True), ("MXFP4", False)])
def test_gguf_converted_and_other_expert_types(expert_type, kept, tmp_path, hf_builtin_tokenizer,
                                               builtin_source, caplog):
    """Q5_0 expert blocks are converted exactly into 8-bit groups (docs/quantization.md) and stay
    quantized per expert; a type tokenmill does not keep (MXFP4) is dequantized, and the log says
    so. Both give the reference's logits on what the file holds."""
    reference = make_hf_moe("mixtral", seed=3)  # 32-element blocks need I % 32 == 0
    path = write_moe_gguf(reference, "mixtral", tmp_path / "experts.gguf", builtin_source.path,
                          expert_type=expert_type)
    round_trip_experts(reference, expert_type)
    ids = hf_builtin_tokenizer.encode(PROMPT)
    with caplog.at_level(logging.INFO, logger="tokenmill.loader.gguf"):
        model, ours = _logits(path, ids)
    dequantized = f"expert tensors (ffn_*_exps) of type {expert_type} are dequantized"
    assert (dequantized in caplog.text) != kept
    assert (f"gguf:{expert_type}" in model.weight_report()) == kept
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]
    assert (ours - expected).abs().max().item() < TOLERANCE


def test_int8_quantization_applies_to_experts(moe_models, hf_builtin_tokenizer):
    reference, paths = moe_models["qwen2_moe"]
    model = build_model(open_model_source(paths["fused"]), torch.float32, "cpu",
                        quantization="int8")
    expert = model.layers[0].mlp.experts.gate_up_proj[0]
    assert expert.op.describe().startswith("int8")
    ids = hf_builtin_tokenizer.encode(PROMPT)
    with torch.inference_mode():
        ours = model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)),
                                          causal_metadata([len(ids)], None)))
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]
    # int8 per-channel rounding of every linear layer: close, not equal
    assert (ours - expected).abs().max().item() < 0.1 * expected.abs().max().item()


# ---------------------------------------------------------------------------- bad input
def test_missing_expert_tensor_is_named(moe_models, tmp_path):
    from safetensors.torch import load_file, save_file

    _, paths = moe_models["mixtral"]
    folder = tmp_path / "missing"
    shutil.copytree(paths["per_expert"], folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CorruptModelFileError,
                       match=r"layer 1.*model\.layers\.1\.block_sparse_moe\.experts\.3\.w2\.weight"):
        build_model(open_model_source(folder), torch.float32, "cpu")


def test_misshaped_fused_experts_are_named(moe_models, tmp_path):
    from safetensors.torch import load_file, save_file

    _, paths = moe_models["qwen2_moe"]
    folder = tmp_path / "misshaped"
    shutil.copytree(paths["fused"], folder)
    tensors = load_file(folder / "model.safetensors")
    name = "model.layers.0.mlp.experts.gate_up_proj"
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CorruptModelFileError,
                       match=r"model\.layers\.0\.mlp\.experts\.gate_up_proj: shape \(4, 95, 64\), "
                             r"expected \(4, 96, 64\)"):
        build_model(open_model_source(folder), torch.float32, "cpu")


def test_gguf_missing_expert_tensor_is_named(moe_models, tmp_path, builtin_source):
    reference, _ = moe_models["qwen2_moe"]
    path = write_moe_gguf(reference, "qwen2_moe", tmp_path / "missing.gguf", builtin_source.path,
                          skip=("blk.1.ffn_down_exps.weight",))
    with pytest.raises(CorruptModelFileError, match=r"layer 1.*experts\.0\.down_proj"):
        build_model(open_model_source(path), torch.float32, "cpu")


def test_gguf_more_used_experts_than_experts(moe_models, tmp_path, builtin_source):
    reference, _ = moe_models["qwen2_moe"]
    path = write_moe_gguf(reference, "qwen2_moe", tmp_path / "topk.gguf", builtin_source.path,
                          metadata={"expert_used_count": 5})
    with pytest.raises(CorruptModelFileError,
                       match=r"qwen2moe\.expert_used_count=5 must be between 1 and "
                             r"qwen2moe\.expert_count=4"):
        open_model_source(path)


def test_config_more_used_experts_than_experts(moe_models, tmp_path):
    import json

    _, paths = moe_models["mixtral"]
    folder = tmp_path / "topk"
    shutil.copytree(paths["per_expert"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_experts_per_tok"] = 5
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CorruptModelFileError,
                       match=r"num_experts_per_tok=5 must be between 1 and num_local_experts=4"):
        open_model_source(folder)
