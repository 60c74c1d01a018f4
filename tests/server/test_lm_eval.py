"""lm-evaluation-harness's ``local-completions`` model runs a small loglikelihood task (four
hand-written multiple-choice items, ``lm_eval_task/``) against a real `tokenmill serve`: every
answer's log-likelihood is the model's own, computed here with a direct forward pass.

lm_eval sends ``echo: true, logprobs: 1, max_tokens: 1`` with token-id prompts and reads
``token_logprobs[ctxlen:-1]`` of each choice; it tokenizes with the model's tokenizer, saved here
from the GGUF file as a Hugging Face tokenizer folder (nothing is downloaded).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.server.conftest import MODEL
from tokenmill.layers.attention import causal_metadata

TASK_DIR = Path(__file__).parent / "lm_eval_task"

lm_eval = pytest.importorskip("lm_eval")


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("lm_eval_task")
    yaml = (TASK_DIR / "tiny_mc.yaml").read_text()
    (folder / "tiny_mc.yaml").write_text(
        yaml.replace("DATA_FILE", str(TASK_DIR / "tiny_mc.jsonl")))
    return folder


def continuation_logprob(llm, context: list[int], continuation: list[int]) -> float:
    ids = context + continuation
    model = llm.engine.runner.model
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.arange(len(ids)), causal_metadata([len(ids)]))
        logprobs = torch.log_softmax(model.compute_logits(hidden), dim=-1)
    return sum(logprobs[p - 1][ids[p]].item() for p in range(len(context), len(ids)))


def test_local_completions_loglikelihood_task(tokenmill_server, llm, hf_builtin_tokenizer,
                                              task_dir, tmp_path, monkeypatch):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    tokenizer_dir = tmp_path / "tokenizer"
    hf_builtin_tokenizer.save_pretrained(tokenizer_dir)
    results = simple_evaluate(
        model="local-completions",
        model_args={"model": MODEL, "base_url": tokenmill_server.url + "/v1/completions",
                    "tokenizer_backend": "huggingface", "tokenizer": str(tokenizer_dir),
                    "num_concurrent": 1, "max_retries": 1},
        tasks=["tokenmill_tiny_mc"], task_manager=TaskManager(include_path=str(task_dir)),
        log_samples=True, batch_size=1)
    accuracy = results["results"]["tokenmill_tiny_mc"]["acc,none"]
    assert 0.0 <= accuracy <= 1.0
    samples = results["samples"]["tokenmill_tiny_mc"]
    assert len(samples) == 4
    for sample in samples:
        assert len(sample["arguments"]) == len(sample["resps"]) == 3
        for (context, continuation), response in zip(sample["arguments"], sample["resps"]):
            whole = hf_builtin_tokenizer.encode(context + continuation)
            context_ids = hf_builtin_tokenizer.encode(context)
            want = continuation_logprob(llm, context_ids, whole[len(context_ids):])
            loglikelihood = response[0][0]
            assert loglikelihood == pytest.approx(want, abs=1e-2)
