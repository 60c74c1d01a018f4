"""Turns one ``SchedulerOutput`` into the tensors of one forward pass.

Every scheduled request contributes ``num_new_tokens`` rows to one flattened batch; its KV slots
come from its block table. A request whose new tokens reach the end of its known tokens also
contributes a row to sampling (a partial prefill chunk does not).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.engine.request import Request
from tokenmill.engine.scheduler_output import SchedulerOutput
from tokenmill.layers.attention import AttentionMetadata, DecodeBatch, PrefillSpan, attention_mask
from tokenmill.layers.sampler import SamplingBatch


@dataclass
class ModelInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    attention: AttentionMetadata
    sample_rows: torch.Tensor  # rows of the flattened batch whose logits are sampled
    sample_requests: list[Request]
    sampling: SamplingBatch


class InputBatchBuilder:
    def __init__(self, block_size: int, device: torch.device, sliding_window: int | None):
        self.block_size = block_size
        self.device = device
        self.sliding_window = sliding_window
        self._offsets = torch.arange(block_size)

    def slots(self, block_ids: list[int], num_positions: int) -> torch.Tensor:
        """Cache slots of positions ``0 .. num_positions-1`` of a request."""
        blocks = torch.tensor(block_ids, dtype=torch.long)
        return (blocks[:, None] * self.block_size + self._offsets[None, :]).flatten()[:num_positions]

    def build(self, output: SchedulerOutput) -> ModelInputs:
        token_ids: list[int] = []
        positions: list[torch.Tensor] = []
        slot_mapping: list[torch.Tensor] = []
        prefills: list[PrefillSpan] = []
        decode_rows: list[int] = []
        decode_slots: list[torch.Tensor] = []
        sample_rows: list[int] = []
        sample_requests: list[Request] = []
        row = 0
        for request in output.scheduled_requests:
            rid = request.request_id
            num_new = output.num_scheduled_tokens[rid]
            start = output.num_computed_tokens[rid]
            end = start + num_new
            token_ids.extend(request.all_token_ids[start:end])
            request_positions = torch.arange(start, end)
            positions.append(request_positions)
            context_slots = self.slots(request.block_ids, end)
            slot_mapping.append(context_slots[start:end])
            if num_new == 1 and start > 0:
                decode_rows.append(row)
                decode_slots.append(context_slots)
            else:
                mask = None
                if start > 0 or (self.sliding_window is not None and end > self.sliding_window):
                    mask = attention_mask(request_positions, end, self.sliding_window)
                    mask = mask.to(self.device)
                prefills.append(PrefillSpan(row, num_new, end, context_slots.to(self.device),
                                            mask))
            row += num_new
            if end == request.num_tokens:
                sample_rows.append(row - 1)
                sample_requests.append(request)

        decode = self._decode_batch(decode_rows, decode_slots) if decode_rows else None
        attention = AttentionMetadata(
            slot_mapping=torch.cat(slot_mapping).to(self.device), prefills=prefills, decode=decode)
        return ModelInputs(
            input_ids=torch.tensor(token_ids, dtype=torch.long, device=self.device),
            positions=torch.cat(positions).to(self.device),
            attention=attention,
            sample_rows=torch.tensor(sample_rows, dtype=torch.long, device=self.device),
            sample_requests=sample_requests,
            sampling=_sampling_batch(sample_requests),
        )

    def _decode_batch(self, rows: list[int], slots: list[torch.Tensor]) -> DecodeBatch:
        lengths = torch.tensor([len(s) for s in slots])
        max_len = int(lengths.max())
        padded = torch.zeros(len(slots), max_len, dtype=torch.long)
        for index, request_slots in enumerate(slots):
            padded[index, : len(request_slots)] = request_slots
        key_positions = torch.arange(max_len)[None, :]
        mask = key_positions < lengths[:, None]
        if self.sliding_window is not None:
            mask &= key_positions > (lengths[:, None] - 1 - self.sliding_window)
        return DecodeBatch(
            token_rows=torch.tensor(rows, dtype=torch.long, device=self.device),
            slot_ids=padded.to(self.device),
            mask=mask[:, None, None, :].to(self.device),
        )


def _sampling_batch(requests: list[Request]) -> SamplingBatch:
    banned: list[list[int]] = []
    for request in requests:
        params = request.sampling_params
        ids: list[int] = []
        if request.num_output_tokens < params.min_tokens:
            ids = list(params.stop_token_ids)
            if request.eos_token_id is not None and not params.ignore_eos:
                ids.append(request.eos_token_id)
        banned.append(ids)
    return SamplingBatch(
        params=[r.sampling_params for r in requests],
        prompt_token_ids=[r.prompt_token_ids for r in requests],
        output_token_ids=[r.output_token_ids for r in requests],
        banned_token_ids=banned,
    )
