"""pecore.sealing: the sealed mode's AES-256-GCM envelope (format, binding, tamper, rotation)."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from pecore.envelope import TamperedError
from pecore.keys import MasterKey
from pecore.sealing import (
    SealedIdentity,
    open_sealed,
    open_with_data_key,
    read_header,
    rewrap,
    seal_image,
    unwrap_data_key,
)

MASTER = MasterKey.from_seed(7)
IDENTITY = SealedIdentity(tenant="hosp-a", collection="brain", image_id="0" * 31 + "1")


def _image() -> tuple[np.ndarray, np.ndarray]:
    image = np.arange(12, dtype=np.uint16).reshape(3, 4) * 300
    mask = np.zeros((3, 4), dtype=bool)
    mask[1, 1:3] = True
    return image, mask


def _fixed_blob() -> bytes:
    image, mask = _image()
    return seal_image(
        image,
        mask,
        MASTER,
        IDENTITY,
        metadata={"label": 2, "role": "template"},
        data_key=bytes(range(32)),
        nonce=bytes(range(100, 112)),
        wrap_nonce=bytes(range(200, 212)),
    )


def _ciphertext(blob: bytes) -> bytes:
    return blob[12 + int.from_bytes(blob[8:12], "big") :]


def test_known_answer_of_the_format():
    # Fixed master key, data key and nonces → fixed bytes: the format (layout, labels, AAD,
    # payload encoding) cannot change without this test saying so.
    blob = _fixed_blob()
    assert len(blob) == 504
    assert blob.startswith(b"PECBSLD1\x00\x00\x01W{")
    assert hashlib.sha256(blob).hexdigest() == (
        "a7ab0bd2334a0acac50ca273d904592c38b2f04f262e12eb1ab832a1f748f837"
    )


def test_round_trip_is_bit_exact_for_every_dtype():
    rng = np.random.default_rng(0)
    for image in (
        rng.integers(0, 256, (17, 9), dtype=np.uint8),
        rng.integers(0, 4096, (17, 9)).astype(np.uint16),
        rng.integers(-2000, 2000, (17, 9)).astype(np.int16),
        rng.normal(size=(17, 9)).astype(np.float32),
    ):
        mask = rng.random(image.shape) > 0.5
        blob = seal_image(image, mask, MASTER, IDENTITY, metadata={"label": None})
        opened = open_sealed(blob, MASTER, IDENTITY)
        assert opened.image.dtype == image.dtype
        assert opened.image.tobytes() == image.tobytes()
        assert np.array_equal(opened.mask, mask)
        assert opened.metadata == {"label": None}
    blob = seal_image(image, None, MASTER, IDENTITY)
    assert open_sealed(blob, MASTER, IDENTITY).mask is None


def test_fresh_data_key_and_nonce_per_seal():
    image, mask = _image()
    first = seal_image(image, mask, MASTER, IDENTITY)
    second = seal_image(image, mask, MASTER, IDENTITY)
    assert first != second
    assert unwrap_data_key(first, MASTER, IDENTITY) != unwrap_data_key(second, MASTER, IDENTITY)
    assert read_header(first).nonce != read_header(second).nonce


def test_content_bound_keys_are_deterministic_and_never_shared():
    image, mask = _image()
    first = seal_image(image, mask, MASTER, IDENTITY, content_bound=True)
    assert seal_image(image, mask, MASTER, IDENTITY, content_bound=True) == first
    other = image.copy()
    other[0, 0] += 1
    moved = IDENTITY.model_copy(update={"collection": "other"})
    variants = [
        (first, IDENTITY),
        (seal_image(other, mask, MASTER, IDENTITY, content_bound=True), IDENTITY),
        (seal_image(image, ~mask, MASTER, IDENTITY, content_bound=True), IDENTITY),
        (
            seal_image(image, mask, MASTER, IDENTITY, metadata={"x": 1}, content_bound=True),
            IDENTITY,
        ),
        (seal_image(image, mask, MASTER, moved, content_bound=True), moved),
    ]
    keys = {unwrap_data_key(blob, MASTER, identity) for blob, identity in variants}
    assert len(keys) == len(variants)
    assert np.array_equal(open_sealed(first, MASTER, IDENTITY).image, image)


def test_any_changed_byte_is_refused():
    blob = _fixed_blob()
    for position in range(len(blob)):
        for flip in (0x01, 0x20, 0x80):
            altered = bytearray(blob)
            altered[position] ^= flip
            with pytest.raises(TamperedError):
                open_sealed(bytes(altered), MASTER, IDENTITY)
    for cut in (0, 5, 12, 100, len(blob) - 1):
        with pytest.raises(TamperedError):
            open_sealed(blob[:cut], MASTER, IDENTITY)
    with pytest.raises(TamperedError):
        open_sealed(blob + b"\x00", MASTER, IDENTITY)


@pytest.mark.parametrize(
    "other",
    [
        {"tenant": "hosp-b"},
        {"collection": "other"},
        {"image_id": "0" * 31 + "2"},
    ],
)
def test_blob_is_bound_to_its_identity(other):
    blob = _fixed_blob()
    elsewhere = IDENTITY.model_copy(update=other)
    with pytest.raises(TamperedError, match="belongs to"):
        open_sealed(blob, MASTER, elsewhere)
    with pytest.raises(TamperedError, match="belongs to"):
        unwrap_data_key(blob, MASTER, elsewhere)


def test_wrong_master_key_is_refused():
    with pytest.raises(TamperedError, match="master key"):
        open_sealed(_fixed_blob(), MasterKey.from_seed(8), IDENTITY)


def test_rotation_rewraps_without_reencrypting():
    blob = _fixed_blob()
    new = MasterKey.from_seed(9)
    rotated = rewrap(blob, MASTER, new, IDENTITY)
    old_header, new_header = read_header(blob), read_header(rotated)
    assert new_header.wrap.key_id == new.key_id != old_header.wrap.key_id
    # The payload ciphertext is kept byte for byte: only the wrap changed.
    assert _ciphertext(rotated) == _ciphertext(blob) and new_header.nonce == old_header.nonce
    assert unwrap_data_key(rotated, new, IDENTITY) == bytes(range(32))
    image, _mask = _image()
    assert np.array_equal(open_sealed(rotated, new, IDENTITY).image, image)
    with pytest.raises(TamperedError):
        open_sealed(rotated, MASTER, IDENTITY)
    altered = bytearray(blob)
    altered[-1] ^= 1
    with pytest.raises(TamperedError):
        rewrap(bytes(altered), MASTER, new, IDENTITY)


def test_released_data_key_opens_that_blob_only():
    blob = _fixed_blob()
    data_key = unwrap_data_key(blob, MASTER, IDENTITY)
    image, mask = _image()
    opened = open_with_data_key(blob, data_key, IDENTITY)
    assert np.array_equal(opened.image, image) and np.array_equal(opened.mask, mask)
    other = seal_image(image, mask, MASTER, IDENTITY)
    with pytest.raises(TamperedError):
        open_with_data_key(other, data_key, IDENTITY)
