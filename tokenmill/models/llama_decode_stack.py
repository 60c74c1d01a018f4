"""The native decode path of a Llama-family model: every decoder layer of a decode-only step in one
C++ call (``layers/kernels/decoder_stack.cpp``).

A decode step of a small model is mostly per-call overhead: 30 layers x ~10 kernels, each called
through Python modules, argument checks and pybind. ``LlamaDecodeStack`` hands the layers' weights
to the native ``DecoderStack`` once, after loading, and then runs a decode-only step as one call
that chains the very kernels the Python layers call, in the same order, so the result is the same
bit for bit (tests/models/test_decode_stack.py). Everything else (prefill, mixed steps, FP8 or
reference-path weights, GPUs, more rows than the quantized kernel's decode paths take) stays on
the Python layers, which remain the reference. ``TOKENMILL_DECODER_STACK=0`` turns it off. A
per-head q/k RMSNorm (Qwen3) runs in the stack too, with the same native norm the Python layer calls.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from tokenmill.layers.attention import AttentionMetadata
from tokenmill.layers.kernels import fused_ops
from tokenmill.layers.linear import DenseOp, MergedLinear, QuantizedOp

ENABLE_ENV = "TOKENMILL_DECODER_STACK"
_enabled = os.environ.get(ENABLE_ENV, "1") != "0"


def set_enabled(enabled: bool) -> None:
    """Switch the native decode path on or off for the whole process (tests, benchmarks)."""
    global _enabled
    _enabled = enabled


def is_enabled() -> bool:
    return _enabled


class LlamaDecodeStack:
    def __init__(self, native: Any, dtype: torch.dtype, max_rows: int):
        self.native = native
        self.dtype = dtype
        self.max_rows = max_rows  # rows the quantized kernel's decode paths take

    @classmethod
    def build(cls, model: torch.nn.Module) -> LlamaDecodeStack | None:
        """The stack for ``model`` (a ``LlamaForCausalLM``; typed as a module so this file need
        not import the model that imports it), or None when some part of it has no native decode
        path."""
        from tokenmill.layers.kernels import quant_matmul

        module = fused_ops.fused_ops_module()
        arch = model.arch
        dtype = model.embed_tokens.dtype
        if (module is None or model.embed_tokens.device.type != "cpu"
                or dtype not in (torch.float32, torch.bfloat16)
                or arch.num_attention_heads % arch.num_key_value_heads
                or arch.num_attention_heads // arch.num_key_value_heads > 16
                or arch.head_dim > 256 or arch.hidden_act != "silu"):
            return None
        if any(not hasattr(layer.mlp, "gate_up_proj") for layer in model.layers):
            return None  # an MoE layer (routed experts): the native stack chains dense MLPs only
        rotary = model.layers[0].self_attn.rotary if len(model.layers) else None
        if rotary is None or rotary.cos.dtype != dtype:
            return None
        norms = [model.norm] + [n for layer in model.layers
                                for n in (layer.input_layernorm, layer.post_attention_layernorm,
                                          layer.self_attn.q_norm, layer.self_attn.k_norm)
                                if n is not None]
        if any(norm.weight.dtype not in (dtype, torch.float32) for norm in norms):
            return None
        attention = model.layers[0].self_attn
        native = module.DecoderStack(
            attention.num_heads, attention.num_kv_heads, attention.head_dim,
            model.norm.eps, attention.scale, arch.sliding_window or 0, rotary.cos, rotary.sin,
            model.norm.weight)
        any_packed = False
        for layer in model.layers:
            indices = []
            for linear in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                           layer.mlp.gate_up_proj, layer.mlp.down_proj):
                index = _add_linear(native, linear)
                if index is None:
                    return None
                any_packed |= isinstance(linear.op, QuantizedOp)
                indices.append(index)
            qkv, o, gate_up, down = indices
            native.add_layer(layer.input_layernorm.weight, qkv, o,
                             layer.post_attention_layernorm.weight, gate_up, down)
            if layer.self_attn.q_norm is not None:  # Qwen3
                native.set_qk_norm(native.num_layers - 1, layer.self_attn.q_norm.weight,
                                   layer.self_attn.k_norm.weight)
        if not any_packed:
            max_rows = 1 << 30  # dense weights: at::linear, whatever the rows
        elif dtype == torch.float32:
            max_rows = quant_matmul.DENSE_MIN_ROWS_FP32 - 1
        else:
            dense_from = quant_matmul.dense_min_rows()
            max_rows = 1 << 30 if dense_from is None else dense_from - 1
        return cls(native, dtype, max_rows)

    def can_run(self, hidden: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[torch.Tensor] | None) -> bool:
        """A decode-only step through the native attention kernel, with the fused ops on."""
        return (_enabled and kv_caches is not None and meta.decode is not None
                and not meta.prefills and meta.decode_kernel is not None
                and hidden.shape[0] <= self.max_rows and hidden.dtype == self.dtype
                and fused_ops.is_enabled() and _isa_code() != 0)

    def __call__(self, hidden: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                 kv_caches: list[torch.Tensor]) -> torch.Tensor:
        """The final norm's output for the step's tokens, as ``LlamaForCausalLM.forward`` gives."""
        batch = meta.decode
        return self.native.forward(hidden, positions, kv_caches, batch.block_table,
                                   batch.seq_lens, meta.slot_mapping, _isa_code())


def _isa_code() -> int:
    """The quantized kernel's ISA as the native code takes it (0: reference, no native path)."""
    from tokenmill.layers.kernels import quant_matmul

    return quant_matmul.isa_code()


def _add_linear(native: Any, linear: MergedLinear) -> int | None:
    op = linear.op
    if isinstance(op, QuantizedOp) and op.packed is not None and op.packed.reference is None:
        p = op.packed
        return native.add_packed_linear(p.data, p.out_features, p.in_features, p.bits,
                                        p.group_size, p.has_min, p.tile_stride, p.scales_offset,
                                        p.mins_offset, p.input_perm, linear.bias)
    if isinstance(op, DenseOp):
        return native.add_dense_linear(op.matrix, linear.bias)
    return None
