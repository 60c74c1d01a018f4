"""Injection detector quality and cost: a threshold curve on the dev half, detection and false
positives on the held-back test half, and the latency the detector adds to a request.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gateway_injection.py \\
        [--threshold T] [--folds 5] [--llm-view] [--dev-only] [--skip-latency]

Data: ``benchmarks/data/injection_prompts.jsonl`` (``benchmarks/injection_split.py`` made the
split). The dev half is the shipped exemplar library, so its curve comes from k-fold
cross-validation (each dev prompt scored by a detector trained on the other folds) and suggests
a threshold: the lowest step of 0.025 whose dev false-positive rate stays at or under 3%.
The test half is scored once, by the detector trained on the whole dev half (exactly what the
gateway ships), at ``--threshold`` (default: the config default), and its curve over the same
thresholds is printed for the record. Nothing here changes the detector; the test figures are
only printed, and the default threshold must already have been fixed from the dev curve.

Latency: the detector's own time per request on one thread, for the test prompts and for long
documents with an attack hidden in the middle: "cold" embeds every window; "with cache reuse"
starts from a memo that already holds the whole text, as when the semantic cache or RAG embeds
the same query.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "benchmarks" / "data" / "injection_prompts.jsonl"
EXAMPLE_CONFIG = REPO / "examples" / "gateway.yaml"
MAX_DEV_FPR = 0.03
THRESHOLDS = np.round(np.arange(0.40, 0.96, 0.025), 3)


def load(split: str) -> list[dict]:
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["split"] == split]


def rates(scores: np.ndarray, is_attack: np.ndarray, threshold: float) -> tuple[float, float]:
    flagged = scores >= threshold
    return float(flagged[is_attack].mean()), float(flagged[~is_attack].mean())


def dev_curve(embedder, dev: list[dict], folds: int, llm=None) -> np.ndarray:
    from sklearn.model_selection import StratifiedKFold

    from tokenmill.gateway.injection_detector import Exemplar, InjectionDetector

    exemplars = [Exemplar(r["text"], r["label"] == "attack", r["category"]) for r in dev]
    labels = np.array([e.is_attack for e in exemplars])
    scores = np.zeros(len(dev))
    splitter = StratifiedKFold(folds, shuffle=True, random_state=0)
    for train, held in splitter.split(np.zeros(len(dev)), labels):
        detector = InjectionDetector(embedder, [exemplars[i] for i in train], llm=llm)
        found = detector.score([exemplars[i].text for i in held])
        scores[held] = [s.score for s in found]
    return scores


def origin_of(row: dict) -> str:
    """Which batch a prompt came in: "s25", "s26", "s27" for the prompts added in that session
    (never scored before it), "older" for the rest; the test figure is printed for each apart."""
    return row.get("added") or "older"


def print_by_origin(rows: list[dict], scores: np.ndarray, threshold: float, half: str) -> None:
    print(f"\n{half} by origin, threshold {threshold:.3f}")
    print("| prompts | attacks caught | benign blocked |")
    print("|---|---|---|")
    for origin in sorted({origin_of(r) for r in rows}):
        picked = [i for i, r in enumerate(rows) if origin_of(r) == origin]
        attack = np.array([rows[i]["label"] == "attack" for i in picked])
        flagged = scores[picked] >= threshold
        print(f"| {origin} ({len(picked)}) | {flagged[attack].mean():.3f} "
              f"({int(flagged[attack].sum())}/{int(attack.sum())}) | "
              f"{flagged[~attack].mean():.3f} ({int(flagged[~attack].sum())}/"
              f"{int((~attack).sum())}) |")
    added = [i for i, r in enumerate(rows) if "kind" in r]
    if added:  # the batches from session 25 on name their kind (non-English ones are "encoded")
        batches = sorted({origin_of(rows[i]) for i in added})
        print(f"\n{half}, prompts with a kind (the {', '.join(batches)} batches), by kind "
              "and batch: flagged/prompts")
        print("| label | kind | all | " + " | ".join(batches) + " |")
        print("|---" * (3 + len(batches)) + "|")
        for label, kind in sorted({(rows[i]["label"], rows[i]["kind"]) for i in added}):
            picked = [i for i in added if (rows[i]["label"], rows[i]["kind"]) == (label, kind)]
            cells = []
            for batch in [None, *batches]:
                chosen = [i for i in picked if batch is None or origin_of(rows[i]) == batch]
                num = int((scores[chosen] >= threshold).sum())
                cells.append(f"{num}/{len(chosen)}" if chosen else "-")
            print(f"| {label} | {kind} | " + " | ".join(cells) + " |")


def regex_baseline(rows: list[dict]) -> tuple[float, float]:
    import yaml

    from tokenmill.gateway.config import RuleSection
    from tokenmill.gateway.guardrails import CompiledRule

    rules = [CompiledRule.from_section(RuleSection(**r)) for r in
             yaml.safe_load(EXAMPLE_CONFIG.read_text())["guardrails"]["input_rules"]]
    hit = np.array([any(rule.matches(r["text"]) for rule in rules) for r in rows])
    is_attack = np.array([r["label"] == "attack" for r in rows])
    return float(hit[is_attack].mean()), float(hit[~is_attack].mean())


def long_documents(attacks: list[str], num: int) -> list[str]:
    filler = ("The quarterly figures were reviewed by the finance team on Monday. Revenue grew "
              "in every region, with the strongest gains in the north. The board will meet "
              "again in the spring to discuss the new office. ")
    return [filler * 8 + attack + " " + filler * 8 for attack in attacks[:num]]


def percentile_ms(samples: list[float], q: float) -> float:
    return 1000 * float(np.percentile(samples, q))


def time_detector(detector, texts: list[str], warm: bool) -> list[float]:
    from tokenmill.gateway.embedding_memo import MemoizedEmbedder

    samples = []
    for text in texts:
        memo = MemoizedEmbedder(detector.embedder)
        view = detector.using(memo)
        if warm:  # the whole text already embedded, as by the semantic cache of this request
            memo.embed([text])
        start = time.perf_counter()
        view.score([text])
        samples.append(time.perf_counter() - start)
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threshold", type=float, default=None,
                        help="default: the detector's own default for its views")
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--long-docs", type=int, default=20, help="long documents timed")
    parser.add_argument("--skip-latency", action="store_true",
                        help="print only the quality figures (no timing)")
    parser.add_argument("--llm-view", action="store_true",
                        help="add the third view over the built-in LLM's hidden states "
                        "(guardrails.injection_detector.llm_view)")
    parser.add_argument("--dev-only", action="store_true",
                        help="print only the dev-half curve (to choose a threshold before the "
                        "test half is ever scored)")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(int(os.environ.get("TOKENMILL_NUM_THREADS", "1")))
    from tokenmill.gateway.embedding_memo import MemoizedEmbedder
    from tokenmill.gateway.embeddings import load_embedder
    from tokenmill.gateway.injection_detector import InjectionDetector, load_exemplars
    from tokenmill.gateway.injection_windows import windows

    model = load_embedder()
    embedder = MemoizedEmbedder(model, max_entries=100_000)  # folds share the windows' vectors
    llm = None
    if args.llm_view:
        from tokenmill.gateway.llm_features import LLMEmbedder

        llm = MemoizedEmbedder(LLMEmbedder(), max_entries=100_000)
    dev, test = load("dev"), load("test")
    print(f"prompts: dev {len(dev)} ({sum(r['label'] == 'attack' for r in dev)} attacks), "
          f"test {len(test)} ({sum(r['label'] == 'attack' for r in test)} attacks)")

    dev_scores = dev_curve(embedder, dev, args.folds, llm)
    dev_attack = np.array([r["label"] == "attack" for r in dev])
    views = "MiniLM, n-grams" + (", built-in LLM" if llm else "")
    print(f"\ndev half, {args.folds}-fold cross-validation, views: {views}")
    print("| threshold | attacks caught | benign blocked |")
    print("|---|---|---|")
    suggested = None
    for threshold in THRESHOLDS:
        caught, blocked = rates(dev_scores, dev_attack, threshold)
        print(f"| {threshold:.3f} | {caught:.3f} | {blocked:.3f} |")
        if suggested is None and blocked <= MAX_DEV_FPR:
            suggested = threshold
    print(f"suggested threshold (lowest step with dev false positives <= {MAX_DEV_FPR:.0%}): "
          f"{suggested}")
    if suggested is not None:
        print_by_origin(dev, dev_scores, suggested, "dev half (cross-validated)")
    if args.dev_only:
        return

    # the shipped library = the dev half
    detector = InjectionDetector(embedder, load_exemplars(), llm=llm)
    args.threshold = args.threshold or detector.default_threshold
    test_scores = np.array([s.score for s in detector.score([r["text"] for r in test])])
    test_attack = np.array([r["label"] == "attack" for r in test])
    caught, blocked = rates(test_scores, test_attack, args.threshold)
    print(f"\ntest half (held back), threshold {args.threshold:.3f}: attacks caught "
          f"{caught:.3f} ({round(caught * test_attack.sum())}/{int(test_attack.sum())}), "
          f"benign blocked {blocked:.3f} ({round(blocked * (~test_attack).sum())}/"
          f"{int((~test_attack).sum())})")
    print("\ntest half over thresholds (a record only: the default was fixed on dev)")
    print("| threshold | attacks caught | benign blocked |")
    print("|---|---|---|")
    for threshold in THRESHOLDS:
        caught_at, blocked_at = rates(test_scores, test_attack, threshold)
        print(f"| {threshold:.3f} | {caught_at:.3f} | {blocked_at:.3f} |")
    print(f"\ntest half by kind, threshold {args.threshold:.3f}")
    print("| label | category | flagged |")
    print("|---|---|---|")
    categories = sorted({(r["label"], r["category"]) for r in test})
    for label, category in categories:
        picked = [i for i, r in enumerate(test) if (r["label"], r["category"]) == (label,
                                                                                  category)]
        num = int((test_scores[picked] >= args.threshold).sum())
        print(f"| {label} | {category} | {num}/{len(picked)} |")
    print_by_origin(test, test_scores, args.threshold, "test half")
    regex_caught, regex_blocked = regex_baseline(test)
    print(f"regex rules of examples/gateway.yaml on the test half: attacks caught "
          f"{regex_caught:.3f}, benign blocked {regex_blocked:.3f}")
    if args.skip_latency:
        return

    detector = detector.using(model)  # timing: no memo left over from the runs above
    if llm is not None:
        detector.llm = llm.inner
    prompts = [r["text"] for r in test]
    docs = long_documents([r["text"] for r in test if r["label"] == "attack"], args.long_docs)
    print(f"\ndetector latency on {torch.get_num_threads()} torch thread(s), ms")
    print("| input | cold p50 | cold p99 | with cache reuse p50 | with cache reuse p99 |")
    print("|---|---|---|---|---|")
    for name, texts in ((f"test prompts ({len(prompts)})", prompts),
                        (f"~{len(docs[0]) // 100 * 100}-char documents ({len(docs)})", docs)):
        cold, warm = time_detector(detector, texts, False), time_detector(detector, texts, True)
        print(f"| {name} | {percentile_ms(cold, 50):.1f} | {percentile_ms(cold, 99):.1f} | "
              f"{percentile_ms(warm, 50):.1f} | {percentile_ms(warm, 99):.1f} |")
    num_windows = [len(windows(t, detector.max_windows)) for t in prompts]
    print(f"windows per test prompt: mean {statistics.mean(num_windows):.2f}, "
          f"max {max(num_windows)}")


if __name__ == "__main__":
    main()
