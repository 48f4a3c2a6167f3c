"""The owner-side encryptor: takes plain DICOM/PNG/NPY from a PACS, sends only ciphertext on.

Runs at the hospital and holds the master key. Its users authenticate with bearer tokens of
this service (not the cloud's); key release is audited.
"""

import hashlib
from typing import Annotated

import httpx
import numpy as np
from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel

from pecbir_contracts.auth import AuthError, Claims, Forbidden, bearer, verify_token
from pecbir_contracts.layout import check_image_id, check_name
from pecbir_contracts.png import encode_png
from pecbir_contracts.schemas import MAX_K
from pecbir_encryptor import ops
from pecbir_encryptor.core import Encryptor, GatewayError
from pecbir_encryptor.dicom import (
    FAILURE_CANNOT_UNDERSTAND,
    FAILURE_PROCESSING,
    FAILURE_SOP_CLASS_MISMATCH,
    StowError,
    is_seg,
    parse_multipart_related,
    read_instance,
    read_seg,
    stow_response,
)
from pecbir_encryptor.inputs import read_mask, read_pixels
from pecbir_encryptor.integrity import IntegrityError
from pecbir_encryptor.keyring import Keyring
from pecbir_encryptor.settings import EncryptorSettings
from pecore.io import read_dicom
from pecore.keys import MasterKey

DICOM_JSON = "application/dicom+json"


class KeyReleaseRequest(BaseModel):
    collection: str
    image_id: str


def create_app(
    settings: EncryptorSettings | None = None,
    *,
    master: MasterKey | Keyring | None = None,
    gateway_client: httpx.Client | None = None,
) -> FastAPI:
    settings = settings or EncryptorSettings()  # type: ignore[call-arg]
    master = master or Keyring.load(settings.master_key, settings.keyring_dir)
    gateway = gateway_client or httpx.Client(
        base_url=settings.gateway_url, timeout=settings.gateway_timeout_s
    )
    gateway.headers["authorization"] = f"Bearer {settings.gateway_token.get_secret_value()}"
    encryptor = Encryptor(
        master,
        gateway,
        scheme=settings.scheme,
        key_mode=settings.key_mode,
        audit_log=settings.audit_log,
    )
    secret = settings.user_token_secret.get_secret_value().encode()
    app = FastAPI(
        title="pe-cbir encryptor (owner side)",
        version="1",
        description="Plain images in, cipher images to the cloud; decryption for key holders.",
    )
    app.state.encryptor = encryptor

    def caller(request: Request) -> Claims:
        try:
            claims = verify_token(secret, bearer(request.headers.get("authorization")))
        except AuthError as exc:
            encryptor.audit(action=request.url.path, outcome="unauthenticated", reason=str(exc))
            raise HTTPException(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from None
        if claims.tenant != settings.tenant:
            encryptor.audit(
                action=request.url.path, sub=claims.sub, outcome="denied", reason="other tenant"
            )
            raise HTTPException(403, f"this encryptor serves tenant {settings.tenant!r}")
        return claims

    Caller = Annotated[Claims, Depends(caller)]

    def need(claims: Claims, scope: str) -> None:
        try:
            claims.require(scope)
        except Forbidden as exc:
            raise HTTPException(403, str(exc)) from None

    def collection_name(collection: str) -> str:
        try:
            return check_name(collection, "collection")
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None

    def gateway_failed(exc: GatewayError) -> HTTPException:
        status = exc.status if exc.status in (404, 409, 413, 422) else 502
        return HTTPException(status, f"cloud gateway: {exc.detail}")

    def read_limited(upload: UploadFile, what: str) -> bytes:
        data = upload.file.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise HTTPException(413, f"{what}: larger than {settings.max_upload_bytes} bytes")
        return data

    # -- research / PNG / NPY / single DICOM ------------------------------------------------------
    @app.post("/v1/collections/{collection}/images", status_code=202, tags=["ingest"])
    def ingest(
        collection: str,
        claims: Caller,
        image: Annotated[UploadFile, File(description="DICOM, PNG or NPY plain image")],
        mask: Annotated[UploadFile, File(description="tumour mask: PNG, NPY or DICOM SEG")],
        label: Annotated[int | None, Form(ge=0, le=255)] = None,
        role: Annotated[str, Form(pattern="^(template|query)$")] = "template",
    ) -> dict[str, object]:
        need(claims, "upload")
        collection = collection_name(collection)
        try:
            image_bytes, mask_bytes = read_limited(image, "image"), read_limited(mask, "mask")
            pixels, source_uid = read_pixels(image_bytes, "image")
            plain_mask, seg_label = read_mask(mask_bytes)
            # DICOM: keyed pseudonym of the SOP Instance UID; files: of their content. Either
            # way a repeated upload maps to the same id and so to the same cloud object.
            content = hashlib.sha256(image_bytes + b"\x00" + mask_bytes).hexdigest()
            opaque_id = encryptor.opaque_id_for(source_uid or f"content:{content}")
            protected = encryptor.protect(
                pixels,
                plain_mask,
                opaque_id=opaque_id,
                label=label if label is not None else seg_label,
                role=role,
            )
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        try:
            answer = encryptor.upload(collection, protected, f"owner-{opaque_id}")
        except GatewayError as exc:
            raise gateway_failed(exc) from None
        return {"opaque_id": opaque_id, "upload": answer}

    # -- DICOMweb STOW-RS --------------------------------------------------------------------------
    def stow(
        collection: str, request_body: bytes, content_type: str, label, role, base
    ) -> Response:
        try:
            parts = parse_multipart_related(content_type, request_body)
        except StowError as exc:
            status = 415 if "Content-Type" in str(exc) or "type=" in str(exc) else 400
            raise HTTPException(status, str(exc)) from None
        instances = [
            read_instance(body, headers.get("content-type", "")) for headers, body in parts
        ]
        stored: list[tuple[str, str, str | None]] = []
        failed: list[tuple[str, str, int, str]] = []
        masks = {}
        images = []
        for instance in instances:
            if instance.error is not None:
                failed.append(("", "", *instance.error))
            elif is_seg(instance):
                try:
                    seg = read_seg(instance.dataset)
                except ValueError as exc:
                    failed.append(
                        (
                            instance.sop_class,
                            instance.sop_instance,
                            FAILURE_CANNOT_UNDERSTAND,
                            str(exc),
                        )
                    )
                    continue
                for uid in seg.referenced:
                    masks[uid] = (seg, instance)
                if not seg.referenced:
                    failed.append(
                        (
                            instance.sop_class,
                            instance.sop_instance,
                            FAILURE_PROCESSING,
                            "SEG references no source image",
                        )
                    )
            else:
                images.append(instance)
        used_segs = set()
        for instance in images:
            uid = instance.sop_instance
            if "PixelData" not in instance.dataset:
                failed.append(
                    (instance.sop_class, uid, FAILURE_SOP_CLASS_MISMATCH, "no pixel data")
                )
                continue
            if uid not in masks:
                failed.append(
                    (
                        instance.sop_class,
                        uid,
                        FAILURE_PROCESSING,
                        "no DICOM SEG tumour mask references this image",
                    )
                )
                continue
            seg, seg_instance = masks[uid]
            try:
                pixels, _ = read_dicom(instance.payload)
                protected = encryptor.protect(
                    pixels,
                    seg.mask,
                    opaque_id=encryptor.opaque_id_for(uid),
                    label=label if label is not None else seg.label,
                    role=role,
                )
                answer = encryptor.upload(
                    collection, protected, f"stow-{protected.metadata.opaque_id}"
                )
            except ValueError as exc:
                failed.append((instance.sop_class, uid, FAILURE_CANNOT_UNDERSTAND, str(exc)))
                continue
            except GatewayError as exc:
                failed.append((instance.sop_class, uid, FAILURE_PROCESSING, exc.detail))
                continue
            stored.append(
                (
                    instance.sop_class,
                    uid,
                    f"{base}/v1/collections/{collection}/images/{answer['image_id']}/plain",
                )
            )
            used_segs.add(seg_instance.sop_instance)
        for _seg, seg_instance in {id(v[1]): v for v in masks.values()}.values():
            if seg_instance.sop_instance in used_segs:
                stored.append((seg_instance.sop_class, seg_instance.sop_instance, None))
            else:
                failed.append(
                    (
                        seg_instance.sop_class,
                        seg_instance.sop_instance,
                        FAILURE_PROCESSING,
                        "SEG source image not stored in this request",
                    )
                )
        status, body = stow_response(stored, failed)
        encryptor.audit(
            action="stow", collection=collection, stored=len(stored), failed=len(failed)
        )
        return JSONResponse(status_code=status, content=body, media_type=DICOM_JSON)

    @app.post("/dicomweb/{collection}/studies", tags=["dicomweb"])
    async def stow_rs(
        collection: str,
        request: Request,
        claims: Caller,
        label: Annotated[int | None, Query(ge=0, le=255)] = None,
        role: Annotated[str, Query(pattern="^(template|query)$")] = "template",
    ) -> Response:
        """DICOMweb STOW-RS: images with their DICOM SEG tumour masks in one request."""
        need(claims, "upload")
        collection = collection_name(collection)
        body = await request.body()
        if len(body) > settings.max_upload_bytes:
            raise HTTPException(413, f"request larger than {settings.max_upload_bytes} bytes")
        base = str(request.base_url).rstrip("/")
        from starlette.concurrency import run_in_threadpool

        return await run_in_threadpool(
            stow, collection, body, request.headers.get("content-type", ""), label, role, base
        )

    @app.post("/dicomweb/{collection}/studies/{study}", tags=["dicomweb"])
    async def stow_rs_study(
        collection: str,
        study: str,
        request: Request,
        claims: Caller,
        label: Annotated[int | None, Query(ge=0, le=255)] = None,
        role: Annotated[str, Query(pattern="^(template|query)$")] = "template",
    ) -> Response:
        return await stow_rs(collection, request, claims, label, role)

    # -- search and decryption ---------------------------------------------------------------------
    @app.post("/v1/collections/{collection}/search", tags=["search"])
    def search(
        collection: str,
        claims: Caller,
        image: Annotated[UploadFile, File(description="plain query image: DICOM, PNG or NPY")],
        mask: Annotated[UploadFile, File(description="its tumour mask: PNG, NPY or DICOM SEG")],
        k: Annotated[int, Form(ge=1, le=MAX_K)] = 10,
        owner: Annotated[str | None, Query()] = None,
    ) -> dict[str, object]:
        need(claims, "search")
        collection = collection_name(collection)
        try:
            pixels, _ = read_pixels(read_limited(image, "image"), "image")
            plain_mask, _ = read_mask(read_limited(mask, "mask"))
            result = encryptor.search(collection, pixels, plain_mask, k, owner)
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        except GatewayError as exc:
            raise gateway_failed(exc) from None
        body = result.model_dump(mode="json")
        for hit in body["hits"]:
            hit["plain_url"] = f"/v1/collections/{collection}/images/{hit['image_id']}/plain"
        return body

    @app.get(
        "/v1/collections/{collection}/images/{image_id}/plain",
        responses={200: {"content": {"image/png": {}, "application/octet-stream": {}}}},
        tags=["search"],
    )
    def plain_image(
        collection: str,
        image_id: str,
        claims: Caller,
        format: Annotated[str, Query(pattern="^(png|npy)$")] = "png",
    ) -> Response:
        """Fetch a cipher image from the cloud, verify the owner's tag, decrypt bit-exactly."""
        need(claims, "decrypt")
        collection = collection_name(collection)
        try:
            check_image_id(image_id)
            plain, _mask, metadata = encryptor.fetch_plain(collection, image_id)
        except IntegrityError as exc:
            encryptor.audit(
                action="decrypt",
                sub=claims.sub,
                image_id=image_id,
                outcome="refused",
                reason=str(exc),
            )
            raise HTTPException(502, str(exc)) from None
        except GatewayError as exc:
            raise gateway_failed(exc) from None
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from None
        encryptor.audit(action="decrypt", sub=claims.sub, image_id=image_id, outcome="ok")
        headers = {"X-Opaque-Id": metadata.opaque_id}
        if format == "npy":
            import io

            buffer = io.BytesIO()
            np.save(buffer, plain, allow_pickle=False)
            return Response(
                buffer.getvalue(), media_type="application/octet-stream", headers=headers
            )
        return Response(encode_png(plain), media_type="image/png", headers=headers)

    @app.post("/v1/keys/release", tags=["keys"])
    def release_key(request: KeyReleaseRequest, claims: Caller) -> dict[str, object]:
        """The key of one image, for an authorised image user (audited, allowed or not)."""
        record = {"action": "key-release", "sub": claims.sub, "image_id": request.image_id}
        try:
            claims.require("key-release")
        except Forbidden as exc:
            encryptor.audit(**record, outcome="denied", reason=str(exc))
            raise HTTPException(403, str(exc)) from None
        collection = collection_name(request.collection)
        try:
            check_image_id(request.image_id)
            cipher, mask, metadata = encryptor.fetch(collection, request.image_id)
            key = encryptor.release_key(cipher, mask, metadata)
        except (IntegrityError, ValueError) as exc:
            encryptor.audit(**record, outcome="refused", reason=str(exc))
            raise HTTPException(422, str(exc)) from None
        except GatewayError as exc:
            encryptor.audit(**record, outcome="refused", reason=exc.detail)
            raise gateway_failed(exc) from None
        encryptor.audit(**record, opaque_id=metadata.opaque_id, outcome="released")
        return {
            "image_id": request.image_id,
            "scheme": metadata.key.scheme,
            "key": key.model_dump(mode="json"),
        }

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        return {"status": "ok", "tenant": settings.tenant, "key_id": encryptor.master.key_id}

    ops.instrument(app, encryptor)
    return app
