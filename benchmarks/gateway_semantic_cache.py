"""Semantic cache quality on the labelled pairs: precision, recall and false-hit rate.

    HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/gateway_semantic_cache.py [--threshold 0.88]

Each pair's first query is cached alone, then the second is looked up. Paraphrases should hit,
near-misses must not. Printed with and without the negation/number/entity guard, over a few
thresholds, so the effect of each is visible.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

PAIRS = Path(__file__).resolve().parents[1] / "tests" / "gateway" / "semantic_pairs.json"


def evaluate(embedder, threshold: float, guard: bool) -> dict[str, float]:
    from tokenmill.gateway import semantic_cache
    from tokenmill.gateway.response_cache import CachedAnswer

    pairs = json.loads(PAIRS.read_text())
    if not guard:
        semantic_cache.same_meaning_markers = lambda a, b: True
    results = {}
    for label in ("paraphrases", "near_misses"):
        hits = 0
        for pair in pairs[label]:
            index = semantic_cache.SemanticIndex(embedder.dim, threshold, 100, 60)
            vectors = embedder.embed([pair[0], pair[1]])
            index.add("scope", pair[0], vectors[0], CachedAnswer({}))
            hits += index.lookup("scope", pair[1], vectors[1])[1] is not None
        results[label] = (hits, len(pairs[label]))
    from tokenmill.gateway import query_guard
    semantic_cache.same_meaning_markers = query_guard.same_meaning_markers
    true_hits, num_para = results["paraphrases"]
    false_hits, num_near = results["near_misses"]
    precision = true_hits / (true_hits + false_hits) if true_hits + false_hits else 1.0
    return {"recall": true_hits / num_para, "precision": precision,
            "false_hit_rate": false_hits / num_near, "hits": true_hits, "false_hits": false_hits}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threshold", type=float, action="append")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tokenmill.gateway.embeddings import load_embedder

    embedder = load_embedder()
    print(f"{'threshold':>9} {'guard':>5} {'recall':>7} {'precision':>9} {'false-hit':>9}")
    for threshold in args.threshold or [0.80, 0.85, 0.88, 0.92]:
        for guard in (False, True):
            r = evaluate(embedder, threshold, guard)
            print(f"{threshold:9.2f} {'on' if guard else 'off':>5} {r['recall']:7.2f} "
                  f"{r['precision']:9.2f} {r['false_hit_rate']:9.2f}")


if __name__ == "__main__":
    main()
