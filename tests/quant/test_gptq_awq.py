"""GPTQ and AWQ checkpoints, packed here from the published formats, are read into
``QuantizedWeight`` whose codes, scales and dense matrix are those the checkpoint stands for;
malformed ones are refused with an error naming the tensor or setting."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from tests.quant.quant_checkpoints import (
    HIDDEN,
    copy_folder,
    linear_prefixes,
    save_awq,
    save_gptq,
)
from tokenmill.errors import CorruptModelFileError, UnsupportedModelError
from tokenmill.loader.model_source import open_model_source
from tokenmill.quant.weight import QuantizedWeight

Q_PROJ = "model.layers.0.self_attn.q_proj"


def _read(folder) -> dict[str, Any]:
    """What the model would receive from the folder (no model needed)."""
    return dict(open_model_source(folder).iter_tensors())


def _check_weight(weight: Any, codes, scales, zeros, g_idx, dense, source: str) -> None:
    num_outputs, num_inputs = codes.shape
    group = num_inputs // scales.shape[0]
    assert isinstance(weight, QuantizedWeight)
    assert (weight.bits, weight.group_size, weight.source) == (4, group, source)
    assert weight.shape == (num_outputs, num_inputs)
    weight.validate("w")
    perm = torch.arange(num_inputs) if weight.input_perm is None else weight.input_perm
    # stored columns are sorted by group, and codes and scales come through bit for bit
    assert torch.equal(g_idx[perm].long(), torch.arange(num_inputs) // group)
    assert torch.equal(weight.codes().long(), codes[:, perm])
    assert torch.equal(weight.scales, scales.T)
    # the dense matrix is scale * (q - zero) but for -scale * zero rounded to float16 once:
    # within 1/128 of a quantization step (zeros <= 16, float16 keeps 11 bits)
    step = scales.float()[g_idx.long()].T
    assert ((weight.dequantize() - dense).abs() <= step / 128).all()
    # what the kernel computes: gather the inputs, multiply by the stored (group-sorted) matrix
    x = torch.randn(3, num_inputs)
    stored = weight.dequantize_rows(None, torch.float32)
    torch.testing.assert_close(x[:, perm] @ stored.T, x @ weight.dequantize().T)


@pytest.mark.parametrize(("group_size", "desc_act", "v1"), [
    (32, False, True), (64, True, True), (128, True, False), (-1, False, False)])
def test_gptq_checkpoint_reads_exactly(tiny_llama, tmp_path, group_size, desc_act, v1):
    folder, state = tiny_llama
    gptq, dense, raw = save_gptq(folder, tmp_path / "gptq", state, group_size, desc_act, v1)
    weights = _read(gptq)
    for prefix, (codes, scales, zeros, g_idx) in raw.items():
        weight = weights[f"{prefix}.weight"]
        _check_weight(weight, codes, scales, zeros, g_idx, dense[prefix], "gptq")
        # act order scatters the groups; a trivial g_idx (or a single group) needs no gather
        assert (weight.input_perm is not None) == (desc_act and scales.shape[0] > 1)
    # projections of one input share GPTQ's activation order, hence the gather
    q, k = weights[f"{Q_PROJ}.weight"], weights["model.layers.0.self_attn.k_proj.weight"]
    if desc_act and group_size < HIDDEN:
        assert torch.equal(q.input_perm, k.input_perm)
    # everything else passes through untouched, and no part is left over
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):
        assert torch.equal(weights[name], state[name])
    assert not [n for n in weights if n.rpartition(".")[2] in ("qweight", "qzeros", "scales",
                                                               "g_idx")]
    assert len(weights) == len(state)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_awq_checkpoint_reads_exactly(tiny_llama, tmp_path, group_size):
    from tests.quant.quant_checkpoints import rtn_quantize

    folder, state = tiny_llama
    awq, dense = save_awq(folder, tmp_path / "awq", state, group_size)
    weights = _read(awq)
    for prefix, _ in linear_prefixes():
        codes, scales, zeros, g_idx = rtn_quantize(state[f"{prefix}.weight"], group_size, None)
        weight = weights[f"{prefix}.weight"]
        assert weight.input_perm is None
        _check_weight(weight, codes, scales, zeros, g_idx, dense[prefix], "awq")
    assert len(weights) == len(state)


def test_layer_split_over_shard_files_and_side_config(tiny_llama, tmp_path):
    """A layer's parts split over two files; the config in AutoGPTQ's quantize_config.json."""
    from safetensors.torch import load_file, save_file

    folder, state = tiny_llama
    gptq, dense, _ = save_gptq(folder, tmp_path / "gptq", state, 32, desc_act=True)
    tensors = load_file(str(gptq / "model.safetensors"))
    (gptq / "model.safetensors").unlink()
    first = {n: t for n, t in tensors.items() if n.endswith((".scales", ".qzeros"))}
    save_file(first, str(gptq / "model-00002-of-00002.safetensors"))
    rest = {n: t for n, t in tensors.items() if n not in first}
    save_file(rest, str(gptq / "model-00001-of-00002.safetensors"))
    config = json.loads((gptq / "config.json").read_text())
    side = config.pop("quantization_config")
    del side["quant_method"]  # AutoGPTQ's side file does not name the method
    (gptq / "config.json").write_text(json.dumps(config))
    (gptq / "quantize_config.json").write_text(json.dumps(side))
    weights = _read(gptq)
    for prefix, expected in dense.items():
        assert (weights[f"{prefix}.weight"].dequantize() - expected).abs().max() < 1e-3
    assert len(weights) == len(state)


def test_gptq_without_g_idx_and_autoawq_side_config(tiny_llama, tmp_path):
    """g_idx is optional without desc_act (layers then wait for the end of the stream); AutoAWQ's
    quant_config.json spells its fields w_bit / q_group_size."""
    from safetensors.torch import load_file

    folder, state = tiny_llama
    gptq, dense, _ = save_gptq(folder, tmp_path / "gptq", state, 64, desc_act=False)
    config = json.loads((gptq / "config.json").read_text())["quantization_config"]
    tensors = {n: t for n, t in load_file(str(gptq / "model.safetensors")).items()
               if not n.endswith(".g_idx")}
    weights = _read(copy_folder(folder, tmp_path / "no-g-idx", tensors, config))
    for prefix, expected in dense.items():
        assert (weights[f"{prefix}.weight"].dequantize() - expected).abs().max() < 1e-3
    assert len(weights) == len(state)

    awq, awq_dense = save_awq(folder, tmp_path / "awq", state, 32)
    config = json.loads((awq / "config.json").read_text())
    config.pop("quantization_config")
    (awq / "config.json").write_text(json.dumps(config))
    (awq / "quant_config.json").write_text(json.dumps(
        {"zero_point": True, "q_group_size": 32, "w_bit": 4, "version": "GEMM"}))
    weights = _read(awq)
    for prefix, expected in awq_dense.items():
        assert weights[f"{prefix}.weight"].group_size == 32
        assert (weights[f"{prefix}.weight"].dequantize() - expected).abs().max() < 1e-3


@pytest.fixture(scope="module")
def gptq_parts(tiny_llama, tmp_path_factory):
    """(folder, tensors, quantization config) of a GPTQ checkpoint to break in different ways."""
    from safetensors.torch import load_file

    folder, state = tiny_llama
    gptq, _, _ = save_gptq(folder, tmp_path_factory.mktemp("gptq"), state, 32, desc_act=True)
    config = json.loads((gptq / "config.json").read_text())["quantization_config"]
    return folder, load_file(str(gptq / "model.safetensors")), config


def _broken(gptq_parts, tmp_path, edit_tensors=None, **config_changes):
    folder, tensors, config = gptq_parts
    tensors = dict(tensors)
    if edit_tensors:
        edit_tensors(tensors)
    return copy_folder(folder, tmp_path / "broken", tensors, {**config, **config_changes})


@pytest.mark.parametrize(("edit", "message"), [
    (lambda t: t.update({f"{Q_PROJ}.scales": t[f"{Q_PROJ}.scales"][:, :-8]}),
     rf"{Q_PROJ}\.scales has shape \(4, {HIDDEN - 8}\), expected \(4, {HIDDEN}\)"),
    (lambda t: t.update({f"{Q_PROJ}.qzeros": t[f"{Q_PROJ}.qzeros"][:2]}),
     rf"{Q_PROJ}\.qzeros has shape \(2, 16\), expected \(4, 16\)"),
    (lambda t: t.pop(f"{Q_PROJ}.scales"), rf"{Q_PROJ}\.scales is missing"),
    (lambda t: t.pop(f"{Q_PROJ}.g_idx"), rf"{Q_PROJ}\.g_idx is missing"),  # desc_act needs it
    (lambda t: t.update({f"{Q_PROJ}.qweight": t[f"{Q_PROJ}.qweight"].float()}),
     rf"{Q_PROJ}\.qweight has dtype float32, expected int32"),
    (lambda t: t.update({f"{Q_PROJ}.g_idx": t[f"{Q_PROJ}.g_idx"] + 4}),
     rf"{Q_PROJ}\.g_idx holds groups 4\.\.7, expected 0\.\.3"),
])
def test_malformed_gptq_is_refused_naming_the_tensor(gptq_parts, tmp_path, edit, message):
    broken = _broken(gptq_parts, tmp_path, edit)
    with pytest.raises(CorruptModelFileError, match=message) as info:
        _read(broken)
    assert str(broken) in str(info.value)


def test_uneven_groups_are_refused(gptq_parts, tmp_path):
    broken = _broken(gptq_parts, tmp_path, lambda t: t.update(
        {f"{Q_PROJ}.g_idx": torch.zeros(HIDDEN, dtype=torch.int32)}))
    with pytest.raises(UnsupportedModelError, match=rf"{Q_PROJ}\.g_idx puts 128 inputs in group 0"):
        _read(broken)


@pytest.mark.parametrize(("changes", "message"), [
    ({"bits": 3}, "bits=3"), ({"bits": 8}, "bits=8"), ({"group_size": 16}, "group_size=16"),
    ({"checkpoint_format": "marlin"}, "checkpoint_format 'marlin'"),
    ({"pack_dtype": "int16"}, "pack_dtype='int16'"),
    ({"quant_method": "bitsandbytes"}, "quant_method='bitsandbytes'"),
])
def test_unsupported_settings_are_refused_at_open(gptq_parts, tmp_path, changes, message):
    broken = _broken(gptq_parts, tmp_path, **changes)
    with pytest.raises(UnsupportedModelError, match=message) as info:
        open_model_source(broken)  # before the model is built
    assert "config.json" in str(info.value)


def test_malformed_awq_is_refused(tiny_llama, tmp_path):
    from safetensors.torch import load_file

    folder, state = tiny_llama
    awq, _ = save_awq(folder, tmp_path / "awq", state, 64)
    config = json.loads((awq / "config.json").read_text())["quantization_config"]
    tensors = load_file(str(awq / "model.safetensors"))
    tensors[f"{Q_PROJ}.scales"] = tensors[f"{Q_PROJ}.scales"].T.contiguous()
    broken = copy_folder(folder, tmp_path / "broken", tensors, config)
    with pytest.raises(CorruptModelFileError, match=rf"{Q_PROJ}\.scales has shape \(128, 2\), "
                                                    r"expected \(2, 128\)"):
        _read(broken)
    gemv = copy_folder(folder, tmp_path / "gemv", tensors, {**config, "version": "gemv"})
    with pytest.raises(UnsupportedModelError, match="AWQ version 'gemv'"):
        open_model_source(gemv)
