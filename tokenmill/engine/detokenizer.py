"""Incremental detokenization and stop strings, one instance per output sequence.

``tokenizers``' ``DecodeStream`` holds back an incomplete UTF-8 tail (an emoji split over several
byte tokens) until it completes. Stop strings are matched on the text, so a stop string split
across tokens is caught; the last ``len(longest stop) - 1`` characters are withheld from streaming
until they cannot be the start of a stop string, so a client never sees text that is later cut.
"""

from __future__ import annotations

from tokenizers.decoders import DecodeStream

from tokenmill.loader.tokenizer import Tokenizer
from tokenmill.sampling_params import SamplingParams


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Tokenizer, params: SamplingParams):
        self.tokenizer = tokenizer
        self.stream = DecodeStream(skip_special_tokens=params.skip_special_tokens)
        self.stop = params.stop
        self.include_stop = params.include_stop_str_in_output
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.text = ""
        self.num_sent = 0  # characters of `text` already handed out as deltas
        self.stopped_by: str | None = None

    def update(self, new_token_ids: list[int], finished: bool) -> str:
        """Add tokens; return the text that can be shown now. Sets ``stopped_by`` on a stop."""
        for token_id in new_token_ids:
            piece = self.stream.step(self.tokenizer.backend, token_id)
            if piece:
                before = len(self.text)
                self.text += piece
                if self.stop and self._check_stop(search_from=before):
                    finished = True
                    break
        if finished:
            end = len(self.text)
        else:
            end = max(self.num_sent, len(self.text) - self.holdback)
        delta = self.text[self.num_sent:end]
        self.num_sent = end
        return delta

    def _check_stop(self, search_from: int) -> bool:
        start = max(0, search_from - self.holdback)
        hits = [(self.text.find(s, start), s) for s in self.stop]
        hits = [(index, s) for index, s in hits if index >= 0]
        if not hits:
            return False
        index, stop = min(hits)
        self.text = self.text[: index + len(stop)] if self.include_stop else self.text[:index]
        self.stopped_by = stop
        return True
