"""``LLM``: the offline Python API. All prompts go through the engine together (continuous batching).

    from tokenmill import LLM, SamplingParams
    llm = LLM()                                   # the built-in SmolLM2-135M-Instruct
    outputs = llm.generate(["Hello"], SamplingParams(max_tokens=32, temperature=0))
"""

from __future__ import annotations

import itertools
from typing import Any, Self

from tokenmill.config import ENGINE_SECTIONS, EngineConfig
from tokenmill.engine.engine_core import EngineCore
from tokenmill.engine.input_processor import InputProcessor
from tokenmill.engine.output_processor import OutputProcessor
from tokenmill.engine.outputs import RequestOutput
from tokenmill.sampling_params import SamplingParams


def engine_config_from_kwargs(model: str | None, **kwargs: Any) -> EngineConfig:
    """``LLM(model, dtype=..., block_size=..., ...)``: each keyword goes to the section that has it."""
    sections: dict[str, dict[str, Any]] = {name: {} for name in ENGINE_SECTIONS}
    sections["model"]["model"] = model
    num_threads = kwargs.pop("num_threads", None)
    for key, value in kwargs.items():
        section = next((name for name, cls in ENGINE_SECTIONS.items()
                        if key in cls.__dataclass_fields__), None)
        if section is None:
            raise TypeError(f"LLM() got an unexpected keyword argument {key!r}")
        sections[section][key] = value
    return EngineConfig(**{name: cls(**sections[name]) for name, cls in ENGINE_SECTIONS.items()},
                        num_threads=num_threads)


class LLM:
    def __init__(self, model: str | None = None, *, config: EngineConfig | None = None,
                 **kwargs: Any):
        self.config = config or engine_config_from_kwargs(model, **kwargs)
        self.engine = EngineCore(self.config)
        self.tokenizer = self.engine.source.tokenizer
        self.input_processor = InputProcessor(self.tokenizer, self.engine.source.arch.vocab_size)
        self.output_processor = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    def shutdown(self) -> None:
        """Stop the model worker processes, if any (they also stop when the LLM is collected or
        the interpreter exits)."""
        self.engine.shutdown()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.shutdown()

    def generate(self, prompts: str | list[str] | list[list[int]],
                 sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True, cache_salt: str | None = None,
                 priority: int | list[int] = 0) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs in the order of the prompts.

        ``priority`` (one for all prompts, or one per prompt): lower is more urgent, as in vLLM;
        it decides the order in which prompts are admitted when they do not all fit at once.

        Every prompt is validated before any is scheduled, so a bad one fails the call cleanly.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt given bare
        params_list = (sampling_params if isinstance(sampling_params, list)
                       else [sampling_params or SamplingParams()] * len(prompts))
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(params_list)} sampling params for {len(prompts)} prompts")
        priorities = priority if isinstance(priority, list) else [priority] * len(prompts)
        if len(priorities) != len(prompts):
            raise ValueError(f"{len(priorities)} priorities for {len(prompts)} prompts")
        pending = []
        for prompt, params, prompt_priority in zip(prompts, params_list, priorities):
            text, ids = self.input_processor.tokenize_prompt(prompt)
            request_id = f"offline-{next(self._ids)}"
            grammar = self.input_processor.compile_grammar(params)  # offline: compile in line
            pending.append((request_id, text, self.input_processor.make_requests(
                request_id, ids, params, cache_salt, grammar=grammar,
                priority=prompt_priority)))
        order = {request_id: index for index, (request_id, _, _) in enumerate(pending)}
        added: list[str] = []
        try:
            for request_id, text, children in pending:
                for child in children:
                    self.engine.add_request(child)
                self.output_processor.add_request(request_id, text, children)
                added.append(request_id)
            results = self._run_to_completion(len(pending), use_tqdm)
        except BaseException:
            for request_id in added:
                self._abort(request_id)
            raise
        return sorted(results, key=lambda output: order[output.request_id])

    def chat(self, messages: list[dict[str, Any]] | list[list[dict[str, Any]]],
             sampling_params: SamplingParams | None = None, use_tqdm: bool = True
             ) -> list[RequestOutput]:
        """Like ``generate`` on conversations rendered with the model's chat template."""
        conversations = messages if messages and isinstance(messages[0], list) else [messages]
        prompts = [self.input_processor.render_chat(c) for c in conversations]
        token_prompts = [self.tokenizer.encode(p, add_special_tokens=False) for p in prompts]
        outputs = self.generate(token_prompts, sampling_params, use_tqdm)
        for output, prompt in zip(outputs, prompts):
            output.prompt = prompt
        return outputs

    def _run_to_completion(self, num_requests: int, use_tqdm: bool) -> list[RequestOutput]:
        from tqdm import tqdm

        progress = tqdm(total=num_requests, desc="generating", unit="req",
                        disable=not use_tqdm or num_requests < 2)
        finished: list[RequestOutput] = []
        while self.engine.has_unfinished_requests():
            processed = self.output_processor.process(self.engine.step())
            if processed.stopped_request_ids:
                self.engine.stop_requests(processed.stopped_request_ids)
            for output in processed.request_outputs:
                if output.finished:
                    finished.append(output)
                    progress.update(1)
        progress.close()
        return finished

    def _abort(self, request_id: str) -> None:
        self.engine.abort_requests(self.output_processor.child_ids(request_id))
        self.output_processor.abort(request_id)
