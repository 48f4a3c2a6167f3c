"""pe-roi (`pecore.cipher_roi`): bit-exact inversion, known answers, what the cloud sees."""

import hashlib

import numpy as np
import pytest

from pecore.cipher import encrypt
from pecore.cipher_roi import (
    ROI_TRANSFORM_SETS,
    RoiCipher,
    apply_tile_transforms,
    invert_tile_transforms,
    is_roi_scheme,
    roi_tile_keys,
)
from pecore.cipher_variants import any_scheme
from pecore.roi import dilate_mask


def _case(seed: int, size: int = 64):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (size, size), dtype=np.uint8)
    mask = np.zeros((size, size), dtype=bool)
    mask[20:30, 24:40] = True
    stream = rng.integers(0, 256, size * size).astype(np.uint8)
    stream[rng.random(stream.size) < 0.5] = 0
    return image, mask, stream


@pytest.mark.parametrize(
    "name",
    [
        "pe-roi",
        "pe-roi-t16",
        "pe-roi-t8d",
        "pe-roi-t32",
        "pe-roi-t32dn",
        "pe-roi-t16dn-in",
        "pe-roi-t16dn-in-p3",
        "pe-roi-t16-p5",
        "pe-roi-t16dn-rf",
        "pe-roi-t8-rf-p3",
    ],
)
@pytest.mark.parametrize("seed", [0, 1])
def test_round_trip_returns_the_kept_pixels_bit_exactly(name, seed):
    scheme = RoiCipher.from_name(name)
    scheme.radius, scheme.margin = 6, 2
    image, mask, stream = _case(seed)
    cipher = scheme.encrypt(image, stream, mask=mask, nonce="img-7")
    cloud = scheme.cloud_mask(mask, stream, nonce="img-7")
    restored = scheme.decrypt(cipher, stream, mask=mask, nonce="img-7")
    kept = dilate_mask(dilate_mask(mask, 6), 2)
    np.testing.assert_array_equal(restored, np.where(kept, image, 0))
    np.testing.assert_array_equal(restored, scheme.blank(image, mask))
    keys = scheme.keys(stream, "img-7", image.shape)
    roi = dilate_mask(mask, 6)
    if scheme.positions == "all":
        # the cloud mask is the ROI, moved: back in place with the keys, and it alone decrypts
        np.testing.assert_array_equal(invert_tile_transforms(cloud, keys, scheme.tile), roi)
        np.testing.assert_array_equal(
            scheme.decrypt(cipher, stream, cloud_mask=cloud, nonce="img-7"), restored
        )
    else:
        # the ROI pixels whose patch (of the scheme's patch_size) stays inside their tile, moved
        np.testing.assert_array_equal(
            invert_tile_transforms(cloud, keys, scheme.tile), roi & scheme.tile_interior(roi.shape)
        )


def test_interior_positions_change_the_cloud_mask_only():
    """pe-roi-t16dn-in: same cloud image as pe-roi-t16dn; its mask is the moved ROI's pixels
    at least `margin` from every tile border, so every P×P patch the cloud takes is one tile's."""
    full, inside = RoiCipher.from_name("pe-roi-t16dn"), RoiCipher.from_name("pe-roi-t16dn-in")
    assert inside.legacy_name == "pe-roi-t16dn-in" and inside.positions == "interior"
    image, mask, stream = _case(5)
    mask[8:50, 10:56] = True
    np.testing.assert_array_equal(
        inside.encrypt(image, stream, mask=mask, nonce="a"),
        full.encrypt(image, stream, mask=mask, nonce="a"),
    )
    moved = full.cloud_mask(mask, stream, nonce="a")
    cloud = inside.cloud_mask(mask, stream, nonce="a")
    assert cloud.any() and not (cloud & ~moved).any()
    tiles = cloud.reshape(4, 16, 4, 16).swapaxes(1, 2)
    assert not tiles[:, :, :4].any() and not tiles[:, :, 12:].any()
    assert not tiles[:, :, :, :4].any() and not tiles[:, :, :, 12:].any()
    np.testing.assert_array_equal(
        tiles[:, :, 4:12, 4:12], moved.reshape(4, 16, 4, 16).swapaxes(1, 2)[:, :, 4:12, 4:12]
    )
    # the kept pixels cannot be told from this mask: decrypting needs the tumour mask
    cipher = inside.encrypt(image, stream, mask=mask, nonce="a")
    with pytest.raises(ValueError, match="tumour mask"):
        inside.decrypt(cipher, stream, cloud_mask=cloud, nonce="a")
    with pytest.raises(ValueError, match="exactly one"):
        inside.decrypt(cipher, stream, nonce="a")
    with pytest.raises(ValueError, match="exactly one"):
        full.decrypt(cipher, stream, mask=mask, cloud_mask=moved, nonce="a")


@pytest.mark.parametrize("patch", [7, 5])
def test_a_smaller_patch_keeps_the_cloud_image_and_widens_the_tile_interiors(patch):
    """pe-roi-t16dn-in-p<P>: the same margin, so the same cloud image as pe-roi-t16dn(-in),
    byte for byte; its mask is the moved ROI's pixels whose P×P patch lies inside one tile:
    the central (16 − P + 1)² of every tile."""
    base, full = RoiCipher.from_name("pe-roi-t16dn-in"), RoiCipher.from_name("pe-roi-t16dn")
    small = RoiCipher.from_name(f"pe-roi-t16dn-in-p{patch}")
    assert small.patch_size == patch and small.margin == base.margin == 4
    assert small.name == small.legacy_name == f"pe-roi-t16dn-in-p{patch}"
    assert small.image_name == base.image_name == full.image_name == "pe-roi-t16dn"
    image, mask, stream = _case(6)
    mask[8:50, 10:56] = True
    cipher = small.encrypt(image, stream, mask=mask, nonce="b")
    assert cipher.tobytes() == full.encrypt(image, stream, mask=mask, nonce="b").tobytes()
    assert cipher.tobytes() == base.encrypt(image, stream, mask=mask, nonce="b").tobytes()
    half = patch // 2
    interior = small.tile_interior((64, 64)).reshape(4, 16, 4, 16).swapaxes(1, 2)
    expected = np.zeros((16, 16), dtype=bool)
    expected[half : 16 - half, half : 16 - half] = True
    assert (interior == expected).all() and expected.sum() == (16 - patch + 1) ** 2
    moved = full.cloud_mask(mask, stream, nonce="b")
    cloud = small.cloud_mask(mask, stream, nonce="b")
    np.testing.assert_array_equal(cloud, moved & small.tile_interior((64, 64)))
    # more positions than P = 9's, and every one of those among them
    assert (base.cloud_mask(mask, stream, nonce="b") & ~cloud).sum() == 0
    assert cloud.sum() > base.cloud_mask(mask, stream, nonce="b").sum()
    np.testing.assert_array_equal(
        small.decrypt(cipher, stream, mask=mask, nonce="b"), full.blank(image, mask)
    )
    # patches up to P only: wider ones would leave their tile
    small.check_patch_size(patch)
    small.check_patch_size(patch - 2)
    with pytest.raises(ValueError, match=f"at most {patch}"):
        small.check_patch_size(patch + 2)


def test_the_cloud_image_is_ours_on_the_blanked_moved_slice():
    scheme = RoiCipher(tile=16, radius=6, margin=2)
    image, mask, stream = _case(3)
    keys = scheme.keys(stream, "n", image.shape)
    kept = apply_tile_transforms(dilate_mask(dilate_mask(mask, 6), 2), keys, 16)
    moved = apply_tile_transforms(image, keys, 16, negate=kept)
    expected = encrypt(np.where(kept, moved, 0).astype(np.uint8), stream, "ours")
    np.testing.assert_array_equal(scheme.encrypt(image, stream, mask=mask, nonce="n"), expected)
    # nothing outside ROI ⊕ margin reaches the cloud: change it, the cipher stays the same
    other = np.where(dilate_mask(dilate_mask(mask, 6), 2), image, 255 - image).astype(np.uint8)
    np.testing.assert_array_equal(scheme.encrypt(other, stream, mask=mask, nonce="n"), expected)


def test_negation_leaves_blank_pixels_blank_and_inverts_kept_ones():
    tile = np.arange(16, dtype=np.uint8).reshape(4, 4) + 100
    keys = roi_tile_keys(np.zeros(16, np.uint8), b"", 1, ROI_TRANSFORM_SETS["dihedral+negative"])
    keys.codes[:] = 8  # negation only
    negate = np.zeros((4, 4), dtype=bool)
    negate[:2] = True
    out = apply_tile_transforms(tile, keys, 4, negate=negate)
    np.testing.assert_array_equal(out[:2], 255 - tile[:2])
    np.testing.assert_array_equal(out[2:], tile[2:])
    np.testing.assert_array_equal(invert_tile_transforms(out, keys, 4, negate=negate), tile)


def test_tile_keys_known_answer():
    """Pinned: SHAKE-256(SHA-256(label ‖ stream) ‖ len(nonce) ‖ nonce), 8 + 1 bytes a tile."""
    stream = (np.arange(1024) % 251).astype(np.uint8)
    keys = roi_tile_keys(stream, "image-1", 16, 0b1111)
    secret = hashlib.sha256(b"pecbir/pe-roi/v1" + stream.tobytes()).digest()
    digest = hashlib.shake_256(secret + (7).to_bytes(4, "big") + b"image-1").digest(9 * 16)
    np.testing.assert_array_equal(
        keys.permutation, np.argsort(np.frombuffer(digest[:128], ">u8"), kind="stable")
    )
    np.testing.assert_array_equal(keys.codes, np.frombuffer(digest[128:], np.uint8) & 15)
    assert keys.permutation.tolist() == [14, 9, 15, 10, 3, 4, 0, 6, 7, 13, 8, 1, 5, 11, 2, 12]
    assert keys.codes.tolist() == [7, 9, 5, 15, 3, 2, 12, 10, 10, 4, 7, 5, 10, 9, 5, 3]
    # the transform set masks the same draws
    assert (roi_tile_keys(stream, "image-1", 16, 0b0111).codes == keys.codes & 7).all()
    assert not roi_tile_keys(stream, "image-1", 16, 0).codes.any()
    assert not np.array_equal(
        roi_tile_keys(stream, "image-2", 16, 15).permutation, keys.permutation
    )


@pytest.mark.parametrize("base", ["pe-roi-t16dn", "pe-roi-t16"])
def test_tile_reflected_patches_change_nothing_the_cloud_gets(base):
    """pe-roi-<base>-rf: the cloud image and the cloud mask are <base>'s byte for byte (so its
    attack numbers are <base>'s); only the cloud's patch extraction differs."""
    plain, reflected = RoiCipher.from_name(base), RoiCipher.from_name(f"{base}-rf")
    assert reflected.reflect and not plain.reflect and reflected.positions == "all"
    assert reflected.name == reflected.legacy_name == f"{base}-rf"
    assert reflected.image_name == plain.image_name == base
    assert "tile-reflected" in reflected.label
    image, mask, stream = _case(7)
    mask[8:50, 10:56] = True
    cipher = reflected.encrypt(image, stream, mask=mask, nonce="c")
    assert cipher.tobytes() == plain.encrypt(image, stream, mask=mask, nonce="c").tobytes()
    cloud = reflected.cloud_mask(mask, stream, nonce="c")
    assert cloud.tobytes() == plain.cloud_mask(mask, stream, nonce="c").tobytes()
    np.testing.assert_array_equal(
        reflected.decrypt(cipher, stream, cloud_mask=cloud, nonce="c"), plain.blank(image, mask)
    )
    reflected.check_patch_size(9)
    with pytest.raises(ValueError, match="at most 9"):
        reflected.check_patch_size(11)
    # reflection inside a tile needs ⌊P/2⌋ < tile; "-in" and "-rf" exclude each other
    with pytest.raises(ValueError, match="cannot be reflected"):
        RoiCipher(tile=2, margin=2, positions="all", reflect=True)
    with pytest.raises(ValueError, match="every ROI position"):
        RoiCipher(positions="interior", reflect=True)
    for bad in (f"{base}-in-rf", f"{base}-rf-in", f"{base}rf", "pe-roi-rf"):
        with pytest.raises(ValueError, match="pe-roi"):
            RoiCipher.from_name(bad)


def test_names_and_errors():
    assert RoiCipher().name == "pe-roi" and RoiCipher.from_name("pe-roi-t16d").name == "pe-roi"
    assert RoiCipher().legacy_name == "pe-roi-t16d" and RoiCipher().positions == "all"
    assert RoiCipher().transforms == "dihedral"
    # the previous choices keep their meaning under their explicit spellings (older records)
    assert RoiCipher.from_name("pe-roi-t16dn-in").name == "pe-roi-t16dn-in"
    assert RoiCipher.from_name("pe-roi-t16dn-in").positions == "interior"
    assert RoiCipher.from_name("pe-roi-t16dn").name == "pe-roi-t16dn"
    assert RoiCipher.from_name("pe-roi-t16dn").positions == "all"
    assert RoiCipher.from_name("pe-roi-t32").name == "pe-roi-t32"
    assert RoiCipher.from_name("pe-roi-t16dn").transforms == "dihedral+negative"
    assert any_scheme("pe-roi-t32d").name == "pe-roi-t32d"
    assert is_roi_scheme("pe-roi") and not is_roi_scheme("ours-bs32")
    assert RoiCipher.from_name("pe-roi-t32-in").positions == "interior"
    assert RoiCipher.from_name("pe-roi-t16d-p9").name == "pe-roi"  # P = 9 is the default
    for bad in ("pe-roi-t0", "pe-roi-x", "pe-roi-t16q", "pe-roi-in", "pe-roi-t16dn-i", "pe-roi-p7"):
        with pytest.raises(ValueError, match="pe-roi"):
            RoiCipher.from_name(bad)
    # even patches have no centre; wider than 2·margin + 1 would read blank pixels
    for bad in ("pe-roi-t16dn-in-p6", "pe-roi-t16dn-in-p11"):
        with pytest.raises(ValueError, match="patch_size"):
            RoiCipher.from_name(bad)
    image, mask, stream = _case(0, size=40)
    with pytest.raises(ValueError, match="multiples of the tile"):
        RoiCipher().encrypt(image, stream[: 40 * 40], mask=mask, nonce="x")
    with pytest.raises(ValueError, match="does not match"):
        RoiCipher().encrypt(np.zeros((64, 64), np.uint8), stream, mask=mask, nonce="x")


def test_tiles_are_moved_as_the_per_tile_definition_says():
    from pecore.cipher_roi import _dihedral

    image = np.random.default_rng(4).integers(0, 256, (32, 32), dtype=np.uint8)
    tiles = image.reshape(4, 8, 4, 8).swapaxes(1, 2).reshape(-1, 8, 8)
    keys = roi_tile_keys(np.arange(7, dtype=np.uint8), "k", 16, 0b0111)
    expected = [
        _dihedral(tiles[p], int(c)) for p, c in zip(keys.permutation, keys.codes, strict=True)
    ]
    moved = apply_tile_transforms(image, keys, 8)
    np.testing.assert_array_equal(
        moved.reshape(4, 8, 4, 8).swapaxes(1, 2).reshape(-1, 8, 8), np.stack(expected)
    )
    np.testing.assert_array_equal(invert_tile_transforms(moved, keys, 8), image)


def test_records_name_pe_roi_schemes_as_the_cloud_expects():
    from pecbir_contracts.schemas import is_pe_roi_scheme

    for name in (
        "pe-roi",
        "pe-roi-t16dn",
        "pe-roi-t32",
        "pe-roi-t8d",
        "pe-roi-t128",
        "pe-roi-t16dn-in",
        "pe-roi-t16dn-in-p7",
    ):
        assert is_pe_roi_scheme(RoiCipher.from_name(name).legacy_name)
    for other in ("pe-roi", "pe-roi-t0", "pe-roi-t16q", "ours", "ours-bs32"):
        assert not is_pe_roi_scheme(other)


def test_patches_wider_than_the_margin_are_refused():
    RoiCipher().check_patch_size(9)
    with pytest.raises(ValueError, match="at most 9"):
        RoiCipher().check_patch_size(11)
