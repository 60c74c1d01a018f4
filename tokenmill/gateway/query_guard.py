"""Cheap checks that two similar-looking questions ask the same thing before a semantic hit.

Sentence embeddings place "is X safe" and "is X not safe" close together, and "flights to Paris
for 2 people" next to "... for 4 people". A semantic hit therefore also requires that both
questions have the same negation count, the same numbers, the same named entities in the same
order, and the same words from a small lexicon of opposites (more/less, before/after, ...).
A false miss only costs an upstream call; a false hit returns a wrong answer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


def _words(text: str) -> list[str]:
    return text.split()


_NEGATIONS = frozenset({"not", "no", "never", "none", "nobody", "nothing", "neither", "nor",
                        "cannot", "without", "nowhere", "unsafe", "illegal", "impossible"})

_NUMBER_WORDS = {w: str(i) for i, w in enumerate(_words(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
    "fifteen sixteen seventeen eighteen nineteen twenty"))}
_NUMBER_WORDS.update({"thirty": "30", "forty": "40", "fifty": "50", "hundred": "100",
                      "thousand": "1000", "million": "1000000", "billion": "1000000000",
                      "half": "0.5", "twice": "2", "double": "2", "triple": "3"})

# Words whose opposite is equally likely in a near-identical question.
_POLARITY = frozenset(_words("""
more less most least increase decrease increases decreases raise lower higher lower highest lowest
before after first last above below up down over under in out on off start stop open close
enable disable add remove buy sell best worst largest smallest biggest big small max maximum min
minimum hot cold warm cool fast slow faster slower cheap expensive cheaper cheapest safe dangerous
advantages disadvantages pros cons benefits risks import export upload download encrypt decrypt
compress decompress push pull north south east west left right early late earlier later
morning evening summer winter old new older newer young younger positive negative true false
win lose male female men women children adults past future
"""))

# Capitalised words that open a sentence without being names.
_STARTERS = frozenset(_words("""
what how why when where who whom whose which is are was were do does did can could should would
will shall may might must tell explain give list describe write show please i my we our you your
it its the a an in on at for of to from with by about if this that these those there here
hey hi hello compare name find summarize summarise translate define calculate help whats what's
"""))

_WORD_RE = re.compile(r"[A-Za-z][A-Za-z'\-]*|\d+(?:[.,]\d+)*")
_SENTENCE_END_RE = re.compile(r"[.!?]\s+")


@dataclass(frozen=True)
class QueryFeatures:
    num_negations: int
    numbers: tuple[str, ...]
    entities: tuple[str, ...]
    polarity: frozenset[str]


def extract_features(text: str) -> QueryFeatures:
    negations = 0
    numbers: list[str] = []
    entities: list[str] = []
    polarity: set[str] = set()
    for sentence in _SENTENCE_END_RE.split(text):
        for position, match in enumerate(_WORD_RE.finditer(sentence)):
            word = match.group(0)
            lower = word.lower()
            if lower.endswith("'s"):
                lower, word = lower[:-2], word[:-2]
            if lower.endswith("n't") or lower in _NEGATIONS:
                negations += 1
            if word[0].isdigit():
                numbers.append(word.replace(",", ""))
                continue
            if lower in _NUMBER_WORDS:
                numbers.append(_NUMBER_WORDS[lower])
            if lower in _POLARITY:
                polarity.add(lower)
            if _is_entity(word, lower, position):
                entities.append(lower)
    return QueryFeatures(negations, tuple(sorted(numbers)), tuple(entities), frozenset(polarity))


def _is_entity(word: str, lower: str, position: int) -> bool:
    if lower in ("i", "i'm", "i've", "i'd", "i'll"):
        return False
    if any(c.isdigit() for c in word) or (len(word) > 1 and word[1:] != word[1:].lower()):
        return True  # GPT-4, iPhone, NASA
    if not word[0].isupper():
        return False
    return position > 0 or lower not in _STARTERS


def same_meaning_markers(a: QueryFeatures, b: QueryFeatures) -> bool:
    return a == b
