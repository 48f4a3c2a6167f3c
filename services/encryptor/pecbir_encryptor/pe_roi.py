"""The pe-roi protection mode at the owner: the image sealed, only its scrambled ROI readable.

In a pe-roi collection the cloud still extracts the features from a perceptually encrypted
image, as in `pe`, but that image holds only the owner-dilated tumour ROI and the patch margin,
tile-scrambled and moved by per-image keyed transforms (`pecore.cipher_roi`), and the mask it
gets is that ROI moved with the tiles.  The image itself travels only inside the sealed
envelope of the sealed mode (`pecore.sealing`, AES-256-GCM), and hits open from it bit-exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pecbir_contracts.schemas import ImageMetadata
from pecbir_encryptor.wire import to_wire
from pecore.envelope import seal_roi, tag
from pecore.keys import MasterKey
from pecore.sealing import SealedIdentity, seal_image

__all__ = ["RoiUpload", "protect_roi"]


@dataclass(frozen=True)
class RoiUpload:
    """What the encryptor sends to the cloud for one image of a pe-roi collection.

    Attributes
    ----------
    cipher
        uint8: the ROI-only feature image (scrambled, encrypted), for the cloud's features.
    mask
        bool: the ROI moved with the tiles, the only mask the cloud gets.
    metadata
        The cloud's record: key facts and the owner's v3 tag over cipher, mask and record.
    blob
        The image, its tumour mask and private metadata, sealed; None for a query (not stored).
    """

    cipher: np.ndarray
    mask: np.ndarray
    metadata: ImageMetadata
    blob: bytes | None


def protect_roi(
    pixels: np.ndarray,
    mask: np.ndarray,
    *,
    master: MasterKey,
    tenant: str,
    collection: str,
    opaque_id: str,
    scheme: str,
    label: int | None,
    role: str = "template",
    train: bool = False,
) -> RoiUpload:
    """Protect one image for a pe-roi collection (a query: no blob, no label).

    Parameters
    ----------
    pixels, mask
        The plain image (sealed bit-exactly, any depth) and its checked tumour mask.
    master
        The owner's active master key (per-image key of the feature image; wraps the blob's
        fresh data key).
    tenant, collection, opaque_id
        The identity the record's tag and the blob are bound to.
    scheme
        The pe-roi scheme ("pe-roi" or "pe-roi-t<b>[d|dn][-in]"; the record names it explicitly).
    label, role
        Class label and role; both are sealed inside the blob.
    train
        Whether the image is a training template: only then does the cloud's record carry
        its label (which CFML needs).

    Returns
    -------
    RoiUpload
        Feature image, cloud mask, tagged record and (templates) the sealed blob.
    """
    label = label if role == "template" else None
    cipher, cloud_mask, record = seal_roi(
        pixels,
        mask,
        master,
        opaque_id,
        scheme,
        role=role,
        label=label if train else None,
        tenant=tenant,
        collection=collection,
    )
    record = tag(cipher, record, master, mask=cloud_mask)
    blob = None
    if role == "template":
        identity = SealedIdentity(tenant=tenant, collection=collection, image_id=opaque_id)
        # Content-bound keys, as in the sealed mode: a re-push is the same blob (idempotent).
        blob = seal_image(
            pixels,
            mask,
            master,
            identity,
            metadata={"role": role, "label": label, "train": train},
            content_bound=True,
        )
    return RoiUpload(cipher=cipher, mask=cloud_mask, metadata=to_wire(record), blob=blob)
