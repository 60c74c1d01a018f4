"""``tokenmill serve --ray`` input checks that need no cluster: a bad autoscaling config, Ray not
installed, an unreachable ``--ray-address`` (each a one-line error before anything starts); and
the pieces the Ray path is made of (prefix keys, the step meter, the fault injector)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from tokenmill.cli import main
from tokenmill.distributed.ray_serve import check_reachable
from tokenmill.distributed.ray_serve_config import RayServeSettings
from tokenmill.distributed.ray_serve_ingress import PREFIX_KEY_CHARS, prefix_key
from tokenmill.engine.fault_injection import InjectedEngineFault, StepFaultInjector
from tokenmill.engine.step_meter import StepMeter
from tokenmill.errors import ConfigError


@pytest.mark.parametrize(("flags", "message"), [
    (["--min-replicas", "3", "--max-replicas", "1"], "--max-replicas=1 must be >= 1 and >="),
    (["--min-replicas", "1"], "autoscaling needs both --min-replicas and --max-replicas"),
    (["--min-replicas", "0", "--max-replicas", "2", "--target-ongoing-requests", "0"],
     "--target-ongoing-requests=0.0 must be > 0"),
    (["--num-replicas", "0"], "--num-replicas=0 must be >= 1"),
    (["--upscale-delay-s", "-1", "--min-replicas", "1", "--max-replicas", "2"],
     "--upscale-delay-s=-1.0 must be >= 0"),
    (["--straggler-factor", "0.9"], "--straggler-factor=0.9 must be > 1"),
    (["--inject-replica-ranks", "first"], "--inject-replica-ranks='first' must be"),
    (["--replica-capacity", "0"], "--replica-capacity=0 must be >= 1"),
    (["--straggler-probe-interval-s", "0"], "--straggler-probe-interval-s=0.0 must be > 0"),
])
def test_bad_ray_settings_fail_with_a_message_before_ray_starts(capsys, flags, message):
    assert main(["serve", "--ray", *flags]) == 1
    assert message in capsys.readouterr().err


def test_autoscaling_config_is_what_ray_serve_expects():
    settings = RayServeSettings(min_replicas=1, max_replicas=4, target_ongoing_requests=3,
                                upscale_delay_s=5, downscale_delay_s=60)
    config = settings.autoscaling_config()
    assert config["min_replicas"] == 1 and config["max_replicas"] == 4
    assert config["target_ongoing_requests"] == 3 and config["downscale_delay_s"] == 60
    assert RayServeSettings(num_replicas=2).autoscaling_config() is None


def test_replica_capacity_is_the_engine_batch_within_rays_queue_cap():
    assert RayServeSettings().resolved_replica_capacity(max_num_seqs=64) == 32
    assert RayServeSettings(max_ongoing_requests=100).resolved_replica_capacity(64) == 64
    assert RayServeSettings(replica_capacity=5).resolved_replica_capacity(64) == 5


def test_without_ray_the_flag_says_what_to_install():
    code = ("import sys; sys.modules['ray'] = None\n"  # as if ray were not installed
            "from tokenmill.cli import main\n"
            "sys.exit(main(['serve', '--ray']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=False, timeout=120)
    assert result.returncode == 1
    assert "pip install 'tokenmill[ray]'" in result.stderr
    assert result.stderr.count("\n") == 1  # one line, no traceback


def test_an_unreachable_ray_address_fails_fast():
    with socket.socket() as sock:  # a loopback port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ConfigError, match=f"cannot reach the Ray cluster at --ray-address="
                                          f"127.0.0.1:{port}"):
        check_reachable(f"127.0.0.1:{port}", timeout_s=2)
    with pytest.raises(ConfigError, match="must be host:port"):
        check_reachable("not-an-address")


def test_the_prefix_key_is_the_start_of_the_prompt_or_of_the_messages():
    long_prompt = "x" * 1000
    assert prefix_key(json.dumps({"prompt": long_prompt}).encode()) == "x" * PREFIX_KEY_CHARS
    chat = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "Hi"}]}]}
    assert prefix_key(json.dumps(chat).encode()) == "system:Be brief.\nuser:Hi\n"
    assert prefix_key(b"not json") == "" and prefix_key(b"[1, 2]") == ""


def test_the_step_meter_reports_step_time_batch_and_busy_share():
    meter = StepMeter(window_s=60)
    for _ in range(6):
        meter.record(0.02, num_tokens=4, batch_size=4)
    meter.record(0.2, num_tokens=300, batch_size=1)
    use = meter.snapshot()
    assert use.num_steps == 7
    assert use.step_seconds_by_bucket[4] == (0.02, 6)
    assert use.step_seconds_by_bucket[512] == (0.2, 1)
    assert abs(use.mean_batch_size - 25 / 7) < 1e-9
    assert 0 < use.busy_fraction <= 1 and use.tokens_per_s > 0


def test_the_fault_injector_slows_steps_by_its_factor_and_fails_at_its_rate():
    slow = StepFaultInjector(delay_factor=3.0)
    started = time.perf_counter()
    slow.after_step(0.01)
    assert time.perf_counter() - started >= 0.02  # (3 - 1) x the step's own time
    always = StepFaultInjector(failure_rate=1.0)
    with pytest.raises(InjectedEngineFault):
        always.before_step()
    StepFaultInjector().before_step()  # off by default
    for kwargs in ({"delay_factor": 0.5}, {"failure_rate": 1.5}):
        with pytest.raises(ConfigError):
            StepFaultInjector(**kwargs)
