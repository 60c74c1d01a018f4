"""A query split into normalized words, each with the role it plays in the question's meaning.

The semantic cache's verifier (``query_alignment.py``) aligns two queries word by word; this
module decides what a word is before any alignment happens:

- ``FILLER``: scaffolding that does not change what is asked (articles, "please", "can you",
  generic "I"/"you"/"my", present-tense "is"/"do"). Dropped.
- ``RELATION``: prepositions and conjunctions. They tie the other words together, so they must
  match exactly; only a pure insertion ("pancake recipe" / "recipe for pancakes") is harmless.
- ``FIXED``: words whose every change changes the answer and that no synonym can stand for:
  negations, numbers (digits and number words), ordinals, quantifiers, pronouns with a person or
  gender, tense and modal auxiliaries, and names (capitalised mid-sentence, or unknown to the
  lemmatizer). They match only the same word.
- ``CONTENT``: everything else. Matches the same lemma in the same tense, and otherwise needs a
  justification (a synonym, a typo) from the verifier.

The word classes below are closed grammatical classes of English, not lists of opposites: a new
pair of antonyms needs no entry here.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from functools import lru_cache

import lemminflect


class WordRole(enum.Enum):
    FILLER = "filler"
    RELATION = "relation"
    FIXED = "fixed"
    CONTENT = "content"


@dataclass(frozen=True)
class QueryWord:
    text: str
    """Lower-case normalized form (number words become digits)."""
    role: WordRole
    lemmas: frozenset[str]
    """The word and its noun/verb lemmas; adjective degrees are kept apart on purpose
    ("cheap" and "cheapest" ask different things)."""
    is_past: bool
    """A past-tense verb or auxiliary (not a participle after be/have: "is made" is present)."""
    is_future: bool
    is_known: bool
    """The lemmatizer knows the word; an unknown one may be a typo or a name."""
    is_modifier: bool = False
    """Only ever an adjective or adverb ("largest", "safe"): it may move within the question
    ("the largest ocean" / "which ocean is the largest"), unlike a noun, which may be a role."""


def _words(text: str) -> frozenset[str]:
    return frozenset(text.split())


_FILLER = _words("""
a an the please kindly hi hello hey thanks thank you i me my mine we us our ours your yours
one someone anyone can could would do does is are am be been being tell know explain describe
wonder there it its so just really actually exactly also ok okay what which
""")

_RELATION = _words("""
about above across after against along among around at before behind below beneath beside
between beyond by down during except for from in inside into near of off on onto out outside
over past since than through throughout till to toward towards under underneath until up upon
via with within or and versus vs per as like
""")

NEGATIONS = _words("not no never none nobody nothing neither nor without nowhere")
_ORDINALS = _words("""
first second third fourth fifth sixth seventh eighth ninth tenth last next previous
""")
_QUANTIFIERS = _words("""
all some every each any most many few fewer fewest more less least several both either much
half whole only
""")
_PERSONAL = _words("he she him her his hers they them their theirs himself herself themselves")
_MODALS = _words("should must may might need needs ought")
_FIXED = NEGATIONS | _ORDINALS | _QUANTIFIERS | _PERSONAL | _MODALS
# Tense is a property of the whole question ("did the wall fall" = "the wall fell"), so these
# auxiliaries are dropped as words and compared as the question's tense instead.
_PAST_AUXILIARIES = _words("was were did")
_FUTURE_AUXILIARIES = _words("will shall")
_CLOSED_CLASSES = _FILLER | _RELATION | _FIXED | _PAST_AUXILIARIES | _FUTURE_AUXILIARIES

_NUMBER_WORDS = {w: str(i) for i, w in enumerate((
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten",
    "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen",
    "nineteen", "twenty"))}
_NUMBER_WORDS.update({"thirty": "30", "forty": "40", "fifty": "50", "sixty": "60",
                      "seventy": "70", "eighty": "80", "ninety": "90", "hundred": "100",
                      "thousand": "1000", "million": "1000000", "billion": "1000000000",
                      "twice": "2", "double": "2", "triple": "3", "dozen": "12"})
# "one" is far more often a pronoun ("one should ...") than a count; "a"/"an" stand for one.
del _NUMBER_WORDS["one"]

_CONTRACTIONS = [
    (re.compile(r"\bcan't\b"), "can not"), (re.compile(r"\bwon't\b"), "will not"),
    (re.compile(r"\bcannot\b"), "can not"), (re.compile(r"n't\b"), " not"),
    (re.compile(r"'re\b"), " are"), (re.compile(r"'m\b"), " am"), (re.compile(r"'ve\b"), " have"),
    (re.compile(r"'ll\b"), " will"), (re.compile(r"'d\b"), " would"),
    # "what's", "it's", "where's": a verb; after any other word "'s" is a possessive.
    (re.compile(r"\b(what|who|where|when|how|why|which|it|that|there|here|he|she)'s\b"),
     r"\1 is"),
    (re.compile(r"\b(what|who|where|when|how|why)s\b"), r"\1 is"),  # "whats" typed in a hurry
    (re.compile(r"'s\b"), ""),
]
_TOKEN_RE = re.compile(r"\d+(?:[.,]\d+)*%?|[A-Za-z]+")
_BE_OR_HAVE = _words("is are am was were be been being has have had get gets got")


@lru_cache(maxsize=65536)
def _lemmas(word: str) -> tuple[frozenset[str], bool, frozenset[str], bool]:
    """(noun/verb lemmas + the word, known to the lemmatizer, lemmas whose past tense it is,
    only ever an adjective/adverb)."""
    found = lemminflect.getAllLemmas(word)
    lemmas = {word}
    for pos in ("NOUN", "VERB", "AUX", "PROPN"):
        lemmas.update(found.get(pos, ()))
    past_of = frozenset(
        lemma for lemma in found.get("VERB", ())
        if lemma != word and word in lemminflect.getInflection(lemma, "VBD"))
    is_modifier = bool(found) and set(found) <= {"ADJ", "ADV"}
    return frozenset(lemmas), bool(found), past_of, is_modifier


def load_lexicon() -> None:
    """Load the lemmatizer's tables now (they load on first use, ~0.5 s) so that the first
    request after start-up does not pay for it."""
    _lemmas("warmed")


def split_query(text: str) -> list[QueryWord]:
    """The words of ``text`` in order, fillers included (the verifier drops them)."""
    if text.isupper():  # "HOW DO I RESET MY ROUTER": capitals carry no name information
        text = text.lower()
    text = text.replace("\u2019", "'")
    raw: list[tuple[str, bool]] = []  # (token, starts a sentence)
    for sentence in re.split(r"(?<=[.!?:;,])\s+", text):
        lowered = sentence.lower()
        for pattern, replacement in _CONTRACTIONS:
            lowered = pattern.sub(replacement, lowered)
        # Capitals are read from the original sentence: re-find each token there.
        original_tokens = _TOKEN_RE.findall(sentence.replace("'s", ""))
        for position, token in enumerate(_TOKEN_RE.findall(lowered)):
            capitalised = token != "i" and any(o.lower() == token and o != token
                                                 for o in original_tokens)
            raw.append((token, capitalised and position > 0))
            if capitalised and position == 0 and not _lemmas(token)[1] and \
                    token not in _CLOSED_CLASSES:
                raw[-1] = (token, True)  # "Paris is ..." opens with a name
    words: list[QueryWord] = []
    for index, (token, is_name) in enumerate(raw):
        words.append(_classify(token, is_name, [t for t, _ in raw[max(0, index - 2):index]]))
    return words


def _classify(token: str, is_name: bool, before: list[str]) -> QueryWord:
    token = token.rstrip("%") if token[0].isdigit() else token
    if token[0].isdigit():
        return _fixed(token.replace(",", ""))
    if token in _NUMBER_WORDS:
        return _fixed(_NUMBER_WORDS[token])
    lemmas, is_known, past_of, is_modifier = _lemmas(token)
    if is_name:
        return QueryWord(token, WordRole.FIXED, frozenset({token}), False, False, is_known)
    if token in _PAST_AUXILIARIES or token in _FUTURE_AUXILIARIES:
        return QueryWord(token, WordRole.FILLER, lemmas, token in _PAST_AUXILIARIES,
                         token in _FUTURE_AUXILIARIES, True)
    if token in _FIXED:
        role = WordRole.FIXED
    elif token in _FILLER or token == "percent":
        role = WordRole.FILLER
    elif token in _RELATION:
        role = WordRole.RELATION
    else:
        role = WordRole.CONTENT
    # "is made", "was written": a participle after be/have is no tense of its own.
    is_past = role is WordRole.CONTENT and bool(past_of) and \
        not any(b in _BE_OR_HAVE for b in before)
    return QueryWord(token, role, lemmas, is_past, False, is_known,
                     is_modifier and role is WordRole.CONTENT)


def _fixed(text: str) -> QueryWord:
    return QueryWord(text, WordRole.FIXED, frozenset({text}), False, False, True)
