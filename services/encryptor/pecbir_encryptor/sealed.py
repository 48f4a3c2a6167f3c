"""The sealed protection mode at the owner: patch models, features, sealing and opening.

In a sealed collection no pixel leaves the hospital in any form the cloud can read: the
encryptor seals image, mask and private metadata with AES-256-GCM (`pecore.sealing`) and
computes the image's Fisher vector itself with the collection's patch model
(`pecore.owner_features`), which the owner fitted on its own plain images and published to the
cloud.  The cloud stores the blob opaquely and learns its metric from the Fisher vectors and
the labels of the training templates only.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pecbir_contracts.schemas import SealedImageMetadata
from pecbir_encryptor.gateway_client import GatewayClient, GatewayError
from pecbir_encryptor.protection import UntrustedProtection
from pecore.cipher import to_uint8
from pecore.keys import MasterKey
from pecore.owner_features import PatchModelFeaturizer
from pecore.sealing import SealedIdentity, seal_image

__all__ = ["PatchModels", "SealedUpload", "features_of", "seal_for_cloud"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SealedUpload:
    """What the encryptor sends to the cloud for one image of a sealed collection.

    Attributes
    ----------
    blob
        The sealed image, mask and private metadata (`pecore.sealing`).
    fisher_vector
        float32 (F,): its features, computed at the owner with the published patch model.
    metadata
        The cloud's record: no pixel, no mask, a label only for a training template.
    """

    blob: bytes
    fisher_vector: np.ndarray
    metadata: SealedImageMetadata


def features_of(
    featurizer: PatchModelFeaturizer, pixels: np.ndarray, mask: np.ndarray
) -> np.ndarray:
    """The Fisher vector of one plain image: its 8-bit version (the `pe` rule) and mask."""
    plain, _ = to_uint8(pixels)
    return featurizer.fisher_vectors([plain], [np.asarray(mask, dtype=bool)])[0]


def seal_for_cloud(
    pixels: np.ndarray,
    mask: np.ndarray,
    *,
    master: MasterKey,
    tenant: str,
    collection: str,
    opaque_id: str,
    model: tuple[PatchModelFeaturizer, str],
    label: int | None,
    role: str = "template",
    train: bool = False,
    lossy: bool = False,
) -> SealedUpload:
    """Seal one image for a sealed collection and compute its Fisher vector.

    Parameters
    ----------
    pixels, mask
        The plain image (sealed bit-exactly, any depth) and its checked tumour mask.
    master
        The owner's active master key (wraps the image's fresh data key).
    tenant, collection, opaque_id
        The identity the blob is bound to.
    model
        The collection's patch model and the SHA-256 of its published bytes.
    label, role
        The image's class label and role; both are sealed inside the blob.
    train
        Whether the image is a training template: only then does the cloud's record carry
        its label (which CFML needs).
    lossy
        The pixels went through lossy compression (`pecore.io.dicom_is_lossy`): marked inside
        the blob, so whoever opens it knows they are not the acquisition's.

    Returns
    -------
    SealedUpload
        Blob, Fisher vector and the cloud's record.
    """
    featurizer, digest = model
    label = label if role == "template" else None
    fisher = features_of(featurizer, pixels, mask)
    identity = SealedIdentity(tenant=tenant, collection=collection, image_id=opaque_id)
    # Content-bound keys: a re-push of the same image is the same blob (idempotent upload);
    # other pixels under the same opaque id get an unrelated data key and are refused (409).
    private: dict[str, object] = {"role": role, "label": label, "train": train}
    if lossy:
        # Only when true: the blobs of lossless images stay byte-identical to those sealed
        # before this mark existed (a re-push is still idempotent).
        private["lossy"] = True
    blob = seal_image(
        pixels,
        mask,
        master,
        identity,
        metadata=private,
        content_bound=True,
    )
    metadata = SealedImageMetadata(
        opaque_id=opaque_id,
        role=role,
        label=label if train else None,
        key_id=master.key_id,
        patch_model=digest,
        feature_dim=int(fisher.shape[0]),
    )
    return SealedUpload(blob=blob, fisher_vector=fisher, metadata=metadata)


class PatchModels:
    """The patch models an encryptor featurises with.

    Its own sealed collections' models are files at the hospital (`<directory>/<collection>
    .npz`, written when the owner publishes one): the cloud cannot swap them.  A collection
    shared by another owner is featurised with the model that owner published, fetched from
    the cloud and kept in memory by its digest.

    Parameters
    ----------
    directory
        Where the owner's own models live (None: no sealed collection of its own).
    gateway
        The gateway client (publishing, and shared collections' models).
    """

    def __init__(self, directory: Path | None, gateway: GatewayClient) -> None:
        self.directory = Path(directory) if directory is not None else None
        self.gateway = gateway
        self._loaded: dict[str, PatchModelFeaturizer] = {}
        self._lock = threading.Lock()

    def _path(self, collection: str) -> Path:
        if self.directory is None:
            raise ValueError("no patch model directory configured (PECBIR_ENCRYPTOR_PATCH_MODELS)")
        return self.directory / f"{collection}.npz"

    def _load(self, data: bytes) -> tuple[PatchModelFeaturizer, str]:
        digest = PatchModelFeaturizer.digest(data)
        with self._lock:
            model = self._loaded.get(digest)
        if model is None:
            model = PatchModelFeaturizer.from_bytes(data)
            model.n_jobs = 1
            with self._lock:
                self._loaded[digest] = model
        return model, digest

    def own(self, collection: str) -> tuple[PatchModelFeaturizer, str]:
        """The model of one of the owner's sealed collections (ValueError if none yet)."""
        path = self._path(collection)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise ValueError(
                f"collection {collection!r} is sealed but has no patch model yet: fit and "
                "publish one first (pecbir-encryptor patch-model)"
            ) from None
        return self._load(data)

    def shared(
        self, owner: str, collection: str, expected: str | None = None
    ) -> tuple[PatchModelFeaturizer, str] | None:
        """The model another owner published for `collection`; None if it is not sealed.

        `expected`: the SHA-256 its owner signed (`pecbir_encryptor.protection`); a model
        the cloud serves with another digest is refused before it is parsed.
        """
        try:
            data = self.gateway.patch_model(collection, owner=owner)
        except GatewayError as exc:
            if exc.status == 404:
                return None
            raise
        digest = PatchModelFeaturizer.digest(data)
        if expected is not None and digest != expected:
            raise UntrustedProtection(
                f"the patch model the cloud serves for {owner}/{collection} (sha256 {digest}) "
                f"is not the one its owner signed ({expected})"
            )
        return self._load(data)

    def publish(self, collection: str, featurizer: PatchModelFeaturizer) -> str:
        """Publish the model to the cloud and keep it at the hospital; its digest."""
        data = featurizer.to_bytes()
        path = self._path(collection)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and path.read_bytes() != data:
            raise ValueError(
                f"collection {collection!r} already has a patch model; a new model needs a "
                "new collection (its images' features were computed with the old one)"
            )
        # The cloud first: a model it refused (e.g. a collection already holding pe images)
        # must not become the collection's model here.
        self.gateway.put_patch_model(collection, data)
        staged = path.with_name(f".{path.name}.new")
        staged.write_bytes(data)
        os.replace(staged, path)
        log.info("published the patch model of %s", collection)
        return PatchModelFeaturizer.digest(data)
