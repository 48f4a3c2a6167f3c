"""Small generated inputs shared by the service tests (no dataset needed)."""

from __future__ import annotations

import io
import os
import struct
import zlib
from typing import NoReturn

import numpy as np
import pytest

from pecbir_contracts.auth import GATEWAY_TOKEN, mint_token
from pecbir_contracts.png import encode_png

# The DICOM builders live in the harness (the benchmarks push STOW-RS bodies too).
from pecbir_harness.dicom import dicom_bytes as dicom_bytes
from pecbir_harness.dicom import make_mr
from pecbir_harness.dicom import make_seg as make_seg
from pecbir_harness.dicom import multipart_related as multipart_related
from pecbir_platform.store import FilesystemStore

TOKEN_SECRET = b"test-token-secret-0123456789abcdef"


def token(
    tenant: str = "hosp-a", scopes: tuple[str, ...] = ("upload", "search", "read", "train"), **kw
) -> str:
    kw.setdefault("kind", GATEWAY_TOKEN)
    return mint_token(TOKEN_SECRET, sub=f"user@{tenant}", tenant=tenant, scopes=scopes, **kw)


def auth(
    tenant: str = "hosp-a", scopes: tuple[str, ...] = ("upload", "search", "read", "train"), **kw
) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(tenant, scopes, **kw)}"}


class OverwritingStore(FilesystemStore):
    """What a store that ignores `If-None-Match: *` amounts to: put_if_absent overwrites."""

    def put_if_absent(self, key: str, data: bytes, content_type: str = "") -> bool:
        self.put(key, data)
        return True


def blob_image(seed: int = 0, shape: tuple[int, int] = (48, 48)) -> tuple[np.ndarray, np.ndarray]:
    """A uint8 'scan' with a bright blob and its mask."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    cy, cx = (
        rng.integers(shape[0] // 3, 2 * shape[0] // 3),
        rng.integers(shape[1] // 3, 2 * shape[1] // 3),
    )
    radius = shape[0] / 6
    mask = (rows - cy) ** 2 + (cols - cx) ** 2 <= radius**2
    image = rng.integers(0, 90, size=shape).astype(np.uint8)
    image[mask] = np.clip(image[mask].astype(int) + 120, 0, 255).astype(np.uint8)
    return image, mask


def metadata_json(
    shape: tuple[int, int], opaque_id: str = "opaque-0001", label: int | None = 1
) -> str:
    import json

    return json.dumps(
        {
            "opaque_id": opaque_id,
            "role": "template",
            "label": label,
            "height": shape[0],
            "width": shape[1],
            "key": {
                "scheme": "ours",
                "mode": "per-image",
                "counter": 0,
                "check": "0123456789abcdef",
            },
        }
    )


def upload_files(image: np.ndarray, mask: np.ndarray, meta: str | None = None) -> dict:
    return {
        "cipher": ("c.png", encode_png(image), "image/png"),
        "mask": ("m.png", encode_png(mask), "image/png"),
        "metadata": (None, meta if meta is not None else metadata_json(image.shape)),
    }


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header declares a huge image (decompression-bomb shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * (width + 1) * 4)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


def labelled_set(n: int = 18, shape: tuple[int, int] = (48, 48), seed: int = 0):
    """(images, masks, labels): three classes that differ in tumour brightness and texture."""
    rng = np.random.default_rng(seed)
    images, masks, labels = [], [], []
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    for i in range(n):
        label = 1 + i % 3
        cy, cx = shape[0] // 2 + rng.integers(-4, 5), shape[1] // 2 + rng.integers(-4, 5)
        mask = (rows - cy) ** 2 + (cols - cx) ** 2 <= (shape[0] / 5) ** 2
        image = rng.normal(60, 10, shape)
        tumour = {1: rng.normal(200, 5, shape), 2: rng.normal(120, 40, shape)}.get(
            label, 90 + 80 * (np.sin(cols / 1.5) > 0)
        )
        image[mask] = tumour[mask]
        images.append(np.clip(image, 0, 255).astype(np.uint16) * 16)  # 12-bit-like source
        masks.append(mask)
        labels.append(label)
    return images, masks, labels


# A pipeline small enough for 48×48 test images and a few seconds of training.
SMALL_MODEL = {
    "n_components": 4,
    "n_regions": 2,
    "patch_size": 5,
    "radius": 2,
    "n_train_patches": 2000,
    "dim": 2,
}


def npy_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def radosgw_unavailable(reason: str) -> NoReturn:
    """A test that needs radosgw and cannot have it: skip saying why, fail on CI (CI=true)."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"radosgw is required on CI and did not start: {reason}", pytrace=False)
    pytest.skip(f"no S3 server for the integration tests: {reason}")


def mr_with_seg(seed: int, label: str = "glioma"):
    """One `labelled_set` slice as a 12-bit MR and its SEG: (image, seg, pixels, mask)."""
    images, masks, _ = labelled_set(1, seed=seed)
    image = make_mr(images[0].astype(np.uint16), bits_stored=12)
    return image, make_seg(masks[0], image, label=label), images[0], masks[0]
