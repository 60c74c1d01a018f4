"""The Python API on the built-in model: greedy continuations equal transformers' `generate`."""

from __future__ import annotations

import pytest
import torch

from tokenmill import SamplingParams

NUM_TOKENS = 32
# Only prompts whose greedy path never comes near a tie are compared: our logits differ from
# transformers' by < 1e-4, so a 0.1 margin is a thousand times that; near-ties such as the 0.08 of the
# chat prompt "What is the capital of France?" are left out. (Margins measured with transformers.)
MIN_MARGIN = 0.1
CANDIDATES = [
    "1, 2, 3, 4, 5, 6, 7, 8,",
    "import numpy as np\nimport pandas as pd\nimport",
    "A, B, C, D, E, F,",
    "<|im_start|>user\nList the planets of the solar system.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWhat is 12 times 12?<|im_end|>\n<|im_start|>assistant\n",
    ("<|im_start|>user\nWrite a Python function that adds two numbers.<|im_end|>\n"
     "<|im_start|>assistant\n"),
]


@pytest.fixture(scope="module")
def reference_continuations(builtin_source, hf_builtin_model):
    """transformers' greedy continuation of each candidate, and its smallest top-2 margin.

    Greedy by full forward passes rather than ``generate()``: on this model transformers' own
    ``generate`` drifts from its forward pass by up to ~0.07 logits (seen on "What is 12 times
    12?", token 3), which is exactly the near-tie noise these prompts are chosen to avoid.
    """
    results = {}
    for prompt in CANDIDATES:
        ids = builtin_source.tokenizer.encode(prompt)
        generated, margins = [], []
        with torch.inference_mode():
            for _ in range(NUM_TOKENS):
                logits = hf_builtin_model(torch.tensor([ids + generated])).logits[0, -1]
                top2 = logits.topk(2)
                margins.append((top2.values[0] - top2.values[1]).item())
                generated.append(int(top2.indices[0]))
        results[prompt] = (generated, min(margins))
    return results


def test_greedy_continuations_match_transformers(llm, reference_continuations,
                                                 assert_no_leaked_blocks):
    clear = [p for p, (_, margin) in reference_continuations.items() if margin >= MIN_MARGIN]
    assert len(clear) >= 4, "too few clear-margin prompts to compare on"
    params = SamplingParams(max_tokens=NUM_TOKENS, temperature=0, ignore_eos=True)
    outputs = llm.generate(clear, params, use_tqdm=False)
    for prompt, output in zip(clear, outputs):
        expected, _ = reference_continuations[prompt]
        assert output.outputs[0].token_ids == expected, prompt
        assert output.outputs[0].text == llm.tokenizer.decode(expected, skip_special_tokens=True)


def test_generate_accepts_one_prompt_token_ids_and_chat(llm, assert_no_leaked_blocks):
    params = SamplingParams(max_tokens=8, temperature=0)
    by_text = llm.generate("The chemical symbol for water is", params)[0]
    ids = llm.tokenizer.encode("The chemical symbol for water is")
    by_ids = llm.generate([ids], params)[0]
    assert by_text.outputs[0].token_ids == by_ids.outputs[0].token_ids
    assert by_text.prompt_token_ids == ids
    chat = llm.chat([{"role": "user", "content": "Say hello."}], params)[0]
    assert chat.prompt.startswith("<|im_start|>system")
    assert chat.outputs[0].text


def test_eos_ends_generation_with_stop(llm, assert_no_leaked_blocks):
    chat = llm.chat([{"role": "user", "content": "Reply with one word: yes or no?"}],
                    SamplingParams(max_tokens=200, temperature=0))[0]
    completion = chat.outputs[0]
    assert completion.finish_reason == "stop"
    assert len(completion.token_ids) < 200
    assert completion.token_ids[-1] == llm.tokenizer.eos_token_id
    assert "<|im_end|>" not in completion.text
