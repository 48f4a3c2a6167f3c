import numpy as np
import pytest

from pecore.evaluate import (
    average_precision,
    precision_at,
    rank_database,
    retrieval_metrics,
    summarise_folds,
)


def test_average_precision_hand_example():
    # relevant at ranks 1 and 3 of 4: (1/1 + 2/3) / 2
    np.testing.assert_allclose(average_precision(np.array([1, 0, 1, 0])), [5 / 6])
    # relevant at ranks 2, 3, 5: (1/2 + 2/3 + 3/5) / 3
    np.testing.assert_allclose(average_precision([[0, 1, 1, 0, 1]]), [(1 / 2 + 2 / 3 + 3 / 5) / 3])
    np.testing.assert_allclose(average_precision([[0, 0, 0]]), [0.0])
    np.testing.assert_allclose(precision_at([[1, 0, 1, 1]], 3), [2 / 3])
    with pytest.raises(ValueError):
        precision_at([[1, 0]], 3)


def test_ranking_is_by_squared_distance_with_stable_ties():
    database = np.array([[2.0], [1.0], [-1.0], [5.0]])
    order = rank_database(np.array([[0.0]]), database)
    np.testing.assert_array_equal(order, [[1, 2, 0, 3]])  # ±1 tie keeps database order


def test_retrieval_metrics_overall_and_per_class():
    database = np.array([[0.0], [0.1], [5.0], [5.1]])
    db_labels = np.array([1, 1, 2, 2])
    queries = np.array([[0.05], [4.0]])
    result = retrieval_metrics(queries, np.array([1, 1]), database, db_labels, ks=(1, 2))
    # query 1 ranks 0, 1, 2, 3 -> AP 1; query 2 (label 1) ranks 2, 3, 1, 0 -> hits at 3, 4
    ap2 = (1 / 3 + 2 / 4) / 2
    assert result["mAP"] == pytest.approx((1 + ap2) / 2)
    assert result["P@1"] == pytest.approx(0.5)
    assert result["per_class"][1]["n_queries"] == 2


def test_fold_summary_uses_population_std():
    summary = summarise_folds([1.0, 2.0, 3.0, 4.0])
    assert summary["mean"] == 2.5
    assert summary["std"] == pytest.approx(np.sqrt(1.25))  # not the n-1 form
    with pytest.raises(ValueError):
        summarise_folds([])
