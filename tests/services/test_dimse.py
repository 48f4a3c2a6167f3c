"""DIMSE in (issue 14): the encryptor's C-STORE / C-ECHO SCP, driven by pynetdicom's SCU on
loopback: AE allow-list, association limit, per-instance statuses, the same ingest path as
STOW-RS (an image and its SEG in separate C-STOREs pair; a compressed syntax is decoded)."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from pydicom import dcmread

from pecbir_contracts.layout import image_id_for
from pecbir_encryptor.dimse import DimseConfig, start_scp
from pecbir_harness.dicom import ENCODINGS, encode, make_mr, missing_encoders
from pecbir_harness.embedded import EmbeddedSystem
from pecbir_harness.procs import free_port
from pecore.keys import MasterKey
from tests.services.helpers import dicom_bytes, labelled_set, make_seg

pynetdicom = pytest.importorskip("pynetdicom")

AE_TITLE, PACS = "PECBIR", "ORTHANC"
MR, SEG = "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture(scope="module")
def scp(tmp_path_factory):
    # The PACS cannot mark templates: by the owner's policy its collection's uploads are.
    with EmbeddedSystem(
        tmp_path_factory.mktemp("dimse"),
        master=MasterKey.from_seed(13),
        template_collections=frozenset({"brain"}),
    ) as system:
        encryptor = system.encryptor_app.state.encryptor
        port = free_port()
        config = DimseConfig(
            port=port,
            host="127.0.0.1",
            ae_title=AE_TITLE,
            allowed=frozenset({PACS}),
            collection="brain",
            max_associations=1,
        )
        server = start_scp(encryptor, config, max_pixels=1024 * 1024)
        try:
            yield system, port
        finally:
            server.shutdown()


def _associate(port: int, calling: str = PACS, called: str = AE_TITLE):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    for sop_class in (MR, SEG):
        ae.add_requested_context(sop_class, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    # One context per compressed syntax: an SCP accepts one syntax per context.
    ae.add_requested_context(MR, ["1.2.840.10008.1.2.4.80"])
    return ae.associate("127.0.0.1", port, ae_title=called)


def _associate_when_free(port: int):
    """An association, once the SCP's previous ones have ended (their threads finish after
    the release): the limit counts live associations."""
    deadline = time.monotonic() + 20
    while True:
        assoc = _associate(port)
        if assoc.is_established or time.monotonic() > deadline:
            return assoc
        time.sleep(0.2)


def _store(assoc, data: bytes):
    status = assoc.send_c_store(dcmread(io.BytesIO(data)))
    comment = str(status.get("ErrorComment", "")) if status else ""
    return (int(status.Status) if status else None), comment


def test_echo_and_who_may_associate(scp):
    _, port = scp
    assoc = _associate(port)
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    stranger = _associate(port, calling="STRANGER")
    assert stranger.is_rejected  # not on the allow-list
    wrong_called = _associate(port, called="NOTPECBIR")
    assert wrong_called.is_rejected


def test_association_limit(scp):
    _, port = scp
    first = _associate_when_free(port)
    assert first.is_established
    second = _associate(port)
    assert not second.is_established  # max_associations=1
    first.release()
    third = _associate_when_free(port)
    assert third.is_established
    third.release()


def test_c_store_statuses_and_pairing_across_c_stores(scp):
    system, port = scp
    images, masks, _ = labelled_set(2, seed=50)
    image = make_mr(images[0].astype(np.uint16), bits_stored=12)
    seg = make_seg(masks[0], image, label="glioma")
    assoc = _associate_when_free(port)
    assert assoc.is_established
    try:
        # The image first: stored, waiting for its SEG (warning).
        status, comment = _store(assoc, dicom_bytes(image))
        assert status == 0xB000 and "SEG" in comment
        # Its SEG in a later C-STORE: paired and uploaded.
        assert _store(assoc, dicom_bytes(seg)) == (0x0000, "")
        # Too large for the encryptor: cannot understand, saying why.
        big = make_mr(np.zeros((1100, 1000), np.uint16), bits_stored=12)
        status, comment = _store(assoc, dicom_bytes(big))
        assert status == 0xC000 and "exceeds the limit" in comment
        # A compressed syntax, as a real encoder wrote it, with its SEG.
        jpeg_ls = next(e for e in ENCODINGS if e.name == "jpeg-ls")
        if not missing_encoders((jpeg_ls,)):
            other = make_mr(images[1].astype(np.uint16), bits_stored=12)
            assert _store(assoc, encode(dicom_bytes(other), jpeg_ls))[0] == 0xB000
            assert _store(assoc, dicom_bytes(make_seg(masks[1], other)))[0] == 0x0000
    finally:
        assoc.release()
    encryptor = system.encryptor_app.state.encryptor
    image_id = image_id_for(system.tenant, "brain", encryptor.opaque_id_for(image.SOPInstanceUID))
    record = system.gateway.get(f"/v1/collections/brain/images/{image_id}")
    assert record.status_code == 200 and record.json()["label"] == 2  # glioma, from the SEG
    # its UIDs stay at the hospital, for the page's viewer link (issue 16)
    ref = encryptor.dicom_refs.get("brain", image_id)
    assert (ref.study, ref.series, ref.instance) == (
        image.StudyInstanceUID,
        image.SeriesInstanceUID,
        image.SOPInstanceUID,
    )
    audit = (system.root / "encryptor-audit.jsonl").read_text()
    assert '"action": "c-store"' in audit and '"calling": "ORTHANC"' in audit


def _self_signed(folder):
    """A throw-away certificate and key for 127.0.0.1 (PEM files)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pecbir-test-scp")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert, private = folder / "scp.pem", folder / "scp.key"
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert, private


def test_tls_association_and_a_plain_one_refused(scp, tmp_path):
    import ssl

    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    system, _ = scp
    cert, key = _self_signed(tmp_path)
    port = free_port()
    server = start_scp(
        system.encryptor_app.state.encryptor,
        DimseConfig(
            port=port,
            host="127.0.0.1",
            ae_title=AE_TITLE,
            allowed=frozenset({PACS}),
            collection="brain",
            tls_cert=cert,
            tls_key=key,
        ),
        max_pixels=1024 * 1024,
    )
    try:
        client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
        ae = AE(ae_title=PACS)
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE, tls_args=(client, "127.0.0.1"))
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        # Without TLS the SCP does not even get to the association.
        plain = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
        assert not plain.is_established
    finally:
        server.shutdown()


def test_the_app_runs_the_scp_for_its_lifetime_when_a_port_is_set(scp):
    from fastapi.testclient import TestClient

    from pecbir_encryptor.app import create_app

    system, _ = scp
    port = free_port()
    settings = system.encryptor_app.state.context.settings.model_copy(
        update={
            "dimse_port": port,
            "dimse_host": "127.0.0.1",
            "dimse_allowed_aes": frozenset({PACS}),
        }
    )
    app = create_app(settings, master=system.master, gateway_client=TestClient(system.gateway_app))
    with TestClient(app):  # startup: the SCP listens
        assoc = _associate(port)
        assert assoc.is_established and assoc.send_c_echo().Status == 0x0000
        assoc.release()
    assert not _associate(port).is_established  # shutdown: it stopped
