"""Semantic cache quality on labelled query pairs: precision, recall, false-hit rate, and the
time the verifier adds to a lookup.

    HF_HUB_OFFLINE=1 TOKENMILL_NUM_THREADS=1 OMP_NUM_THREADS=1 \\
        .venv/bin/python benchmarks/gateway_semantic_cache.py [--threshold 0.8 ...]

Pairs come from ``benchmarks/data/semantic_cache_pairs.jsonl`` (dev and test halves; thresholds
and verifier settings are chosen on dev, the test figures are the ones reported) and the older
``tests/gateway/semantic_pairs.json`` (regression sample). Each pair's first query is in the
cache, the second is asked: a paraphrase should hit, a near-miss must not. A pair hits at
threshold t when the two embeddings' cosine is >= t and, with the verifier on, the verifier
accepts it: the same decision ``SemanticIndex.lookup`` makes with one entry in the cache.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import Counter
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PAIRS = ROOT / "benchmarks" / "data" / "semantic_cache_pairs.jsonl"
OLD_PAIRS = ROOT / "tests" / "gateway" / "semantic_pairs.json"
THRESHOLDS = (0.60, 0.70, 0.75, 0.80, 0.85, 0.90, 0.95)


def load_sets() -> dict[str, list[dict]]:
    rows = [json.loads(line) for line in PAIRS.read_text().splitlines() if line.strip()]
    old = json.loads(OLD_PAIRS.read_text())
    regression = [{"label": "paraphrase", "kind": "-", "cached": p[0], "asked": p[1]}
                  for p in old["paraphrases"]]
    regression += [{"label": "near_miss", "kind": "-", "cached": p[0], "asked": p[1]}
                   for p in old["near_misses"]]
    return {"dev": [r for r in rows if r["split"] == "dev"],
            "test": [r for r in rows if r["split"] == "test"], "regression": regression}


def scores(rows: list[dict], embedder, verifier) -> tuple[np.ndarray, list[bool], list[float]]:
    """Cosine of each pair, the verifier's verdict, and the verifier's time per pair (ms)."""
    cached = embedder.embed([r["cached"] for r in rows])
    asked = embedder.embed([r["asked"] for r in rows])
    similarity = (cached * asked).sum(axis=1)
    verdicts, times_ms = [], []
    for row, sim in zip(rows, similarity):
        start = time.perf_counter()
        verdicts.append(verifier.verify(row["cached"], row["asked"], float(sim)).same_question)
        times_ms.append((time.perf_counter() - start) * 1000)
    return similarity, verdicts, times_ms


def curve_row(rows, similarity, verdicts, threshold: float, verify: bool) -> dict[str, float]:
    hits = [bool(s >= threshold) and (v or not verify) for s, v in zip(similarity, verdicts)]
    true_hits = sum(h for h, r in zip(hits, rows) if r["label"] == "paraphrase")
    false_hits = sum(h for h, r in zip(hits, rows) if r["label"] == "near_miss")
    num_para = sum(r["label"] == "paraphrase" for r in rows)
    num_near = len(rows) - num_para
    return {"recall": true_hits / num_para, "false_hit_rate": false_hits / num_near,
            "precision": true_hits / (true_hits + false_hits) if true_hits + false_hits else 1.0,
            "false_hits": false_hits, "num_near": num_near, "true_hits": true_hits,
            "num_para": num_para}


def sweep_verifier_setting(rows: list[dict], embedder, section, name: str,
                           values: tuple[float, ...]) -> None:
    """Dev-half recall and false hits at the default lookup threshold while one verifier
    setting varies: how its default was chosen."""
    import dataclasses

    from tokenmill.gateway.semantic_cache import build_verifier

    print(f"| {name} | dev recall | dev false hits |")
    print("|---|---|---|")
    for value in values:
        varied = dataclasses.replace(section, **{name: value})
        similarity, verdicts, _ = scores(rows, embedder, build_verifier(varied, embedder))
        r = curve_row(rows, similarity, verdicts, section.similarity_threshold, True)
        print(f"| {value:.2f} | {r['recall']:.2f} | {r['false_hits']}/{r['num_near']} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threshold", type=float, action="append",
                        help="lookup thresholds to print (default: a sweep)")
    parser.add_argument("--show-errors", action="store_true",
                        help="list the dev pairs the default settings get wrong")
    parser.add_argument("--sweep-verifier", action="store_true",
                        help="on the dev half only: recall and false hits while each verifier "
                             "threshold varies (how the defaults were chosen)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tokenmill.gateway.config import CacheSection
    from tokenmill.gateway.embeddings import load_embedder
    from tokenmill.gateway.semantic_cache import build_verifier

    embedder = load_embedder()
    section = CacheSection()
    if args.sweep_verifier:
        dev = load_sets()["dev"]
        for name, values in (
                ("verifier_word_threshold", (0.70, 0.75, 0.80, 0.85, 0.90, 1.0)),
                ("verifier_context_query_threshold", (0.93, 0.94, 0.95, 0.96, 0.97, 0.98, 1.0)),
                ("verifier_context_word_threshold", (0.1, 0.2, 0.3, 0.4, 0.5))):
            sweep_verifier_setting(dev, embedder, section, name, values)
            print()
        return
    print(f"defaults: similarity_threshold={section.similarity_threshold} "
          f"verifier_word_threshold={section.verifier_word_threshold} "
          f"verifier_context_word_threshold={section.verifier_context_word_threshold} "
          f"verifier_context_query_threshold={section.verifier_context_query_threshold}")
    for name, rows in load_sets().items():
        kinds = Counter(r["label"] for r in rows)
        print(f"\n## {name}: {kinds['paraphrase']} paraphrases, {kinds['near_miss']} near-misses")
        print("| threshold | verifier | recall | precision | false-hit rate | false hits |")
        print("|---|---|---|---|---|---|")
        verifier = build_verifier(section, embedder)  # fresh word cache: cold timings
        similarity, verdicts, cold_ms = scores(rows, embedder, verifier)
        _, _, warm_ms = scores(rows, embedder, verifier)
        for threshold in args.threshold or THRESHOLDS:
            for verify in (False, True):
                r = curve_row(rows, similarity, verdicts, threshold, verify)
                print(f"| {threshold:.2f} | {'on' if verify else 'off'} | {r['recall']:.2f} | "
                      f"{r['precision']:.2f} | {r['false_hit_rate']:.3f} | "
                      f"{r['false_hits']}/{r['num_near']} |")
        print(f"verifier per lookup, ms: p50 {np.percentile(cold_ms, 50):.2f} "
              f"p99 {np.percentile(cold_ms, 99):.2f} (new words embedded); "
              f"p50 {np.percentile(warm_ms, 50):.2f} p99 {np.percentile(warm_ms, 99):.2f} "
              "(words seen before)")
        by_kind: dict[str, list[bool]] = {}
        for row, sim, ok in zip(rows, similarity, verdicts):
            hit = bool(sim >= section.similarity_threshold) and ok
            by_kind.setdefault(f"{row['label']}/{row['kind']}", []).append(hit)
        print("hits at the defaults by kind: " + ", ".join(
            f"{k} {sum(v)}/{len(v)}" for k, v in sorted(by_kind.items())))
        if args.show_errors and name == "dev":
            for row, sim, ok in zip(rows, similarity, verdicts):
                hit = bool(sim >= section.similarity_threshold) and ok
                if hit != (row["label"] == "paraphrase"):
                    reason = verifier.verify(row["cached"], row["asked"], float(sim)).reason
                    print(f"  {row['label']:10} {sim:.2f} {reason}: {row['cached']!r} -> "
                          f"{row['asked']!r}")


if __name__ == "__main__":
    main()
