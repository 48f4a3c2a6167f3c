"""Perceptual encryption of 8-bit grey images: the paper's scheme and its three baselines.

All four substitute pixel p(i) under the SSLM key stream k(i) (method-spec §8.3–8.4), in
row-major order; where k(i) = 0 the paper's scheme and [25], [26] leave the pixel in the
clear, so about half of every cipher image is plain.

| scheme (alias)  | k(i) > 0                              | k(i) = 0            |
|-----------------|---------------------------------------|---------------------|
| ours            | c = [((k ⊕ p) + k) mod 256] ⊕ c(i−1)  | c = p               |
| np (25)         | c = p ⊕ 255 (negative–positive)       | c = p               |
| xor (26)        | c = p ⊕ k                             | c = p               |
| chained (27)    | as ours                               | c = p ⊕ c(i−1)      |

c(−1) is the last plain pixel p(N−1) (the decryptor recovers it first from c(N−1), c(N−2)),
and 0 for a one-pixel image, where p(N−1) could not be recovered.  The chains are segmented
prefix-XORs, so everything is vectorised; decrypting "ours" needs no scan at all.

A scheme is one `CipherScheme` subclass registered in `SCHEMES` (canonical name → instance):
its names, display label, the vectorised encrypt/decrypt, the published per-pixel equations
(`encrypt_pixel`/`decrypt_pixel`, used by the reference loop and by the known-plaintext attack)
and the facts the attacks of `pecore.attacks` rely on.  `cipher_scheme` resolves any name or
alias ("25" → np); tile-scrambled variants ("<inner>-bs<b>") parse against the registry in
`pecore.cipher_variants`.  A fifth scheme is one more subclass here (and its tests).
"""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict

__all__ = [
    "SCHEMES",
    "Chained",
    "CipherScheme",
    "IntensityRescale",
    "KeyedReveals",
    "NegativePositive",
    "Ours",
    "Scheme",
    "Xor",
    "cipher_scheme",
    "decrypt",
    "encrypt",
    "encrypt_reference",
    "substitute",
    "to_uint8",
    "unsubstitute",
]


def _check_inputs(image: np.ndarray, stream: np.ndarray, what: str) -> None:
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{what} must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(
            f"{what} has dtype {image.dtype}; the cipher works on uint8 "
            "(convert 12/16-bit or float images with pecore.cipher.to_uint8 first)"
        )
    if image.ndim != 2:
        raise ValueError(f"{what} must be a 2-D grey image, got {image.ndim}-D shape {image.shape}")
    if image.size == 0:
        raise ValueError(f"{what} is empty (shape {image.shape})")
    if not isinstance(stream, np.ndarray) or stream.dtype != np.uint8 or stream.ndim != 1:
        raise ValueError("key stream must be a 1-D uint8 numpy array")
    if stream.size != image.size:
        raise ValueError(
            f"key stream has {stream.size} values but the {what} has {image.size} pixels "
            f"(shape {image.shape}): a key for a different image size"
        )


def substitute(p, k):
    """t = ((k ⊕ p) + k) mod 256, for Python ints or uint8 arrays (uint8 arithmetic wraps)."""
    return ((k ^ p) + k) & 255


def unsubstitute(t, k):
    """p = k ⊕ ((t − k) mod 256), the inverse of `substitute` (ints or uint8 arrays)."""
    return (k ^ ((t - k) & 255)) & 255


def _choose(keyed, if_keyed, otherwise):
    """`if_keyed` where `keyed` (a bool or bool array), else `otherwise`, without branching.

    Works on Python ints and on broadcasting uint8 arrays alike (bool × uint8 stays uint8).
    """
    return otherwise ^ (keyed * (if_keyed ^ otherwise))


_BYTE_BROADCAST = np.uint64(0x0101010101010101)


def _xor_scan(values: np.ndarray) -> np.ndarray:
    """Inclusive prefix-XOR of a uint8 vector, eight bytes at a time.

    numpy's byte-wise accumulate runs at ~2 ns/element; instead, scan inside each
    little-endian 64-bit word by doubling (shift-xor by 1, 2, 4 bytes), then xor every word
    with the running xor of the words before it (its top byte is the word's total).
    """
    n = values.size
    padded = np.zeros(-(-n // 8) * 8, dtype=np.uint8)
    padded[:n] = values
    words = padded.view("<u8")
    for shift in (8, 16, 32):
        words ^= words << np.uint64(shift)
    totals = (words >> np.uint64(56)).astype(np.uint8)
    carried = np.empty_like(totals)
    carried[0] = 0
    np.bitwise_xor.accumulate(totals[:-1], out=carried[1:])
    words ^= carried.astype(np.uint64) * _BYTE_BROADCAST
    return padded[:n]


def _select(mask: np.ndarray, if_true: np.ndarray, if_false: np.ndarray) -> np.ndarray:
    """Bitwise where() for uint8 with a 0/255 mask (np.where is ~50x slower here)."""
    return (if_true & mask) | (if_false & ~mask)


def _keyed_mask(k: np.ndarray) -> np.ndarray:
    """255 where k > 0 (the pixel is substituted), 0 where the scheme leaves it alone."""
    return (k > 0).view(np.uint8) * np.uint8(255)


def _chain_start(p: np.ndarray) -> np.ndarray:
    """c(−1) as a one-element array: p(N−1), or 0 for a one-pixel image."""
    return p[-1:].copy() if p.size >= 2 else np.zeros(1, dtype=np.uint8)


def _previous_cipher(c: np.ndarray, start: np.ndarray) -> np.ndarray:
    """c(i−1) for every i, with c(−1) = `start` (one-element array)."""
    previous = np.empty_like(c)
    previous[:1] = start
    previous[1:] = c[:-1]
    return previous


# --------------------------------------------------------------------------- the schemes
#: What a substituted (k > 0) cipher pixel still says about its plain value, for the
#: clear-pixel attack's projection: "negative": c = 255 − p; "substitution": c ⊕ c(i−1) =
#: substitute(p, k), which narrows p down; "nothing": uniform for an unknown k.
KeyedReveals = Literal["negative", "substitution", "nothing"]


class CipherScheme:
    """One perceptual encryption scheme (subclass per scheme, registered in `SCHEMES`).

    Attributes
    ----------
    name : str
        Canonical name ("ours", "np", "xor", "chained").
    aliases : tuple of str
        Other accepted spellings (the paper's citation numbers "25", "26", "27").
    label : str
        Display label in tables and figures ("Ours", "[25]").
    legacy_name : str
        The spelling results files, caches and seeds used before the registry ("25"):
        kept there so that stored results and the experiment's numbers stay valid.
    clears_identity_pixels : bool
        Pixels with k(i) = 0 are stored unchanged (c = p).
    chains_identity_pixels : bool
        Pixels with k(i) = 0 are chained: c = p ⊕ c(i−1), so c ⊕ c(i−1) is in the clear there.
    keyed_reveals : {"negative", "substitution", "nothing"}
        What a keyed cipher pixel says about p (see `KeyedReveals`).
    """

    name: ClassVar[str]
    aliases: ClassVar[tuple[str, ...]] = ()
    label: ClassVar[str]
    clears_identity_pixels: ClassVar[bool] = True
    chains_identity_pixels: ClassVar[bool] = False
    keyed_reveals: ClassVar[KeyedReveals]

    @property
    def legacy_name(self) -> str:
        return self.aliases[0] if self.aliases else self.name

    def __repr__(self) -> str:
        return f"<cipher scheme {self.name}>"

    # the published per-pixel equations: Python ints or broadcasting uint8 arrays
    def encrypt_pixel(self, p, k, previous):
        """c(i) from p(i), k(i) and c(i−1) (the published equation)."""
        raise NotImplementedError

    def decrypt_pixel(self, c, k, previous):
        """p(i) from c(i), k(i) and c(i−1)."""
        raise NotImplementedError

    # vectorised whole-image kernels (flat uint8 vectors)
    def _encrypt_flat(self, p: np.ndarray, k: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def _decrypt_flat(self, c: np.ndarray, k: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def encrypt(
        self, image: np.ndarray, stream: np.ndarray, *, nonce: str | bytes = b""
    ) -> np.ndarray:
        """Encrypt a uint8 2-D image with a key stream of the same number of pixels.

        `nonce` is accepted for the interface shared with the tile-scrambled variants and
        ignored: these schemes use the key stream only.
        """
        _check_inputs(image, stream, "image")
        return self._encrypt_flat(image.ravel(), stream).reshape(image.shape)

    def decrypt(
        self, cipher: np.ndarray, stream: np.ndarray, *, nonce: str | bytes = b""
    ) -> np.ndarray:
        """Exact inverse of `encrypt` for the same key stream."""
        _check_inputs(cipher, stream, "cipher image")
        return self._decrypt_flat(cipher.ravel(), stream).reshape(cipher.shape)

    def encrypt_reference(self, image: np.ndarray, stream: np.ndarray) -> np.ndarray:
        """Straightforward per-pixel loop of `encrypt_pixel` (tests and benchmarks only)."""
        _check_inputs(image, stream, "image")
        p = image.ravel().tolist()
        k = stream.tolist()
        c = [0] * len(p)
        previous = p[-1] if len(p) >= 2 else 0
        for i in range(len(p)):
            c[i] = previous = int(self.encrypt_pixel(p[i], k[i], previous))
        return np.array(c, dtype=np.uint8).reshape(image.shape)


class Ours(CipherScheme):
    """Ahmad et al. 2025 (§8.3): keyed pixels substituted and chained, k = 0 pixels clear."""

    name = "ours"
    label = "Ours"
    keyed_reveals = "substitution"

    def encrypt_pixel(self, p, k, previous):
        return _choose(k > 0, substitute(p, k) ^ previous, p)

    def decrypt_pixel(self, c, k, previous):
        return _choose(k > 0, unsubstitute(c ^ previous, k), c)

    def _encrypt_flat(self, p: np.ndarray, k: np.ndarray) -> np.ndarray:
        # Segments restart at every identity pixel z (c(z) = p(z)); within a segment
        # c(i) = c(z) ⊕ t(z+1) ⊕ … ⊕ t(i) = g(i) ⊕ X(i) with X = xor-scan of t (t = 0 at identity
        # pixels) and g piecewise constant: g = c(−1) before the first identity pixel, then
        # p(z) ⊕ X(z).  g itself is a xor-scan of its jumps at the identity pixels.
        x = _xor_scan(substitute(p, k) & _keyed_mask(k))
        start = _chain_start(p)
        identity = np.flatnonzero(k == 0)
        level = p[identity] ^ x[identity]
        jumps = np.zeros_like(p)
        if identity.size:
            jumps[identity] = level ^ np.concatenate((start, level[:-1]))
        return start ^ _xor_scan(jumps) ^ x

    def _decrypt_flat(self, c: np.ndarray, k: np.ndarray) -> np.ndarray:
        previous = _previous_cipher(c, self._recover_chain_start(c, k))
        return _select(_keyed_mask(k), unsubstitute(c ^ previous, k), c)

    def _recover_chain_start(self, c: np.ndarray, k: np.ndarray) -> np.ndarray:
        """p(N−1) from c(N−1), c(N−2), k(N−1): the c(−1) the encryptor used (one element)."""
        if c.size < 2:
            return np.zeros(1, dtype=np.uint8)
        return self.decrypt_pixel(c[-1:], k[-1:], c[-2:-1])


class NegativePositive(CipherScheme):
    """[25] Sirichotedumrong, Kinoshita, Kiya 2019: keyed pixels negated (c = p ⊕ 255)."""

    name = "np"
    aliases = ("25",)
    label = "[25]"
    keyed_reveals = "negative"

    def encrypt_pixel(self, p, k, previous):
        return p ^ ((k > 0) * np.uint8(255))

    def decrypt_pixel(self, c, k, previous):
        return self.encrypt_pixel(c, k, previous)  # an involution

    def _encrypt_flat(self, p: np.ndarray, k: np.ndarray) -> np.ndarray:
        return p ^ _keyed_mask(k)

    def _decrypt_flat(self, c: np.ndarray, k: np.ndarray) -> np.ndarray:
        return c ^ _keyed_mask(k)


class Xor(CipherScheme):
    """[26] Ahmad & Shin 2022: c = p ⊕ k (k = 0 leaves the pixel alone)."""

    name = "xor"
    aliases = ("26",)
    label = "[26]"
    keyed_reveals = "nothing"

    def encrypt_pixel(self, p, k, previous):
        return p ^ k

    def decrypt_pixel(self, c, k, previous):
        return c ^ k

    def _encrypt_flat(self, p: np.ndarray, k: np.ndarray) -> np.ndarray:
        return p ^ k

    def _decrypt_flat(self, c: np.ndarray, k: np.ndarray) -> np.ndarray:
        return c ^ k


class Chained(Ours):
    """[27] Ahmad & Shin 2024: as ours, but k = 0 pixels are chained too (c = p ⊕ c(i−1))."""

    name = "chained"
    aliases = ("27",)
    label = "[27]"
    clears_identity_pixels = False
    chains_identity_pixels = True

    def encrypt_pixel(self, p, k, previous):
        return substitute(p, k) ^ previous  # substitute(p, 0) = p

    def decrypt_pixel(self, c, k, previous):
        return unsubstitute(c ^ previous, k)

    def _encrypt_flat(self, p: np.ndarray, k: np.ndarray) -> np.ndarray:
        return _chain_start(p) ^ _xor_scan(_select(_keyed_mask(k), substitute(p, k), p))

    def _decrypt_flat(self, c: np.ndarray, k: np.ndarray) -> np.ndarray:
        previous = _previous_cipher(c, self._recover_chain_start(c, k))
        return unsubstitute(c ^ previous, k)


#: Every scheme, by canonical name, in the paper's table order (baselines, then ours).
SCHEMES: dict[str, CipherScheme] = {
    scheme.name: scheme for scheme in (NegativePositive(), Xor(), Chained(), Ours())
}


def cipher_scheme(name: str | CipherScheme) -> CipherScheme:
    """The registered scheme called `name` or one of its aliases ("25" → np).

    Raises
    ------
    ValueError
        If no scheme of `SCHEMES` has that name or alias.
    """
    if isinstance(name, CipherScheme):
        return name
    # a scan, not a second table: SCHEMES stays the one place a scheme is registered
    scheme = next((s for s in SCHEMES.values() if name in (s.name, *s.aliases)), None)
    if scheme is None:
        spellings = ", ".join(
            f"{s.name} ({'/'.join(s.aliases)})" if s.aliases else s.name for s in SCHEMES.values()
        )
        raise ValueError(f"unknown scheme {name!r}; expected one of {spellings}")
    return scheme


def _registered(name: str) -> str:
    cipher_scheme(name)
    return name


#: A scheme name or alias as stored in metadata: validated against the registry and kept as
#: written, so that records made before the registry ("25") keep their value (and their tag).
Scheme = Annotated[str, AfterValidator(_registered)]


def encrypt(image: np.ndarray, stream: np.ndarray, scheme: str = "ours") -> np.ndarray:
    """Encrypt a uint8 2-D image with a key stream of the same number of pixels."""
    return cipher_scheme(scheme).encrypt(image, stream)


def decrypt(cipher: np.ndarray, stream: np.ndarray, scheme: str = "ours") -> np.ndarray:
    """Exact inverse of `encrypt` for the same key stream and scheme."""
    return cipher_scheme(scheme).decrypt(cipher, stream)


# --------------------------------------------------------------------------- 8-bit conversion
class IntensityRescale(BaseModel):
    """How a 12/16-bit (or float) image was brought to 8 bits; stored with every cipher image.

    Rule "minmax-v1": p = floor(255·(I − min)/(max − min) + 0.5) over the whole image (MATLAB's
    im2uint8(mat2gray(I)), spec §1.2); a constant image maps to 0.  `restore` inverts it up to
    the quantisation step (max − min)/255.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    rule: Literal["minmax-v1"] = "minmax-v1"
    min: float
    max: float
    source_dtype: str

    def restore(self, image: np.ndarray) -> np.ndarray:
        """Approximate original intensities (float64) of an 8-bit image made by this rule."""
        return self.min + image.astype(np.float64) * ((self.max - self.min) / 255.0)


def to_uint8(image: np.ndarray) -> tuple[np.ndarray, IntensityRescale]:
    """Per-image min–max conversion to uint8; returns the image and the rule's parameters."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array, got {type(image).__name__}")
    if image.ndim != 2:
        raise ValueError(f"image must be a 2-D grey image, got {image.ndim}-D shape {image.shape}")
    if image.size == 0:
        raise ValueError(f"image is empty (shape {image.shape})")
    if not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise ValueError(f"image has unsupported dtype {image.dtype}; expected integers or floats")
    values = image.astype(np.float64)
    if not np.all(np.isfinite(values)):
        raise ValueError("image contains NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    rescale = IntensityRescale(min=low, max=high, source_dtype=str(image.dtype))
    if high == low:
        return np.zeros(image.shape, dtype=np.uint8), rescale
    scaled = np.floor(255.0 * (values - low) / (high - low) + 0.5)
    return scaled.astype(np.uint8), rescale


# --------------------------------------------------------------------------- reference loops
def encrypt_reference(image: np.ndarray, stream: np.ndarray, scheme: str = "ours") -> np.ndarray:
    """Straightforward per-pixel loop of the published equations (tests and benchmarks only)."""
    return cipher_scheme(scheme).encrypt_reference(image, stream)
