"""Batched sampling on the device: penalties, logit bias, temperature, top-k / top-p / min-p, seeds.

All rows of a step are processed with whole-batch tensor ops; Python only loops over rows that
carry a per-request seed (to draw their noise from their own generator) or ask for log probabilities.
Rows under a grammar (structured output) get the step's token bitmask applied after every other
logit change, so only allowed tokens can be drawn; log probabilities stay the model's own.
Sampling uses the exponential-race form of the Gumbel trick, ``argmax(p / E)`` with ``E ~ Exp(1)``,
so a seeded request's draw depends only on its seed and its output position, never on the batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from tokenmill.sampling_params import SamplingParams
from tokenmill.structured_output.bitmask import apply_grammar_bitmask

_SEED_STRIDE = 1_000_003  # mixes (seed, output position) into one generator seed


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    rank: int  # 1 = the most likely token
    top: list[tuple[int, float]]  # the `logprobs` most likely (token id, logprob)


@dataclass
class SamplingBatch:
    """Per-row sampling inputs for the rows that produce a token this step."""

    params: list[SamplingParams]
    prompt_token_ids: list[list[int]]
    output_token_ids: list[list[int]]
    banned_token_ids: list[list[int]]  # eos / stop ids while min_tokens is not reached
    grammar_rows: list[int] = field(default_factory=list)  # rows sampled under a grammar
    grammar_bitmask: np.ndarray | None = None  # int32 [len(grammar_rows), ceil(vocab / 32)]

    @property
    def num_rows(self) -> int:
        return len(self.params)


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0):
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch
                 ) -> tuple[list[int], list[TokenLogprobs | None]]:
        """``logits`` [rows, vocab] float32 -> one token id (and maybe logprobs) per row."""
        params = batch.params
        raw_logprobs = (torch.log_softmax(logits, dim=-1)
                        if any(p.logprobs is not None for p in params) else None)
        logits = self._apply_penalties(logits.clone(), batch)
        logits = self._apply_bias_and_bans(logits, batch)
        if batch.grammar_bitmask is not None:
            # last, so no bias or penalty can bring back a token the grammar forbids
            logits = apply_grammar_bitmask(logits, batch.grammar_rows, batch.grammar_bitmask)

        greedy = torch.tensor([p.is_greedy for p in params], device=self.device)
        tokens = logits.argmax(dim=-1)
        if not bool(greedy.all()):
            sampled = self._sample(logits, batch)
            tokens = torch.where(greedy, tokens, sampled)
        token_list = tokens.tolist()
        return token_list, self._logprobs(raw_logprobs, token_list, params)

    # ----------------------------------------------------------------- logit processing
    def _apply_penalties(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        params = batch.params
        if all(p.repetition_penalty == 1.0 and p.presence_penalty == 0.0
               and p.frequency_penalty == 0.0 for p in params):
            return logits
        rows, vocab = logits.shape
        counts = torch.zeros(rows, vocab, device=self.device)
        seen = torch.zeros(rows, vocab, dtype=torch.bool, device=self.device)
        for row, (prompt, output) in enumerate(zip(batch.prompt_token_ids,
                                                   batch.output_token_ids)):
            if output:
                ids = torch.tensor(output, device=self.device)
                counts[row].index_add_(0, ids, torch.ones(len(output), device=self.device))
            seen[row, torch.tensor(prompt + output, dtype=torch.long, device=self.device)] = True
        repetition = torch.tensor([p.repetition_penalty for p in params],
                                  device=self.device)[:, None]
        # Hugging Face / vLLM convention: shrink positive logits, grow negative ones.
        penalised = torch.where(logits > 0, logits / repetition, logits * repetition)
        logits = torch.where(seen, penalised, logits)
        # OpenAI convention: only generated tokens count for frequency / presence.
        frequency = torch.tensor([p.frequency_penalty for p in params], device=self.device)[:, None]
        presence = torch.tensor([p.presence_penalty for p in params], device=self.device)[:, None]
        return logits - frequency * counts - presence * (counts > 0).float()

    def _apply_bias_and_bans(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        vocab = logits.shape[1]
        for row, (p, banned) in enumerate(zip(batch.params, batch.banned_token_ids)):
            if p.logit_bias:
                ids = [i for i in p.logit_bias if 0 <= i < vocab]
                logits[row, ids] += torch.tensor([p.logit_bias[i] for i in ids],
                                                 device=self.device)
            if banned:
                logits[row, banned] = float("-inf")
        return logits

    # ----------------------------------------------------------------- sampling
    def _sample(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        params = batch.params
        vocab = logits.shape[1]
        temperature = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params],
                                   device=self.device)
        logits = logits / temperature[:, None]
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        ranks = torch.arange(vocab, device=self.device)[None, :]
        # top_k past the vocabulary keeps every token; clamped, since a huge one (1e28 is valid)
        # does not fit an int64 tensor and would kill the engine thread.
        top_k = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params],
                             device=self.device)
        remove = ranks >= top_k[:, None]
        probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
        top_p = torch.tensor([p.top_p for p in params], device=self.device)
        # Drop a token when the tokens before it already cover top_p (the first always stays).
        remove |= (probs.cumsum(dim=-1) - probs) > top_p[:, None]
        min_p = torch.tensor([p.min_p for p in params], device=self.device)
        remove |= probs < (min_p * probs[:, 0])[:, None]
        remove[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        probs = torch.empty_like(logits).scatter_(1, order, sorted_logits.softmax(dim=-1))

        noise = torch.empty_like(probs)
        noise.exponential_(generator=self.generator)
        for row, (p, output) in enumerate(zip(params, batch.output_token_ids)):
            if p.seed is not None and not p.is_greedy:
                generator = torch.Generator(device=self.device)
                generator.manual_seed((p.seed * _SEED_STRIDE + len(output)) % (2**63))
                noise[row].exponential_(generator=generator)
        return (probs / noise).argmax(dim=-1)

    @staticmethod
    def _logprobs(raw_logprobs: torch.Tensor | None, tokens: list[int],
                  params: list[SamplingParams]) -> list[TokenLogprobs | None]:
        if raw_logprobs is None:
            return [None] * len(tokens)
        results: list[TokenLogprobs | None] = []
        for row, (token, p) in enumerate(zip(tokens, params)):
            if p.logprobs is None:
                results.append(None)
                continue
            row_logprobs = raw_logprobs[row]
            chosen = row_logprobs[token]
            rank = int((row_logprobs > chosen).sum().item()) + 1
            top_values, top_ids = row_logprobs.topk(p.logprobs) if p.logprobs else ([], [])
            top = list(zip(torch.as_tensor(top_ids).tolist(), torch.as_tensor(top_values).tolist()))
            results.append(TokenLogprobs(token, float(chosen), rank, top))
        return results
