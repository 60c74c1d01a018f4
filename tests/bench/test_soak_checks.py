"""The soak's end-state checks fail for the things they exist to catch (no server needed)."""

from __future__ import annotations

from tokenmill.bench.soak import ABORTED, DONE, REJECTED, SERVER_ERROR, SoakTally
from tokenmill.bench.soak_checks import ServerState, final_checks

IDLE = ServerState(num_running=0, num_waiting=0, kv_cache_usage=0.0, num_kv_blocks=728,
                   dashboard_running=0, dashboard_waiting=0, dashboard_kv_usage=0.0)


def tally(**outcomes: int) -> SoakTally:
    result = SoakTally()
    for outcome, count in outcomes.items():
        for _ in range(count):
            result.num_sent += 1
            result.record(outcome, f"example of {outcome}")
    return result


def failed(checks) -> set[str]:
    return {c.name for c in checks if not c.ok}


def test_a_clean_run_passes():
    clean = tally(**{DONE: 5, REJECTED: 3, ABORTED: 2})
    assert failed(final_checks(clean, IDLE, rss_baseline=1000, rss_final=1100)) == set()


def test_5xx_leaked_blocks_busy_engine_and_grown_rss_each_fail():
    broken = tally(**{DONE: 5, SERVER_ERROR: 1})
    busy = ServerState(num_running=1, num_waiting=0, kv_cache_usage=3 / 728, num_kv_blocks=728,
                       dashboard_running=1, dashboard_waiting=0, dashboard_kv_usage=3 / 728)
    checks = final_checks(broken, busy, rss_baseline=1000, rss_final=1200, rss_margin=0.15)
    assert failed(checks) == {"no 5xx", "every request accounted for", "running = waiting = 0",
                              "every KV block free",
                              "RSS back within 15% of the post-warm-up RSS"}
    assert busy.num_blocks_in_use == 3
    assert broken.examples[SERVER_ERROR] == [f"example of {SERVER_ERROR}"]


def test_429_without_retry_after_fails():
    refused = tally(**{REJECTED: 2})
    refused.num_429_without_retry_after = 1
    assert failed(final_checks(refused, IDLE)) == {"429s carry Retry-After"}
