"""Block-scrambled perceptual encryption: an experimental variant, separate from `pecore.cipher`.

Why: every scheme of `pecore.cipher` leaves about half of the pixels (or, for [27], half of the
c(i) ⊕ c(i−1) values) equal to the plain pixel *at its own position*, so a ciphertext-only
attacker inpaints the rest and sees the image (`pecore.attacks.ClearPixelAttack`).

What retrieval needs (method-spec §2–4): the ROI's pixels split into intensity-order subregions
(a function of the ROI's *set* of values, not of their positions) and dense 9×9 raw patches
pooled orderlessly into Fisher vectors per subregion.  Neither needs the tiles of the image to
be in their places, only each patch's inside.

So "<inner>-bs<b>" cuts the image into b×b tiles, permutes the tiles with a keyed permutation
that differs per image (derived from the key stream and a public per-image nonce, e.g. the
image id), and then encrypts the scrambled image with the unchanged inner scheme.  The owner
scrambles the ROI mask with the same permutation (`scramble_mask`) before upload, so the cloud
extracts features exactly as before.  Patches that straddle a tile border mix two unrelated
tiles: about 1 − ((b − 8)/b)² of them (44 % for b = 32, 23 % for b = 64).

Rows/columns beyond the last full tile stay in place.  The permutation key is a hash of the
key stream: an attacker who recovers the *whole* stream also gets the permutations (for
"ours" the top bit of k is never observable, so a known-plaintext attack does not).
This variant does not defend against a jigsaw-puzzle solver working on denoised tiles;
`pecore.attacks.jigsaw_neighbour_accuracy` measures how well tiles can be re-matched.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

from pecore.cipher import SCHEMES, CipherScheme, cipher_scheme, decrypt, encrypt
from pecore.cipher_roi import RoiCipher, is_roi_scheme

__all__ = [
    "VARIANT_SCHEMES",
    "TileScrambled",
    "any_scheme",
    "decrypt_any",
    "decrypt_variant",
    "encrypt_any",
    "encrypt_variant",
    "inner_scheme",
    "is_variant_scheme",
    "parse_variant",
    "scramble",
    "scramble_mask",
    "tile_permutation",
    "unscramble",
]

VARIANT_SCHEMES = ("ours-bs32", "ours-bs64")
_NAME = re.compile(r"^(?P<inner>[a-z0-9]+)-bs(?P<block>[1-9][0-9]*)$")
_LABEL = b"pecbir/block-scramble/v1"


def parse_variant(scheme: str) -> tuple[str, int]:
    """'ours-bs64' → ('ours', 64): any scheme of `pecore.cipher.SCHEMES` (or alias), tile ≥ 2.

    The inner scheme is returned as spelled ("25-bs32" → ("25", 32)), so that names stored
    before the registry keep their meaning and their nonces' permutations.
    """
    match = _NAME.match(scheme)
    inner = None if match is None else match["inner"]
    try:
        cipher_scheme(str(inner))
    except ValueError:
        inner = None
    if inner is None or int(match["block"]) < 2:
        raise ValueError(
            f"unknown variant scheme {scheme!r}; expected '<inner>-bs<tile>' with inner in "
            f"{', '.join(SCHEMES)} (or an alias) and tile >= 2, e.g. {', '.join(VARIANT_SCHEMES)}"
        )
    return inner, int(match["block"])


def _nonce_bytes(nonce: str | bytes) -> bytes:
    if isinstance(nonce, str):
        nonce = nonce.encode()
    if not isinstance(nonce, bytes):
        raise ValueError(f"nonce must be str or bytes, got {type(nonce).__name__}")
    return nonce


def tile_permutation(stream: np.ndarray, nonce: str | bytes, n_tiles: int) -> np.ndarray:
    """The keyed permutation of `n_tiles` tiles: argsort of SHAKE-256(H(stream) ‖ nonce).

    Version-independent (no numpy RNG): the same on every machine that derives the same stream.
    """
    nonce = _nonce_bytes(nonce)
    secret = hashlib.sha256(_LABEL + np.ascontiguousarray(stream, dtype=np.uint8).tobytes())
    message = secret.digest() + len(nonce).to_bytes(4, "big") + nonce
    draws = np.frombuffer(hashlib.shake_256(message).digest(8 * n_tiles), dtype=">u8")
    return np.argsort(draws, kind="stable")


def _tiles_view(image: np.ndarray, block: int) -> tuple[np.ndarray, int, int]:
    rows, cols = image.shape[0] // block, image.shape[1] // block
    core = image[: rows * block, : cols * block]
    tiles = core.reshape(rows, block, cols, block).swapaxes(1, 2).reshape(-1, block, block)
    return tiles, rows, cols


def _place_tiles(image: np.ndarray, tiles: np.ndarray, rows: int, cols: int) -> np.ndarray:
    block = tiles.shape[1]
    out = image.copy()
    grid = tiles.reshape(rows, cols, block, block).swapaxes(1, 2)
    out[: rows * block, : cols * block] = grid.reshape(rows * block, cols * block)
    return out


def scramble(image: np.ndarray, permutation: np.ndarray, block: int) -> np.ndarray:
    """Tile j of the output is tile permutation[j] of the input (row-major tile order)."""
    tiles, rows, cols = _tiles_view(image, block)
    if permutation.shape != (tiles.shape[0],):
        raise ValueError(f"permutation has {permutation.size} entries, image {tiles.shape[0]}")
    return _place_tiles(image, tiles[permutation], rows, cols)


def unscramble(image: np.ndarray, permutation: np.ndarray, block: int) -> np.ndarray:
    """Inverse of `scramble`."""
    tiles, rows, cols = _tiles_view(image, block)
    restored = np.empty_like(tiles)
    restored[permutation] = tiles
    return _place_tiles(image, restored, rows, cols)


def _permutation_for(
    shape: tuple[int, ...], stream: np.ndarray, nonce: str | bytes, block: int
) -> np.ndarray:
    if len(shape) != 2:
        raise ValueError(f"expected a 2-D image, got shape {shape}")
    n_tiles = (shape[0] // block) * (shape[1] // block)
    return tile_permutation(stream, nonce, n_tiles)


def encrypt_variant(
    image: np.ndarray, stream: np.ndarray, scheme: str = "ours-bs64", nonce: str | bytes = b""
) -> np.ndarray:
    """Scramble b×b tiles (keyed by stream and nonce), then encrypt with the inner scheme."""
    inner, block = parse_variant(scheme)
    image = np.asarray(image)
    permutation = _permutation_for(image.shape, stream, nonce, block)
    return encrypt(scramble(image, permutation, block), stream, inner)


def decrypt_variant(
    cipher: np.ndarray, stream: np.ndarray, scheme: str = "ours-bs64", nonce: str | bytes = b""
) -> np.ndarray:
    """Exact inverse of `encrypt_variant` for the same stream, scheme and nonce."""
    inner, block = parse_variant(scheme)
    cipher = np.asarray(cipher)
    permutation = _permutation_for(cipher.shape, stream, nonce, block)
    return unscramble(decrypt(cipher, stream, inner), permutation, block)


def scramble_mask(
    mask: np.ndarray, stream: np.ndarray, scheme: str = "ours-bs64", nonce: str | bytes = b""
) -> np.ndarray:
    """The ROI mask moved with the image's tiles (what the owner uploads with the cipher)."""
    _, block = parse_variant(scheme)
    mask = np.asarray(mask)
    return scramble(mask, _permutation_for(mask.shape, stream, nonce, block), block)


# --------------------------------------------------------------------------- any scheme
class TileScrambled:
    """The "<inner>-bs<b>" variant of a registered scheme, with the interface of `CipherScheme`.

    Attributes
    ----------
    name : str
        Canonical name ("ours-bs64"; "25-bs32" becomes "np-bs32").
    legacy_name : str
        The spelling results files and seeds used before the registry ("25-bs32").
    inner : CipherScheme
        The registered scheme applied after scrambling.
    block : int
        Tile side b.
    label : str
        Display label ("Ours + 64×64 tile scramble").
    """

    def __init__(self, name: str) -> None:
        inner, self.block = parse_variant(name)
        self.inner = cipher_scheme(inner)
        # the tile permutation depends on the stream and nonce only, not on the spelling
        self.name = f"{self.inner.name}-bs{self.block}"
        self.legacy_name = f"{self.inner.legacy_name}-bs{self.block}"
        self.label = f"{self.inner.label} + {self.block}×{self.block} tile scramble"

    def __repr__(self) -> str:
        return f"<tile-scrambled cipher scheme {self.name}>"

    def encrypt(
        self, image: np.ndarray, stream: np.ndarray, *, nonce: str | bytes = b""
    ) -> np.ndarray:
        """`encrypt_variant` with this scheme and `nonce`."""
        return encrypt_variant(image, stream, self.name, nonce)

    def decrypt(
        self, cipher: np.ndarray, stream: np.ndarray, *, nonce: str | bytes = b""
    ) -> np.ndarray:
        """`decrypt_variant` with this scheme and `nonce`."""
        return decrypt_variant(cipher, stream, self.name, nonce)


def any_scheme(name: str) -> CipherScheme | TileScrambled | RoiCipher:
    """A registered scheme (by name or alias), a tile-scrambled variant of one, or pe-roi.

    pe-roi (`pecore.cipher_roi.RoiCipher`) also needs the tumour mask to encrypt, so
    `encrypt_any` does not serve it; `pecore.envelope.encrypt_stack` does.

    Raises
    ------
    ValueError
        If `name` is neither.
    """
    if is_roi_scheme(name):
        return RoiCipher.from_name(name)
    try:
        return cipher_scheme(name)
    except ValueError:
        if not isinstance(name, str) or "-bs" not in name:
            raise
    return TileScrambled(name)


def is_variant_scheme(scheme: str | None) -> bool:
    """True for "<inner>-bs<b>" names that `parse_variant` accepts."""
    if scheme is None:
        return False
    try:
        return isinstance(any_scheme(scheme), TileScrambled)
    except ValueError:
        return False


def inner_scheme(scheme: str) -> tuple[str, int | None]:
    """(inner scheme, tile size) of any scheme name; tile None for a registered scheme."""
    resolved = any_scheme(scheme)
    if isinstance(resolved, TileScrambled):
        return resolved.inner.name, resolved.block
    return resolved.name, None


def encrypt_any(image: np.ndarray, stream: np.ndarray, scheme: str, nonce: str) -> np.ndarray:
    """Encrypt with any scheme (`any_scheme`); `nonce` keys a variant's tile permutation."""
    return any_scheme(scheme).encrypt(image, stream, nonce=nonce)


def decrypt_any(cipher: np.ndarray, stream: np.ndarray, scheme: str, nonce: str) -> np.ndarray:
    """Exact inverse of `encrypt_any` for the same stream, scheme and nonce."""
    return any_scheme(scheme).decrypt(cipher, stream, nonce=nonce)
