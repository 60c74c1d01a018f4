"""The Llama family (Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3, SmolLM): one model file, differences
from ArchConfig.

Qwen2 adds q/k/v biases; Qwen3 drops them and normalizes each query and key head (RMSNorm) before
rotary; Mistral may declare a sliding window; Llama 3 declares rope scaling. The differences are
small enough to be options here rather than files of their own. Weights arrive as ``(hf_name,
tensor)`` pairs from any loader and are mapped onto fused parameters here.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from tokenmill.distributed.parallel_state import ParallelContext
from tokenmill.distributed.sharding import check_model_split
from tokenmill.errors import CorruptModelFileError
from tokenmill.layers.activation import gated_activation
from tokenmill.layers.attention import AttentionMetadata, paged_attention
from tokenmill.layers.linear import MergedLinear
from tokenmill.layers.norm import RMSNorm
from tokenmill.layers.parallel_embedding import VocabParallelEmbedding
from tokenmill.layers.parallel_linear import (
    ColumnParallelLinear,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelHead,
)
from tokenmill.layers.rotary import RotaryEmbedding
from tokenmill.models.arch_config import ArchConfig
from tokenmill.models.llama_decode_stack import LlamaDecodeStack
from tokenmill.quant.registry import QuantMethod, get_quant_method

# checkpoint sub-module -> (fused module, shard name)
_FUSED_SHARDS = {
    "self_attn.q_proj": ("self_attn.qkv_proj", "q"),
    "self_attn.k_proj": ("self_attn.qkv_proj", "k"),
    "self_attn.v_proj": ("self_attn.qkv_proj", "v"),
    "self_attn.o_proj": ("self_attn.o_proj", ""),
    "mlp.gate_proj": ("mlp.gate_up_proj", "gate"),
    "mlp.up_proj": ("mlp.gate_up_proj", "up"),
    "mlp.down_proj": ("mlp.down_proj", ""),
}


class LlamaAttention(nn.Module):
    def __init__(self, arch: ArchConfig, rotary: RotaryEmbedding, dtype: torch.dtype,
                 device: torch.device | str, parallel: ParallelContext | None = None):
        super().__init__()
        parallel = parallel or ParallelContext.single()
        self.head_dim = arch.head_dim
        # this rank's heads (all of them with one rank)
        self.qkv_proj = QKVParallelLinear(arch.hidden_size, arch.head_dim,
                                          arch.num_attention_heads, arch.num_key_value_heads,
                                          arch.attention_bias, dtype, device, parallel)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(arch.num_attention_heads * arch.head_dim,
                                        arch.hidden_size, arch.o_proj_bias, dtype, device, parallel)
        # Qwen3: RMSNorm over head_dim, one weight shared by all heads, applied before rotary
        # (every rank keeps the whole weight: it is per head_dim, not per head)
        self.q_norm = self.k_norm = None
        if arch.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, arch.rms_norm_eps).to(device=device, dtype=dtype)
            self.k_norm = RMSNorm(self.head_dim, arch.rms_norm_eps).to(device=device, dtype=dtype)
        self.rotary = rotary
        self.scale = self.head_dim ** -0.5

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, meta: AttentionMetadata,
                kv_cache: torch.Tensor | None) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        # one view into heads, then split the heads: fewer small ops than split-then-view
        qkv = self.qkv_proj(hidden).view(num_tokens, -1, self.head_dim)
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        if self.q_norm is not None:  # new contiguous tensors, so rotary may work in place
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        out = paged_attention(q, k, v, kv_cache, meta, self.scale)
        return self.o_proj(out.reshape(num_tokens, -1))


class LlamaMLP(nn.Module):
    def __init__(self, arch: ArchConfig, dtype: torch.dtype, device: torch.device | str,
                 intermediate_size: int | None = None, parallel: ParallelContext | None = None,
                 reduce_results: bool = True):
        super().__init__()
        parallel = parallel or ParallelContext.single()
        size = intermediate_size or arch.intermediate_size  # an MoE's shared expert has its own
        self.gate_up_proj = ColumnParallelLinear(arch.hidden_size, {"gate": size, "up": size},
                                                 False, dtype, device, parallel)
        self.down_proj = RowParallelLinear(size, arch.hidden_size, False, dtype, device, parallel,
                                           reduce_results)
        self.act = gated_activation(arch.hidden_act)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(hidden)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, arch: ArchConfig, rotary: RotaryEmbedding, dtype: torch.dtype,
                 device: torch.device | str, parallel: ParallelContext | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.self_attn = LlamaAttention(arch, rotary, dtype, device, parallel)
        self.post_attention_layernorm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.mlp = LlamaMLP(arch, dtype, device, parallel=parallel)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, meta: AttentionMetadata,
                kv_cache: torch.Tensor | None, residual: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream is carried as ``(hidden, residual)`` (vLLM's convention):
        ``hidden`` is the previous layer's MLP output (the embeddings, with ``residual`` None,
        for the first layer) and is not yet added, so each add fuses with the norm after it.
        Returns this layer's MLP output and the stream; ``residual`` is updated in place."""
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, meta, kv_cache)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaForCausalLM(nn.Module):
    def __init__(self, arch: ArchConfig, dtype: torch.dtype, device: torch.device | str,
                 max_positions: int | None = None, parallel: ParallelContext | None = None):
        super().__init__()
        self.arch = arch
        # tensor parallelism: each layer built below keeps this rank's shard of its weights
        self.parallel = parallel = parallel or ParallelContext.single()
        check_model_split(arch, parallel.world_size)
        rotary = RotaryEmbedding(arch.head_dim, max_positions or arch.max_position_embeddings,
                                 arch.rope_theta, arch.rope_scaling, dtype, device)
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, dtype,
                                                   device, parallel)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(arch, rotary, dtype, device, parallel)
            for _ in range(arch.num_hidden_layers)
        )
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps).to(device=device, dtype=dtype)
        for layer in self.layers:
            layer.input_layernorm.to(device=device, dtype=dtype)
            layer.post_attention_layernorm.to(device=device, dtype=dtype)
        self.lm_head = (None if arch.tie_word_embeddings else
                        VocabParallelHead(arch.hidden_size, arch.vocab_size, dtype, device,
                                          parallel))
        self.requires_grad_(False)
        self.decode_stack: LlamaDecodeStack | None = None  # built once the weights are loaded

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata,
                kv_caches: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Hidden states ``[num_tokens, hidden]`` for a flattened batch of sequences."""
        hidden = self.embed_tokens(input_ids)
        if self.arch.embedding_multiplier != 1.0:  # Gemma; rounded to the dtype, as it does
            hidden = hidden * torch.tensor(self.arch.embedding_multiplier, dtype=hidden.dtype)
        stack = self.decode_stack
        if stack is not None and stack.can_run(hidden, meta, kv_caches):
            return stack(hidden, positions, meta, kv_caches)
        residual = None
        for index, layer in enumerate(self.layers):
            hidden, residual = layer(positions, hidden, meta,
                                     None if kv_caches is None else kv_caches[index], residual)
        if residual is None:  # no layers
            return self.norm(hidden)
        return self.norm(hidden, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        head = self.embed_tokens.tie_head() if self.lm_head is None else self.lm_head
        return head(hidden).float()

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]],
                     method: QuantMethod | None = None) -> None:
        """Take checkpoint tensors (Hugging Face names) into the fused layers, then prepare every
        linear layer with the quantization ``method`` (default: keep what the checkpoint holds)."""
        method = method or get_quant_method("auto")
        modules = dict(self.named_modules())
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb" in name:
                continue
            local = name.removeprefix("model.")
            if local == "lm_head.weight" and self.lm_head is None:
                continue  # tied: the head reads the embedding matrix
            try:
                loaded.add(self._load_tensor(name, tensor, method, modules, params))
            except ValueError as exc:  # a shape that does not fit: name the tensor
                raise CorruptModelFileError(f"tensor {name}: {exc}") from exc
        missing = self._expected_names() - loaded
        if missing:
            raise CorruptModelFileError(f"the checkpoint lacks {len(missing)} tensors, e.g. "
                                        f"{sorted(missing)[:3]}")
        if self.arch.norm_weight_offset:
            for module in self.modules():
                if isinstance(module, RMSNorm):
                    module.weight.data += self.arch.norm_weight_offset
        for module_name, module in self.named_modules():
            if isinstance(module, MergedLinear):
                # the LM head stays as the checkpoint holds it (vLLM's convention, and its
                # accuracy matters most), except that "none" dequantizes it too
                head_method = (method if module_name != "lm_head" or method.name == "none"
                               else get_quant_method("auto"))
                module.finalize(module_name, head_method)
        if self.lm_head is None:
            self.embed_tokens.tie_head()  # now, so a quantized table is held once from the start
        # the native stack has no all-reduce between its layers: with TP the layers run in Python
        self.decode_stack = None if self.parallel.is_parallel else LlamaDecodeStack.build(self)

    def weight_report(self) -> dict[str, int]:
        """Bytes of weights by format ("gguf:Q4_1", "float32", ...): the start-up banner's line."""
        report: dict[str, int] = {}
        for module in self.modules():
            if isinstance(module, MergedLinear):
                key = module.op.describe()
                report[key] = report.get(key, 0) + module.op.nbytes()
        embed = self.embed_tokens
        key = embed.source or str(embed.dtype).removeprefix("torch.")
        report[key] = report.get(key, 0) + embed.nbytes()
        return report

    def _load_tensor(self, name: str, tensor: Any, method: QuantMethod,
                     modules: dict[str, nn.Module], params: dict[str, nn.Parameter]) -> str:
        """Put one checkpoint tensor in place; returns its load name (see ``_expected_names``)."""
        local = name.removeprefix("model.")
        if local == "embed_tokens.weight":
            # a quantized embedding stays so only when the head is tied to it and the method
            # keeps checkpoint formats; otherwise lookups want a dense table
            self.embed_tokens.load(tensor, keep_quantized=method.name == "auto"
                                   and self.lm_head is None)
            return local
        target = ("lm_head", "", "weight") if local == "lm_head.weight" else (
            self._fused_target(local))
        if target is not None:
            module_name, shard, kind = target
            modules[module_name].load_shard(shard, kind, tensor)
            return f"{module_name}.{shard}.{kind}"
        if local not in params:
            raise CorruptModelFileError(f"unexpected tensor {name} for a "
                                        f"{self.arch.architecture} model")
        if params[local].shape != tensor.shape:
            raise ValueError(f"shape {tuple(tensor.shape)}, expected "
                             f"{tuple(params[local].shape)}")
        params[local].data.copy_(tensor)
        return local

    def _fused_target(self, local: str) -> tuple[str, str, str] | None:
        prefix, _, kind = local.rpartition(".")
        layer_prefix, _, sub = prefix.partition(".")  # "layers", "N.self_attn.q_proj"
        index, _, module = sub.partition(".")
        if layer_prefix != "layers" or module not in _FUSED_SHARDS:
            return None
        fused, shard = _FUSED_SHARDS[module]
        return f"layers.{index}.{fused}", shard, kind

    def _expected_names(self) -> set[str]:
        """Every shard of the fused layer matrices and every other parameter, by load name."""
        names: set[str] = set()
        fused_params: set[str] = set()
        for module_name, module in self.named_modules():
            if isinstance(module, MergedLinear):
                kinds = ["weight"] + (["bias"] if module.bias is not None else [])
                for shard in module.shard_offsets:
                    names.update(f"{module_name}.{shard}.{kind}" for kind in kinds)
                fused_params.update(f"{module_name}.{kind}" for kind in kinds)
        names.update(n for n, _ in self.named_parameters() if n not in fused_params)
        names.add("embed_tokens.weight")
        return names
