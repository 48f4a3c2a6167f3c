"""HTTP API models shared by the gateway, the search service and the encryptor."""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializerFunctionWrapHandler,
    model_serializer,
    model_validator,
)

__all__ = [
    "MAX_K",
    "CollectionProtection",
    "HexTag",
    "ImageMetadata",
    "IndexStatus",
    "Integrity",
    "KeyInfo",
    "ModelManifest",
    "ModelStatus",
    "OpaqueId",
    "ProtectionMode",
    "ProtectionRecord",
    "ReindexPlan",
    "ReindexProgress",
    "RescaleInfo",
    "Scheme",
    "SealedImageMetadata",
    "SearchHit",
    "SearchResponse",
    "SearchTimings",
    "SignedProtection",
    "TrainAccepted",
    "TrainRequest",
    "UploadAccepted",
    "UploadState",
    "UploadStatus",
    "VectorQuery",
    "is_pe_roi_scheme",
    "parse_stored_record",
]

#: A cipher scheme's name as the owner wrote it (pecore.cipher.SCHEMES or an alias): the cloud
#: only stores and returns it, so it holds a bounded string, not the list of schemes.
Scheme = Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[a-z0-9][a-z0-9-]*$")]
OpaqueId = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{8,128}$")]
HexTag = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RescaleInfo(_Strict):
    """How the owner brought the image to 8 bits (pecore.cipher.IntensityRescale)."""

    rule: Literal["minmax-v1"] = "minmax-v1"
    min: float
    max: float
    source_dtype: str = Field(max_length=32)


class KeyInfo(_Strict):
    """Public facts about the image key: enough for the owner to re-derive it, nothing more.

    `mode` "per-image": the image's own key; "same": the shared key derived from the owner's
    master key (pecore.envelope.KeyMode).
    """

    scheme: Scheme = "ours"
    mode: Literal["per-image", "same"] = "per-image"
    key_id: str = Field(default="0" * 16, pattern=r"^[0-9a-f]{8,64}$")
    counter: int = Field(ge=0, le=1024)
    check: str = Field(pattern=r"^[0-9a-z:]{8,80}$")
    # v3 records: the keyed content digest the per-image key is also derived from.
    salt: str | None = Field(default=None, pattern=r"^[0-9a-f]{32}$")

    @model_serializer(mode="wrap")
    def _omit_absent_salt(self, handler: SerializerFunctionWrapHandler) -> dict[str, object]:
        # Records without a salt (v1, v2) serialise exactly as they did before v3.
        fields = handler(self)
        if fields.get("salt") is None:
            fields.pop("salt", None)
        return fields


class Integrity(_Strict):
    """Owner's HMAC over cipher pixels, mask and the rest of the metadata.

    `version` names the tag's format, which only the owner (the encryptor, with pecore's
    envelope) computes and checks: 1 for records stored before the v2 envelope tag (the field
    is absent in them), 2 for records stored before v3, 3 for every new one (it also covers
    the tenant and collection the record is stored in, and its content-bound key salt).
    """

    alg: Literal["hmac-sha256"] = "hmac-sha256"
    key_id: str = Field(pattern=r"^[0-9a-f]{8,64}$")
    tag: HexTag
    version: Literal[1, 2, 3] = 1


class ImageMetadata(_Strict):
    """Everything the cloud stores next to a cipher image; no patient-identifying data.

    The owner-side record (pecore.envelope.CipherMetadata) in the wire's field names; the one
    translation is the encryptor's `wire` module.
    """

    opaque_id: OpaqueId
    role: Literal["template", "query"] = "template"
    label: int | None = Field(default=None, ge=0, le=255)
    height: int = Field(ge=1, le=4096)
    width: int = Field(ge=1, le=4096)
    rescale: RescaleInfo | None = None
    key: KeyInfo
    integrity: Integrity | None = None

    @model_validator(mode="after")
    def _label_only_for_templates(self) -> ImageMetadata:
        if self.role == "query" and self.label is not None:
            raise ValueError("query images carry no label")
        return self


#: How a collection's images are protected: the paper's perceptual cipher (the cloud sees the
#: cipher image and extracts the features), sealed (AES-256-GCM; the owner sends the features)
#: or pe-roi (the image sealed; the cloud extracts the features from a scrambled, ROI-only
#: perceptual cipher).
ProtectionMode = Literal["pe", "sealed", "pe-roi"]


#: A pe-roi scheme as a record names it: always the explicit spelling of `pecore.cipher_roi`
#: ("pe-roi-t<tile>[d|dn][-in][-p<patch>]"), never "pe-roi", whose meaning follows the chosen
#: configuration.
PE_ROI_SCHEME_PATTERN = r"^pe-roi-t[1-9][0-9]*(?:d|dn)?(?:-in)?(?:-p[1-9][0-9]*)?$"


def is_pe_roi_scheme(scheme: str) -> bool:
    """Whether a record's key scheme is a pe-roi scheme in its explicit spelling.

    Parameters
    ----------
    scheme : str
        `KeyInfo.scheme` of a record.

    Returns
    -------
    bool
        True for "pe-roi-t<tile>[d|dn][-in]" (the cloud then expects the image sealed beside it).
    """
    return re.fullmatch(PE_ROI_SCHEME_PATTERN, scheme) is not None


class ProtectionRecord(_Strict):
    """What an owner signs about one of its collections, so that its peers need not trust the
    cloud's word: the mode, the pe-roi scheme and the SHA-256 of the published patch model."""

    tenant: str
    collection: str
    mode: ProtectionMode
    scheme: Scheme | None = None
    patch_model: HexTag | None = None


class SignedProtection(_Strict):
    """A `ProtectionRecord` with its owner's Ed25519 signature (base64) over its canonical
    bytes (`pecbir_encryptor.protection`); the cloud stores and serves it unopened."""

    record: ProtectionRecord
    signature: Annotated[str, Field(min_length=1, max_length=200)]


class CollectionProtection(_Strict):
    """A collection's protection mode as the cloud holds it (what a searcher must send).

    `scheme`: the pe-roi scheme of a pe-roi collection (a query goes through the same
    cipher); None for the other modes. `signed`: the owner's signed record of it (None until
    the owner published one); a peer checks it against the owner's public key.
    """

    collection: str
    mode: ProtectionMode
    scheme: Scheme | None = None
    signed: SignedProtection | None = None


class SealedImageMetadata(_Strict):
    """What the cloud stores next to a sealed blob: no pixel, no mask, no private label.

    The blob (pecore.sealing) is opaque to the cloud; the owner computed the Fisher vector
    with the collection's published patch model (`patch_model`, its SHA-256) and sends it
    alongside.  Only a training template (`role` "template" with a `label`) has a label the
    cloud can read; every other label is inside the blob.
    """

    mode: Literal["sealed"] = "sealed"
    format: Literal["pecbir-sealed/v1"] = "pecbir-sealed/v1"
    opaque_id: OpaqueId
    role: Literal["template", "query"] = "template"
    label: int | None = Field(default=None, ge=0, le=255)
    key_id: str = Field(pattern=r"^[0-9a-f]{8,64}$")
    patch_model: HexTag
    feature_dim: int = Field(ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _label_only_for_templates(self) -> SealedImageMetadata:
        if self.role == "query" and self.label is not None:
            raise ValueError("query images carry no label")
        return self


def parse_stored_record(data: bytes | str) -> ImageMetadata | SealedImageMetadata:
    """A stored meta.json: a sealed record if it says ``"mode": "sealed"``, else a pe record.

    Raises
    ------
    ValueError
        (pydantic's ValidationError) when it is neither.
    """
    import json

    try:
        sealed = json.loads(data).get("mode") == "sealed"
    except (ValueError, AttributeError):
        sealed = False
    model = SealedImageMetadata if sealed else ImageMetadata
    return model.model_validate_json(data)


UploadState = Literal["stored", "awaiting_model", "indexed", "searchable", "failed", "retired"]


class UploadAccepted(BaseModel):
    image_id: str
    collection: str
    state: UploadState
    status_url: str


class UploadStatus(BaseModel):
    image_id: str
    collection: str
    state: UploadState
    model_version: str | None = None
    detail: str | None = None
    # Seconds the image has waited for its index (stored, awaiting a model): since it was
    # stored, or since its collection's current model was published (a re-index).
    waiting_s: float | None = None


class SearchHit(BaseModel):
    rank: int
    image_id: str
    distance: float
    label: int | None = None
    cipher_url: str | None = None


class SearchTimings(BaseModel):
    decode_ms: float = 0.0
    featurise_ms: float = 0.0
    knn_ms: float = 0.0


class SearchResponse(BaseModel):
    collection: str
    owner: str
    model_version: str
    n_database: int
    k: int
    hits: list[SearchHit]
    timings: SearchTimings


class TrainRequest(_Strict):
    """Parameters of a model version (pecore.pipeline.CBIRPipeline)."""

    # No lax coercion (`true` → 1, "8" → 8): a wrongly typed parameter is a client error.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)

    n_components: int = Field(default=64, ge=2, le=256)
    n_regions: int = Field(default=8, ge=1, le=16)
    patch_size: int = Field(default=9, ge=3, le=15)
    radius: int = Field(default=24, ge=0, le=64)
    pca_energy: float = Field(default=0.99, gt=0.0, le=1.0)
    n_train_patches: int = Field(default=300_000, ge=1_000, le=2_000_000)
    metric_lambda: float = Field(default=1.5e-4, gt=0.0)
    dim: int = Field(default=10, ge=1, le=64)
    random_state: int = 0


class ModelManifest(BaseModel):
    version: str
    tenant: str
    collection: str
    created_at: float
    params: TrainRequest
    n_templates: int
    label_counts: dict[str, int]
    feature_dim: int
    projected_dim: int
    train_seconds: float
    # Where the training Fisher vectors were computed: "numpy" (the reference) or
    # "torch:<device>" (pecore.torch_features); PCA, GMM and CFML are fitted on the CPU.
    feature_backend: str = "numpy"


class ReindexPlan(BaseModel):
    """Written once by the re-index fan-out (a redelivered fan-out keeps the first one)."""

    version: str
    total: int = Field(ge=0)  # the collection's images when the fan-out ran
    batches: int = Field(ge=0)
    started_at: float


class ReindexProgress(BaseModel):
    """How far the re-index of the version being indexed is: vectors the search service holds
    for it against the plan's total, the rate since the fan-out and the time left at that rate."""

    version: str
    done: int
    total: int
    started_at: float
    images_per_s: float | None = None
    eta_seconds: float | None = None


class ModelStatus(BaseModel):
    collection: str
    owner: str
    indexing_version: str | None
    training: dict[str, object] | None = None
    serving_version: str | None = None
    n_vectors: int = 0
    pending_version: str | None = None
    pending_vectors: int = 0
    n_images: int | None = None
    reindex: ReindexProgress | None = None


class TrainAccepted(BaseModel):
    version: str
    collection: str
    status_url: str


class IndexStatus(BaseModel):
    """What the search service holds for one collection."""

    collection: str
    owner: str
    serving_version: str | None
    n_vectors: int
    pending_version: str | None = None
    pending_vectors: int = 0


# Largest k a search may ask for (a full ranking of a few thousand images, for evaluation).
MAX_K = 5000


# k-NN for an already projected vector (the search service's diagnostics endpoint). No
# docstring: it would become the schema's description in the OpenAPI document.
class VectorQuery(BaseModel):
    vector: list[float]
    k: int = Field(default=10, ge=1, le=MAX_K)
