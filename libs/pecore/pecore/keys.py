"""SSLM key streams (Ahmad et al. 2025, §3.1–3.2.1; method-spec §8.1–8.2, §8.6).

The squared-sine logistic map  x ← r·x·(1−x) + μ·sin²(2πx)  is chaotic, so one ulp of
difference anywhere in the arithmetic changes the whole key stream after a few dozen steps.
We therefore pin ONE implementation: float64, evaluated left to right as
``r*x*(1-x) + mu*(pow(sin(2*pi*x), 2))`` with the C library's ``sin`` and ``pow``.  Note that
``pow(s, 2.0)`` is *not* always ``s*s`` in glibc (they differ by one ulp for some s), and the
known-answer vectors of method-spec §10 were made with ``math.sin(...) ** 2``, i.e. libm ``pow``.
Both the pure-Python reference and the numba kernels call the same libm symbols (numba through
ctypes, which also keeps LLVM from rewriting ``pow(s, 2.0)`` into ``s*s``).  Every derived key
carries a check value (a hash of its stream) so that a machine whose libm disagrees is detected
instead of silently producing garbage.
"""

from __future__ import annotations

import base64
import ctypes
import ctypes.util
import functools
import hashlib
import hmac
import json
import math
import os
import secrets
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import numba
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, SecretBytes, field_validator, model_validator
from scipy.stats import chi2

__all__ = [
    "DEFAULT_TRANSIENT",
    "PAPER_KEY",
    "PAPER_MU",
    "PAPER_R",
    "PAPER_X0",
    "ImageKey",
    "MasterKey",
    "SSLMKey",
    "derive_image_key",
    "derive_image_key_and_stream",
    "key_stream",
    "key_stream_reference",
    "key_streams",
    "libm_pow",
    "libm_sin",
    "paper_key_stream",
    "sslm_orbit_reference",
    "stream_check",
    "stream_defects",
]

PAPER_R = (3.71, 3.715, 3.7157)
PAPER_X0 = 0.47
PAPER_MU = 0.2
DEFAULT_TRANSIENT = 1000

_libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
libm_sin = _libm.sin
libm_sin.restype = ctypes.c_double
libm_sin.argtypes = [ctypes.c_double]
libm_pow = _libm.pow
libm_pow.restype = ctypes.c_double
libm_pow.argtypes = [ctypes.c_double, ctypes.c_double]

_TWO_PI = 2 * math.pi


# --------------------------------------------------------------------------- the pinned map
def sslm_orbit_reference(x0: float, r: float, mu: float, transient: int, n: int) -> np.ndarray:
    """Pure-Python reference: the N iterates that follow `transient` discarded ones."""
    x = x0
    for _ in range(transient):
        x = r * x * (1 - x) + mu * math.sin(_TWO_PI * x) ** 2
    out = np.empty(n)
    for i in range(n):
        x = r * x * (1 - x) + mu * math.sin(_TWO_PI * x) ** 2
        out[i] = x
    return out


@numba.njit(cache=False, nogil=True)
def _libm_square(s: float) -> float:
    """Exactly libm's pow(s, 2.0), mostly without calling it.

    s*s is the correctly rounded square; glibc's pow is within 0.52 ulp of the exact value, so
    the two can only differ when the exact square lies within 0.02 ulp of a rounding midpoint.
    Dekker's exact product gives the rounding error e of s*s; only when |e| ≥ 0.48 ulp do we ask
    libm (about 4 % of steps).  Tested equal to the plain pow orbit over millions of steps.
    """
    square = s * s
    split = 134217729.0 * s  # Veltkamp split, 2**27 + 1
    high = split - (split - s)
    low = s - high
    error = ((high * high - square) + 2.0 * high * low) + low * low
    if square == 0.0 or abs(error) < 0.48 * math.ldexp(1.0, math.frexp(square)[1] - 53):
        return square
    return libm_pow(s, 2.0)


@numba.njit(cache=False, nogil=True)
def _orbit_pow(x: float, r: float, mu: float, transient: int, n: int) -> np.ndarray:
    """The orbit with an unconditional libm pow call (kept to test `_libm_square` against)."""
    for _ in range(transient):
        x = r * x * (1 - x) + mu * libm_pow(libm_sin(_TWO_PI * x), 2.0)
    out = np.empty(n)
    for i in range(n):
        x = r * x * (1 - x) + mu * libm_pow(libm_sin(_TWO_PI * x), 2.0)
        out[i] = x
    return out


@numba.njit(cache=False, nogil=True)
def _orbit(x: float, r: float, mu: float, transient: int, n: int) -> np.ndarray:
    for _ in range(transient):
        x = r * x * (1 - x) + mu * _libm_square(libm_sin(_TWO_PI * x))
    out = np.empty(n)
    for i in range(n):
        x = r * x * (1 - x) + mu * _libm_square(libm_sin(_TWO_PI * x))
        out[i] = x
    return out


@numba.njit(cache=False, nogil=True)
def _stream_into(out: np.ndarray, x0: float, r: np.ndarray, mu: float, transient: int) -> None:
    """k = u3·u4 for one key, written into `out` (uint8, length N).

    u0 (r0) gives u3 = floor(u0·1e14) mod 256; u1 is seeded by u0[N−1], u2 by u1[N−1];
    u4 = floor((u1+u2)·1e14) mod 2.  u·1e14 < 2⁵³, so the floors are exact.
    """
    n = out.size
    u0 = _orbit(x0, r[0], mu, transient, n)
    u1 = _orbit(u0[n - 1], r[1], mu, transient, n)
    u2 = _orbit(u1[n - 1], r[2], mu, transient, n)
    for i in range(n):
        u3 = np.int64(math.floor(u0[i] * 1e14)) % 256
        u4 = np.int64(math.floor((u1[i] + u2[i]) * 1e14)) % 2
        out[i] = u3 * u4


@numba.njit(cache=False, parallel=True)
def _streams_into(out: np.ndarray, params: np.ndarray, transient: np.ndarray) -> None:
    for j in numba.prange(out.shape[0]):
        _stream_into(out[j], params[j, 0], params[j, 1:4], params[j, 4], transient[j])


# --------------------------------------------------------------------------- key objects
class SSLMKey(BaseModel):
    """The parameters of one SSLM key stream (defaults: the paper's key θ*)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    x0: float = PAPER_X0
    r: tuple[float, float, float] = PAPER_R
    mu: float = PAPER_MU
    transient: Annotated[int, Field(ge=0, le=1_000_000)] = DEFAULT_TRANSIENT

    @field_validator("x0")
    @classmethod
    def _x0_in_unit_interval(cls, v: float) -> float:
        if not (0.0 < v < 1.0) or not math.isfinite(v):
            raise ValueError(f"x0 must lie strictly inside (0, 1), got {v!r}")
        return v

    @field_validator("mu")
    @classmethod
    def _mu_in_range(cls, v: float) -> float:
        if not (0.0 <= v <= 1.0):
            raise ValueError(f"mu must lie in [0, 1], got {v!r}")
        return v

    @model_validator(mode="after")
    def _map_stays_in_unit_interval(self) -> SSLMKey:
        # The orbit must stay in [0, 1]; for mu = 0.2 this bounds r at about 3.8198 (spec §8.1).
        grid = np.linspace(0.0, 1.0, 4097)
        peak = max(
            float(np.max(r * grid * (1 - grid) + self.mu * np.sin(_TWO_PI * grid) ** 2))
            for r in self.r
        )
        if any(r <= 0 for r in self.r) or peak > 1.0:
            raise ValueError(f"r = {self.r} with mu = {self.mu} lets the SSLM leave [0, 1]")
        return self


#: The paper's published key θ* (method-spec §8.6): the one key of every image in the
#: experiment's and the security report's "same key (k_i = k_j)" condition.  Not the envelope's
#: "same" key mode (`pecore.envelope`), which derives one shared key from the owner's master key.
PAPER_KEY = SSLMKey()


@functools.lru_cache(maxsize=8)
def paper_key_stream(n_pixels: int) -> np.ndarray:
    """The (read-only, cached) key stream of `PAPER_KEY` for an image of `n_pixels` pixels.

    Cached because the experiment encrypts thousands of same-size images under θ*.
    """
    stream = key_stream(PAPER_KEY, n_pixels)
    stream.flags.writeable = False
    return stream


def key_stream(key: SSLMKey, n_pixels: int) -> np.ndarray:
    """The uint8 key stream k[0..N−1] of `key` for an image of `n_pixels` pixels."""
    if n_pixels < 1:
        raise ValueError(f"n_pixels must be >= 1, got {n_pixels}")
    out = np.empty(n_pixels, dtype=np.uint8)
    _stream_into(out, key.x0, np.asarray(key.r, dtype=np.float64), key.mu, key.transient)
    return out


def key_streams(keys: Sequence[SSLMKey], n_pixels: int) -> np.ndarray:
    """Key streams of many keys at once, (len(keys), n_pixels) uint8, computed in parallel.

    Each stream is the same scalar orbit as `key_stream` (tested bit-equal); threads only
    split the keys between cores.
    """
    if n_pixels < 1:
        raise ValueError(f"n_pixels must be >= 1, got {n_pixels}")
    params = np.array([(k.x0, *k.r, k.mu) for k in keys], dtype=np.float64).reshape(-1, 5)
    transient = np.array([k.transient for k in keys], dtype=np.int64)
    out = np.empty((len(keys), n_pixels), dtype=np.uint8)
    if len(keys):
        _streams_into(out, params, transient)
    return out


def key_stream_reference(key: SSLMKey, n_pixels: int) -> np.ndarray:
    """Slow pure-Python key stream (libm via CPython's math module); the pinned reference."""
    u0 = sslm_orbit_reference(key.x0, key.r[0], key.mu, key.transient, n_pixels)
    u1 = sslm_orbit_reference(u0[-1], key.r[1], key.mu, key.transient, n_pixels)
    u2 = sslm_orbit_reference(u1[-1], key.r[2], key.mu, key.transient, n_pixels)
    u3 = np.floor(u0 * 1e14).astype(np.int64) % 256
    u4 = np.floor((u1 + u2) * 1e14).astype(np.int64) % 2
    return (u3 * u4).astype(np.uint8)


def stream_check(stream: np.ndarray) -> str:
    """Short check value of a key stream: detects a libm or code mismatch; reveals no key."""
    digest = hashlib.sha256(b"pecbir/key-check/v1\x00" + np.ascontiguousarray(stream).tobytes())
    return "sha256:" + digest.hexdigest()[:16]


def stream_defects(stream: np.ndarray) -> list[str]:
    """Why a key stream is unfit for encryption (empty list = fit).

    About half of k should be non-zero (u4 is a fair bit) and the non-zero values roughly
    uniform over 1..255 (u3 flat); periodic windows of the map fail both.  Tolerances widen
    with 1/sqrt(N) so that small images are not rejected for sampling noise.
    """
    n = stream.size
    nonzero = stream[stream > 0]
    expected = 0.5 * 255 / 256
    tolerance = max(0.01, 5 * 0.5 / math.sqrt(n))
    defects = []
    fraction = nonzero.size / n
    if abs(fraction - expected) > tolerance:
        defects.append(f"fraction of non-zero k is {fraction:.4f}, expected {expected:.4f}")
    if nonzero.size >= 255 * 5:
        counts = np.bincount(nonzero, minlength=256)[1:]
        mean = nonzero.size / 255
        statistic = float(((counts - mean) ** 2 / mean).sum())
        p_value = float(chi2.sf(statistic, df=254))
        if p_value < 1e-6:
            defects.append(f"non-zero k values are not flat (chi2 p = {p_value:.2e})")
    return defects


class ImageKey(BaseModel):
    """A key stream bound to one image: SSLM parameters + size + check value.

    Holds secret parameters: keep it at the owner; the cloud sees at most `public()`.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    image_id: str
    sslm: SSLMKey
    n_pixels: Annotated[int, Field(ge=1)]
    counter: Annotated[int, Field(ge=0)] = 0
    check: str

    def stream(self) -> np.ndarray:
        """The key stream, verified against the stored check value."""
        stream = key_stream(self.sslm, self.n_pixels)
        if stream_check(stream) != self.check:
            raise ValueError(
                f"key stream check mismatch for image {self.image_id!r}: this machine's SSLM "
                "implementation (libm sin/pow) does not reproduce the stored key; refusing to "
                "encrypt or decrypt with it"
            )
        return stream

    def public(self) -> dict[str, object]:
        """What may be stored next to a cipher image: no key material."""
        return {"image_id": self.image_id, "counter": self.counter, "check": self.check}


_MASTER_FORMAT = "pecbir-master-key-v1"
_KDF_LABEL = b"pecbir/sslm-image-key/v1"
# Per-image perturbation of r stays below 1e-6 (1e-14 steps): spec §8.1 places the nearest
# periodic windows ≥ 5e-3 away from the paper's r values; validation catches the rest.
_R_OFFSET_STEPS = 10**8
_R_STEP = 1e-14


class MasterKey(BaseModel):
    """An owner's master secret. Per-image keys are derived from it with HMAC-SHA256."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    secret: SecretBytes

    @field_validator("secret")
    @classmethod
    def _long_enough(cls, v: SecretBytes) -> SecretBytes:
        if len(v.get_secret_value()) < 32:
            raise ValueError("a master secret needs at least 32 bytes")
        return v

    @property
    def key_id(self) -> str:
        """Public fingerprint of the master key (safe to log and store)."""
        fingerprint = hashlib.sha256(b"pecbir/key-id\x00" + self.secret.get_secret_value())
        return fingerprint.hexdigest()[:16]

    @classmethod
    def generate(cls) -> MasterKey:
        return cls(secret=secrets.token_bytes(32))

    @classmethod
    def from_seed(cls, seed: int) -> MasterKey:
        """Deterministic master key for experiments and tests only (never for real data)."""
        return cls(secret=hashlib.sha256(f"pecbir/test-master/{seed}".encode()).digest())

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
        """Write the key file with 0600 permissions (created that way, never widened)."""
        path = Path(path)
        flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
        try:
            fd = os.open(path, flags, 0o600)
        except FileExistsError:
            raise FileExistsError(f"{path} exists; refusing to overwrite a key file") from None
        os.fchmod(fd, 0o600)
        body = {
            "format": _MASTER_FORMAT,
            "key_id": self.key_id,
            "secret": base64.b64encode(self.secret.get_secret_value()).decode(),
        }
        with os.fdopen(fd, "w") as handle:
            json.dump(body, handle)
            handle.write("\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> MasterKey:
        path = Path(path)
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            raise PermissionError(
                f"{path} is accessible by group/others (mode {stat.S_IMODE(mode):o}); "
                "a master key file must be 0600"
            )
        try:
            body = json.loads(path.read_text())
            if body.get("format") != _MASTER_FORMAT:
                raise ValueError(f"not a {_MASTER_FORMAT} file")
            key = cls(secret=base64.b64decode(body["secret"], validate=True))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{path} is not a valid master key file: {exc}") from None
        if body.get("key_id") != key.key_id:
            raise ValueError(f"{path}: key_id does not match the secret (corrupted key file?)")
        return key


def _derive_sslm(master: MasterKey, image_id: str, counter: int) -> SSLMKey:
    message = b"\x00".join([_KDF_LABEL, image_id.encode(), str(counter).encode()])
    digest = hmac.new(master.secret.get_secret_value(), message, hashlib.sha512).digest()
    words = [int.from_bytes(digest[i : i + 8], "big") for i in range(0, 32, 8)]
    x0 = 0.05 + 0.9 * (words[0] >> 11) / 2**53
    r = tuple(
        base + (word % _R_OFFSET_STEPS) * _R_STEP
        for base, word in zip(PAPER_R, words[1:], strict=True)
    )
    return SSLMKey(x0=x0, r=r, mu=PAPER_MU, transient=DEFAULT_TRANSIENT)


def derive_image_key(
    master: MasterKey, image_id: str, n_pixels: int, max_attempts: int = 32
) -> ImageKey:
    """The validated key of image `image_id` ("different keys" mode of the paper).

    θ_i = HMAC(master, image_id ‖ counter) → x0 ∈ (0.05, 0.95), r_j = paper r_j + [0, 1e-6);
    a stream that fails `stream_defects` is re-derived with the next counter.
    """
    return derive_image_key_and_stream(master, image_id, n_pixels, max_attempts)[0]


def derive_image_key_and_stream(
    master: MasterKey, image_id: str, n_pixels: int, max_attempts: int = 32
) -> tuple[ImageKey, np.ndarray]:
    """`derive_image_key` plus the key stream it validated (saves computing it twice)."""
    if not image_id:
        raise ValueError("image_id must be a non-empty string")
    for counter in range(max_attempts):
        sslm = _derive_sslm(master, image_id, counter)
        stream = key_stream(sslm, n_pixels)
        if not stream_defects(stream):
            key = ImageKey(
                image_id=image_id,
                sslm=sslm,
                n_pixels=n_pixels,
                counter=counter,
                check=stream_check(stream),
            )
            return key, stream
    raise RuntimeError(f"no valid key stream for {image_id!r} after {max_attempts} attempts")
