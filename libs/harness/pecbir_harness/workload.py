"""Owner-side preparation of uploads for benchmarks and soak runs (runs in the client)."""

from __future__ import annotations

import time

import numpy as np

__all__ = [
    "SealJob",
    "percentile",
    "seal_for_upload",
]

SealJob = tuple[bytes, np.ndarray, np.ndarray, str, int | None]


def seal_for_upload(job: SealJob) -> tuple[bytes, bytes, str, float]:
    """Protect one image exactly as the encryptor does and build the upload parts.

    Its own key, the 8-bit rule, the cipher and the owner's integrity tag over cipher, mask and
    metadata (`pecbir_encryptor.core.protect_image`), so benchmark and soak uploads are real
    owner records that the encryptor can open. Top-level so a process pool can run it.

    Parameters
    ----------
    job : SealJob
        (master secret, image, mask, opaque id, label); a tuple so a process pool can ship it.

    Returns
    -------
    tuple
        (cipher PNG, mask PNG, metadata JSON, seconds spent on the owner side: 8-bit rule,
        encryption and tag).
    """
    from pecbir_contracts.png import encode_png
    from pecbir_encryptor.core import protect_image
    from pecore.keys import MasterKey

    secret, image, mask, opaque_id, label = job
    master = MasterKey(secret=secret)
    started = time.perf_counter()
    protected = protect_image(image, mask, master=master, opaque_id=opaque_id, label=label)
    seconds = time.perf_counter() - started
    return (
        encode_png(protected.cipher),
        encode_png(protected.mask),
        protected.metadata.model_dump_json(),
        seconds,
    )


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))
