"""Image I/O (PNG, NPY, DICOM) and the owner-side seal/unseal envelope."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pecore.cipher import to_uint8
from pecore.envelope import CipherMetadata, seal, unseal
from pecore.io import png_bytes, read_dicom, read_image, read_png, write_image
from pecore.keys import MasterKey
from tests.dicom_factory import make_dicom


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
    path = make_dicom(tmp_path / "slice.dcm", pixels, bits_stored=bits)
    array, dataset = read_dicom(path)
    assert np.array_equal(array, pixels)
    assert dataset.PatientName == "Doe^Jane"
    assert np.array_equal(read_image(path), pixels)


def test_dicom_errors(tmp_path):
    with pytest.raises(ValueError, match="not a readable DICOM"):
        read_dicom(b"\x00" * 128 + b"DICM" + b"\x01\x02")
    whole = make_dicom(tmp_path / "ok.dcm", np.ones((64, 64), np.uint16)).read_bytes()
    with pytest.raises(ValueError, match="DICOM"):
        read_dicom(whole[: len(whole) - 5000])
    path = make_dicom(tmp_path / "m1.dcm", np.zeros((4, 4), np.uint16), photometric="MONOCHROME1")
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
