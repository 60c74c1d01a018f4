"""Verifier for a semantic-cache candidate: every word that differs between two queries must be
explained, or the cached answer is not served.

Sentence embeddings put "how do I accept a job offer" and "... reject a job offer" closer together
than many true paraphrases, so no similarity threshold separates them. After the embedding lookup
has found a candidate, this module aligns the two queries word by word (``query_words.py`` says
what each word is) and allows only differences that cannot change the question:

1. fillers ("please", "can you", "the") are ignored;
2. the same lemma in the same tense matches ("refrigerators work" / "refrigerator works");
3. a content word may stand for a different one when the two are synonyms by the word-embedding
   test (``WordSimilarity`` above ``word_threshold``, or above ``context_word_threshold`` when
   the whole queries are nearly identical) and their forms do not mark them as opposites or
   siblings (lock/unlock, upload/download, sunrise/sunset), or when one is an unknown word one
   edit away from the other (a typo);
4. a preposition may be added or dropped, but not replaced by another;
5. the matched words must keep their order, except that one phrase may move as a whole when it
   starts with a preposition or is a lone question word ("In Python, how ..." / "How ... in
   Python?"). Swapped roles ("Alice owes Bob" / "Bob owes Alice") fail here.

Anything else unexplained (an extra content word, a different number, name, tense, quantifier,
negation) denies the hit. A false miss costs one upstream call; a false hit serves a wrong answer.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tokenmill.gateway.query_words import NEGATIONS, QueryWord, WordRole, split_query
from tokenmill.gateway.word_similarity import WordSimilarity

DEFAULT_WORD_THRESHOLD = 0.85
DEFAULT_CONTEXT_WORD_THRESHOLD = 0.3
DEFAULT_CONTEXT_QUERY_THRESHOLD = 0.96
_NEGATING_PREFIXES = ("un", "dis", "in", "im", "il", "ir", "non", "de", "anti", "mis", "counter")
_QUESTION_WORDS = frozenset({"what", "which", "who", "whom", "whose", "when", "where", "why", "how"})


@dataclass(frozen=True)
class Verdict:
    same_question: bool
    reason: str
    """Why not (the first unexplained difference), or "aligned"."""


class QueryAlignment:
    """Decides whether a cached query and a new one ask the same thing."""

    def __init__(self, words: WordSimilarity, word_threshold: float = DEFAULT_WORD_THRESHOLD,
                 context_word_threshold: float = DEFAULT_CONTEXT_WORD_THRESHOLD,
                 context_query_threshold: float = DEFAULT_CONTEXT_QUERY_THRESHOLD,
                 max_typo_edits: int = 1) -> None:
        self.words = words
        self.word_threshold = word_threshold
        self.context_word_threshold = context_word_threshold
        self.context_query_threshold = context_query_threshold
        self.max_typo_edits = max_typo_edits

    def verify(self, cached: str, asked: str, query_similarity: float = 0.0) -> Verdict:
        """``query_similarity``: cosine of the two whole queries (the cache lookup's score)."""
        all_a, all_b = split_query(cached), split_query(asked)
        if _tense(all_a) != _tense(all_b):
            return Verdict(False, "the tense differs")
        a = [w for w in all_a if w.role is not WordRole.FILLER]
        b = [w for w in all_b if w.role is not WordRole.FILLER]
        if not a and not b:
            # Nothing but fillers ("hi" / "thanks"): no content to align, so they must be equal.
            same = [w.text for w in all_a] == [w.text for w in all_b]
            return Verdict(same, "aligned" if same else "only filler words, and they differ")
        pairs = _match_same_lemma(a, b)
        left = [i for i in range(len(a)) if i not in pairs]
        right_used = set(pairs.values())
        right = [j for j in range(len(b)) if j not in right_used]
        left = _drop_acronyms(a, b, left, right)
        right = _drop_acronyms(b, a, right, left)
        for words, rest in ((a, left), (b, right)):
            for i in rest:
                if words[i].role is WordRole.FIXED:
                    return Verdict(False, f"{words[i].text!r} has no counterpart")
        dropped_left = [i for i in left if a[i].role is WordRole.RELATION]
        dropped_right = [j for j in right if b[j].role is WordRole.RELATION]
        if dropped_left and dropped_right:
            return Verdict(False, f"{a[dropped_left[0]].text!r} became "
                                  f"{b[dropped_right[0]].text!r}")
        content_left = [i for i in left if a[i].role is WordRole.CONTENT]
        content_right = [j for j in right if b[j].role is WordRole.CONTENT]
        justified = self._pair_differing_words(a, b, content_left, content_right,
                                               query_similarity)
        if isinstance(justified, Verdict):
            return justified
        pairs.update(justified)
        # Where "not" sits ("don't cats like" / "do cats not like") does not change the question.
        pairs = {i: j for i, j in pairs.items() if a[i].text not in NEGATIONS}
        hinges = _hinges(dropped_left, dropped_right)
        if not _order_kept(pairs, a, hinges):
            return Verdict(False, "words changed places (roles swapped)")
        return Verdict(True, "aligned")

    def _pair_differing_words(self, a: list[QueryWord], b: list[QueryWord], left: list[int],
                              right: list[int], query_similarity: float
                              ) -> dict[int, int] | Verdict:
        if len(left) != len(right):
            extra = a[left[0]] if len(left) > len(right) else b[right[0]]
            return Verdict(False, f"{extra.text!r} is unexplained")
        if not left:
            return {}
        similarity = self.words.matrix([a[i].text for i in left], [b[j].text for j in right])
        pairs: dict[int, int] = {}
        # Greedy on the most similar pair first: each word explains at most one other.
        candidates = sorted(((float(similarity[x, y]), x, y) for x in range(len(left))
                             for y in range(len(right))), reverse=True)
        used_x: set[int] = set()
        used_y: set[int] = set()
        for score, x, y in candidates:
            if x in used_x or y in used_y:
                continue
            first, second = a[left[x]], b[right[y]]
            if not self._interchangeable(first, second, score, query_similarity):
                continue
            used_x.add(x)
            used_y.add(y)
            pairs[left[x]] = right[y]
        if len(pairs) < len(left):
            x = next(x for x in range(len(left)) if x not in used_x)
            return Verdict(False, f"{a[left[x]].text!r} is unexplained")
        return pairs

    def _interchangeable(self, first: QueryWord, second: QueryWord, similarity: float,
                         query_similarity: float) -> bool:
        # A typo: an unknown word one slip away from the other. Not at the first letter, where
        # a changed prefix is a changed meaning (encrypt/decrypt).
        if (not first.is_known or not second.is_known) and \
                min(len(first.text), len(second.text)) >= 5 and first.text[0] == second.text[0] \
                and _edit_distance(first.text, second.text) <= self.max_typo_edits:
            return True
        if _differ_by_form(first.text, second.text):
            return False
        if similarity >= self.word_threshold:
            return True
        # Words alone cannot tell "large"/"big" from "lend"/"borrow"; in a query that otherwise
        # lines up, a swap that leaves the whole query almost unmoved is taken as a synonym.
        return similarity >= self.context_word_threshold and \
            query_similarity >= self.context_query_threshold


def _tense(words: list[QueryWord]) -> tuple[bool, bool]:
    return any(w.is_past for w in words), any(w.is_future for w in words)


def _match_same_lemma(a: list[QueryWord], b: list[QueryWord]) -> dict[int, int]:
    """Pairs (index in a -> index in b) of the same word, or of content words / prepositions
    sharing a lemma; taken left to right so repeated words pair in order."""
    pairs: dict[int, int] = {}
    used: set[int] = set()
    for i, word in enumerate(a):
        for j, other in enumerate(b):
            if j in used:
                continue
            # A name and the same word in lower case ("CSV" / "csv") are the same word.
            same = word.text == other.text or (
                word.role is other.role and word.role is not WordRole.FIXED
                and bool(word.lemmas & other.lemmas))
            if same:
                pairs[i] = j
                used.add(j)
                break
    return pairs


def _drop_acronyms(a: list[QueryWord], b: list[QueryWord], left: list[int],
                   right: list[int]) -> list[int]:
    """Leave out of ``left`` an acronym of a's whose letters open a run of b's unmatched words
    ("USA" / "United States of America"); those words leave ``right`` (in place)."""
    kept = []
    for i in left:
        letters = a[i].text
        run = _initials_run(letters, b, right) if a[i].role is WordRole.FIXED and \
            2 <= len(letters) <= 6 else None
        if run is None:
            kept.append(i)
            continue
        for j in run:
            right.remove(j)
    return kept


def _initials_run(letters: str, b: list[QueryWord], right: list[int]) -> list[int] | None:
    """Consecutive unmatched words of b whose initials spell ``letters`` (prepositions inside
    the run are skipped over), or None."""
    for start in range(len(right)):
        run: list[int] = []
        num_spelled = 0
        for k in right[start:]:
            if run and k != run[-1] + 1:
                break
            if run and b[k].role is WordRole.RELATION:  # "of" in "United States of America"
                run.append(k)
                continue
            if num_spelled == len(letters) or b[k].text[0] != letters[num_spelled]:
                break
            run.append(k)
            num_spelled += 1
        if num_spelled == len(letters):
            while b[run[-1]].role is WordRole.RELATION:
                run.pop()
            return run
    return None


def _hinges(dropped_left: list[int], dropped_right: list[int]) -> list[tuple[int, int]]:
    """Prepositions only one query has, as (position in a, position in b), -1 for the side
    without it: "symptoms of a migraine" / "migraine symptoms" may swap the phrases such a word
    joined."""
    return [(i, -1) for i in dropped_left] + [(-1, j) for j in dropped_right]


def _order_kept(pairs: dict[int, int], a: list[QueryWord],
                hinges: list[tuple[int, int]]) -> bool:
    """The matched words must come in the same order, or in the same order after one phrase
    moved as a whole: a phrase that starts with a preposition or an adjective/adverb, a lone
    question word, or the two phrases a preposition joined when the other query drops it."""
    by_rank = sorted(pairs)
    seq = [by_rank.index(i) for _, i in sorted((j, i) for i, j in pairs.items())]
    n = len(seq)
    if seq == list(range(n)):
        return True
    for start in range(n):
        for middle in range(start + 1, n):
            for end in range(middle + 1, n + 1):
                moved = (list(range(start)) + list(range(middle, end)) + list(range(start, middle))
                         + list(range(end, n)))
                if seq != moved:
                    continue
                first, second = by_rank[start:middle], by_rank[middle:end]
                if _can_move(first, a) or _can_move(second, a) or \
                        _joined(first, second, pairs, hinges):
                    return True
    return False


def _joined(first: list[int], second: list[int], pairs: dict[int, int],
            hinges: list[tuple[int, int]]) -> bool:
    """A preposition only one side has sits between the two swapped phrases (in that side)."""
    for in_a, in_b in hinges:
        if in_a >= 0 and first[-1] < in_a < second[0]:
            return True
        if in_b >= 0:
            second_b = [pairs[i] for i in second]
            first_b = [pairs[i] for i in first]
            if max(second_b) < in_b < min(first_b):
                return True
    return False


def _can_move(block: list[int], a: list[QueryWord]) -> bool:
    first = a[block[0]]
    if first.role is WordRole.RELATION or first.is_modifier:
        return True
    return len(block) == 1 and first.text in _QUESTION_WORDS


def _differ_by_form(first: str, second: str) -> bool:
    """Words built from one shared part and one differing part name different things, whatever
    their embeddings say: lock/unlock (a negating prefix), enable/disable, upload/download,
    maximum/minimum (same ending, different start), sunrise/sunset, weekdays/weekends (same
    start, a different word after it). Inflections and derivations ("invented"/"inventor",
    "polite"/"politely", "colour"/"color") differ only in a short ending and are not caught."""
    short, long = sorted((first, second), key=len)
    if any(long == prefix + short for prefix in _NEGATING_PREFIXES):
        return True
    shared_start = len(os.path.commonprefix([first, second]))
    shared_end = len(os.path.commonprefix([first[::-1], second[::-1]]))
    if shared_end >= 4 and min(len(first), len(second)) - shared_end >= 2:
        return True
    return shared_start >= 3 and min(len(first), len(second)) - shared_start >= 3


def _edit_distance(first: str, second: str) -> int:
    """Optimal string alignment distance (a swap of two neighbours counts as one edit)."""
    rows = [[0] * (len(second) + 1) for _ in range(len(first) + 1)]
    for i in range(len(first) + 1):
        rows[i][0] = i
    for j in range(len(second) + 1):
        rows[0][j] = j
    for i in range(1, len(first) + 1):
        for j in range(1, len(second) + 1):
            cost = first[i - 1] != second[j - 1]
            rows[i][j] = min(rows[i - 1][j] + 1, rows[i][j - 1] + 1, rows[i - 1][j - 1] + cost)
            if i > 1 and j > 1 and first[i - 1] == second[j - 2] and first[i - 2] == second[j - 1]:
                rows[i][j] = min(rows[i][j], rows[i - 2][j - 2] + 1)
    return rows[-1][-1]
