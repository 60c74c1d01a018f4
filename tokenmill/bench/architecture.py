"""A model's architecture numbers and the arithmetic the planner needs from them.

The planner never loads weights: parameter counts, KV bytes per token and bytes read per decode step
all follow from a dozen integers. Those come from the catalog, a GGUF file's metadata (read with
``gguf.GGUFReader``, which maps the file and reads only the header) or an HF ``config.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tokenmill.errors import BenchError

# Nominal bytes per weight of each planning format, scales included: int4 holds 4-bit codes with
# a float16 scale and a float16 min per 32 inputs (5 bits, as GGUF Q4_1 and tokenmill's int4 at
# the default group size), int8 and fp8 add one scale per row (exact bytes: ``WeightFormat``).
BYTES_PER_PARAM: dict[str, float] = {
    "fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5 + 4 / 32,
}
DTYPE_ALIASES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "half": "fp16"}
DENSE_DTYPES = ("fp32", "bf16", "fp16")
# GGUF block types tokenmill keeps quantized (groups of 32: tokenmill/quant/gguf.py and
# gguf_kquants.py), the kernel that runs them and whether a group has a float16 min. Q4_0 is held
# like Q4_1 (its "- 8" becomes a float16 min): 5 bits per weight in memory, although the file
# stores 4.5; the 5-bit types take a byte per code.
GGUF_KEPT_TYPES: dict[str, tuple[str, bool]] = {
    "Q8_0": ("q8", False), "Q4_0": ("q4", True), "Q4_1": ("q4", True), "Q5_0": ("q8", False),
    "Q5_1": ("q8", True), "Q4_K": ("q4", True), "Q5_K": ("q8", True), "Q6_K": ("q8", False),
}


@dataclass(frozen=True)
class WeightFormat:
    """How one linear layer's matrix is held: its bytes and the kernel that multiplies by it.

    ``kernel`` names the measured kernel in a hardware profile: "fp32" / "bf16" / "fp16" (dense,
    ``F.linear``), "q4" (4-bit codes + float16 scale and min per group), "q8" (int8 codes + float16
    scale per group) or "fp8" (float8 codes + a float32 scale per row)."""

    name: str
    kernel: str
    group_size: int | None = None  # inputs per scale; None = one scale per row (or dense)
    bytes_per_weight: float | None = None  # a file's average (weights "as stored", no types known)
    has_min: bool | None = None  # q4 / q8: a float16 min per group (None: q4 has one, q8 not)

    def nbytes(self, in_features: int, out_features: int) -> float:
        weights = float(in_features * out_features)
        if self.bytes_per_weight is not None:
            return weights * self.bytes_per_weight
        if self.kernel in DENSE_DTYPES:
            return weights * BYTES_PER_PARAM[self.kernel]
        if self.kernel == "fp8":
            return weights + out_features * 4  # float32 scale per row
        has_min = self.kernel == "q4" if self.has_min is None else self.has_min
        return packed_bytes(in_features, out_features, 4 if self.kernel == "q4" else 8,
                            self.group_size, has_min=has_min)


def packed_bytes(in_features: int, out_features: int, bits: int, group_size: int | None,
                 has_min: bool) -> int:
    """Bytes of a ``QuantizedWeight`` in the native kernel's layout (``quant_matmul.pack``):
    tiles of 16 output rows, each holding its codes, float16 scales (and mins) and padding to a
    64-byte cache line. Q4_1 / Q4_0 blocks come to 5 bits per weight, Q8_0 to 8.5; int8 with one
    scale per row to 8 bits + 4 bytes per row (2 of them padding)."""
    groups = -(-in_features // group_size) if group_size else 1
    used = 16 * in_features * bits // 8 + groups * 16 * 2 * (2 if has_min else 1)
    return -(-out_features // 16) * (-(-used // 64) * 64)


def dense_format(dtype: str) -> WeightFormat:
    return WeightFormat(dtype, dtype)


def method_format(method: str, group_size: int = 32) -> WeightFormat:
    """The format ``--dtype method`` gives a decoder layer's linear (tokenmill's quantizers)."""
    if method in DENSE_DTYPES:
        return dense_format(method)
    if method == "int8":
        return WeightFormat("int8", "q8", None)  # per-channel: one float16 scale per row
    if method == "int4":
        return WeightFormat(f"int4/g{group_size}", "q4", group_size)
    if method == "fp8":
        return WeightFormat("fp8", "fp8", None)
    raise BenchError(f"unknown weight format {method!r}")


def gguf_format(type_name: str, compute_dtype: str) -> WeightFormat:
    """What tokenmill holds a GGUF tensor of ``type_name`` as (``--quantization auto``): kept
    block types as blocks, everything else dequantized to the compute dtype at load."""
    if type_name in GGUF_KEPT_TYPES:
        kernel, has_min = GGUF_KEPT_TYPES[type_name]
        return WeightFormat(f"gguf:{type_name}", kernel, 32, has_min=has_min)
    return dense_format(compute_dtype)


@dataclass(frozen=True)
class LinearLayer:
    """``count`` matrices of ``in_features`` x ``out_features`` in one format, run once each per
    decode step (tokenmill fuses q/k/v and gate/up, so they are one layer each)."""

    role: str  # "qkv", "o", "gate_up", "down", "lm_head", "router"
    count: int
    in_features: int
    out_features: int
    fmt: WeightFormat
    expert: bool = False  # MoE expert matrix: a step touches only some of them

    @property
    def nbytes_each(self) -> float:
        return self.fmt.nbytes(self.in_features, self.out_features)


@dataclass(frozen=True)
class WeightLayout:
    """Every weight of a model as tokenmill would hold it under one weight format."""

    linears: tuple[LinearLayer, ...]
    embedding_bytes: float  # an untied input embedding (a lookup table; 0 when tied to the head)
    other_bytes: float  # norms and biases, dense in the compute dtype
    description: str

    @property
    def linear_bytes(self) -> float:
        return sum(layer.count * layer.nbytes_each for layer in self.linears)

    @property
    def total_bytes(self) -> float:
        return self.linear_bytes + self.embedding_bytes + self.other_bytes

    def bytes_by_format(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for layer in self.linears:
            out[layer.fmt.name] = out.get(layer.fmt.name, 0.0) + layer.count * layer.nbytes_each
        return out


def normalize_dtype(name: str, *, what: str = "dtype") -> str:
    key = DTYPE_ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in BYTES_PER_PARAM:
        raise BenchError(f"{what}={name!r} is not known; choose one of "
                         f"{', '.join(BYTES_PER_PARAM)}")
    return key


@dataclass(frozen=True)
class ModelArch:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = False
    num_experts: int = 1
    num_experts_per_token: int = 1
    qkv_bias: bool = False
    max_context: int | None = None
    source: str = ""
    # Exact bytes of the weights as stored in a file (GGUF/safetensors); used when the user plans
    # the file as it is rather than re-quantized to a named dtype.
    file_weight_bytes: int | None = None
    file_dtype: str | None = None
    # (tensor name, GGUF type name) of every tensor of a GGUF file: what "as stored" holds.
    file_tensor_types: tuple[tuple[str, str], ...] | None = None

    # -- parameter counts ---------------------------------------------------------------------
    @property
    def attention_params_per_layer(self) -> int:
        q = self.hidden_size * self.num_heads * self.head_dim
        kv = 2 * self.hidden_size * self.num_kv_heads * self.head_dim
        o = self.num_heads * self.head_dim * self.hidden_size
        bias = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim if self.qkv_bias else 0
        return q + kv + o + bias

    @property
    def expert_params(self) -> int:
        """One SwiGLU MLP (gate, up, down); a dense model has exactly one of these per layer."""
        return 3 * self.hidden_size * self.intermediate_size

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 1

    @property
    def router_params_per_layer(self) -> int:
        return self.hidden_size * self.num_experts if self.is_moe else 0

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def num_params(self) -> int:
        per_layer = (self.attention_params_per_layer + self.num_experts * self.expert_params
                     + self.router_params_per_layer + 2 * self.hidden_size)
        heads = self.embedding_params * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + heads + self.hidden_size

    @property
    def num_active_params(self) -> int:
        """Parameters one token multiplies through (2 FLOPs each): top-k experts and the LM head."""
        per_layer = (self.attention_params_per_layer
                     + self.num_experts_per_token * self.expert_params
                     + self.router_params_per_layer)
        return self.num_layers * per_layer + self.embedding_params

    # -- weights as tokenmill holds them -------------------------------------------------------
    @property
    def other_params(self) -> int:
        """Norms and q/k/v biases: small vectors, held dense in the compute dtype."""
        bias = ((self.num_heads + 2 * self.num_kv_heads) * self.head_dim
                if self.qkv_bias else 0)
        return self.num_layers * (2 * self.hidden_size + bias) + self.hidden_size

    def _shapes(self) -> list[tuple[str, int, int, bool]]:
        """(role, in, out, is_expert) of each linear of one decoder layer, fused as tokenmill
        runs them (one q/k/v matrix, one gate/up matrix)."""
        q_size = self.num_heads * self.head_dim
        qkv = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        shapes = [("qkv", self.hidden_size, qkv, False), ("o", q_size, self.hidden_size, False),
                  ("gate_up", self.hidden_size, 2 * self.intermediate_size, self.is_moe),
                  ("down", self.intermediate_size, self.hidden_size, self.is_moe)]
        if self.is_moe:
            shapes.append(("router", self.hidden_size, self.num_experts, False))
        return shapes

    def _gguf_types(self) -> dict[str, str] | None:
        return dict(self.file_tensor_types) if self.file_tensor_types else None

    def weight_layout(self, dtype: str | None, compute_dtype: str | None = None,
                      group_size: int = 32) -> WeightLayout:
        """Every matrix under weight format ``dtype`` (None: as stored in the model file), held
        the way tokenmill holds it:

        * fp32 / bf16 / fp16 (``--quantization none``): everything dense in that dtype;
        * int8 / int4 / fp8 (``--quantization int8|int4|fp8``): the decoder layers' linears in
          that format; the embedding and a tied LM head dense in the compute dtype (a quantizer
          never touches them), an untied LM head as the checkpoint holds it;
        * as stored (``--quantization auto``) for a GGUF: each tensor by its type (the
          ``GGUF_KEPT_TYPES`` kept quantized, anything else dequantized to the compute dtype), a tied
          embedding/LM head at its own type; for other files, their average bytes per weight.
        """
        compute = compute_dtype or (dtype if dtype in DENSE_DTYPES else "bf16")
        dense_compute = dense_format(compute)
        types = self._gguf_types() if dtype is None else None
        if dtype is None and types is None:
            if self.file_weight_bytes is None:
                raise BenchError(f"model {self.name!r} has no file to take weight sizes from; "
                                 "pass --dtype")
            per_weight = self.file_weight_bytes / self.num_params
            guess = "fp32" if per_weight > 3 else "bf16" if per_weight > 1.5 else "fp8"
            stored = WeightFormat(f"as stored ({self.file_dtype or 'file'})", guess,
                                  bytes_per_weight=per_weight)
            return self._uniform_layout(stored, stored, per_weight, per_weight,
                                        f"as stored ({self.file_dtype or 'file'})")
        if dtype in DENSE_DTYPES:
            fmt = dense_format(dtype)
            per = BYTES_PER_PARAM[dtype]
            return self._uniform_layout(fmt, fmt, per, per, dtype)
        if dtype is not None:
            fmt = method_format(dtype, group_size)
            head = dense_compute
            if not self.tie_word_embeddings and self.file_tensor_types:
                head = self._file_format("output.weight", compute)
            return self._uniform_layout(fmt, head, BYTES_PER_PARAM[compute],
                                        BYTES_PER_PARAM[compute],
                                        f"{fmt.name} linears, compute {compute}")
        # as stored, GGUF: per tensor
        assert types is not None
        counts: dict[tuple[str, int, int, bool, WeightFormat], int] = {}
        for index in range(self.num_layers):
            for role, k, n, expert in self._shapes():
                fmt = self._layer_format(types, index, role, compute)
                key = (role, k, n, expert, fmt)
                counts[key] = counts.get(key, 0) + (self.num_experts if expert else 1)
        linears = [LinearLayer(role, count, k, n, fmt, expert)
                   for (role, k, n, expert, fmt), count in counts.items()]
        embed_fmt = self._file_format("token_embd.weight", compute)
        if self.tie_word_embeddings:
            linears.append(LinearLayer("lm_head", 1, self.hidden_size, self.vocab_size,
                                       embed_fmt))
            embedding = 0.0
        else:
            linears.append(LinearLayer("lm_head", 1, self.hidden_size, self.vocab_size,
                                       self._file_format("output.weight", compute)))
            embedding = self.embedding_params * BYTES_PER_PARAM[compute]  # a dense lookup table
        kinds = sorted({layer.fmt.name for layer in linears})
        return WeightLayout(tuple(linears), embedding,
                            self.other_params * BYTES_PER_PARAM[compute],
                            f"as stored ({' + '.join(kinds)}), compute {compute}")

    def _file_format(self, tensor: str, compute: str) -> WeightFormat:
        types = self._gguf_types() or {}
        return gguf_format(types.get(tensor, ""), compute)

    def _layer_format(self, types: dict[str, str], index: int, role: str,
                      compute: str) -> WeightFormat:
        names = {"qkv": ("attn_q", "attn_k", "attn_v"), "o": ("attn_output",),
                 "gate_up": ("ffn_gate", "ffn_up"), "down": ("ffn_down",),
                 "router": ("ffn_gate_inp",)}[role]
        found = set()
        for name in names:
            type_name = (types.get(f"blk.{index}.{name}.weight")
                         or types.get(f"blk.{index}.{name}_exps.weight", ""))
            found.add(type_name)
        if role == "router":
            return dense_format(compute)
        if len(found) == 1:
            return gguf_format(found.pop(), compute)
        formats = [gguf_format(type_name, compute) for type_name in sorted(found)]
        if all(fmt.kernel in ("q4", "q8") for fmt in formats):
            # kept shards of different types are fused as 8-bit codes (quant.weight.widened_to_match)
            return WeightFormat("gguf:" + "+".join(sorted(found)), "q8", 32,
                                has_min=any(fmt.has_min for fmt in formats))
        # shards of which one is dequantized are stacked into one dense matrix at load
        return dense_format(compute)

    def _uniform_layout(self, fmt: WeightFormat, head: WeightFormat, embed_bytes: float,
                        other_bytes: float, description: str) -> WeightLayout:
        linears = []
        for role, k, n, expert in self._shapes():
            count = self.num_layers * (self.num_experts if expert else 1)
            layer_fmt = fmt if role != "router" else dense_format(
                fmt.kernel if fmt.kernel in DENSE_DTYPES else "bf16")
            linears.append(LinearLayer(role, count, k, n, layer_fmt, expert))
        linears.append(LinearLayer("lm_head", 1, self.hidden_size, self.vocab_size, head))
        embedding = 0.0 if self.tie_word_embeddings else self.embedding_params * embed_bytes
        return WeightLayout(tuple(linears), embedding, self.other_params * other_bytes,
                            description)

    def weight_bytes(self, dtype: str | None, group_size: int = 32,
                     compute_dtype: str | None = None) -> float:
        """All weights in format ``dtype`` (see ``weight_layout``); ``None`` = as stored."""
        if dtype is None and not self.file_tensor_types:
            if self.file_weight_bytes is None:
                raise BenchError(f"model {self.name!r} has no file to take weight sizes from; "
                                 "pass --dtype")
            return float(self.file_weight_bytes)
        return self.weight_layout(dtype, compute_dtype, group_size).total_bytes

    def experts_touched(self, batch_size: int) -> float:
        """Expected distinct experts a batch of B tokens routes to per layer (uniform routing)."""
        return self.num_experts * (
            1 - (1 - self.num_experts_per_token / self.num_experts) ** max(batch_size, 1))

    def kv_bytes_per_token(self, kv_dtype: str) -> float:
        """K and V for every layer: 2 × layers × kv_heads × head_dim × bytes."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * BYTES_PER_PARAM[kv_dtype]

    def decode_weight_bytes_read(self, dtype: str | None, batch_size: int,
                                 group_size: int = 32, compute_dtype: str | None = None) -> float:
        """Weight bytes one decode step reads for ``batch_size`` sequences.

        The input embedding is a row lookup, so an untied table is not streamed. For MoE, a batch
        of B tokens routes to an expected ``E · (1 - (1 - k/E)^B)`` distinct experts (uniform
        routing), which is why MoE decode gets dearer per step as the batch grows.
        """
        layout = self.weight_layout(dtype, compute_dtype, group_size)
        touched = self.experts_touched(batch_size) / self.num_experts if self.is_moe else 1.0
        read = sum(layer.count * layer.nbytes_each * (touched if layer.expert else 1.0)
                   for layer in layout.linears)
        return read + layout.other_bytes

    def attention_flops_per_token(self, context_len: int) -> float:
        """QKᵀ and PV for one new token attending to ``context_len`` earlier ones."""
        return 4.0 * self.num_layers * self.num_heads * self.head_dim * context_len


# -- reading architecture numbers from files ----------------------------------------------------
def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    value = field.contents()
    if isinstance(value, list):  # per-layer arrays (e.g. head_count_kv on some models)
        return max(value) if value else None
    return value


def arch_from_gguf(path: Path) -> ModelArch:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # gguf raises ValueError/struct.error/... on a bad header
        raise BenchError(f"cannot read GGUF metadata from {path}: {exc}") from exc
    arch = _field(reader, "general.architecture")
    if not arch:
        raise BenchError(f"{path} has no general.architecture field; is it a GGUF model file?")

    def need(suffix: str) -> int:
        value = _field(reader, f"{arch}.{suffix}")
        if value is None:
            raise BenchError(f"{path} lacks GGUF field {arch}.{suffix}; cannot plan this model")
        return int(value)

    hidden = need("embedding_length")
    num_heads = need("attention.head_count")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = _field(reader, f"{arch}.vocab_size") or (len(tokens.data) if tokens else None)
    if vocab is None:
        raise BenchError(f"{path} records no vocabulary size")
    tensor_names = {t.name for t in reader.tensors}
    file_type = _field(reader, "general.file_type")
    return ModelArch(
        name=str(_field(reader, "general.name") or path.stem),
        num_layers=need("block_count"),
        hidden_size=hidden,
        num_heads=num_heads,
        num_kv_heads=int(_field(reader, f"{arch}.attention.head_count_kv") or num_heads),
        head_dim=int(_field(reader, f"{arch}.attention.key_length") or hidden // num_heads),
        intermediate_size=need("feed_forward_length"),
        vocab_size=int(vocab),
        tie_word_embeddings="output.weight" not in tensor_names,
        num_experts=int(_field(reader, f"{arch}.expert_count") or 1),
        num_experts_per_token=int(_field(reader, f"{arch}.expert_used_count") or 1),
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        max_context=_field(reader, f"{arch}.context_length"),
        source=f"GGUF metadata of {path}",
        file_weight_bytes=sum(int(t.n_bytes) for t in reader.tensors),
        file_dtype=f"gguf file_type {file_type}" if file_type is not None else "gguf",
        file_tensor_types=tuple((t.name, t.tensor_type.name) for t in reader.tensors),
    )


def arch_from_hf_folder(folder: Path) -> ModelArch:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise BenchError(f"{folder} has no config.json; pass a GGUF file, an HF model folder or "
                         "a catalog name")
    try:
        cfg = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BenchError(f"cannot read {config_path}: {exc}") from exc
    cfg = cfg.get("text_config", cfg)  # multimodal configs nest the language model's numbers
    try:
        hidden = int(cfg["hidden_size"])
        num_heads = int(cfg["num_attention_heads"])
        arch = ModelArch(
            name=folder.name,
            num_layers=int(cfg["num_hidden_layers"]),
            hidden_size=hidden,
            num_heads=num_heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or num_heads),
            head_dim=int(cfg.get("head_dim") or hidden // num_heads),
            intermediate_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            num_experts=int(cfg.get("num_local_experts") or cfg.get("num_experts") or 1),
            num_experts_per_token=int(cfg.get("num_experts_per_tok") or 1),
            qkv_bias=bool(cfg.get("attention_bias", cfg.get("model_type") == "qwen2")),
            max_context=cfg.get("max_position_embeddings"),
            source=f"config.json of {folder}",
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BenchError(f"{config_path} lacks a usable field: {exc}") from exc
    shard_bytes = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    if shard_bytes:
        arch = replace(arch, file_weight_bytes=shard_bytes, file_dtype="safetensors")
    return arch
