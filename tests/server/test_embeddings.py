"""``/v1/embeddings`` through the official `openai` client: from the served model (last-token
pooling, normalized: a direct forward pass computes the same) and from ``tokenmill serve --task
embed`` with all-MiniLM-L6-v2 (sentence-transformers' own ``encode`` gives the same); order kept,
float and base64, and bad input is a 400 naming the field."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest
import torch

from tests.server.conftest import MODEL
from tests.server_fixture import ServerProcess
from tokenmill.layers.attention import causal_metadata

TEXTS = ["The cat sat on the mat.", "Quarterly revenue grew by four percent.",
         "A kitten is resting on a rug."]


def expected_last_token(llm, text: str) -> np.ndarray:
    ids = llm.tokenizer.encode(text)
    model = llm.engine.runner.model
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.arange(len(ids)), causal_metadata([len(ids)]))
    vector = hidden[-1].numpy()
    return vector / np.linalg.norm(vector)


def test_served_model_embeddings_match_a_direct_forward_pass(client, llm):
    result = client.embeddings.create(model=MODEL, input=TEXTS)
    assert [d.index for d in result.data] == [0, 1, 2]
    ids = [llm.tokenizer.encode(t) for t in TEXTS]
    assert result.usage.prompt_tokens == sum(len(i) for i in ids)
    for text, item in zip(TEXTS, result.data):
        got = np.array(item.embedding)
        assert got.shape == (llm.engine.source.arch.hidden_size,)
        assert np.linalg.norm(got) == pytest.approx(1.0, abs=1e-4)
        assert np.abs(got - expected_last_token(llm, text)).max() < 2e-3
    # token ids and base64 give the same vectors
    by_ids = client.embeddings.create(model=MODEL, input=ids[1])
    assert np.abs(np.array(by_ids.data[0].embedding) - result.data[1].embedding).max() < 1e-5
    raw = httpx.post(client.base_url.join("embeddings").__str__(),
                     json={"model": MODEL, "input": TEXTS[0], "encoding_format": "base64"},
                     timeout=60).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.abs(decoded - result.data[0].embedding).max() < 1e-6


@pytest.mark.parametrize(("body", "param", "text"), [
    ({"input": ""}, "input", "non-empty"),
    ({"input": []}, "input", "non-empty"),
    ({"input": ["ok", ""]}, "input", "non-empty"),
    ({"input": "hi", "dimensions": 64}, "dimensions", "576 dimensions"),
    ({"input": "word " * 9000}, "input", "context of 8192 tokens"),
    ({"input": [10**7]}, "input", "vocabulary"),
    ({"input": ["a"] * 2049}, "input", "at most 2048"),
    ({"input": "hi", "encoding_format": "int8"}, "encoding_format", "float"),
])
def test_bad_embedding_requests_are_400(tokenmill_server, body, param, text):
    response = httpx.post(tokenmill_server.url + "/v1/embeddings",
                          json={"model": MODEL, **body}, timeout=60)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and text in error["message"], error


@pytest.fixture(scope="module")
def embed_server():
    server = ServerProcess("--task", "embed")
    server.wait_ready()
    yield server
    server.stop()


def test_embed_task_serves_sentence_transformers(embed_server):
    from sentence_transformers import SentenceTransformer

    from tokenmill.loader.builtin import builtin_embedding_model_path

    client = openai.OpenAI(base_url=embed_server.url + "/v1", api_key="unused", max_retries=0)
    [card] = client.models.list().data
    result = client.embeddings.create(model=card.id, input=TEXTS)
    reference = SentenceTransformer(str(builtin_embedding_model_path()), device="cpu").encode(
        TEXTS, normalize_embeddings=True)
    got = np.array([d.embedding for d in result.data])
    assert got.shape == (3, 384)
    assert np.abs(got - reference).max() < 1e-4
    assert got[0] @ got[2] > got[0] @ got[1], "cat and kitten are the close pair"

    too_long = httpx.post(embed_server.url + "/v1/embeddings",
                          json={"model": card.id, "input": "word " * 600}, timeout=60)
    assert too_long.status_code == 400
    assert too_long.json()["error"]["param"] == "input"
    assert "max_seq_length of 256" in too_long.json()["error"]["message"]
    generate = httpx.post(embed_server.url + "/v1/completions",
                          json={"model": card.id, "prompt": "Hi"}, timeout=60)
    assert generate.status_code == 400 and "--task embed" in generate.json()["error"]["message"]
    assert httpx.get(embed_server.url + "/health").status_code == 200
