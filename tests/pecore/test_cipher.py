"""Round trips, equivalence with the published per-pixel equations, and input validation."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pecore.cipher import SCHEMES, decrypt, encrypt, encrypt_reference, to_uint8
from pecore.keys import MasterKey, SSLMKey, derive_image_key, key_stream

KAT_PLAIN = np.array(
    [10, 200, 37, 37, 128, 0, 255, 90, 91, 92, 93, 94, 95, 96, 97, 98], dtype=np.uint8
)
KAT_CIPHER = [10, 200, 37, 128, 128, 0, 255, 90, 91, 92, 93, 94, 1, 141, 4, 158]


def test_kat_encryption_n16():
    stream = key_stream(SSLMKey(), 16)
    for shape in ((4, 4), (2, 8), (1, 16)):
        cipher = encrypt(KAT_PLAIN.reshape(shape), stream)
        assert cipher.ravel().tolist() == KAT_CIPHER
        assert np.array_equal(decrypt(cipher, stream), KAT_PLAIN.reshape(shape))


@st.composite
def image_and_stream(draw):
    height = draw(st.integers(1, 24))
    width = draw(st.integers(1, 24))
    image = draw(arrays(np.uint8, (height, width)))
    # Streams with many zeros and runs of zeros exercise the segment boundaries.
    stream = draw(arrays(np.uint8, height * width, elements=st.sampled_from([0, 0, 1, 77, 255])))
    return image, stream


@settings(max_examples=300, deadline=None)
@given(image_and_stream(), st.sampled_from(list(SCHEMES)))
def test_round_trip_and_loop_equivalence_arbitrary_streams(case, scheme):
    image, stream = case
    cipher = encrypt(image, stream, scheme)
    assert cipher.dtype == np.uint8 and cipher.shape == image.shape
    assert np.array_equal(cipher, encrypt_reference(image, stream, scheme))
    assert np.array_equal(decrypt(cipher, stream, scheme), image)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 40),
    st.integers(1, 40),
    st.text(min_size=1, max_size=12),
    st.sampled_from(list(SCHEMES)),
    st.integers(0, 2**32 - 1),
)
def test_round_trip_real_derived_keys(height, width, image_id, scheme, seed):
    image = np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)
    stream = derive_image_key(MasterKey.from_seed(seed % 97), image_id, image.size).stream()
    assert np.array_equal(decrypt(encrypt(image, stream, scheme), stream, scheme), image)


@pytest.mark.parametrize(
    "shape", [(1, 1), (1, 2), (2, 1), (3, 5), (255, 257), (256, 256), (512, 512)]
)
@pytest.mark.parametrize("scheme", SCHEMES)
def test_round_trip_sizes(shape, scheme):
    image = np.random.default_rng(shape[0] * 1000 + shape[1]).integers(0, 256, shape, np.uint8)
    stream = key_stream(SSLMKey(), image.size)
    cipher = encrypt(image, stream, scheme)
    assert np.array_equal(decrypt(cipher, stream, scheme), image)
    if image.size >= 65536:
        keyed = stream > 0
        # Identity schemes leave the k = 0 pixels in the clear; [27] chains every pixel.
        clear = np.mean(cipher.ravel()[~keyed] == image.ravel()[~keyed])
        assert clear == pytest.approx(1.0 if scheme != "chained" else 1 / 256, abs=0.01)
        changed = np.mean(cipher.ravel()[keyed] != image.ravel()[keyed])
        assert changed > 0.99 if scheme != "np" else changed > 0.98


def test_512_image_matches_reference_loop_for_every_scheme():
    image = np.random.default_rng(3).integers(0, 256, (512, 512), dtype=np.uint8)
    stream = key_stream(SSLMKey(), image.size)
    for scheme in SCHEMES:
        assert np.array_equal(
            encrypt(image, stream, scheme), encrypt_reference(image, stream, scheme)
        )


def test_wrong_key_does_not_decrypt():
    image = np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)
    master = MasterKey.from_seed(0)
    right = derive_image_key(master, "a", image.size).stream()
    wrong = derive_image_key(master, "b", image.size).stream()
    recovered = decrypt(encrypt(image, right, "ours"), wrong, "ours")
    assert np.mean(recovered != image) > 0.5


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((4, 4), dtype=np.uint16), "dtype uint16"),
        (np.zeros((4, 4), dtype=np.float64), "dtype float64"),
        (np.zeros((2, 2, 2), dtype=np.uint8), "2-D"),
        (np.zeros((0, 4), dtype=np.uint8), "empty"),
        ([[1, 2], [3, 4]], "numpy array"),
    ],
)
@pytest.mark.parametrize("operation", [encrypt, decrypt])
def test_bad_images_raise_clear_errors(image, message, operation):
    size = image.size if isinstance(image, np.ndarray) else 4
    with pytest.raises(ValueError, match=message):
        operation(image, np.ones(max(size, 1), dtype=np.uint8), "ours")


def test_key_for_a_different_size_is_refused():
    with pytest.raises(ValueError, match="different image size"):
        encrypt(np.zeros((4, 4), np.uint8), key_stream(SSLMKey(), 15))
    with pytest.raises(ValueError, match="1-D uint8"):
        encrypt(np.zeros((4, 4), np.uint8), np.zeros(16, dtype=np.int64))
    with pytest.raises(ValueError, match="unknown scheme"):
        encrypt(np.zeros((4, 4), np.uint8), np.zeros(16, np.uint8), "rot13")


def test_to_uint8_rule():
    image = np.array([[100, 200], [150, 1100]], dtype=np.uint16)
    plain, rescale = to_uint8(image)
    # 255·(150−100)/1000 = 12.75 → 13; halves round up (MATLAB im2uint8).
    assert plain.tolist() == [[0, 26], [13, 255]]
    assert (rescale.min, rescale.max, rescale.source_dtype) == (100.0, 1100.0, "uint16")
    assert np.allclose(rescale.restore(plain), image, atol=(1100 - 100) / 255 / 2 + 1e-9)
    half = np.array([[0.0, 0.5, 1.0]])  # 255 · 0.5 = 127.5 → 128
    assert to_uint8(half)[0].tolist() == [[0, 128, 255]]
    assert to_uint8(np.full((3, 3), 42, np.int16))[0].max() == 0
    eight_bit = np.random.default_rng(0).integers(0, 256, (8, 8), np.uint8)
    eight_bit[0, 0], eight_bit[0, 1] = 0, 255
    assert np.array_equal(to_uint8(eight_bit)[0], eight_bit)


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.array([[0.0, np.nan]]), "NaN"),
        (np.array([[0.0, np.inf]]), "NaN or infinite"),
        (np.zeros((2, 2, 3)), "2-D"),
        (np.zeros((0, 3)), "empty"),
        (np.array([["a", "b"]]), "dtype"),
    ],
)
def test_to_uint8_bad_input(image, message):
    with pytest.raises(ValueError, match=message):
        to_uint8(image)
