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


# -- weight formats as tokenmill holds them ------------------------------------------------------
@pytest.mark.parametrize(("quantization", "dtype", "plan_format"), [
    ("auto", "float32", None),  # the GGUF's Q4_1 layers and Q8_0 tied embedding, as stored
    ("none", "float32", "fp32"),
    ("int8", "float32", "int8"),  # per-channel codes; the tied embedding/head stay dense
])
def test_builtin_weight_bytes_match_the_loaded_model(quantization, dtype, plan_format) -> None:
    import torch

    from tokenmill.loader.model_source import open_model_source
    from tokenmill.models.registry import build_model

    model = build_model(open_model_source(None), getattr(torch, dtype), "cpu",
                        quantization=quantization)
    loaded = model.weight_report()
    layout = find_model(None).weight_layout(plan_format, "fp32")
    names = {"float32": "fp32"}
    assert {names.get(k, k): v for k, v in loaded.items()} == pytest.approx(
        layout.bytes_by_format(), rel=1e-9)
    assert layout.embedding_bytes == 0  # tied: the head is the embedding matrix
    if quantization == "auto":
        # as stored: the file's tensors (Q4_1 5.0 and Q8_0 8.5 bits per weight) plus 61 F32 norms
        path = builtin_model_path()
        arch = find_model(str(path))
        assert loaded == {"gguf:Q4_1": 66_355_200, "gguf:Q8_0": 30_081_024}
        assert arch.file_weight_bytes == sum(loaded.values()) + 61 * 576 * 4
        assert loaded["gguf:Q8_0"] == 49152 * 576 * 34 / 32


def test_formats_bits_per_weight() -> None:
    from tokenmill.bench.architecture import WeightFormat, gguf_format, method_format

    k, n = 4096, 4096
    bits = {name: fmt.nbytes(k, n) * 8 / (k * n) for name, fmt in {
        "q4_1": gguf_format("Q4_1", "bf16"), "q4_0": gguf_format("Q4_0", "bf16"),
        "q8_0": gguf_format("Q8_0", "bf16"), "int4/32": method_format("int4", 32),
        "int4/128": method_format("int4", 128), "fp32": method_format("fp32"),
        "bf16": method_format("bf16")}.items()}
    # Q4_0's "- 8" is held as a float16 min, so in memory it is Q4_1's 5 bits, not the file's 4.5
    assert bits == {"q4_1": 5.0, "q4_0": 5.0, "q8_0": 8.5, "int4/32": 5.0, "int4/128": 4.25,
                    "fp32": 32.0, "bf16": 16.0}
    # int8 per-channel and fp8: 1 byte per weight + 4 bytes per row (fp16 scale + tile padding
    # for int8, float32 scale for fp8)
    assert method_format("int8").nbytes(k, n) == k * n + 4 * n
    assert method_format("fp8").nbytes(k, n) == k * n + 4 * n
    assert gguf_format("Q3_K", "bf16") == WeightFormat("bf16", "bf16")  # dequantized at load
    # converted at load: Q4_K like Q4_1, Q6_K and Q5_0 like Q8_0, Q5_1 / Q5_K with a min as well
    assert {t: gguf_format(t, "bf16").nbytes(k, n) * 8 / (k * n)
            for t in ("Q4_K", "Q6_K", "Q5_0", "Q5_1", "Q5_K")} == {
        "Q4_K": 5.0, "Q6_K": 8.5, "Q5_0": 8.5, "Q5_1": 9.0, "Q5_K": 9.0}


def test_quantized_methods_keep_embedding_and_head_dense() -> None:
    arch = find_model("Llama-3-8B")  # untied: embedding (a lookup) and head stay bf16
    layout = arch.weight_layout("int4", "bf16", group_size=128)
    head = next(layer for layer in layout.linears if layer.role == "lm_head")
    assert head.fmt.kernel == "bf16"
    assert layout.embedding_bytes == 128256 * 4096 * 2
    per_layer = 4096 * 6144 + 4096 * 4096 + 4096 * 2 * 14336 + 14336 * 4096
    quantized = layout.linear_bytes - head.nbytes_each
    assert quantized == pytest.approx(32 * per_layer * 4.25 / 8, rel=1e-3)


# -- decode time from a measured profile -------------------------------------------------------
def _synthetic_profile(**overrides):
    """A made-up decode profile: round numbers so each test can add them up by hand."""
    from tokenmill.bench.hardware import DecodeProfile, HardwareSpec, KernelTable, OverheadTable

    rows = (1, 4, 16)

    def table(per_shape: dict[str, tuple[float, ...]], act: str = "bf16", group=None):
        return KernelTable(rows, per_shape, {"call_s": 5e-6, "bytes_per_s": 20e9,
                                             "flops_per_s": 200e9}, act, group)

    builtin = {"576x960": (10e-6, 20e-6, 60e-6), "576x576": (8e-6, 12e-6, 40e-6),
               "576x3072": (30e-6, 50e-6, 150e-6), "1536x576": (16e-6, 30e-6, 90e-6),
               "576x49152": (1e-3, 1.5e-3, 3e-3)}
    kernels = {"q4": table(builtin, group=32), "q8": table(builtin, group=32),
               "bf16": table({s: tuple(4 * v for v in vals) for s, vals in builtin.items()}),
               "fp32": table({s: tuple(8 * v for v in vals) for s, vals in builtin.items()},
                             "fp32")}
    overhead = OverheadTable(batches=(1, 4, 16), contexts=(100, 300),
                             layer_s=((100e-6, 200e-6), (150e-6, 350e-6), (300e-6, 900e-6)),
                             step_s=(1e-3, 2e-3, 4e-3), kv_bytes_per_token_per_layer=768.0)
    decode = DecodeProfile(kernels, {"bf16/quantized": overhead, **overrides}, auto_dtype="bf16",
                           threads=2)
    return HardwareSpec("this-machine", "this machine: test", 16e9, 10e9,
                        {"fp32": 100e9, "bf16": 400e9}, "synthetic", measured=True,
                        extra={"device": "cpu"}, decode=decode)


def test_measured_profile_sums_kernel_times_and_overheads() -> None:
    hw = _synthetic_profile()
    arch = find_model(None)
    result = plan(PlanInputs(arch, hw, None, "bf16", batch_size=4, context_p50=200,
                             context_p95=200))
    assert result.decode_bound == "measured"
    # 30 layers x (qkv + o + gate_up + down at M=4) + the Q8_0 head at M=4
    linears = 30 * (20e-6 + 12e-6 + 50e-6 + 30e-6) + 1.5e-3
    # per-layer overhead at B=4 is linear in the context: 150 us at 100, 350 us at 300
    layers = 30 * 250e-6
    assert result.decode_breakdown == pytest.approx(
        {"linears": linears, "layers": layers, "step": 2e-3})
    assert result.decode_step_seconds == pytest.approx(linears + layers + 2e-3)
    assert result.decode_tokens_per_s == pytest.approx(4 / (linears + layers + 2e-3))

    # batch 8 lies between the measured 4 and 16: kernels and overheads interpolate linearly
    step8, _ = decode_step_of(arch, hw, None, 8, 100)
    kernels8 = (30 * sum(a + (b - a) * 4 / 12 for a, b in
                         ((20e-6, 60e-6), (12e-6, 40e-6), (50e-6, 150e-6), (30e-6, 90e-6)))
                + 1.5e-3 + (3e-3 - 1.5e-3) * 4 / 12)
    overhead8 = 30 * (150e-6 + (300e-6 - 150e-6) * 4 / 12) + 2e-3 + 2e-3 * 4 / 12
    assert step8 == pytest.approx(kernels8 + overhead8)

    # dense fp32 uses the fp32 table; with no fp32 overhead measured, the default's stands in
    fp32 = plan(PlanInputs(arch, hw, "fp32", "fp32", batch_size=1, context_p50=100,
                           context_p95=100))
    assert fp32.decode_breakdown["linears"] == pytest.approx(
        8 * (30 * (10e-6 + 8e-6 + 30e-6 + 16e-6) + 1e-3))
    # ... with its context part (0.5 us per token at B=1) doubled: fp32 KV is twice the bytes
    assert fp32.decode_breakdown["layers"] == pytest.approx(30 * (50e-6 + 0.5e-6 * 2 * 100))


def decode_step_of(arch, hw, dtype, batch, context):
    from tokenmill.bench.plan import decode_step

    return decode_step(PlanInputs(arch, hw, dtype, "bf16", batch_size=batch,
                                  context_p50=context, context_p95=context), batch, context)


def test_measured_profile_picks_the_overhead_of_the_configuration() -> None:
    from tokenmill.bench.hardware import OverheadTable

    fp32_overhead = OverheadTable((1,), (100,), ((1e-3,),), (5e-3,), 1536.0)
    hw = _synthetic_profile(fp32=fp32_overhead)
    result = plan(PlanInputs(find_model(None), hw, "fp32", "fp32", batch_size=1,
                             context_p50=100, context_p95=100))
    assert result.decode_breakdown["layers"] == pytest.approx(30 * 1e-3)
    assert result.decode_breakdown["step"] == pytest.approx(5e-3)


def test_unmeasured_shapes_use_the_fit() -> None:
    """Llama-3-8B's shapes were not measured: each linear costs call + bytes/bw + FLOPs/rate."""
    from tokenmill.bench.architecture import packed_bytes

    hw = _synthetic_profile()
    arch = find_model("Llama-3-8B")
    result = plan(PlanInputs(arch, hw, "int4", "bf16", batch_size=1, context_p50=300,
                             context_p95=300))

    def fit(k: int, n: int, nbytes: float) -> float:
        return 5e-6 + nbytes / 20e9 + 2.0 * k * n / 200e9

    shapes = [(4096, 6144), (4096, 4096), (4096, 28672), (14336, 4096)]
    linears = 32 * sum(fit(k, n, packed_bytes(k, n, 4, 32, True)) for k, n in shapes)
    linears += fit(4096, 128256, 4096 * 128256 * 2)  # untied head: dense bf16, "bf16" table
    assert result.decode_breakdown["linears"] == pytest.approx(linears)
    # the context part of the overhead grows with KV bytes per token per layer: 2 x 8 x 128 x 2
    # here against 768 on the model it was measured on
    slope = (200e-6 - 100e-6) / 200
    layer = (100e-6 - slope * 100) + slope * (2 * 8 * 128 * 2 / 768) * 300
    assert result.decode_breakdown["layers"] == pytest.approx(32 * layer)


def test_serving_adds_its_measured_time_per_step() -> None:
    import dataclasses

    from tokenmill.bench.hardware import ServingTable

    hw = _synthetic_profile()
    serving = ServingTable(batches=(1, 4, 16), step_s=(10e-3, 12e-3, 24e-3), context=88)
    served = dataclasses.replace(hw, decode=dataclasses.replace(hw.decode, serving=serving))
    arch = find_model(None)
    engine = plan(PlanInputs(arch, hw, None, "bf16", batch_size=8, context_p50=200,
                             context_p95=200))
    result = plan(PlanInputs(arch, served, None, "bf16", batch_size=8, context_p50=200,
                             context_p95=200))
    assert "serving" not in engine.decode_breakdown
    assert result.decode_breakdown["serving"] == pytest.approx(12e-3 + 12e-3 * 4 / 12)
    assert result.decode_step_seconds == pytest.approx(
        engine.decode_step_seconds + 16e-3)
    alone = plan(PlanInputs(arch, served, None, "bf16", batch_size=8, context_p50=200,
                            context_p95=200, serving=False))
    assert alone.decode_step_seconds == pytest.approx(engine.decode_step_seconds)


def test_profile_file_round_trip_and_version_one(tmp_path) -> None:
    import dataclasses

    from tokenmill.bench.hardware import ServingTable, load_profile, save_profile

    hw = _synthetic_profile()
    hw = dataclasses.replace(hw, decode=dataclasses.replace(
        hw.decode, serving=ServingTable((1, 16), (0.01, 0.02), 88)))
    path = tmp_path / "hardware.json"
    save_profile(hw, path)
    assert json.loads(path.read_text())["version"] == 2
    assert load_profile(path).decode == hw.decode
    # a file from before decode profiles: same figures, no decode -> the roofline
    old = json.loads(path.read_text())
    del old["version"], old["decode"]
    path.write_text(json.dumps(old))
    loaded = load_profile(path)
    assert loaded.decode is None and loaded.bandwidth_bytes_per_s == 10e9
    result = plan(PlanInputs(find_model(None), loaded, "fp32", "fp32", batch_size=1))
    assert result.decode_bound in ("memory", "compute") and result.decode_breakdown is None
