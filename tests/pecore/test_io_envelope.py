"""Image I/O (PNG, NPY, DICOM) and the owner-side seal/unseal envelope."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pecbir_harness.dicom import save_mr
from pecore.cipher import to_uint8
from pecore.envelope import CipherMetadata, seal, unseal
from pecore.io import png_bytes, read_dicom, read_image, read_png, write_image
from pecore.keys import MasterKey


def test_png_and_npy_round_trip(tmp_path):
    image8 = np.random.default_rng(0).integers(0, 256, (7, 9), dtype=np.uint8)
    image16 = np.random.default_rng(1).integers(0, 4096, (7, 9), dtype=np.uint16)
    for image, name in ((image8, "a.png"), (image16, "b.png"), (image16, "c.npy")):
        path = write_image(tmp_path / name, image)
        loaded = read_image(path)
        assert loaded.dtype == image.dtype and np.array_equal(loaded, image)
    assert np.array_equal(read_png(png_bytes(image8)), image8)


def test_png_input_errors(tmp_path):
    with pytest.raises(ValueError, match="not a readable PNG"):
        read_png(png_bytes(np.zeros((8, 8), np.uint8))[:40])
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(rgb)
    with pytest.raises(ValueError, match="not a grey image"):
        read_image(rgb)
    with pytest.raises(ValueError, match="unsupported image type"):
        read_image(
            write_image(tmp_path / "x.npy", np.zeros((2, 2)))
            .with_suffix(".npy")
            .rename(tmp_path / "x.tif")
        )
    np.save(tmp_path / "cube.npy", np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="2-D"):
        read_image(tmp_path / "cube.npy")


def test_png_decompression_bomb_refused():
    big = Image.new("L", (5000, 5000))
    buffer = __import__("io").BytesIO()
    big.save(buffer, format="PNG")
    with pytest.raises(ValueError, match="exceeds the limit"):
        read_png(buffer.getvalue())


@pytest.mark.parametrize("bits", [12, 16])
def test_dicom_monochrome2(tmp_path, bits):
    pixels = np.random.default_rng(bits).integers(0, 2**bits, (16, 20), dtype=np.uint16)
    path = save_mr(tmp_path / "slice.dcm", pixels, bits_stored=bits)
    array, dataset = read_dicom(path)
    assert np.array_equal(array, pixels)
    assert dataset.PatientName == "Doe^Jane"
    assert np.array_equal(read_image(path), pixels)


def test_dicom_errors(tmp_path):
    with pytest.raises(ValueError, match="not a readable DICOM"):
        read_dicom(b"\x00" * 128 + b"DICM" + b"\x01\x02")
    whole = save_mr(tmp_path / "ok.dcm", np.ones((64, 64), np.uint16)).read_bytes()
    with pytest.raises(ValueError, match="DICOM"):
        read_dicom(whole[: len(whole) - 5000])
    path = save_mr(tmp_path / "m1.dcm", np.zeros((4, 4), np.uint16), photometric="MONOCHROME1")
    with pytest.raises(ValueError, match="MONOCHROME2"):
        read_dicom(path)


@pytest.mark.parametrize("key_mode", ["same", "per-image"])
@pytest.mark.parametrize("scheme", ["ours", "25", "26", "27"])
def test_seal_unseal_bit_exact(key_mode, scheme):
    master = MasterKey.from_seed(3)
    image = np.random.default_rng(5).integers(0, 4096, (33, 31), dtype=np.uint16)
    cipher, metadata = seal(image, master, "study-1", scheme, key_mode)
    assert cipher.dtype == np.uint8
    restored = CipherMetadata.model_validate_json(metadata.model_dump_json())
    assert np.array_equal(unseal(cipher, restored, master), to_uint8(image)[0])
    dumped = metadata.model_dump_json()
    assert "sslm" not in dumped and "x0" not in dumped


def test_same_mode_shares_the_key_per_image_mode_does_not():
    master = MasterKey.from_seed(3)
    image = np.random.default_rng(0).integers(0, 256, (32, 32), dtype=np.uint8)
    image[0, 0], image[0, 1] = 0, 255
    same_a, _ = seal(image, master, "a", key_mode="same")
    same_b, _ = seal(image, master, "b", key_mode="same")
    own_a, _ = seal(image, master, "a", key_mode="per-image")
    own_b, _ = seal(image, master, "b", key_mode="per-image")
    assert np.array_equal(same_a, same_b)
    assert not np.array_equal(own_a, own_b)


def test_unseal_refuses_wrong_master_and_tampered_metadata():
    master = MasterKey.from_seed(3)
    image = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
    cipher, metadata = seal(image, master, "a")
    with pytest.raises(ValueError, match="encrypted under master key"):
        unseal(cipher, metadata, MasterKey.from_seed(4))
    tampered = metadata.model_copy(update={"image_id": "b"})
    with pytest.raises(ValueError, match="check value"):
        unseal(cipher, tampered, master)
    with pytest.raises(ValueError, match="shape"):
        unseal(cipher[:8], metadata, master)


# -- integrity tag known answers ------------------------------------------------------------------
# Frozen with the code of commit 33cc527 (before the v2 tag): records stored by it must verify.
KAT_MASTER_SEED = 7
KAT_IMAGE = np.array(
    [
        [2426, 2648, 3435, 1559, 53, 1312],
        [1393, 2964, 3240, 1420, 4094, 1319],
        [2448, 125, 3756, 3953, 231, 3453],
        [1462, 3032, 893, 2411, 1899, 1876],
        [3969, 1693, 595, 850, 3282, 2538],
    ],
    dtype=np.uint16,
)
KAT_SIDECAR_V1_CIPHER = "85a4415f2b442d6f4214eb79971ef40c0b1c59652c95ef7384032210cc9d"
KAT_SIDECAR_V1_JSON = (
    '{"format":"pecbir-cipher-v1","image_id":"kat-sidecar-v1","scheme":"ours",'
    '"key_mode":"per-image","key_id":"bbfefafbdefe2cd6","key_counter":0,'
    '"key_check":"sha256:e9bef17ee7a5de2a","shape":[5,6],"rescale":{"rule":"minmax-v1",'
    '"min":53.0,"max":4094.0,"source_dtype":"uint16"},'
    '"integrity_tag":"d064a134c8decacfa2e03d08c7ad222ed68edfe34535215ccd2a4d5786c92d44"}'
)

# Key mode "same", scheme 26, a float32 source (rescale bounds that are not whole numbers).
KAT_SIDECAR_V1_SAME_CIPHER = "9670d571074f55b8446dc5503c18e0f60bd902101e950789f7672232d19d"
KAT_SIDECAR_V1_SAME_JSON = (
    '{"format":"pecbir-cipher-v1","image_id":"kat-sidecar-same","scheme":"26",'
    '"key_mode":"same","key_id":"bbfefafbdefe2cd6","key_counter":0,'
    '"key_check":"sha256:4f72a3135ec7f91e","shape":[5,6],"rescale":{"rule":"minmax-v1",'
    '"min":7.5714287757873535,"max":584.8571166992188,"source_dtype":"float32"},'
    '"integrity_tag":"fb4a804de286a2a4bb227177c856dc8783cf2b3c7f692e6b358d75ce61d4a7a0"}'
)


def _kat_cipher(hex_pixels: str) -> np.ndarray:
    return np.frombuffer(bytes.fromhex(hex_pixels), dtype=np.uint8).reshape(KAT_IMAGE.shape)


def test_sidecar_v1_known_answer_still_verifies_and_decrypts():
    from pecore.envelope import verify_tag

    master = MasterKey.from_seed(KAT_MASTER_SEED)
    cipher = _kat_cipher(KAT_SIDECAR_V1_CIPHER)
    metadata = CipherMetadata.model_validate_json(KAT_SIDECAR_V1_JSON)
    verify_tag(cipher, metadata, master)
    assert np.array_equal(unseal(cipher, metadata, master), to_uint8(KAT_IMAGE)[0])
    resealed, _ = seal(KAT_IMAGE, master, "kat-sidecar-v1")
    assert np.array_equal(resealed, cipher)


def test_sidecar_v1_known_answer_of_the_shared_key_mode_still_verifies():
    from pecore.envelope import verify_tag

    master = MasterKey.from_seed(KAT_MASTER_SEED)
    cipher = _kat_cipher(KAT_SIDECAR_V1_SAME_CIPHER)
    metadata = CipherMetadata.model_validate_json(KAT_SIDECAR_V1_SAME_JSON)
    verify_tag(cipher, metadata, master)
    source = KAT_IMAGE.astype(np.float32) / 7
    assert np.array_equal(unseal(cipher, metadata, master), to_uint8(source)[0])


KAT_MASK = np.zeros(KAT_IMAGE.shape, dtype=bool)
KAT_MASK[1:4, 2:5] = True
# The v1 service format checked in pecore: the facts of the stored meta.json frozen in
# tests/services/test_integrity_keys.py (KAT_SERVICE_V1_*), in pecore's field names.
KAT_SERVICE_V1_CIPHER = "3bffd55f004f55b87129d6749702eaf60bd759bcf52ca42fd8bf22688419"
KAT_SERVICE_V1_RECORD = dict(
    image_id="kat-service-v1",
    role="template",
    label=2,
    scheme="ours",
    key_mode="per-image",
    key_id="bbfefafbdefe2cd6",
    key_counter=0,
    key_check="sha256:f0165799675abcfe",
    shape=(5, 6),
    rescale={"rule": "minmax-v1", "min": 53.0, "max": 4094.0, "source_dtype": "uint16"},
    integrity_tag="7d2ac2afb4008bb924be3e07f3bc35967ece73b87a6069242076617a0f190c86",
    tag_format="pecbir/integrity/v1",
)
# v2 (pecbir/envelope/v2), frozen when it was introduced: a labelled template with its mask.
KAT_V2_CIPHER = "96a4d54aa8c7556dc956a9f797feeaf6fdd776bc05107473741322666a0b"
KAT_V2_TAG = "6092df910ecd7d7c2fbcd9dcf6fdf1b314f71c5077630a6119965ce70c1f1b2b"
# v2 without a mask: a `pecbir encrypt` sidecar.
KAT_V2_SIDECAR_CIPHER = "45a48d128e4fdab86956a9fb5c05ea120b1c59e735dc74f7f7672232de9d"
KAT_V2_SIDECAR_TAG = "416a169f4e980403e4a3afa67096a89b2cb6009146ddfa9d0d9cf45b83d51680"


def test_service_v1_known_answer_verifies_in_pecore():
    from pecore.envelope import TamperedError, verify_tag

    master = MasterKey.from_seed(KAT_MASTER_SEED)
    cipher = _kat_cipher(KAT_SERVICE_V1_CIPHER)
    metadata = CipherMetadata(**KAT_SERVICE_V1_RECORD)
    verify_tag(cipher, metadata, master, mask=KAT_MASK)
    assert np.array_equal(unseal(cipher, metadata, master), to_uint8(KAT_IMAGE)[0])
    with pytest.raises(TamperedError, match="covers a mask"):
        verify_tag(cipher, metadata, master)
    with pytest.raises(TamperedError, match="integrity check failed"):
        verify_tag(cipher, metadata.model_copy(update={"label": 1}), master, mask=KAT_MASK)


def test_v2_known_answers():
    from pecore.envelope import TAG_V2, tag, verify_tag

    master = MasterKey.from_seed(KAT_MASTER_SEED)
    cipher, metadata = seal(KAT_IMAGE, master, "kat-envelope-v2", label=3)
    assert np.array_equal(cipher, _kat_cipher(KAT_V2_CIPHER))
    tagged = tag(cipher, metadata, master, mask=KAT_MASK)
    assert (tagged.integrity_tag, tagged.tag_format) == (KAT_V2_TAG, TAG_V2)
    stored = CipherMetadata.model_validate_json(tagged.model_dump_json())
    verify_tag(cipher, stored, master, mask=KAT_MASK)
    cipher, metadata = seal(KAT_IMAGE, master, "kat-sidecar-v2")
    assert np.array_equal(cipher, _kat_cipher(KAT_V2_SIDECAR_CIPHER))
    assert tag(cipher, metadata, master).integrity_tag == KAT_V2_SIDECAR_TAG


V2_FIELD_CHANGES = {
    "image id": {"image_id": "kat-envelope-v3"},
    "role": {"role": "query", "label": None},
    "label": {"label": 2},
    "no label": {"label": None},
    "scheme": {"scheme": "27"},
    "key mode": {"key_mode": "same"},
    "key counter": {"key_counter": 1},
    "key check": {"key_check": "sha256:d3bcb37cedcf30d4"},
    "rescale": {"rescale": {"rule": "minmax-v1", "min": 53.0, "max": 4095.0, "source_dtype": "u"}},
    "tag format (downgrade to v1 service)": {"tag_format": "pecbir/integrity/v1"},
}


@pytest.mark.parametrize("change", sorted(V2_FIELD_CHANGES))
def test_the_v2_tag_covers_every_field(change):
    from pecore.envelope import TamperedError, tag, verify_tag

    master = MasterKey.from_seed(KAT_MASTER_SEED)
    cipher, metadata = seal(KAT_IMAGE, master, "kat-envelope-v2", label=3)
    stored = tag(cipher, metadata, master, mask=KAT_MASK).model_dump(mode="json")
    altered = CipherMetadata.model_validate({**stored, **V2_FIELD_CHANGES[change]})
    with pytest.raises(TamperedError, match="integrity check failed"):
        verify_tag(cipher, altered, master, mask=KAT_MASK)


def test_the_v2_tag_covers_cipher_and_mask_and_refuses_what_v1_would_not_cover():
    from pecore.envelope import TamperedError, tag, verify_tag

    master = MasterKey.from_seed(KAT_MASTER_SEED)
    cipher, metadata = seal(KAT_IMAGE, master, "kat-envelope-v2", label=3)
    tagged = tag(cipher, metadata, master, mask=KAT_MASK)
    flipped_cipher = cipher.copy()
    flipped_cipher[2, 3] ^= 1
    flipped_mask = KAT_MASK.copy()
    flipped_mask[0, 0] = True
    for bad_cipher, bad_mask in [
        (flipped_cipher, KAT_MASK),
        (cipher, flipped_mask),
        (cipher, None),  # the mask left out
        (cipher, KAT_MASK[:4]),
    ]:
        with pytest.raises(TamperedError, match="integrity check failed"):
            verify_tag(bad_cipher, tagged, master, mask=bad_mask)
    with pytest.raises(TamperedError, match="integrity check failed"):
        verify_tag(cipher, tag(cipher, metadata, master), master, mask=KAT_MASK)  # mask added
    with pytest.raises(TamperedError, match="encrypted under master key"):
        verify_tag(cipher, tagged, MasterKey.from_seed(KAT_MASTER_SEED + 1), mask=KAT_MASK)
    # A v1 sidecar tag never covered role and label, so a v1 sidecar carrying them is refused.
    v1 = CipherMetadata.model_validate_json(KAT_SIDECAR_V1_JSON)
    with pytest.raises(TamperedError, match="no role or label"):
        verify_tag(_kat_cipher(KAT_SIDECAR_V1_CIPHER), v1.model_copy(update={"label": 1}), master)


def test_query_records_carry_no_label():
    master = MasterKey.from_seed(KAT_MASTER_SEED)
    with pytest.raises(ValueError, match="query images carry no label"):
        seal(KAT_IMAGE, master, "q", role="query", label=1)
