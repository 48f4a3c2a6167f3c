"""A real PACS (Debian's Orthanc + its DICOMweb plugin) pushing to the encryptor (issue 14):
over STOW-RS with Orthanc's own ``/dicom-web/servers/<name>/stow`` (HTTP basic with a PACS
account), and over DIMSE with ``/modalities/<name>/store`` (the encryptor's C-STORE SCP);
images first and their SEG later, one compressed (JPEG-LS, as DCMTK writes it); Orthanc's
job succeeds and the images become searchable. Skips where Orthanc cannot start, fails on CI.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from pecbir.cli import main
from pecbir_contracts.layout import image_id_for
from pecbir_encryptor.credentials import PacsCredentials
from pecbir_encryptor.dimse import DimseConfig, start_scp
from pecbir_harness.dicom import ENCODINGS, dicom_bytes, encode, make_mr, make_seg
from pecbir_harness.embedded import EmbeddedSystem, served
from pecbir_harness.orthanc import OrthancUnavailable, orthanc
from pecbir_harness.procs import free_port
from pecore.keys import MasterKey
from tests.services.helpers import SMALL_MODEL, labelled_set, npy_bytes

pytestmark = pytest.mark.integration
JPEG_LS = next(e for e in ENCODINGS if e.name == "jpeg-ls")


def _unavailable(reason: str):
    if os.environ.get("CI") == "true":
        pytest.fail(f"Orthanc is required on CI and did not start: {reason}", pytrace=False)
    pytest.skip(f"no Orthanc for the PACS tests: {reason}")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The embedded cloud with a trained model, its encryptor on real HTTP and DIMSE, and an
    Orthanc configured to push to both."""
    root = tmp_path_factory.mktemp("orthanc-site")
    with EmbeddedSystem(root / "system", master=MasterKey.from_seed(14)) as system:
        images, masks, labels = labelled_set(18, seed=6)
        for image, mask, label in zip(images, masks, labels, strict=True):
            answer = system.encryptor.post(
                "/v1/collections/brain/images",
                files={"image": ("x.npy", npy_bytes(image)), "mask": ("m.npy", npy_bytes(mask))},
                data={"label": str(label), "train": "true"},
            )
            assert answer.status_code == 202, answer.text
        trained = system.gateway.post("/v1/collections/brain/model/train", json=SMALL_MODEL)
        assert trained.status_code == 202, trained.text
        system.wait_searchable("brain", 18)
        credentials = system.encryptor_app.state.context.settings.pacs_credentials
        _, api_key = PacsCredentials(credentials, system.tenant).create("orthanc-test")
        dimse_port = free_port()
        scp = start_scp(
            system.encryptor_app.state.encryptor,
            DimseConfig(
                port=dimse_port,
                host="127.0.0.1",
                ae_title="PECBIR",
                allowed=frozenset({"ORTHANC"}),
                collection="brain",
            ),
            max_pixels=1024 * 1024,
        )
        try:
            with served(system.encryptor_app) as url:
                try:
                    pacs_cm = orthanc(
                        root / "orthanc",
                        stow_url=f"{url}/dicomweb/brain/",
                        stow_user="orthanc-test",
                        stow_password=api_key,
                        scp=("PECBIR", dimse_port),
                    )
                    pacs = pacs_cm.__enter__()
                except OrthancUnavailable as exc:
                    _unavailable(str(exc))
                try:
                    yield system, pacs
                finally:
                    pacs_cm.__exit__(None, None, None)
        finally:
            scp.shutdown()


def _study(seed: int, encoding=None):
    """An MR slice (optionally re-encoded by a real encoder) and its SEG, as file bytes."""
    from pecore.io import open_dicom

    images, masks, _ = labelled_set(1, seed=seed)
    data = dicom_bytes(make_mr(images[0].astype(np.uint16), bits_stored=12))
    if encoding is not None:
        data = encode(data, encoding)
    source = open_dicom(data)
    return data, dicom_bytes(make_seg(masks[0], source, label="meningioma")), source


def _searchable(system, uid: str, n: int) -> None:
    encryptor = system.encryptor_app.state.encryptor
    image_id = image_id_for(system.tenant, "brain", encryptor.opaque_id_for(uid))
    system.wait_searchable("brain", n)
    status = system.gateway.get(f"/v1/collections/brain/images/{image_id}/status").json()
    assert status["state"] == "searchable", status


def test_orthanc_pushes_over_stow_rs_images_first_and_the_seg_later(site):
    system, pacs = site
    image, seg, source = _study(70, JPEG_LS)
    plain, plain_seg, plain_source = _study(71)
    # The images first (a study as acquired), pushed by Orthanc's own STOW-RS client.
    first = [pacs.upload(image)["ParentStudy"], pacs.upload(plain)["ParentStudy"]]
    job = pacs.run_job("/dicom-web/servers/pecbir/stow", first)
    assert job["State"] == "Success", job
    # Their SEGs later, in another push: they pair and the images become searchable.
    later = [pacs.upload(seg)["ID"], pacs.upload(plain_seg)["ID"]]
    job = pacs.run_job("/dicom-web/servers/pecbir/stow", later)
    assert job["State"] == "Success", job
    _searchable(system, source.SOPInstanceUID, 20)
    _searchable(system, plain_source.SOPInstanceUID, 20)


def test_orthanc_pushes_over_dimse(site):
    system, pacs = site
    image, seg, source = _study(72)
    study = pacs.upload(image)["ParentStudy"]
    pacs.upload(seg)
    job = pacs.run_job("/modalities/pecbir/store", [study])
    assert job["State"] == "Success", job
    _searchable(system, source.SOPInstanceUID, 21)


def test_a_revoked_pacs_key_fails_orthanc_s_job_with_the_reason(site, capsys):
    system, pacs = site
    credentials = system.encryptor_app.state.context.settings.pacs_credentials
    image, seg, _ = _study(73)
    study = pacs.upload(image)["ParentStudy"]
    pacs.upload(seg)
    assert main(["token", "revoke", "--account", "orthanc-test",
                 "--credentials", str(credentials)]) == 0  # fmt: skip
    job = pacs.run_job("/dicom-web/servers/pecbir/stow", [study])
    assert job["State"] == "Failure", job
    # Orthanc (HttpVerbose) logs the answer's headers: the reason is there, not only "401".
    log = pacs.log.read_text(errors="replace").lower()
    assert "x-pecbir-reason: pacs api key" in log and "was revoked" in log, log[-3000:]
