"""Planner arithmetic against numbers worked out by hand in each test."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from tokenmill.bench.architecture import arch_from_hf_folder
from tokenmill.bench.catalog import HARDWARE, builtin_model_path, find_hardware, find_model
from tokenmill.bench.plan import PlanInputs, plan
from tokenmill.errors import BenchError

H100 = HARDWARE["h100-80gb"]


def test_llama3_8b_bf16_kv_and_weights() -> None:
    arch = find_model("Llama-3-8B")
    # 2 (K and V) x 32 layers x 8 kv-heads x 128 dims x 2 bytes = 131072 B = 128 KiB per token.
    assert arch.kv_bytes_per_token("bf16") == 2 * 32 * 8 * 128 * 2 == 128 * 1024
    # Per layer: q 4096², k,v 4096x1024 each, o 4096², MLP 3x4096x14336, 2 norms of 4096;
    # plus untied embedding and LM head 2x128256x4096 and a final norm.
    per_layer = 4096 * 4096 * 2 + 2 * 4096 * 1024 + 3 * 4096 * 14336 + 2 * 4096
    params = 32 * per_layer + 2 * 128256 * 4096 + 4096
    assert arch.num_params == params == 8_030_261_248
    result = plan(PlanInputs(arch, H100, "bf16", "bf16", context_p50=2048, context_p95=8192))
    assert result.weight_bytes == pytest.approx(16.06e9, rel=1e-3)  # "≈ 16 GB"
    assert result.fits
    # 0.9 x 80 GB usable, minus weights, divided by 128 KiB per token.
    capacity = int((0.9 * 80e9 - params * 2) // 131072)
    assert result.kv_capacity_tokens == capacity
    assert result.concurrent_at_p50 == capacity // 2048
    assert result.concurrent_at_p95 == capacity // 8192


def test_decode_roofline_batch_one_is_weights_plus_kv_over_bandwidth() -> None:
    arch = find_model("Llama-3-8B")
    result = plan(PlanInputs(arch, H100, "bf16", "bf16", batch_size=1, context_p50=1000,
                             context_p95=1000))
    # One step reads every weight except the untied input embedding (a row lookup), plus the
    # sequence's KV: 1000 tokens x 128 KiB.
    bytes_read = (8_030_261_248 - 128256 * 4096) * 2 + 1000 * 131072
    assert result.decode_bound == "memory"
    assert result.decode_step_seconds == pytest.approx(bytes_read / 3.35e12, rel=1e-9)
    assert result.decode_tokens_per_s == pytest.approx(3.35e12 / bytes_read, rel=1e-9)


def test_llama3_70b_bf16_needs_two_h100s() -> None:
    arch = find_model("meta-llama/Meta-Llama-3-70B")
    assert arch.num_params == pytest.approx(70.55e9, rel=1e-3)
    one = plan(PlanInputs(arch, H100, "bf16", "bf16", tp=1))
    assert not one.fits
    # ~141 GB of weights plus one p95 request (8192 x 320 KiB) against 72 GB usable.
    expected_short = arch.num_params * 2 + 8192 * 327680 - 0.9 * 80e9
    assert one.shortfall_bytes_per_device == pytest.approx(expected_short)
    assert one.smallest_fitting_tp == 2
    assert one.smallest_fitting_weight_dtype == "int4"  # fp8/int8 at 70.6 GB + KV still too big
    assert one.dollars_per_million_output_tokens is None
    two = plan(PlanInputs(arch, H100, "bf16", "bf16", tp=2))
    assert two.fits
    # Each rank holds half the weights and 4 of the 8 KV heads: 160 KiB per token.
    assert two.weight_bytes_per_device == pytest.approx(arch.num_params)
    assert two.kv_bytes_per_token_per_device == 2 * 80 * 4 * 128 * 2


def test_tp_beyond_kv_heads_replicates_them() -> None:
    arch = find_model("Qwen2.5-7B")  # 4 KV heads
    r8 = plan(PlanInputs(arch, H100, "bf16", "bf16", tp=4))
    assert r8.kv_bytes_per_token_per_device == 2 * 28 * 1 * 128 * 2
    with pytest.raises(BenchError, match="does not divide the 28 attention heads"):
        PlanInputs(arch, H100, tp=8)


def test_mixtral_moe_counts_and_expert_reads() -> None:
    arch = find_model("mixtral-8x7b")
    assert arch.num_params == pytest.approx(46.70e9, rel=1e-3)
    # Per token: attention, 2 of 8 expert MLPs and the router in each layer, then the LM head
    # (Mistral's "12.9B active" also counts the input embedding, which is a lookup, not a matmul).
    attn = 4096 * 4096 * 2 + 2 * 4096 * 1024
    active = 32 * (attn + 2 * 3 * 4096 * 14336 + 4096 * 8) + 32000 * 4096
    assert arch.num_active_params == active == pytest.approx(12.75e9, rel=1e-3)
    expert_bytes = 3 * 4096 * 14336 * 2
    full = arch.decode_weight_bytes_read("bf16", 1000)
    one = arch.decode_weight_bytes_read("bf16", 1)
    # Batch 1 touches 2 of 8 experts per layer: 6 x 32 expert MLPs are never read.
    assert full - one == pytest.approx(6 * 32 * expert_bytes, rel=1e-6)


def test_price_scales_cost_per_token() -> None:
    arch = find_model("Llama-3-8B")
    r = plan(PlanInputs(arch, H100, "bf16", "bf16", price_per_hour=3.6))
    # $3.6/h = $0.001/s; at T tokens/s a million tokens cost 1e6/T x $0.001.
    assert r.dollars_per_million_output_tokens == pytest.approx(1000.0 / r.decode_tokens_per_s)
    assert not r.price_is_example
    example = plan(PlanInputs(arch, H100, "bf16", "bf16"))
    assert example.price_is_example and example.price_per_hour_total == H100.example_price_per_hour


def test_builtin_gguf_matches_catalog_numbers() -> None:
    path = builtin_model_path()
    assert path is not None
    from_file = find_model(str(path))
    catalog = find_model("SmolLM2-135M")
    assert from_file.num_params == catalog.num_params == 134_515_008
    assert from_file.kv_bytes_per_token("bf16") == 2 * 30 * 3 * 64 * 2
    assert from_file.tie_word_embeddings
    # Tensor bytes are the file minus its header (the tokenizer vocabulary is ~2 MB of it).
    assert from_file.file_weight_bytes == pytest.approx(path.stat().st_size, rel=0.03)
    assert find_model(None).num_params == catalog.num_params


def test_hf_folder_config(tmp_path) -> None:
    config = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
              "num_key_value_heads": 2, "intermediate_size": 128, "vocab_size": 100,
              "tie_word_embeddings": True, "max_position_embeddings": 512}
    (tmp_path / "config.json").write_text(json.dumps(config))
    arch = arch_from_hf_folder(tmp_path)
    per_layer = 64 * 64 * 2 + 2 * 64 * 32 + 3 * 64 * 128 + 2 * 64
    assert arch.num_params == 2 * per_layer + 100 * 64 + 64
    assert arch.kv_bytes_per_token("fp32") == 2 * 2 * 2 * 16 * 4


@pytest.mark.parametrize("changes, message", [
    ({"price_per_hour": -1.0}, "price-per-hour"),
    ({"context_p50": 9000, "context_p95": 100}, "p50"),
    ({"tp": 0}, "--tp"),
    ({"memory_utilization": 1.5}, "memory-utilization"),
])
def test_bad_plan_inputs(changes: dict, message: str) -> None:
    base = PlanInputs(find_model("Llama-3-8B"), H100)
    with pytest.raises(BenchError, match=message):
        replace(base, **changes)


def test_unknown_names_list_choices() -> None:
    with pytest.raises(BenchError, match="h100-80gb"):
        find_hardware("B200")
    with pytest.raises(BenchError, match="Llama-3-8B"):
        find_model("gpt-5")


def test_plan_cli_compares_devices_and_says_what_fits(run_cli) -> None:
    code, out, _ = run_cli("plan", "--model", "Llama-3-70B", "--hardware", "h100,h200,a100-40gb",
                           "--json")
    assert code == 0
    rows = {r["hardware"]: r for r in json.loads(out)}
    assert set(rows) == {"H100 80GB SXM", "H200 141GB SXM", "A100 40GB SXM"}
    assert not rows["H100 80GB SXM"]["fits"]
    assert rows["H100 80GB SXM"]["smallest_fitting_tp"] == 2
    assert rows["A100 40GB SXM"]["smallest_fitting_tp"] == 4
    code, out, _ = run_cli("plan", "--model", "Llama-3-70B", "--hardware", "h100")
    assert code == 0 and "DOES NOT FIT" in out and "TP 2 fits" in out


def test_plan_cli_bad_input_is_one_line(run_cli) -> None:
    code, _, err = run_cli("plan", "--model", "Llama-3-8B", "--price-per-hour", "-2")
    assert code == 1
    assert err.strip().splitlines() == ["tokenmill: error: --price-per-hour=-2.0 must be >= 0"]
    code, _, err = run_cli("plan", "--model", "Llama-3-8B", "--dtype", "int3")
    assert code == 1 and "int3" in err and "int4" in err


def test_cpu_decode_step_adds_memory_and_compute_time():
    """On a CPU profile the step is memory time + compute time; on a GPU, the larger of them."""
    from tokenmill.bench.catalog import find_model
    from tokenmill.bench.hardware import HardwareSpec
    from tokenmill.bench.plan import PlanInputs, decode_step

    arch = find_model("SmolLM2-135M")
    cpu = HardwareSpec("cpu", "a CPU", 24e9, 10e9, {"fp32": 100e9}, "test",
                       extra={"device": "cpu"})
    gpu = HardwareSpec("gpu", "a GPU", 24e9, 10e9, {"fp32": 100e9}, "test",
                       extra={"device": "cuda"})
    batch, context = 16, 256
    times = {}
    for hw in (cpu, gpu):
        inputs = PlanInputs(arch=arch, hardware=hw, weight_dtype="fp32", kv_dtype="fp32")
        times[hw.key], _ = decode_step(inputs, batch, context)
    kv_bytes = 2 * arch.num_layers * arch.num_kv_heads * arch.head_dim * 4
    memory = (arch.decode_weight_bytes_read("fp32", batch) + batch * context * kv_bytes) / 10e9
    compute = batch * (2.0 * arch.num_active_params
                       + arch.attention_flops_per_token(context)) / 100e9
    assert times["cpu"] == pytest.approx(memory + compute, rel=1e-9)
    assert times["gpu"] == pytest.approx(max(memory, compute), rel=1e-9)
