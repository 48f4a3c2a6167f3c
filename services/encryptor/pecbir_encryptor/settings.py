"""Encryptor settings, from the environment (prefix PECBIR_ENCRYPTOR_)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from pecore.cipher import Scheme


class PeerEncryptor(BaseModel):
    """Another hospital's encryptor, asked for the keys of its images among this one's hits."""

    url: str = Field(description="Base URL of that hospital's encryptor")
    token: SecretStr = Field(description="A user token of that encryptor (scope key-release)")


class EncryptorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PECBIR_ENCRYPTOR_", extra="ignore")

    tenant: str = Field(description="The hospital's tenant name in the cloud")
    master_key: Path = Field(description="Master key file (0600), made by `pecbir keygen`")
    # Retired master keys (`*.key`, 0600) kept after a rotation so that images uploaded under
    # them still verify and decrypt; `pecbir-encryptor rotate` fills it.
    keyring_dir: Path | None = None
    gateway_url: str = "http://127.0.0.1:8001"
    gateway_token: SecretStr = Field(description="Bearer token of this tenant at the gateway")
    user_token_secret: SecretStr = Field(description="HMAC secret of this service's user tokens")
    audit_log: Path = Path("var/encryptor-audit.jsonl")
    # any name or alias of pecore.cipher.SCHEMES, checked against the registry
    scheme: Scheme = "ours"
    key_mode: Literal["per-image", "same"] = "per-image"
    # The owner's sealed collections (JSON list in the environment, e.g. '["brain"]'): their
    # images are sealed with AES-256-GCM and featurised here (pecbir_encryptor.sealed); every
    # other collection is protected by the perceptual cipher ("pe").
    sealed_collections: frozenset[str] = frozenset()
    # The owner's pe-roi collections (JSON list): their images are sealed as in a sealed
    # collection, and the cloud extracts the features from a scrambled ROI-only cipher
    # (pecbir_encryptor.pe_roi), with the scheme below: "pe-roi" (the configuration chosen in
    # results/pe-roi/selection/) or an explicit "pe-roi-t<tile>[d|dn][-in]".
    pe_roi_collections: frozenset[str] = frozenset()
    pe_roi_scheme: str = "pe-roi"
    # The owner's policy for uploads that do not say whether they are training templates (a
    # PACS push, DIMSE, or an upload without `train`): templates in these collections (JSON
    # list), whose labels the cloud then reads to train; in every other collection an upload
    # is not a template unless it says so, and its label never reaches the cloud.
    template_collections: frozenset[str] = frozenset()
    # The hospital's keyed index of the images it stored (content digest -> cloud id): a query
    # pixel-identical to one of them is searched by reference, never sent as a second cipher.
    # A volume of its own, like the pending store; unset: no index.
    content_index: Path | None = Path("var/content-index")
    # The owner's Ed25519 key that signs its collections' protection records (base64 of 32
    # bytes, 0600; `pecbir-encryptor signing-key --out F`); unset: derived from the active
    # master key (a rotation then changes the public key peers must hold).
    signing_key: Path | None = None
    # Other owners whose shared collections this hospital searches, and their public keys
    # (JSON: {"hospital-b": "<base64>"}, from `pecbir-encryptor public-key` there): their
    # signed protection records are checked against these; an owner not listed is refused.
    trusted_owners: dict[str, str] = {}
    # Records from before tag v3 name no tenant, collection or id, so a cloud could serve one
    # image's record for another's: refused unless this is set, for a migration window only.
    accept_unbound_records: bool = False
    # Where the patch models of the sealed collections are kept (`<collection>.npz`).
    patch_models: Path = Path("var/patch-models")
    # Images waiting for their DICOM SEG and SEG masks waiting for their image (sealed under
    # the master key, fsync'ed; a volume of its own: it must survive restarts). Unset: an
    # image without a SEG in its own request is refused, as before issue 14.
    pending_dir: Path | None = Path("var/pending")
    # A waiting half expires after this many seconds without its other half (90 days; a
    # re-sent half starts again; unset: never), swept every pending_sweep_interval_s
    # (pecbir_encryptor.janitor, which also retires replaced versions in the cloud).
    pending_ttl_s: float | None = Field(default=90 * 86400, gt=0)
    pending_sweep_interval_s: float = Field(default=3600, gt=0)
    # Study/Series/SOP Instance UIDs of the images that came as DICOM, by cloud image id (sealed
    # under the master key; never sent to the cloud): the page's "open in viewer" links.
    # Unset: none kept, no links.
    dicom_refs_dir: Path | None = Path("var/dicom-refs")
    # A DICOMweb viewer (e.g. OHIF) that opens this hospital's studies, as a URL template with
    # {study}, {series}, {instance} and {collection}: the page links each of this hospital's
    # DICOM-ingested hits to it, e.g. "https://viewer.example/viewer?StudyInstanceUIDs={study}".
    # Unset: no links.
    viewer_url: str | None = None
    # PACS accounts and the SHA-256 of their API keys (`pecbir token mint --kind pacs`); a
    # PACS authenticates with X-API-Key, Bearer <key> or HTTP basic <account>:<key>.
    pacs_credentials: Path | None = Path("var/pacs-credentials.json")
    # The encryptor's URL as its clients reach it (behind a proxy, another host name), for the
    # RetrieveURLs of STOW answers; unset, taken from each request's Host header.
    public_url: str | None = None
    max_upload_bytes: int = 64 * 1024 * 1024
    # A STOW-RS request (a PACS sends one job as one request: a whole study, or 130 of them)
    # is spooled to disk part by part, never held in memory: its own, much larger limit.
    max_stow_bytes: int = 4 * 1024 * 1024 * 1024
    # DIMSE C-STORE / C-ECHO SCP (pecbir_encryptor.dimse): off unless a port is set. Only the
    # calling AE titles listed (JSON list) may associate; every C-STORE goes to one collection.
    dimse_port: int | None = None
    dimse_host: str = "0.0.0.0"
    dimse_ae_title: str = "PECBIR"
    dimse_allowed_aes: frozenset[str] = frozenset()
    dimse_collection: str = "brain"
    # Calling AE title -> collection of this tenant (JSON object, e.g. '{"MR3T": "brain",
    # "NEURO_PACS": "neuro"}'): that AE's C-STOREs go there; a mapped AE title is allowed.
    # Unmapped allowed AE titles go to dimse_collection.
    dimse_ae_collections: dict[str, str] = {}
    dimse_max_associations: int = 4
    dimse_tls_cert: Path | None = None
    dimse_tls_key: Path | None = None
    dimse_tls_ca: Path | None = None
    # Where STOW bodies are spooled while they are processed (default: the system's temp).
    spool_dir: Path | None = None
    # Largest image (rows x columns) accepted, checked from the file's header before any
    # pixel is decoded, on every path (ingest, search, STOW): the gateway's default limit, so
    # that nothing the cloud would refuse is decoded and encrypted first.
    max_pixels: int = 1024 * 1024
    # Budgets per user token, "action=per_s/burst" (the tenant gets 4 tokens' worth; 429 +
    # Retry-After beyond), in the Redis at rate_limits_url or, unset, in this process.
    rate_limits: str = "key-release=2/20,decrypt=20/100,search=10/40,upload=20/200"
    rate_limits_url: str | None = None
    gateway_timeout_s: float = 60.0
    # Other hospitals' encryptors (JSON: {"hospital-b": {"url": "...", "token": "..."}}): the
    # keys of their images among this hospital's hits are asked of them (audited on both
    # sides); a hit of an owner not listed, or one that refuses, is shown "not released".
    peers: dict[str, PeerEncryptor] = {}
    # What the web page (/ui) searches: this hospital's collections by name, shared ones of
    # other hospitals as "owner/collection" (JSON list in the environment).
    ui_collections: tuple[str, ...] = ("brain",)
    # The page's session cookie Secure (sent over HTTPS only): None, when the page was loaded
    # over HTTPS; set true behind a proxy that terminates TLS.
    ui_secure_cookie: bool | None = None

    @field_validator("dimse_allowed_aes")
    @classmethod
    def _ae_titles(cls, value: frozenset[str]) -> frozenset[str]:
        from pecbir_encryptor.dimse import check_ae_title

        return frozenset(check_ae_title(title) for title in value)

    @field_validator("dimse_ae_collections")
    @classmethod
    def _ae_collections(cls, value: dict[str, str]) -> dict[str, str]:
        from pecbir_contracts.layout import check_name
        from pecbir_encryptor.dimse import check_ae_title

        return {check_ae_title(t): check_name(c, "collection") for t, c in value.items()}

    @field_validator("dimse_collection")
    @classmethod
    def _dimse_collection(cls, value: str) -> str:
        from pecbir_contracts.layout import check_name

        return check_name(value, "collection")

    @field_validator("viewer_url")
    @classmethod
    def _viewer_template(cls, value: str | None) -> str | None:
        from pecbir_encryptor.dicom_refs import check_viewer_template

        return check_viewer_template(value) if value else None

    @field_validator("pe_roi_scheme")
    @classmethod
    def _known_pe_roi_scheme(cls, value: str) -> str:
        from pecore.cipher_roi import RoiCipher

        RoiCipher.from_name(value)  # ValueError names the accepted spellings
        return value
