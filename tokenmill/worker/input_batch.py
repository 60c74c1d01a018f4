"""Turns one ``SchedulerOutput`` (and the runner's request states) into the tensors of one forward
pass.

Every scheduled request contributes ``num_new_tokens`` rows to one flattened batch; its KV slots
come from its block table. A request whose new tokens reach the end of its known tokens also
contributes a row to sampling (a partial prefill chunk does not); the step's grammar bitmask, keyed
by request id, is mapped onto those sampling rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tokenmill.engine.scheduler_output import SchedulerOutput
from tokenmill.layers.attention import AttentionMetadata, DecodeBatch, PrefillSpan, attention_mask
from tokenmill.layers.sampler import SamplingBatch
from tokenmill.structured_output.bitmask import GrammarBitmask
from tokenmill.worker.request_state import CachedRequestState, RequestStates


@dataclass
class ModelInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    attention: AttentionMetadata
    sample_rows: torch.Tensor  # rows of the flattened batch whose logits are sampled
    sample_requests: list[CachedRequestState]
    sampling: SamplingBatch
    prompt_rows: list[PromptRows]
    """Requests whose prompt rows this step are scored or pooled (not sampled)."""


@dataclass
class PromptRows:
    """Rows of one request's prefill chunk whose outputs it asked for (prompt logprobs or
    pooling): ``rows`` of the flattened batch, and the prompt token each row predicts."""

    request_id: str
    rows: range
    next_token_ids: list[int]
    num_top: int | None
    """Top alternatives per scored row; None: the rows are pooled, not scored."""


class InputBatchBuilder:
    def __init__(self, block_size: int, device: torch.device, sliding_window: int | None,
                 decode_kernel: Any = None):
        self.block_size = block_size
        self.device = device
        self.sliding_window = sliding_window
        self.decode_kernel = decode_kernel

    def slots(self, blocks: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Cache slots of positions ``start .. end-1`` of a request with block table ``blocks``."""
        positions = torch.arange(start, end)
        return blocks[positions // self.block_size] * self.block_size + positions % self.block_size

    def build(self, output: SchedulerOutput, states: RequestStates) -> ModelInputs:
        """``states`` must already hold this step's diffs (``RequestStates.update_from``)."""
        token_ids: list[int] = []
        positions: list[torch.Tensor] = []
        slot_mapping: list[torch.Tensor] = []
        prefills: list[PrefillSpan] = []
        decode_rows: list[int] = []
        decode_tables: list[torch.Tensor] = []
        decode_lens: list[int] = []
        sample_rows: list[int] = []
        sample_requests: list[CachedRequestState] = []
        prompt_rows: list[PromptRows] = []
        row = 0
        for rid, num_new in output.num_scheduled_tokens.items():
            request = states[rid]
            start = request.num_computed_tokens
            end = start + num_new
            token_ids.extend(request.all_token_ids[start:end])
            request_positions = torch.arange(start, end)
            positions.append(request_positions)
            num_blocks = -(-end // self.block_size)
            blocks = torch.tensor(request.block_ids[:num_blocks], dtype=torch.long)
            slot_mapping.append(self.slots(blocks, start, end))
            if num_new == 1 and start > 0:
                decode_rows.append(row)
                decode_tables.append(blocks)
                decode_lens.append(end)
            else:
                mask = None
                if start > 0 or (self.sliding_window is not None and end > self.sliding_window):
                    mask = attention_mask(request_positions, end, self.sliding_window)
                    mask = mask.to(self.device)
                prefills.append(PrefillSpan(row, num_new, end, blocks.to(self.device), mask))
            prompt_rows.extend(_prompt_rows(request, row, start, end))
            row += num_new
            if request.samples_at(end):
                sample_rows.append(row - 1)
                sample_requests.append(request)

        decode = (self._decode_batch(decode_rows, decode_tables, decode_lens)
                  if decode_rows else None)
        attention = AttentionMetadata(
            slot_mapping=torch.cat(slot_mapping).to(self.device), prefills=prefills, decode=decode,
            decode_kernel=self.decode_kernel, sliding_window=self.sliding_window)
        return ModelInputs(
            input_ids=torch.tensor(token_ids, dtype=torch.long, device=self.device),
            positions=torch.cat(positions).to(self.device),
            attention=attention,
            sample_rows=torch.tensor(sample_rows, dtype=torch.long, device=self.device),
            sample_requests=sample_requests,
            sampling=_sampling_batch(sample_requests, output.grammar_bitmask),
            prompt_rows=prompt_rows,
        )

    def _decode_batch(self, rows: list[int], tables: list[torch.Tensor], lengths_: list[int]
                      ) -> DecodeBatch:
        lengths = torch.tensor(lengths_)
        max_blocks = max(len(t) for t in tables)
        padded = torch.zeros(len(tables), max_blocks, dtype=torch.long)
        for index, table in enumerate(tables):
            padded[index, : len(table)] = table
        key_positions = torch.arange(max_blocks * self.block_size)[None, :]
        mask = key_positions < lengths[:, None]
        if self.sliding_window is not None:
            mask &= key_positions > (lengths[:, None] - 1 - self.sliding_window)
        return DecodeBatch(
            token_rows=torch.tensor(rows, dtype=torch.long, device=self.device),
            block_table=padded.to(self.device),
            seq_lens=lengths.to(self.device),
            mask=mask[:, None, None, :].to(self.device),
        )


def _prompt_rows(request: CachedRequestState, first_row: int, start: int, end: int) -> list[PromptRows]:
    """The outputs ``request`` wants from its positions ``[start, end)`` of this step."""
    wanted: list[PromptRows] = []
    rid = request.request_id
    positions = request.prompt_logprob_positions(start, end)
    if positions:
        wanted.append(PromptRows(
            rid, range(first_row + positions.start - start, first_row + positions.stop - start),
            request.prompt_token_ids[positions.start + 1: positions.stop + 1],
            request.sampling_params.prompt_logprobs))
    if request.pooling == "mean":
        wanted.append(PromptRows(rid, range(first_row, first_row + end - start), [], None))
    elif request.pooling == "last" and end == request.num_tokens:
        wanted.append(PromptRows(rid, range(first_row + end - start - 1,
                                            first_row + end - start), [], None))
    return wanted


def _sampling_batch(requests: list[CachedRequestState], grammar: GrammarBitmask | None) -> SamplingBatch:
    banned: list[list[int]] = []
    for request in requests:
        params = request.sampling_params
        ids: list[int] = []
        if request.num_output_tokens < params.min_tokens:
            ids = list(params.stop_token_ids)
            if request.eos_token_id is not None and not params.ignore_eos:
                ids.append(request.eos_token_id)
        banned.append(ids)
    grammar_rows: list[int] = []
    grammar_bitmask = None
    if grammar is not None:
        row_of = {r.request_id: row for row, r in enumerate(requests)}
        grammar_rows = [row_of[request_id] for request_id in grammar.request_ids]
        grammar_bitmask = grammar.bitmask
    return SamplingBatch(
        params=[r.sampling_params for r in requests],
        prompt_token_ids=[r.prompt_token_ids for r in requests],
        output_token_ids=[r.output_token_ids for r in requests],
        banned_token_ids=banned,
        grammar_rows=grammar_rows,
        grammar_bitmask=grammar_bitmask,
    )
