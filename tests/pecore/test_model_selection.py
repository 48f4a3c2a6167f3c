"""The evaluation protocol on small synthetic data: each test checks what a wrong one breaks."""

from __future__ import annotations

import numpy as np
import pytest

from pecore.datasets import make_synthetic, read_fold_file
from pecore.model_selection import CFML_DIMS, evaluate_fold, fold_seed, paper_tables

PARAMS = {
    "n_regions": 8,
    "patch_size": 9,
    "radius": 3,
    "pca_energy": 0.99,
    "n_train_patches": 5000,
    "metric_lambda": 1.5e-4,
}


@pytest.fixture(scope="module")
def data():
    return make_synthetic(n_images=60, size=48, seed=5)


def _without_timings(result: dict[int, dict]) -> dict[int, dict]:
    return {size: {k: v for k, v in r.items() if k != "timings_s"} for size, r in result.items()}


def test_one_fold_scores_the_queries_against_the_other_folds(data):
    result = evaluate_fold(
        data.images,
        data.masks,
        data.labels,
        data.folds,
        query_fold=2,
        dictionary_sizes=[2, 4],
        random_state=fold_seed([0, 2, 1]),
        **PARAMS,
    )
    assert sorted(result) == [2, 4]
    for size, entry in result.items():
        assert entry["D"] == size and entry["fold"] == 2
        assert entry["n_query"] == int(np.sum(data.folds == 2))
        assert entry["n_query"] + entry["n_database"] == len(data)
        dims = [int(d) for d in entry["by_dim"]]
        assert dims == list(CFML_DIMS[: len(dims)]) and len(dims) <= entry["cfml_rank"]
        for scores in entry["by_dim"].values():
            assert set(scores) >= {"mAP", "P@5", "P@10", "per_class"} and "ap" not in scores
    assert result[4]["by_dim"]["1"]["mAP"] > 0.6  # chance is about 1/3


def test_the_same_random_state_gives_the_same_scores_and_another_changes_the_model(data):
    def run(seed_words):
        return evaluate_fold(
            data.images,
            data.masks,
            data.labels,
            data.folds,
            query_fold=1,
            dictionary_sizes=[2],
            random_state=fold_seed(seed_words),
            **PARAMS,
        )

    first = run([0, 1, 7])
    assert _without_timings(first) == _without_timings(run([0, 1, 7]))
    other = run([1, 1, 7])
    assert other[2]["seed"] != first[2]["seed"]
    assert other[2]["cfml_eigenvalues"] != first[2]["cfml_eigenvalues"]


def test_progress_counts_every_encoded_image(data):
    counted = []
    evaluate_fold(
        data.images,
        data.masks,
        data.labels,
        data.folds,
        query_fold=3,
        dictionary_sizes=[2],
        random_state=0,
        progress=counted.append,
        **PARAMS,
    )
    assert sum(counted) == len(data)


def test_fold_seed_is_a_fixed_function_of_its_words():
    assert fold_seed([0, 1, 2]) == fold_seed([0, 1, 2])
    assert fold_seed([0, 1, 2]) != fold_seed([0, 2, 1])
    assert 0 <= fold_seed([5]) < 2**32


def test_fold_file_maps_index_to_fold(tmp_path):
    path = tmp_path / "folds.csv"
    path.write_text("index,fold\n1,2\n2,1\n3,2\n")
    np.testing.assert_array_equal(read_fold_file(path, np.array([3, 1, 2])), [2, 2, 1])
    with pytest.raises(ValueError, match="no fold"):
        read_fold_file(path, np.array([1, 4]))
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="header"):
        read_fold_file(tmp_path / "bad.csv", np.array([1]))
    with pytest.raises(FileNotFoundError):
        read_fold_file(tmp_path / "absent.csv", np.array([1]))


def test_paper_tables_hold_tables_1_to_3_as_published():
    tables = paper_tables()
    table1 = tables["table1"]["rows"]
    assert sorted(table1, key=int) == ["16", "32", "64"]
    for rows in table1.values():
        assert len(rows) == 9 and all(len(v) == 3 for v in rows.values())
    assert table1["64"]["ours/per-image"] == [88.56, 85.22, 85.17]
    assert table1["16"]["non-secure"] == [89.89, 87.16, 87.16]
    table2 = tables["table2"]["rows"]
    assert sum(len(v) for v in table2.values()) == 15
    assert table2["ours/same"]["3"] == [91.74, 85.22, 89.01]
    assert tables["table3_seconds"]["rows"]["chained"] == [0.1429, 0.1434]


def test_extra_lambdas_score_each_lambda_as_a_run_at_that_lambda_alone(data):
    from pecore.model_selection import lambda_key, unit_at_lambda

    def run(metric_lambda, extra=()):
        params = {**PARAMS, "metric_lambda": metric_lambda}
        return evaluate_fold(
            data.images,
            data.masks,
            data.labels,
            data.folds,
            query_fold=2,
            dictionary_sizes=[2, 4],
            random_state=fold_seed([0, 2, 9]),
            extra_lambdas=extra,
            **params,
        )

    plain = run(1.5e-4)
    assert all("extra_lambdas" not in r and "metric_lambda" not in r for r in plain.values())
    both = run(1.5e-4, [1.5e-4, 1.0])  # the headline λ repeated is scored once
    for size in (2, 4):
        assert list(both[size]["extra_lambdas"]) == [lambda_key(1.0)]
        # the headline λ: the unit the one-λ run gives
        assert _without_timings({0: unit_at_lambda(both[size], 1.5e-4)}) == _without_timings(
            {0: plain[size]}
        )
    alone = run(1.0)
    for size in (2, 4):
        at = unit_at_lambda(both[size], 1.0)
        assert _without_timings({0: at}) == _without_timings({0: alone[size]})
        assert at["by_dim"] != plain[size]["by_dim"]  # λ = 1 ranks otherwise
    with pytest.raises(KeyError):
        unit_at_lambda(both[2], 1e-3)
    assert _without_timings({0: unit_at_lambda(plain[2], 1.5e-4)}) == _without_timings(
        {0: plain[2]}
    )
