"""The pieces of a text the injection detector scores: the whole text, its sentences, and what
hides behind an encoding.

A classifier that sees a long message only as a whole averages one hostile sentence away among
many harmless ones, so each sentence is scored too, and the text's score is the highest of its
windows. Encoded payloads (base64, hex, letters spaced out, digits for letters, ROT13, text
written backwards) look like noise to an embedding model, so their decoded text is added as one
more window. The number of windows is bounded: past ``max_windows`` sentences are packed into
that many groups, so a megabyte of text costs at most ``max_windows`` model calls and every
sentence is still inside some window.
"""

from __future__ import annotations

import base64
import binascii
import re

import lemminflect

# Sentence ends, colons that introduce a quoted payload, and line breaks. Latin-script ends
# need a space after them ("3.5" stays whole); the full-width Chinese/Japanese marks,
# the Devanagari danda, the Arabic and Urdu question mark and full stop, the Armenian and
# Ethiopic full stops end a sentence whether a space follows or not (Chinese and Japanese put
# none), so an instruction hidden in a Japanese document is a window of its own.
_SENTENCE_END = re.compile(r"(?<=[.!?:;])\s+|(?<=[。！？；：।॥؟۔։።])\s*|\n+")
_BASE64 = re.compile(r"[A-Za-z0-9+/]{16,}={0,2}")
_HEX = re.compile(r"\b(?:[0-9a-fA-F]{2}){8,}\b")
# "i g n o r e" or "I.g.n.o.r.e": at least five single characters, each followed by a separator
# (a longer gap between two of them is a word break).
_SPACED_LETTERS = re.compile(r"(?<!\w)(?:\w[ .]{1,3}){4,}\w(?!\w)")
_MIXED_WORD = re.compile(r"[a-z][0-9]|[0-9][a-z]", re.IGNORECASE)
_DIGITS_AS_LETTERS = str.maketrans("013457@$", "oieastas")
_ROT13 = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
                       "NOPQRSTUVWXYZABCDEFGHIJKLMnopqrstuvwxyzabcdefghijklm")
# Function words, which the lemmatizer's lexicon leaves out.
_FUNCTION_WORDS = frozenset(re.findall(r"[a-z]+", (
    "a about all an and any are as at be but by can do for from have i if in is it me my no not "
    "now of on or so that the this to was what will with you your")))
# MiniLM reads at most 256 word pieces (~1000 characters); longer sentences are cut so no part
# of them falls past the model's horizon.
_MAX_WINDOW_CHARS = 600


def sentences(text: str) -> list[str]:
    pieces = []
    for part in _SENTENCE_END.split(text):
        part = part.strip()
        while len(part) > _MAX_WINDOW_CHARS:
            cut = part.rfind(" ", 0, _MAX_WINDOW_CHARS)
            cut = cut if cut > 0 else _MAX_WINDOW_CHARS
            pieces.append(part[:cut])
            part = part[cut:].strip()
        if part:
            pieces.append(part)
    return pieces


def _readable(raw: bytes) -> str | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    num_plain = sum(c.isprintable() or c.isspace() for c in text)
    if not text or num_plain < 0.95 * len(text) or not re.search(r"[^\W\d_]{3}", text):
        return None
    return text


def _share_english(text: str) -> tuple[float, int]:
    """The share of ``text``'s words that are English words, and how many words it has."""
    words = re.findall(r"[a-z]+", text.lower())
    known = sum(w in _FUNCTION_WORDS or bool(lemminflect.getAllLemmas(w)) for w in words)
    return known / max(1, len(words)), len(words)


def _unscrambled(sentence: str) -> str | None:
    """``sentence`` ROT13'd or read backwards, when that turns it from mostly not English into
    mostly English: at least three words, under a third of them known before and two thirds
    after. A lexicon test, not a list of attack words, so any hidden sentence is found."""
    share, num_words = _share_english(sentence)
    if num_words < 3 or share >= 1 / 3:
        return None
    for plain in (sentence.translate(_ROT13), sentence[::-1]):
        if _share_english(plain)[0] >= 2 / 3:
            return plain
    return None


def decoded_payloads(text: str) -> list[str]:
    """Readable text hidden in ``text`` by a simple encoding, one entry per payload found."""
    found = []
    for match in _BASE64.finditer(text):
        chunk = match.group(0)
        try:
            plain = _readable(base64.b64decode(chunk + "=" * (-len(chunk) % 4)))
        except (binascii.Error, ValueError):
            plain = None
        if plain:
            found.append(plain)
    for match in _HEX.finditer(text):
        plain = _readable(bytes.fromhex(match.group(0)))
        if plain:
            found.append(plain)
    for match in _SPACED_LETTERS.finditer(text):
        run = match.group(0)
        # "I.g.n.o.r.e y.o.u.r": dots join letters, spaces part words. "i g n o r e  a l l":
        # one space joins letters, two part words.
        words = run.split(" ") if "." in run and " " in run else re.split(r"[ .]{2,}", run)
        found.append(" ".join(re.sub(r"[ .]", "", w) for w in words))
    words = text.split()
    # Short words that mix letters and digits ("1gn0r3"); long ones are ids or base64. One such
    # word is a name like "base64" or "mp3"; digits for letters make several.
    if sum(len(w) < 20 and bool(_MIXED_WORD.search(w)) for w in words) >= 2:
        found.append(" ".join(w.translate(_DIGITS_AS_LETTERS) if len(w) < 20 else w
                              for w in words))
    for sentence in sentences(text):
        plain = _unscrambled(sentence)
        if plain:
            found.append(plain)
    return found


def windows(text: str, max_windows: int) -> list[str]:
    """The texts to score for ``text``; the first is always ``text`` itself, unchanged, so the
    embedding the semantic cache computes for the same query is the same vector."""
    parts = sentences(text)
    if len(parts) > max_windows:
        size = -(-len(parts) // max_windows)  # ceil: every sentence lands in some group
        parts = [" ".join(parts[i:i + size]) for i in range(0, len(parts), size)]
    result = [text]
    if len(parts) > 1:
        result += parts
    result += decoded_payloads(text)[:max_windows]
    return result
