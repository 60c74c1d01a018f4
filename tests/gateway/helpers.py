"""Shared helpers of the gateway tests (keys, configs, callers); imported, so defined once."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import openai

from tests.gateway.upstream_server import ServerThread
from tokenmill.gateway.auth import hash_api_key, new_api_key

REPO = Path(__file__).resolve().parents[2]
EXAMPLE_CONFIG = REPO / "examples" / "gateway.yaml"
DOCS_DIR = Path(__file__).parent / "docs"

KEY_ACME = new_api_key()
KEY_BETA = new_api_key()
KEY_REDACT = new_api_key()


def base_config(urls: list[str], guardrails: dict[str, Any] | None = None,
                tmp_path: Path | None = None, **sections: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "upstreams": [{"name": f"r{i}", "url": u} for i, u in enumerate(urls)],
        "tenants": [
            {"name": "acme", "api_key_hashes": [hash_api_key(KEY_ACME)],
             "models": ["tiny", "all-MiniLM-L6-v2"], "pii_policy": "block"},
            {"name": "beta", "api_key_hashes": [hash_api_key(KEY_BETA)], "models": ["*"],
             "pii_policy": "allow"},
            {"name": "redactor", "api_key_hashes": [hash_api_key(KEY_REDACT)],
             "models": ["*"], "pii_policy": "redact"},
        ],
        "routing": {"health_check_interval_s": 60, "cooldown_s": 60},
    }
    if guardrails is not None:
        config["guardrails"] = copy.deepcopy(guardrails)
    if tmp_path is not None:
        config["rag"] = {"dir": str(tmp_path / "rag")}
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(name), dict):
            config[name] = {**config[name], **value}
        else:
            config[name] = value
    return config


class RunningGateway:
    def __init__(self, app: Any, server: ServerThread) -> None:
        self.app = app
        self.server = server
        self.url = server.url
        self.state = app.state.gateway

    def client(self, key: str = KEY_ACME, **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, **kwargs)


def chat(client: openai.OpenAI, text: str, **kwargs: Any) -> Any:
    kwargs.setdefault("temperature", 0)
    return client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": text}], **kwargs)
