"""Split the labelled injection prompts into a dev half and a held-back test half, once, by rule.

    .venv/bin/python benchmarks/injection_split.py          # rewrite the split and the exemplars
    .venv/bin/python benchmarks/injection_split.py --check  # fail if either file is out of date

``benchmarks/data/injection_prompts.jsonl`` holds every labelled prompt (``label`` attack|benign,
``category``, ``text``, ``split``; some also ``lang``, ``kind``, ``added``). A prompt goes to ``dev`` when the sha256 of its text is even,
to ``test`` when odd: the split depends only on the text itself, so adding prompts never moves
one already placed from one half to the other, and each kind of attack and look-alike lands in
both halves in about equal parts. The dev half becomes the exemplar library shipped with the gateway
(``tokenmill/gateway/data/injection_exemplars.jsonl``) and is the only half used to tune the
threshold; the test half is read only by ``benchmarks/gateway_injection.py`` for the reported
figure (and by a fixed sample in the tests, which never tune anything).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "benchmarks" / "data" / "injection_prompts.jsonl"
EXEMPLARS = REPO / "tokenmill" / "gateway" / "data" / "injection_exemplars.jsonl"
# Kept in the prompts file, not shipped: the language (ISO 639-1, "mix" for code-switched), the
# kind of attack or look-alike a non-English prompt is (its category stays "encoded"), and the
# session that added it ("s25"), so the benchmark can report new prompts apart from old ones.
OPTIONAL_KEYS = ("lang", "kind", "added")


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def load_prompts(split: str | None = None) -> list[dict]:
    rows = read_jsonl(PROMPTS)
    return [r for r in rows if split is None or r["split"] == split]


def split_of(text: str) -> str:
    return "dev" if hashlib.sha256(text.encode()).digest()[-1] % 2 == 0 else "test"


def assign_splits(rows: list[dict]) -> list[dict]:
    for row in rows:
        row["split"] = split_of(row["text"])
    return rows


def _dump(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only check the files are current")
    args = parser.parse_args()
    rows = assign_splits([{k: r[k] for k in ("label", "category", "text", *OPTIONAL_KEYS)
                           if k in r} for r in read_jsonl(PROMPTS)])
    texts = [r["text"] for r in rows]
    if len(set(texts)) != len(texts):
        print("duplicate prompt texts in", PROMPTS, file=sys.stderr)
        return 1
    prompts_text = _dump(rows)
    exemplars_text = _dump([{k: r[k] for k in ("label", "category", "text")}
                            for r in rows if r["split"] == "dev"])
    if args.check:
        current = PROMPTS.read_text() == prompts_text and EXEMPLARS.is_file() and \
            EXEMPLARS.read_text() == exemplars_text
        print("up to date" if current else "out of date: run benchmarks/injection_split.py")
        return 0 if current else 1
    PROMPTS.write_text(prompts_text)
    EXEMPLARS.write_text(exemplars_text)
    counts: dict[tuple[str, str], int] = {}
    for r in rows:
        counts[(r["label"], r["split"])] = counts.get((r["label"], r["split"]), 0) + 1
    print(", ".join(f"{label} {split}: {n}" for (label, split), n in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
