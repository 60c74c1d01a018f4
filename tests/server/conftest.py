"""Server test helpers: the official OpenAI client and a /metrics reader, on the session server."""

from __future__ import annotations

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="session")
def client(tokenmill_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=tokenmill_server.url + "/v1", api_key="unused", max_retries=0,
                         timeout=120)


@pytest.fixture(scope="session")
def async_client(tokenmill_server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=tokenmill_server.url + "/v1", api_key="unused",
                              max_retries=0, timeout=120)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """/metrics parsed by prometheus_client: {(sample name, sorted labels without model): value}."""
    text = httpx.get(url + "/metrics").text
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "model_name"))
            samples[(sample.name, labels)] = sample.value
    return samples


def metric(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)
