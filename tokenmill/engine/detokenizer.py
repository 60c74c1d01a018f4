"""Incremental detokenization and stop strings, one instance per output sequence.

``tokenizers``' ``DecodeStream`` holds back an incomplete UTF-8 tail (an emoji split over several
byte tokens) until it completes. Stop strings are matched on the text, so a stop string split
across tokens is caught; the last ``len(longest stop) - 1`` characters are withheld from streaming
until they cannot be the start of a stop string, so a client never sees text that is later cut.

Cost stays linear in the output's length: text already handed out is kept as a list of pieces
(joined once, by ``text``), and only the short unsent tail is searched and cut. A stop string can
only start in that tail, because the withheld characters are exactly the ones a stop could begin in.
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
        self._sent: list[str] = []  # pieces already handed out as deltas
        self._unsent = ""  # text not handed out yet (at most holdback + one step's pieces)
        self.stopped_by: str | None = None

    @property
    def text(self) -> str:
        """Everything decoded so far (cut at a stop string); joins, so call it once at the end."""
        return "".join(self._sent) + self._unsent

    def update(self, new_token_ids: list[int], finished: bool) -> str:
        """Add tokens; return the text that can be shown now. Sets ``stopped_by`` on a stop."""
        for token_id in new_token_ids:
            piece = self.stream.step(self.tokenizer.backend, token_id)
            if piece:
                before = len(self._unsent)
                self._unsent += piece
                if self.stop and self._check_stop(search_from=before):
                    finished = True
                    break
        end = len(self._unsent) if finished else max(0, len(self._unsent) - self.holdback)
        delta, self._unsent = self._unsent[:end], self._unsent[end:]
        if delta:
            self._sent.append(delta)
        return delta

    def _check_stop(self, search_from: int) -> bool:
        start = max(0, search_from - self.holdback)
        hits = [(self._unsent.find(s, start), s) for s in self.stop]
        hits = [(index, s) for index, s in hits if index >= 0]
        if not hits:
            return False
        index, stop = min(hits)
        self._unsent = self._unsent[: index + len(stop)] if self.include_stop \
            else self._unsent[:index]
        self.stopped_by = stop
        return True
