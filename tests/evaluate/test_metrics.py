"""Each metric against values computed by hand; missing columns and unknown names are named."""

from __future__ import annotations

import math

import polars as pl
import pytest

from nexus_core.errors import ConfigError, InputError
from nexus_core.evaluate import metrics as M

Y = [1, 0, 1, 1, 0, 0]
P = [1, 0, 0, 1, 1, 0]  # TP=2 (rows 0,3) FP=1 (row 4) FN=1 (row 2) TN=2


def test_classification_metrics_by_hand():
    assert M.accuracy(Y, P) == pytest.approx(4 / 6)
    assert M.precision(Y, P) == pytest.approx(2 / 3)
    assert M.recall(Y, P) == pytest.approx(2 / 3)
    assert M.f1(Y, P) == pytest.approx(2 / 3)
    # string labels: positive class given explicitly
    assert M.precision(["yes", "no", "no"], ["yes", "yes", "no"], positive="yes") == pytest.approx(0.5)
    assert M.recall(["yes", "yes", "no"], ["yes", "no", "no"], positive="yes") == pytest.approx(0.5)
    # nothing predicted positive: precision is 0, not a ZeroDivisionError
    assert M.precision([1, 0], [0, 0]) == 0.0
    # nulls are skipped
    assert M.accuracy([1, None, 0], [1, 1, 1]) == pytest.approx(0.5)


def test_auroc_by_hand_with_ties():
    # positives {0.8, 0.4}, negatives {0.4, 0.1}: pairs (0.8>0.4)=1, (0.8>0.1)=1, (0.4=0.4)=0.5, (0.4>0.1)=1
    assert M.auroc([1, 1, 0, 0], [0.8, 0.4, 0.4, 0.1]) == pytest.approx(3.5 / 4)
    assert M.auroc([1, 0], [0.9, 0.1]) == 1.0
    assert M.auroc([1, 0], [0.1, 0.9]) == 0.0
    assert math.isnan(M.auroc([1, 1], [0.2, 0.3]))  # one class: undefined


def test_regression_perplexity_exact_match_by_hand():
    assert M.rmse([1.0, 2.0, 3.0], [1.0, 4.0, 3.0]) == pytest.approx(math.sqrt(4 / 3))
    # total NLL 6 nats over 3 tokens -> exp(2)
    assert M.perplexity([2.0, 4.0], [1, 2]) == pytest.approx(math.exp(2.0))
    assert M.exact_match(["The answer.", "b", "c"], ["the ANSWER", "b ", "x"]) == pytest.approx(2 / 3)
    assert M.normalize_text("  Hello,   World! ") == "hello world"


def test_registry_is_extensible_and_compute_names_missing_columns():
    assert {"accuracy", "precision", "recall", "f1", "auroc", "rmse", "perplexity", "exact_match"} <= set(M.METRICS)

    @M.metric("prediction", name="_mean_len_test")
    def mean_len(preds):
        return sum(len(p) for p in preds) / len(preds)

    try:
        table = pl.DataFrame({"prediction": ["ab", "abcd"], "reference": ["ab", "x"]})
        assert M.compute("_mean_len_test", table) == 3.0
        assert M.compute("exact_match", table) == 0.5
        with pytest.raises(InputError, match=r"preds\.parquet: metric 'auroc' needs column\(s\) label, score"):
            M.compute("auroc", table, "preds.parquet")
        with pytest.raises(ConfigError, match="unknown metric 'bleu'"):
            M.compute("bleu", table)
    finally:
        M.METRICS.pop("_mean_len_test"), M.COLUMNS.pop("_mean_len_test")
