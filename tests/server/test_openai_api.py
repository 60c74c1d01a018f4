"""The official `openai` client against a real `tokenmill serve`: completions and chat, streaming
and not, n, stop, seed, logprobs, echo, token-id prompts, usage."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.server.conftest import MODEL
from tokenmill.sampling_params import SamplingParams

GREEDY = {"temperature": 0, "max_tokens": 12}
EXTRAS = ("top_k", "min_p", "repetition_penalty", "min_tokens", "ignore_eos", "cache_salt")


def test_models_lists_the_served_model(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL]


def test_completion_and_its_stream_give_the_same_text(client, tokenmill_server):
    prompt = "The three primary colors are"
    whole = client.completions.create(model=MODEL, prompt=prompt, **GREEDY)
    assert whole.choices[0].text.strip()
    assert whole.choices[0].finish_reason in ("length", "stop")
    assert whole.usage.prompt_tokens == len(httpx.post(
        tokenmill_server.url + "/tokenize", json={"prompt": prompt}).json()["tokens"])
    assert whole.usage.completion_tokens <= GREEDY["max_tokens"]

    chunks = list(client.completions.create(model=MODEL, prompt=prompt, stream=True,
                                            stream_options={"include_usage": True}, **GREEDY))
    streamed = "".join(c.choices[0].text for c in chunks if c.choices)
    assert streamed == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == \
        whole.choices[0].finish_reason


def test_chat_and_its_stream_give_the_same_text(client):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": [{"type": "text", "text": "Name a fruit."}]}]
    whole = client.chat.completions.create(model=MODEL, messages=messages,
                                           max_completion_tokens=16, temperature=0)
    answer = whole.choices[0].message
    assert answer.role == "assistant" and answer.content
    chunks = list(client.chat.completions.create(
        model=MODEL, messages=messages, max_completion_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in with_choices) == answer.content
    assert with_choices[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_chat_answer_matches_llm_generate_on_the_templated_prompt(client, llm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    served = client.chat.completions.create(model=MODEL, messages=messages, temperature=0,
                                            max_tokens=20)
    rendered = llm.input_processor.render_chat(messages)
    prompt_ids = llm.tokenizer.encode(rendered, add_special_tokens=False)
    [expected] = llm.generate([prompt_ids], SamplingParams(temperature=0, max_tokens=20),
                              use_tqdm=False)
    assert "Paris" in served.choices[0].message.content
    assert served.choices[0].message.content == expected.outputs[0].text
    assert served.usage.prompt_tokens == len(prompt_ids)
    assert served.usage.completion_tokens == len(expected.outputs[0].token_ids)


def test_n_and_several_prompts_number_choices_as_openai(client):
    prompts = ["One, two, three,", "Monday, Tuesday,"]
    result = client.completions.create(model=MODEL, prompt=prompts, n=2, **GREEDY)
    assert [c.index for c in result.choices] == [0, 1, 2, 3]
    singles = [client.completions.create(model=MODEL, prompt=p, **GREEDY).choices[0].text
               for p in prompts]
    # greedy: both samples of a prompt are that prompt's answer
    assert [c.text for c in result.choices] == [singles[0], singles[0], singles[1], singles[1]]
    # prompt tokens count once per prompt, completion tokens over all four choices
    prompt_lengths = [client.completions.create(model=MODEL, prompt=p, max_tokens=1)
                      .usage.prompt_tokens for p in prompts]
    assert result.usage.prompt_tokens == sum(prompt_lengths)
    assert result.usage.completion_tokens == sum(
        client.completions.create(model=MODEL, prompt=p, **GREEDY).usage.completion_tokens
        for p in prompts) * 2

    stream = client.completions.create(model=MODEL, prompt=prompts, n=2, stream=True, **GREEDY)
    texts = {i: "" for i in range(4)}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
    assert list(texts.values()) == [c.text for c in result.choices]


def test_seed_reproduces_sampled_text(client):
    kwargs = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 16, "temperature": 1.0,
              "n": 2}
    first = client.completions.create(seed=1234, **kwargs)
    again = client.completions.create(seed=1234, **kwargs)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]


def test_stop_string_cuts_the_text(client):
    prompt = "Write the numbers: one, two, three, four, five, six"
    full = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=24)
    cut = client.completions.create(model=MODEL, prompt=prompt, temperature=0, max_tokens=24,
                                    stop=[","])
    assert "," in full.choices[0].text, "the reference text must contain the stop string"
    assert cut.choices[0].text == full.choices[0].text.split(",")[0]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=MODEL, prompt=prompt, temperature=0, max_tokens=24, stop=[","], stream=True))
    assert streamed == cut.choices[0].text


def test_completion_logprobs(client):
    result = client.completions.create(model=MODEL, prompt="The sky is", logprobs=3, **GREEDY)
    choice = result.choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == result.usage.completion_tokens
    assert "".join(logprobs.tokens) == choice.text
    assert all(lp <= 0 for lp in logprobs.token_logprobs)
    for token, lp, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs,
                              strict=True):
        assert top[token] == lp and 3 <= len(top) <= 4
        assert max(top.values()) == lp  # greedy: the chosen token is the most likely
    offsets = logprobs.text_offset
    assert offsets[0] == 0
    assert all(b - a == len(t) for a, b, t in zip(offsets, offsets[1:], logprobs.tokens))


def test_chat_logprobs(client):
    result = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Say hi."}], temperature=0,
        max_tokens=8, logprobs=True, top_logprobs=2)
    content = result.choices[0].logprobs.content
    assert len(content) == result.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert bytes(entry.bytes).decode("utf-8", "replace") == entry.token


def test_echo_and_token_id_prompts(client, tokenmill_server):
    prompt = "Roses are red,"
    echoed = client.completions.create(model=MODEL, prompt=prompt, echo=True, **GREEDY)
    plain = client.completions.create(model=MODEL, prompt=prompt, **GREEDY)
    assert echoed.choices[0].text == prompt + plain.choices[0].text
    ids = httpx.post(tokenmill_server.url + "/tokenize", json={"prompt": prompt}).json()["tokens"]
    by_ids = client.completions.create(model=MODEL, prompt=ids, **GREEDY)
    assert by_ids.choices[0].text == plain.choices[0].text
    batch = client.completions.create(model=MODEL, prompt=[ids, ids], **GREEDY)
    assert [c.text for c in batch.choices] == [plain.choices[0].text] * 2
    detok = httpx.post(tokenmill_server.url + "/detokenize", json={"tokens": ids}).json()
    assert detok["prompt"] == prompt


def test_engine_extras_and_penalties_are_accepted_and_act(client, tokenmill_server):
    """Each extra changes what comes back, on prompts where the built-in model (float32, as the
    session server runs it) shows it: not only accepted, but acting."""
    def text(prompt: str, **fields) -> str:
        extra = {k: fields.pop(k) for k in list(fields) if k in EXTRAS}
        answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8,
                                           extra_body=extra, **fields)
        return answer.choices[0].text

    base = {"model": MODEL, "prompt": "Hello", "max_tokens": 8, "temperature": 0}
    plain = client.completions.create(logprobs=0, **base)
    first_token = plain.choices[0].logprobs.tokens[0]
    [first_id] = httpx.post(tokenmill_server.url + "/tokenize",
                            json={"prompt": first_token, "add_special_tokens": False}
                            ).json()["tokens"]
    # A strong negative bias on the greedy first token makes the model pick another one.
    biased = client.completions.create(logit_bias={str(first_id): -100}, logprobs=0, **base)
    assert biased.choices[0].logprobs.tokens[0] != first_token

    # Sampling hot (temperature 3, seeded) wanders off the greedy text; keeping only the top
    # token (top_k 1), or only tokens as likely as the top one (min_p 1), brings it back.
    greedy = text("Hello", temperature=0)
    assert text("Hello", temperature=3.0, seed=1) != greedy
    assert text("Hello", temperature=3.0, seed=1, top_k=1) == greedy
    assert text("Hello", temperature=3.0, seed=1, min_p=1.0) == greedy

    # Penalties steer greedy text away from what it already said.
    cat = "The cat sat on the mat. The cat sat on the"
    assert text(cat, temperature=0) == " mat. The cat sat on the mat"
    assert text(cat, temperature=0, presence_penalty=2.0) != " mat. The cat sat on the mat"
    count = "1, 2, 3, 4,"
    assert text(count, temperature=0) == " 5, 6, 7"
    assert text(count, temperature=0, frequency_penalty=2.0) != " 5, 6, 7"
    assert text("Hello", temperature=0, repetition_penalty=2.0) != greedy

    # This chat-formatted prompt ends (end-of-turn token) after 13 tokens; min_tokens holds the
    # end back, ignore_eos goes on to max_tokens.
    chat = "<|im_start|>user\nSay OK.<|im_end|>\n<|im_start|>assistant\n"

    def usage(**fields) -> tuple[int, str]:
        answer = client.completions.create(model=MODEL, prompt=chat, max_tokens=40,
                                           temperature=0, extra_body=fields)
        return answer.usage.completion_tokens, answer.choices[0].finish_reason

    assert usage() == (13, "stop")
    assert usage(min_tokens=20)[0] >= 20
    assert usage(ignore_eos=True) == (40, "length")

    # cache_salt: the same prompt under the same salt hits the prefix cache; under another salt
    # (another tenant) it does not.
    prompt = f"Tenant notes {uuid.uuid4().hex}: " + "the quick brown fox jumps over it " * 8

    def cached(salt: str) -> int:
        answer = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1,
                                           temperature=0, extra_body={"cache_salt": salt})
        return answer.usage.prompt_tokens_details.cached_tokens

    assert cached("tenant-a") == 0
    assert cached("tenant-a") >= 64  # whole 16-token blocks of the 70-odd-token prompt
    assert cached("tenant-b") == 0
