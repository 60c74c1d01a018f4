"""Mixture-of-Experts decoders: Mixtral, Qwen2-MoE, Qwen3-MoE.

They are Llama-family decoders whose MLP is, in the sparse layers, a ``SparseMoeBlock``; what differs
between the families is data (``ArchConfig.moe``: top-k renormalization, a shared expert, dense
layers) and, for Qwen3-MoE, Qwen3's attention (q/k RMSNorm). Everything else — attention, norms,
the residual stream, the LM head, quantized dense layers — is ``LlamaForCausalLM``'s.

Checkpoint names understood for the sparse layers (``model.`` prefix optional):

* router: ``layers.N.mlp.gate.weight`` (Mixtral: ``layers.N.block_sparse_moe.gate.weight``);
* experts, one matrix each: ``layers.N.mlp.experts.E.{gate,up,down}_proj.weight`` (Qwen) or
  ``layers.N.block_sparse_moe.experts.E.{w1,w3,w2}.weight`` (Mixtral);
* experts stacked: ``layers.N.mlp.experts.gate_up_proj`` ``[E, 2I, H]`` and ``.down_proj``
  ``[E, H, I]`` (transformers' fused layout), or ``.gate_proj``/``.up_proj`` ``[E, I, H]`` each
  (what the GGUF loader yields for dequantized ``ffn_{gate,up,down}_exps``; their Q8_0/Q4_0/Q4_1
  blocks come per expert instead, as ``experts.E.gate_proj.weight`` ...);
* Qwen2-MoE's ``layers.N.mlp.shared_expert.{gate,up,down}_proj.weight`` and
  ``layers.N.mlp.shared_expert_gate.weight``.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from tokenmill.distributed.parallel_state import ParallelContext
from tokenmill.errors import CorruptModelFileError
from tokenmill.models.arch_config import ArchConfig
from tokenmill.models.llama import LlamaForCausalLM
from tokenmill.models.moe_block import SparseMoeBlock
from tokenmill.models.moe_stats import ExpertLoad, ExpertRoutingCounter
from tokenmill.quant.registry import QuantMethod

_EXPERT = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(?:(\d+)\.)?"
                     r"(w1|w2|w3|gate_proj|up_proj|down_proj|gate_up_proj)(?:\.weight)?$")
_EXPERT_PART = {"w1": "gate", "gate_proj": "gate", "w3": "up", "up_proj": "up", "w2": "down",
                "down_proj": "down", "gate_up_proj": "gate_up"}
_MIXTRAL_PROJECTIONS = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_SPARSE_PARAM = re.compile(r"^layers\.(\d+)\.mlp\.(gate\.weight|shared_expert_gate\.weight)$")
_SHARED_EXPERT = re.compile(r"^layers\.(\d+)\.mlp\.shared_expert\.(gate|up|down)_proj\.(\w+)$")


class MoeForCausalLM(LlamaForCausalLM):
    def __init__(self, arch: ArchConfig, dtype: torch.dtype, device: torch.device | str,
                 max_positions: int | None = None, parallel: ParallelContext | None = None):
        if arch.moe is None:
            raise CorruptModelFileError(f"a {arch.architecture} model needs its expert counts")
        super().__init__(arch, dtype, device, max_positions=max_positions, parallel=parallel)
        sparse_ids = [i for i in range(arch.num_hidden_layers) if arch.moe.is_sparse(i)]
        self.routing = ExpertRoutingCounter(sparse_ids, arch.moe.num_experts,
                                            arch.moe.num_experts_per_tok, device)
        for position, index in enumerate(sparse_ids):
            block = SparseMoeBlock(arch, dtype, device, self.parallel)
            block.experts.routed_tokens = self.routing.row(position)
            self.layers[index].mlp = block  # replaces a dense MLP that never held weights
        self._mixtral_named: set[int] = set()  # layers whose experts came as experts.E.w1 ...

    def expert_load(self) -> ExpertLoad:
        """Routed-token counters and the load-imbalance figure, as plain data (for /metrics)."""
        return self.routing.snapshot()

    def _load_tensor(self, name: str, tensor: Any, method: QuantMethod,
                     modules: dict[str, nn.Module], params: dict[str, nn.Parameter]) -> str:
        local = name.removeprefix("model.").replace(".block_sparse_moe.", ".mlp.")
        expert = _EXPERT.match(local)
        sparse_param = _SPARSE_PARAM.match(local)
        if expert is not None or sparse_param is not None:
            layer_index = int((expert or sparse_param).group(1))
            block = self._sparse_block(layer_index, name)
            if expert is not None:
                index = expert.group(2)
                if expert.group(3) in _MIXTRAL_PROJECTIONS:
                    self._mixtral_named.add(layer_index)
                block.experts.load(_EXPERT_PART[expert.group(3)],
                                   None if index is None else int(index), tensor)
                return f"layers.{layer_index}.mlp.experts"  # checked in _expected_names
            if sparse_param.group(2) == "gate.weight":
                block.gate.load(tensor)
                return f"layers.{layer_index}.mlp.gate.weight"
            block.load_shared_expert_gate(tensor)
            return f"layers.{layer_index}.mlp.shared_expert_gate"
        target = self._fused_target(local)
        if target is not None and target[0] not in modules:
            raise CorruptModelFileError(f"unexpected tensor {name}: layer "
                                        f"{local.split('.')[1]} is not built that way in this "
                                        f"{self.arch.architecture} config")
        return super()._load_tensor(name.replace(".block_sparse_moe.", ".mlp."), tensor, method,
                                    modules, params)

    def _fused_target(self, local: str) -> tuple[str, str, str] | None:
        shared = _SHARED_EXPERT.match(local)
        if shared is None:
            return super()._fused_target(local)
        index, projection, kind = shared.groups()
        module = "down_proj" if projection == "down" else "gate_up_proj"
        return (f"layers.{index}.mlp.shared_expert.{module}",
                "" if projection == "down" else projection, kind)

    def _checkpoint_name(self, layer_index: int, load_name: str) -> str:
        """``"3.down_proj"`` as the checkpoint would have named it."""
        expert, projection = load_name.split(".")
        if layer_index in self._mixtral_named:
            mixtral = {v: k for k, v in _MIXTRAL_PROJECTIONS.items()}[projection]
            return f"model.layers.{layer_index}.block_sparse_moe.experts.{expert}.{mixtral}.weight"
        return f"model.layers.{layer_index}.mlp.experts.{expert}.{projection}.weight"

    def _sparse_block(self, layer_index: int, name: str) -> SparseMoeBlock:
        block = (self.layers[layer_index].mlp if layer_index < len(self.layers) else None)
        if not isinstance(block, SparseMoeBlock):
            raise CorruptModelFileError(
                f"unexpected tensor {name}: layer {layer_index} is not a sparse (MoE) layer in "
                f"this {self.arch.architecture} config")
        return block

    def _expected_names(self) -> set[str]:
        """Called once every tensor is in, before the layers are finalized: the experts are
        checked here, and a missing one is named as the checkpoint would name it."""
        for index, layer in enumerate(self.layers):
            if isinstance(layer.mlp, SparseMoeBlock):
                missing = layer.mlp.experts.missing_load_names()
                if missing:
                    raise CorruptModelFileError(
                        f"the checkpoint lacks {len(missing)} expert tensors of layer {index}, "
                        f"e.g. {self._checkpoint_name(index, missing[0])}")
        return {name for name in super()._expected_names() if ".mlp.experts." not in name}
