"""Request bodies of the OpenAI-compatible endpoints, as pydantic models.

Models are strict (``"0.5"`` is not a number, ``true`` is not an integer) and forbid unknown fields,
as OpenAI does, so a typo such as ``max_token`` is a 400 naming it rather than silently ignored.
Beyond OpenAI's fields they accept the engine's extras (vLLM's names): ``top_k``, ``min_p``,
``repetition_penalty``, ``min_tokens``, ``ignore_eos``, ``stop_token_ids``,
``include_stop_str_in_output``, ``skip_special_tokens``, ``cache_salt``, ``priority`` (lower is
more urgent; ``priority.py``) and (completions) ``prompt_logprobs``. Structured output
(``response_format``, vLLM's ``structured_outputs`` and ``guided_*``) comes from
``structured_output.py`` and is taken by both endpoints. A few OpenAI fields that change nothing
here (``user``, ``metadata``, ``store``, ...) are accepted and ignored; ones we cannot honour
(``suffix``, ``best_of`` > n) are refused. Tool calls (``tools``, ``tool_choice``, assistant
``tool_calls``, ``tool`` messages) come from ``tool_protocol.py``.

Ranges are checked by ``SamplingParams`` (one source of truth); these models check shapes only,
but their published schema (``/openapi.json``) states the real unions and ranges through the types
of ``schema_types.py``, so generated clients and fuzzers send what the server accepts.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tokenmill.errors import InvalidRequestError
from tokenmill.server.openai.priority import PRIORITY_LIMIT
from tokenmill.server.openai.schema_types import (
    CompletionLength,
    LogitBias,
    MessageContent,
    MinP,
    MinTokens,
    ModelName,
    NumChoices,
    NumLogprobs,
    OutputLength,
    Penalty,
    Prompt,
    RepetitionPenalty,
    Seed,
    Stop,
    Suffix,
    Temperature,
    TokenId,
    TopK,
    TopP,
    cross_field_rules,
    exactly_one,
    integral,
    only_with,
)
from tokenmill.server.openai.structured_output import StructuredOutputFields
from tokenmill.server.openai.tool_protocol import ToolCall, ToolFields

# Union-typed fields (prompt, stop, content) are validated by hand: pydantic's union errors name
# every member type, which reads worse than one sentence saying what is allowed. Checks across
# fields raise InvalidRequestError directly (pydantic lets non-ValueErrors through) so the error
# names the offending field rather than the whole body.


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's name; accepted, usage is sent at the end only


def _check_stop(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return value
    raise ValueError("must be a string or a list of strings")


def _token_ids(value: Any) -> list[int] | None:
    """``value`` as a list of token ids (16.0 counts as 16), or None if it is not one."""
    if not isinstance(value, list):
        return None
    ids = [integral(t) for t in value]
    if all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        return ids
    return None


class SamplingFields(StructuredOutputFields):
    """Fields both endpoints share; ``to_sampling_kwargs`` maps them onto ``SamplingParams``."""

    model: ModelName
    n: NumChoices = 1
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    stop: Stop = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    logit_bias: LogitBias | None = None
    user: str | None = None
    # engine extras
    top_k: TopK | None = None
    min_p: MinP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    min_tokens: MinTokens = 0
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    cache_salt: str | None = Field(default=None, min_length=1)
    # vLLM's: lower is more urgent; absent = the gateway's tenant header, else 0 (priority.py)
    priority: int | None = Field(default=None, ge=-PRIORITY_LIMIT, le=PRIORITY_LIMIT)

    @field_validator("stop", mode="before")
    @classmethod
    def _check_stop_field(cls, value: Any) -> Any:
        return _check_stop(value)

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed when stream is true",
                                      param="stream_options")
        return self

    @property
    def include_usage_in_stream(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def to_sampling_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "n": self.n, "seed": self.seed, "stop": self.stop,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty, "logit_bias": self.logit_bias,
            "min_tokens": self.min_tokens, "ignore_eos": self.ignore_eos,
            "stop_token_ids": self.stop_token_ids or [],
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "skip_special_tokens": self.skip_special_tokens,
            "structured_output": self.grammar_spec(),
        }
        # Unset fields keep SamplingParams' defaults (temperature 1, top_p 1, as OpenAI's).
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if value is not None:
                kwargs[name] = value
        return kwargs


class CompletionRequest(SamplingFields):
    model_config = ConfigDict(json_schema_extra=cross_field_rules(
        only_with("stream_options", "stream")))

    prompt: Prompt
    # OpenAI's documented default; 0 generates nothing (echo + logprobs then scores the prompt)
    max_tokens: CompletionLength | None = 16
    echo: bool = False
    logprobs: NumLogprobs | None = None
    prompt_logprobs: NumLogprobs | None = None  # vLLM's: scores of the prompt tokens, top-k
    best_of: NumChoices | None = None
    suffix: Suffix | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, value: Any) -> Any:
        allowed = ("must be a non-empty string, a list of strings, a list of token ids or a "
                   "list of token-id lists")
        if isinstance(value, str):
            return value
        if not isinstance(value, list) or not value:
            raise ValueError(allowed)
        if all(isinstance(p, str) for p in value):
            return value
        ids = _token_ids(value)
        if ids is not None:
            return ids
        id_lists = [_token_ids(p) for p in value]
        if all(id_list for id_list in id_lists):  # each a non-empty list of ids
            return id_lists
        raise ValueError(allowed)

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> CompletionRequest:
        if self.suffix:
            raise InvalidRequestError("suffix is not supported (insertion needs a "
                                      "fill-in-the-middle model)", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequestError("best_of is not supported unless it equals n",
                                      param="best_of")
        return self

    @property
    def num_prompt_logprobs(self) -> int | None:
        """Top alternatives the engine must return per prompt token (echo with logprobs, or
        prompt_logprobs; the larger of the two), None when the prompt is not scored."""
        wanted = [k for k in (self.logprobs if self.echo else None, self.prompt_logprobs)
                  if k is not None]
        return max(wanted) if wanted else None

    def to_sampling_kwargs(self) -> dict[str, Any]:
        return {**super().to_sampling_kwargs(), "prompt_logprobs": self.num_prompt_logprobs}

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and isinstance(prompt[0], int):
            return [prompt]
        return list(prompt)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: MessageContent = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = Field(default=None, description=(
        "Assistant messages only: the calls the assistant made."))
    tool_call_id: str | None = Field(default=None, description=(
        "Tool messages only (and required there): the id of the call this result answers."))

    @field_validator("content", mode="before")
    @classmethod
    def _check_content(cls, value: Any) -> Any:
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, list):
            parts = []
            for i, part in enumerate(value):
                if not (isinstance(part, dict) and part.get("type") == "text"
                        and isinstance(part.get("text"), str) and set(part) <= {"type", "text"}):
                    raise ValueError(f"part {i} must be a text part {{\"type\": \"text\", "
                                     "\"text\": ...}; image, audio and file parts are not "
                                     "supported")
                parts.append(TextPart(type="text", text=part["text"]))
            return parts
        raise ValueError("must be a string or a list of text parts")

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)

    def for_template(self) -> dict[str, str]:
        # The chat template knows system/user/assistant; OpenAI's "developer" is the new "system".
        role = "system" if self.role == "developer" else self.role
        return {"role": role, "content": self.text()}


class ChatCompletionRequest(ToolFields, SamplingFields):
    model_config = ConfigDict(json_schema_extra=cross_field_rules(
        only_with("stream_options", "stream"), only_with("top_logprobs", "logprobs")))

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: OutputLength | None = None  # deprecated by OpenAI: max_completion_tokens
    max_completion_tokens: OutputLength | None = None
    logprobs: bool = False
    top_logprobs: NumLogprobs | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _check_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs set to true",
                                      param="top_logprobs")
        return self

    @property
    def requested_max_tokens(self) -> tuple[str, int | None]:
        """The field the client used for the output length (for error messages) and its value."""
        if self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return "max_tokens", self.max_tokens


class TokenizeRequest(_Strict):
    model_config = ConfigDict(json_schema_extra=cross_field_rules(
        exactly_one("prompt", "messages")))

    model: ModelName | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool = True
    add_generation_prompt: bool = True

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        if (self.prompt is None) == (self.messages is None):
            raise InvalidRequestError("give exactly one of prompt or messages",
                                      param="prompt")
        return self


class DetokenizeRequest(_Strict):
    model: ModelName | None = None
    tokens: list[TokenId]
