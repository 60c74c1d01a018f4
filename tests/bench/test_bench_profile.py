"""`tokenmill profile` measures this machine; `plan --hardware this` uses what it saved."""

from __future__ import annotations

import json


def test_profile_then_plan_on_this_machine(run_cli, tmp_path) -> None:
    """Without the decode profile (--no-decode), plan falls back to the roofline."""
    path = tmp_path / "hardware.json"
    code, out, err = run_cli("profile", "--output", str(path), "--seconds-per-test", "0.1",
                             "--copy-mib", "32", "--threads", "1", "--no-decode")
    assert code == 0, err
    saved = json.loads(path.read_text())
    assert saved["measured"] and saved["memory_bytes"] > 2**30 and saved["decode"] is None
    assert saved["bandwidth_bytes_per_s"] > 1e8  # any machine that runs tests copies > 100 MB/s
    assert set(saved["peak_flops"]) >= {"fp32", "bf16"}
    assert all(v > 1e8 for v in saved["peak_flops"].values())
    assert "GB/s" in out and str(path) in out

    code, out, err = run_cli("plan", "--hardware", "this,l4", "--profile-path", str(path),
                             "--dtype", "fp32", "--batch", "1", "--json")
    assert code == 0, err
    here, l4 = json.loads(out)
    assert here["hardware"].startswith("this machine") and here["fits"]
    # Batch-1 decode of a 135M model is memory bound; on a CPU the cores also do the math, so
    # the step is bytes per step / measured bandwidth plus FLOPs / measured fp32 peak.
    from tokenmill.bench.catalog import find_model

    arch = find_model("SmolLM2-135M")
    weights = 134_515_008 * 4
    # KV in the compute dtype (fp32), as tokenmill holds it
    memory = (weights + 2048 * 2 * 30 * 3 * 64 * 4) / saved["bandwidth_bytes_per_s"]
    compute = (2.0 * arch.num_active_params + arch.attention_flops_per_token(2048)) \
        / saved["peak_flops"]["fp32"]
    step = memory + compute
    assert here["decode_bound"] == "memory"
    assert abs(here["decode_tokens_per_s"] - 1 / step) < 1e-6 * (1 / step)
    assert l4["hardware"] == "L4 24GB"


def test_plan_this_without_profile_says_run_profile(run_cli, tmp_path) -> None:
    code, _, err = run_cli("plan", "--hardware", "this", "--profile-path",
                           str(tmp_path / "missing.json"))
    assert code == 1 and "run `tokenmill profile` first" in err


def test_profile_quick_measures_decode_costs_that_plan_uses(run_cli, tmp_path) -> None:
    path = tmp_path / "hardware.json"
    code, out, err = run_cli("profile", "--quick", "--output", str(path), "--seconds-per-test",
                             "0.05", "--copy-mib", "16", "--threads", "1")
    assert code == 0, err
    saved = json.loads(path.read_text())
    assert saved["version"] == 2
    decode = saved["decode"]
    assert decode["threads"] == 1 and decode["auto_dtype"] in ("fp32", "bf16")
    # every format tokenmill runs, at every shape of the built-in model, at each M measured
    builtin = {"576x960", "576x576", "576x3072", "1536x576", "576x49152"}
    assert set(decode["kernels"]) == {"fp32", "bf16", "q4", "q8"}
    for table in decode["kernels"].values():
        assert table["rows"] == [1, 4, 16]
        assert set(table["shapes"]) == builtin
        assert all(len(v) == 3 and min(v) > 0 for v in table["shapes"].values())
        assert table["fit"]["bytes_per_s"] > 0 and table["fit"]["flops_per_s"] > 0
    assert decode["kernels"]["q4"]["group_size"] == 32
    # --quick: the default configuration's overhead only, per batch and context
    (key, overhead), = decode["overheads"].items()
    assert key == f"{decode['auto_dtype']}/quantized"
    assert overhead["batches"] == [1, 4, 16] and len(overhead["contexts"]) == 2
    assert all(len(row) == 2 and min(row) >= 0 for row in overhead["layer_s"])
    assert all(v > 0 for v in overhead["step_s"])
    assert "kernel q4" in out and "overhead" in out
    # what `tokenmill serve` adds per step, measured against a real server on loopback
    serving = decode["serving"]
    assert serving is not None, f"the serving measurement failed: {err[-2000:]}"
    assert serving["batches"] == [1, 4, 16] and len(serving["step_s"]) == 3
    assert serving["context"] > 0 and "serving" in out
    # what TP adds: the collectives between 2 ranks and the Python layers' overheads
    communication = decode["communication"]
    assert communication is not None, f"the TP measurement failed: {err[-2000:]}"
    assert all(s > 0 for _, s in communication["samples"]["all_reduce"])
    assert set(decode["python_overheads"]) == {key} and "TP all-reduce" in out

    code, out, err = run_cli("plan", "--hardware", "this", "--profile-path", str(path),
                             "--batch", "4", "--json")
    assert code == 0, err
    (here,) = json.loads(out)
    assert here["decode_bound"] == "measured" and here["decode_model"] == "measured"
    assert set(here["decode_breakdown"]) == {"linears", "layers", "step", "serving"}
    assert here["decode_tokens_per_s"] > 0
    code, out, err = run_cli("plan", "--hardware", "this", "--profile-path", str(path),
                             "--batch", "4", "--tp", "3", "--json")
    assert code == 0, err
    (tp3,) = json.loads(out)
    assert tp3["decode_breakdown"]["communication"] > 0
