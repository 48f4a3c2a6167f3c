"""Attacks on synthetic images: each test checks a property that a wrong attack would break."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pecore import attacks
from pecore.cipher import SCHEMES, encrypt
from pecore.keys import SSLMKey, key_stream


def smooth_image(size: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth synthetic 'scan': a gradient with a bright disc and a dark blob."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    cy, cx = rng.uniform(0.3, 0.7, 2)
    image = 40 + 80 * x + 120 * np.exp(-((y - cy) ** 2 + (x - cx) ** 2) / 0.02)
    image -= 60 * np.exp(-((y - 0.8) ** 2 + (x - 0.2) ** 2) / 0.01)
    return np.clip(image, 0, 255).astype(np.uint8)


def random_stream(n: int, seed: int) -> np.ndarray:
    """Half zeros, half uniform bytes: the statistics of the SSLM stream."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, n) * rng.integers(0, 2, n)).astype(np.uint8)


@settings(max_examples=50, deadline=None)
@given(arrays(np.uint8, (12, 9)), st.integers(0, 2**32 - 1))
def test_fixed_bit_attack_on_25_returns_the_folded_image(image, seed):
    cipher = encrypt(image, random_stream(image.size, seed), "25")
    recovered = attacks.LeadingBitAttack("A").transform(cipher)
    assert np.array_equal(recovered, np.minimum(image, 255 - image))
    assert np.array_equal(attacks.LeadingBitAttack("A'").transform(cipher), 255 - recovered)


@settings(max_examples=50, deadline=None)
@given(arrays(np.uint8, (10, 11)))
def test_neighbour_guided_attack_on_grey_images_is_a_fixed_bit_attack(cipher):
    # With the two candidates c and 255 − c, the closer one to any reference < 128 is the one
    # below 128: the raster recurrence keeps the side of the first pixel (method-spec §8.5 B).
    guided = attacks.LeadingBitAttack("B").transform(cipher)
    fixed = attacks.LeadingBitAttack("A" if cipher[0, 0] <= 127 else "A'").transform(cipher)
    assert np.array_equal(guided, fixed)
    pinned = attacks.LeadingBitAttack("B", first_pixel_fixed=True).transform(cipher)
    assert np.array_equal(pinned, attacks.LeadingBitAttack("A").transform(cipher))


def test_neighbour_guided_attack_follows_the_reference_rule():
    cipher = np.array([[200, 10, 240], [100, 250, 30]], dtype=np.uint8)
    # Row 0 keeps 200, then picks by the left neighbour; row 1 by the pixel above.
    expected = np.array([[200, 245, 240], [155, 250, 225]], dtype=np.uint8)
    assert np.array_equal(attacks.LeadingBitAttack("B").transform(cipher), expected)


def test_substitution_keeps_the_lsb_and_ignores_the_key_msb():
    p = np.arange(256, dtype=np.uint8)[:, None]
    k = np.arange(256, dtype=np.uint8)[None, :]
    t = attacks.substitute(p, k)
    assert np.array_equal(t, (p.astype(int) + 2 * (k & ~p & 127)) % 256)
    assert np.array_equal(t & 1, np.broadcast_to(p & 1, t.shape))
    assert np.array_equal(t[:, :128], t[:, 128:])
    for value in (0, 77, 254, 255):
        for key in (0, 1, 100, 255):
            produced = int(attacks.substitute(np.uint8(value), np.uint8(key)))
            assert value in attacks.consistent_plain_values(produced)
    assert attacks.consistent_plain_values(255).tolist() == [255]


def test_dechain_reveals_27_plain_pixels_where_the_key_is_zero():
    image = np.random.default_rng(1).integers(0, 256, (20, 20), dtype=np.uint8)
    stream = random_stream(image.size, 2)
    d = attacks.dechain(encrypt(image, stream, "27")).ravel()
    zero = np.flatnonzero(stream == 0)
    zero = zero[zero > 0]  # d(0) would need c(−1) = p(N−1)
    assert np.array_equal(d[zero], image.ravel()[zero])
    keyed = np.flatnonzero(stream > 0)
    assert not np.array_equal(d[keyed], image.ravel()[keyed])


@pytest.mark.parametrize("scheme", SCHEMES)
def test_known_plaintext_candidates_always_contain_the_true_key(scheme):
    rng = np.random.default_rng(3)
    stream = random_stream(32 * 32, 4)
    plain = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    attack = attacks.KnownPlaintextAttack(scheme).fit(plain, encrypt(plain, stream, scheme))
    assert attack.candidates_[np.arange(stream.size), stream].all()
    target = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    recovered = attack.transform(encrypt(target, stream, scheme))
    assert recovered.shape == target.shape
    certain = attack.certain_[0]
    assert certain.mean() > 0.05
    assert np.array_equal(recovered[certain], target[certain])


@pytest.mark.parametrize("scheme", ["25", "26"])
def test_known_plaintext_recovers_pixelwise_schemes_exactly_from_one_pair(scheme):
    rng = np.random.default_rng(5)
    stream = key_stream(SSLMKey(), 24 * 24)
    plain = rng.integers(0, 256, (24, 24), dtype=np.uint8)
    attack = attacks.KnownPlaintextAttack(scheme).fit(plain, encrypt(plain, stream, scheme))
    if scheme == "26":
        assert np.array_equal(attack.stream_, stream)
    else:
        assert np.array_equal(attack.stream_ > 0, stream > 0)
    others = rng.integers(0, 256, (3, 24, 24), dtype=np.uint8)
    ciphers = np.stack([encrypt(o, stream, scheme) for o in others])
    assert np.array_equal(attack.transform(ciphers), others)


@pytest.mark.parametrize("scheme", ["ours", "27"])
def test_known_plaintext_recovers_the_effective_key_of_chained_schemes(scheme):
    # The top key bit never affects "ours"/[27]; every other bit shows up once some known
    # plain image has a 0 there, so 24 random pairs pin k mod 128 (and k = 0 for "ours").
    rng = np.random.default_rng(6)
    stream = random_stream(16 * 16, 7)
    plains = rng.integers(0, 256, (24, 16, 16), dtype=np.uint8)
    ciphers = np.stack([encrypt(p, stream, scheme) for p in plains])
    attack = attacks.KnownPlaintextAttack(scheme).fit(plains, ciphers)
    assert np.array_equal(attack.stream_ & 127, stream & 127)
    if scheme == "ours":
        assert np.array_equal(attack.stream_ == 0, stream == 0)
    target = rng.integers(0, 256, (16, 16), dtype=np.uint8)
    assert np.array_equal(attack.transform(encrypt(target, stream, scheme)), target)


def test_known_plaintext_one_pair_decrypts_most_of_a_smooth_image_under_ours():
    stream = random_stream(64 * 64, 8)
    known = smooth_image(64, seed=1)
    attack = attacks.KnownPlaintextAttack("ours").fit(known, encrypt(known, stream, "ours"))
    target = smooth_image(64, seed=2)
    recovered = attack.transform(encrypt(target, stream, "ours"))
    assert attacks.score(target, recovered)["ssim"] > 0.8


def test_known_plaintext_rejects_other_image_sizes():
    stream = random_stream(64, 9)
    plain = np.zeros((8, 8), np.uint8)
    attack = attacks.KnownPlaintextAttack("26").fit(plain, encrypt(plain, stream, "26"))
    with pytest.raises(ValueError, match="key stream is for"):
        attack.transform(np.zeros((4, 16), np.uint8))


@pytest.mark.parametrize("scheme", ["ours", "26", "27"])
def test_clear_pixel_attack_recovers_a_smooth_image(scheme):
    image = smooth_image(96, seed=3)
    cipher = encrypt(image, random_stream(image.size, 10), scheme)
    raw = attacks.score(image, cipher)["ssim"]
    recovered = attacks.score(image, attacks.ClearPixelAttack(scheme).transform(cipher))["ssim"]
    assert raw < 0.2
    assert recovered > 0.6


def test_shared_mask_estimator_finds_the_identity_positions_of_a_shared_key():
    stream = random_stream(64 * 64, 11)
    plains = np.stack([smooth_image(64, seed=s) for s in range(12)])
    ciphers = np.stack([encrypt(p, stream, "ours") for p in plains])
    estimator = attacks.SharedMaskEstimator("ours").fit(ciphers)
    assert np.mean(estimator.clear_mask_.ravel() == (stream == 0)) > 0.9
    # With a per-image random key the same procedure finds nothing shared.
    other = np.stack(
        [encrypt(p, random_stream(p.size, 100 + j), "ours") for j, p in enumerate(plains)]
    )
    guess = attacks.SharedMaskEstimator("ours").fit(other).clear_mask_
    assert np.mean(guess.ravel() == (stream == 0)) < 0.6


def test_median_attack_and_pipeline_shapes_and_validation():
    stack = np.random.default_rng(0).integers(0, 256, (3, 16, 16), dtype=np.uint8)
    out = attacks.Pipeline(attacks.LeadingBitAttack("B"), attacks.MedianFilterAttack(3))
    assert out.transform(stack).shape == stack.shape
    with pytest.raises(ValueError, match="odd"):
        attacks.MedianFilterAttack(4).transform(stack)
    with pytest.raises(ValueError, match="uint8"):
        attacks.MedianFilterAttack(3).transform(stack.astype(np.float32))


def test_score_picks_the_better_polarity():
    image = smooth_image(64)
    assert attacks.score(image, 255 - image)["polarity"] == "inverted"
    assert attacks.score(image, 255 - image)["ssim"] == pytest.approx(1.0)
    assert attacks.score(image, 255 - image, both_polarities=False)["ssim"] < 0.5


def test_jigsaw_accuracy_is_high_for_smooth_tiles_and_low_for_noise():
    from pecore.cipher_variants import scramble

    image = smooth_image(128)
    permutation = np.random.default_rng(0).permutation(16)
    accuracy = attacks.jigsaw_neighbour_accuracy(scramble(image, permutation, 32), permutation, 32)
    noise = np.random.default_rng(1).integers(0, 256, (128, 128), dtype=np.uint8)
    chance = attacks.jigsaw_neighbour_accuracy(noise, permutation, 32)
    assert accuracy > 0.7
    assert chance < 0.3


def test_fast_ssim_and_psnr_match_skimage():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    rng = np.random.default_rng(12)
    plain = smooth_image(80, seed=4)
    for recovered in (plain, 255 - plain, rng.integers(0, 256, plain.shape, dtype=np.uint8)):
        recovered = np.asarray(recovered, dtype=np.uint8)
        for reference in (plain, 255 - plain):
            expected = structural_similarity(reference, recovered, data_range=255)
            result = attacks.score(reference, recovered, both_polarities=False)
            assert result["ssim"] == pytest.approx(expected, abs=1e-9)
            if not np.array_equal(reference, recovered):
                psnr = peak_signal_noise_ratio(reference, recovered, data_range=255)
                assert result["psnr"] == pytest.approx(psnr, abs=1e-9)
    folded = np.minimum(plain, 255 - plain)
    expected = structural_similarity(folded, plain, data_range=255)
    assert attacks.score_folded(plain, plain)["ssim"] == pytest.approx(expected, abs=1e-9)


def test_shared_mask_of_25_on_mostly_dark_images_inverts_the_keyed_pixels_back():
    stream = random_stream(64 * 64, 13)
    plains = np.stack([smooth_image(64, seed=s) for s in range(16)])
    ciphers = np.stack([encrypt(p, stream, "25") for p in plains])
    mask = attacks.SharedMaskEstimator("25").fit(ciphers).clear_mask_
    assert np.mean(mask.ravel() == (stream == 0)) > 0.95
    recovered = attacks.ClearPixelAttack("25", clear_mask=mask).transform(ciphers[0])
    assert attacks.score(plains[0], recovered)["ssim"] > 0.9
