"""Cipher statistics and the tile-scrambled variant schemes."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pecore import cipherstats
from pecore.cipher import SCHEMES, decrypt, encrypt
from pecore.cipher_variants import (
    decrypt_variant,
    encrypt_variant,
    parse_variant,
    scramble,
    scramble_mask,
    tile_permutation,
    unscramble,
)
from pecore.keys import SSLMKey, key_stream


def test_entropy_and_chi2_of_flat_and_constant_images():
    flat = np.arange(256, dtype=np.uint8).repeat(4).reshape(32, 32)
    assert cipherstats.entropy(flat) == pytest.approx(8.0)
    assert cipherstats.histogram_chi2(flat) == (0.0, 1.0)
    constant = np.full((32, 32), 7, np.uint8)
    assert cipherstats.entropy(constant) == 0.0
    assert cipherstats.histogram_chi2(constant)[1] < 1e-100


def test_adjacent_correlation_of_a_ramp_and_of_noise():
    ramp = np.add.outer(np.arange(64), np.arange(64)).astype(np.uint8)
    correlation = cipherstats.adjacent_correlation(ramp)
    assert all(value > 0.99 for value in correlation.values())
    noise = np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8)
    assert all(abs(v) < 0.02 for v in cipherstats.adjacent_correlation(noise).values())


def test_npcr_uaci_match_their_expectation_for_independent_uniform_images():
    rng = np.random.default_rng(1)
    first, second = rng.integers(0, 256, (2, 256, 256), dtype=np.uint8)
    npcr, uaci = cipherstats.npcr_uaci(first, second)
    expected_npcr, expected_uaci = cipherstats.expected_npcr_uaci()
    assert npcr == pytest.approx(expected_npcr, abs=0.2)
    assert uaci == pytest.approx(expected_uaci, abs=0.3)
    assert cipherstats.npcr_uaci(first, first) == (0.0, 0.0)


def test_npcr_of_ours_for_a_one_ulp_ish_key_change_is_as_predicted():
    # Two unrelated streams: a pixel keeps its cipher value only where both keys are 0
    # (identity) or, elsewhere, by a 1/256 coincidence.  A chained cipher would give ~99.6 %.
    n = 128 * 128
    stream = key_stream(SSLMKey(), n)
    r0, r1, r2 = SSLMKey().r
    other = key_stream(SSLMKey(r=(r0 + 1e-14, r1, r2)), n)
    both_zero = np.mean((stream == 0) & (other == 0))
    expected = 100 * (1 - both_zero) * (255 / 256)
    image = np.random.default_rng(2).integers(0, 256, (128, 128), dtype=np.uint8)
    npcr, _ = cipherstats.npcr_uaci(encrypt(image, stream, "ours"), encrypt(image, other, "ours"))
    assert npcr == pytest.approx(expected, abs=1.0)
    assert 70 < npcr < 80
    npcr27, _ = cipherstats.npcr_uaci(encrypt(image, stream, "27"), encrypt(image, other, "27"))
    assert npcr27 > 99


@st.composite
def variant_case(draw):
    block = draw(st.sampled_from([2, 3, 4, 8]))
    height = draw(st.integers(1, 20))
    width = draw(st.integers(1, 20))
    image = draw(arrays(np.uint8, (height, width)))
    stream = draw(arrays(np.uint8, height * width, elements=st.sampled_from([0, 0, 3, 128, 255])))
    inner = draw(st.sampled_from(list(SCHEMES)))
    nonce = draw(st.text(max_size=8))
    return image, stream, f"{inner}-bs{block}", nonce


@settings(max_examples=300, deadline=None)
@given(variant_case())
def test_variant_round_trip_is_bit_exact(case):
    image, stream, scheme, nonce = case
    cipher = encrypt_variant(image, stream, scheme, nonce)
    assert cipher.dtype == np.uint8 and cipher.shape == image.shape
    assert np.array_equal(decrypt_variant(cipher, stream, scheme, nonce), image)


@settings(max_examples=100, deadline=None)
@given(variant_case())
def test_variant_is_the_inner_scheme_on_the_scrambled_image_with_the_scrambled_mask(case):
    image, stream, scheme, nonce = case
    inner, block = parse_variant(scheme)
    cipher = encrypt_variant(image, stream, scheme, nonce)
    scrambled = decrypt(cipher, stream, inner)
    mask = image > 100
    assert np.array_equal(scramble_mask(mask, stream, scheme, nonce), scrambled > 100)
    n_tiles = (image.shape[0] // block) * (image.shape[1] // block)
    permutation = tile_permutation(stream, nonce, n_tiles)
    assert np.array_equal(
        unscramble(scramble(image, permutation, block), permutation, block), image
    )


def test_variant_permutations_differ_per_nonce_and_key_and_leave_inner_schemes_alone():
    image = np.random.default_rng(3).integers(0, 256, (128, 128), dtype=np.uint8)
    stream = key_stream(SSLMKey(), image.size)
    first = tile_permutation(stream, "image-1", 64)
    assert sorted(first.tolist()) == list(range(64))
    assert not np.array_equal(first, tile_permutation(stream, "image-2", 64))
    assert not np.array_equal(first, tile_permutation(stream ^ 1, "image-1", 64))
    assert np.array_equal(first, tile_permutation(stream, b"image-1", 64))
    for inner in SCHEMES:  # the variant must not change what pecore.cipher produces
        assert np.array_equal(decrypt(encrypt(image, stream, inner), stream, inner), image)
    assert not np.array_equal(
        encrypt_variant(image, stream, "ours-bs16", "a"), encrypt(image, stream, "ours")
    )


@pytest.mark.parametrize("bad", ["ours", "ours-bs1", "ours-bs", "28-bs8", "ours-bs08x"])
def test_unknown_variant_names_are_rejected(bad):
    with pytest.raises(ValueError, match="variant scheme"):
        parse_variant(bad)
