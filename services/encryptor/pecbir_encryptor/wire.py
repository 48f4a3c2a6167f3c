"""The one translation between pecore's owner-side record and the cloud's `ImageMetadata`.

pecore's envelope (`CipherMetadata`: seal, tag, verify, unseal) and the cloud's wire models
(`pecbir_contracts.schemas`) must not know each other; the encryptor knows both, so the field
mapping lives here, once.  The encryptor and the harness's benchmark/soak upload helpers go
through it.  Both directions are lossless for every record the owner tags: the v2 tag is
computed over the pecore record, so a stored `ImageMetadata` verifies as `from_wire(...)`.
"""

from __future__ import annotations

from pecbir_contracts.schemas import ImageMetadata, Integrity, KeyInfo, RescaleInfo
from pecbir_encryptor.integrity import IntegrityError
from pecore.cipher import IntensityRescale
from pecore.envelope import (
    TAG_V1_SERVICE,
    TAG_V1_SIDECAR,
    TAG_V2,
    TAG_V3,
    CipherMetadata,
    TagFormat,
)

__all__ = ["from_wire", "to_wire"]

# `Integrity.version` on the wire ↔ pecore's tag format.  A v1 sidecar tag covers no mask and
# none of the wire's own fields, so it never travels.
_TAG_FORMAT_OF_VERSION: dict[int, TagFormat] = {1: TAG_V1_SERVICE, 2: TAG_V2, 3: TAG_V3}
_VERSION_OF_TAG_FORMAT: dict[TagFormat, int] = {f: v for v, f in _TAG_FORMAT_OF_VERSION.items()}


def to_wire(record: CipherMetadata) -> ImageMetadata:
    """The cloud's metadata record of an owner-side record (its tag included, if any).

    Parameters
    ----------
    record : CipherMetadata
        The owner's record (from `pecore.envelope.seal`, usually tagged with a mask).

    Returns
    -------
    ImageMetadata
        The same facts in the wire's field names; `integrity.key_id` is the record's master key.
        A v3 record's tenant and collection do not travel: they are where it is stored, and
        `from_wire` takes them from the request it answers.

    Raises
    ------
    ValueError
        The record's tag is in the v1 sidecar format, which the cloud's records never carry.
    """
    integrity = None
    if record.integrity_tag is not None:
        tag_format = record.tag_format or TAG_V1_SIDECAR
        if tag_format not in _VERSION_OF_TAG_FORMAT:
            raise ValueError(
                f"image {record.image_id!r}: a {tag_format} tag covers no mask; "
                "re-tag the record with its mask before it goes to the cloud"
            )
        integrity = Integrity(
            key_id=record.key_id,
            tag=record.integrity_tag,
            version=_VERSION_OF_TAG_FORMAT[tag_format],
        )
    height, width = record.shape
    return ImageMetadata(
        opaque_id=record.image_id,
        role=record.role,
        label=record.label,
        height=height,
        width=width,
        rescale=RescaleInfo(**record.rescale.model_dump()),
        key=KeyInfo(
            scheme=record.scheme,
            mode=record.key_mode,
            key_id=record.key_id,
            counter=record.key_counter,
            check=record.key_check,
            salt=record.key_salt,
        ),
        integrity=integrity,
    )


def from_wire(
    metadata: ImageMetadata, *, tenant: str | None = None, collection: str | None = None
) -> CipherMetadata:
    """The owner-side record of a stored `ImageMetadata`, ready for `verify_tag` and `unseal`.

    Parameters
    ----------
    metadata : ImageMetadata
        As the cloud stored it (records of every tag version).
    tenant, collection : str, optional
        Where the caller asked for it: a v3 record's tag covers them, so a record moved from
        elsewhere fails `verify_tag`.  Ignored for records before v3, which do not name them.

    Returns
    -------
    CipherMetadata
        The same facts in pecore's field names, the tag and its format included.

    Raises
    ------
    IntegrityError
        The record cannot be the owner's: it lacks its 8-bit conversion record, names one
        master key for the encryption and another for the tag, or is a v3 record asked for
        without the tenant and collection it must belong to.
    """
    if metadata.rescale is None:
        raise IntegrityError(f"image {metadata.opaque_id} lacks its 8-bit conversion record")
    integrity = metadata.integrity
    if integrity is not None and integrity.key_id != metadata.key.key_id:
        raise IntegrityError(
            f"image {metadata.opaque_id}: encrypted under key {metadata.key.key_id} but "
            f"tagged under {integrity.key_id}; refusing to decrypt"
        )
    bound = integrity is not None and integrity.version == 3
    if bound and (tenant is None or collection is None):
        raise IntegrityError(
            f"image {metadata.opaque_id}: a v3 record is checked against the tenant and "
            "collection it was requested from"
        )
    return CipherMetadata(
        image_id=metadata.opaque_id,
        role=metadata.role,
        label=metadata.label,
        scheme=metadata.key.scheme,
        key_mode=metadata.key.mode,
        key_id=metadata.key.key_id,
        key_counter=metadata.key.counter,
        key_check=metadata.key.check,
        shape=(metadata.height, metadata.width),
        rescale=IntensityRescale(**metadata.rescale.model_dump()),
        integrity_tag=None if integrity is None else integrity.tag,
        tag_format=None if integrity is None else _TAG_FORMAT_OF_VERSION[integrity.version],
        tenant=tenant if bound else None,
        collection=collection if bound else None,
        key_salt=metadata.key.salt,
    )
