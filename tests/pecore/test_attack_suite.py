"""The attack suite on small synthetic images: each test checks what a wrong suite breaks."""

from __future__ import annotations

import numpy as np
import pytest

from pecore import attacks
from pecore.attack_suite import (
    AttackImages,
    attack_scheme,
    cipher_statistics,
    ciphertext_only_attacks,
    perturbed_keys,
    score_stack,
    summary,
)
from pecore.datasets import make_synthetic
from pecore.keys import PAPER_KEY, MasterKey, SSLMKey, key_stream, paper_key_stream


@pytest.fixture(scope="module")
def images() -> AttackImages:
    stack = make_synthetic(n_images=8, size=32, seed=4).images
    return AttackImages(
        eval_images=stack[:3],
        eval_ids=["a", "b", "c"],
        mask_images=stack[:6],
        known_images=stack[6:],
        known_ids=["k1", "k2"],
        source="synthetic",
    )


def test_summary_and_scores_of_exact_and_inverted_recoveries(images):
    assert summary([1.0, 3.0]) == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0}
    plains = images.eval_images
    exact = score_stack(plains, plains, folded=False)
    assert exact["ssim"]["min"] == pytest.approx(1.0) and exact["psnr"]["mean"] == 99.0
    assert exact["inverted_polarity"] == 0 and exact["n"] == 3 and "ssim_vs_folded" not in exact
    inverted = score_stack(plains, 255 - plains, folded=True)
    assert inverted["inverted_polarity"] == 3 and inverted["ssim"]["mean"] == pytest.approx(1.0)
    assert "ssim_vs_folded" in inverted and "psnr_vs_folded" in inverted


def test_the_attacks_of_a_variant_denoise_its_tiles():
    assert ciphertext_only_attacks("ours")["clear-pixel inpainting"].__self__.tile is None
    assert ciphertext_only_attacks("ours-bs16")["clear-pixel inpainting"].__self__.tile == 16
    assert len(ciphertext_only_attacks("26")) == 8


def test_same_key_known_plaintext_breaks_26_and_per_image_keys_stop_it(images):
    master = MasterKey.from_seed(0)
    common = {"images": images, "master": master, "kpa_pairs": 1, "n_kpa_images": 2}
    cache: dict[str, attacks.SharedMaskEstimator] = {}
    same, example = attack_scheme(scheme="26", key_mode="same", mask_cache=cache, **common)
    kpa = same["known-plaintext (1 pair)"]
    # c = p ⊕ k: one pair gives every key byte, so every pixel of the targets decrypts exactly
    assert kpa["exact_pixels"]["min"] == 1.0 and kpa["identity_positions_found"] == 1.0
    assert "shared-mask inpainting" in same and "26" in cache
    assert 0.0 <= same["shared-mask inpainting"]["mask_accuracy"] <= 1.0
    assert example["cipher"].shape == (32, 32)
    assert set(example) >= {"cipher", "leading-bit B", "known-plaintext (1 pair)"}
    other, _ = attack_scheme(scheme="26", key_mode="per-image", mask_cache=cache, **common)
    assert "shared-mask inpainting" not in other
    assert other["known-plaintext (1 pair)"]["exact_pixels"]["mean"] < 0.9
    assert "identity_positions_found" not in other["known-plaintext (1 pair)"]
    # the old spelling of the key mode is the same mode
    again, _ = attack_scheme(scheme="26", key_mode="different", mask_cache=cache, **common)
    assert again == other


def test_the_cipher_image_under_the_same_key_is_the_paper_key_encryption(images):
    from pecore.cipher import encrypt

    _, example = attack_scheme(
        scheme="ours",
        key_mode="same",
        images=images,
        master=MasterKey.from_seed(0),
        kpa_pairs=0,
        n_kpa_images=0,
        mask_cache={},
    )
    stream = key_stream(SSLMKey(), 32 * 32)
    np.testing.assert_array_equal(example["cipher"], encrypt(images.eval_images[0], stream, "ours"))


def test_a_variant_gets_the_perfect_jigsaw_reference_and_no_known_plaintext(images):
    results, _ = attack_scheme(
        scheme="ours-bs16",
        key_mode="per-image",
        images=images,
        master=MasterKey.from_seed(1),
        kpa_pairs=1,
        n_kpa_images=2,
        mask_cache={},
    )
    oracle = results["tile-wise inpainting, tiles put back by an oracle (perfect jigsaw solver)"]
    assert 0.0 <= oracle["jigsaw_neighbour_accuracy"]["mean"] <= 1.0
    assert not any(name.startswith("known-plaintext") for name in results)


def test_cipher_statistics_under_the_paper_key(images):
    done = []
    stats = cipher_statistics(
        images.eval_images, ids=images.eval_ids, schemes=["ours", "25"], on_scheme=done.append
    )
    assert done == ["ours", "25"]
    assert set(stats) == {"plain", "key_streams", "ours", "25", "uniform_reference"}
    for row in stats["key_streams"].values():  # one ulp of θ* changes most of the stream
        assert row["fraction_of_positions_differing"] > 0.4
    assert stats["ours"]["wrong_key_pixels_differing_r0 + 1e-14"] > 10.0
    assert perturbed_keys()["x0 + 1e-14"].x0 == PAPER_KEY.x0 + 1e-14


def test_paper_key_stream_is_theta_star_and_read_only():
    stream = paper_key_stream(100)
    np.testing.assert_array_equal(stream, key_stream(SSLMKey(), 100))
    assert paper_key_stream(100) is stream and not stream.flags.writeable
