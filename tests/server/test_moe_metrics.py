"""An MoE model behind `tokenmill serve`: /metrics carries a routed-token counter per layer and
expert, whose per-layer sums are tokens x top-k, and an expert-load imbalance gauge per layer."""

from __future__ import annotations

import httpx

from tests.models.moe_support import make_hf_moe, save_folder
from tests.server.conftest import scrape
from tests.server_fixture import ServerProcess


def test_moe_routing_metrics(tmp_path, hf_builtin_tokenizer):
    reference = make_hf_moe("qwen2_moe")
    folder = save_folder(reference, tmp_path / "tiny-qwen2-moe", hf_builtin_tokenizer, True)
    top_k = reference.config.num_experts_per_tok
    num_experts = reference.config.num_experts
    num_layers = reference.config.num_hidden_layers
    server = ServerProcess("--model", str(folder), "--dtype", "float32").wait_ready()
    try:
        response = httpx.post(server.url + "/v1/completions", timeout=120, json={
            "model": folder.name, "prompt": "Count the experts: one, two, three,",
            "max_tokens": 6, "temperature": 0})
        assert response.status_code == 200, response.text
        usage = response.json()["usage"]
        # the prompt and every sampled token but the last went through every sparse layer
        num_tokens = usage["prompt_tokens"] + usage["completion_tokens"] - 1
        samples = scrape(server.url)
        for layer in range(num_layers):
            routed = [samples[("tokenmill:moe_routed_tokens_total",
                               (("expert", str(e)), ("layer", str(layer))))]
                      for e in range(num_experts)]
            assert sum(routed) == num_tokens * top_k
            imbalance = samples[("tokenmill:moe_expert_load_imbalance",
                                 (("layer", str(layer)),))]
            assert 1.0 <= imbalance <= num_experts / top_k
    finally:
        server.stop()
