"""Wire format of a Fisher vector sent by an owner (sealed mode): a float32 1-D .npy file.

Decoding reads the header first and refuses anything that is not a finite float32 vector of
a bounded length, without pickle, before any value is used.
"""

from __future__ import annotations

import io

import numpy as np

__all__ = ["MAX_FEATURES", "InvalidVector", "decode_vector_npy", "encode_vector_npy"]

# Largest Fisher vector accepted (R = 16 regions × 2 × K = 256 × Dp = 81 is 663 552).
MAX_FEATURES = 1_000_000


class InvalidVector(ValueError):
    """An uploaded feature vector that cannot be accepted (the message says why)."""


def encode_vector_npy(vector: np.ndarray) -> bytes:
    """A 1-D vector as float32 .npy bytes."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(vector, dtype=np.float32).reshape(-1), allow_pickle=False)
    return buffer.getvalue()


def decode_vector_npy(data: bytes, what: str = "fisher_vector") -> np.ndarray:
    """The float32 vector of `data`; InvalidVector unless a finite, 1-D float32 .npy."""
    stream = io.BytesIO(data)
    try:
        major, _ = np.lib.format.read_magic(stream)
        read_header = (
            np.lib.format.read_array_header_1_0
            if major == 1
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran, dtype = read_header(stream)
    except (ValueError, SyntaxError, EOFError) as exc:
        raise InvalidVector(f"{what}: not a .npy array ({exc})") from None
    if dtype != np.dtype("<f4") or len(shape) != 1 or fortran:
        raise InvalidVector(f"{what}: expected a 1-D little-endian float32 array")
    if not 1 <= shape[0] <= MAX_FEATURES:
        raise InvalidVector(f"{what}: {shape[0]} values; expected 1..{MAX_FEATURES}")
    body = data[stream.tell() :]
    if len(body) != 4 * shape[0]:
        raise InvalidVector(f"{what}: {len(body)} data bytes for {shape[0]} float32 values")
    vector = np.frombuffer(body, dtype="<f4").astype(np.float32)
    if not np.isfinite(vector).all():
        raise InvalidVector(f"{what}: holds NaN or infinite values")
    return vector
