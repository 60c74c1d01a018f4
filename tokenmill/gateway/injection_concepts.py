"""Language-independent features for the injection detector: which attack-related concepts a
text mentions ("ignore", "previous", "instructions", "system prompt", "developer mode", ...),
found through a hand-written lexicon of word stems in 37 languages
(``data/injection_concepts.json``).

Why: the character n-gram view learns what attacks look like in a language only from exemplars
in that language, so a Thai or Bengali attack is scored against the few Thai or Bengali
exemplars there are. Mapping every language onto the same concepts lets an override written in
Thai ("IGNORE" + "PREVIOUS" + "INSTRUCTIONS") borrow what the English, Spanish and Japanese
overrides taught. Harmless look-alikes mention some of the same concepts ("ignore the typo",
"developer mode on my phone"), so the features are the concepts and every pair of them: a
classifier learns which combinations make an attack, not that a word is bad.

Matching is by substring on the NFKC-normalized, case-folded text, so a stem ("игнорир", "無視")
catches inflected forms and needs no word segmentation in scripts written without spaces; in a
phrase of several words each word may inflect (``stem_parts``).
"""

from __future__ import annotations

import json
import re
import unicodedata
from importlib import resources
from pathlib import Path

import numpy as np

from tokenmill.errors import ConfigError

_PUNCTUATION = re.compile(r"[^\w\s]")


def default_lexicon_path() -> str:
    return str(resources.files("tokenmill.gateway") / "data" / "injection_concepts.json")


def normalized(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


def stem_parts(stem: str) -> tuple[str, str | None]:
    """How one stem is found: a literal to look for, and for a phrase of several words whose
    words may inflect, the regular expression that must match from where the literal starts.

    A phrase lets each of its words inflect ("режим разработчика" also finds "в режиме
    разработчика", "modo de desarrollador" "modos de desarrolladores"): a word of five or more
    letters keeps its first letters but two (at least four) and may end any way. Its literal is
    the first word's fixed beginning."""
    words = stem.split(" ")
    if len([w for w in words if w]) < 2:
        return stem, None
    relaxed = [(w[:max(4, len(w) - 2)], True) if len(w) >= 5 and w.isalpha() else (w, False)
               for w in words]
    pattern = r"\s+".join(re.escape(part) + (r"\w*" if free else "") for part, free in relaxed)
    literal = relaxed[0][0] if words[0] else " " + relaxed[1][0]
    return literal, pattern


def load_lexicon(path: str | None = None) -> ConceptLexicon:
    """The lexicon at ``path`` (default: the shipped one); a file that is not one is a
    ``ConfigError`` naming the setting, since deployments may point at their own."""
    where = "guardrails.injection_detector.concepts"
    path = path or default_lexicon_path()
    try:
        return ConceptLexicon(path)
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read {path!r}: {exc.strerror}", param=where) from None
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ConfigError(f"{where}: {path!r} is not a concept lexicon ({{\"concepts\": "
                          f"{{NAME: {{\"stems\": {{LANG: [STEM, ...]}}}}}}}}): {exc!r}",
                          param=where) from None


class ConceptLexicon:
    """The concepts a text mentions, as 0/1 features, plus each pair of them (their product).

    Ten thousand stems are found in one pass over the text with an Aho-Corasick automaton
    (a regular expression alternating them took ~9 ms for 300 characters). A phrase whose words
    may inflect is found through its first word's fixed beginning, then its own expression."""

    def __init__(self, path: str | None = None) -> None:
        import ahocorasick

        data = json.loads(Path(path or default_lexicon_path()).read_text(encoding="utf-8"))
        self.names: list[str] = sorted(data["concepts"])
        # literal -> (concepts it shows directly, [(concept, phrase, the literal's length)] it
        # may start)
        found: dict[str, tuple[set[int], list[tuple[int, re.Pattern[str], int]]]] = {}
        for index, name in enumerate(self.names):
            for stem in {normalized(s) for forms in data["concepts"][name]["stems"].values()
                         for s in forms if s.strip()}:
                literal, pattern = stem_parts(stem)
                direct, phrases = found.setdefault(literal, (set(), []))
                if pattern is None:
                    direct.add(index)
                else:
                    phrases.append((index, re.compile(pattern), len(literal)))
        self._automaton = ahocorasick.Automaton()
        for literal, entry in found.items():
            self._automaton.add_word(literal, entry)
        self._automaton.make_automaton()
        first, second = np.triu_indices(len(self.names), k=1)
        self._pairs = (first, second)

    @property
    def num_features(self) -> int:
        return len(self.names) + len(self._pairs[0])

    def mentions(self, text: str) -> np.ndarray:
        """One 0/1 entry per concept (``names``)."""
        # Stems with a space at an end (" ai ") match whole words only: the text is padded,
        # and searched once more with its punctuation turned into spaces ("AI," is a word).
        folded = normalized(text)
        folded = f" {folded} \n {_PUNCTUATION.sub(' ', folded)} "
        hits = np.zeros(len(self.names), dtype=np.float32)
        for end, (direct, phrases) in self._automaton.iter(folded):
            for index in direct:
                hits[index] = 1.0
            for index, pattern, length in phrases:
                # the phrase starts where its literal beginning does
                if not hits[index] and pattern.match(folded, end + 1 - length):
                    hits[index] = 1.0
        return hits

    def features(self, texts: list[str]) -> np.ndarray:
        """[len(texts), num_features]: the concepts, then every pair of them."""
        found = np.array([self.mentions(t) for t in texts], dtype=np.float32).reshape(
            len(texts), len(self.names))
        first, second = self._pairs
        return np.hstack([found, found[:, first] * found[:, second]])
