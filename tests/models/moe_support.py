"""Tiny random Mixtral / Qwen2-MoE / Qwen3-MoE models made with transformers, saved as a
safetensors folder (per-expert or fused layout) or written as GGUF the way llama.cpp names them.

The random weights are rescaled so the test has power: routers get large logits (clear top-k
margins, checked by ``router_margin``), experts get weights large enough that a wrong expert or a
wrong routing weight moves the logits far beyond the tolerance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

COMMON = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
          "vocab_size": 49152, "tie_word_embeddings": False}
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
GGUF_ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}


def hf_config(family: str, **overrides: Any) -> Any:
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    if family == "mixtral":
        return MixtralConfig(**{**COMMON, "num_local_experts": 4, "num_experts_per_tok": 2,
                                **overrides})
    moe = {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 48}
    if family == "qwen2_moe":  # no renormalization, a shared expert with its sigmoid gate
        return Qwen2MoeConfig(**{**COMMON, **moe, "shared_expert_intermediate_size": 80,
                                 "norm_topk_prob": False, **overrides})
    # llama.cpp always renormalizes for qwen3moe, as the released Qwen3-MoE configs declare
    return Qwen3MoeConfig(**{**COMMON, **moe, "head_dim": 32, "norm_topk_prob": True,
                             **overrides})


def make_hf_moe(family: str, seed: int = 0, **overrides: Any) -> Any:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(family, **overrides),
                                             dtype=torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".mlp.gate.weight" in name:  # router: logits of a few units, clear top-k gaps
                param.normal_(0, 0.6)
            elif ".experts." in name or "shared_expert" in name:
                param.normal_(0, 0.15)
            elif name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
                param.normal_(0, 0.5)  # Qwen2-MoE's q/k/v biases are zero at init
            elif name == "lm_head.weight":
                param.normal_(0, 0.3)  # logits of ~10 units: greedy choices with clear gaps
            elif name.endswith(("q_norm.weight", "k_norm.weight")):
                param.uniform_(0.5, 1.5)  # ones at init: make the q/k norms count
    return model


def router_margin(model: Any, ids: list[int]) -> float:
    """The smallest gap between the k-th and (k+1)-th router logit over the prompt's tokens and
    every sparse layer: rounding differences (~1e-6) must stay far below it, or a near tie could
    pick another expert in one implementation and not in the other."""
    with torch.no_grad():
        out = model(torch.tensor([ids]), output_router_logits=True)
    top_k = model.config.num_experts_per_tok
    margin = float("inf")
    for logits in out.router_logits:
        ordered = logits.float().sort(dim=-1, descending=True).values
        margin = min(margin, float((ordered[:, top_k - 1] - ordered[:, top_k]).min()))
    return margin


def hf_greedy(model: Any, ids: list[int], num_tokens: int) -> tuple[list[int], float]:
    """Greedy continuation (full forward each step, no cache) and its smallest top-1 margin."""
    ids = list(ids)
    out: list[int] = []
    margin = float("inf")
    with torch.no_grad():
        for _ in range(num_tokens):
            logits = model(torch.tensor([ids])).logits[0, -1]
            top = logits.topk(2).values
            margin = min(margin, float(top[0] - top[1]))
            token = int(logits.argmax())
            ids.append(token)
            out.append(token)
    return out, margin


def save_folder(model: Any, folder: Path, tokenizer: Any, fused: bool) -> Path:
    """``fused=False``: the per-expert layout (transformers' default "original format");
    ``fused=True``: the stacked ``experts.gate_up_proj`` / ``experts.down_proj`` layout."""
    model.save_pretrained(folder, save_original_format=not fused)
    tokenizer.save_pretrained(folder)
    return folder


def _permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's converter reorders q/k rows of llama-architecture files so each head's two
    rotary halves are interleaved (the loader inverts this)."""
    return (weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_moe_gguf(model: Any, family: str, path: Path, tokenizer_gguf: Path,
                   expert_type: str = "F32", skip: tuple[str, ...] = (),
                   metadata: dict[str, int] | None = None) -> Path:
    """The model as llama.cpp's converter would write it (F32 tensors; stacked expert tensors in
    ``expert_type``). ``skip`` leaves tensors out, ``metadata`` overrides ``{arch}.<key>`` ints."""
    import gguf

    config = model.config
    arch = GGUF_ARCH[family]
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    num_experts = getattr(config, "num_local_experts", None) or config.num_experts
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
    ints = {"expert_count": num_experts, "expert_used_count": config.num_experts_per_tok}
    if family != "mixtral":
        ints["expert_feed_forward_length"] = config.moe_intermediate_size
    if family == "qwen2_moe":
        ints["expert_shared_feed_forward_length"] = config.shared_expert_intermediate_size
    for key, value in {**ints, **(metadata or {})}.items():
        writer.add_uint32(f"{arch}.{key}", value)
    _copy_tokenizer(writer, tokenizer_gguf)

    tensors: dict[str, np.ndarray] = {
        "token_embd.weight": state["model.embed_tokens.weight"],
        "output_norm.weight": state["model.norm.weight"],
        "output.weight": state["lm_head.weight"],
    }
    permute = family == "mixtral"
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        q, k = state[p + "self_attn.q_proj.weight"], state[p + "self_attn.k_proj.weight"]
        blk = {
            "attn_norm.weight": state[p + "input_layernorm.weight"],
            "ffn_norm.weight": state[p + "post_attention_layernorm.weight"],
            "attn_q.weight": _permute(q, config.num_attention_heads) if permute else q,
            "attn_k.weight": _permute(k, config.num_key_value_heads) if permute else k,
            "attn_v.weight": state[p + "self_attn.v_proj.weight"],
            "attn_output.weight": state[p + "self_attn.o_proj.weight"],
            "ffn_gate_inp.weight": state[p + "mlp.gate.weight"],
        }
        for proj in ("q", "k", "v"):
            if p + f"self_attn.{proj}_proj.bias" in state:
                blk[f"attn_{proj}.bias"] = state[p + f"self_attn.{proj}_proj.bias"]
        for norm in ("q", "k"):
            if p + f"self_attn.{norm}_norm.weight" in state:
                blk[f"attn_{norm}_norm.weight"] = state[p + f"self_attn.{norm}_norm.weight"]
        gate_up = state[p + "mlp.experts.gate_up_proj"]  # [E, 2I, H], gate rows first
        size = gate_up.shape[1] // 2
        experts = {"ffn_gate_exps.weight": gate_up[:, :size], "ffn_up_exps.weight": gate_up[:, size:],
                   "ffn_down_exps.weight": state[p + "mlp.experts.down_proj"]}
        if p + "mlp.shared_expert_gate.weight" in state:
            blk["ffn_gate_inp_shexp.weight"] = state[p + "mlp.shared_expert_gate.weight"][0]
            for proj in ("gate", "up", "down"):
                blk[f"ffn_{proj}_shexp.weight"] = state[p + f"mlp.shared_expert.{proj}_proj.weight"]
        tensors.update({f"blk.{i}.{name}": value for name, value in blk.items()})
        for name, value in experts.items():
            tensors[f"blk.{i}.{name}"] = (value, expert_type)
    for name, value in tensors.items():
        if name in skip:
            continue
        array, kind = value if isinstance(value, tuple) else (value, "F32")
        array = np.ascontiguousarray(array, dtype=np.float32)
        if kind == "F32":
            writer.add_tensor(name, array)
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            writer.add_tensor(name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def round_trip_experts(model: Any, expert_type: str) -> None:
    """Replace the HF model's expert weights by what a GGUF file of ``expert_type`` holds."""
    import gguf

    qtype = gguf.GGMLQuantizationType[expert_type]
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
                array = param.detach().float().numpy()
                back = gguf.quants.dequantize(gguf.quants.quantize(array, qtype), qtype)
                param.copy_(torch.from_numpy(np.asarray(back, dtype=np.float32)))


def _copy_tokenizer(writer: Any, tokenizer_gguf: Path) -> None:
    import gguf

    reader = gguf.GGUFReader(str(tokenizer_gguf), "r")
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer."):
            continue
        main_type = field.types[0]
        sub_type = field.types[-1] if main_type == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), main_type, sub_type)
