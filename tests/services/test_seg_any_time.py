"""SEG at any time (issue 14): an image without its DICOM SEG is stored at the hospital and
acknowledged with a warning; the SEG pairs with it whenever it comes (another request, either
order, replayed, after a restart); unlabelled images become searchable once a model exists."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from fastapi.testclient import TestClient

from pecbir_contracts.layout import image_id_for
from pecbir_harness.embedded import EmbeddedSystem
from pecore.cipher import to_uint8
from pecore.keys import MasterKey
from tests.services.helpers import (
    SMALL_MODEL,
    dicom_bytes,
    labelled_set,
    make_seg,
    mr_with_seg,
    multipart_related,
    npy_bytes,
)

STORED, FAILED = "00081199", "00081198"
UID, WARNING, COMMENT, REASON, URL = "00081155", "00081196", "00000902", "00081197", "00081190"


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    root = tmp_path_factory.mktemp("seg-any-time")
    with EmbeddedSystem(root, master=MasterKey.from_seed(11)) as running:
        images, masks, labels = labelled_set(18, seed=2)
        for image, mask, label in zip(images, masks, labels, strict=True):
            answer = running.encryptor.post(
                "/v1/collections/brain/images",
                files={"image": ("x.npy", npy_bytes(image)), "mask": ("m.npy", npy_bytes(mask))},
                data={"label": str(label), "train": "true"},
            )
            assert answer.status_code == 202, answer.text
        trained = running.gateway.post("/v1/collections/brain/model/train", json=SMALL_MODEL)
        assert trained.status_code == 202, trained.text
        running.wait_searchable("brain", 18)
        yield running


def _stow(client, datasets) -> tuple[int, dict[str, dict], dict[str, dict]]:
    body, content_type = multipart_related([dicom_bytes(d) for d in datasets])
    answer = client.post(
        "/dicomweb/brain/studies", content=body, headers={"content-type": content_type}
    )
    assert answer.status_code in (200, 202, 409), answer.text
    response = answer.json()
    stored = {i[UID]["Value"][0]: i for i in response.get(STORED, {}).get("Value", [])}
    failed = {i[UID]["Value"][0]: i for i in response.get(FAILED, {}).get("Value", [])}
    return answer.status_code, stored, failed


def _pair(seed: int, label: str = "glioma"):
    return mr_with_seg(100 + seed, label)


def _image_id(system, dataset) -> str:
    encryptor = system.encryptor_app.state.encryptor
    return image_id_for(system.tenant, "brain", encryptor.opaque_id_for(dataset.SOPInstanceUID))


def _state(system, dataset) -> str | None:
    answer = system.gateway.get(f"/v1/collections/brain/images/{_image_id(system, dataset)}/status")
    return answer.json()["state"] if answer.status_code == 200 else None


def _restarted(system) -> TestClient:
    """A fresh encryptor app on the same disk (pending store, audit log) and key: a restart."""
    from pecbir_encryptor.app import create_app

    settings = system.encryptor_app.state.context.settings
    app = create_app(settings, master=system.master, gateway_client=TestClient(system.gateway_app))
    client = TestClient(app)
    client.headers["authorization"] = f"Bearer {system.user_token()}"
    return client


def _pending_files(system) -> list[bytes]:
    folder = system.root / "pending" / "brain"
    return [p.read_bytes() for p in folder.glob("*.sealed")] if folder.exists() else []


def test_image_first_then_its_seg_after_a_restart(system):
    image, seg, pixels, _ = _pair(0)
    status, stored, failed = _stow(system.encryptor, [image])
    assert status == 202 and not failed
    entry = stored[image.SOPInstanceUID]
    assert entry[WARNING]["Value"] == [0xB000] and URL not in entry
    assert "SEG" in entry[COMMENT]["Value"][0]
    assert _state(system, image) is None  # nothing in the cloud yet
    # What waits is sealed: no header value, no pixel run in the clear.
    waiting = b"".join(_pending_files(system))
    assert waiting and b"Doe^Jane" not in waiting and image.SOPInstanceUID.encode() not in waiting
    assert pixels.astype(np.uint16).tobytes()[:64] not in waiting

    restarted = _restarted(system)
    status, stored, failed = _stow(restarted, [seg])
    assert status == 200 and not failed, (stored, failed)
    assert WARNING not in stored[seg.SOPInstanceUID]
    assert _pending_files(system) == []
    system.wait_searchable("brain", 19)
    assert _state(system, image) == "searchable"
    plain = system.encryptor.get(
        f"/v1/collections/brain/images/{_image_id(system, image)}/plain", params={"format": "npy"}
    )
    assert plain.status_code == 200, plain.text
    expected, _ = to_uint8(pixels.astype(np.uint16))
    np.testing.assert_array_equal(np.load(io.BytesIO(plain.content)), expected)


def test_seg_first_then_its_image_and_a_replayed_seg(system):
    image, seg, _, _ = _pair(1)
    status, stored, _ = _stow(system.encryptor, [seg])
    assert status == 202 and stored[seg.SOPInstanceUID][WARNING]["Value"] == [0xB000]
    status, stored, failed = _stow(system.encryptor, [image])
    assert status == 200 and not failed
    assert URL in stored[image.SOPInstanceUID]
    assert _state(system, image) in ("indexed", "searchable")
    # The same SEG again: nothing to do, stored.
    status, stored, failed = _stow(system.encryptor, [seg])
    assert status == 200 and not failed
    # The image again, alone: already stored, nothing waits.
    status, stored, failed = _stow(system.encryptor, [image])
    assert status == 200 and URL in stored[image.SOPInstanceUID]
    assert _pending_files(system) == []


def test_an_image_whose_seg_has_no_class_is_searchable_not_trained_on(system):
    image, seg, _, _ = _pair(2, label="tumour")
    status, stored, failed = _stow(system.encryptor, [image, seg])
    assert status == 202 and not failed
    entry = stored[image.SOPInstanceUID]
    assert entry[WARNING]["Value"] == [0xB000] and "class label" in entry[COMMENT]["Value"][0]
    assert URL in entry
    image_id = _image_id(system, image)
    assert system.gateway.get(f"/v1/collections/brain/images/{image_id}").json()["label"] is None
    system.wait_searchable("brain", 21)
    assert _state(system, image) == "searchable"


def test_the_two_halves_at_once_pair_exactly_once(system):
    for round_ in range(3):
        image, seg, _, _ = _pair(10 + round_)
        answers: list[int] = []

        def push(datasets, into):
            into.append(_stow(system.encryptor, datasets)[0])

        threads = [threading.Thread(target=push, args=([d], answers)) for d in (image, seg)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        # One of the two waited (202), the other paired them (200); nothing is left waiting.
        assert sorted(answers) == [200, 202], answers
        assert _pending_files(system) == []
        assert _state(system, image) in ("indexed", "searchable")


def _retrieve(client, url: str):
    """A WADO-RS retrieve: the one DICOM instance of the multipart answer."""
    import pydicom

    from pecbir_encryptor.dicom import parse_multipart_related

    answer = client.get(url)
    assert answer.status_code == 200, answer.text
    ((headers, part),) = parse_multipart_related(answer.headers["content-type"], answer.content)
    assert headers["content-type"] == "application/dicom"
    return answer, pydicom.dcmread(io.BytesIO(part))


def test_answers_a_pacs_can_act_on_and_wado_rs_retrieve(system):
    image, seg, pixels, _ = _pair(20)
    body, content_type = multipart_related(
        [dicom_bytes(image), dicom_bytes(seg), b"not a dicom file"]
    )
    answer = system.encryptor.post(
        "/dicomweb/brain/studies", content=body, headers={"content-type": content_type}
    )
    assert answer.status_code == 202, answer.text
    # The gist in a header (what Orthanc's log shows), the details per instance in the body.
    reason = answer.headers["x-pecbir-reason"]
    assert reason.startswith("1 of 3 instances failed (0xC000): not a readable DICOM file")
    assert answer.headers["warning"].startswith('299 pecbir "1 of 3')
    stored = {i[UID]["Value"][0]: i for i in answer.json()[STORED]["Value"]}
    url = stored[image.SOPInstanceUID][URL]["Value"][0]
    assert url.endswith(
        f"/dicomweb/brain/studies/{image.StudyInstanceUID}/series/{image.SeriesInstanceUID}"
        f"/instances/{image.SOPInstanceUID}"
    )
    retrieved, dataset = _retrieve(system.encryptor, url)
    assert retrieved.headers["x-pecbir-image-id"] == _image_id(system, image)
    np.testing.assert_array_equal(dataset.pixel_array, to_uint8(pixels.astype(np.uint16))[0])
    assert dataset.SOPInstanceUID == image.SOPInstanceUID
    assert dataset.LossyImageCompression == "01"  # pe: the 8-bit rule
    assert str(dataset.PatientName) == "" and "InstitutionName" not in dataset
    # Another hospital's instance (or none): 404; not a UID: 422; no decrypt scope: 403.
    base = url.rsplit("/", 1)[0]
    assert system.encryptor.get(f"{base}/1.2.3.4").status_code == 404
    assert system.encryptor.get(f"{base}/1.2.x").status_code == 422
    reader = {"authorization": f"Bearer {system.user_token(scopes=('search',))}"}
    assert system.encryptor.get(url, headers=reader).status_code == 403
    # All well: no reason header.
    again = system.encryptor.post(
        "/dicomweb/brain/studies",
        content=multipart_related([dicom_bytes(image), dicom_bytes(seg)])[0],
        headers={"content-type": content_type},
    )
    assert again.status_code == 200 and "x-pecbir-reason" not in again.headers


def test_a_corrected_seg_makes_a_new_version_served_once_searchable(system):
    image, seg, pixels, mask = _pair(30)
    assert _stow(system.encryptor, [image, seg])[0] == 200
    n = system.wait_searchable("brain", 1)["n_vectors"]
    old_id = _image_id(system, image)
    encryptor = system.encryptor_app.state.encryptor
    corrected_mask = np.roll(mask, 3, axis=1)
    corrected = make_seg(corrected_mask, image)
    status, stored, failed = _stow(system.encryptor, [corrected])
    assert status == 202 and not failed
    assert "new version" in stored[corrected.SOPInstanceUID][COMMENT]["Value"][0]
    system.wait_searchable("brain", n + 1)
    # The new version is served: WADO-RS by the same UIDs opens it, with the new mask; the
    # old one's hits are dropped at the hospital, though the cloud still holds it.
    url = (
        f"/dicomweb/brain/studies/{image.StudyInstanceUID}/series/{image.SeriesInstanceUID}"
        f"/instances/{image.SOPInstanceUID}"
    )
    retrieved, dataset = _retrieve(system.encryptor, url)
    new_id = retrieved.headers["x-pecbir-image-id"]
    assert new_id != old_id
    np.testing.assert_array_equal(encryptor.fetch_plain("brain", new_id).mask, corrected_mask)
    np.testing.assert_array_equal(dataset.pixel_array, to_uint8(pixels.astype(np.uint16))[0])
    assert old_id in encryptor.retired_versions("brain")
    # the new version is the same DICOM instance for the page's viewer link (issue 16)
    assert encryptor.dicom_refs.get("brain", new_id) == encryptor.dicom_refs.get("brain", old_id)
    assert encryptor.dicom_refs.get("brain", new_id).instance == image.SOPInstanceUID
    answer = system.encryptor.post(
        "/v1/collections/brain/search",
        files={"image": ("q.npy", npy_bytes(pixels)), "mask": ("m.npy", npy_bytes(mask))},
        data={"k": "50"},
    )
    assert answer.status_code == 200, answer.text
    hits = [hit["image_id"] for hit in answer.json()["hits"]]
    assert new_id in hits and old_id not in hits
    assert [hit["rank"] for hit in answer.json()["hits"]] == list(range(1, len(hits) + 1))
    # The corrected SEG again: a replay, nothing new.
    status, stored, failed = _stow(system.encryptor, [corrected])
    assert status == 200 and not failed
