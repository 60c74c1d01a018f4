"""Frontend side of a request's progress: token ids from the core in, text and ``RequestOutput`` out.

Owns detokenization and stop strings (the core only knows token ids), and gathers the n samples of a
request back under its id.

Outputs are deltas (see ``outputs.py``): a step builds, for each request it touched, fresh
``CompletionOutput``s holding only that step's tokens, text and logprobs. What a request has
generated is appended once to its state and handed over whole, without a copy, in its final output.
So processing a request costs O(tokens it generates), not O(tokens²) as re-copying a growing
snapshot at every step would.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.outputs import CompletionOutput, RequestOutput
from tokenmill.engine.request import Request
from tokenmill.engine.scheduler_output import EngineCoreOutput
from tokenmill.layers.sampler import TokenLogprobs
from tokenmill.loader.tokenizer import Tokenizer


@dataclass
class _SampleState:
    """One of the n samples: what it generated so far and how it ended."""

    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]
    samples: list[_SampleState]
    num_cached_tokens: int = 0
    num_finished: int = 0
    want_logprobs: bool = False
    child_index: dict[str, int] = field(default_factory=dict)
    prompt_logprobs: list[TokenLogprobs | None] | None = None
    embedding: list[float] | None = None

    @property
    def finished(self) -> bool:
        return self.num_finished == len(self.children)


@dataclass
class ProcessedOutputs:
    request_outputs: list[RequestOutput]
    stopped_request_ids: list[str]  # children a stop string ended: the core must free them


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.states: dict[str, _RequestState] = {}
        self._parent_of: dict[str, str] = {}

    def add_request(self, request_id: str, prompt: str | None, children: list[Request]) -> None:
        want_logprobs = children[0].sampling_params.logprobs is not None
        state = _RequestState(
            request_id=request_id, prompt=prompt, prompt_token_ids=children[0].prompt_token_ids,
            children=children,
            samples=[_SampleState(IncrementalDetokenizer(self.tokenizer, c.sampling_params),
                                  logprobs=[] if want_logprobs else None) for c in children],
            want_logprobs=want_logprobs,
        )
        for index, child in enumerate(children):
            state.child_index[child.request_id] = index
            self._parent_of[child.request_id] = request_id
        self.states[request_id] = state

    def child_ids(self, request_id: str) -> list[str]:
        state = self.states.get(request_id)
        return [] if state is None else [c.request_id for c in state.children]

    def process(self, core_outputs: list[EngineCoreOutput]) -> ProcessedOutputs:
        deltas: dict[str, list[CompletionOutput]] = {}  # parent id -> this step's completions
        stopped: list[str] = []
        new_prompt_logprobs: set[str] = set()
        for core_output in core_outputs:
            parent_id = self._parent_of.get(core_output.request_id)
            if parent_id is None:
                continue  # aborted by the frontend while the step ran
            state = self.states[parent_id]
            index = state.child_index[core_output.request_id]
            sample = state.samples[index]
            if sample.finish_reason is not None:
                continue
            if parent_id not in deltas:
                deltas[parent_id] = [
                    CompletionOutput(index=i, delta_logprobs=[] if state.want_logprobs else None,
                                     finish_reason=s.finish_reason, stop_reason=s.stop_reason)
                    for i, s in enumerate(state.samples)]
            delta = deltas[parent_id][index]
            if core_output.prompt_logprobs is not None and state.prompt_logprobs is None:
                # every child scores the prompt (n > 1): the first to finish it answers for all
                state.prompt_logprobs = [None, *core_output.prompt_logprobs]
                new_prompt_logprobs.add(parent_id)
            if core_output.pooled is not None:
                state.embedding = core_output.pooled
            state.num_cached_tokens = max(state.num_cached_tokens, core_output.num_cached_tokens)
            delta.delta_text = sample.detokenizer.update(core_output.new_token_ids,
                                                         core_output.finished)
            sample.token_ids.extend(core_output.new_token_ids)
            delta.delta_token_ids = list(core_output.new_token_ids)
            if state.want_logprobs and core_output.logprobs is not None:
                sample.logprobs.append(core_output.logprobs)
                delta.delta_logprobs.append(core_output.logprobs)
            if sample.detokenizer.stopped_by is not None:
                sample.finish_reason, sample.stop_reason = "stop", sample.detokenizer.stopped_by
                if not core_output.finished:
                    stopped.append(core_output.request_id)
            elif core_output.finished:
                sample.finish_reason = core_output.finish_reason
                sample.stop_reason = core_output.stop_reason
            delta.finish_reason, delta.stop_reason = sample.finish_reason, sample.stop_reason
            if sample.finish_reason is not None:
                state.num_finished += 1
        results = []
        for parent_id, completions in deltas.items():
            state = self.states[parent_id]
            if state.finished:
                self._complete(state, completions)
                self._forget(state)
            results.append(RequestOutput(
                request_id=parent_id, prompt=state.prompt,
                prompt_token_ids=state.prompt_token_ids, outputs=completions,
                finished=state.finished, num_cached_tokens=state.num_cached_tokens,
                metrics=[c.stats for c in state.children] if state.finished else [],
                prompt_logprobs=(state.prompt_logprobs if state.finished
                                 or parent_id in new_prompt_logprobs else None),
                embedding=state.embedding))
        return ProcessedOutputs(results, stopped)

    def abort(self, request_id: str) -> None:
        state = self.states.get(request_id)
        if state is not None:
            self._forget(state)

    def _forget(self, state: _RequestState) -> None:
        for child in state.children:
            self._parent_of.pop(child.request_id, None)
        self.states.pop(state.request_id, None)

    @staticmethod
    def _complete(state: _RequestState, completions: list[CompletionOutput]) -> None:
        """The final output carries each whole sample; the state is dropped, so no copy."""
        for completion, sample in zip(completions, state.samples):
            completion.text = sample.detokenizer.text
            completion.token_ids = sample.token_ids
            completion.logprobs = sample.logprobs
