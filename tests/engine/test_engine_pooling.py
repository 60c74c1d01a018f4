"""Pooling (embedding) requests in the engine: the vector is the model's own final hidden state
at the last prompt token ("last") or their mean over the prompt ("mean"), whole or chunked, on a
prefix-cache hit, batched with generation; nothing is sampled and no block is kept."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from tokenmill.layers.attention import causal_metadata
from tokenmill.sampling_params import SamplingParams

TEXTS = ["A short sentence about cats.",
         ("Embeddings map text to vectors; this one is long enough to span several chunks of "
          "sixteen tokens each, so the mean is summed over more than one step of the engine.")]


def hidden_states(llm: Any, ids: list[int]) -> torch.Tensor:
    model = llm.engine.runner.model
    with torch.inference_mode():
        return model(torch.tensor(ids), torch.arange(len(ids)), causal_metadata([len(ids)]))


@pytest.mark.parametrize("budget", [512, 16], ids=["whole", "chunked"])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_pooled_vectors_match_a_direct_forward_pass(make_llm: Any, driver: Any, budget: int,
                                                    pooling: str) -> None:
    llm = make_llm(max_num_batched_tokens=budget)
    for round_ in range(2):  # the second time the prompts are in the prefix cache
        ids = []
        for index, text in enumerate(TEXTS):
            _, prompt = llm.input_processor.tokenize_prompt(text)
            children = llm.input_processor.make_requests(f"pool-{pooling}-{round_}-{index}",
                                                         prompt, SamplingParams(),
                                                         pooling=pooling)
            for child in children:
                llm.engine.add_request(child)
            llm.output_processor.add_request(children[0].request_id.split("#")[0], text,
                                             children)
            ids.append(prompt)
        # a generation request in the same batches
        (generating,) = driver.add(llm, ["Once upon a time"], SamplingParams(max_tokens=3),
                                   prefix=f"gen-{pooling}-{round_}")
        run = driver.SteppedRun()
        while llm.engine.has_unfinished_requests():
            driver.step(llm, run)
        assert len(run.final[generating].outputs[0].token_ids) == 3
        for index, prompt in enumerate(ids):
            final = run.final[f"pool-{pooling}-{round_}-{index}"]
            assert final.finished and final.outputs[0].token_ids == []
            hidden = hidden_states(llm, prompt)
            expected = hidden[-1] if pooling == "last" else hidden.mean(dim=0)
            got = torch.tensor(final.embedding)
            assert got.shape == expected.shape
            assert torch.allclose(got, expected, atol=2e-3, rtol=1e-3), (
                (got - expected).abs().max())
