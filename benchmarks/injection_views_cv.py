"""Compare injection-detector variants on the dev half only: each view's out-of-fold window
probabilities once, then any way of combining the views, scored the way docs/gateway.md reports
variants (5-fold cross-validation, three shuffles averaged, share of dev attacks caught at the
best threshold keeping dev false positives at or under 3%, and AUC).

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 TOKENMILL_NUM_THREADS=1 .venv/bin/python \\
        benchmarks/injection_views_cv.py compute --out /tmp/views.npz [--shuffles 0 1 2]
    .venv/bin/python benchmarks/injection_views_cv.py report --scores /tmp/views.npz

Why per view: in ``InjectionDetector`` each view fits its own model (with its own
multiple-instance step) on the same training texts, and the score is a combination of the views'
probabilities per window, then the highest window. So the views' window probabilities, computed
once per fold, give every weighted mean or stacked combination without refitting anything.
The test half is never read here.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
PROMPTS = REPO / "benchmarks" / "data" / "injection_prompts.jsonl"
MAX_DEV_FPR = 0.03


def load_dev() -> list[dict]:
    rows = [json.loads(line) for line in PROMPTS.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["split"] == "dev"]


def svm(c: float) -> Callable[[], Any]:
    def make() -> Any:
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.svm import SVC

        return CalibratedClassifierCV(SVC(C=c, kernel="rbf", class_weight="balanced"),
                                      method="sigmoid", cv=5, ensemble=False)
    return make


def logistic(c: float) -> Callable[[], Any]:
    def make() -> Any:
        from sklearn.linear_model import LogisticRegression

        return LogisticRegression(C=c, class_weight="balanced", max_iter=5000)
    return make


# view name -> (which vectors, which model); "ngrams" uses the detector's own n-gram features
VIEWS: dict[str, tuple[str, Callable[[], Any]]] = {
    "embedding": ("minilm", svm(32.0)),
    "ngrams": ("ngrams", logistic(16.0)),
    "llm": ("llm", svm(32.0)),
    "wl_svm4": ("wordllama", svm(4.0)),
    "wl_svm32": ("wordllama", svm(32.0)),
    "wl_lr": ("wordllama", logistic(16.0)),
    # the second round's (data batch s27) n-gram variants, against the then detector's char_wb n-grams (aimed at
    # non-English attacks): weaker regularisation, so n-grams seen in few exemplars count more;
    # n-grams seen once kept (languages with one or two exemplars lose most of their character
    # n-grams at min_df=2); character n-grams across word boundaries ("char", adopted: "ngrams"
    # is now that, and "ngrams_wb" the session 26 view)
    "ngrams_wb": ("ngrams", logistic(16.0)),
    "ngrams_wb_c64": ("ngrams", logistic(64.0)),
    "ngrams_wb_mindf1": ("ngrams", logistic(16.0)),
    # session 27's experiment: SmolLM2's hidden states pooled from a middle layer (or the mean of
    # a band of layers) instead of the last (benchmarks/llm_layer_embedder.py; source
    # "layers:<first>-<last>", 0 the embeddings, 30 the final norm)
    **{f"llm_l{k}": (f"layers:{k}-{k}", svm(32.0)) for k in (4, 8, 12, 16, 20, 24, 30)},
    "llm_l10_20": ("layers:10-20", svm(32.0)),
    "llm_l1_30": ("layers:1-30", svm(32.0)),
    # the same, on the text wrapped in a chat turn asking whether it is an attack, last token
    **{f"llm_q{k}": (f"question:{k}-{k}", svm(32.0)) for k in (12, 20, 30)},
    # layer 20 through the final norm: what a model cut after layer 20 would give
    "llm_qn20": ("question_norm:20-20", svm(32.0)),
    # the cross-lingual concept features (tokenmill/gateway/injection_concepts.py): alone, and
    # appended to the n-grams in one logistic regression ("ngrams_concepts", the detector's own
    # n-gram model since session 27; "ngrams" here stays the n-grams alone)
    "concepts": ("concepts", logistic(16.0)),
    "concepts_c1": ("concepts", logistic(1.0)),
    "ngrams_concepts": ("ngrams+concepts", logistic(16.0)),
}
# the views whose features are computed from the text, not vectors from a model
NOT_VECTORS = ("ngrams", "concepts", "ngrams+concepts")
# char n-gram vectoriser settings of the n-gram views that differ from the detector's own
NGRAM_CHARS: dict[str, dict[str, Any]] = {
    "ngrams_wb": {"analyzer": "char_wb", "min_df": 2},
    "ngrams_wb_c64": {"analyzer": "char_wb", "min_df": 2},
    "ngrams_wb_mindf1": {"analyzer": "char_wb", "min_df": 1},
}


def compute(args: argparse.Namespace) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from sklearn.model_selection import StratifiedKFold

    from tokenmill.gateway.embedding_memo import MemoizedEmbedder
    from tokenmill.gateway.embeddings import load_embedder
    from tokenmill.gateway.injection_concepts import ConceptLexicon
    from tokenmill.gateway.injection_detector import Exemplar, InjectionDetector
    from tokenmill.gateway.injection_windows import windows
    from tokenmill.gateway.llm_features import LLMEmbedder

    torch.set_num_threads(int(os.environ.get("TOKENMILL_NUM_THREADS", "1")))
    minilm = MemoizedEmbedder(load_embedder(), max_entries=200_000)
    embedders: dict[str, Any] = {"minilm": minilm}
    views = args.views or list(VIEWS)
    if any(VIEWS[v][0] == "wordllama" for v in views):
        # WordLlama is not a tokenmill dependency; only the experiment's extra views need it
        try:
            from wordllama_embedder import WordLlamaEmbedder  # benchmarks/, next to this script
        except ImportError as exc:
            raise SystemExit("the WordLlama views need `pip install --no-deps "
                             "wordllama==0.4.0.post1 toml==0.10.2`; or pass --views without "
                             f"them ({exc})") from exc
        embedders["wordllama"] = WordLlamaEmbedder()
    layer_sources = sorted({VIEWS[v][0] for v in views
                            if VIEWS[v][0].startswith(("layers:", "question"))})
    if layer_sources:
        # benchmarks/, an experiment
        from llm_layer_embedder import QUESTION_TEMPLATE, AllLayers, LayerEmbedder

        question = AllLayers(QUESTION_TEMPLATE, "last")
        sources = {"layers": AllLayers(), "question": question, "question_norm": question}
        for source in layer_sources:
            kind, span = source.split(":")
            first, last = map(int, span.split("-"))
            embedders[source] = LayerEmbedder(sources[kind], list(range(first, last + 1)),
                                              normed=kind == "question_norm")
    if any(VIEWS[v][0] == "llm" for v in views):
        embedders["llm"] = MemoizedEmbedder(LLMEmbedder(), max_entries=200_000)

    class OneView(InjectionDetector):
        """The detector restricted to one view with a chosen model (training unchanged)."""

        def __init__(self, view: str, exemplars: list[Exemplar]) -> None:
            self.view = view
            self.own_ngrams = None
            if view in NGRAM_CHARS:
                from sklearn.feature_extraction.text import TfidfVectorizer
                from sklearn.pipeline import FeatureUnion

                self.own_ngrams = FeatureUnion([
                    ("chars", TfidfVectorizer(ngram_range=(2, 6), sublinear_tf=True,
                                              **NGRAM_CHARS[view])),
                    ("words", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)),
                ]).fit([e.text for e in exemplars])
            super().__init__(minilm, exemplars, concepts=lexicon)

        @property
        def views(self) -> tuple[str, ...]:
            return (self.view,)

        def _vector_embedders(self) -> dict[str, Any]:
            source = VIEWS[self.view][0]
            return {} if source in NOT_VECTORS else {self.view: embedders[source]}

        def _new_model(self, view: str) -> Any:  # type: ignore[override]
            return VIEWS[view][1]()

        def _features(self, view: str, texts: list[str], vectors: dict[str, np.ndarray]) -> Any:
            if VIEWS[view][0] == "concepts":
                return self.concepts.features(texts)
            if VIEWS[view][0] == "ngrams+concepts":  # the detector's own n-gram model
                return super()._features("ngrams", texts, vectors)
            if VIEWS[view][0] == "ngrams":
                own = self.own_ngrams
                return (self.ngrams if own is None else own).transform(texts)
            return vectors[view]

    # the lexicon the concept views read (default: the shipped one)
    lexicon = ConceptLexicon(os.environ.get("TOKENMILL_CONCEPTS"))
    dev = load_dev()
    exemplars = [Exemplar(r["text"], r["label"] == "attack", r["category"]) for r in dev]
    labels = np.array([e.is_attack for e in exemplars])
    per_prompt = [windows(e.text, 64) for e in exemplars]
    offsets = np.cumsum([0] + [len(w) for w in per_prompt])
    out: dict[str, np.ndarray] = {"labels": labels, "offsets": offsets}
    if Path(args.out).exists():  # add views or shuffles to an earlier run
        out.update(dict(np.load(args.out)))
    for shuffle in args.shuffles:
        splitter = StratifiedKFold(5, shuffle=True, random_state=shuffle)
        folds = np.zeros(len(dev), dtype=np.int64)
        for fold, (_, held) in enumerate(splitter.split(np.zeros(len(dev)), labels)):
            folds[held] = fold
        out[f"folds/{shuffle}"] = folds
        for view in views:
            name = f"probs/{shuffle}/{view}"
            if name in out:
                continue
            probs = np.zeros(offsets[-1])
            for fold in range(5):
                train = np.flatnonzero(folds != fold)
                detector = OneView(view, [exemplars[i] for i in train])
                for i in np.flatnonzero(folds == fold):
                    flat = per_prompt[i]
                    probs[offsets[i]:offsets[i + 1]] = detector._view_probs(
                        view, flat, detector._vectors(flat))
            out[name] = probs
            np.savez(args.out, **out)
            print(f"shuffle {shuffle} view {view}: done", flush=True)


def caught_at_fpr(scores: np.ndarray, labels: np.ndarray) -> float:
    """Share of attacks above the best threshold that keeps false positives <= MAX_DEV_FPR."""
    benign = np.sort(scores[~labels])[::-1]
    allowed = int(np.floor(MAX_DEV_FPR * len(benign)))
    return float((scores[labels] > benign[allowed]).mean())


def prompt_scores(window_scores: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    return np.maximum.reduceat(window_scores, offsets[:-1])


def stacked(data: dict[str, np.ndarray], shuffle: int, views: list[str]) -> np.ndarray:
    """Logistic regression over the views' logits, fitted on the whole-text windows of the other
    folds' prompts (their out-of-fold probabilities), applied to every window of the held fold."""
    from sklearn.linear_model import LogisticRegression

    offsets, labels, folds = data["offsets"], data["labels"], data[f"folds/{shuffle}"]
    probs = np.stack([data[f"probs/{shuffle}/{v}"] for v in views], axis=1)
    logits = np.log(np.clip(probs, 1e-6, 1 - 1e-6) / np.clip(1 - probs, 1e-6, 1))
    whole = logits[offsets[:-1]]
    window_fold = np.repeat(folds, np.diff(offsets))
    out = np.zeros(len(probs))
    for fold in range(5):
        model = LogisticRegression(C=1.0, class_weight="balanced", max_iter=1000)
        model.fit(whole[folds != fold], labels[folds != fold])
        rows = window_fold == fold
        out[rows] = model.predict_proba(logits[rows])[:, 1]
    return out


def report(args: argparse.Namespace) -> None:
    from sklearn.metrics import roc_auc_score

    data = dict(np.load(args.scores))
    labels, offsets = data["labels"], data["offsets"]
    shuffles = sorted({int(k.split("/")[1]) for k in data if k.startswith("folds/")})
    available = {k.split("/")[2] for k in data if k.startswith("probs/")}
    variants: list[tuple[str, Callable[[int], np.ndarray]]] = []

    def mean_of(weights: dict[str, float]) -> Callable[[int], np.ndarray]:
        def combine(shuffle: int) -> np.ndarray:
            total = sum(weights.values())
            return sum(w * data[f"probs/{shuffle}/{v}"] for v, w in weights.items()) / total
        return combine

    for view in sorted(available):
        variants.append((f"{view} alone", mean_of({view: 1.0})))
    base = {"embedding": 1.0, "ngrams": 1.0, "llm": 1.0}
    variants.append(("current: embedding + ngrams + llm", mean_of(base)))
    variants.append(("MiniLM weight 0.5", mean_of({**base, "embedding": 0.5})))
    variants.append(("two views (MiniLM, n-grams), plain mean",
                     mean_of({"embedding": 1.0, "ngrams": 1.0})))
    variants.append(("n-grams 1, MiniLM 0.5, LLM 0.5 (session 26's model)",
                     mean_of({"embedding": 0.5, "ngrams": 1.0, "llm": 0.5})))
    for ng in sorted(v for v in available if v.startswith("ngrams_")):
        variants.append((f"adopted weights, n-gram view {ng}",
                         mean_of({"embedding": 0.5, ng: 1.0, "llm": 0.5})))
    for cv in sorted(v for v in available if v.startswith("concepts")):
        for w in (0.25, 0.5, 1.0):
            variants.append((f"adopted weights + {cv} weight {w}",
                             mean_of({"embedding": 0.5, "ngrams": 1.0, "llm": 0.5, cv: w})))
    if "ngrams_concepts" in available:
        variants.append((("adopted weights, n-gram view ngrams_concepts (the detector since "
                          "session 27)"),
                         mean_of({"embedding": 0.5, "ngrams_concepts": 1.0, "llm": 0.5})))
        variants.append(("two views, n-gram view ngrams_concepts (MiniLM 1)",
                         mean_of({"embedding": 1.0, "ngrams_concepts": 1.0})))
    for lv in sorted(v for v in available if v.startswith("llm_l")):
        variants.append((f"adopted weights, LLM view {lv}",
                         mean_of({"embedding": 0.5, "ngrams": 1.0, lv: 0.5})))
    for wl in sorted(v for v in available if v.startswith("wl_")):
        variants.append((f"current + {wl}", mean_of({**base, wl: 1.0})))
        variants.append((f"current + {wl}, MiniLM 0.5", mean_of({**base, wl: 1.0,
                                                                 "embedding": 0.5})))
        variants.append((f"current + {wl} weight 0.5", mean_of({**base, wl: 0.5})))
        variants.append((f"ngrams + llm + {wl} (no MiniLM)",
                         mean_of({"ngrams": 1.0, "llm": 1.0, wl: 1.0})))
        variants.append((f"embedding + ngrams + {wl} (no LLM)",
                         mean_of({"embedding": 1.0, "ngrams": 1.0, wl: 1.0})))
        variants.append((f"stacked LR: current views + {wl}",
                         lambda s, wl=wl: stacked(data, s, ["embedding", "ngrams", "llm", wl])))
    def logit_mean_of(views: list[str]) -> Callable[[int], np.ndarray]:
        def combine(shuffle: int) -> np.ndarray:
            probs = np.clip(np.stack([data[f"probs/{shuffle}/{v}"] for v in views]), 1e-6,
                            1 - 1e-6)
            return 1 / (1 + np.exp(-np.log(probs / (1 - probs)).mean(0)))
        return combine

    variants.append(("mean of logits: current views",
                     logit_mean_of(["embedding", "ngrams", "llm"])))
    variants.append(("stacked LR: current views",
                     lambda s: stacked(data, s, ["embedding", "ngrams", "llm"])))
    print(f"dev half, {len(labels)} prompts ({int(labels.sum())} attacks), 5-fold CV, "
          f"shuffles {shuffles}")
    print("| variant | caught at 3% FP (mean) | per shuffle | AUC |")
    print("|---|---|---|---|")
    for name, combine in variants:
        try:
            scores = [prompt_scores(combine(s), offsets) for s in shuffles]
        except KeyError:
            continue
        caught = [caught_at_fpr(s, labels) for s in scores]
        auc = np.mean([roc_auc_score(labels, s) for s in scores])
        print(f"| {name} | {np.mean(caught):.3f} | {' / '.join(f'{c:.3f}' for c in caught)} | "
              f"{auc:.3f} |")
    weights = (0.0, 0.25, 0.5, 0.75, 1.0)
    print("\nweighted mean of probabilities, n-grams weight 1: caught at 3% FP, mean over the "
          "shuffles (lowest shuffle)")
    print("| MiniLM \\ LLM | " + " | ".join(f"{w:g}" for w in weights) + " |")
    print("|---" * (len(weights) + 1) + "|")
    for w_minilm in weights:
        cells = []
        for w_llm in weights:
            combine = mean_of({"embedding": w_minilm, "ngrams": 1.0, "llm": w_llm})
            caught = [caught_at_fpr(prompt_scores(combine(s), offsets), labels)
                      for s in shuffles]
            cells.append(f"{np.mean(caught):.3f} ({min(caught):.3f})")
        print(f"| {w_minilm:g} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("compute")
    run.add_argument("--out", required=True)
    run.add_argument("--shuffles", type=int, nargs="+", default=[0, 1, 2])
    run.add_argument("--views", nargs="+", choices=list(VIEWS))
    show = sub.add_parser("report")
    show.add_argument("--scores", required=True)
    args = parser.parse_args()
    compute(args) if args.command == "compute" else report(args)


if __name__ == "__main__":
    main()
