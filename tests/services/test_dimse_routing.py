"""DIMSE routing (issue 14): a calling AE title mapped to a collection of the encryptor's
tenant sends its C-STOREs there; an allowed AE without a mapping goes to the default; a
mapped AE may associate, one neither allowed nor mapped may not; a bad mapping stops the
service with one line naming the variable."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
from pydicom import dcmread

from pecbir_contracts.layout import image_id_for
from pecbir_encryptor.dimse import DimseConfig, start_scp
from pecbir_harness.embedded import EmbeddedSystem
from pecbir_harness.procs import free_port
from pecore.keys import MasterKey
from tests.services.helpers import dicom_bytes, mr_with_seg

pynetdicom = pytest.importorskip("pynetdicom")

AE_TITLE = "PECBIR"
MR, SEG = "1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.66.4"


@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    root = tmp_path_factory.mktemp("dimse-routing")
    with EmbeddedSystem(root, master=MasterKey.from_seed(21)) as system:
        port = free_port()
        config = DimseConfig(
            port=port,
            host="127.0.0.1",
            ae_title=AE_TITLE,
            allowed=frozenset({"ORTHANC"}),
            collection="brain",
            collections={"MR3T": "neuro", "RESEARCH": "study-42"},
        )
        server = start_scp(system.encryptor_app.state.encryptor, config, max_pixels=1024 * 1024)
        try:
            yield system, port
        finally:
            server.shutdown()


def _associate(port: int, calling: str):
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    for sop_class in (MR, SEG):
        ae.add_requested_context(sop_class, ["1.2.840.10008.1.2.1"])
    return ae.associate("127.0.0.1", port, ae_title=AE_TITLE)


def _push_pair(port: int, calling: str, seed: int) -> str:
    """Send one image and its SEG from `calling`; the image's SOP Instance UID."""
    image, seg, _, _ = mr_with_seg(seed)
    assoc = _associate(port, calling)
    assert assoc.is_established, f"{calling} could not associate"
    try:
        for data in (dicom_bytes(image), dicom_bytes(seg)):
            status = assoc.send_c_store(dcmread(io.BytesIO(data)))
            assert int(status.Status) in (0x0000, 0xB000), status
    finally:
        assoc.release()
    return str(image.SOPInstanceUID)


def _held_in(system, collection: str, uid: str) -> bool:
    encryptor = system.encryptor_app.state.encryptor
    image_id = image_id_for(system.tenant, collection, encryptor.opaque_id_for(uid))
    return system.gateway.get(f"/v1/collections/{collection}/images/{image_id}").status_code == 200


def test_a_mapped_ae_stores_into_its_collection_only(routed):
    system, port = routed
    uid = _push_pair(port, "MR3T", seed=71)
    assert _held_in(system, "neuro", uid)
    assert not _held_in(system, "brain", uid)
    assert not _held_in(system, "study-42", uid)
    audit = (system.root / "encryptor-audit.jsonl").read_text()
    assert '"calling": "MR3T", "collection": "neuro"' in audit


def test_an_allowed_unmapped_ae_stores_into_the_default(routed):
    system, port = routed
    uid = _push_pair(port, "ORTHANC", seed=72)
    assert _held_in(system, "brain", uid)
    assert not _held_in(system, "neuro", uid)


def test_who_may_associate_is_the_allow_list_and_the_mapping(routed):
    _, port = routed
    for calling in ("ORTHANC", "MR3T", "RESEARCH"):
        assoc = _associate(port, calling)
        assert assoc.is_established, calling
        assoc.release()
    stranger = _associate(port, "STRANGER")
    assert stranger.is_rejected


@pytest.mark.parametrize(
    ("collections", "problem"),
    [
        ({"MR3T": "Not A Name"}, "invalid collection"),
        ({"A_TITLE_OF_17_CHR": "brain"}, "1 to 16 characters"),
        ({"BACK\\SLASH": "brain"}, "no backslash"),
    ],
)
def test_a_bad_mapping_is_refused(collections, problem):
    with pytest.raises(ValueError, match=problem):
        DimseConfig(
            port=1, ae_title=AE_TITLE, allowed=frozenset(), collection="brain",
            collections=collections,
        )  # fmt: skip


def test_a_bad_mapping_in_the_environment_stops_the_service_naming_it(tmp_path):
    code = (
        "from pecbir_platform.config import settings_from_env\n"
        "from pecbir_encryptor.settings import EncryptorSettings\n"
        "settings_from_env(EncryptorSettings)\n"
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "PECBIR_ENCRYPTOR_TENANT": "hospital-a",
        "PECBIR_ENCRYPTOR_MASTER_KEY": str(tmp_path / "master.key"),
        "PECBIR_ENCRYPTOR_GATEWAY_TOKEN": "x",
        "PECBIR_ENCRYPTOR_USER_TOKEN_SECRET": "y",
        "PECBIR_ENCRYPTOR_DIMSE_AE_COLLECTIONS": '{"MR3T": "Neuro Dept"}',
    }
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "PECBIR_ENCRYPTOR_DIMSE_AE_COLLECTIONS" in lines[0]
    assert "invalid collection" in lines[0]
