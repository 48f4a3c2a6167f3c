"""Halves of an image ↔ SEG pair that arrived without the other, kept at the hospital.

A PACS sends the images of a study when they are acquired and their DICOM SEG tumour masks
when someone has segmented them: minutes or weeks later, in another request, in any order.
Whichever half comes first waits here until the other arrives; then the pair is protected and
uploaded as if it had come in one request.

What waits is only what the pair needs: an image's pixels (with its role, label and lossy
mark), a SEG's mask (with its label); never a DICOM header. Each is one file, sealed with
AES-256-GCM under the owner's master key (`pecore.sealing`, bound to tenant, collection and
kind), written atomically and fsync'ed before the PACS is told it was stored, so a restart
loses nothing. File names are the keyed pseudonym of the image's SOP Instance UID (the same
opaque id the cloud gets), never the UID itself.

Deciding whether the other half is here and, if not, leaving this one is done under a lock
file per collection (`fcntl.flock`), so two requests carrying the two halves at the same time
(in one process or several sharing the directory) cannot both decide to wait.

A half whose other never comes (an image nobody segments, a SEG of an image deleted at the
PACS) expires: `expire` removes halves older than a time to live (a re-sent half starts its
clock again), under the same lock, so a pair completing at that moment is never half-removed.
`pecbir_encryptor.janitor` runs it periodically; `status` says what waits and for how long.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from pecore.sealing import SealedIdentity, open_sealed, read_header, seal_image

__all__ = ["Expired", "MaskVersion", "PendingImage", "PendingMask", "PendingPairs"]

Kind = Literal["image", "mask"]
_NAME = re.compile(r"^(image|mask)-([0-9a-f]{32})\.sealed$")


@dataclass(frozen=True)
class PendingImage:
    """An image waiting for its SEG.

    Attributes
    ----------
    pixels
        The decoded pixels, as the PACS sent them.
    role, label, lossy
        Its role and the label the request gave (None: the SEG's), whether it was lossy.
    """

    pixels: np.ndarray
    role: str
    label: int | None
    lossy: bool


@dataclass(frozen=True)
class PendingMask:
    """A SEG's mask waiting for the image it references.

    Attributes
    ----------
    mask
        The mask (union of the SEG's segments).
    label
        The class its segment label names, or None.
    """

    mask: np.ndarray
    label: int | None


@dataclass(frozen=True)
class MaskVersion:
    """The versions in the cloud of an image whose SEG was corrected.

    Attributes
    ----------
    number
        The newest version's number (the first upload is 1).
    current
        The cloud id of the version served (found by search, opened by WADO-RS).
    candidate
        The cloud id of a newer version not yet searchable, or None.
    retired
        Cloud ids of versions replaced: their hits are dropped at the hospital.
    """

    number: int
    current: str
    candidate: str | None
    retired: tuple[str, ...]


@dataclass(frozen=True)
class Expired:
    """A waiting half removed because its other half did not come in time.

    Attributes
    ----------
    collection, kind
        Where it waited and what it was ("image" or "mask").
    key
        Its file's pseudonym (the keyed pseudonym of the image's SOP Instance UID).
    age_s
        How long it had waited.
    """

    collection: str
    kind: Kind
    key: str
    age_s: float


class PendingPairs:
    """The waiting halves of image ↔ SEG pairs, sealed in files under `directory`.

    Parameters
    ----------
    directory
        Where they wait (``<directory>/<collection>/{image,mask}-<key>.sealed``); a volume
        of its own in a deployment (it must survive restarts).
    keyring
        The owner's keyring: new files are sealed under its active key and opened with the
        key their header names (a rotation in between is fine).
    tenant
        The tenant the files are bound to.
    key_of
        The keyed pseudonym of a SOP Instance UID (`Encryptor.opaque_id_for`).
    """

    def __init__(
        self,
        directory: Path,
        keyring,  # pecbir_encryptor.keyring.Keyring
        tenant: str | None,
        key_of: Callable[[str], str],
    ) -> None:
        self.directory = Path(directory)
        self.keyring = keyring
        self.tenant = tenant or "-"
        self.key_of = key_of

    # -- files --------------------------------------------------------------------------------
    def _path(self, collection: str, kind: Kind, uid: str) -> Path:
        return self.directory / collection / f"{kind}-{self.key_of(uid)}.sealed"

    def _identity(self, collection: str, kind: Kind, uid: str) -> SealedIdentity:
        return SealedIdentity(
            tenant=self.tenant, collection=collection, image_id=f"pending-{kind}-{self.key_of(uid)}"
        )

    def _write(self, path: Path, blob: bytes) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        staged = path.with_name(f".{path.name}.{os.getpid()}.new")
        with open(staged, "wb") as handle:
            handle.write(blob)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staged, path)
        # The rename itself must survive a crash before the PACS is told "stored".
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def _read(self, collection: str, kind: Kind, uid: str):  # -> SealedContents | None
        path = self._path(collection, kind, uid)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        master = self.keyring.get(read_header(blob).wrap.key_id)
        return open_sealed(blob, master, self._identity(collection, kind, uid))

    @contextlib.contextmanager
    def locked(self, collection: str) -> Iterator[None]:
        """Hold the collection's lock (across processes sharing `directory`)."""
        folder = self.directory / collection
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / ".lock", "a+b") as handle:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    # -- images -------------------------------------------------------------------------------
    def put_image(self, collection: str, uid: str, image: PendingImage) -> None:
        """Keep an image until its SEG comes (replaces a waiting one of the same UID)."""
        metadata = {"role": image.role, "label": image.label, "lossy": image.lossy}
        blob = seal_image(
            image.pixels,
            None,
            self.keyring.active,
            self._identity(collection, "image", uid),
            metadata=metadata,
        )
        self._write(self._path(collection, "image", uid), blob)

    def image(self, collection: str, uid: str) -> PendingImage | None:
        """The image of `uid` waiting in `collection`, or None."""
        contents = self._read(collection, "image", uid)
        if contents is None:
            return None
        meta = contents.metadata
        label = meta.get("label")
        return PendingImage(
            contents.image,
            str(meta.get("role", "template")),
            int(label) if label is not None else None,
            bool(meta.get("lossy", False)),
        )

    # -- masks --------------------------------------------------------------------------------
    def put_mask(self, collection: str, uid: str, mask: PendingMask) -> None:
        """Keep a SEG's mask until the image `uid` comes (a later SEG replaces it)."""
        blob = seal_image(
            np.asarray(mask.mask, dtype=np.uint8),
            None,
            self.keyring.active,
            self._identity(collection, "mask", uid),
            metadata={"label": mask.label},
        )
        self._write(self._path(collection, "mask", uid), blob)

    def mask(self, collection: str, uid: str) -> PendingMask | None:
        """The mask waiting for image `uid` in `collection`, or None."""
        contents = self._read(collection, "mask", uid)
        if contents is None:
            return None
        label = contents.metadata.get("label")
        return PendingMask(contents.image.astype(bool), int(label) if label is not None else None)

    # -- mask versions (a corrected SEG) ------------------------------------------------------
    def _versions_path(self, collection: str) -> Path:
        return self.directory / collection / "versions.json"

    def _versions(self, collection: str) -> dict[str, dict]:
        import json

        try:
            return json.loads(self._versions_path(collection).read_text())
        except FileNotFoundError:
            return {}

    def _save_versions(self, collection: str, records: dict[str, dict]) -> None:
        import json

        self._write(self._versions_path(collection), json.dumps(records, sort_keys=True).encode())

    def version(self, collection: str, uid: str) -> MaskVersion | None:
        """The versions of image `uid` when its SEG was ever corrected, else None."""
        record = self._versions(collection).get(self.key_of(uid))
        if record is None:
            return None
        return MaskVersion(
            record["number"], record["current"], record["candidate"], tuple(record["retired"])
        )

    def add_candidate(self, collection: str, uid: str, first: str, number: int, new: str) -> None:
        """Record version `number` (cloud id `new`) of image `uid`, first uploaded as `first`;
        it is served once searchable (`promote`). Call under `locked`."""
        records = self._versions(collection)
        key = self.key_of(uid)
        record = records.get(key, {"number": 1, "current": first, "candidate": None, "retired": []})
        if record["candidate"] is not None:
            # A correction of a correction not yet searchable: the older candidate is retired.
            record["retired"].append(record["candidate"])
        record.update(number=number, candidate=new)
        records[key] = record
        self._save_versions(collection, records)

    def unsettled(self, collection: str) -> list[tuple[str, str]]:
        """(retired cloud id, the cloud id that replaced it) of versions retired here but not
        yet in the cloud."""
        pairs = []
        for record in self._versions(collection).values():
            done = set(record.get("cloud_retired", []))
            pairs += [(i, record["current"]) for i in record["retired"] if i not in done]
        return pairs

    def settle(self, collection: str, cloud_ids: Collection[str]) -> None:
        """Record that the cloud retired `cloud_ids` (so they are not asked for again)."""
        if not cloud_ids:
            return
        with self.locked(collection):
            records = self._versions(collection)
            for record in records.values():
                done = record.setdefault("cloud_retired", [])
                done += [i for i in record["retired"] if i in cloud_ids and i not in done]
            self._save_versions(collection, records)

    def collections_with_versions(self) -> list[str]:
        """Collections with a newer version waiting to be served or an old one for the cloud
        to retire (what a housekeeping sweep settles)."""
        names = []
        for collection in self._collections():
            records = self._versions(collection).values()
            if any(
                r["candidate"] is not None or set(r["retired"]) - set(r.get("cloud_retired", []))
                for r in records
            ):
                names.append(collection)
        return names

    def promote(self, collection: str, searchable: Callable[[str], bool]) -> frozenset[str]:
        """Serve each candidate that is searchable now (retire the version it replaces); the
        retired cloud ids of `collection` afterwards."""
        with self.locked(collection):
            records = self._versions(collection)
            changed = False
            for record in records.values():
                if record["candidate"] is not None and searchable(record["candidate"]):
                    record["retired"].append(record["current"])
                    record["current"], record["candidate"] = record["candidate"], None
                    changed = True
            if changed:
                self._save_versions(collection, records)
        return frozenset(i for r in records.values() for i in r["retired"])

    # -- both ---------------------------------------------------------------------------------
    def drop(self, collection: str, kind: Kind, uid: str) -> None:
        """Forget a waiting half (once its pair is uploaded)."""
        self._path(collection, kind, uid).unlink(missing_ok=True)

    def _collections(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return sorted(p.name for p in self.directory.iterdir() if p.is_dir())

    def _halves(self, collection: str | None = None) -> Iterator[tuple[str, Kind, str, Path]]:
        """(collection, kind, key, path) of every waiting half (of one collection)."""
        names = self._collections() if collection is None else [collection]
        for name in names:
            folder = self.directory / name
            if not folder.is_dir():
                continue
            for path in sorted(folder.iterdir()):
                match = _NAME.match(path.name)
                if match:
                    yield name, match.group(1), match.group(2), path  # type: ignore[misc]

    def expire(self, ttl_s: float, now: float | None = None) -> list[Expired]:
        """Remove the halves that have waited longer than `ttl_s` seconds; what was removed.

        Each collection is swept under its lock, and each file's age is read again there: a
        half re-sent (or paired and dropped) meanwhile is left alone.
        """
        now = time.time() if now is None else now
        expired: list[Expired] = []
        for collection in self._collections():
            with self.locked(collection):
                for _, kind, key, path in self._halves(collection):
                    try:
                        age = now - path.stat().st_mtime
                    except FileNotFoundError:
                        continue
                    if age > ttl_s:
                        path.unlink(missing_ok=True)
                        expired.append(Expired(collection, kind, key, round(age, 1)))
        return expired

    def status(self, now: float | None = None) -> dict[str, dict[str, dict[str, float | int]]]:
        """{collection: {kind: {"waiting": n, "oldest_s": age}}} of what waits (operators)."""
        now = time.time() if now is None else now
        status: dict[str, dict[str, dict[str, float | int]]] = {}
        for collection, kind, _key, path in self._halves():
            try:
                age = max(0.0, now - path.stat().st_mtime)
            except FileNotFoundError:
                continue
            kinds = status.setdefault(
                collection,
                {k: {"waiting": 0, "oldest_s": 0.0} for k in ("image", "mask")},
            )
            entry = kinds[kind]
            entry["waiting"] = int(entry["waiting"]) + 1
            entry["oldest_s"] = round(max(float(entry["oldest_s"]), age), 1)
        return status

    def counts(self) -> dict[str, dict[str, int]]:
        """{collection: {"image": n, "mask": n}} of what waits (operators, metrics)."""
        counts: dict[str, dict[str, int]] = {}
        if not self.directory.is_dir():
            return counts
        for folder in sorted(p for p in self.directory.iterdir() if p.is_dir()):
            kinds = {"image": 0, "mask": 0}
            for path in folder.iterdir():
                match = _NAME.match(path.name)
                if match:
                    kinds[match.group(1)] += 1
            counts[folder.name] = kinds
        return counts
