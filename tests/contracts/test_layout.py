"""The object-key scheme: keys made by `CollectionLayout` are parsed back by layout.py only."""

from __future__ import annotations

import pytest

from pecbir_contracts.layout import (
    TENANTS_PREFIX,
    CollectionLayout,
    collection_of_current_model_key,
    new_image_id,
)


def test_the_current_model_pointer_is_parsed_back_to_its_collection():
    layout = CollectionLayout("hospital-a", "brain")
    assert layout.current_model.startswith(TENANTS_PREFIX)
    assert collection_of_current_model_key(layout.current_model) == layout


@pytest.mark.parametrize(
    "key",
    [
        "tenants/hospital-a/collections/brain/models/v0001/manifest.json",
        "tenants/hospital-a/collections/brain/images/0123/meta.json",
        "tenants/hospital-a/idempotency/abc.json",
        "tenants/hospital-a/collections/brain/models/current.json.tmp",
        "other/hospital-a/collections/brain/models/current.json",
        "tenants/a/b/collections/brain/models/current.json",
    ],
)
def test_other_keys_are_not_a_current_model_pointer(key):
    assert collection_of_current_model_key(key) is None


def test_a_pointer_with_invalid_names_is_refused():
    with pytest.raises(ValueError, match="invalid tenant"):
        collection_of_current_model_key("tenants/Bad_Name/collections/brain/models/current.json")


def test_image_and_version_ids_are_parsed_back_from_their_keys():
    layout = CollectionLayout("hospital-a", "brain")
    image_id = new_image_id()
    assert layout.image_id_of_meta(layout.meta(image_id)) == image_id
    assert layout.image_id_of_meta(layout.cipher(image_id)) is None
    assert layout.image_id_of_features("v0002", layout.features("v0002", image_id)) == image_id
    assert layout.version_of_model_key(layout.train_request("v0003")) == "v0003"
    assert layout.version_of_model_key(layout.manifest("v0003")) is None
