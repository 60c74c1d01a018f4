"""Check the hand-written concept lexicon (tokenmill/gateway/data/injection_concepts.json).

Checks its shape (every concept has a gloss and stems for every required language), prints counts,
and lists stems too short for the substring matching rule in alphabetic scripts (Latin, Cyrillic,
Greek, Armenian, Georgian): under 4 characters a stem is a substring of too many unrelated words.
Spaces count toward the length, because a leading or trailing space acts as a word boundary.

    python benchmarks/check_injection_concepts.py
"""

import json
import sys
import unicodedata
from pathlib import Path

LEXICON = Path(__file__).resolve().parents[1] / "tokenmill/gateway/data/injection_concepts.json"
REQUIRED_LANGUAGES = [
    "en", "zh", "ja", "ko", "ru", "uk", "es", "pt", "fr", "de", "it", "nl", "pl", "cs", "ro", "tr",
    "ar", "he", "fa", "hi", "bn", "ta", "te", "mr", "ur", "vi", "th", "id", "ms", "tl", "sw", "el",
    "hu", "fi", "sv", "ka", "hy", "am",
]
OPTIONAL_LANGUAGES = ("hi-Latn", "ur-Latn", "ar-Latn", "ru-Latn")
ALPHABETIC_SCRIPTS = ("LATIN", "CYRILLIC", "GREEK", "ARMENIAN", "GEORGIAN")
MIN_ALPHABETIC_LENGTH = 4
# Shorter tokens allowed anyway: they are distinctive on their own (the rule's "unless the word itself
# is shorter and distinctive"), and a substring hit inside e.g. "chatgpt" is wanted.
DISTINCTIVE_SHORT = {"gpt", "llm", "url"}


def is_alphabetic_script(stem: str) -> bool:
    letters = [ch for ch in stem if ch.isalpha()]
    return bool(letters) and all(unicodedata.name(ch, "").startswith(ALPHABETIC_SCRIPTS) for ch in letters)


def main() -> int:
    data = json.loads(LEXICON.read_text(encoding="utf-8"))
    problems = []
    if not isinstance(data.get("_about"), str):
        problems.append("missing _about paragraph")
    concepts = data["concepts"]
    languages, stem_count, short = set(), 0, []
    for name, concept in concepts.items():
        if not concept.get("gloss"):
            problems.append(f"{name}: no gloss")
        stems_by_language = concept.get("stems", {})
        for language in REQUIRED_LANGUAGES:
            if not stems_by_language.get(language):
                problems.append(f"{name}: no stems for {language}")
        for language, stems in stems_by_language.items():
            if language not in REQUIRED_LANGUAGES and language not in OPTIONAL_LANGUAGES:
                problems.append(f"{name}: unknown language key {language}")
            languages.add(language)
            for stem in stems:
                stem_count += 1
                if stem != unicodedata.normalize("NFKC", stem).casefold():
                    problems.append(f"{name}/{language}: stem not normalized: {stem!r}")
                if is_alphabetic_script(stem) and len(stem) < MIN_ALPHABETIC_LENGTH and stem not in DISTINCTIVE_SHORT:
                    short.append(f"{name}/{language}: {stem!r}")
            if len(set(stems)) != len(stems):
                problems.append(f"{name}/{language}: duplicate stems")
    print(f"concepts: {len(concepts)}  languages: {len(languages)}  stems: {stem_count}")
    for line in problems:
        print("PROBLEM", line)
    for line in short:
        print("SHORT", line)
    return 1 if problems or short else 0


if __name__ == "__main__":
    sys.exit(main())
