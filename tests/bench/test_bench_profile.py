"""`tokenmill profile` measures this machine; `plan --hardware this` uses what it saved."""

from __future__ import annotations

import json


def test_profile_then_plan_on_this_machine(run_cli, tmp_path) -> None:
    path = tmp_path / "hardware.json"
    code, out, err = run_cli("profile", "--output", str(path), "--seconds-per-test", "0.1",
                             "--copy-mib", "32", "--threads", "1")
    assert code == 0, err
    saved = json.loads(path.read_text())
    assert saved["measured"] and saved["memory_bytes"] > 2**30
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
    memory = (weights + 2048 * 2 * 30 * 3 * 64 * 2) / saved["bandwidth_bytes_per_s"]
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
