"""How one request wants its tokens chosen: ``SamplingParams``, validated once at construction.

Semantics follow vLLM (and so the OpenAI API the server exposes): ``temperature=0`` is greedy,
``top_k`` 0 or -1 is off, penalties use OpenAI's ranges. Every bad value raises
``InvalidSamplingParamsError`` naming the field, the value and what is allowed, before anything is
scheduled. The object is frozen because the frontend shares one instance between the ``n`` child
requests it fans out; derive variants with ``dataclasses.replace`` (which validates again).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field
from typing import Any

from tokenmill.errors import InvalidSamplingParamsError
from tokenmill.structured_output.spec import GrammarSpec

# Below this a temperature is numerically indistinguishable from greedy (dividing logits by it
# overflows), so such requests are treated as greedy, as vLLM does.
GREEDY_TEMPERATURE_EPS = 1e-5
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0
MAX_N = 128
"""Most samples one request may ask for (OpenAI's own limit): each is a request in the engine."""
MAX_ABS_PENALTY = 2.0


def _fail(name: str, value: Any, allowed: str) -> InvalidSamplingParamsError:
    return InvalidSamplingParamsError(f"{name} must be {allowed}, got {value!r}", param=name)


def _as_int(name: str, value: Any, allowed: str) -> int:
    # bool is an int subclass, but `max_tokens=True` is always a mistake.
    if isinstance(value, bool):
        raise _fail(name, value, allowed)
    if isinstance(value, int):
        return value
    # JSON clients sometimes send 16.0; accept integral floats, nothing else.
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise _fail(name, value, allowed)


def _as_float(name: str, value: Any, allowed: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(name, value, allowed)
    value = float(value)
    if not math.isfinite(value):  # NaN passes every range check below; refuse it here.
        raise _fail(name, value, allowed)
    return value


def _as_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise _fail(name, value, "true or false")
    return value


@dataclass(frozen=True)
class SamplingParams:
    n: int = 1
    """Number of independent completions of the prompt (they share the prompt's KV blocks)."""
    temperature: float = 1.0
    """Softmax temperature; 0 means greedy (always the most likely token)."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p, in (0, 1]."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 or -1 turns it off (stored as 0)."""
    min_p: float = 0.0
    """Drop tokens whose probability is below min_p times the top token's, in [0, 1]."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens whatever else is in the batch."""
    presence_penalty: float = 0.0
    """Subtracted once from the logit of every token already generated, in [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtracted per occurrence from the logit of every token already generated, in [-2, 2]."""
    repetition_penalty: float = 1.0
    """Divides positive (multiplies negative) logits of prompt and output tokens; > 0, 1 is off."""
    logit_bias: dict[int, float] | None = None
    """Token id -> bias added to its logit, each in [-100, 100]."""
    stop: list[str] = field(default_factory=list)
    """Strings that end the completion (checked by the frontend across token boundaries)."""
    stop_token_ids: list[int] = field(default_factory=list)
    """Token ids that end the completion (in addition to the model's end-of-sequence token)."""
    include_stop_str_in_output: bool = False
    """Keep the matched stop string at the end of the text."""
    max_tokens: int | None = 16
    """Most tokens to generate; None means up to the model's context length. 0 generates nothing:
    the prompt is only run through the model to score it (needs ``prompt_logprobs``)."""
    min_tokens: int = 0
    """End-of-sequence and stop tokens are ignored until this many tokens were generated."""
    ignore_eos: bool = False
    """Keep generating past the end-of-sequence token (for benchmarks)."""
    logprobs: int | None = None
    """Return the log probability of each chosen token plus this many top alternatives (0..20)."""
    prompt_logprobs: int | None = None
    """Return the log probability of each prompt token (after the first) given the tokens before
    it, its rank, and this many top alternatives (0..20). Computed in the prefill pass; such a
    request does not read the prefix cache (the cached part would have no logits)."""
    skip_special_tokens: bool = True
    """Leave special tokens out of the decoded text."""
    structured_output: GrammarSpec | None = None
    """Constrain the output to a JSON Schema, a regex, a choice list or a grammar (see
    ``tokenmill.structured_output``); the output ends with "stop" once it is complete."""

    def __post_init__(self) -> None:
        # Frozen: normalised values are written with object.__setattr__, once, here.
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        n_allowed = f"an integer in [1, {MAX_N}]"
        put("n", _as_int("n", self.n, n_allowed))
        if not 1 <= self.n <= MAX_N:  # each sample is a request: a huge n would stall admission
            raise _fail("n", self.n, n_allowed)

        temperature = _as_float("temperature", self.temperature, "a number >= 0 (0 is greedy)")
        if temperature < 0:
            raise _fail("temperature", temperature, "a number >= 0 (0 is greedy)")
        put("temperature", temperature)

        top_p = _as_float("top_p", self.top_p, "a number in (0, 1]")
        if not 0.0 < top_p <= 1.0:
            raise _fail("top_p", top_p, "a number in (0, 1]")
        put("top_p", top_p)

        top_k_allowed = "an integer >= 1, or 0 / -1 to turn it off"
        top_k = _as_int("top_k", self.top_k, top_k_allowed)
        if top_k < -1:
            raise _fail("top_k", top_k, top_k_allowed)
        put("top_k", max(top_k, 0))

        min_p = _as_float("min_p", self.min_p, "a number in [0, 1]")
        if not 0.0 <= min_p <= 1.0:
            raise _fail("min_p", min_p, "a number in [0, 1]")
        put("min_p", min_p)

        if self.seed is not None:
            put("seed", _as_int("seed", self.seed, "an integer or null"))

        for name in ("presence_penalty", "frequency_penalty"):
            allowed = f"a number in [-{MAX_ABS_PENALTY:g}, {MAX_ABS_PENALTY:g}]"
            value = _as_float(name, getattr(self, name), allowed)
            if not -MAX_ABS_PENALTY <= value <= MAX_ABS_PENALTY:
                raise _fail(name, value, allowed)
            put(name, value)

        rep = _as_float("repetition_penalty", self.repetition_penalty, "a number > 0 (1 is off)")
        if rep <= 0:
            raise _fail("repetition_penalty", rep, "a number > 0 (1 is off)")
        put("repetition_penalty", rep)

        put("logit_bias", self._validated_logit_bias(self.logit_bias))
        put("stop", self._validated_stop(self.stop))
        put("stop_token_ids", self._validated_stop_token_ids(self.stop_token_ids))

        if self.max_tokens is not None:
            # 0 only scores the prompt: without prompt_logprobs it would compute nothing useful
            allowed = ("an integer >= 1 or null (0 only to score the prompt: with "
                       "prompt_logprobs, or echo with logprobs on /v1/completions)")
            put("max_tokens", _as_int("max_tokens", self.max_tokens, allowed))
            if self.max_tokens < 0 or (self.max_tokens == 0 and self.prompt_logprobs is None):
                raise _fail("max_tokens", self.max_tokens, allowed)
        put("min_tokens", _as_int("min_tokens", self.min_tokens, "an integer >= 0"))
        if self.min_tokens < 0:
            raise _fail("min_tokens", self.min_tokens, "an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise _fail("min_tokens", self.min_tokens,
                        f"at most max_tokens ({self.max_tokens})")

        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                allowed = f"an integer in [0, {MAX_LOGPROBS}] or null"
                put(name, _as_int(name, value, allowed))
                if not 0 <= getattr(self, name) <= MAX_LOGPROBS:
                    raise _fail(name, value, allowed)

        for name in ("include_stop_str_in_output", "ignore_eos", "skip_special_tokens"):
            _as_bool(name, getattr(self, name))

        if self.structured_output is not None:
            # a mapping is what to_dict() wrote (or a YAML file holds)
            put("structured_output", GrammarSpec.from_dict(self.structured_output))

    @staticmethod
    def _validated_logit_bias(raw: Any) -> dict[int, float] | None:
        if raw is None:
            return None
        if not isinstance(raw, dict):
            raise _fail("logit_bias", raw, "a mapping of token id to bias")
        bias: dict[int, float] = {}
        allowed = f"a number in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]"
        for key, value in raw.items():
            # JSON object keys are strings: {"50256": -100} is the OpenAI API's own form. ASCII
            # digits only: str.isdigit() also takes "²" or "٣", which int() refuses or reads
            # as another number.
            token_id = key
            if isinstance(key, str) and key.isascii() and key.isdigit():
                token_id = int(key)
            if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
                raise _fail("logit_bias", key, "keyed by token ids (integers >= 0)")
            number = _as_float("logit_bias", value, allowed)
            if not -MAX_LOGIT_BIAS <= number <= MAX_LOGIT_BIAS:
                raise InvalidSamplingParamsError(
                    f"logit_bias[{token_id}] must be {allowed}, got {number!r}", param="logit_bias")
            bias[token_id] = number
        return bias

    @staticmethod
    def _validated_stop(raw: Any) -> list[str]:
        if raw is None:
            return []
        if isinstance(raw, str):
            raw = [raw]
        if not isinstance(raw, (list, tuple)):
            raise _fail("stop", raw, "a string or a list of strings")
        for item in raw:
            if not isinstance(item, str) or not item:
                raise _fail("stop", item, "a non-empty string")
        return list(raw)

    @staticmethod
    def _validated_stop_token_ids(raw: Any) -> list[int]:
        if raw is None:
            return []
        if not isinstance(raw, (list, tuple)):
            raise _fail("stop_token_ids", raw, "a list of token ids")
        ids = [_as_int("stop_token_ids", item, "token ids (integers >= 0)") for item in raw]
        for item in ids:
            if item < 0:
                raise _fail("stop_token_ids", item, "token ids (integers >= 0)")
        return ids

    @property
    def is_greedy(self) -> bool:
        """True when the most likely token is always chosen (no randomness, seed irrelevant)."""
        return self.temperature < GREEDY_TEMPERATURE_EPS

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SamplingParams:
        """Build from a plain mapping (a request body, a YAML file); unknown keys are refused."""
        if not isinstance(values, dict):
            raise InvalidSamplingParamsError(
                f"sampling parameters must be a mapping, got {type(values).__name__}")
        known = cls.field_names()
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise InvalidSamplingParamsError(
                    f"unknown sampling parameter {key!r}{hint}", param=str(key))
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
