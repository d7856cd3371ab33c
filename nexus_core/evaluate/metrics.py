"""Evaluation metrics: plain functions over columns of a predictions table, and a registry by name.

Add a metric by writing a function and decorating it with ``@metric("col_a", "col_b")``: the names
are the predictions-table columns passed to it, in order, as Python lists. :func:`compute` checks
that the table has them and raises an InputError naming the file, metric and missing columns.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Callable, Sequence
from typing import Any

import polars as pl

from nexus_core.errors import ConfigError, InputError

MetricFn = Callable[..., float]
METRICS: dict[str, MetricFn] = {}
COLUMNS: dict[str, tuple[str, ...]] = {}


def metric(*columns: str, name: str | None = None) -> Callable[[MetricFn], MetricFn]:
    """Register a metric under its function name; ``columns`` are the table columns it reads."""

    def wrap(fn: MetricFn) -> MetricFn:
        key = name or fn.__name__
        METRICS[key] = fn
        COLUMNS[key] = columns
        return fn

    return wrap


def _pairs(y_true: Sequence[Any], y_pred: Sequence[Any]) -> list[tuple[Any, Any]]:
    if len(y_true) != len(y_pred):
        raise ValueError(f"length mismatch: {len(y_true)} labels vs {len(y_pred)} predictions")
    return [(t, p) for t, p in zip(y_true, y_pred, strict=True) if t is not None and p is not None]


def _positive(y_true: Sequence[Any], positive: Any) -> Any:
    if positive is not None:
        return positive
    values = {t for t in y_true if t is not None}
    if values <= {0, 1} or values <= {True, False}:
        return 1
    # string labels: the lexically greatest label is the positive class unless told otherwise
    return max(values, key=str) if values else 1


@metric("label", "pred_label")
def accuracy(y_true: Sequence[Any], y_pred: Sequence[Any]) -> float:
    """Share of rows whose predicted label equals the true label (rows with a null skipped)."""
    pairs = _pairs(y_true, y_pred)
    return sum(t == p for t, p in pairs) / len(pairs) if pairs else float("nan")


def _confusion(y_true: Sequence[Any], y_pred: Sequence[Any], positive: Any) -> tuple[int, int, int]:
    pos = _positive(y_true, positive)
    pairs = _pairs(y_true, y_pred)
    tp = sum(t == pos and p == pos for t, p in pairs)
    fp = sum(t != pos and p == pos for t, p in pairs)
    fn = sum(t == pos and p != pos for t, p in pairs)
    return tp, fp, fn


@metric("label", "pred_label")
def precision(y_true: Sequence[Any], y_pred: Sequence[Any], positive: Any = None) -> float:
    """TP / (TP + FP) for the positive class (1, or the greatest string label); 0 when nothing predicted."""
    tp, fp, _ = _confusion(y_true, y_pred, positive)
    return tp / (tp + fp) if tp + fp else 0.0


@metric("label", "pred_label")
def recall(y_true: Sequence[Any], y_pred: Sequence[Any], positive: Any = None) -> float:
    """TP / (TP + FN) for the positive class; 0 when there are no positives."""
    tp, _, fn = _confusion(y_true, y_pred, positive)
    return tp / (tp + fn) if tp + fn else 0.0


@metric("label", "pred_label")
def f1(y_true: Sequence[Any], y_pred: Sequence[Any], positive: Any = None) -> float:
    """Harmonic mean of precision and recall (2TP / (2TP + FP + FN))."""
    tp, fp, fn = _confusion(y_true, y_pred, positive)
    return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0


@metric("label", "score")
def auroc(y_true: Sequence[Any], scores: Sequence[float], positive: Any = None) -> float:
    """Area under the ROC curve: P(score of a random positive > a random negative), ties count half."""
    pos_label = _positive(y_true, positive)
    pairs = _pairs(y_true, scores)
    pos = [s for t, s in pairs if t == pos_label]
    neg = [s for t, s in pairs if t != pos_label]
    if not pos or not neg:
        return float("nan")  # undefined with one class only
    # rank-sum (Mann-Whitney U) with average ranks for ties: O(n log n)
    ordered = sorted((s, i < len(pos)) for i, s in enumerate(pos + neg))
    rank_sum, i = 0.0, 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1][0] == ordered[i][0]:
            j += 1
        avg_rank = (i + j) / 2 + 1
        rank_sum += avg_rank * sum(1 for k in range(i, j + 1) if ordered[k][1])
        i = j + 1
    u = rank_sum - len(pos) * (len(pos) + 1) / 2
    return u / (len(pos) * len(neg))


@metric("target", "pred_value")
def rmse(y_true: Sequence[float | None], y_pred: Sequence[float | None]) -> float:
    """Root mean squared error over rows where both values are present."""
    pairs = _pairs(y_true, y_pred)
    if not pairs:
        return float("nan")
    return math.sqrt(sum((float(t) - float(p)) ** 2 for t, p in pairs) / len(pairs))


@metric("ref_nll", "ref_tokens")
def perplexity(nll_sums: Sequence[float | None], token_counts: Sequence[int | None]) -> float:
    """exp(total negative log-likelihood / total tokens) of the references under the model."""
    pairs = [(n, c) for n, c in _pairs(nll_sums, token_counts) if c]
    tokens = sum(c for _, c in pairs)
    return math.exp(sum(n for n, _ in pairs) / tokens) if tokens else float("nan")


_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_text(text: str) -> str:
    """Lower-case, drop punctuation and collapse whitespace (SQuAD-style answer normalisation)."""
    return re.sub(r"\s+", " ", text.lower().translate(_PUNCT)).strip()


@metric("reference", "prediction")
def exact_match(references: Sequence[str | None], predictions: Sequence[str | None]) -> float:
    """Share of rows whose normalised prediction equals the normalised reference."""
    pairs = _pairs(references, predictions)
    return sum(normalize_text(r) == normalize_text(p) for r, p in pairs) / len(pairs) if pairs else float("nan")


_ARTICLES = {"a", "an", "the"}
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}


def normalize_vqa(text: str) -> str:
    """VQA answer normalisation: lower-case, punctuation dropped, number words as digits, articles removed."""
    words = text.lower().translate(_PUNCT).split()
    return " ".join(_NUMBERS.get(w, w) for w in words if w not in _ARTICLES)


def _accepted(answers: Any) -> list[str]:
    values = json.loads(answers) if isinstance(answers, str) and answers.strip().startswith("[") else answers
    return [str(v) for v in values] if isinstance(values, list | tuple) else [str(values)]


@metric("reference", "prediction")
def vqa_exact_match(references: Sequence[str | None], predictions: Sequence[str | None]) -> float:
    """Share of rows whose VQA-normalised prediction equals the normalised reference answer."""
    pairs = _pairs(references, predictions)
    return sum(normalize_vqa(r) == normalize_vqa(p) for r, p in pairs) / len(pairs) if pairs else float("nan")


@metric("answers", "prediction")
def vqa_accuracy(answers: Sequence[Any], predictions: Sequence[str | None]) -> float:
    """Share of rows whose VQA-normalised prediction is one of the row's accepted answers (a JSON list;
    the VQA predict step fills it with the single answer when a row has no ``answers``)."""
    pairs = _pairs(answers, predictions)
    hits = sum(normalize_vqa(p) in {normalize_vqa(a) for a in _accepted(acc)} for acc, p in pairs)
    return hits / len(pairs) if pairs else float("nan")


def _refusal_rate(harmful: Sequence[Any], refused: Sequence[Any], want: bool) -> float:
    pairs = [(h, r) for h, r in _pairs(harmful, refused) if bool(h) is want]
    return sum(bool(r) for _, r in pairs) / len(pairs) if pairs else float("nan")


@metric("harmful", "refused")
def refusal_rate_harmful(harmful: Sequence[Any], refused: Sequence[Any]) -> float:
    """Share of prompts labelled harmful that the model refused (want high). ``refused`` comes from the
    refusal classifier (:mod:`nexus_core.evaluate.refusal`), added by the score step."""
    return _refusal_rate(harmful, refused, True)


@metric("harmful", "refused")
def refusal_rate_benign(harmful: Sequence[Any], refused: Sequence[Any]) -> float:
    """Share of prompts labelled benign that the model refused: over-refusal (want low)."""
    return _refusal_rate(harmful, refused, False)


@metric("remotion_ok")
def remotion_parse_rate(ok: Sequence[Any]) -> float:
    """Share of generated Remotion compositions that parse as TSX and pass the structural checks; ``remotion_ok``
    comes from :mod:`nexus_core.evaluate.remotion`, added by the score step."""
    values = [bool(v) for v in ok if v is not None]
    return sum(values) / len(values) if values else float("nan")


def check_names(names: Sequence[str], source: str = "metrics") -> None:
    """Raise ConfigError naming every unknown metric (and the known ones)."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ConfigError([f"{source}: unknown metric {n!r} (known: {', '.join(sorted(METRICS))})"
                           for n in unknown])


def compute(name: str, table: pl.DataFrame, where: str = "predictions") -> float:
    """Compute metric ``name`` on ``table``; InputError naming ``where`` if its columns are missing."""
    check_names([name])
    missing = [c for c in COLUMNS[name] if c not in table.columns]
    if missing:
        raise InputError(f"{where}: metric {name!r} needs column(s) {', '.join(missing)} "
                         f"(has: {', '.join(table.columns) or 'none'})")
    return float(METRICS[name](*[table[c].to_list() for c in COLUMNS[name]]))
