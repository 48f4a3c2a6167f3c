"""The page's "open in viewer" links (issue 16): a hit that came as DICOM links to the
hospital's DICOMweb viewer by its Study/Series/SOP Instance UIDs, which the hospital keeps
(sealed, `pecbir_encryptor.dicom_refs`) and the cloud never gets; any other hit has no link.

One hospital on an embedded cloud, 12 images: 4 by STOW-RS with their SEGs, 2 by STOW-RS
whose SEGs come in a later request, 2 DICOM files on the REST ingest and 4 PNGs.
"""

from __future__ import annotations

import html
import re

import numpy as np
import pytest

from pecbir_encryptor.dicom_refs import DicomRef, check_viewer_template, viewer_link
from pecbir_harness.dicom import dicom_bytes, make_mr, make_seg, multipart_related
from pecbir_harness.embedded import EmbeddedSystem
from pecore.cipher import to_uint8
from pecore.keys import MasterKey
from tests.services.helpers import SMALL_MODEL, labelled_set
from tests.services.test_web_ui import _png, _sign_in

TEMPLATE = (
    "https://viewer.example/viewer?StudyInstanceUIDs={study}"
    "&SeriesInstanceUIDs={series}&sop={instance}&c={collection}"
)
CLASSES = {1: "meningioma", 2: "glioma", 3: "pituitary"}


def _ref(mr) -> tuple[str, str, str]:
    return str(mr.StudyInstanceUID), str(mr.SeriesInstanceUID), str(mr.SOPInstanceUID)


def _stow(client, parts: list[bytes]) -> int:
    body, content_type = multipart_related(parts)
    answer = client.post(
        "/dicomweb/brain/studies", content=body, headers={"content-type": content_type}
    )
    assert answer.status_code in (200, 202), answer.text
    return answer.status_code


@pytest.fixture(scope="module")
def dicom_world(tmp_path_factory):
    root = tmp_path_factory.mktemp("web-ui-viewer")
    # every image of "brain" is a training template (STOW pushes name no template flag)
    with EmbeddedSystem(
        root,
        master=MasterKey.from_seed(19),
        viewer_url=TEMPLATE,
        template_collections=frozenset({"brain"}),
    ) as system:
        encryptor = system.encryptor_app.state.context.encryptor
        client = system.encryptor
        images, masks, labels = labelled_set(12, seed=5)
        expected: dict[str, tuple[str, str, str] | None] = {}
        # STOW-RS, each image with its SEG in one request
        parts, mrs = [], []
        for i in range(4):
            mr = make_mr(images[i], bits_stored=12)
            mrs.append(mr)
            seg = make_seg(masks[i], mr, label=CLASSES[labels[i]])
            parts += [dicom_bytes(mr), dicom_bytes(seg)]
        assert _stow(client, parts) == 200
        # STOW-RS, the image first (it waits), its SEG in a later request
        for i in (4, 5):
            mr = make_mr(images[i], bits_stored=12)
            mrs.append(mr)
            assert _stow(client, [dicom_bytes(mr)]) == 202  # stored, waiting for its SEG
            _stow(client, [dicom_bytes(make_seg(masks[i], mr, label=CLASSES[labels[i]]))])
        for mr in mrs:
            expected[encryptor.image_id_of("brain", str(mr.SOPInstanceUID))] = _ref(mr)
        # the REST ingest: DICOM files, then PNGs
        for i in range(6, 12):
            mask = ("mask.png", _png(masks[i].astype(np.uint8) * 255))
            if i < 8:
                mr = make_mr(images[i], bits_stored=12)
                image, ref = ("slice.dcm", dicom_bytes(mr)), _ref(mr)
            else:
                image, ref = ("slice.png", _png(to_uint8(images[i])[0])), None
            answer = client.post(
                "/v1/collections/brain/images",
                files={"image": image, "mask": mask},
                data={"label": str(labels[i])},
            )
            assert answer.status_code == 202, answer.text
            expected[answer.json()["upload"]["image_id"]] = ref
        assert len(expected) == 12
        trained = system.gateway.post("/v1/collections/brain/model/train", json=SMALL_MODEL)
        assert trained.status_code == 202, trained.text
        system.wait_searchable("brain", 12)
        query_images, query_masks, _ = labelled_set(1, seed=98)
        query = {
            "image": ("q.png", _png(to_uint8(query_images[0])[0])),
            "mask": ("m.png", _png(query_masks[0].astype(np.uint8) * 255)),
        }
        yield {
            "system": system,
            "expected": expected,
            "query": query,
            "root": root,
            "first": mrs[0],
        }


def test_a_dicom_hit_links_to_the_viewer_by_its_uids_and_no_other_hit_does(dicom_world):
    from fastapi.testclient import TestClient

    system = dicom_world["system"]
    with TestClient(system.encryptor_app, base_url="http://testserver") as client:
        _sign_in(client, system.user_token())
        csrf = re.search(r'name="csrf" value="([^"]+)"', client.get("/ui/").text).group(1)
        answer = client.post(
            "/ui/search",
            files=dicom_world["query"],
            data={"k": "12", "hospital": "hospital-a", "csrf": csrf},
            follow_redirects=False,
        )
        assert answer.status_code == 303, answer.text
        location = answer.headers["location"]
        assert 'class="viewer"' not in client.get(location).text  # pending: no link yet
        links = {}
        for rank in range(1, 13):
            tile = client.get(f"{location}/hits/{rank}").text
            assert 'data-state="shown"' in tile, tile
            image_id = re.search(r'data-image-id="([0-9a-f]+)"', tile).group(1)
            found = re.findall(r'class="viewer" href="([^"]+)"', tile)
            links[image_id] = html.unescape(found[0]) if found else None
    expected = dicom_world["expected"]
    assert set(links) == set(expected)
    for image_id, ref in expected.items():
        if ref is None:
            assert links[image_id] is None, image_id  # a PNG upload: no DICOM instance
        else:
            study, series, instance = ref
            assert links[image_id] == TEMPLATE.format(
                study=study, series=series, instance=instance, collection="brain"
            ), image_id
    assert sum(link is not None for link in links.values()) == 8


def test_no_dicom_uid_reaches_the_cloud_or_lies_in_plain_at_the_hospital(dicom_world):
    uids = {uid for ref in dicom_world["expected"].values() if ref for uid in ref}
    root = dicom_world["root"]
    store = [p for p in (root / "store").rglob("*") if p.is_file()]
    refs = [p for p in (root / "dicom-refs").rglob("*") if p.is_file()]
    assert store and len(refs) == 8
    for path in store + refs:
        data = path.read_bytes()
        assert not any(uid.encode() in data for uid in uids), path


def test_an_instance_sent_again_gets_its_uids_noted_again(dicom_world):
    """An image stored before its UIDs were kept (here: its file removed) is noted when the
    PACS sends it again, though nothing else happens."""
    system, mr = dicom_world["system"], dicom_world["first"]
    encryptor = system.encryptor_app.state.context.encryptor
    image_id = encryptor.image_id_of("brain", str(mr.SOPInstanceUID))
    path = dicom_world["root"] / "dicom-refs" / "brain" / f"{image_id}.ref"
    path.unlink()
    assert encryptor.dicom_refs.get("brain", image_id) is None
    assert _stow(system.encryptor, [dicom_bytes(mr)]) == 200  # in the cloud already
    assert encryptor.dicom_refs.get("brain", image_id) == DicomRef(*_ref(mr))


def test_a_ref_opens_only_under_its_own_name(tmp_path):
    import shutil

    from pecbir_encryptor.dicom_refs import DicomRefs
    from pecbir_encryptor.keyring import Keyring

    refs = DicomRefs(tmp_path, Keyring(MasterKey.from_seed(19)), "hospital-a")
    ref = DicomRef("1.2.3", "1.2.3.4", "1.2.3.4.5")
    refs.put("brain", "a" * 32, ref)
    assert refs.get("brain", "a" * 32) == ref
    assert refs.get("brain", "b" * 32) is None
    shutil.copy(tmp_path / "brain" / f"{'a' * 32}.ref", tmp_path / "brain" / f"{'b' * 32}.ref")
    assert refs.get("brain", "b" * 32) is None  # moved to another image's name: refused
    assert refs.get("other", "a" * 32) is None


def test_viewer_templates_are_checked_and_filled_with_quoted_values():
    from pydantic import ValidationError

    from pecbir_encryptor.settings import EncryptorSettings

    for bad, message in (
        ("javascript:alert(1)//{study}", "http(s) URL"),
        ("https://viewer.example/?s={patient}", "unknown"),
        ("https://viewer.example/?s={0}", "unknown"),
        ("https://viewer.example/?s={study", "viewer URL"),
    ):
        with pytest.raises(ValueError, match=re.escape(message)):
            check_viewer_template(bad)
    with pytest.raises(ValidationError, match="http"):
        EncryptorSettings(
            tenant="t",
            master_key="k",
            gateway_token="g",
            user_token_secret="s",
            viewer_url="ftp://viewer.example/{study}",
        )
    ref = DicomRef("1.2.840.1", "1.2.840.2", "1.2.840.3")
    assert viewer_link(None, "brain", ref) is None
    assert viewer_link(TEMPLATE, "brain", None) is None
    assert viewer_link("https://v.example/s/{study}?c={collection}", "brain", ref) == (
        "https://v.example/s/1.2.840.1?c=brain"
    )
    with pytest.raises(ValueError, match="not a DICOM UID"):
        DicomRef("1.2&x=3", "1.2", "1.3")
