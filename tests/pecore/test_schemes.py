"""The scheme registry: names and aliases, the per-pixel equations, the facts the attacks use,
and a fifth scheme that works everywhere from one class."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import TypeAdapter, ValidationError

from pecore import attacks
from pecore.cipher import (
    SCHEMES,
    CipherScheme,
    Scheme,
    cipher_scheme,
    decrypt,
    encrypt,
    encrypt_reference,
    substitute,
)
from pecore.cipher_variants import TileScrambled, any_scheme, decrypt_any, encrypt_any
from pecore.keys import SSLMKey, key_stream

P = np.arange(256, dtype=np.uint8)[:, None, None]
K = np.arange(256, dtype=np.uint8)[None, :, None]
PREVIOUS = np.array([0, 1, 77, 255], dtype=np.uint8)[None, None, :]


def test_names_aliases_and_labels():
    assert list(SCHEMES) == ["np", "xor", "chained", "ours"]
    for alias, name in (("25", "np"), ("26", "xor"), ("27", "chained"), ("ours", "ours")):
        assert cipher_scheme(alias) is SCHEMES[name] is cipher_scheme(name)
        assert cipher_scheme(alias).legacy_name == alias
    assert [s.label for s in SCHEMES.values()] == ["[25]", "[26]", "[27]", "Ours"]
    with pytest.raises(ValueError, match="unknown scheme '28'"):
        cipher_scheme("28")


@pytest.mark.parametrize("name", list(SCHEMES))
def test_per_pixel_equations_invert_for_every_pixel_key_and_previous_value(name):
    scheme = SCHEMES[name]
    c = scheme.encrypt_pixel(P, K, PREVIOUS)
    assert c.dtype == np.uint8
    c = np.broadcast_to(c, (256, 256, 4))  # unchained schemes ignore the previous value
    np.testing.assert_array_equal(scheme.decrypt_pixel(c, K, PREVIOUS), np.broadcast_to(P, c.shape))
    # the same equations on Python ints (what the reference loop runs) give the same bytes
    for p, k, column in ((0, 0, 0), (200, 0, 1), (37, 91, 2), (255, 255, 3)):
        previous = int(PREVIOUS[0, 0, column])
        cipher = int(scheme.encrypt_pixel(p, k, previous))
        assert cipher == int(c[p, k, column])
        assert int(scheme.decrypt_pixel(cipher, k, previous)) == p


@pytest.mark.parametrize("name", list(SCHEMES))
def test_the_facts_the_attacks_use_follow_from_the_equations(name):
    scheme = SCHEMES[name]
    identity = scheme.encrypt_pixel(P, np.uint8(0), PREVIOUS)
    assert np.array_equal(identity, np.broadcast_to(P, identity.shape)) == (
        scheme.clears_identity_pixels
    )
    assert np.array_equal(identity ^ PREVIOUS, np.broadcast_to(P, identity.shape)) == (
        scheme.chains_identity_pixels
    )
    keyed = scheme.encrypt_pixel(P, K[:, 1:], PREVIOUS)
    if scheme.keyed_reveals == "negative":
        assert np.array_equal(keyed, np.broadcast_to(255 - P, keyed.shape))
    if scheme.keyed_reveals == "substitution":
        assert np.array_equal(
            keyed ^ PREVIOUS, np.broadcast_to(substitute(P, K[:, 1:]), keyed.shape)
        )


def test_stored_alias_is_kept_as_written_and_unknown_names_rejected():
    adapter = TypeAdapter(Scheme)
    assert adapter.validate_python("25") == "25"  # records made before the registry keep their tag
    assert adapter.validate_python("chained") == "chained"
    with pytest.raises(ValidationError):
        adapter.validate_python("28")


def test_variants_parse_against_the_registry_and_aliases_give_the_same_cipher():
    image = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    stream = key_stream(SSLMKey(), image.size)
    variant = any_scheme("25-bs16")
    assert isinstance(variant, TileScrambled) and variant.name == "np-bs16"
    assert variant.legacy_name == "25-bs16" and variant.label == "[25] + 16×16 tile scramble"
    np.testing.assert_array_equal(
        encrypt_any(image, stream, "25-bs16", "n"), encrypt_any(image, stream, "np-bs16", "n")
    )
    np.testing.assert_array_equal(encrypt(image, stream, "27"), encrypt(image, stream, "chained"))
    with pytest.raises(ValueError, match="variant scheme"):
        any_scheme("28-bs16")


class AddKey(CipherScheme):
    """A fifth scheme for the test only: c = (p + k) mod 256, k = 0 pixels in the clear."""

    name = "add"
    label = "[add]"
    keyed_reveals = "nothing"

    def encrypt_pixel(self, p, k, previous):
        return (p + k) & 255

    def decrypt_pixel(self, c, k, previous):
        return (c - k) & 255

    def _encrypt_flat(self, p, k):
        return self.encrypt_pixel(p, k, None)

    def _decrypt_flat(self, c, k):
        return self.decrypt_pixel(c, k, None)


def test_a_fifth_scheme_is_one_class(monkeypatch, tmp_path):
    """Registered once, it is encrypted, decrypted, scrambled, attacked and named everywhere."""
    from pecbir.experiment import Condition
    from pecore.attack_suite import AttackImages, attack_scheme
    from pecore.datasets import make_synthetic
    from pecore.keys import MasterKey

    monkeypatch.setitem(SCHEMES, "add", AddKey())
    image = np.random.default_rng(1).integers(0, 256, (32, 32), dtype=np.uint8)
    stream = key_stream(SSLMKey(), image.size)
    cipher = encrypt(image, stream, "add")
    np.testing.assert_array_equal(cipher, encrypt_reference(image, stream, "add"))
    np.testing.assert_array_equal(decrypt(cipher, stream, "add"), image)
    scrambled = encrypt_any(image, stream, "add-bs8", "n")
    np.testing.assert_array_equal(decrypt_any(scrambled, stream, "add-bs8", "n"), image)
    assert TypeAdapter(Scheme).validate_python("add") == "add"
    assert Condition("add", "same").label == "same key [add]"
    # known plaintext: c − p gives k, so one pair decrypts every other image exactly
    attack = attacks.KnownPlaintextAttack("add").fit(image, cipher)
    other = np.random.default_rng(2).integers(0, 256, (32, 32), dtype=np.uint8)
    np.testing.assert_array_equal(attack.transform(encrypt(other, stream, "add")), other)
    stack = make_synthetic(n_images=4, size=32, seed=1).images
    images = AttackImages(stack[:2], ["a", "b"], stack[:3], stack[3:], ["k"], "synthetic")
    results, _ = attack_scheme(
        scheme="add",
        key_mode="same",
        images=images,
        master=MasterKey.from_seed(0),
        kpa_pairs=1,
        n_kpa_images=1,
        mask_cache={},
    )
    assert results["known-plaintext (1 pair)"]["exact_pixels"]["min"] == 1.0
    assert {"clear-pixel inpainting", "shared-mask inpainting"} <= set(results)
