"""Opt-in cross-check: the MoE GGUF files the tests write are read by llama.cpp itself the way
tokenmill reads them. With ``TOKENMILL_LLAMA_SERVER=/path/to/llama-server`` set, llama.cpp's server
(on loopback) must continue a prompt with transformers' greedy tokens; skipped otherwise. This
checks the test writer's tensor names, shapes, metadata and q/k permutation against the real
reader, so the GGUF half of tests/models/test_moe_models.py is not only self-consistent."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.models.moe_support import FAMILIES, hf_greedy, make_hf_moe, write_moe_gguf
from tests.server_fixture import free_port

LLAMA_SERVER = os.environ.get("TOKENMILL_LLAMA_SERVER")
pytestmark = pytest.mark.skipif(not LLAMA_SERVER, reason="set TOKENMILL_LLAMA_SERVER to run")


@pytest.mark.parametrize("family", FAMILIES)
def test_llama_cpp_reads_the_moe_gguf_like_transformers(family, tmp_path, builtin_source,
                                                       hf_builtin_tokenizer):
    reference = make_hf_moe(family)
    path = write_moe_gguf(reference, family, tmp_path / f"{family}.gguf", builtin_source.path)
    ids = hf_builtin_tokenizer.encode("Experts route each token: a short prompt with a few words.")
    expected, margin = hf_greedy(reference, ids, 8)
    assert margin > 1e-3
    port = free_port()
    binary = Path(LLAMA_SERVER)
    env = {**os.environ, "LD_LIBRARY_PATH": str(binary.parent)}
    with (tmp_path / "llama-server.log").open("w") as log:
        process = subprocess.Popen(
            [str(binary), "-m", str(path), "--host", "127.0.0.1", "--port", str(port), "-t", "1",
             "-c", "256", "--no-warmup"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert process.poll() is None, (tmp_path / "llama-server.log").read_text()
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        response = httpx.post(url + "/completion", timeout=60, json={
            "prompt": ids, "n_predict": len(expected), "temperature": 0, "top_k": 1,
            "ignore_eos": True, "return_tokens": True, "cache_prompt": False})
        assert response.json()["tokens"] == expected
    finally:
        process.terminate()
        process.wait(timeout=30)
