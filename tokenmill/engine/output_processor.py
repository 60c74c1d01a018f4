"""Frontend side of a request's progress: token ids from the core in, text and ``RequestOutput`` out.

Owns detokenization and stop strings (the core only knows token ids), and gathers the n samples of a
request back under its id.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenmill.engine.detokenizer import IncrementalDetokenizer
from tokenmill.engine.outputs import CompletionOutput, RequestOutput
from tokenmill.engine.request import Request
from tokenmill.engine.scheduler_output import EngineCoreOutput
from tokenmill.loader.tokenizer import Tokenizer


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Request]
    detokenizers: list[IncrementalDetokenizer]
    completions: list[CompletionOutput]
    num_cached_tokens: int = 0
    num_finished: int = 0
    want_logprobs: bool = False
    child_index: dict[str, int] = field(default_factory=dict)

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
        params = children[0].sampling_params
        state = _RequestState(
            request_id=request_id, prompt=prompt, prompt_token_ids=children[0].prompt_token_ids,
            children=children,
            detokenizers=[IncrementalDetokenizer(self.tokenizer, c.sampling_params)
                          for c in children],
            completions=[CompletionOutput(index=i, logprobs=[] if params.logprobs is not None
                                          else None) for i in range(len(children))],
            want_logprobs=params.logprobs is not None,
        )
        for index, child in enumerate(children):
            state.child_index[child.request_id] = index
            self._parent_of[child.request_id] = request_id
        self.states[request_id] = state

    def has_request(self, request_id: str) -> bool:
        return request_id in self.states

    def child_ids(self, request_id: str) -> list[str]:
        state = self.states.get(request_id)
        return [] if state is None else [c.request_id for c in state.children]

    def process(self, core_outputs: list[EngineCoreOutput]) -> ProcessedOutputs:
        touched: dict[str, _RequestState] = {}
        stopped: list[str] = []
        for core_output in core_outputs:
            parent_id = self._parent_of.get(core_output.request_id)
            if parent_id is None:
                continue  # aborted by the frontend while the step ran
            state = self.states[parent_id]
            index = state.child_index[core_output.request_id]
            completion = state.completions[index]
            if completion.finished:
                continue
            if parent_id not in touched:
                touched[parent_id] = state
                for fresh in state.completions:  # deltas are per call
                    fresh.delta_text, fresh.delta_token_ids = "", []
                    fresh.delta_logprobs = [] if state.want_logprobs else None
            state.num_cached_tokens = max(state.num_cached_tokens, core_output.num_cached_tokens)
            detokenizer = state.detokenizers[index]
            delta = detokenizer.update(core_output.new_token_ids, core_output.finished)
            completion.text = detokenizer.text
            completion.delta_text += delta
            completion.token_ids.extend(core_output.new_token_ids)
            completion.delta_token_ids.extend(core_output.new_token_ids)
            if state.want_logprobs and core_output.logprobs is not None:
                completion.logprobs.append(core_output.logprobs)
                completion.delta_logprobs.append(core_output.logprobs)
            if detokenizer.stopped_by is not None:
                completion.finish_reason, completion.stop_reason = "stop", detokenizer.stopped_by
                if not core_output.finished:
                    stopped.append(core_output.request_id)
            elif core_output.finished:
                completion.finish_reason = core_output.finish_reason
                completion.stop_reason = core_output.stop_reason
            if completion.finished:
                state.num_finished += 1
        results = [self._request_output(state) for state in touched.values()]
        for state in touched.values():
            if state.finished:
                self._forget(state)
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
    def _request_output(state: _RequestState) -> RequestOutput:
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            outputs=[_snapshot(c) for c in state.completions],
            finished=state.finished,
            num_cached_tokens=state.num_cached_tokens,
            metrics=[c.stats for c in state.children] if state.finished else [],
        )


def _snapshot(completion: CompletionOutput) -> CompletionOutput:
    """A copy, so later steps do not change what a caller already holds."""
    return CompletionOutput(
        index=completion.index, text=completion.text, token_ids=list(completion.token_ids),
        delta_text=completion.delta_text, delta_token_ids=list(completion.delta_token_ids),
        logprobs=None if completion.logprobs is None else list(completion.logprobs),
        delta_logprobs=None if completion.delta_logprobs is None else list(completion.delta_logprobs),
        finish_reason=completion.finish_reason, stop_reason=completion.stop_reason,
    )
