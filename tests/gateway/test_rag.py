"""RAG: `tokenmill rag ingest`, cited context injected, sources returned, re-ingest replaces."""

from __future__ import annotations

import shutil
import threading

import httpx
import openai
import pytest

from tests.gateway.helpers import DOCS_DIR, KEY_ACME, KEY_BETA, base_config, chat
from tokenmill.cli import main
from tokenmill.gateway.rag_store import Collection, chunk_text

QUESTIONS = [
    ("How many days do I have to return an item?", "returns.md", "30 days"),
    ("How long does shipping to Canada take?", "shipping.md", "7 to 10 business days"),
    ("Does the warranty cover a broken fan?", "warranty.txt", "three-year hardware warranty"),
]


@pytest.fixture
def rag_gateway(tmp_path, upstreams, start_gateway, capsys, request):
    docs = tmp_path / "docs"
    shutil.copytree(DOCS_DIR, docs)
    rag_dir = tmp_path / "rag"
    assert main(["rag", "ingest", str(docs), "--collection", "shop", "--rag-dir",
                 str(rag_dir)]) == 0
    assert "3 added" in capsys.readouterr().out
    (fake, server), _ = upstreams
    config = base_config([server.url], tmp_path=tmp_path)
    config["cache"] = getattr(request, "param", {})
    config["tenants"][1]["rag_collection"] = "shop"  # beta's default collection
    return start_gateway(config), fake, docs, rag_dir


def system_context(body):
    return "\n".join(m["content"] for m in body["messages"] if m["role"] == "system")


@pytest.mark.parametrize(("question", "source", "fact"), QUESTIONS)
def test_right_chunk_is_injected_with_its_source(rag_gateway, question, source, fact):
    gw, fake, _, _ = rag_gateway
    response = chat(gw.client(KEY_ACME), question, extra_body={"rag": {"collection": "shop",
                                                                       "top_k": 1}})
    context = system_context(fake.bodies[-1])
    assert fact in context and f"[1] (source: {source})" in context
    assert "rag" not in fake.bodies[-1]  # the extra field never reaches the upstream
    assert response.headers["x-tokenmill-rag-sources"].startswith(source + "#")
    sources = response.parse().model_extra["tokenmill_rag_sources"]
    assert sources[0]["source"] == source and sources[0]["index"] == 1


def test_tenant_default_collection_and_streaming_sources(rag_gateway):
    gw, fake, _, _ = rag_gateway
    stream = gw.client(KEY_BETA).chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": "What does express shipping cost "
                                 "in time?"}], stream=True)
    assert "shipping.md" in stream.headers["x-tokenmill-rag-sources"]
    list(stream.parse())
    assert "Express shipping arrives" in system_context(fake.bodies[-1])


def test_reingest_replaces_a_changed_file(rag_gateway, capsys):
    gw, fake, docs, rag_dir = rag_gateway
    (docs / "warranty.txt").write_text("Warranty\n\nThe appliance warranty now lasts five years "
                                       "and covers liquid damage too.\n")
    assert main(["rag", "ingest", str(docs), "--collection", "shop", "--rag-dir",
                 str(rag_dir)]) == 0
    assert "1 changed, 2 unchanged" in capsys.readouterr().out
    chat(gw.client(KEY_ACME), "How long is the warranty?",
         extra_body={"rag": {"collection": "shop", "top_k": 3}})
    context = system_context(fake.bodies[-1])
    assert "five years" in context and "three-year" not in context


def warranty_reply(body):
    context = system_context(body)
    return "five years" if "five years" in context else "three years" if "three-year" in \
        context else "no idea"


@pytest.mark.parametrize("rag_gateway", [{"exact": True, "semantic": False},
                                         {"exact": False, "semantic": True}],
                         ids=["exact", "semantic"], indirect=True)
@pytest.mark.parametrize("stream", [False, True])
def test_reingest_is_not_hidden_by_a_cached_answer(rag_gateway, capsys, stream):
    """The caches sit before retrieval, so their keys carry the collection's version: the same
    question after a re-ingest is answered from the new documents, not from the cache."""
    gw, fake, docs, rag_dir = rag_gateway
    fake.reply = warranty_reply
    client = gw.client(KEY_BETA)  # beta's default collection is "shop"

    def ask():
        if stream:
            return "".join(c.choices[0].delta.content or "" for c in client.chat.completions
                           .create(model="tiny", temperature=0, stream=True, messages=[
                               {"role": "user", "content": "How long is the warranty?"}])
                           if c.choices)
        return chat(client, "How long is the warranty?").parse().choices[0].message.content

    assert ask() == "three years"
    response = chat(client, "How long is the warranty?")
    assert response.headers.get("x-tokenmill-cache") in ("exact", "semantic")  # it is cached
    assert fake.num_requests == 1
    (docs / "warranty.txt").write_text("Warranty\n\nThe appliance warranty now lasts five years "
                                       "and covers liquid damage too.\n")
    assert main(["rag", "ingest", str(docs), "--collection", "shop", "--rag-dir",
                 str(rag_dir)]) == 0
    assert "1 changed" in capsys.readouterr().out
    assert ask() == "five years"
    assert fake.num_requests == 2
    response = chat(client, "How long is the warranty?")  # the new answer is cached in turn
    assert response.headers.get("x-tokenmill-cache") in ("exact", "semantic")
    assert response.parse().choices[0].message.content == "five years"


def test_a_slow_collection_reload_does_not_stall_other_requests(rag_gateway, monkeypatch):
    """Loading a collection (first use, or after a re-ingest) reads files; it runs off the event
    loop, so requests that need no RAG (/health, a plain chat) are answered while it is stuck."""
    gw, fake, _, _ = rag_gateway
    load_started, release = threading.Event(), threading.Event()
    real_load = Collection.load

    def slow_load(self):  # fault hook: the load blocks until the test lets it go
        load_started.set()
        release.wait(30)
        real_load(self)

    monkeypatch.setattr(Collection, "load", slow_load)
    result = {}
    waiting = threading.Thread(target=lambda: result.setdefault("rag", chat(
        gw.client(KEY_ACME), "How long is the warranty?",
        extra_body={"rag": {"collection": "shop"}})))
    waiting.start()
    assert load_started.wait(30)
    try:
        assert httpx.get(gw.url + "/health", timeout=10).status_code == 200
        plain = chat(gw.client(KEY_ACME, timeout=10), "hello there", temperature=0.5)
        assert plain.parse().choices[0].message.content
        assert not release.is_set() and waiting.is_alive()  # both answered during the load
    finally:
        release.set()
        waiting.join(30)
    assert "three-year" in system_context(fake.bodies[-1])
    assert result["rag"].headers["x-tokenmill-rag-sources"]


def test_unknown_collection_and_bad_rag_fields(rag_gateway):
    gw, fake, _, _ = rag_gateway
    with pytest.raises(openai.NotFoundError, match="collection 'nope' does not exist"):
        chat(gw.client(KEY_ACME), "hi", extra_body={"rag": {"collection": "nope"}})
    headers = {"Authorization": f"Bearer {KEY_ACME}"}
    for rag, param in (({"collection": "shop", "top_k": 0}, "rag.top_k"),
                       ({"collection": "../etc"}, "rag.collection"),
                       ({"collection": "shop", "k": 2}, "rag.k")):
        r = httpx.post(gw.url + "/v1/chat/completions", headers=headers, json={
            "model": "tiny", "messages": [{"role": "user", "content": "hi"}], "rag": rag})
        assert r.status_code == 400 and r.json()["error"]["param"] == param
    assert fake.num_requests == 0


def test_chunking_keeps_headings_and_bounds():
    text = "# Title\n\n" + "\n\n".join(f"Paragraph {i}. " + "word " * 40 for i in range(10))
    chunks = chunk_text(text, max_chars=400)
    assert len(chunks) > 3 and all(len(c) <= 400 + len("Title\n") for c in chunks)
    assert all(c.startswith("Title\n") for c in chunks)
    assert "Paragraph 9." in chunks[-1]
