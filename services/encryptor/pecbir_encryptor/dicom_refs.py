"""Which DICOM instance a cloud image is: its Study, Series and SOP Instance UIDs, at the
hospital only.

The cloud names an image by an opaque id (a keyed pseudonym of its SOP Instance UID, hashed
with tenant and collection); it gets no DICOM attribute, so a search hit says nothing a
DICOMweb viewer could open. The hospital writes the UIDs here when a DICOM instance is
ingested (STOW-RS, DIMSE C-STORE, or a DICOM file on the REST ingest) and the radiologist's
page reads them back to link a hit to a viewer (`viewer_link`).

One file per image, ``<directory>/<collection>/<image id>.ref``, written atomically; its
content is AES-256-GCM under a key derived (HKDF-SHA256, a label of its own) from the owner's
master key named in the file, with tenant, collection and image id as associated data: the
UIDs are not readable from the disk without the key, and a file moved to another image's
name does not open.
"""

from __future__ import annotations

import base64
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from string import Formatter
from urllib.parse import quote, urlsplit

from pecbir_contracts.layout import check_image_id, check_name

__all__ = ["DicomRef", "DicomRefs", "check_viewer_template", "viewer_link"]

_HKDF_INFO = b"pecbir/dicom-refs/v1"
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
# The placeholders a viewer URL template may use.
VIEWER_FIELDS = frozenset({"study", "series", "instance", "collection"})


@dataclass(frozen=True)
class DicomRef:
    """A DICOM instance's UIDs.

    Attributes
    ----------
    study, series, instance
        Study, Series and SOP Instance UIDs.
    """

    study: str
    series: str
    instance: str

    def __post_init__(self) -> None:
        for name, uid in (("study", self.study), ("series", self.series)):
            if len(uid) > 64 or not _UID.match(uid):
                raise ValueError(f"{name} UID {uid[:70]!r} is not a DICOM UID")
        if len(self.instance) > 64 or not _UID.match(self.instance):
            raise ValueError(f"SOP Instance UID {self.instance[:70]!r} is not a DICOM UID")

    @classmethod
    def of(cls, dataset: object) -> DicomRef | None:
        """The UIDs of a pydicom dataset; None when one is missing or malformed."""
        try:
            return cls(
                str(getattr(dataset, "StudyInstanceUID", "")),
                str(getattr(dataset, "SeriesInstanceUID", "")),
                str(getattr(dataset, "SOPInstanceUID", "")),
            )
        except ValueError:
            return None


class DicomRefs:
    """Image id → `DicomRef` of this hospital's DICOM-ingested images, sealed in files.

    Parameters
    ----------
    directory
        Where the files are (a volume that survives restarts, as the pending pairs').
    keyring
        The owner's keyring: files are sealed under its active key and opened with the one
        they name (a key rotation in between is fine).
    tenant
        The tenant the files are bound to.
    """

    def __init__(self, directory: Path, keyring, tenant: str | None) -> None:
        self.directory = Path(directory)
        self.keyring = keyring  # pecbir_encryptor.keyring.Keyring
        self.tenant = tenant or "-"

    def _path(self, collection: str, image_id: str) -> Path:
        check_name(collection, "collection")
        check_image_id(image_id)
        return self.directory / collection / f"{image_id}.ref"

    def _aad(self, collection: str, image_id: str) -> bytes:
        return "\x00".join([_HKDF_INFO.decode(), self.tenant, collection, image_id]).encode()

    @staticmethod
    def _aead(master):  # -> cryptography's AESGCM
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF

        secret = master.secret.get_secret_value()
        key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_HKDF_INFO).derive(secret)
        return AESGCM(key)

    def put(self, collection: str, image_id: str, ref: DicomRef) -> None:
        """Record that cloud image `image_id` of `collection` is the instance `ref`."""
        path = self._path(collection, image_id)
        master = self.keyring.active
        nonce = os.urandom(12)
        plain = json.dumps(
            {"study": ref.study, "series": ref.series, "instance": ref.instance}
        ).encode()
        sealed = self._aead(master).encrypt(nonce, plain, self._aad(collection, image_id))
        body = {
            "key_id": master.key_id,
            "nonce": base64.b64encode(nonce).decode(),
            "sealed": base64.b64encode(sealed).decode(),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        staged = path.with_name(f".{path.name}.{os.getpid()}.new")
        staged.write_text(json.dumps(body))
        os.replace(staged, path)

    def get(self, collection: str, image_id: str) -> DicomRef | None:
        """The instance of `image_id`, or None (not ingested as DICOM here, or unreadable)."""
        from cryptography.exceptions import InvalidTag

        try:
            body = json.loads(self._path(collection, image_id).read_text())
        except (FileNotFoundError, ValueError):
            return None
        try:
            master = self.keyring.get(str(body["key_id"]))
            plain = self._aead(master).decrypt(
                base64.b64decode(body["nonce"]),
                base64.b64decode(body["sealed"]),
                self._aad(collection, image_id),
            )
            return DicomRef(**json.loads(plain))
        except (KeyError, TypeError, ValueError, InvalidTag):
            return None

    def copy(self, collection: str, source_id: str, target_id: str) -> None:
        """Give `target_id` (a new version of an image) the instance of `source_id`, if any."""
        ref = self.get(collection, source_id)
        if ref is not None:
            self.put(collection, target_id, ref)


def check_viewer_template(template: str) -> str:
    """`template` if it is an http(s) URL whose placeholders are among `VIEWER_FIELDS`.

    Raises
    ------
    ValueError
        Another scheme, no host, or an unknown or positional placeholder.
    """
    parts = urlsplit(template)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"viewer URL {template[:80]!r}: expected an http(s) URL with a host")
    try:
        fields = {name for _, name, _, _ in Formatter().parse(template) if name is not None}
    except ValueError as exc:
        raise ValueError(f"viewer URL {template[:80]!r}: {exc}") from None
    unknown = fields - VIEWER_FIELDS
    if unknown:
        raise ValueError(
            f"viewer URL placeholders {sorted(unknown)} unknown; use {sorted(VIEWER_FIELDS)}"
        )
    return template


def viewer_link(template: str | None, collection: str, ref: DicomRef | None) -> str | None:
    """The viewer URL of an instance (`template` filled, values URL-quoted), or None when no
    viewer is configured or the image did not come as DICOM."""
    if not template or ref is None:
        return None
    values = {
        "study": ref.study,
        "series": ref.series,
        "instance": ref.instance,
        "collection": collection,
    }
    return template.format(**{k: quote(v, safe="") for k, v in values.items()})
