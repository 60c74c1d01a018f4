"""The labelled injection set: big enough, split by its rule, and the shipped library is exactly
the dev half (so no held-back prompt ever trains the detector)."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

from tokenmill.gateway.injection_detector import default_exemplars_path, load_exemplars

PROMPTS = Path(__file__).resolve().parents[2] / "benchmarks" / "data" / "injection_prompts.jsonl"


def test_split_rule_sizes_and_shipped_library():
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    counts = Counter(r["label"] for r in rows)
    assert counts["attack"] >= 300 and counts["benign"] >= 300
    assert len({r["text"] for r in rows}) == len(rows)
    for r in rows:
        parity = hashlib.sha256(r["text"].encode()).digest()[-1] % 2
        assert r["split"] == ("dev" if parity == 0 else "test")
    kinds = {(r["label"], r["category"]) for r in rows}
    assert {k for k in kinds if k[0] == "attack"} == {
        ("attack", c) for c in ("override", "persona", "extraction", "encoded", "indirect")}
    for kind in kinds:  # every kind is in both halves
        assert {r["split"] for r in rows if (r["label"], r["category"]) == kind} == {"dev", "test"}
    shipped = load_exemplars(default_exemplars_path())
    dev = [r for r in rows if r["split"] == "dev"]
    assert [(e.text, e.is_attack) for e in shipped] == \
        [(r["text"], r["label"] == "attack") for r in dev]
