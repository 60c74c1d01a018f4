"""`tokenmill bench` against the real `tokenmill serve` (the suite's session server)."""

from __future__ import annotations

import json

import pytest

INPUT_LEN, OUTPUT_LEN, NUM_REQUESTS = 32, 8, 4


def test_bench_measures_the_real_server(tokenmill_server, run_cli, tmp_path) -> None:
    code, _stdout, stderr = run_cli(
        "bench", "--base-url", tokenmill_server.url, "--output-dir", str(tmp_path), "--quiet",
        "--concurrency", "1,2", "--num-requests", str(NUM_REQUESTS),
        "--input-len", str(INPUT_LEN), "--output-len", str(OUTPUT_LEN), "--ignore-eos",
        "--price-per-hour", "3.6")
    assert code == 0, stderr
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["complete"]
    for level in record["levels"]:
        summary = level["summary"]
        assert summary["num_ok"] == NUM_REQUESTS, summary["first_error"]
        # counts come from the server's own usage: the prompt length the workload aimed for
        # (the built-in tokenizer is the server's) and exactly max_tokens with ignore_eos
        assert summary["usage_reported"]
        assert summary["output_tokens"] == NUM_REQUESTS * OUTPUT_LEN
        assert summary["input_tokens"] == NUM_REQUESTS * INPUT_LEN
        assert 0 < summary["ttft_ms"]["p50"] <= summary["e2e_ms"]["p50"]
        assert summary["tpot_ms"]["p50"] > 0
        # The bill: $3.6 an hour is $0.001 a second of the level's duration, shared by its
        # 4 x 8 = 32 output tokens (and by its 4 x 32 = 128 prompt tokens in the input view).
        bill = 0.001 * summary["duration_s"]
        cost = level["cost"]
        assert cost["dollars_per_million_output_tokens"] * 32 / 1e6 == pytest.approx(bill)
        assert cost["dollars_per_million_input_tokens"] * 128 / 1e6 == pytest.approx(bill)
        assert cost["dollars_per_million_tokens"] * 160 / 1e6 == pytest.approx(bill)
    assert (tmp_path / "report.md").is_file()
