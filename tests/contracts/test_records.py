"""The feature record: what one image's features under one version are stored as."""

from __future__ import annotations

import io

import numpy as np

from pecbir_contracts.records import FeatureRecord


def test_a_record_holds_the_projected_vector_and_label_not_the_fisher_vector():
    record = FeatureRecord("v0003", np.arange(10, dtype=np.float32), 2)
    data = record.to_bytes()
    with np.load(io.BytesIO(data)) as arrays:
        assert sorted(arrays.files) == ["label", "vector", "version"]
    # a few hundred bytes, whatever the Fisher vector's length was (332 KB at D = 64)
    assert len(data) < 1024
    again = FeatureRecord.from_bytes(data)
    assert (again.version, again.label) == ("v0003", 2)
    np.testing.assert_array_equal(again.vector, record.vector)
    unlabelled = FeatureRecord.from_bytes(FeatureRecord("v0003", record.vector, None).to_bytes())
    assert unlabelled.label is None


def test_a_record_of_an_earlier_release_with_its_fisher_vector_still_loads():
    buffer = io.BytesIO()
    np.savez(
        buffer,
        version=np.array("v0001"),
        fisher_vector=np.ones(4096, dtype=np.float32),
        vector=np.full(10, 0.5, dtype=np.float32),
        label=np.array(-1, dtype=np.int64),
    )
    record = FeatureRecord.from_bytes(buffer.getvalue())
    assert record.version == "v0001" and record.label is None
    np.testing.assert_array_equal(record.vector, np.full(10, 0.5, dtype=np.float32))
