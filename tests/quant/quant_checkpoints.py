"""Builders for quantized checkpoints, written from the published formats (not from tokenmill's
readers): a tiny random Llama, GPTQ / AWQ packers that put codes into int32 words exactly as
AutoGPTQ and AutoAWQ do, FP8 (compressed-tensors and DeepSeek-style) writers, the logits helper.

Each ``save_*`` function returns the dense matrices the checkpoint stands for, computed here
independently as ``scale * (q - zero)`` (or ``codes * scale``), so tests can check the readers
against them and write a float "twin" of the quantized model.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch

HIDDEN, INTERMEDIATE, NUM_LAYERS, VOCAB = 128, 256, 2, 128
NUM_HEADS, NUM_KV_HEADS = 4, 2
# (module, shared-input key): GPTQ's act order comes from the layer input's Hessian, so the
# projections reading the same input (q/k/v, gate/up) share one activation order
LINEARS = {"self_attn.q_proj": "attn_in", "self_attn.k_proj": "attn_in",
           "self_attn.v_proj": "attn_in", "self_attn.o_proj": "o_in",
           "mlp.gate_proj": "mlp_in", "mlp.up_proj": "mlp_in", "mlp.down_proj": "down_in"}
AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
PROMPT_IDS = [1, 17, 42, 99, 5, 64, 3, 120, 77, 8, 31, 56]


def save_tiny_llama(folder: Path) -> dict[str, torch.Tensor]:
    """A random 2-layer Llama (hidden 128, intermediate 256, vocab 128) in the Hugging Face layout,
    written directly (transformers' import alone would cost more than these tests), with a
    128-word tokenizer; returns its state dict. Weights have std 0.1 so logits are far from flat."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(0)

    def randn(*shape: int, mean: float = 0.0) -> torch.Tensor:
        return mean + 0.1 * torch.randn(*shape, generator=generator)

    head_dim, kv_dim = HIDDEN // NUM_HEADS, NUM_KV_HEADS * HIDDEN // NUM_HEADS
    state = {"model.embed_tokens.weight": randn(VOCAB, HIDDEN),
             "lm_head.weight": randn(VOCAB, HIDDEN), "model.norm.weight": randn(HIDDEN, mean=1.0)}
    shapes = {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (kv_dim, HIDDEN),
              "self_attn.v_proj": (kv_dim, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
              "mlp.gate_proj": (INTERMEDIATE, HIDDEN), "mlp.up_proj": (INTERMEDIATE, HIDDEN),
              "mlp.down_proj": (HIDDEN, INTERMEDIATE)}
    for i in range(NUM_LAYERS):
        for module, shape in shapes.items():
            state[f"model.layers.{i}.{module}.weight"] = randn(*shape)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[f"model.layers.{i}.{norm}.weight"] = randn(HIDDEN, mean=1.0)
    save_file(state, str(folder / "model.safetensors"))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
              "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
              "num_hidden_layers": NUM_LAYERS, "num_attention_heads": NUM_HEADS,
              "num_key_value_heads": NUM_KV_HEADS, "head_dim": head_dim, "vocab_size": VOCAB,
              "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
              "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
              "torch_dtype": "float32"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    vocab = {f"w{i}": i for i in range(VOCAB)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.save(str(folder / "tokenizer.json"))
    return state


def linear_prefixes() -> list[tuple[str, str]]:
    """(checkpoint prefix, shared-input key) of every quantizable linear layer."""
    return [(f"model.layers.{i}.{module}", f"{i}.{key}")
            for i in range(NUM_LAYERS) for module, key in LINEARS.items()]


def copy_folder(source: Path, target: Path, tensors: dict[str, torch.Tensor],
                quantization_config: dict | None) -> Path:
    """``source``'s config and tokenizer, ``tensors`` as the weights, a quantization config."""
    target.mkdir(parents=True, exist_ok=True)
    from safetensors.torch import save_file

    for name in ("tokenizer.json", "generation_config.json"):
        if (source / name).exists():
            shutil.copy(source / name, target / name)
    config = json.loads((source / "config.json").read_text())
    config.pop("quantization_config", None)
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (target / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(target / "model.safetensors"))
    return target


def rtn_quantize(w: torch.Tensor, group: int, perm: torch.Tensor | None):
    """GPTQ's asymmetric 4-bit quantizer (round to nearest; the Hessian update changes which codes
    are chosen, not the format). ``perm``: activation order; group ``g`` is inputs
    ``perm[g*group:(g+1)*group]``. Returns codes [N, K] (original input order), fp16 scales [G, N],
    int zeros [G, N] and g_idx [K]."""
    rows, cols = w.shape
    perm = torch.arange(cols) if perm is None else perm
    grouped = w[:, perm].float().reshape(rows, cols // group, group)  # [N, G, group]
    low = grouped.amin(dim=-1).clamp(max=0)
    high = grouped.amax(dim=-1).clamp(min=0)
    scales = ((high - low) / 15).to(torch.float16)  # GPTQ packs with the float16 scales
    scale = scales.float().unsqueeze(-1)
    zeros = torch.round(-low.unsqueeze(-1) / scale).clamp(0, 15)
    sorted_codes = (torch.round(grouped / scale) + zeros).clamp(0, 15).long().reshape(rows, cols)
    codes = torch.empty_like(sorted_codes)
    codes[:, perm] = sorted_codes
    g_idx = torch.empty(cols, dtype=torch.int32)
    g_idx[perm] = (torch.arange(cols) // group).to(torch.int32)
    return codes, scales.T.contiguous(), zeros.squeeze(-1).long().T.contiguous(), g_idx


def dequantize_reference(codes, scales, zeros, g_idx) -> torch.Tensor:
    """``w[n, k] = scale[g_idx[k], n] * (q[n, k] - zero[g_idx[k], n])`` in float32."""
    g = g_idx.long()
    return scales.float()[g].T * (codes.float() - zeros.float()[g].T)


def pack_gptq(codes: torch.Tensor, zeros: torch.Tensor, v1: bool):
    """AutoGPTQ's ``QuantLinear.pack``: qweight packs 8 inputs per uint32 along K, qzeros 8 outputs
    along N, the first at the low bits; v1 stores ``zero - 1``."""
    intweight = codes.T.numpy().astype(np.uint32)  # [K, N]
    qweight = np.zeros((intweight.shape[0] // 8, intweight.shape[1]), dtype=np.uint32)
    for j in range(8):
        qweight |= intweight[j::8] << np.uint32(4 * j)
    stored = (zeros - 1) if v1 else zeros
    assert int(stored.min()) >= 0, "v1 cannot store a zero point of 0 (AutoGPTQ's overflow)"
    zeros_np = stored.numpy().astype(np.uint32)
    qzeros = np.zeros((zeros_np.shape[0], zeros_np.shape[1] // 8), dtype=np.uint32)
    for j in range(8):
        qzeros |= zeros_np[:, j::8] << np.uint32(4 * j)
    return (torch.from_numpy(qweight.view(np.int32).copy()),
            torch.from_numpy(qzeros.view(np.int32).copy()))


def pack_awq(codes: torch.Tensor, zeros: torch.Tensor):
    """AutoAWQ's ``WQLinear_GEMM.from_linear``: 8 outputs per int32 along N in the order
    [0, 2, 4, 6, 1, 3, 5, 7]; qzeros the same way."""
    def pack(values_kn: np.ndarray) -> torch.Tensor:
        packed = np.zeros((values_kn.shape[0], values_kn.shape[1] // 8), dtype=np.uint32)
        for i in range(8):
            packed |= values_kn[:, AWQ_ORDER[i]::8] << np.uint32(4 * i)
        return torch.from_numpy(packed.view(np.int32).copy())
    return (pack(codes.T.numpy().astype(np.uint32)), pack(zeros.numpy().astype(np.uint32)))


def save_gptq(source: Path, target: Path, state: dict[str, torch.Tensor], group_size: int,
              desc_act: bool, v1: bool = True, seed: int = 1):
    """A GPTQ checkpoint of ``state``; returns (folder, {prefix: dense}, {prefix: (codes, scales,
    zeros, g_idx)})."""
    generator = torch.Generator().manual_seed(seed)
    tensors = dict(state)
    dense, raw, perms = {}, {}, {}
    for prefix, input_key in linear_prefixes():
        w = tensors.pop(f"{prefix}.weight")
        group = w.shape[1] if group_size == -1 else group_size
        if desc_act and input_key not in perms:
            perms[input_key] = torch.randperm(w.shape[1], generator=generator)
        codes, scales, zeros, g_idx = rtn_quantize(w, group, perms.get(input_key))
        qweight, qzeros = pack_gptq(codes, zeros, v1)
        tensors.update({f"{prefix}.qweight": qweight, f"{prefix}.qzeros": qzeros,
                        f"{prefix}.scales": scales, f"{prefix}.g_idx": g_idx})
        dense[prefix] = dequantize_reference(codes, scales, zeros, g_idx)
        raw[prefix] = (codes, scales, zeros, g_idx)
    config = {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": desc_act,
              "sym": False, "checkpoint_format": "gptq" if v1 else "gptq_v2",
              "damp_percent": 0.01, "true_sequential": True}
    return copy_folder(source, target, tensors, config), dense, raw


def save_awq(source: Path, target: Path, state: dict[str, torch.Tensor], group_size: int):
    tensors = dict(state)
    dense = {}
    for prefix, _ in linear_prefixes():
        w = tensors.pop(f"{prefix}.weight")
        codes, scales, zeros, g_idx = rtn_quantize(w, group_size, None)
        qweight, qzeros = pack_awq(codes, zeros)
        tensors.update({f"{prefix}.qweight": qweight, f"{prefix}.qzeros": qzeros,
                        f"{prefix}.scales": scales})
        dense[prefix] = dequantize_reference(codes, scales, zeros, g_idx)
    config = {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True,
              "version": "gemm"}
    return copy_folder(source, target, tensors, config), dense


def save_fp8(source: Path, target: Path, state: dict[str, torch.Tensor], strategy: str):
    """FP8 checkpoint: compressed-tensors "float-quantized" (strategy "tensor" / "channel", with
    input_scale) or DeepSeek-style ``weight_scale_inv`` per 128x128 block ("block")."""
    tensors = dict(state)
    dense = {}
    for prefix, _ in linear_prefixes():
        w = tensors.pop(f"{prefix}.weight").float()
        if strategy == "block":
            rows, cols = w.shape
            nb, kb = -(-rows // 128), -(-cols // 128)
            scale = torch.empty(nb, kb)
            for i in range(nb):
                for j in range(kb):
                    block = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
                    scale[i, j] = block.abs().max() / 448
            full = scale.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
            codes = (w / full).to(torch.float8_e4m3fn)
            dense[prefix] = codes.float() * full
            tensors[f"{prefix}.weight_scale_inv"] = scale
        else:
            # compressed-tensors stores a per-channel scale as [N, 1], a per-tensor one as [1]
            per_channel = strategy == "channel"
            amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().max()
            scale = (amax / 448).reshape(-1, 1) if per_channel else (amax / 448).reshape(1)
            codes = (w / (scale if per_channel else scale[0])).to(torch.float8_e4m3fn)
            dense[prefix] = codes.float() * (scale if per_channel else scale[0])
            tensors[f"{prefix}.weight_scale"] = scale.to(torch.float32)
            tensors[f"{prefix}.input_scale"] = torch.ones(1)
        tensors[f"{prefix}.weight"] = codes
    if strategy == "block":
        config = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                  "weight_block_size": [128, 128]}
    else:
        config = {"quant_method": "compressed-tensors", "format": "float-quantized",
                  "config_groups": {"group_0": {
                      "targets": ["Linear"],
                      "weights": {"num_bits": 8, "type": "float", "strategy": strategy,
                                  "symmetric": True, "dynamic": False},
                      "input_activations": {"num_bits": 8, "type": "float",
                                            "strategy": "tensor", "dynamic": False}}},
                  "ignore": ["lm_head"]}
    return copy_folder(source, target, tensors, config), dense


def save_float_twin(source: Path, target: Path, state: dict[str, torch.Tensor],
                    dense: dict[str, torch.Tensor]) -> Path:
    """The same model with each quantized layer written as its dequantized float matrix."""
    tensors = dict(state)
    tensors.update({f"{prefix}.weight": w for prefix, w in dense.items()})
    return copy_folder(source, target, tensors, None)


def logits(folder: Path, quantization: str = "auto", group_size: int = 32) -> torch.Tensor:
    """Logits of PROMPT_IDS through tokenmill's model (float32 compute on CPU)."""
    from tokenmill.layers.attention import causal_metadata
    from tokenmill.loader.model_source import open_model_source
    from tokenmill.models.registry import build_model

    source = open_model_source(folder)
    model = build_model(source, torch.float32, "cpu", quantization=quantization,
                        quantization_group_size=group_size)
    ids = torch.tensor(PROMPT_IDS)
    with torch.inference_mode():
        hidden = model(ids, torch.arange(len(ids)), causal_metadata([len(ids)], None))
        return model.compute_logits(hidden)


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    return ((value - reference).norm() / reference.norm()).item()
