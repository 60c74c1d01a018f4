"""Semantic prompt-injection / jailbreak detector: classifiers trained at start-up on a labelled
library of attack and benign exemplars, over the gateway's MiniLM embedding, over n-grams and
cross-lingual concepts, and (optionally) over the built-in LLM's hidden states.

Why a classifier and not regexes: attacks are paraphrased endlessly ("disregard everything you
were told before", "you are now in developer mode") while harmless prompts share their words
("jailbreak my iPhone", "ignore the typo"). A support-vector machine with an RBF kernel over
sentence embeddings learns the meaning; a logistic regression over word and character n-grams
(TF-IDF) is averaged with it because MiniLM is an English model and the n-grams carry the look
of attacks in other languages and of obfuscated spellings; optionally (the gateway's default)
a third RBF SVM over the built-in LLM's pooled hidden states (``llm_features``), which read
every script, is averaged in too. The n-grams weigh as much as the vector views together
(``NGRAM_SHARE``). The n-gram model also reads which attack concepts a text mentions, in any of
37 languages (``injection_concepts``): n-grams learn a language only from exemplars in it, the
concepts let an attack in Thai borrow what the English and Spanish exemplars taught.
The library ships with the package (``data/injection_exemplars.jsonl``, the dev half of
``benchmarks/data/injection_prompts.jsonl``); a deployment can point at its own file.

Training (once per process and library; over a minute with the LLM view on one thread, a few
seconds when ``vector_cache`` already holds the exemplars' vectors):

- every benign exemplar gives negatives: the whole text and each of its windows
  (``injection_windows``), so harmless sentences out of context do not score high;
- every attack gives positives: the whole text, its decoded payloads, and, after a first fit,
  its highest-scoring sentence (an attack hidden in a document is one sentence among harmless
  ones; the first fit finds it, the second learns it).

A text's score is the highest probability over its windows, in [0, 1].

The exemplars' vectors can be kept on disk (``vector_cache``): a start whose models and library
are unchanged then reads them instead of embedding the library again, and only fits.
"""

from __future__ import annotations

import copy
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from tokenmill.errors import ConfigError
from tokenmill.gateway.embeddings import Embedder
from tokenmill.gateway.injection_concepts import ConceptLexicon, default_lexicon_path, load_lexicon
from tokenmill.gateway.injection_windows import decoded_payloads, windows
from tokenmill.gateway.vector_cache import VectorCache, cache_for, model_identity

DETECTOR_NAME = "injection.semantic"
LABELS = ("attack", "benign")
# Inverse regularisation strengths, from 5-fold cross-validation on the dev half (3 shuffles,
# attacks caught at 3% false positives): on the 1,001-prompt dev half (446 more non-English
# prompts) the SVMs gained 5 points from C 4 to 32 (61.3% to 66.3%; 64: 65.7%), almost all of
# it in the LLM view's SVM; with the n-gram model at 16 or 64 detection was the same within
# noise, and a point higher than at 4 (docs/gateway.md lists every variant).
_SVM_C = 32.0
_NGRAM_C = 16.0
# How much each view counts in the mean: the n-gram model half, the views over vectors (MiniLM,
# and SmolLM2 when it is on) share the other half equally. On the 1,172-prompt dev half (5-fold
# CV, 3 shuffles, attacks caught at 3% false positives) weighting n-grams 1, MiniLM 0.5 and the
# LLM 0.5 caught 75.7% against 72.4% for the plain mean, higher on each shuffle; a grid of
# weights showed a broad plateau there (74-77%), and a logistic regression stacked on the
# views' out-of-fold scores learned the same shape (docs/gateway.md). Two views stay 1:1.
NGRAM_SHARE = 0.5
# Default thresholds: the lowest step of 0.025 whose false-positive rate stays at or under 3% on
# the dev half (5-fold cross-validation, 3 shuffles averaged; docs/gateway.md). The views'
# weighted mean is a different scale with or without the LLM view, so each has its own; on the
# 1,601-prompt dev half, with the concept features, both came out at 0.625 (2.4% and 2.9%
# false positives; 0.6 is 3.1% and 3.7%).
DEFAULT_THRESHOLD = 0.625
DEFAULT_THRESHOLD_WITH_LLM = 0.625


@dataclass(frozen=True)
class Exemplar:
    text: str
    is_attack: bool
    category: str = ""


@dataclass(frozen=True)
class TextScore:
    score: float
    """Highest attack probability over the text's windows."""
    window: int
    """Which window scored it: 0 the whole text, then sentences, then decoded payloads."""


def default_exemplars_path() -> str:
    return str(resources.files("tokenmill.gateway") / "data" / "injection_exemplars.jsonl")


def load_exemplars(path: str | None = None) -> list[Exemplar]:
    """Read a JSONL library: one ``{"label": "attack"|"benign", "text": ..., "category": ...}``
    per line. Errors name the line, since the file is edited by hand."""
    path = path or default_exemplars_path()
    where = "guardrails.injection_detector.exemplars"
    if not Path(path).is_file():
        raise ConfigError(f"{where}: {path!r} is not a file", param=where)
    exemplars = []
    for num, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            label, text = row["label"], row["text"]
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"{where}: {path}:{num} is not a JSON object with 'label' and "
                              "'text'", param=where) from None
        if label not in LABELS or not isinstance(text, str) or not text.strip():
            raise ConfigError(f"{where}: {path}:{num} needs label attack or benign and a "
                              f"non-empty text, got label {label!r}", param=where)
        exemplars.append(Exemplar(text, label == "attack", str(row.get("category", ""))))
    num_attacks = sum(e.is_attack for e in exemplars)
    if num_attacks < 10 or len(exemplars) - num_attacks < 10:
        raise ConfigError(f"{where}: {path} needs at least 10 attack and 10 benign exemplars, "
                          f"has {num_attacks} and {len(exemplars) - num_attacks}", param=where)
    return exemplars


class InjectionDetector:
    """``llm``: optional vectors from the built-in generative model (``llm_features``); given,
    they are a third view, averaged with the other two (``view_weights``). ``vector_cache``:
    where the exemplars' vectors are read from and kept (None: always embedded)."""

    def __init__(self, embedder: Embedder, exemplars: list[Exemplar], max_windows: int = 64,
                 llm: Embedder | None = None, vector_cache: VectorCache | None = None,
                 concepts: ConceptLexicon | None = None) -> None:
        """``concepts``: the lexicon whose concepts join the n-grams (default: the shipped
        one)."""
        from sklearn.feature_extraction.text import TfidfVectorizer
        from sklearn.pipeline import FeatureUnion

        self.embedder = embedder
        self.llm = llm
        self.max_windows = max_windows
        self.vector_cache = vector_cache
        self.concepts = concepts or ConceptLexicon()
        self.ngrams = FeatureUnion([
            # 2-6 over 3-5: two points more on dev; 2-grams carry Chinese and Japanese words.
            # "char" (across word boundaries, so "modo desarrollador" and "system prompt" are
            # n-grams) over "char_wb": on the 1,305-prompt dev half 80.2% caught at 3% false
            # positives against 78.7%, higher on each of 3 shuffles; without the LLM view a tie
            # (77.2% against 77.1%; docs/gateway.md).
            ("chars", TfidfVectorizer(analyzer="char", ngram_range=(2, 6), min_df=2,
                                      sublinear_tf=True)),
            ("words", TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)),
        ]).fit([e.text for e in exemplars])
        self.models: dict[str, Any] = {}
        self._fit(exemplars)

    @property
    def default_threshold(self) -> float:
        return DEFAULT_THRESHOLD if self.llm is None else DEFAULT_THRESHOLD_WITH_LLM

    @property
    def views(self) -> tuple[str, ...]:
        return ("embedding", "ngrams") + (("llm",) if self.llm is not None else ())

    @property
    def view_weights(self) -> dict[str, float]:
        """Each view's weight in the score (they sum to 1): ``NGRAM_SHARE`` for the n-grams, the
        rest split equally between the views over vectors."""
        vector_views = [v for v in self.views if v != "ngrams"]
        return {v: NGRAM_SHARE if v == "ngrams" else (1 - NGRAM_SHARE) / len(vector_views)
                for v in self.views}

    def _vector_embedders(self) -> dict[str, Embedder]:
        """The views that need vectors, and what embeds them (the n-gram view needs none)."""
        return {"embedding": self.embedder, **({"llm": self.llm} if self.llm is not None else {})}

    def _vectors(self, texts: list[str]) -> dict[str, np.ndarray]:
        return {view: embedder.embed(texts) for view, embedder in self._vector_embedders().items()}

    def _exemplar_vectors(self, texts: list[str]) -> dict[str, np.ndarray]:
        """``_vectors`` of the training texts, through the on-disk cache when there is one and
        the view's model can name itself."""
        found = {}
        for view, embedder in self._vector_embedders().items():
            cache = self.vector_cache
            identity = model_identity(embedder) if cache is not None else None
            if cache is None or identity is None:
                found[view] = embedder.embed(texts)
                continue
            key = cache.key(view, identity, texts)
            vectors = cache.load(view, key, len(texts))
            if vectors is None:
                vectors = embedder.embed(texts)
                cache.store(view, key, vectors)
            found[view] = vectors
        return found

    def _features(self, view: str, texts: list[str], vectors: dict[str, np.ndarray]) -> Any:
        if view != "ngrams":
            return vectors[view]
        from scipy.sparse import csr_matrix, hstack

        # One logistic regression over n-grams and concepts together: on the 1,601-prompt dev
        # half this caught far more attacks at 3% false positives than the concepts as a view of
        # their own averaged in (docs/gateway.md).
        return hstack([self.ngrams.transform(texts),
                       csr_matrix(self.concepts.features(texts))]).tocsr()

    def _view_probs(self, view: str, texts: list[str], vectors: dict[str, np.ndarray]
                    ) -> np.ndarray:
        return self.models[view].predict_proba(self._features(view, texts, vectors))[:, 1]

    @staticmethod
    def _new_model(view: str) -> Any:
        from sklearn.calibration import CalibratedClassifierCV
        from sklearn.linear_model import LogisticRegression
        from sklearn.svm import SVC

        if view in ("embedding", "llm"):
            # An RBF kernel over the embedding beat a logistic regression on it by 3 points
            # of dev detection at 3% false positives (87% vs 84%, both views averaged): attacks
            # form several clusters (overrides, personas, extraction), not one half-space.
            # Platt scaling (a sigmoid fitted on 5-fold out-of-fold scores, then one SVM on all
            # the data: what SVC(probability=True) did, in the form sklearn 1.9 keeps) makes
            # its output a probability to average.
            svm = SVC(C=_SVM_C, kernel="rbf", class_weight="balanced")
            return CalibratedClassifierCV(svm, method="sigmoid", cv=5, ensemble=False)
        return LogisticRegression(C=_NGRAM_C, class_weight="balanced", max_iter=5000)

    def _fit(self, exemplars: list[Exemplar]) -> None:
        texts: list[str] = []
        labels: list[bool] = []
        attack_sentences: list[list[str]] = []
        for e in exemplars:
            parts = windows(e.text, self.max_windows)
            if e.is_attack:
                payloads = decoded_payloads(e.text)
                texts += [e.text, *payloads]
                labels += [True] * (1 + len(payloads))
                sentences = [p for p in parts[1:] if p not in payloads]
                if sentences:
                    attack_sentences.append(sentences)
            else:
                texts += parts
                labels += [False] * len(parts)
        candidates = sorted({s for group in attack_sentences for s in group})
        all_texts = list(dict.fromkeys(texts + candidates))
        row_of = {t: i for i, t in enumerate(all_texts)}
        all_vectors = self._exemplar_vectors(all_texts)

        def vectors(some: list[str]) -> dict[str, np.ndarray]:
            rows = [row_of[t] for t in some]
            return {view: found[rows] for view, found in all_vectors.items()}

        # Each view its own model; their probabilities are averaged (``view_weights``). In
        # cross-validation on the dev half this beat one model over both feature sets joined (85%
        # vs 76% of attacks at 2.6% false positives): the n-grams' many weights no longer drown
        # the embedding's. Taking the larger of the views instead of a mean scored lower.
        def fit_view(view: str) -> Any:
            view_texts, view_labels = list(texts), list(labels)
            model = self._new_model(view)
            model.fit(self._features(view, view_texts, vectors(view_texts)), view_labels)
            # Multiple-instance step: the sentence the first fit likes best is the hidden attack.
            if candidates:
                probs = model.predict_proba(self._features(view, candidates,
                                                           vectors(candidates)))[:, 1]
                scores = dict(zip(candidates, probs))
                for group in attack_sentences:
                    view_texts.append(max(group, key=scores.__getitem__))
                    view_labels.append(True)
                model.fit(self._features(view, view_texts, vectors(view_texts)), view_labels)
            return model

        # The views train in parallel threads: libsvm and liblinear release the GIL, so on two
        # cores start-up fitting takes about half as long (the models are the same).
        with ThreadPoolExecutor(max_workers=len(self.views),
                                thread_name_prefix="injection-fit") as pool:
            fitted = dict(zip(self.views, pool.map(fit_view, self.views)))
        self.models.update(fitted)

    def _predict(self, texts: list[str], vectors: dict[str, np.ndarray]) -> np.ndarray:
        weights = self.view_weights
        return np.sum([weights[view] * self._view_probs(view, texts, vectors)
                       for view in self.views], axis=0)

    def using(self, embedder: Embedder) -> InjectionDetector:
        """The same trained model, embedding through ``embedder`` (e.g. a memoizing wrapper)."""
        view = copy.copy(self)
        view.embedder = embedder
        return view

    def score(self, texts: list[str]) -> list[TextScore]:
        """One score per text; all windows of all texts go through the model in one batch."""
        per_text = [windows(t, self.max_windows) for t in texts]
        flat = [w for group in per_text for w in group]
        if not flat:
            return []
        probs = self._predict(flat, self._vectors(flat))
        results, start = [], 0
        for group in per_text:
            window = int(np.argmax(probs[start:start + len(group)]))
            results.append(TextScore(float(probs[start + window]), window))
            start += len(group)
        return results


_trained: dict[tuple[int, str, int, int, str], InjectionDetector] = {}
_trained_lock = threading.Lock()


def shared_detector(embedder: Embedder, exemplars_path: str | None = None,
                    max_windows: int = 64, llm: Embedder | None = None,
                    vector_cache_dir: str | None = None,
                    concepts_path: str | None = None) -> InjectionDetector:
    """One trained detector per process, model(s), library and lexicon: training embeds every
    exemplar (or reads their vectors from ``vector_cache_dir``: None the default folder, "off"
    never). A wrapper embedder (``embedding_memo``) names the model it wraps as ``inner``."""
    model = getattr(embedder, "inner", embedder)
    key = (id(model), exemplars_path or default_exemplars_path(), max_windows, id(llm),
           concepts_path or default_lexicon_path())
    with _trained_lock:
        if key not in _trained:
            _trained[key] = InjectionDetector(model, load_exemplars(exemplars_path), max_windows,
                                              llm=llm, vector_cache=cache_for(vector_cache_dir),
                                              concepts=load_lexicon(concepts_path))
        detector = _trained[key]
    return detector.using(embedder)
