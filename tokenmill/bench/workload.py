"""What the bench sends: prompts of a target token length, shared-prefix groups, chats, JSONL.

Synthetic prompts are windows of a seeded word soup, cut in *token* space and decoded, then
re-counted, so the lengths a report shows are lengths the model's tokenizer agrees with. Random
window starts keep prompts from sharing prefixes by accident (which would flatter a prefix cache).
"""

from __future__ import annotations

import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokenmill.bench.tokens import CountingTokenizer
from tokenmill.errors import BenchError

WORKLOAD_KINDS = ("synthetic", "shared-prefix", "chat", "jsonl")
_WORD_TEXT = (
    "time year people way day man thing woman life child world school state family student "
    "group country problem hand part place case week company system program question work "
    "government number night point home water room mother area money story fact month lot "
    "right study book eye job word business issue side kind head house service friend father "
    "power hour game line end member law car city community name president team minute idea "
    "kid body information back parent face others level office door health person art war "
    "history party result change morning reason research girl guy moment air teacher force "
    "education river stone light garden music paper market road ocean cloud engine signal "
    "bridge window letter table forest mountain winter summer spring autumn harbor island"
)
_WORDS = tuple(_WORD_TEXT.split())


@dataclass(frozen=True)
class LengthDist:
    """A token-length distribution: ``fixed:N``, ``uniform:LO,HI`` or ``normal:MEAN,STD``."""

    kind: str
    a: float
    b: float = 0.0

    @classmethod
    def parse(cls, spec: str, *, what: str) -> LengthDist:
        text = spec.strip().lower()
        kind, _, args = text.partition(":") if ":" in text else ("fixed", "", text)
        try:
            nums = [float(x) for x in args.split(",")] if args else []
        except ValueError:
            nums = None
        usage = (f"{what}={spec!r}: expected fixed:N, uniform:LO,HI or normal:MEAN,STD with "
                 "positive token counts")
        if nums is None or any(math.isnan(x) or math.isinf(x) for x in nums):
            raise BenchError(usage)
        if kind == "fixed" and len(nums) == 1 and nums[0] >= 1:
            return cls("fixed", nums[0])
        if kind == "uniform" and len(nums) == 2 and 1 <= nums[0] <= nums[1]:
            return cls("uniform", nums[0], nums[1])
        if kind == "normal" and len(nums) == 2 and nums[0] >= 1 and nums[1] >= 0:
            return cls("normal", nums[0], nums[1])
        raise BenchError(usage)

    def sample(self, rng: random.Random) -> int:
        if self.kind == "fixed":
            return int(self.a)
        if self.kind == "uniform":
            return rng.randint(int(self.a), int(self.b))
        return max(1, round(rng.gauss(self.a, self.b)))

    def describe(self) -> str:
        if self.kind == "fixed":
            return f"fixed:{int(self.a)}"
        return f"{self.kind}:{self.a:g},{self.b:g}"


@dataclass(frozen=True)
class BenchRequest:
    index: int
    endpoint: str  # "completions" or "chat"
    prompt: str | None
    messages: list[dict[str, str]] | None
    prompt_tokens: int  # as counted by our tokenizer (message contents only, for chat)
    max_tokens: int
    group: int | None = None


@dataclass(frozen=True)
class WorkloadSpec:
    kind: str = "synthetic"
    input_len: LengthDist = field(default_factory=lambda: LengthDist("fixed", 256))
    output_len: LengthDist = field(default_factory=lambda: LengthDist("fixed", 64))
    num_groups: int = 4
    prefix_len: int = 1024
    chat_turns: int = 1
    dataset: str | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in WORKLOAD_KINDS:
            raise BenchError(f"--workload={self.kind!r}: choose one of {', '.join(WORKLOAD_KINDS)}")
        if self.kind == "shared-prefix" and (self.num_groups < 1 or self.prefix_len < 1):
            raise BenchError("shared-prefix needs --num-groups >= 1 and --prefix-len >= 1")
        if self.chat_turns < 1:
            raise BenchError(f"--chat-turns={self.chat_turns} must be at least 1")
        if self.kind == "jsonl" and not self.dataset:
            raise BenchError("--workload jsonl needs --dataset FILE.jsonl")

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "input_len": self.input_len.describe(),
                               "output_len": self.output_len.describe(), "seed": self.seed}
        if self.kind == "shared-prefix":
            out.update(num_groups=self.num_groups, prefix_len=self.prefix_len)
        if self.kind == "chat":
            out["chat_turns"] = self.chat_turns
        if self.kind == "jsonl":
            out["dataset"] = self.dataset
        return out


class TextFactory:
    """Makes text of an exact-ish token count from a seeded word soup."""

    def __init__(self, tokenizer: CountingTokenizer, seed: int) -> None:
        self.tokenizer = tokenizer
        rng = random.Random(seed)
        soup = " ".join(rng.choice(_WORDS) for _ in range(6000))
        self.ids = tokenizer.encode(soup, add_special_tokens=False)
        if len(self.ids) < 16:
            raise BenchError("the tokenizer turned 6000 words into almost no tokens; "
                             "is it the right tokenizer?")

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def make(self, num_tokens: int, rng: random.Random) -> tuple[str, int]:
        start = rng.randrange(len(self.ids))
        reps = num_tokens // len(self.ids) + 2
        window = (self.ids * reps)[start:start + num_tokens]
        text = self.tokenizer.decode(window).strip()
        count = self.count(text)
        # Decoding then re-encoding can merge or split a token at the cut; nudge a few times.
        for _ in range(4):
            if count == num_tokens:
                break
            if count > num_tokens:
                window = window[:-(count - num_tokens)] or window[:1]
            else:
                end = start + len(window)
                extra = (self.ids * reps)[end:end + num_tokens - count]
                window = window + extra
            text = self.tokenizer.decode(window).strip()
            count = self.count(text)
        return text, count


def _load_jsonl(path: str, tokenizer: CountingTokenizer, spec: WorkloadSpec,
                rng: random.Random) -> list[BenchRequest]:
    file = Path(path).expanduser()
    try:
        lines = file.read_text().splitlines()
    except OSError as exc:
        raise BenchError(f"cannot read dataset {path}: {exc.strerror or exc}") from exc
    requests: list[BenchRequest] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise BenchError(f"{path}:{lineno}: not JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise BenchError(f"{path}:{lineno}: expected an object with 'prompt' or 'messages'")
        max_tokens = row.get("max_tokens", row.get("output_len")) or spec.output_len.sample(rng)
        if not isinstance(max_tokens, int) or max_tokens < 1:
            raise BenchError(f"{path}:{lineno}: max_tokens must be a positive integer")
        if isinstance(row.get("messages"), list):
            messages = row["messages"]
            if not all(isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages):
                raise BenchError(f"{path}:{lineno}: each message needs a string 'content'")
            tokens = sum(len(tokenizer.encode(m["content"], add_special_tokens=False))
                         for m in messages)
            requests.append(BenchRequest(len(requests), "chat", None, messages, tokens, max_tokens))
        elif isinstance(row.get("prompt", row.get("text")), str):
            prompt = row.get("prompt", row.get("text"))
            num_tokens = len(tokenizer.encode(prompt, add_special_tokens=False))
            requests.append(BenchRequest(len(requests), "completions", prompt, None, num_tokens,
                                         max_tokens))
        else:
            raise BenchError(f"{path}:{lineno}: expected a string 'prompt' or a 'messages' list")
    if not requests:
        raise BenchError(f"dataset {path} holds no prompts")
    return requests


def build_requests(spec: WorkloadSpec, tokenizer: CountingTokenizer,
                   num_requests: int) -> list[BenchRequest]:
    """``num_requests`` requests (a duration-bound run cycles through them)."""
    rng = random.Random(spec.seed)
    if spec.kind == "jsonl":
        return _load_jsonl(spec.dataset or "", tokenizer, spec, rng)
    factory = TextFactory(tokenizer, spec.seed)
    prefixes = []
    if spec.kind == "shared-prefix":
        prefixes = [factory.make(spec.prefix_len, rng) for _ in range(spec.num_groups)]
    requests: list[BenchRequest] = []
    for index in range(num_requests):
        max_tokens = spec.output_len.sample(rng)
        text, count = factory.make(spec.input_len.sample(rng), rng)
        if spec.kind == "synthetic":
            requests.append(BenchRequest(index, "completions", text, None, count, max_tokens))
        elif spec.kind == "shared-prefix":
            group = index % spec.num_groups
            prefix, prefix_count = prefixes[group]
            requests.append(BenchRequest(index, "completions", f"{prefix}\n\n{text}", None,
                                         prefix_count + count, max_tokens, group))
        else:
            messages: list[dict[str, str]] = [
                {"role": "system", "content": "You are a helpful assistant."}]
            total = 0
            for _ in range(spec.chat_turns - 1):  # earlier turns of the conversation
                user, n_user = factory.make(max(1, count // 2), rng)
                reply, n_reply = factory.make(max_tokens, rng)
                messages += [{"role": "user", "content": user},
                             {"role": "assistant", "content": reply}]
                total += n_user + n_reply
            messages.append({"role": "user", "content": text})
            total += count + factory.count(messages[0]["content"])
            requests.append(BenchRequest(index, "chat", None, messages, total, max_tokens))
    return requests


def parse_number_list(text: str, *, what: str, allow_inf: bool = False) -> list[float]:
    items = [x for x in re.split(r"[,\s]+", text.strip()) if x]
    values: list[float] = []
    for item in items:
        try:
            value = float(item)
        except ValueError:
            raise BenchError(f"{what}={text!r}: {item!r} is not a number") from None
        if math.isnan(value) or value <= 0 or (math.isinf(value) and not allow_inf):
            raise BenchError(f"{what}={text!r}: every value must be a positive number"
                             + (" or inf" if allow_inf else ""))
        values.append(value)
    if not values:
        raise BenchError(f"{what} is empty")
    return values
