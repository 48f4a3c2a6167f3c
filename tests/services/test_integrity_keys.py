"""Integrity before decryption, key hygiene, audited key release and master-key rotation.

Embedded system (filesystem store): single bits of stored cipher PNGs, masks and metadata are
flipped behind the gateway's back and every path that decrypts (encryptor API, its key release,
`pecbir-encryptor fetch`, `pecbir decrypt` of sidecars) must refuse and return nothing.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import stat
import struct
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pecbir_contracts.auth import ENCRYPTOR_TOKEN, mint_token
from pecbir_contracts.layout import CollectionLayout
from pecbir_contracts.png import decode_image_png, decode_mask_png, encode_png
from pecbir_harness.embedded import EmbeddedSystem
from pecore.cipher import to_uint8
from pecore.envelope import image_key_for
from pecore.keys import MasterKey
from tests.services.helpers import SMALL_MODEL, labelled_set, npy_bytes


def _upload(client, image, mask, label=None, collection="brain") -> dict:
    data = {"label": str(label), "train": "true"} if label is not None else {}
    answer = client.post(
        f"/v1/collections/{collection}/images",
        files={"image": ("x.npy", npy_bytes(image)), "mask": ("m.npy", npy_bytes(mask))},
        data=data,
    )
    assert answer.status_code == 202, answer.text
    return answer.json()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A full embedded run (upload, train, index, search, decrypt, key release), logs captured."""
    root = tmp_path_factory.mktemp("integrity")
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(level=logging.DEBUG)
    logger = logging.getLogger()
    previous = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    master = MasterKey.from_seed(11)
    try:
        with EmbeddedSystem(root, master=master) as system:
            images, masks, labels = labelled_set(12, seed=4)
            uploads = [
                _upload(system.encryptor, image, mask, label)
                for image, mask, label in zip(images, masks, labels, strict=True)
            ]
            trained = system.gateway.post("/v1/collections/brain/model/train", json=SMALL_MODEL)
            assert trained.status_code == 202, trained.text
            system.wait_searchable("brain", len(images))
            found = system.encryptor.post(
                "/v1/collections/brain/search",
                files={
                    "image": ("q.npy", npy_bytes(images[0])),
                    "mask": ("m.npy", npy_bytes(masks[0])),
                },
                data={"k": "3"},
            )
            assert found.status_code == 200, found.text
            for hit in found.json()["hits"]:
                assert system.encryptor.get(hit["plain_url"]).status_code == 200
            released = system.encryptor.post(
                "/v1/keys/release",
                json={"collection": "brain", "image_id": uploads[0]["upload"]["image_id"]},
            )
            assert released.status_code == 200, released.text
            yield {
                "system": system,
                "images": images,
                "masks": masks,
                "uploads": uploads,
                "records": records,
            }
    finally:
        logger.removeHandler(handler)
        logger.setLevel(previous)


# -- single-bit tampering -------------------------------------------------------------------------
def _flip_file_byte(data: bytes) -> bytes:
    """Flip one bit of a byte inside the PNG's IDAT payload that changes what it decodes to.

    (Some deflate bits do not matter to the decoded pixels; flipping those tampers nothing.)
    """
    from pecbir_contracts.png import InvalidImage

    original = np.asarray(Image.open(io.BytesIO(data)))
    start = data.index(b"IDAT") + 4 + 2  # past the chunk type and the zlib header
    for at in range(start, start + 64):
        flipped = data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]
        try:
            decoded = np.asarray(Image.open(io.BytesIO(flipped)))
        except (OSError, ValueError, InvalidImage):
            return flipped  # undecodable: tampering that must be refused too
        if not np.array_equal(decoded, original):
            return flipped
    raise AssertionError("no IDAT bit flip changed the image")


def _flip_cipher_pixel(data: bytes) -> bytes:
    array = decode_image_png(data).copy()
    array[20, 20] ^= 0x01
    return encode_png(array)


def _flip_mask_pixel(data: bytes) -> bytes:
    array = decode_mask_png(data).copy()
    array[0, 0] = ~array[0, 0]
    return encode_png(array)


def _meta_field(path: tuple[str, ...]):
    """Flip the lowest bit of the first character/digit of one metadata field."""

    def change(data: bytes) -> bytes:
        meta = json.loads(data)
        holder = meta
        for name in path[:-1]:
            holder = holder[name]
        value = holder[path[-1]]
        if isinstance(value, bool) or value is None:
            raise AssertionError(path)
        if isinstance(value, int):
            holder[path[-1]] = value ^ 1
        elif isinstance(value, float):
            (bits,) = struct.unpack("<Q", struct.pack("<d", value))
            holder[path[-1]] = struct.unpack("<d", struct.pack("<Q", bits ^ 1))[0]
        else:
            holder[path[-1]] = chr(ord(value[0]) ^ 1) + value[1:]
        return json.dumps(meta).encode()

    return change


TAMPERING = {
    "cipher PNG byte": ("cipher", _flip_file_byte),
    "cipher pixel bit": ("cipher", _flip_cipher_pixel),
    "mask PNG byte": ("mask", _flip_file_byte),
    "mask pixel": ("mask", _flip_mask_pixel),
    "metadata label": ("meta", _meta_field(("label",))),
    "metadata opaque id": ("meta", _meta_field(("opaque_id",))),
    "metadata rescale min": ("meta", _meta_field(("rescale", "max"))),
    "metadata key check": ("meta", _meta_field(("key", "check"))),
    "metadata key counter": ("meta", _meta_field(("key", "counter"))),
    "metadata tag": ("meta", _meta_field(("integrity", "tag"))),
}


@pytest.mark.parametrize("case", sorted(TAMPERING))
def test_a_flipped_bit_is_refused_by_every_decrypting_path(run, case, tmp_path, monkeypatch):
    from pecbir_encryptor import cli as encryptor_cli
    from pecbir_encryptor.integrity import IntegrityError

    system = run["system"]
    upload = run["uploads"][1]
    image_id = upload["upload"]["image_id"]
    layout = CollectionLayout(system.tenant, "brain")
    kind, change = TAMPERING[case]
    key = {"cipher": layout.cipher, "mask": layout.mask, "meta": layout.meta}[kind](image_id)
    original = system.store.get(key)
    tampered = change(original)
    assert tampered != original
    audit = system.root / "encryptor-audit.jsonl"
    audit_lines = len(audit.read_text().splitlines())
    system.store.put(key, tampered)
    try:
        # 1. encryptor API: decrypt
        answer = system.encryptor.get(f"/v1/collections/brain/images/{image_id}/plain")
        assert answer.status_code == 502, answer.text
        assert answer.headers["content-type"].startswith("application/json")
        detail = answer.json()["detail"]
        assert "integrity" in detail or "unreadable" in detail, detail
        # 2. encryptor API: key release refuses too (no key for an altered record)
        released = system.encryptor.post(
            "/v1/keys/release", json={"collection": "brain", "image_id": image_id}
        )
        assert released.status_code == 422, released.text
        assert "sslm" not in released.text
        # 3. the library call both use
        with pytest.raises(IntegrityError):
            system.encryptor_app.state.encryptor.fetch_plain("brain", image_id)
        # 4. `pecbir-encryptor fetch`
        monkeypatch.setattr(
            encryptor_cli, "_encryptor", lambda: system.encryptor_app.state.encryptor
        )
        out = tmp_path / "plain.npy"
        code = encryptor_cli.main(["fetch", image_id, "--collection", "brain", "--out", str(out)])
        assert code == 2 and not out.exists()
        outcomes = [json.loads(line) for line in audit.read_text().splitlines()[audit_lines:]]
        assert [r["outcome"] for r in outcomes if r.get("action") == "decrypt"] == ["refused"] * 2
        assert [r["outcome"] for r in outcomes if r.get("action") == "key-release"] == ["refused"]
    finally:
        system.store.put(key, original)
    expected, _ = to_uint8(run["images"][1])
    answer = system.encryptor.get(
        f"/v1/collections/brain/images/{image_id}/plain", params={"format": "npy"}
    )
    assert answer.status_code == 200
    np.testing.assert_array_equal(np.load(io.BytesIO(answer.content)), expected)


SIDECAR_TAMPERING = {
    "cipher pixel bit": lambda c, m: (_flip_cipher_pixel(c), m),
    "cipher PNG byte": lambda c, m: (_flip_file_byte(c), m),
    "rescale field": lambda c, m: (c, _meta_field(("rescale", "max"))(m)),
    "image id": lambda c, m: (c, _meta_field(("image_id",))(m)),
    "tag removed": lambda c, m: (c, json.dumps({**json.loads(m), "integrity_tag": None}).encode()),
}


@pytest.mark.parametrize("case", sorted(SIDECAR_TAMPERING))
def test_pecbir_decrypt_refuses_tampered_sidecar_pairs_and_writes_nothing(tmp_path, case, capsys):
    from pecbir.cli import main

    key = tmp_path / "owner.key"
    assert main(["keygen", "--out", str(key)]) == 0
    sources = []
    for i in range(2):
        path = tmp_path / f"s{i}.npy"
        np.save(path, labelled_set(2, seed=i)[0][i])
        sources.append(path)
    assert (
        main(["encrypt", *map(str, sources), "--key", str(key), "--out", str(tmp_path / "c")]) == 0
    )
    ciphers = sorted((tmp_path / "c").glob("*.png"))
    victim = ciphers[0]
    sidecar = victim.with_suffix(".json")
    cipher_bytes, meta_bytes = SIDECAR_TAMPERING[case](victim.read_bytes(), sidecar.read_bytes())
    victim.write_bytes(cipher_bytes)
    sidecar.write_bytes(meta_bytes)
    capsys.readouterr()
    code = main(["decrypt", *map(str, ciphers), "--key", str(key), "--out", str(tmp_path / "p")])
    assert code == 2
    err = capsys.readouterr().err
    assert "integrity" in err or "not a readable PNG" in err or "sidecar" in err, err
    assert not (tmp_path / "p").exists() or not any((tmp_path / "p").iterdir())


# -- key material ---------------------------------------------------------------------------------
def _key_strings(
    master: MasterKey, opaque_ids: list[tuple[str, str | None]], n_pixels: int
) -> dict[str, bytes]:
    secret = master.secret.get_secret_value()
    found = {
        "secret hex": secret.hex().encode(),
        "secret b64": base64.b64encode(secret),
        "secret b64url": base64.urlsafe_b64encode(secret).rstrip(b"="),
        "secret raw": secret,
    }
    for opaque_id, salt in opaque_ids:
        sslm = image_key_for(master, opaque_id, "per-image", n_pixels, salt=salt).sslm
        for name, value in [("x0", sslm.x0), *((f"r{i}", r) for i, r in enumerate(sslm.r))]:
            found[f"{opaque_id} {name} repr"] = repr(value).encode()
            found[f"{opaque_id} {name} 12 digits"] = f"{value:.12f}".encode()
            found[f"{opaque_id} {name} float64"] = struct.pack("<d", value)
    return found


def test_key_material_is_never_logged_nor_stored_in_the_cloud(run, capfd):
    system = run["system"]
    stored = [
        system.gateway.get(f"/v1/collections/brain/images/{u['upload']['image_id']}").json()
        for u in run["uploads"]
    ]
    opaque_ids = [(meta["opaque_id"], meta["key"].get("salt")) for meta in stored]
    n_pixels = int(np.prod(run["images"][0].shape))
    needles = _key_strings(system.master, opaque_ids, n_pixels)
    # The per-image parameters are really what this looks for: they are in the released key.
    released = system.encryptor.post(
        "/v1/keys/release",
        json={"collection": "brain", "image_id": run["uploads"][0]["upload"]["image_id"]},
    ).json()["key"]["sslm"]
    assert repr(released["x0"]).encode() == needles[f"{opaque_ids[0][0]} x0 repr"]
    logs = (
        "\n".join(f"{r.name} {r.getMessage()} {r.args!r}" for r in run["records"]).encode()
        + "".join(capfd.readouterr()).encode()
    )
    assert len(run["records"]) > 10, "the run logged nothing: this test would prove nothing"
    audit = (system.root / "encryptor-audit.jsonl").read_bytes()
    cloud_keys = system.store.list("")
    assert any(k.endswith("cipher.png") for k in cloud_keys)
    assert any("/models/" in k for k in cloud_keys) and any("/features/" in k for k in cloud_keys)
    cloud = b"".join(system.store.get(k) for k in cloud_keys)
    for name, needle in needles.items():
        assert needle not in logs, f"{name} appears in the logs"
        assert needle not in audit, f"{name} appears in the audit log"
        assert needle not in cloud, f"{name} is stored in the cloud"
    assert stat.S_IMODE(os.stat(system.root / "encryptor-audit.jsonl").st_mode) == 0o600


def test_master_key_files_are_0600_and_wider_ones_are_refused(tmp_path):
    from pecbir_encryptor.keyring import Keyring, rotate

    active = MasterKey.generate().save(tmp_path / "master.key")
    assert stat.S_IMODE(os.stat(active).st_mode) == 0o600
    old_id, new_id = rotate(active, tmp_path / "retired")
    assert old_id != new_id
    for path in (active, tmp_path / "retired" / f"{old_id}.key"):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    ring = Keyring.load(active, tmp_path / "retired")
    assert ring.active.key_id == new_id and ring.key_ids == sorted([old_id, new_id])
    os.chmod(active, 0o640)
    with pytest.raises(PermissionError, match="0600"):
        Keyring.load(active, tmp_path / "retired")


# -- key release ----------------------------------------------------------------------------------
def test_key_release_refuses_forged_expired_and_unscoped_tokens_and_audits_them(run):
    system = run["system"]
    image_id = run["uploads"][2]["upload"]["image_id"]
    body = {"collection": "brain", "image_id": image_id}
    user = dict(sub="mallory", tenant=system.tenant, kind=ENCRYPTOR_TOKEN)
    tokens = {
        "forged": (mint_token(b"x" * 32, scopes=("key-release",), **user), 401),
        "expired": (
            mint_token(
                system.user_secret.hex().encode(),
                scopes=("key-release",),
                ttl_s=60,
                now=time.time() - 3600,
                **user,
            ),
            401,
        ),
        "cloud token": (system.cloud_token(), 401),
        "alg none": (
            base64.urlsafe_b64encode(b'{"alg":"none"}').decode().rstrip("=")
            + "."
            + system.user_token().split(".")[1]
            + ".",
            401,
        ),
        "wrong scope": (system.user_token(scopes=("decrypt", "search")), 403),
        "other tenant": (
            mint_token(
                system.user_secret.hex().encode(),
                kind=ENCRYPTOR_TOKEN,
                sub="eve",
                tenant="hospital-b",
                scopes=("key-release",),
            ),
            403,
        ),
    }
    audit = system.root / "encryptor-audit.jsonl"
    for name, (token, status) in tokens.items():
        before = len(audit.read_text().splitlines())
        answer = system.encryptor.post(
            "/v1/keys/release", json=body, headers={"authorization": f"Bearer {token}"}
        )
        assert answer.status_code == status, (name, answer.text)
        assert "sslm" not in answer.text
        new = [json.loads(line) for line in audit.read_text().splitlines()[before:]]
        if status == 403:
            assert [r["outcome"] for r in new] == ["denied"], (name, new)
        else:
            # Refusals before authentication are counted, one line per interval at most.
            assert [r["outcome"] for r in new] in ([], ["unauthenticated"]), (name, new)
    before = len(audit.read_text().splitlines())
    missing = system.encryptor.post(
        "/v1/keys/release", json={"collection": "brain", "image_id": "0" * 32}
    )
    assert missing.status_code == 404
    new = [json.loads(line) for line in audit.read_text().splitlines()[before:]]
    assert [r["outcome"] for r in new] == ["refused"]


# -- rotation -------------------------------------------------------------------------------------
def test_rotation_keeps_old_images_decryptable_and_re_encrypts_nothing(run):
    from pecbir_encryptor.app import create_app
    from pecbir_encryptor.keyring import Keyring
    from pecbir_encryptor.settings import EncryptorSettings

    system = run["system"]
    old = system.master
    new = MasterKey.from_seed(12)
    old_upload = run["uploads"][3]
    old_id = old_upload["upload"]["image_id"]
    layout = CollectionLayout(system.tenant, "brain")
    cloud_before = {k: system.store.get(k) for k in system.store.list(layout.images_prefix)}

    def encryptor_with(keyring: Keyring) -> TestClient:
        app = create_app(
            EncryptorSettings(
                tenant=system.tenant,
                master_key=system.root / "unused.key",
                gateway_token=system.cloud_token(),
                user_token_secret=system.user_secret.hex(),
                audit_log=system.root / "encryptor-audit.jsonl",
            ),
            master=keyring,
            gateway_client=TestClient(system.gateway_app),
        )
        client = TestClient(app)
        client.headers["authorization"] = f"Bearer {system.user_token()}"
        return client

    rotated = encryptor_with(Keyring(new, [old]))
    assert rotated.get("/healthz").json()["key_id"] == new.key_id
    image, mask = labelled_set(13, seed=4)[0][12], labelled_set(13, seed=4)[1][12]
    fresh = _upload(rotated, image, mask, label=1)
    fresh_meta = system.gateway.get(f"/v1/collections/brain/images/{fresh['upload']['image_id']}")
    assert fresh_meta.json()["key"]["key_id"] == new.key_id
    assert fresh_meta.json()["integrity"]["key_id"] == new.key_id
    old_meta = system.gateway.get(f"/v1/collections/brain/images/{old_id}").json()
    assert old_meta["key"]["key_id"] == old.key_id

    for client_image_id, plain in [
        (old_id, run["images"][3]),
        (fresh["upload"]["image_id"], image),
    ]:
        answer = rotated.get(
            f"/v1/collections/brain/images/{client_image_id}/plain", params={"format": "npy"}
        )
        assert answer.status_code == 200, answer.text
        np.testing.assert_array_equal(np.load(io.BytesIO(answer.content)), to_uint8(plain)[0])
    # Nothing uploaded before the rotation was touched.
    for key, data in cloud_before.items():
        assert system.store.get(key) == data, key
    # Without the retired key the old images are refused (clearly), the new ones still open.
    forgetful = encryptor_with(Keyring(new))
    refused = forgetful.get(f"/v1/collections/brain/images/{old_id}/plain")
    assert refused.status_code == 502 and "keyring" in refused.json()["detail"]
    assert (
        forgetful.get(f"/v1/collections/brain/images/{fresh['upload']['image_id']}/plain")
    ).status_code == 200
    # The old encryptor (old key only) cannot open images made under the new key.
    stale = system.encryptor.get(
        f"/v1/collections/brain/images/{fresh['upload']['image_id']}/plain"
    )
    assert stale.status_code == 502


# -- stored records of earlier versions -----------------------------------------------------------
# A meta.json the encryptor of commit 33cc527 stored (integrity label pecbir/integrity/v1), with
# its cipher and mask: it must keep parsing, verifying and decrypting bit-exactly.
KAT_SERVICE_V1_IMAGE = np.array(
    [
        [2426, 2648, 3435, 1559, 53, 1312],
        [1393, 2964, 3240, 1420, 4094, 1319],
        [2448, 125, 3756, 3953, 231, 3453],
        [1462, 3032, 893, 2411, 1899, 1876],
        [3969, 1693, 595, 850, 3282, 2538],
    ],
    dtype=np.uint16,
)
KAT_SERVICE_V1_CIPHER = "3bffd55f004f55b87129d6749702eaf60bd759bcf52ca42fd8bf22688419"
KAT_SERVICE_V1_MASK = "000000000000000001010100000001010100000001010100000000000000"
KAT_SERVICE_V1_META = (
    '{"opaque_id":"kat-service-v1","role":"template","label":2,"height":5,"width":6,'
    '"rescale":{"rule":"minmax-v1","min":53.0,"max":4094.0,"source_dtype":"uint16"},'
    '"key":{"scheme":"ours","mode":"per-image","key_id":"bbfefafbdefe2cd6","counter":0,'
    '"check":"sha256:f0165799675abcfe"},"integrity":{"alg":"hmac-sha256",'
    '"key_id":"bbfefafbdefe2cd6",'
    '"tag":"7d2ac2afb4008bb924be3e07f3bc35967ece73b87a6069242076617a0f190c86"}}'
)

# A query record (no label) under the shared key derived from the master key, scheme 27.
KAT_SERVICE_V1_QUERY_CIPHER = "0b4f9a050b4411a978d02f7f98ad47b1ba5d00bcf5601a996e092b19f76a"
KAT_SERVICE_V1_QUERY_META = (
    '{"opaque_id":"kat-query-v1","role":"query","label":null,"height":5,"width":6,'
    '"rescale":{"rule":"minmax-v1","min":53.0,"max":4094.0,"source_dtype":"uint16"},'
    '"key":{"scheme":"27","mode":"same","key_id":"bbfefafbdefe2cd6","counter":0,'
    '"check":"sha256:4f72a3135ec7f91e"},"integrity":{"alg":"hmac-sha256",'
    '"key_id":"bbfefafbdefe2cd6",'
    '"tag":"d4e377cc7daac473a541fe06b979367b4d63a3e5b5ea2ef8c4e92e5a1008d67b"}}'
)


def _kat_service_v1(cipher_hex: str = KAT_SERVICE_V1_CIPHER, meta: str = KAT_SERVICE_V1_META):
    from pecbir_contracts.schemas import ImageMetadata

    shape = KAT_SERVICE_V1_IMAGE.shape
    cipher = np.frombuffer(bytes.fromhex(cipher_hex), np.uint8).reshape(shape)
    mask = np.frombuffer(bytes.fromhex(KAT_SERVICE_V1_MASK), np.uint8).reshape(shape) > 0
    return cipher, mask, ImageMetadata.model_validate_json(meta)


def test_a_stored_v1_record_still_verifies_and_decrypts():
    from pecbir_encryptor.core import Encryptor

    encryptor = Encryptor(MasterKey.from_seed(7), gateway=None)
    cipher, mask, metadata = _kat_service_v1()
    plain = encryptor.open(cipher, mask, metadata)
    np.testing.assert_array_equal(plain, to_uint8(KAT_SERVICE_V1_IMAGE)[0])
    assert encryptor.release_key(cipher, mask, metadata).check == metadata.key.check
    cipher, mask, query = _kat_service_v1(KAT_SERVICE_V1_QUERY_CIPHER, KAT_SERVICE_V1_QUERY_META)
    np.testing.assert_array_equal(
        encryptor.open(cipher, mask, query), to_uint8(KAT_SERVICE_V1_IMAGE)[0]
    )


def test_a_stored_v1_record_with_one_field_changed_is_refused():
    from pecbir_encryptor.core import Encryptor
    from pecbir_encryptor.integrity import IntegrityError

    encryptor = Encryptor(MasterKey.from_seed(7), gateway=None)
    cipher, mask, metadata = _kat_service_v1()
    relabelled = metadata.model_copy(update={"label": 1})
    with pytest.raises(IntegrityError, match="integrity check failed"):
        encryptor.open(cipher, mask, relabelled)
    flipped = mask.copy()
    flipped[0, 0] = True
    with pytest.raises(IntegrityError, match="integrity check failed"):
        encryptor.open(cipher, flipped, metadata)


# A meta.json of the v2 envelope tag (integrity.version 2), frozen when v2 was introduced.
KAT_SERVICE_V2_CIPHER = "8b4d9807004f55e9c956a9c92eb75df6c51259bc35ac74fff867cb32e07d"
KAT_SERVICE_V2_META = (
    '{"opaque_id":"kat-service-v2","role":"template","label":2,"height":5,"width":6,'
    '"rescale":{"rule":"minmax-v1","min":53.0,"max":4094.0,"source_dtype":"uint16"},'
    '"key":{"scheme":"ours","mode":"per-image","key_id":"bbfefafbdefe2cd6","counter":0,'
    '"check":"sha256:d2e95f224d43d595"},"integrity":{"alg":"hmac-sha256",'
    '"key_id":"bbfefafbdefe2cd6",'
    '"tag":"d75c2578ef04f845f58d1cd623520a06683709f0691dfb6a5f426c274964e6ac","version":2}}'
)


def test_new_records_get_the_v2_tag_and_match_its_known_answer():
    from pecbir_encryptor.core import Encryptor, protect_image

    master = MasterKey.from_seed(7)
    cipher, mask, stored = _kat_service_v1(KAT_SERVICE_V2_CIPHER, KAT_SERVICE_V2_META)
    protected = protect_image(
        KAT_SERVICE_V1_IMAGE, mask, master=master, opaque_id="kat-service-v2", label=2
    )
    np.testing.assert_array_equal(protected.cipher, cipher)
    assert protected.metadata == stored
    assert protected.metadata.model_dump_json() == KAT_SERVICE_V2_META
    plain = Encryptor(master, gateway=None).open(cipher, mask, stored)
    np.testing.assert_array_equal(plain, to_uint8(KAT_SERVICE_V1_IMAGE)[0])


def test_the_one_translation_is_lossless_both_ways():
    from pecbir_encryptor.wire import from_wire, to_wire

    for cipher_hex, meta in [
        (KAT_SERVICE_V1_CIPHER, KAT_SERVICE_V1_META),
        (KAT_SERVICE_V1_QUERY_CIPHER, KAT_SERVICE_V1_QUERY_META),
        (KAT_SERVICE_V2_CIPHER, KAT_SERVICE_V2_META),
    ]:
        _cipher, _mask, stored = _kat_service_v1(cipher_hex, meta)
        record = from_wire(stored)
        assert to_wire(record) == stored
        assert from_wire(to_wire(record)) == record
    untagged = from_wire(stored.model_copy(update={"integrity": None}))
    assert untagged.integrity_tag is None and to_wire(untagged).integrity is None


def test_the_translation_refuses_records_the_owner_cannot_have_made():
    from pecbir_encryptor.integrity import IntegrityError
    from pecbir_encryptor.wire import from_wire, to_wire
    from pecore.envelope import CipherMetadata

    _cipher, _mask, stored = _kat_service_v1()
    with pytest.raises(IntegrityError, match="8-bit conversion record"):
        from_wire(stored.model_copy(update={"rescale": None}))
    other_key = stored.integrity.model_copy(update={"key_id": "0" * 16})
    with pytest.raises(IntegrityError, match="tagged under"):
        from_wire(stored.model_copy(update={"integrity": other_key}))
    # A v1 sidecar tag covers no mask: it never goes to the cloud.
    sidecar = CipherMetadata.model_validate(
        {**from_wire(stored).model_dump(), "tag_format": None, "label": None}
    )
    with pytest.raises(ValueError, match="covers no mask"):
        to_wire(sidecar)


def test_benchmark_and_soak_uploads_carry_the_owner_tag():
    from pecbir_contracts.schemas import ImageMetadata
    from pecbir_encryptor.core import Encryptor
    from pecbir_harness.workload import seal_for_upload

    master = MasterKey.from_seed(7)
    images, masks, labels = labelled_set(1, seed=9)
    job = (master.secret.get_secret_value(), images[0], masks[0], "bench-00001", int(labels[0]))
    cipher_png, mask_png, meta_json, seconds = seal_for_upload(job)
    metadata = ImageMetadata.model_validate_json(meta_json)
    assert metadata.integrity is not None and metadata.integrity.version == 2
    assert metadata.label == int(labels[0]) and seconds > 0
    cipher, mask = decode_image_png(cipher_png), decode_mask_png(mask_png)
    plain = Encryptor(master, gateway=None).open(cipher, mask, metadata)
    np.testing.assert_array_equal(plain, to_uint8(images[0])[0])


def test_uploads_through_the_encryptor_are_stored_with_the_v3_tag(run):
    from pecbir_contracts.layout import image_id_for

    system = run["system"]
    image_id = run["uploads"][0]["upload"]["image_id"]
    stored = system.gateway.get(f"/v1/collections/brain/images/{image_id}").json()
    assert stored["integrity"]["version"] == 3
    assert len(stored["key"]["salt"]) == 32
    # The cloud's id of an identity-bound record is a public function of where it is.
    assert image_id == image_id_for(system.tenant, "brain", stored["opaque_id"])
