"""Small generated inputs shared by the service tests (no dataset needed)."""

from __future__ import annotations

import struct
import zlib

import numpy as np

from pecbir_contracts.auth import mint_token
from pecbir_contracts.png import encode_png

TOKEN_SECRET = b"test-token-secret-0123456789abcdef"


def token(
    tenant: str = "hosp-a", scopes: tuple[str, ...] = ("upload", "search", "read", "train"), **kw
) -> str:
    return mint_token(TOKEN_SECRET, sub=f"user@{tenant}", tenant=tenant, scopes=scopes, **kw)


def auth(
    tenant: str = "hosp-a", scopes: tuple[str, ...] = ("upload", "search", "read", "train"), **kw
) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(tenant, scopes, **kw)}"}


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
