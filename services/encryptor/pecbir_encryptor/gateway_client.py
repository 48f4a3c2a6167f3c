"""The encryptor's HTTP client of the cloud gateway: uploads, downloads and searches.

Only bytes and the cloud's wire models cross this boundary; encryption, the integrity tag and
the decoding of what the cloud hands back stay in `pecbir_encryptor.core`.
"""

from __future__ import annotations

import json

import httpx

from pecbir_contracts.routes import (
    GATEWAY_IMAGE,
    GATEWAY_IMAGE_CIPHER,
    GATEWAY_IMAGE_MASK,
    GATEWAY_IMAGE_SEALED,
    GATEWAY_IMAGE_STATUS,
    GATEWAY_IMAGES,
    GATEWAY_PATCH_MODEL,
    GATEWAY_PROTECTION,
    GATEWAY_SEALED_IMAGES,
    GATEWAY_SEARCH,
    GATEWAY_SEARCH_FISHER,
    GATEWAY_SEARCH_STORED,
)
from pecbir_contracts.schemas import CollectionProtection, SearchResponse, SignedProtection
from pecbir_encryptor.settings import EncryptorSettings

__all__ = ["GatewayClient", "GatewayError", "gateway_http_client"]


class GatewayError(RuntimeError):
    """The gateway answered with an unexpected status.

    Attributes
    ----------
    status
        The HTTP status code of the gateway's answer.
    detail
        The gateway's ``detail`` message (or the start of its body).
    """

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"gateway answered {status}: {detail}")
        self.status = status
        self.detail = detail


def gateway_http_client(
    settings: EncryptorSettings, *, client: httpx.Client | None = None
) -> httpx.Client:
    """An HTTP client of the gateway that carries this tenant's bearer token.

    Parameters
    ----------
    settings
        The encryptor's settings (gateway URL, timeout and token).
    client
        A client to use (tests, the embedded demo) instead of a new one for
        ``settings.gateway_url``.

    Returns
    -------
    httpx.Client
        `client` or a new client; its requests carry ``Authorization: Bearer <token>``.
    """
    if client is None:
        client = httpx.Client(base_url=settings.gateway_url, timeout=settings.gateway_timeout_s)
    client.headers["authorization"] = f"Bearer {settings.gateway_token.get_secret_value()}"
    return client


def _owner_params(owner: str | None) -> dict[str, str]:
    return {"owner": owner} if owner else {}


def _detail(answer: httpx.Response) -> str:
    try:
        return str(answer.json().get("detail", answer.text))
    except ValueError:
        return answer.text[:300]


class GatewayClient:
    """Calls of the gateway's public API that the encryptor makes.

    Parameters
    ----------
    http
        An HTTP client with the gateway's base URL and the tenant's bearer token
        (see `gateway_http_client`).
    """

    def __init__(self, http: httpx.Client) -> None:
        self.http = http

    def upload(
        self,
        collection: str,
        *,
        cipher_png: bytes,
        mask_png: bytes,
        metadata_json: str,
        idempotency_key: str | None,
        blob: bytes | None = None,
    ) -> dict:
        """Upload one protected image; the gateway's 202 answer (UploadAccepted as a dict).

        `blob`: a pe-roi image's sealed blob (the image itself; the cipher and mask are then
        its ROI-only feature image and the scrambled ROI).

        Raises
        ------
        GatewayError
            For any status other than 202.
        """
        files = {
            "cipher": ("cipher.png", cipher_png, "image/png"),
            "mask": ("mask.png", mask_png, "image/png"),
            "metadata": (None, metadata_json),
        }
        if blob is not None:
            files["blob"] = ("sealed.bin", blob, "application/octet-stream")
        return self._post_upload(
            GATEWAY_IMAGES.format(collection=collection), files, idempotency_key
        )

    def upload_sealed(
        self,
        collection: str,
        *,
        blob: bytes,
        fisher_npy: bytes,
        metadata_json: str,
        idempotency_key: str | None,
    ) -> dict:
        """Upload one sealed image with its Fisher vector (sealed mode); the 202 answer.

        Raises
        ------
        GatewayError
            For any status other than 202.
        """
        files = {
            "blob": ("sealed.bin", blob, "application/octet-stream"),
            "fisher_vector": ("fisher.npy", fisher_npy, "application/octet-stream"),
            "metadata": (None, metadata_json),
        }
        path = GATEWAY_SEALED_IMAGES.format(collection=collection)
        return self._post_upload(path, files, idempotency_key)

    def _post_upload(self, path: str, files: dict, idempotency_key: str | None) -> dict:
        """POST an upload's parts with its idempotency key; the 202 answer (else GatewayError)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        answer = self.http.post(path, files=files, headers=headers)
        if answer.status_code != 202:
            raise GatewayError(answer.status_code, _detail(answer))
        return answer.json()

    def put_patch_model(self, collection: str, data: bytes) -> None:
        """Publish a collection's patch model (GatewayError unless 201 or 200)."""
        answer = self.http.put(
            GATEWAY_PATCH_MODEL.format(collection=collection),
            files={"model": ("patch-model.npz", data, "application/octet-stream")},
        )
        if answer.status_code not in (200, 201):
            raise GatewayError(answer.status_code, _detail(answer))

    def patch_model(self, collection: str, *, owner: str | None) -> bytes:
        """A collection's published patch model (GatewayError unless 200; 404: not sealed)."""
        answer = self.http.get(
            GATEWAY_PATCH_MODEL.format(collection=collection), params=_owner_params(owner)
        )
        if answer.status_code != 200:
            raise GatewayError(answer.status_code, _detail(answer))
        return answer.content

    def protection(self, collection: str, *, owner: str | None) -> CollectionProtection:
        """A collection's protection mode as the cloud holds it (GatewayError unless 200)."""
        answer = self.http.get(
            GATEWAY_PROTECTION.format(collection=collection), params=_owner_params(owner)
        )
        if answer.status_code != 200:
            raise GatewayError(answer.status_code, _detail(answer))
        return CollectionProtection.model_validate_json(answer.content)

    def put_protection(self, collection: str, signed: SignedProtection) -> None:
        """Publish the owner's signed protection record of a collection (GatewayError unless
        200)."""
        answer = self.http.put(
            GATEWAY_PROTECTION.format(collection=collection),
            content=signed.model_dump_json(),
            headers={"content-type": "application/json"},
        )
        if answer.status_code != 200:
            raise GatewayError(answer.status_code, _detail(answer))

    def sealed(self, collection: str, image_id: str, *, owner: str | None) -> bytes:
        """The stored sealed blob of an image. GatewayError unless 200."""
        return self._get(GATEWAY_IMAGE_SEALED, collection, image_id, owner)

    def put_sealed(self, collection: str, image_id: str, blob: bytes) -> None:
        """Replace a sealed blob by its re-wrapped copy (GatewayError unless 200)."""
        answer = self.http.put(
            GATEWAY_IMAGE_SEALED.format(collection=collection, image_id=image_id),
            files={"blob": ("sealed.bin", blob, "application/octet-stream")},
        )
        if answer.status_code != 200:
            raise GatewayError(answer.status_code, _detail(answer))

    def search_fisher(
        self, collection: str, *, fisher_npy: bytes, k: int, owner: str | None
    ) -> SearchResponse:
        """k-NN search with a Fisher vector computed at the owner (sealed collections).

        Raises
        ------
        GatewayError
            For any status other than 200.
        """
        answer = self.http.post(
            GATEWAY_SEARCH_FISHER.format(collection=collection),
            params=_owner_params(owner),
            files={"fisher_vector": ("query.npy", fisher_npy, "application/octet-stream")},
            data={"k": str(k)},
        )
        if answer.status_code != 200:
            raise GatewayError(answer.status_code, _detail(answer))
        return SearchResponse.model_validate_json(answer.content)

    def search_stored(self, collection: str, image_id: str, *, k: int) -> SearchResponse:
        """k-NN search with one of this tenant's stored images, by reference (nothing new is
        sent: the cloud ranks with the vector it holds for that image).

        Raises
        ------
        GatewayError
            For any status other than 200 (404: no such image; 409: not yet indexed).
        """
        answer = self.http.post(
            GATEWAY_SEARCH_STORED.format(collection=collection, image_id=image_id),
            data={"k": str(k)},
        )
        if answer.status_code != 200:
            raise GatewayError(answer.status_code, _detail(answer))
        return SearchResponse.model_validate_json(answer.content)

    def _get(self, template: str, collection: str, image_id: str, owner: str | None) -> bytes:
        answer = self.http.get(
            template.format(collection=collection, image_id=image_id), params=_owner_params(owner)
        )
        if answer.status_code != 200:
            raise GatewayError(answer.status_code, _detail(answer))
        return answer.content

    def metadata(self, collection: str, image_id: str, *, owner: str | None) -> bytes:
        """The stored ImageMetadata record of an image, as JSON bytes (not yet validated).

        Raises
        ------
        GatewayError
            For any status other than 200.
        """
        return self._get(GATEWAY_IMAGE, collection, image_id, owner)

    def status(self, collection: str, image_id: str, *, owner: str | None) -> dict:
        """Where an uploaded image stands (ImageStatus as a dict). GatewayError unless 200."""
        return json.loads(self._get(GATEWAY_IMAGE_STATUS, collection, image_id, owner))

    def retire(self, collection: str, image_id: str, reason: str) -> None:
        """Retire one of this tenant's images in the cloud (out of search and training).

        Raises
        ------
        GatewayError
            For any status other than 202 (retiring again is answered 202 too).
        """
        answer = self.http.request(
            "DELETE",
            GATEWAY_IMAGE.format(collection=collection, image_id=image_id),
            json={"reason": reason},
        )
        if answer.status_code != 202:
            raise GatewayError(answer.status_code, _detail(answer))

    def cipher(self, collection: str, image_id: str, *, owner: str | None) -> bytes:
        """The stored cipher image (PNG bytes, not yet decoded). GatewayError unless 200."""
        return self._get(GATEWAY_IMAGE_CIPHER, collection, image_id, owner)

    def mask(self, collection: str, image_id: str, *, owner: str | None) -> bytes:
        """The stored tumour mask (PNG bytes, not yet decoded). GatewayError unless 200."""
        return self._get(GATEWAY_IMAGE_MASK, collection, image_id, owner)

    def search(
        self, collection: str, *, cipher_png: bytes, mask_png: bytes, k: int, owner: str | None
    ) -> SearchResponse:
        """k-NN search with a cipher query image and its mask.

        Raises
        ------
        GatewayError
            For any status other than 200.
        """
        answer = self.http.post(
            GATEWAY_SEARCH.format(collection=collection),
            params=_owner_params(owner),
            files={
                "cipher": ("query.png", cipher_png, "image/png"),
                "mask": ("mask.png", mask_png, "image/png"),
            },
            data={"k": str(k)},
        )
        if answer.status_code != 200:
            raise GatewayError(answer.status_code, _detail(answer))
        return SearchResponse.model_validate_json(answer.content)
