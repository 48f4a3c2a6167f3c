"""What a PACS sends: every common transfer syntax, written by real encoders (DCMTK, GDCM,
OpenJPH), decoded through pydicom's pixel handlers; lossy input sealed with a lossy mark."""

from __future__ import annotations

import os

import numpy as np
import pytest

from pecbir_contracts.layout import image_id_for
from pecbir_encryptor.dicom import parse_multipart_related
from pecbir_harness.dicom import (
    ENCODINGS,
    Encoding,
    dicom_bytes,
    encode,
    make_mr,
    make_seg,
    missing_encoders,
    multipart_related,
    synthetic_slice,
)
from pecbir_harness.embedded import EmbeddedSystem
from pecore.io import dicom_is_lossy, open_dicom, read_dicom
from pecore.keys import MasterKey
from tests.services.helpers import labelled_set, npy_bytes

SEALED = "sealed-brain"
BY_NAME = {e.name: e for e in ENCODINGS}


def _need(encodings: tuple[Encoding, ...]) -> None:
    """Skip (fail on CI) where an encoder is not installed: .ci/run installs all of them."""
    missing = missing_encoders(encodings)
    if not missing:
        return
    reason = (
        f"encoders not installed: {', '.join(missing)} (apt: dcmtk libgdcm-tools openjph-tools)"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


@pytest.mark.parametrize("encoding", ENCODINGS, ids=lambda e: e.name)
def test_each_transfer_syntax_decodes_as_it_was_encoded(encoding: Encoding):
    _need((encoding,))
    pixels = synthetic_slice(encoding.bits_stored)
    data = encode(dicom_bytes(make_mr(pixels, bits_stored=encoding.bits_stored)), encoding)
    decoded, dataset = read_dicom(data)
    assert str(dataset.file_meta.TransferSyntaxUID) == encoding.syntax
    assert decoded.shape == pixels.shape and decoded.dtype.isnative
    assert dicom_is_lossy(dataset) is not encoding.lossless
    if encoding.lossless:
        np.testing.assert_array_equal(decoded, pixels)
    else:
        # Lossy, but the same image: mean error below 1 % of the range.
        error = np.abs(decoded.astype(np.float64) - pixels).mean()
        assert 0 < error < 0.01 * ((1 << encoding.bits_stored) - 1), error


def test_lossy_mark_follows_the_file_not_only_the_syntax():
    dataset = make_mr(synthetic_slice(12), bits_stored=12)
    assert not dicom_is_lossy(dataset)
    dataset.LossyImageCompression = "01"  # compressed lossily once, uncompressed now
    assert dicom_is_lossy(dataset)
    dataset.file_meta.TransferSyntaxUID = BY_NAME["j2k"].syntax  # may be lossy...
    dataset.LossyImageCompression = "00"  # ...but the file says it was reversible
    assert not dicom_is_lossy(dataset)
    del dataset.LossyImageCompression  # says nothing: taken as lossy
    assert dicom_is_lossy(dataset)
    dataset.file_meta.TransferSyntaxUID = BY_NAME["jpeg-baseline"].syntax
    dataset.LossyImageCompression = "00"  # baseline JPEG is lossy whatever the file says
    assert dicom_is_lossy(dataset)


def test_an_undecodable_syntax_is_refused_naming_it():
    from pydicom.encaps import encapsulate

    dataset = make_mr(synthetic_slice(12), bits_stored=12)
    dataset.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])  # an MPEG-2 stream
    dataset["PixelData"].VR = "OB"
    dataset.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: no pixel codec
    with pytest.raises(ValueError, match=r"cannot decode DICOM pixel data \(MPEG2"):
        read_dicom(dicom_bytes(dataset))


@pytest.fixture(scope="module")
def sealed_system(tmp_path_factory):
    with EmbeddedSystem(
        tmp_path_factory.mktemp("syntaxes"),
        master=MasterKey.from_seed(31),
        sealed_collections=frozenset({SEALED}),
    ) as system:
        images, masks, _ = labelled_set(8, seed=4)
        published = system.encryptor.post(
            f"/v1/collections/{SEALED}/patch-model",
            files=[("images", (f"{i}.npy", npy_bytes(im))) for i, im in enumerate(images)]
            + [("masks", (f"{i}.npy", npy_bytes(m))) for i, m in enumerate(masks)],
            data={"n_components": "4", "n_regions": "2", "patch_size": "5", "radius": "2"},
        )
        assert published.status_code == 201, published.text
        yield system


def test_stow_of_compressed_images_seals_them_exactly_and_marks_the_lossy_one(sealed_system):
    lossless, lossy = BY_NAME["jpeg-ls"], BY_NAME["jpeg-extended"]
    _need((lossless, lossy))
    system = sealed_system
    _, masks, _ = labelled_set(2, seed=9)
    parts, sources = [], {}
    for seed, encoding in enumerate((lossless, lossy)):
        pixels = synthetic_slice(12, seed=seed, shape=masks[seed].shape)
        encoded = encode(dicom_bytes(make_mr(pixels, bits_stored=12)), encoding)
        # The SEG references the instance as encoded: DCMTK gives a lossy copy a new UID.
        source = open_dicom(encoded)
        parts += [encoded, dicom_bytes(make_seg(masks[seed], source))]
        sources[encoding.name] = (source.SOPInstanceUID, pixels)
    body, content_type = multipart_related(parts)
    answer = system.encryptor.post(
        f"/dicomweb/{SEALED}/studies", content=body, headers={"content-type": content_type}
    )
    assert answer.status_code == 200, answer.text
    encryptor = system.encryptor_app.state.encryptor
    # WADO-RS gives the sealed image back exactly, marked lossy where it was.
    for item in answer.json()["00081199"]["Value"]:
        if "00081190" not in item:
            continue  # the SEGs
        uid = item["00081155"]["Value"][0]
        retrieved = system.encryptor.get(item["00081190"]["Value"][0])
        assert retrieved.status_code == 200, retrieved.text
        ((_, part),) = parse_multipart_related(retrieved.headers["content-type"], retrieved.content)
        dataset = open_dicom(part)
        name = next(n for n, (u, _) in sources.items() if u == uid)
        assert (getattr(dataset, "LossyImageCompression", "") == "01") is (name == lossy.name)
        if name == lossless.name:
            np.testing.assert_array_equal(dataset.pixel_array, sources[name][1])
    for name, (uid, pixels) in sources.items():
        image_id = image_id_for(system.tenant, SEALED, encryptor.opaque_id_for(uid))
        opened = encryptor.fetch_plain(SEALED, image_id)
        blob = encryptor.gateway.sealed(SEALED, image_id, owner=None)
        contents = _open(encryptor, SEALED, image_id, opened, blob)
        if name == lossless.name:
            np.testing.assert_array_equal(opened.image, pixels)  # bit-exact through JPEG-LS
            assert "lossy" not in contents
        else:
            assert contents.get("lossy") is True
            assert not np.array_equal(opened.image, pixels)


def _open(encryptor, collection, image_id, opened, blob) -> dict:
    """The private metadata inside a sealed blob (opened at the hospital)."""
    from pecore.sealing import SealedIdentity, open_sealed

    identity = SealedIdentity(
        tenant=encryptor.tenant, collection=collection, image_id=opened.record.opaque_id
    )
    return open_sealed(blob, encryptor.master, identity).metadata


def test_bench_dicom_measures_every_syntax_it_can_encode():
    from pecbir.commands.bench_dicom import measure, table

    rows = measure(size=32, repeats=1)
    assert [row["name"] for row in rows] == [e.name for e in ENCODINGS]
    for row, encoding in zip(rows, ENCODINGS, strict=True):
        if "skipped" in row:
            continue
        assert row["lossy_marked"] is not encoding.lossless
        assert (row["max_abs_error"] == 0) is encoding.lossless
        assert row["decode_ms_median"] > 0
    assert table(rows).count("\n") == len(rows) + 1
