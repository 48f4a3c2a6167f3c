"""pe-roi: the one-stage perceptual mode that shows the cloud only the scrambled, keyed ROI.

The retrieval features (method-spec §1–4) only ever read the owner-dilated tumour ROI and the
P×P patches centred on its pixels.  So the owner sends, for feature extraction:

1. the slice with everything outside ROI ⊕ patch margin blanked to 0 (ROI = tumour mask
   dilated by `radius`, margin = ⌊P/2⌋ px more, so every ROI patch sees its true pixels
   where it does not cross a tile border);
2. cut into `tile`×`tile` tiles, permuted by a per-image keyed permutation;
3. each tile moved by a per-image keyed transform: one of the 8 symmetries of the square
   (rotations by 90°, transposition) and, with "negative" in the transform set, the
   negative–positive transform p → 255 − p of its kept pixels (blank pixels stay 0, so
   that a blank corner does not give the transform away);
4. encrypted with the unchanged inner scheme ("ours", `pecore.cipher`) under the image's key
   stream;

and the cloud mask: the ROI moved with the tiles (no further dilation by the cloud).  With the
"interior" patch positions (spelling suffix "-in"), the cloud mask is only the ROI pixels whose
P×P patch lies inside one tile (P = the features' patch size, 9 unless the spelling says
"-p<P>"; P ≤ 2·margin + 1): a patch that straddles a tile border reads an
unrelated scrambled neighbour, so the features read genuine patches only (up to the tile's
transform).  The tile grid is public, so this mask is a function of the full moved ROI the cloud
would otherwise get: it tells the cloud nothing more, and the cloud image is the same.  A
smaller P ("-p7", "-p5") keeps more interior positions per tile ((b − P + 1)² of b²) with the
same kept margin, so the cloud image stays byte-identical to the P = 9 scheme's.  With the
"tile-reflected" patches (spelling suffix "-rf"), the cloud mask is the whole moved ROI, as
without "-in", but the cloud cuts every ROI pixel's patch from that pixel's own tile, padded
by reflection of the tile's pixels (`pecore.features.extract_patches`' `tile`): every patch
then holds only its own tile's pixels, at every ROI position.  The cloud image and mask are
byte-identical to the scheme without "-rf"; only the cloud's feature extraction differs (the
grid is public, and reflection commutes with the per-tile dihedral transforms).  The full
slice travels only sealed (AES-GCM envelope, outside this module).  Patches are pooled
orderlessly into Fisher vectors per intensity-order subregion, so the features need each patch's
inside, not its place: what tile size and transform set they tolerate is a measurement
(`results/pe-roi/selection/`, training folds only).

Keys: permutation and transforms are SHAKE-256(SHA-256(label ‖ stream) ‖ len(nonce) ‖ nonce):
8 bytes per tile for the permutation (argsort, as `pecore.cipher_variants`), then 1 byte per
tile whose low 4 bits pick the transform.  No numpy RNG: the same on every machine.

Decryption (`RoiCipher.decrypt`) returns the kept pixels bit-exactly and 0 elsewhere; it needs the
tumour mask (the owner's, sealed beside the image) or, where the cloud mask is the full moved ROI
(positions "all"), the cloud mask, to know which pixels were kept.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Literal

import numpy as np

from pecore.cipher import CipherScheme, cipher_scheme
from pecore.roi import dilate_mask

__all__ = [
    "DEFAULT_ROI_SCHEME",
    "ROI_TRANSFORM_SETS",
    "RoiCipher",
    "RoiTileKeys",
    "apply_tile_transforms",
    "invert_tile_transforms",
    "is_roi_scheme",
    "roi_tile_keys",
]

TransformSet = Literal["none", "dihedral", "dihedral+negative"]
#: Where the cloud takes patches: every ROI pixel, or only those whose patch fits inside a tile.
Positions = Literal["all", "interior"]
#: Transform sets by name, as the bit mask of the transform code they use: bits 0–1 rotate by
#: k·90°, bit 2 transposes first, bit 3 negates the kept pixels.
ROI_TRANSFORM_SETS: dict[str, int] = {
    "none": 0b0000,
    "dihedral": 0b0111,
    "dihedral+negative": 0b1111,
}
_SHORT = {"none": "", "dihedral": "d", "dihedral+negative": "dn"}
_LABEL = b"pecbir/pe-roi/v1"
_NAME = re.compile(
    r"^pe-roi(?:-t(?P<tile>[1-9][0-9]*)(?P<set>d|dn)?(?P<inside>-in|-rf)?"
    r"(?:-p(?P<patch>[1-9][0-9]*))?)?$"
)
_SUFFIX = {"all": "", "interior": "-in"}
#: The chosen configuration (results/pe-roi/README.md, section 1): the best training-split mAP
#: among the candidates whose best attack (jigsaw included) stays at ROI SSIM <= 0.30 on every
#: attacked training-fold slice: 16x16 tiles under keyed symmetries, every ROI position
#: (pe-roi-t16d, 83.65 % mAP over three seeds). The per-tile negation, chosen before, cost
#: about 2.2 points; pe-roi-t16dn-in, the previous choice, keeps its explicit name.
DEFAULT_ROI_SCHEME = "pe-roi"
_DEFAULT_TILE = 16
_DEFAULT_SET: TransformSet = "dihedral"
_DEFAULT_POSITIONS: Positions = "all"
#: The features' patch side P of method-spec §2 (no "-p<P>" suffix in a name means this one).
_DEFAULT_PATCH = 9


@dataclass(frozen=True)
class RoiTileKeys:
    """Per-image tile keys: tile j of the cloud image is tile ``permutation[j]`` of the slice,
    moved by transform ``codes[j]`` (see `ROI_TRANSFORM_SETS`)."""

    permutation: np.ndarray
    codes: np.ndarray


def roi_tile_keys(
    stream: np.ndarray, nonce: str | bytes, n_tiles: int, transform_mask: int
) -> RoiTileKeys:
    """The keyed permutation and transform codes of `n_tiles` tiles (see the module docstring)."""
    if isinstance(nonce, str):
        nonce = nonce.encode()
    if not isinstance(nonce, bytes):
        raise ValueError(f"nonce must be str or bytes, got {type(nonce).__name__}")
    secret = hashlib.sha256(_LABEL + np.ascontiguousarray(stream, dtype=np.uint8).tobytes())
    message = secret.digest() + len(nonce).to_bytes(4, "big") + nonce
    digest = hashlib.shake_256(message).digest(9 * n_tiles)
    draws = np.frombuffer(digest[: 8 * n_tiles], dtype=">u8")
    codes = np.frombuffer(digest[8 * n_tiles :], dtype=np.uint8) & np.uint8(transform_mask)
    return RoiTileKeys(permutation=np.argsort(draws, kind="stable"), codes=codes.copy())


def _dihedral(tile: np.ndarray, code: int) -> np.ndarray:
    if code & 4:
        tile = tile.T
    return np.rot90(tile, code & 3)


def _move_tiles(tiles: np.ndarray, codes: np.ndarray, *, inverse: bool) -> np.ndarray:
    """`_dihedral` (or its inverse) of every tile by its code, one stacked call per code."""
    out = np.empty_like(tiles)
    for code in (int(c) for c in np.unique(codes & 7)):
        chosen = (codes & 7) == code
        group = tiles[chosen]
        if inverse:
            group = np.rot90(group, -(code & 3), axes=(1, 2))
            out[chosen] = group.swapaxes(1, 2) if code & 4 else group
        else:
            group = group.swapaxes(1, 2) if code & 4 else group
            out[chosen] = np.rot90(group, code & 3, axes=(1, 2))
    return out


def _negation(codes: np.ndarray, block: int, shape: tuple[int, int]) -> np.ndarray:
    """Bool image (moved frame) of the tiles whose code has the negation bit."""
    flags = (codes & 8).astype(bool)[:, None, None]
    return _untile(np.broadcast_to(flags, (codes.size, block, block)), shape)


def _tiles(image: np.ndarray, block: int) -> np.ndarray:
    rows, cols = image.shape[0] // block, image.shape[1] // block
    return image.reshape(rows, block, cols, block).swapaxes(1, 2).reshape(-1, block, block)


def _untile(tiles: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    block = tiles.shape[1]
    rows, cols = shape[0] // block, shape[1] // block
    return tiles.reshape(rows, cols, block, block).swapaxes(1, 2).reshape(shape)


def apply_tile_transforms(
    image: np.ndarray, keys: RoiTileKeys, block: int, *, negate: np.ndarray | None = None
) -> np.ndarray:
    """Scramble the tiles of `image` and move each by its dihedral transform.

    `negate`: bool image (already scrambled and moved, like the output) of the pixels that the
    negation bit inverts; None ignores bit 3 (masks).
    """
    moved = _move_tiles(_tiles(image, block)[keys.permutation], keys.codes, inverse=False)
    out = _untile(moved, image.shape)
    if negate is not None:
        flip = _negation(keys.codes, block, image.shape) & negate
        out = np.where(flip, 255 - out, out).astype(image.dtype)
    return out


def invert_tile_transforms(
    image: np.ndarray, keys: RoiTileKeys, block: int, *, negate: np.ndarray | None = None
) -> np.ndarray:
    """Exact inverse of `apply_tile_transforms` (same keys, same `negate` in the moved frame)."""
    if negate is not None:
        flip = _negation(keys.codes, block, image.shape) & negate
        image = np.where(flip, 255 - image, image).astype(image.dtype)
    tiles = np.empty_like(_tiles(image, block))
    tiles[keys.permutation] = _move_tiles(_tiles(image, block), keys.codes, inverse=True)
    return _untile(tiles, image.shape)


class RoiCipher:
    """The pe-roi scheme: blank outside ROI ⊕ margin, keyed tile scramble + transforms, "ours".

    Parameters
    ----------
    tile : int, default=16
        Tile side b (must divide the image's height and width).
    transforms : {"none", "dihedral", "dihedral+negative"}, default="dihedral"
        Per-tile keyed transforms.
    radius : int, default=24
        ROI dilation radius of the tumour mask (spec §1.3).
    margin : int, default=4
        Extra pixels kept around the ROI (⌊P/2⌋ for P = 9 patches).
    inner : str, default="ours"
        Registered scheme of `pecore.cipher` applied last.
    positions : {"all", "interior"}, default="all"
        The cloud mask: every ROI pixel (moved), or only those whose patch of side
        `patch_size` lies inside one tile (spelling suffix "-in").
    patch_size : int, optional
        Side P of the P×P patches the features take (odd, ⌊P/2⌋ ≤ margin; default
        2·margin + 1, i.e. 9; spelling suffix "-p<P>" when not 2·margin + 1).  It does not
        change the cipher image, only the interior positions and the pipeline the scheme's
        features are computed with.
    reflect : bool, default=False
        Tile-reflected patches (spelling suffix "-rf"; positions "all" only): the cloud cuts
        every patch from its centre's own tile, padded by reflection of that tile's pixels.
        It changes neither the cipher image nor the cloud mask, only the feature extraction
        (`pecbir.experiment.condition_fold_config`'s `patch_tile`).

    Attributes
    ----------
    name : str
        "pe-roi" for the chosen configuration, else "pe-roi-t<b>[d|dn][-in|-rf][-p<P>]".
    legacy_name : str
        Always "pe-roi-t<b>[d|dn][-in|-rf][-p<P>]" (what seeds and cache names are derived
        from).
    image_name : str
        "pe-roi-t<b>[d|dn]": the scheme that sends the same cloud image with the whole moved
        ROI as mask (the privacy of this scheme is bounded by that one's).
    label : str
        Display label.
    """

    def __init__(
        self,
        *,
        tile: int = _DEFAULT_TILE,
        transforms: TransformSet = _DEFAULT_SET,
        radius: int = 24,
        margin: int = 4,
        inner: str = "ours",
        positions: Positions = _DEFAULT_POSITIONS,
        patch_size: int | None = None,
        reflect: bool = False,
    ) -> None:
        if tile < 2:
            raise ValueError(f"tile must be >= 2, got {tile}")
        if transforms not in ROI_TRANSFORM_SETS:
            raise ValueError(
                f"unknown transform set {transforms!r}; "
                f"expected one of {', '.join(ROI_TRANSFORM_SETS)}"
            )
        if radius < 0 or margin < 0:
            raise ValueError(f"radius and margin must be >= 0, got {radius}, {margin}")
        if positions not in _SUFFIX:
            raise ValueError(
                f"unknown patch positions {positions!r}; expected one of {', '.join(_SUFFIX)}"
            )
        if patch_size is None:
            patch_size = 2 * margin + 1
        if patch_size < 1 or patch_size % 2 == 0:
            raise ValueError(f"patch_size must be odd and positive, got {patch_size}")
        if patch_size // 2 > margin:
            raise ValueError(
                f"patch_size {patch_size} needs a margin of {patch_size // 2} px, got {margin}"
            )
        if reflect and positions != "all":
            raise ValueError(
                "tile-reflected patches (reflect=True) take every ROI position; "
                f"got positions {positions!r}"
            )
        if reflect and patch_size // 2 >= tile:
            raise ValueError(
                f"patches of side {patch_size} cannot be reflected inside {tile}-pixel tiles"
            )
        self.tile = int(tile)
        self.transforms = transforms
        self.reflect = bool(reflect)
        self.radius = int(radius)
        self.margin = int(margin)
        self.inner: CipherScheme = cipher_scheme(inner)
        self.positions = positions
        self.patch_size = int(patch_size)
        default = (
            self.tile,
            transforms,
            positions,
            self.patch_size,
            self.margin,
            self.reflect,
        ) == (
            _DEFAULT_TILE,
            _DEFAULT_SET,
            _DEFAULT_POSITIONS,
            _DEFAULT_PATCH,
            _DEFAULT_PATCH // 2,
            False,
        )
        patch = "" if self.patch_size == 2 * self.margin + 1 else f"-p{self.patch_size}"
        where = "-rf" if self.reflect else _SUFFIX[positions]
        explicit = f"pe-roi-t{self.tile}{_SHORT[transforms]}{where}{patch}"
        self.name = "pe-roi" if default else explicit
        # seeds and cache names: the explicit spelling, stable when the chosen one changes
        self.legacy_name = explicit
        # the scheme whose cloud image this one sends, with the whole moved ROI as mask: this
        # scheme's mask is a function of that one's and the public tile grid
        self.image_name = f"pe-roi-t{self.tile}{_SHORT[transforms]}"
        inside = ", patches inside tiles" if positions == "interior" else ""
        inside += ", tile-reflected patches" if self.reflect else ""
        inside += f", {self.patch_size}×{self.patch_size} patches" if patch else ""
        self.label = f"PE-ROI ({self.tile}×{self.tile} tiles, {transforms}{inside})"

    @classmethod
    def from_name(cls, name: str) -> RoiCipher:
        """'pe-roi' (the chosen configuration) or 'pe-roi-t<b>[d|dn][-in|-rf][-p<P>]'.

        Raises
        ------
        ValueError
            If `name` is not of that form.
        """
        match = _NAME.match(name) if isinstance(name, str) else None
        if match is None:
            raise ValueError(
                f"unknown pe-roi scheme {name!r}; "
                "expected 'pe-roi' or 'pe-roi-t<tile>[d|dn][-in|-rf][-p<patch>]'"
            )
        if match["tile"] is None:
            return cls()
        sets = {"": "none", "d": "dihedral", "dn": "dihedral+negative"}
        positions: Positions = "interior" if match["inside"] == "-in" else "all"
        patch = int(match["patch"]) if match["patch"] else None
        return cls(
            tile=int(match["tile"]),
            transforms=sets[match["set"] or ""],
            positions=positions,
            patch_size=patch,
            reflect=match["inside"] == "-rf",
        )

    def __repr__(self) -> str:
        return f"<pe-roi cipher scheme {self.name}>"

    def _check(self, image: np.ndarray, what: str) -> None:
        if image.ndim != 2 or image.shape[0] % self.tile or image.shape[1] % self.tile:
            raise ValueError(
                f"{what} of shape {image.shape}: pe-roi needs a 2-D image whose sides are "
                f"multiples of the tile ({self.tile})"
            )

    def keys(self, stream: np.ndarray, nonce: str | bytes, shape: tuple[int, int]) -> RoiTileKeys:
        """The image's tile keys (`roi_tile_keys` with this scheme's transform set)."""
        n_tiles = (shape[0] // self.tile) * (shape[1] // self.tile)
        return roi_tile_keys(stream, nonce, n_tiles, ROI_TRANSFORM_SETS[self.transforms])

    def check_patch_size(self, patch_size: int) -> None:
        """Refuse patches that would read blank pixels at the ROI's border.

        Parameters
        ----------
        patch_size : int
            Side P of the P×P patches the features take around every ROI pixel.

        Raises
        ------
        ValueError
            If ⌊P/2⌋ exceeds the kept margin, or, with the "interior" positions, P exceeds
            the scheme's `patch_size` (its patches would leave their tile), or, with
            tile-reflected patches, ⌊P/2⌋ is not below the tile.
        """
        if patch_size // 2 > self.margin:
            raise ValueError(
                f"{self.legacy_name} keeps a {self.margin}-pixel margin around the ROI, so "
                f"patch_size must be at most {2 * self.margin + 1}, got {patch_size}"
            )
        if self.positions == "interior" and patch_size > self.patch_size:
            raise ValueError(
                f"{self.legacy_name} sends the positions whose {self.patch_size}×"
                f"{self.patch_size} patch lies inside one tile, so patch_size must be at most "
                f"{self.patch_size}, got {patch_size}"
            )
        if self.reflect and patch_size // 2 >= self.tile:
            raise ValueError(
                f"{self.legacy_name} reflects patches inside {self.tile}-pixel tiles, so "
                f"patch_size must be below {2 * self.tile + 1}, got {patch_size}"
            )

    def roi(self, mask: np.ndarray) -> np.ndarray:
        """The ROI the features read: the tumour mask dilated by `radius` (plain frame)."""
        return dilate_mask(np.asarray(mask, dtype=bool), self.radius)

    def _kept(self, roi: np.ndarray) -> np.ndarray:
        return dilate_mask(roi, self.margin)

    def tile_interior(self, shape: tuple[int, int]) -> np.ndarray:
        """Bool image of the pixels whose `patch_size`² patch lies inside their tile.

        The same in the plain and the moved frame: every dihedral transform maps a tile's
        interior onto itself.
        """
        inside = np.zeros(self.tile, dtype=bool)
        half = self.patch_size // 2
        inside[half : self.tile - half] = True
        rows = np.tile(inside, shape[0] // self.tile)
        cols = np.tile(inside, shape[1] // self.tile)
        return rows[:, None] & cols[None, :]

    def cloud_mask(self, mask: np.ndarray, stream: np.ndarray, *, nonce: str | bytes) -> np.ndarray:
        """The mask the cloud gets: the ROI moved with the tiles (bool); with the "interior"
        positions, only its pixels whose patch lies inside one tile (`tile_interior`)."""
        mask = np.asarray(mask, dtype=bool)
        self._check(mask, "mask")
        moved = apply_tile_transforms(
            self.roi(mask), self.keys(stream, nonce, mask.shape), self.tile
        )
        if self.positions == "interior":
            moved &= self.tile_interior(mask.shape)
        return moved

    def encrypt(
        self, image: np.ndarray, stream: np.ndarray, *, mask: np.ndarray, nonce: str | bytes
    ) -> np.ndarray:
        """The cloud's feature image of a uint8 slice with tumour `mask` (see module docstring)."""
        image = np.asarray(image)
        mask = np.asarray(mask, dtype=bool)
        self._check(image, "image")
        if mask.shape != image.shape:
            raise ValueError(f"mask shape {mask.shape} does not match image shape {image.shape}")
        keys = self.keys(stream, nonce, image.shape)
        kept = apply_tile_transforms(self._kept(self.roi(mask)), keys, self.tile)
        moved = apply_tile_transforms(image, keys, self.tile, negate=kept)
        moved = np.where(kept, moved, np.uint8(0)).astype(np.uint8)
        return self.inner.encrypt(moved, stream)

    def decrypt(
        self,
        cipher: np.ndarray,
        stream: np.ndarray,
        *,
        nonce: str | bytes,
        mask: np.ndarray | None = None,
        cloud_mask: np.ndarray | None = None,
    ) -> np.ndarray:
        """The kept pixels of the slice (ROI ⊕ margin) bit-exactly, 0 elsewhere.

        Exactly one of `mask` (the plain tumour mask, which the owner keeps sealed beside the
        image) and `cloud_mask` tells which pixels were kept; `cloud_mask` only where it is the
        full moved ROI (positions "all": records made before the "interior" positions).

        Raises
        ------
        ValueError
            If neither or both are given, or `cloud_mask` for the "interior" positions (it
            drops the ROI pixels near tile borders, so the kept pixels cannot be told from it).
        """
        cipher = np.asarray(cipher)
        self._check(cipher, "cipher image")
        if (mask is None) == (cloud_mask is None):
            raise ValueError("decrypt needs exactly one of mask (the tumour mask) and cloud_mask")
        keys = self.keys(stream, nonce, cipher.shape)
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != cipher.shape:
                raise ValueError(
                    f"mask shape {mask.shape} does not match cipher shape {cipher.shape}"
                )
            roi = self.roi(mask)
        elif self.positions == "interior":
            raise ValueError(
                f"{self.legacy_name}: its cloud mask holds only the tile interiors of the ROI; "
                "decrypt with the tumour mask (mask=...)"
            )
        else:
            roi = invert_tile_transforms(np.asarray(cloud_mask, dtype=bool), keys, self.tile)
        kept = apply_tile_transforms(self._kept(roi), keys, self.tile)
        moved = np.where(kept, self.inner.decrypt(cipher, stream), np.uint8(0)).astype(np.uint8)
        return invert_tile_transforms(moved, keys, self.tile, negate=kept)

    def blank(self, image: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """What `decrypt` returns, from the plain slice: kept pixels as they are, 0 elsewhere."""
        kept = self._kept(self.roi(mask))
        return np.where(kept, np.asarray(image), 0).astype(np.uint8)


def is_roi_scheme(name: str | None) -> bool:
    """True for names `RoiCipher.from_name` accepts."""
    return isinstance(name, str) and _NAME.match(name) is not None
