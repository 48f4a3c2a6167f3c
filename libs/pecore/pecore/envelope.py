"""Owner-side encryption of one image: 8-bit rule + key derivation + cipher + metadata + tag.

`seal` turns a plain 2-D image (any integer or float depth) into a uint8 cipher image and a
`CipherMetadata` record that can travel with it: it names the scheme, the key mode, the
master key's public fingerprint and the key's check value, the 8-bit conversion rule and the
image's role (and class label, for a retrieval template), but holds no key material and
nothing from a DICOM header.  `tag` adds the owner's integrity tag over the cipher pixels, the
tumour mask (when there is one) and every field of the record; `verify_tag` checks it before
anything is decrypted; `unseal` re-derives the key from the master key and inverts it
bit-exactly.

This record and its tag are the only owner-side envelope: the `pecbir encrypt` sidecar is the
record as JSON, and the cloud's `ImageMetadata` is the same record in the wire's field names
(translated in one place, the encryptor's `wire` module, since pecore knows no wire models).
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterator, Sequence
from typing import Annotated, Final, Literal

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from pecore.cipher import IntensityRescale, cipher_scheme, decrypt, encrypt, to_uint8
from pecore.cipher_roi import RoiCipher, is_roi_scheme
from pecore.keys import (
    ImageKey,
    MasterKey,
    derive_image_key_and_stream,
    paper_key_stream,
)

__all__ = [
    "KEY_MODES",
    "KEY_MODE_ALIASES",
    "SHARED_KEY_LABEL",
    "TAG_V1_SERVICE",
    "TAG_V1_SIDECAR",
    "TAG_V2",
    "TAG_V3",
    "CipherMetadata",
    "KeyMode",
    "Role",
    "TagFormat",
    "TamperedError",
    "canonical_key_mode",
    "content_key_salt",
    "encrypt_stack",
    "image_key_and_stream_for",
    "image_key_for",
    "integrity_tag",
    "scenario_key_stream",
    "seal",
    "seal_roi",
    "tag",
    "unseal",
    "verify_tag",
]

# How an image's key is chosen.  "per-image": derived from the master key under the image's own
# id (k_i ≠ k_j, the paper's "different keys").  "same": every image of the owner uses the one
# shared key derived from the master key under `SHARED_KEY_LABEL` (one key stream per image
# size), the paper's k_i = k_j scenario.  That shared key is a child of the owner's master key;
# it is not the paper's published parameter set θ* (pecore.keys names that one).
KeyMode = Literal["same", "per-image"]
KEY_MODES: tuple[str, ...] = ("same", "per-image")
# Derivation label of the shared key derived from the master key (key mode "same").
SHARED_KEY_LABEL = "__shared__"

Role = Literal["template", "query"]

# Labels of the integrity-tag formats; each is both the HMAC key's derivation label and the
# first bytes of the tagged message, so a tag of one format never verifies as another.
# v1 sidecar: `pecbir encrypt` before v2 (cipher + the record's v1 fields, no mask).
TAG_V1_SIDECAR: Final = "pecbir/sidecar-integrity/v1"
# v1 service: the encryptor before v2 (cipher + mask + the wire's v1 field layout).
TAG_V1_SERVICE: Final = "pecbir/integrity/v1"
# v2: the one envelope tag (cipher + mask, if any + every field of this record).
TAG_V2: Final = "pecbir/envelope/v2"
# v3: v2 plus the record's identity (tenant, collection) and its content-bound key salt.
TAG_V3: Final = "pecbir/envelope/v3"
TagFormat = Literal[
    "pecbir/sidecar-integrity/v1",
    "pecbir/integrity/v1",
    "pecbir/envelope/v2",
    "pecbir/envelope/v3",
]
# Fields that only a v3 record has (and only a v3 tag covers).
_V3_FIELDS: Final = frozenset({"tenant", "collection", "key_salt"})
# Image ids of this prefix name keys of their own (`SHARED_KEY_LABEL`): never an image's.
_RESERVED_ID_PREFIX: Final = "__"

# Fields that are not themselves signed: the tag, and the name of its format (which is signed
# anyway, as the label inside the message).
_UNSIGNED_FIELDS: Final = frozenset({"integrity_tag", "tag_format"})
# The whole record as it was before v2: what a v1 sidecar tag covers (frozen).
_V1_SIDECAR_FIELDS: Final = frozenset(
    {
        "format",
        "image_id",
        "scheme",
        "key_mode",
        "key_id",
        "key_counter",
        "key_check",
        "shape",
        "rescale",
    }
)


def _record_scheme(name: str) -> str:
    # a registered scheme of pecore.cipher (or an alias), or a pe-roi scheme ("pe-roi-t16dn")
    if not is_roi_scheme(name):
        cipher_scheme(name)
    return name


#: A scheme as a record names it: one of `pecore.cipher` (kept as written, aliases included)
#: or a pe-roi scheme of `pecore.cipher_roi`, by its explicit spelling.
RecordScheme = Annotated[str, AfterValidator(_record_scheme)]


class CipherMetadata(BaseModel):
    """Everything a key holder needs, besides the master key, to check and decrypt a cipher image.

    Attributes
    ----------
    format : str
        Record format name.
    image_id : str
        Opaque id of the image; with key mode "per-image" it selects the image's key.
    role : {"template", "query"}
        A retrieval template (stored, may carry a class label) or a query image (never labelled).
    label : int or None
        Class label of a template (0..255), None when unknown or for queries.
    scheme : str
        Cipher scheme (pecore.cipher), or a pe-roi scheme (pecore.cipher_roi, explicit
        spelling "pe-roi-t<b>[d|dn][-in]"): its cipher holds only the scrambled ROI, and the
        image itself travels sealed (`seal_roi`).
    key_mode : {"per-image", "same"}
        How the key was chosen (see `KeyMode`).
    key_id : str
        Public fingerprint of the master key the image was encrypted under.
    key_counter, key_check : int, str
        Derivation counter and check value of the image key (no key material).
    shape : tuple of int
        (height, width) of the cipher image.
    rescale : IntensityRescale
        The 8-bit conversion rule and its parameters.
    integrity_tag : str or None
        Owner's HMAC-SHA256 (hex) over the cipher pixels, the mask and the signed fields; set
        by `tag`, checked by `verify_tag` before anything is decrypted.
    tag_format : str or None
        Format (label) of `integrity_tag`; None on records written before v2, whose tag is in
        the v1 sidecar format.
    tenant, collection : str or None
        v3 only: where the record belongs (covered by the v3 tag, so a record moved to
        another tenant or collection no longer verifies there).  None on v1/v2 records.
    key_salt : str or None
        v3 only: the keyed digest of the plain content the per-image key is also derived
        from (`content_key_salt`), so that different content never gets the same key.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    format: Literal["pecbir-cipher-v1"] = "pecbir-cipher-v1"
    image_id: str = Field(min_length=1, max_length=128)
    role: Role = "template"
    label: int | None = Field(default=None, ge=0, le=255)
    scheme: RecordScheme
    key_mode: KeyMode
    key_id: str
    key_counter: int = Field(ge=0)
    key_check: str
    shape: tuple[int, int]
    rescale: IntensityRescale
    integrity_tag: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    tag_format: TagFormat | None = None
    tenant: str | None = Field(default=None, min_length=1, max_length=63)
    collection: str | None = Field(default=None, min_length=1, max_length=63)
    key_salt: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$")

    @model_validator(mode="after")
    def _label_only_for_templates(self) -> CipherMetadata:
        if self.role == "query" and self.label is not None:
            raise ValueError("query images carry no label")
        if (self.tenant is None) != (self.collection is None):
            raise ValueError("tenant and collection come together (a v3 record) or not at all")
        return self

    @property
    def identity_bound(self) -> bool:
        """Whether the record names its tenant and collection (v3)."""
        return self.tenant is not None


def content_key_salt(master: MasterKey, plain: np.ndarray) -> str:
    """Keyed digest (128 bits, hex) of a plain uint8 image's shape and pixels.

    Part of a v3 per-image key's derivation: two different contents (or sizes) under one image
    id get different keys, and the same content the same key (a re-send is idempotent).  Keyed
    by the master key, so the cloud cannot confirm a guessed image from it.
    """
    plain = np.ascontiguousarray(plain, dtype=np.uint8)
    message = b"pecbir/key-salt/v1\x00" + f"{plain.shape}".encode() + b"\x00" + plain.tobytes()
    digest = hmac.new(master.secret.get_secret_value(), message, hashlib.sha256)
    return digest.hexdigest()[:32]


def image_key_for(
    master: MasterKey,
    image_id: str,
    key_mode: KeyMode,
    n_pixels: int,
    *,
    salt: str | None = None,
) -> ImageKey:
    """The image key of `image_id`: its own ("per-image") or the master's shared one ("same").

    A per-image key with a `salt` (v3 records) is derived from the image id and the salt.
    Image ids starting with "__" are reserved (the shared key's label is one) and refused.
    """
    return image_key_and_stream_for(master, image_id, key_mode, n_pixels, salt=salt)[0]


def image_key_and_stream_for(
    master: MasterKey,
    image_id: str,
    key_mode: KeyMode,
    n_pixels: int,
    *,
    salt: str | None = None,
) -> tuple[ImageKey, np.ndarray]:
    """`image_key_for` plus the key stream its derivation computed and validated.

    The key's check value is computed from this very stream, so encrypting or decrypting with
    it needs no second SSLM orbit (`ImageKey.stream` would compute the same stream again,
    the most expensive step of sealing an image).
    """
    if key_mode not in KEY_MODES:
        raise ValueError(f"unknown key mode {key_mode!r}; expected one of {', '.join(KEY_MODES)}")
    if image_id.startswith(_RESERVED_ID_PREFIX):
        raise ValueError(
            f"image id {image_id!r} is reserved (ids starting with {_RESERVED_ID_PREFIX!r} "
            "name the owner's own keys)"
        )
    if key_mode == "same":
        return derive_image_key_and_stream(master, SHARED_KEY_LABEL, n_pixels)
    if salt is None:
        return derive_image_key_and_stream(master, image_id, n_pixels)
    key, stream = derive_image_key_and_stream(master, f"{image_id}/salt:{salt}", n_pixels)
    return key.model_copy(update={"image_id": image_id}), stream  # the image's id, not the label


def seal(
    image: np.ndarray,
    master: MasterKey,
    image_id: str,
    scheme: str = "ours",
    key_mode: KeyMode = "per-image",
    *,
    role: Role = "template",
    label: int | None = None,
    tenant: str | None = None,
    collection: str | None = None,
) -> tuple[np.ndarray, CipherMetadata]:
    """Encrypt a plain image for the cloud; returns (uint8 cipher image, untagged metadata).

    Parameters
    ----------
    image : numpy.ndarray
        Plain 2-D grey image, any integer or float depth (brought to 8 bits by min–max).
    master : MasterKey
        The owner's master key; the image key is derived from it.
    image_id : str
        Opaque id of the image (selects its key in key mode "per-image").
    scheme : str
        Cipher scheme.
    key_mode : {"per-image", "same"}
        The image's own key, or the shared key derived from the master key.
    role : {"template", "query"}
        Recorded in the metadata (and covered by the tag).
    label : int or None
        Class label of a template, recorded in the metadata (and covered by the tag).
    tenant, collection : str or None
        Where the record will be stored.  Given: a v3 record, bound to them by its tag, whose
        per-image key is also derived from its content (`content_key_salt`).  None: a v2
        record (the `pecbir encrypt` sidecar, the known-answer tests).

    Returns
    -------
    cipher : numpy.ndarray
        uint8 cipher image of the image's shape.
    metadata : CipherMetadata
        The record, without a tag yet (see `tag`).
    """
    if is_roi_scheme(scheme):
        raise ValueError(f"{scheme} needs the tumour mask and seals the image: use seal_roi")
    plain, rescale = to_uint8(image)
    salt = None
    if tenant is not None and key_mode == "per-image":
        salt = content_key_salt(master, plain)
    key, stream = image_key_and_stream_for(master, image_id, key_mode, plain.size, salt=salt)
    cipher = encrypt(plain, stream, scheme)
    metadata = CipherMetadata(
        image_id=image_id,
        role=role,
        label=label,
        scheme=scheme,
        key_mode=key_mode,
        key_id=master.key_id,
        key_counter=key.counter,
        key_check=key.check,
        shape=plain.shape,
        rescale=rescale,
        tenant=tenant,
        collection=collection,
        key_salt=salt,
    )
    return cipher, metadata


def seal_roi(
    image: np.ndarray,
    mask: np.ndarray,
    master: MasterKey,
    image_id: str,
    scheme: str = "pe-roi",
    *,
    role: Role = "template",
    label: int | None = None,
    tenant: str | None = None,
    collection: str | None = None,
) -> tuple[np.ndarray, np.ndarray, CipherMetadata]:
    """pe-roi's feature image for the cloud, its cloud mask and its (untagged) record.

    The owner-side half of the `pe-roi` protection mode (`pecore.cipher_roi`): only the
    owner-dilated ROI and the patch margin of the 8-bit image, tile-scrambled and encrypted
    under the image's per-image key (pe-roi has no shared-key mode: one key for all images
    would give every image the same tile permutation).  The image itself goes to the cloud
    only sealed (`pecore.sealing`); the record names the scheme by its explicit spelling, so a
    later change of the chosen configuration leaves stored records as they are.

    Parameters
    ----------
    image : numpy.ndarray
        Plain 2-D grey image, any integer or float depth (brought to 8 bits by min–max).
    mask : numpy.ndarray
        Its tumour mask (bool, same shape).
    master : MasterKey
        The owner's master key; the image key is derived from it.
    image_id : str
        Opaque id of the image: selects its key and is the tile keys' nonce.
    scheme : str
        "pe-roi" (the chosen configuration) or "pe-roi-t<b>[d|dn][-in]".
    role : {"template", "query"}
        Recorded in the metadata (and covered by the tag).
    label : int or None
        Class label of a template.
    tenant, collection : str or None
        Where the record will be stored (a v3 record, content-bound key), as for `seal`.

    Returns
    -------
    cipher : numpy.ndarray
        uint8 feature image for the cloud (ROI and margin only, scrambled, encrypted).
    cloud_mask : numpy.ndarray
        bool: the ROI moved with the tiles, the only mask the cloud gets.
    metadata : CipherMetadata
        The record, without a tag yet (see `tag`, with ``mask=cloud_mask``).
    """
    roi = RoiCipher.from_name(scheme)
    plain, rescale = to_uint8(image)
    mask = np.asarray(mask, dtype=bool)
    salt = content_key_salt(master, plain) if tenant is not None else None
    key, stream = image_key_and_stream_for(master, image_id, "per-image", plain.size, salt=salt)
    cipher = roi.encrypt(plain, stream, mask=mask, nonce=image_id)
    cloud_mask = roi.cloud_mask(mask, stream, nonce=image_id)
    metadata = CipherMetadata(
        image_id=image_id,
        role=role,
        label=label,
        scheme=roi.legacy_name,
        key_mode="per-image",
        key_id=master.key_id,
        key_counter=key.counter,
        key_check=key.check,
        shape=plain.shape,
        rescale=rescale,
        tenant=tenant,
        collection=collection,
        key_salt=salt,
    )
    return cipher, cloud_mask, metadata


class TamperedError(ValueError):
    """A cipher image, its mask or its metadata does not match the owner's tag: do not decrypt."""


def _canonical_json(fields: dict[str, object]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":")).encode()


def _array_digest(array: np.ndarray) -> bytes:
    """SHA-256 over dtype, shape and bytes: equal digests mean equal arrays."""
    array = np.ascontiguousarray(array)
    header = f"{array.dtype.str}:{array.shape}".encode()
    return hashlib.sha256(header + b"\x00" + array.tobytes()).digest()


def _v1_sidecar_message(cipher: np.ndarray, metadata: CipherMetadata) -> bytes:
    if metadata.role != "template" or metadata.label is not None:
        # A v1 sidecar tag does not cover these fields, so a v1 sidecar never had them.
        raise TamperedError(
            f"image {metadata.image_id!r}: a v1 sidecar record carries no role or label"
        )
    pixels = np.ascontiguousarray(cipher, dtype=np.uint8)
    fields = metadata.model_dump(mode="json", include=_V1_SIDECAR_FIELDS)
    return b"\x00".join(
        [
            TAG_V1_SIDECAR.encode(),
            f"{pixels.shape}".encode(),
            hashlib.sha256(pixels.tobytes()).digest(),
            _canonical_json(fields),
        ]
    )


def _v1_service_message(
    cipher: np.ndarray, mask: np.ndarray | None, metadata: CipherMetadata
) -> bytes:
    if mask is None:
        raise TamperedError(f"image {metadata.image_id!r}: a v1 service tag covers a mask")
    # The field layout the encryptor signed before v2 (its wire record minus the tag), frozen.
    height, width = metadata.shape
    fields = {
        "opaque_id": metadata.image_id,
        "role": metadata.role,
        "label": metadata.label,
        "height": height,
        "width": width,
        "rescale": metadata.rescale.model_dump(mode="json"),
        "key": {
            "scheme": metadata.scheme,
            "mode": metadata.key_mode,
            "key_id": metadata.key_id,
            "counter": metadata.key_counter,
            "check": metadata.key_check,
        },
    }
    return b"".join(
        [
            TAG_V1_SERVICE.encode(),
            _array_digest(cipher.astype(np.uint8)),
            _array_digest(mask.astype(bool)),
            _canonical_json(fields),
        ]
    )


def _v2_message(
    cipher: np.ndarray,
    mask: np.ndarray | None,
    metadata: CipherMetadata,
    tag_format: TagFormat = TAG_V2,
) -> bytes:
    # One flag byte says whether a mask digest follows, so "no mask" is not any mask's digest.
    mask_part = b"\x00" if mask is None else b"\x01" + _array_digest(mask.astype(bool))
    # v2 signs the fields a v2 record has; v3 signs every field (identity and salt included).
    unsigned = _UNSIGNED_FIELDS if tag_format == TAG_V3 else _UNSIGNED_FIELDS | _V3_FIELDS
    fields = metadata.model_dump(mode="json", exclude=unsigned)
    return b"".join(
        [
            tag_format.encode(),
            b"\x00",
            _array_digest(cipher.astype(np.uint8)),
            mask_part,
            _canonical_json(fields),
        ]
    )


def integrity_tag(
    cipher: np.ndarray,
    metadata: CipherMetadata,
    master: MasterKey,
    *,
    mask: np.ndarray | None = None,
    tag_format: TagFormat = TAG_V2,
) -> str:
    """HMAC-SHA256 (key derived from the master key) over cipher pixels, mask and metadata.

    Parameters
    ----------
    cipher : numpy.ndarray
        The uint8 cipher image.
    metadata : CipherMetadata
        Its record; every field but the tag itself is covered (v2).
    master : MasterKey
        The owner's master key (the HMAC key is derived from it under the format's label).
    mask : numpy.ndarray or None
        Tumour mask stored with the image (covered as booleans), None for a sidecar.
    tag_format : str
        `TAG_V3` for records with an identity, `TAG_V2` for those without; the v1 formats only
        to check records made before v2.

    Returns
    -------
    str
        The tag, 64 hex digits.
    """
    has_v3_fields = any(getattr(metadata, name) is not None for name in _V3_FIELDS)
    if (tag_format == TAG_V3) != has_v3_fields:
        # A v3 record's identity and salt must be covered; an older tag covers neither.
        raise TamperedError(
            f"image {metadata.image_id!r}: a {tag_format} tag does not fit a record "
            f"{'with' if has_v3_fields else 'without'} tenant, collection and key salt"
        )
    if tag_format in (TAG_V2, TAG_V3):
        message = _v2_message(cipher, mask, metadata, tag_format)
    elif tag_format == TAG_V1_SERVICE:
        message = _v1_service_message(cipher, mask, metadata)
    elif tag_format == TAG_V1_SIDECAR:
        if mask is not None:
            raise TamperedError(f"image {metadata.image_id!r}: a v1 sidecar tag covers no mask")
        message = _v1_sidecar_message(cipher, metadata)
    else:
        raise ValueError(f"unknown integrity tag format {tag_format!r}")
    key = hmac.new(master.secret.get_secret_value(), tag_format.encode(), hashlib.sha256).digest()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def tag(
    cipher: np.ndarray,
    metadata: CipherMetadata,
    master: MasterKey,
    *,
    mask: np.ndarray | None = None,
) -> CipherMetadata:
    """`metadata` with the owner's integrity tag over it, `cipher` and `mask`.

    v3 for a record with an identity (tenant, collection), v2 for one without.

    Parameters
    ----------
    cipher : numpy.ndarray
        The uint8 cipher image.
    metadata : CipherMetadata
        Its record (from `seal`).
    master : MasterKey
        The owner's master key.
    mask : numpy.ndarray or None
        Tumour mask that travels with the image, None when there is none (a sidecar).

    Returns
    -------
    CipherMetadata
        The record with `integrity_tag` and `tag_format` set.
    """
    tag_format = TAG_V3 if metadata.identity_bound else TAG_V2
    value = integrity_tag(cipher, metadata, master, mask=mask, tag_format=tag_format)
    return metadata.model_copy(update={"integrity_tag": value, "tag_format": tag_format})


def verify_tag(
    cipher: np.ndarray,
    metadata: CipherMetadata,
    master: MasterKey,
    *,
    mask: np.ndarray | None = None,
) -> None:
    """TamperedError unless `metadata` carries a tag that matches `cipher`, `mask` and its fields.

    Tags of every format are accepted (v3, v2 and both v1 formats), each checked by its own
    rule, so records stored before v3 keep verifying.  Only a v3 record names its tenant and
    collection: the caller compares them (and the image id) with what it asked for.

    Parameters
    ----------
    cipher : numpy.ndarray
        The cipher image as stored.
    metadata : CipherMetadata
        Its record as stored.
    master : MasterKey
        The master key the record names.
    mask : numpy.ndarray or None
        The tumour mask stored with it (None for a sidecar).

    Raises
    ------
    TamperedError
        No tag, another master key, or anything changed since the owner tagged it.
    """
    if metadata.integrity_tag is None:
        raise TamperedError(
            f"image {metadata.image_id!r}: metadata carries no integrity tag; refusing to decrypt"
        )
    if metadata.key_id != master.key_id:
        raise TamperedError(
            f"image {metadata.image_id!r} was encrypted under master key {metadata.key_id}, "
            f"not {master.key_id}"
        )
    tag_format = metadata.tag_format or TAG_V1_SIDECAR
    if (
        tuple(np.shape(cipher)) != tuple(metadata.shape)
        or (mask is not None and tuple(np.shape(mask)) != tuple(metadata.shape))
        or not hmac.compare_digest(
            integrity_tag(cipher, metadata, master, mask=mask, tag_format=tag_format),
            metadata.integrity_tag,
        )
    ):
        raise TamperedError(
            f"integrity check failed for image {metadata.image_id!r}: the cipher image, its mask "
            "or its metadata changed since the owner tagged them; refusing to decrypt"
        )


def unseal(cipher: np.ndarray, metadata: CipherMetadata, master: MasterKey) -> np.ndarray:
    """Decrypt to the exact uint8 image that `seal` encrypted."""
    if metadata.key_id != master.key_id:
        raise ValueError(
            f"image {metadata.image_id!r} was encrypted under master key {metadata.key_id}, "
            f"not {master.key_id}"
        )
    if tuple(cipher.shape) != tuple(metadata.shape):
        raise ValueError(f"cipher image has shape {cipher.shape}, metadata says {metadata.shape}")
    if is_roi_scheme(metadata.scheme):
        raise ValueError(
            f"image {metadata.image_id!r} is {metadata.scheme}: its cipher holds the ROI only; "
            "the image opens from its sealed blob"
        )
    key, stream = image_key_and_stream_for(
        master, metadata.image_id, metadata.key_mode, cipher.size, salt=metadata.key_salt
    )
    if key.counter != metadata.key_counter or key.check != metadata.key_check:
        raise ValueError(
            f"key for image {metadata.image_id!r} does not match the stored check value: "
            "different SSLM implementation or corrupted metadata; refusing to decrypt"
        )
    return decrypt(cipher, stream, metadata.scheme)


# --------------------------------------------------------------------------- the paper's key modes
#: Old spellings of key modes, accepted on input (CLI options, results files written before
#: the rename) and mapped to the one spelling written now.
KEY_MODE_ALIASES: dict[str, str] = {"different": "per-image"}


def canonical_key_mode(key_mode: str) -> str:
    """`key_mode` in the spelling of `KEY_MODES` ("different" → "per-image").

    Raises
    ------
    ValueError
        If `key_mode` is neither a key mode nor an alias of one.
    """
    mode = KEY_MODE_ALIASES.get(key_mode, key_mode)
    if mode not in KEY_MODES:
        raise ValueError(f"unknown key mode {key_mode!r}; expected one of {', '.join(KEY_MODES)}")
    return mode


def scenario_key_stream(
    key_mode: str, *, master: MasterKey | None, image_id: str, n_pixels: int
) -> np.ndarray:
    """The key stream of one image in the paper's two scenarios (experiment, security report).

    Parameters
    ----------
    key_mode : str
        "same": the paper's published key θ* (`pecore.keys.PAPER_KEY`) for every image — *not*
        the master-derived shared key of `image_key_for`'s "same" mode;
        "per-image" (alias "different"): ``derive_image_key(master, image_id, n_pixels)``.
    master : MasterKey or None
        The owner's master key; only "per-image" needs it.
    image_id : str
        What the per-image key is derived from.
    n_pixels : int
        Pixels of the image.

    Returns
    -------
    numpy.ndarray
        uint8 key stream of `n_pixels` values ("same": the cached, read-only paper stream).
    """
    if canonical_key_mode(key_mode) == "same":
        return paper_key_stream(n_pixels)
    if master is None:
        raise ValueError("per-image keys are derived from a master key; got master=None")
    return derive_image_key_and_stream(master, image_id, n_pixels)[1]


def encrypt_stack(
    images: np.ndarray,
    *,
    image_ids: Sequence[str],
    schemes: Sequence[str],
    key_mode: str,
    master: MasterKey | None,
    masks: np.ndarray | None = None,
    dilate: int | None = None,
    batch: int = 32,
    n_threads: int = 2,
) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Encrypt a stack of images under every scheme in `schemes`, one image at a time.

    Each image's key stream (`scenario_key_stream`) is made once for all schemes.  Per-image
    keys are derived `batch` images at a time on `n_threads` threads (the derivation validates
    each stream in numba code that releases the GIL).  A tile-scrambled scheme ("<inner>-bs<b>")
    uses the image id as its nonce and moves the image's ROI mask with its tiles
    (`scramble_mask`); with `dilate`, the mask is dilated by that radius first (the owner ships
    the ROI itself).  pe-roi (`pecore.cipher_roi`) encrypts with the mask and yields its cloud
    mask (the ROI it dilated itself, moved with the tiles; `dilate` does not apply).

    Parameters
    ----------
    images : array (N, H, W) uint8
        Plain images.
    image_ids : sequence of str
        Per image: the per-image key's derivation input and the variants' nonce.
    schemes : sequence of str
        Schemes of `pecore.cipher` and tile-scrambled variants.
    key_mode : str
        "same" (paper key θ*) or "per-image" (alias "different"); see `scenario_key_stream`.
    master : MasterKey or None
        The master key of "per-image" mode.
    masks : array (N, H, W) bool, optional
        Tumour masks; required when `schemes` holds a tile-scrambled variant or pe-roi.
    dilate : int, optional
        Dilate each mask by this radius before scrambling it.
    batch, n_threads : int
        Images per key-derivation batch, and threads deriving them.

    Yields
    ------
    tuple of (dict of str to numpy.ndarray, dict of str to numpy.ndarray)
        In image order: cipher image by scheme, and the moved mask by variant / pe-roi scheme.
    """
    from concurrent.futures import ThreadPoolExecutor

    from pecore.cipher_roi import RoiCipher, is_roi_scheme
    from pecore.cipher_variants import encrypt_any, is_variant_scheme, scramble_mask
    from pecore.roi import dilate_mask

    roi_schemes = {s: RoiCipher.from_name(s) for s in schemes if is_roi_scheme(s)}
    variants = [s for s in schemes if is_variant_scheme(s) or s in roi_schemes]
    if variants and masks is None:
        raise ValueError(f"{', '.join(variants)} need the ROI masks to scramble (masks=...)")
    key_mode = canonical_key_mode(key_mode)

    def stream_of(row: int) -> np.ndarray:
        return scenario_key_stream(
            key_mode, master=master, image_id=image_ids[row], n_pixels=images[row].size
        )

    with ThreadPoolExecutor(n_threads) as pool:
        for start in range(0, len(images), batch):
            rows = range(start, min(start + batch, len(images)))
            for row, stream in zip(rows, pool.map(stream_of, rows), strict=True):
                image = np.ascontiguousarray(images[row])
                nonce = image_ids[row]
                ciphers = {
                    s: roi_schemes[s].encrypt(image, stream, mask=masks[row], nonce=nonce)
                    if s in roi_schemes
                    else encrypt_any(image, stream, s, nonce)
                    for s in schemes
                }
                moved = {}
                for scheme in variants:
                    if scheme in roi_schemes:  # dilates the tumour mask itself (its `radius`)
                        moved[scheme] = roi_schemes[scheme].cloud_mask(
                            masks[row], stream, nonce=nonce
                        )
                        continue
                    roi = np.asarray(masks[row], dtype=bool)
                    if dilate is not None:
                        roi = dilate_mask(roi, dilate)
                    moved[scheme] = scramble_mask(roi, stream, scheme, nonce=nonce)
                yield ciphers, moved
