"""Bad config files fail at start-up with a message naming the field; the CLI exits cleanly."""

from __future__ import annotations

import pytest
import yaml

from tests.gateway.helpers import EXAMPLE_CONFIG, base_config
from tokenmill.cli import main
from tokenmill.errors import ConfigError
from tokenmill.gateway.config import config_from_dict, load_config


def test_example_config_is_valid():
    config = load_config(EXAMPLE_CONFIG)
    assert config.routing.policy == "prefix_affinity" and len(config.guardrails.pii) == 9
    assert config.guardrails.injection_detector.enabled


@pytest.mark.parametrize(("change", "message"), [
    (lambda c: c["tenants"][0].update(requests_per_minute="many"),
     r"tenants\[0\]\.requests_per_minute must be an integer"),
    (lambda c: c["tenants"][1].update(pii_policy="shred"), r"tenants\[1\]\.pii_policy"),
    (lambda c: c.update(routing={"policy": "random"}), r"routing\.policy: 'random'"),
    (lambda c: c.update(routing={"polcy": "round_robin"}), r"unknown field routing\.polcy"),
    (lambda c: c.update(upstreams=[]), "upstreams: at least one"),
    (lambda c: c["upstreams"][0].update(url="localhost:8000"), r"upstreams\[0\]\.url"),
    (lambda c: c.update(guardrails={"input_rules": [{"name": "x", "pattern": "(unclosed"}]}),
     r"guardrails\.input_rules\[0\]\.pattern is not a valid regex"),
    (lambda c: c.update(cache={"similarity_threshold": 1.5}), r"cache\.similarity_threshold"),
    (lambda c: c.update(cache={"verifier_word_threshold": 0}), r"cache\.verifier_word_threshold"),
    (lambda c: c["tenants"][1].update(semantic_cache_threshold=0),
     r"tenants\[1\]\.semantic_cache_threshold: must be in \(0, 1\], got 0"),
    (lambda c: c["tenants"][0].pop("name"), r"missing required field tenants\[0\]\.name"),
    (lambda c: c.update(server={"max_body_bytes": True}), r"server\.max_body_bytes must be an"),
    (lambda c: c["tenants"][0].update(injection_threshold=1.5),
     r"tenants\[0\]\.injection_threshold: must be in \(0, 1\]"),
    (lambda c: c.update(guardrails={"injection_detector": {"threshold": 0}}),
     r"guardrails\.injection_detector\.threshold"),
    (lambda c: c.update(guardrails={"injection_detector": {"rag_chunks": "ignore"}}),
     r"guardrails\.injection_detector\.rag_chunks: 'ignore' is not one of drop, block, off"),
    (lambda c: c.update(guardrails={"pii": [{"name": "x", "pattern": "x", "validator": "mod11"}]}),
     r"guardrails\.pii\[0\]\.validator: 'mod11' is not one of luhn, iban, ip"),
    (lambda c: c.update(shared_state={"on_failure": "maybe"}),
     r"shared_state\.on_failure: 'maybe' is not one of open, closed"),
    (lambda c: c.update(shared_state={"redis_url": "127.0.0.1:6379"}),
     r"shared_state\.redis_url: must start with redis://, rediss:// or unix://"),
    (lambda c: c.update(shared_state={"timeout_s": 0}), r"shared_state\.timeout_s: must be > 0"),
])
def test_bad_fields_are_named(change, message):
    config = base_config(["http://127.0.0.1:9"])
    change(config)
    with pytest.raises(ConfigError, match=message):
        config_from_dict(config)


def test_cli_reports_bad_files_in_one_line(tmp_path, capsys):
    assert main(["gateway", "--config", str(tmp_path / "missing.yaml")]) == 1
    assert "does not exist" in capsys.readouterr().err
    broken = tmp_path / "broken.yaml"
    broken.write_text("upstreams: [\n")
    assert main(["gateway", "--config", str(broken)]) == 1
    assert "is not valid" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    config = base_config(["http://127.0.0.1:9"])
    config["routing"]["cooldown_s"] = -1
    bad.write_text(yaml.safe_dump(config))
    assert main(["gateway", "--config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tokenmill: error: routing.cooldown_s") and "Traceback" not in err
    assert main(["rag", "ingest", str(tmp_path / "nowhere"), "--collection", "x",
                 "--rag-dir", str(tmp_path)]) == 1
    assert "is not a folder" in capsys.readouterr().err
