"""`tokenmill bench` against a real HTTP server on loopback whose delays and failures are known."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import matplotlib.image
import openai
import pytest

from tests.bench.fake_openai import MODEL

TTFT_S, ITL_S, OUTPUT_LEN = 0.12, 0.03, 8


def _bench(run_cli, url: str, out: Path, *extra: str) -> tuple[int, str, str, dict]:
    code, stdout, stderr = run_cli("bench", "--base-url", url, "--output-dir", str(out),
                                   "--quiet", *extra)
    record = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() \
        else {}
    return code, stdout, stderr, record


def test_fake_server_speaks_openai_streaming(fake) -> None:
    """The official client reads the fake's stream, usage chunk included: the bench's parser is
    tested against the real wire format, not a private one."""
    _server, url = fake
    client = openai.OpenAI(base_url=url + "/v1", api_key="x")
    stream = client.completions.create(model=MODEL, prompt="hi", max_tokens=3, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == " t0 t1 t2"
    assert chunks[-1].usage.completion_tokens == 3
    chat = client.chat.completions.create(model=MODEL, max_tokens=2, stream=True,
                                          messages=[{"role": "user", "content": "hi"}])
    assert "".join(c.choices[0].delta.content or "" for c in chat if c.choices) == " t0 t1"


def test_measures_known_delays_errors_goodput_and_cost(fake, run_cli, tmp_path,
                                                       tokenizer_json) -> None:
    server, url = fake
    server.reset(ttft_s=TTFT_S, itl_s=ITL_S, fail_every=4)
    code, stdout, stderr, record = _bench(
        run_cli, url, tmp_path, "--concurrency", "1,3", "--num-requests", "8",
        "--input-len", "uniform:20,40", "--output-len", str(OUTPUT_LEN),
        "--tokenizer", tokenizer_json, "--slo-ttft-ms", "1000", "--slo-tpot-ms", "1000",
        "--price-per-hour", "7.2")
    assert code == 0, stderr
    assert record["complete"] and record["config"]["model"] == MODEL
    assert [lv["level"]["label"] for lv in record["levels"]] == ["c=1", "c=3"]
    for level in record["levels"]:
        s = level["summary"]
        # Every 4th request of the server's count fails: 2 of 8 per level.
        assert (s["num_requests"], s["num_ok"]) == (8, 6)
        assert s["errors_by_kind"] == {"http_500": 2}
        assert s["error_rate"] == pytest.approx(0.25)
        assert "injected failure" in s["first_error"]
        # Delays the server was told to use are floors: a loaded machine only adds to them, so
        # the bounds are one-sided (speed is for benchmarks/, not for asserts that can flake).
        assert s["ttft_ms"]["p50"] >= TTFT_S * 1000 - 2
        assert s["itl_ms"]["p50"] >= ITL_S * 1000 - 2 and s["tpot_ms"]["p50"] >= ITL_S * 1000 - 2
        assert s["e2e_ms"]["p50"] >= (TTFT_S + (OUTPUT_LEN - 1) * ITL_S) * 1000 - 2
        assert s["ttft_ms"]["p50"] < s["e2e_ms"]["p50"]
        assert s["output_tokens"] == 6 * OUTPUT_LEN and s["usage_reported"]
        assert s["input_tokens"] == 6 * 11  # the fake's usage.prompt_tokens wins over our count
        # Goodput with loose SLOs = throughput of successful requests.
        assert s["goodput"] == pytest.approx(s["request_throughput"])
        # The bill: $7.2 an hour for the level's duration, shared by its 48 output tokens.
        cost = level["cost"]
        bill = 7.2 / 3600 * s["duration_s"]
        assert cost["dollars_per_million_output_tokens"] * 48 / 1e6 == pytest.approx(bill)
        assert cost["output_tokens_per_dollar"] * bill == pytest.approx(48)
    # At one request in flight the 6 answers that succeed take at least 0.12 + 7 x 0.03 = 0.33 s
    # each, one after the other: at least 1.98 s (1.97 with a little clock slack) for 48 tokens,
    # so a million output tokens cost at least 7.2 / 3600 x 1.97 / 48 x 1e6 = $82.08; a loaded
    # machine only makes it dearer.
    one = record["levels"][0]
    assert one["summary"]["duration_s"] >= 1.97
    assert one["cost"]["dollars_per_million_output_tokens"] >= 82.08
    # Every file is there; the PNGs decode as images; the report carries the table.
    for name in ("results.json", "report.md", "throughput_latency.png", "ttft_distribution.png",
                 "tpot_distribution.png", "cost.png"):
        assert (tmp_path / name).is_file(), name
    image = matplotlib.image.imread(tmp_path / "throughput_latency.png")
    assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 400
    report = (tmp_path / "report.md").read_text()
    assert "| c=3 | 6/8 |" in report and "http_500:2" in report
    assert "c=1" in stdout and "$/1M out" in stdout


def test_cost_is_one_bill_viewed_per_kind_of_token() -> None:
    """$7.2 an hour is $0.002 a second; at 100 output and 300 input tokens a second, a million
    output tokens take 10,000 s ($20), a million input tokens 3,333.3 s ($6.67), a million of
    both 2,500 s ($5)."""
    from tokenmill.cost import Price, level_cost

    cost = level_cost({"output_tokens_per_s": 100.0, "input_tokens_per_s": 300.0},
                      Price(7.2, "user"))
    assert cost == pytest.approx({
        "price_per_hour": 7.2, "dollars_per_million_output_tokens": 20.0,
        "dollars_per_million_input_tokens": 20.0 / 3, "dollars_per_million_tokens": 5.0,
        "output_tokens_per_dollar": 50_000.0, "tokens_per_dollar": 200_000.0})
    idle = level_cost({"output_tokens_per_s": 0.0, "input_tokens_per_s": 0.0}, Price(7.2, "user"))
    assert idle["dollars_per_million_output_tokens"] is None  # nothing served: no price per token


def test_goodput_counts_only_requests_within_slo(fake, run_cli, tmp_path, tokenizer_json) -> None:
    server, url = fake
    server.reset(ttft_s=0.08, itl_s=0.0)
    code, _, stderr, record = _bench(
        run_cli, url, tmp_path, "--concurrency", "2", "--num-requests", "6",
        "--input-len", "16", "--output-len", "2", "--tokenizer", tokenizer_json,
        "--slo-ttft-ms", "20")
    assert code == 0, stderr
    s = record["levels"][0]["summary"]
    assert s["num_ok"] == 6 and s["good_requests"] == 0 and s["goodput"] == 0.0


def test_rate_sweep_chat_workload_and_compare(fake, run_cli, tmp_path, tokenizer_json) -> None:
    server, url = fake
    args = ("--request-rate", "20,inf", "--arrival", "constant", "--num-requests", "6",
            "--workload", "chat", "--chat-turns", "2", "--input-len", "12", "--output-len", "3",
            "--tokenizer", tokenizer_json)
    code, _, stderr, a = _bench(run_cli, url, tmp_path / "a", *args)
    assert code == 0, stderr
    assert [lv["level"]["label"] for lv in a["levels"]] == ["rate=20/s constant", "rate=inf/s"]
    assert all(lv["summary"]["num_ok"] == 6 for lv in a["levels"])
    # 6 arrivals 50 ms apart take at least 250 ms to send; "inf" sends them all at once.
    first = a["levels"][0]["requests"]
    starts = sorted(r["start_s"] for r in first)
    assert starts[-1] - starts[0] >= 0.24
    server.reset(ttft_s=0.05)
    code, _, _, _ = _bench(run_cli, url, tmp_path / "b", *args)
    assert code == 0
    code, stdout, stderr = run_cli("bench", "--compare", str(tmp_path / "a" / "results.json"),
                                   str(tmp_path / "b" / "results.json"))
    assert code == 0, stderr
    assert "TTFT p50 ms" in stdout and "B/A" in stdout


def test_no_prompt_is_sent_twice_in_a_run(fake, run_cli, tmp_path, tokenizer_json) -> None:
    """Servers cache prompts: a level that replayed an earlier level's prompts (or the warm-up's)
    would be answered from that cache and report prefills it never paid for. Every request of the
    warm-up and of each level is a new prompt; a shared-prefix run keeps its groups' prefixes."""
    server, url = fake
    server.reset()
    code, _, stderr, record = _bench(
        run_cli, url, tmp_path / "a", "--warmup", "2", "--concurrency", "1,4",
        "--num-requests", "6", "--input-len", "64", "--output-len", "2",
        "--tokenizer", tokenizer_json)
    assert code == 0, stderr
    assert [lv["summary"]["num_ok"] for lv in record["levels"]] == [6, 6]
    assert len(server.prompts) == 14
    assert len(set(server.prompts)) == 14
    assert len({p[:80] for p in server.prompts}) == 14  # not even a shared start

    server.reset()
    code, _, stderr, _ = _bench(
        run_cli, url, tmp_path / "b", "--concurrency", "1,2", "--num-requests", "4",
        "--workload", "shared-prefix", "--num-groups", "2", "--prefix-len", "48",
        "--input-len", "16", "--output-len", "2", "--tokenizer", tokenizer_json)
    assert code == 0, stderr
    assert len(set(server.prompts)) == 8
    assert len({p.split("\n\n")[0] for p in server.prompts}) == 2


def test_unreachable_url_is_one_clear_line(run_cli, tmp_path, tokenizer_json) -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code, _, stderr, record = _bench(run_cli, f"http://127.0.0.1:{port}", tmp_path,
                                     "--num-requests", "2", "--tokenizer", tokenizer_json)
    assert code == 1 and record == {}
    assert stderr.strip().splitlines() == [
        f"tokenmill: error: cannot reach http://127.0.0.1:{port}: All connection attempts failed"]


def test_server_returning_only_errors_still_writes_report(fake, run_cli, tmp_path,
                                                          tokenizer_json) -> None:
    server, url = fake
    server.reset(fail_every=1)
    code, _, stderr, record = _bench(run_cli, url, tmp_path, "--num-requests", "3",
                                     "--input-len", "10", "--output-len", "2",
                                     "--tokenizer", tokenizer_json)
    assert code == 1
    assert "all 3 requests failed (http_500: 3)" in stderr and "injected failure" in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert record["levels"][0]["summary"]["num_errors"] == 3
    assert (tmp_path / "report.md").is_file()


def test_malformed_sse_is_counted_as_such(fake, run_cli, tmp_path, tokenizer_json) -> None:
    server, url = fake
    server.reset(malformed=True)
    code, _, stderr, record = _bench(run_cli, url, tmp_path, "--num-requests", "2",
                                     "--input-len", "10", "--output-len", "4",
                                     "--tokenizer", tokenizer_json)
    assert code == 1 and "malformed_sse" in stderr
    assert record["levels"][0]["summary"]["errors_by_kind"] == {"malformed_sse": 2}


def test_any_legal_sse_framing_is_read(fake, run_cli, tmp_path, tokenizer_json) -> None:
    """CRLF line ends, comments, event names and an event's JSON over several data lines: the
    shared parser (tokenmill/sse_parser.py) reads them like plain ``data: {...}`` events."""
    server, url = fake
    server.reset(crlf_multiline=True)
    code, _, stderr, record = _bench(run_cli, url, tmp_path, "--num-requests", "2",
                                     "--input-len", "10", "--output-len", "4",
                                     "--tokenizer", tokenizer_json)
    assert code == 0, stderr
    s = record["levels"][0]["summary"]
    assert s["output_tokens"] == 8 and s["usage_reported"]


def test_no_usage_from_server_counts_chunks(fake, run_cli, tmp_path, tokenizer_json) -> None:
    server, url = fake
    server.reset(send_usage=False)
    code, _, stderr, record = _bench(run_cli, url, tmp_path, "--num-requests", "2",
                                     "--input-len", "30", "--output-len", "5",
                                     "--tokenizer", tokenizer_json)
    assert code == 0, stderr
    s = record["levels"][0]["summary"]
    assert s["output_tokens"] == 10 and not s["usage_reported"]
    requests = record["levels"][0]["requests"]
    assert all(r["prompt_tokens_source"] == "tokenizer" for r in requests)
    assert all(abs(r["prompt_tokens"] - 30) <= 1 for r in requests)


def test_partial_run_writes_what_it_measured(fake, run_cli, tmp_path, tokenizer_json,
                                             monkeypatch) -> None:
    """Ctrl-C as the second level starts: the first level's measurements are still written."""
    _server, url = fake
    from tokenmill.bench import session

    real_run_level = session.run_level
    calls = []

    async def run_level_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return await real_run_level(*args, **kwargs)

    monkeypatch.setattr(session, "run_level", run_level_then_interrupt)
    code, _, stderr, record = _bench(run_cli, url, tmp_path, "--concurrency", "1,2",
                                     "--num-requests", "2", "--input-len", "10",
                                     "--output-len", "2", "--tokenizer", tokenizer_json)
    assert code == 1 and "run stopped: interrupted by the user" in stderr
    assert not record["complete"] and record["stopped_reason"] == "interrupted by the user"
    assert [lv["level"]["label"] for lv in record["levels"]] == ["c=1"]
    assert record["levels"][0]["summary"]["num_ok"] == 2
    assert "Partial run" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("args, message", [
    (("--input-len", "uniform:300,100"), "--input-len='uniform:300,100'"),
    (("--output-len", "gauss:5"), "expected fixed:N, uniform:LO,HI or normal:MEAN,STD"),
    (("--input-len", "normal:-5,2"), "--input-len"),
    (("--price-per-hour", "-3"), "--price-per-hour=-3.0 must be a finite number >= 0"),
    (("--concurrency", "0"), "every value must be a positive number"),
    (("--request-rate", "abc"), "'abc' is not a number"),
    (("--slo-ttft-ms", "-1"), "SLO ttft must be a positive number"),
    (("--hardware", "b300"), "not in the catalog"),
    (("--workload", "jsonl"), "needs --dataset"),
])
def test_nonsense_input_is_refused_before_sending(fake, run_cli, tmp_path, args, message) -> None:
    server, url = fake
    code, _, stderr, record = _bench(run_cli, url, tmp_path, *args)
    assert code == 1 and record == {}
    assert len(stderr.strip().splitlines()) == 1 and message in stderr
    assert server.num_requests == 0
