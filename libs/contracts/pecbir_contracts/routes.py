"""HTTP path templates of the pe-cbir APIs: the one place a URL path is spelled.

The servers' route decorators use these constants as they are; clients fill them in with
`str.format` (``GATEWAY_IMAGE.format(collection=name, image_id=image_id)``). Path parameters
are names and ids the services validate (`pecbir_contracts.layout.check_name`, 32-hex image
ids), so they need no URL quoting.

Each service has its own prefix of names: ``GATEWAY_*`` (the cloud's public API),
``SEARCH_*`` (the search service, called by the gateway only) and ``ENCRYPTOR_*`` (the
owner-side encryptor at the hospital). Several paths are spelled the same on two services
(the encryptor mirrors the gateway's upload and search paths); they are still separate
constants, because each belongs to its own API and may evolve on its own.
"""

from __future__ import annotations

__all__ = [
    "ENCRYPTOR_IMAGES",
    "ENCRYPTOR_IMAGE_STATUS",
    "ENCRYPTOR_KEY_RELEASE",
    "ENCRYPTOR_PATCH_MODEL",
    "ENCRYPTOR_PLAIN_IMAGE",
    "ENCRYPTOR_SEARCH",
    "ENCRYPTOR_STOW_STUDIES",
    "ENCRYPTOR_STOW_STUDY",
    "ENCRYPTOR_WADO_INSTANCE",
    "GATEWAY_BLOB",
    "GATEWAY_IMAGE",
    "GATEWAY_IMAGES",
    "GATEWAY_IMAGE_CIPHER",
    "GATEWAY_IMAGE_MASK",
    "GATEWAY_IMAGE_SEALED",
    "GATEWAY_IMAGE_STATUS",
    "GATEWAY_MODEL",
    "GATEWAY_MODEL_TRAIN",
    "GATEWAY_MODEL_VERSION",
    "GATEWAY_PATCH_MODEL",
    "GATEWAY_PROTECTION",
    "GATEWAY_SEALED_IMAGES",
    "GATEWAY_SEARCH",
    "GATEWAY_SEARCH_FISHER",
    "GATEWAY_SEARCH_STORED",
    "HEALTHZ",
    "SEARCH_IMAGE",
    "SEARCH_KNN",
    "SEARCH_SEARCH",
    "SEARCH_SEARCH_FISHER",
    "SEARCH_SEARCH_STORED",
    "SEARCH_STATUS",
]

HEALTHZ = "/healthz"

# -- gateway (the cloud's public API) ----------------------------------------------------------
GATEWAY_IMAGES = "/v1/collections/{collection}/images"
GATEWAY_IMAGE = "/v1/collections/{collection}/images/{image_id}"
GATEWAY_IMAGE_STATUS = "/v1/collections/{collection}/images/{image_id}/status"
GATEWAY_IMAGE_CIPHER = "/v1/collections/{collection}/images/{image_id}/cipher"
GATEWAY_IMAGE_MASK = "/v1/collections/{collection}/images/{image_id}/mask"
GATEWAY_BLOB = "/v1/blobs/{token}"
GATEWAY_SEARCH = "/v1/collections/{collection}/search"
GATEWAY_MODEL = "/v1/collections/{collection}/model"
GATEWAY_MODEL_TRAIN = "/v1/collections/{collection}/model/train"
GATEWAY_MODEL_VERSION = "/v1/collections/{collection}/model/{version}"
# sealed mode: the owner's patch model, sealed uploads and their blobs, Fisher-vector queries
GATEWAY_PATCH_MODEL = "/v1/collections/{collection}/patch-model"
GATEWAY_PROTECTION = "/v1/collections/{collection}/protection"
GATEWAY_SEALED_IMAGES = "/v1/collections/{collection}/sealed-images"
GATEWAY_IMAGE_SEALED = "/v1/collections/{collection}/images/{image_id}/sealed"
GATEWAY_SEARCH_FISHER = "/v1/collections/{collection}/search/fisher-vector"
# a query that is one of the caller's own stored images, by reference: no new cipher is sent
GATEWAY_SEARCH_STORED = "/v1/collections/{collection}/images/{image_id}/search"

# -- search service (behind the gateway) -------------------------------------------------------
SEARCH_SEARCH = "/v1/collections/{collection}/search"
SEARCH_SEARCH_FISHER = "/v1/collections/{collection}/search/fisher-vector"
SEARCH_SEARCH_STORED = "/v1/collections/{collection}/images/{image_id}/search"
SEARCH_KNN = "/v1/collections/{collection}/knn"
SEARCH_STATUS = "/v1/collections/{collection}/status"
SEARCH_IMAGE = "/v1/collections/{collection}/images/{image_id}"

# -- encryptor (owner side) --------------------------------------------------------------------
ENCRYPTOR_IMAGES = "/v1/collections/{collection}/images"
# The `status_url` of an upload answer, relative: it works on the encryptor and the gateway.
ENCRYPTOR_IMAGE_STATUS = "/v1/collections/{collection}/images/{image_id}/status"
ENCRYPTOR_SEARCH = "/v1/collections/{collection}/search"
ENCRYPTOR_PLAIN_IMAGE = "/v1/collections/{collection}/images/{image_id}/plain"
ENCRYPTOR_STOW_STUDIES = "/dicomweb/{collection}/studies"
ENCRYPTOR_STOW_STUDY = "/dicomweb/{collection}/studies/{study}"
# DICOMweb WADO-RS retrieve of one stored instance, decrypted (the STOW answer's RetrieveURL).
ENCRYPTOR_WADO_INSTANCE = (
    "/dicomweb/{collection}/studies/{study}/series/{series}/instances/{instance}"
)
ENCRYPTOR_KEY_RELEASE = "/v1/keys/release"
ENCRYPTOR_PATCH_MODEL = "/v1/collections/{collection}/patch-model"
