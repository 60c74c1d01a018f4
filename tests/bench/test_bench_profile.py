"""`tokenmill profile` measures this machine; `plan --hardware this` uses what it saved.

What the planner does with a profile is checked on hand-written profile files whose figures are
round numbers, against step times worked out by hand in each test (never with the planner's own
helpers, which would repeat a wrong formula). What `profile` measures is checked for its shape and
for being physically possible; its figures depend on the machine and its load.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

# SmolLM2-135M (the built-in model), from its config.json: hidden 576, 30 layers, 9 query heads
# and 3 KV heads of 64, MLP 1536, vocabulary 49152, tied embeddings.
# Parameters: embedding 49152 x 576 = 28_311_552; per layer q 576² + k, v 576 x 192 each +
# o 576² = 884_736, MLP 3 x 576 x 1536 = 2_654_208, 2 norms of 576 -> 3_540_096 (3_538_944
# without norms); 30 layers + embedding + final norm 576.
SMOLLM2_PARAMS = 30 * 3_540_096 + 28_311_552 + 576
SMOLLM2_MATMUL_PARAMS = 30 * 3_538_944 + 28_311_552  # each multiplied once per token (tied head)
assert SMOLLM2_PARAMS == 134_515_008  # the figure the model card gives


def _write_profile(path: Path, decode: dict | None = None, **fields: object) -> Path:
    """A profile file as `tokenmill profile` writes it, with made-up round figures: 10 GB/s,
    100 GFLOP/s fp32, 16 GiB."""
    data = {"version": 2, "key": "this-machine", "name": "this machine: hand-written",
            "memory_bytes": 16 * 2**30, "bandwidth_bytes_per_s": 10e9,
            "peak_flops": {"fp32": 100e9, "bf16": 100e9}, "source": "test",
            "example_price_per_hour": None, "measured": True, "extra": {"device": "cpu"},
            "decode": decode, **fields}
    path.write_text(json.dumps(data))
    return path


def test_plan_roofline_on_a_profile_without_decode_figures(run_cli, tmp_path) -> None:
    """No decode profile: batch-1 decode is bytes read / bandwidth + FLOPs / fp32 peak (on a CPU
    the cores stream the weights and do the math, so the two add)."""
    path = _write_profile(tmp_path / "hardware.json")
    code, out, err = run_cli("plan", "--hardware", "this,l4", "--profile-path", str(path),
                             "--dtype", "fp32", "--batch", "1", "--context-p50", "2048",
                             "--price-per-hour", "3.6", "--json")
    assert code == 0, err
    here, l4 = json.loads(out)
    assert here["hardware"].startswith("this machine") and here["fits"]
    # Read per step: every weight in fp32 (the tied table once, as the LM head) and the KV of
    # 2048 tokens: K and V x 30 layers x 3 KV heads x 64 x 4 bytes = 46_080 bytes per token.
    bytes_read = 134_515_008 * 4 + 2048 * 46_080  # 632_431_872
    # FLOPs per token: 2 per multiplied parameter, plus QKᵀ and PV over 2048 positions:
    # 4 x 30 layers x 9 heads x 64 x 2048 = 141_557_760.
    flops = 2 * 134_479_872 + 141_557_760  # 410_517_504
    step = bytes_read / 10e9 + flops / 100e9  # 0.0632431872 + 0.00410517504
    assert step == pytest.approx(0.06734836224, rel=1e-12)
    assert here["decode_bound"] == "memory"
    assert here["decode_tokens_per_s"] == pytest.approx(1 / 0.06734836224, rel=1e-9)
    # $3.6 an hour is $0.001 a second; at 1/0.0673... tokens a second a million tokens cost
    # 0.001 x 0.06734836224 x 1e6 dollars.
    assert here["dollars_per_million_output_tokens"] == pytest.approx(67.34836224, rel=1e-9)
    assert l4["hardware"] == "L4 24GB"


def test_plan_sums_a_measured_decode_profile(run_cli, tmp_path) -> None:
    """A decode profile: the step is the kernels' measured times + layers x per-layer overhead +
    per-step overhead + serving's share, each read at the batch (and context) asked for."""
    rows = [1, 4, 16]
    fit = {"call_s": 1e-6, "bytes_per_s": 10e9, "flops_per_s": 100e9}
    # fp32 time per call of each of the model's linears (fused q/k/v 576x960, o 576x576, fused
    # gate/up 576x3072, down 1536x576, LM head 576x49152) at M = 1, 4, 16
    shapes = {"576x960": [10e-6, 20e-6, 80e-6], "576x576": [5e-6, 10e-6, 40e-6],
              "576x3072": [30e-6, 50e-6, 200e-6], "1536x576": [20e-6, 30e-6, 120e-6],
              "576x49152": [1e-3, 2e-3, 8e-3]}
    overhead = {"batches": rows, "contexts": [256, 1280],
                "layer_s": [[50e-6, 100e-6], [100e-6, 200e-6], [200e-6, 600e-6]],
                "step_s": [1e-3, 2e-3, 5e-3],
                "kv_bytes_per_token_per_layer": 2 * 3 * 64 * 4}  # this model's, in fp32
    decode = {"kernels": {"fp32": {"rows": rows, "shapes": shapes, "fit": fit,
                                   "activation_dtype": "fp32"}},
              "overheads": {"fp32": overhead}, "auto_dtype": "fp32", "threads": 1,
              "serving": {"batches": rows, "step_s": [4e-3, 6e-3, 10e-3], "context": 100}}
    path = _write_profile(tmp_path / "hardware.json", decode)

    code, out, err = run_cli("plan", "--hardware", "this", "--profile-path", str(path),
                             "--dtype", "fp32", "--batch", "4", "--context-p50", "768", "--json")
    assert code == 0, err
    (here,) = json.loads(out)
    assert here["decode_bound"] == "measured"
    # at M = 4: 30 x (20 + 10 + 50 + 30 us) + 2 ms for the head
    linears = 30 * 110e-6 + 2e-3  # 5.3 ms
    # batch 4's per-layer overhead goes from 100 us at 256 to 200 us at 1280 tokens, so at 768
    # (halfway) it is 150 us; the model is the one measured, so no KV scaling
    layers = 30 * 150e-6  # 4.5 ms
    breakdown = {"linears": 5.3e-3, "layers": 4.5e-3, "step": 2e-3, "serving": 6e-3}
    assert linears == pytest.approx(5.3e-3) and layers == pytest.approx(4.5e-3)
    assert here["decode_breakdown"] == pytest.approx(breakdown, rel=1e-9)
    assert here["decode_tokens_per_s"] == pytest.approx(4 / 17.8e-3, rel=1e-9)

    # halfway between measured batches, every table is read on its line: M = 10 is halfway
    # from 4 to 16: linears 30 x (50 + 25 + 125 + 75 us) + 5 ms; batch 16's per-layer line
    # (200 us at 256, 600 us at 1280) gives 400 us at 768, halfway to batch 4's 150 us is
    # 275 us; step 3.5 ms, serving 8 ms
    code, out, err = run_cli("plan", "--hardware", "this", "--profile-path", str(path),
                             "--dtype", "fp32", "--batch", "10", "--context-p50", "768",
                             "--json")
    assert code == 0, err
    (here,) = json.loads(out)
    assert here["decode_breakdown"] == pytest.approx(
        {"linears": 30 * 275e-6 + 5e-3, "layers": 30 * 275e-6, "step": 3.5e-3,
         "serving": 8e-3}, rel=1e-9)


def test_profile_saves_what_plan_reads(run_cli, tmp_path) -> None:
    """A real (tiny) measurement: figures that are physically possible, and a file plan reads."""
    path = tmp_path / "hardware.json"
    code, out, err = run_cli("profile", "--output", str(path), "--seconds-per-test", "0.05",
                             "--copy-mib", "16", "--threads", "1", "--no-decode")
    assert code == 0, err
    saved = json.loads(path.read_text())
    assert saved["measured"] and saved["memory_bytes"] > 2**30 and saved["decode"] is None
    assert saved["bandwidth_bytes_per_s"] > 1e8  # any machine that runs tests copies > 100 MB/s
    assert set(saved["peak_flops"]) >= {"fp32", "bf16"}
    assert all(v > 1e8 for v in saved["peak_flops"].values())
    assert "GB/s" in out and str(path) in out
    code, out, err = run_cli("plan", "--hardware", "this", "--profile-path", str(path),
                             "--dtype", "fp32", "--batch", "1", "--json")
    assert code == 0, err
    (here,) = json.loads(out)
    assert here["hardware"].startswith("this machine") and here["decode_tokens_per_s"] > 0


def test_plan_this_without_profile_says_run_profile(run_cli, tmp_path) -> None:
    code, _, err = run_cli("plan", "--hardware", "this", "--profile-path",
                           str(tmp_path / "missing.json"))
    assert code == 1 and "run `tokenmill profile` first" in err


def test_kernel_fit_recovers_known_costs() -> None:
    """Times made from a known call cost (5 us), bandwidth (20 GB/s) and FLOP rate
    (200 GFLOP/s) at the built-in model's shapes are fitted back to those three figures."""
    from tokenmill.bench.profile import fit_kernel

    samples = []
    for m in (1, 4, 16):
        for k, n in ((576, 960), (576, 576), (576, 3072), (1536, 576), (576, 49152)):
            nbytes = k * n * 4.0  # fp32 weights
            seconds = 5e-6 + nbytes / 20e9 + 2.0 * m * k * n / 200e9
            samples.append((m, k, n, nbytes, seconds))
    fit = fit_kernel(samples)
    assert fit == pytest.approx({"call_s": 5e-6, "bytes_per_s": 20e9, "flops_per_s": 200e9},
                                rel=1e-6)


@pytest.mark.parametrize("kernel", ["fp32", "bf16", "q4", "q8"])
def test_kernel_table_times_every_shape_at_every_row_count(kernel: str) -> None:
    """What `profile` measures per kernel, on two small linears (the real run times the built-in
    model's; `benchmarks/predict_vs_measure.py` runs the whole profile): one time per shape
    and M, all positive, and a fit plan can use for shapes it did not measure."""
    from tokenmill.bench.profile import measure_kernel_table

    table = measure_kernel_table(kernel, "fp32", (1, 4), passes=1,
                                 linears=[("qkv", 2, 64, 96), ("down", 1, 96, 64)])
    assert table.rows == (1, 4) and set(table.shapes) == {"64x96", "96x64"}
    assert all(len(v) == 2 and min(v) > 0 for v in table.shapes.values())
    assert table.group_size == (32 if kernel in ("q4", "q8") else None)
    assert table.fitted_seconds(4, 128, 128, 128 * 128 * 4) > 0
