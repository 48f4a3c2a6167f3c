"""Owner-side preparation of uploads for benchmarks and soak runs (runs in the client)."""

from __future__ import annotations

import json
import time

import numpy as np

SealJob = tuple[bytes, np.ndarray, np.ndarray, str, int | None]


def seal_for_upload(job: SealJob) -> tuple[bytes, bytes, str, float]:
    """Encrypt one image with its own key as the encryptor would and build the upload parts.

    `job` is (master secret, image, mask, opaque id, label); returns (cipher PNG, mask PNG,
    metadata JSON, seconds spent encrypting). Top-level so a process pool can run it.
    """
    from pecbir_contracts.png import encode_png
    from pecore.envelope import seal
    from pecore.keys import MasterKey

    secret, image, mask, opaque_id, label = job
    master = MasterKey(secret=secret)
    started = time.perf_counter()
    cipher, sealed = seal(image, master, opaque_id)
    seconds = time.perf_counter() - started
    meta = {
        "opaque_id": opaque_id,
        "role": "template",
        "label": label,
        "height": cipher.shape[0],
        "width": cipher.shape[1],
        "rescale": sealed.rescale.model_dump(),
        "key": {
            "scheme": sealed.scheme,
            "mode": sealed.key_mode,
            "key_id": sealed.key_id,
            "counter": sealed.key_counter,
            "check": sealed.key_check,
        },
    }
    return encode_png(cipher), encode_png(mask), json.dumps(meta), seconds


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))
