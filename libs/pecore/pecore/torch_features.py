"""The feature pipeline on a torch device (issue 17): batched ROI patches, PCA, GMM posteriors,
improved Fisher vectors and the CFML projection, for many images at once.

It evaluates the models the numpy/numba path (`pecore.pipeline`, the reference) fitted, on
CUDA when present, else on the CPU (where CI runs it). What can be exact is exact: min–max
normalisation, the dilated ROI's pixels, the Hazen cut points (numpy's own lerp, op for op in
float64) and so the intensity-order subregions, and the patch values. From the PCA product on,
float32 products are summed in another order than numpy's BLAS, so Fisher vectors agree to a
tolerance, not bit for bit (measured by `pecbir bench-gpu`; asserted in
tests/pecore/test_torch_features.py). TF32 is never used: products run at torch's default
"highest" float32 precision.

A batch is cut down on the host to each slice's ROI box plus margin (`_RoiCrops`: the device
moves and touches a fraction of each slice; the min–max extremes come from the whole slice),
so slices of any shape share a batch. Masks may be dilated on the device too (the disk as
2r + 1 horizontal runs, boolean and so exact, stopped at each slice's border). Per batch,
each (image, subregion) segment is cut into runs of `_RUN` patches, the last one padded, so
that all posterior-weighted sums are one batched product whose padding stays under `_RUN`
patches per segment, whatever the segments' spread of sizes (padding every segment to the
longest cost several times the work on slices whose tumours differ in size); the runs' sums
add up per segment in float64.

torch is an optional extra (`pip install 'pe-cbir[gpu]'`); this module imports it on use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from pecore.features import PatchPCA
from pecore.fisher import _POSTERIOR_EPS, _PRIOR_EPS, DiagonalGMM
from pecore.roi import dilate_mask

if TYPE_CHECKING:
    import torch

__all__ = ["BACKENDS", "TorchFeatures", "dilate_masks", "resolve_device", "torch_version"]

#: The feature back ends `CBIRPipeline(backend=...)` accepts.
BACKENDS = ("numpy", "torch")

#: Patches per run of a segment in the batched Fisher-vector sums (see the module docstring).
_RUN = 256


def _torch() -> Any:
    try:
        import torch
    except ImportError as exc:  # the extra is optional
        raise ImportError(
            "the torch feature back end needs PyTorch: pip install 'pe-cbir[gpu]'"
        ) from exc
    return torch


def torch_version() -> str | None:
    """The installed PyTorch release, or None where it is not installed.

    Returns
    -------
    str or None
        ``torch.__version__``.
    """
    try:
        return str(_torch().__version__)
    except ImportError:
        return None


def resolve_device(device: str | None = None) -> str:
    """The torch device to run on: `device` if given, else "cuda" when present, else "cpu".

    Parameters
    ----------
    device : str, optional
        A torch device string ("cpu", "cuda", "cuda:1", …).

    Returns
    -------
    str
        The device string.

    Raises
    ------
    ValueError
        If `device` names CUDA and no CUDA device is present.
    """
    torch = _torch()
    if device is None or device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but torch sees no CUDA device")
    return str(torch.device(device))


def _hazen_cuts(
    torch: Any, sorted_values: torch.Tensor, counts: torch.Tensor, n_regions: int
) -> torch.Tensor:
    """numpy's `quantile(..., method="hazen")` at j/R, j = 1..R−1, of each row's first
    `counts` sorted values, op for op as numpy does it (float64), so ties fall the same way."""
    n = counts.to(torch.float64)[:, None]  # (B, 1)
    # numpy's linspace, not torch's: the two may round j/R differently
    probabilities = np.linspace(0.0, 1.0, n_regions + 1)[1:n_regions]
    q = torch.as_tensor(probabilities, device=counts.device)[None, :]  # (1, R−1)
    virtual = n * q + (0.5 + q * 0.0) - 1.0  # numpy: n·q + (α + q(1 − α − β)) − 1
    previous = torch.floor(virtual)
    last = (n - 1.0).expand_as(virtual)
    above = virtual >= last
    below = virtual < 0
    previous = torch.where(above, last, torch.where(below, torch.zeros_like(previous), previous))
    following = torch.where(above | below, previous, previous + 1.0)
    gamma = virtual - torch.floor(virtual)
    a = torch.gather(sorted_values, 1, previous.long())
    b = torch.gather(sorted_values, 1, following.long())
    diff = b - a
    low = a + diff * gamma  # numpy's _lerp, both branches
    high = b - diff * (1.0 - gamma)
    return torch.where(gamma >= 0.5, high, low)


def dilate_masks(masks: torch.Tensor, radius: int) -> torch.Tensor:
    """`pecore.roi.dilate_mask` of a stack of masks at once, on their device.

    The disk {dy² + dx² ≤ r²} is the union of 2r + 1 horizontal runs, row dy spanning
    |dx| ≤ ⌊√(r² − dy²)⌋. Runs of growing half-width come from one another (a run of half-width
    w + 1 at x is those of half-width w at x − 1, x, x + 1), and each row's run is shifted
    vertically into the result: 3r + 1 ORs of the stack, exact, on the bounding box of all
    masks plus the radius, with 63 masks packed into the bits of each int64 word (one float16
    convolution with the disk, tried instead on an H100, took 0.65 ms per image against 0.06
    for unpacked boolean ORs: an implicit GEMM with a single output channel).

    Parameters
    ----------
    masks : torch.Tensor of bool, shape (n, height, width)
        Tumour masks.
    radius : int
        Radius of the disk in pixels; 0 returns a copy.

    Returns
    -------
    torch.Tensor of bool, shape (n, height, width)
        The dilated masks, equal to `dilate_mask` of each.

    Raises
    ------
    ValueError
        If `masks` is not 3-D or `radius` is negative.

    Examples
    --------
    >>> import torch
    >>> masks = torch.zeros((1, 5, 5), dtype=torch.bool)
    >>> masks[0, 2, 2] = True
    >>> dilate_masks(masks, 1)[0].int()
    tensor([[0, 0, 0, 0, 0],
            [0, 0, 1, 0, 0],
            [0, 1, 1, 1, 0],
            [0, 0, 1, 0, 0],
            [0, 0, 0, 0, 0]], dtype=torch.int32)
    """
    torch = _torch()
    if masks.ndim != 3:
        raise ValueError(f"masks must be (n, height, width), got shape {tuple(masks.shape)}")
    if radius < 0:
        raise ValueError(f"radius must be >= 0, got {radius}")
    out = torch.zeros_like(masks, dtype=torch.bool)
    # one transfer for the bounding box of all masks (each index read would wait on the device)
    height, width = masks.shape[1:]
    flags = torch.cat([masks.any(dim=(0, 2)), masks.any(dim=(0, 1))]).cpu().numpy()
    rows, cols = np.flatnonzero(flags[:height]), np.flatnonzero(flags[height:])
    if radius == 0 or rows.size == 0:
        out |= masks
        return out
    r0, r1 = max(int(rows[0]) - radius, 0), min(int(rows[-1]) + radius + 1, height)
    c0, c1 = max(int(cols[0]) - radius, 0), min(int(cols[-1]) + radius + 1, width)
    run = _pack_bits(torch, masks[:, r0:r1, c0:c1].to(torch.bool))
    box = torch.zeros_like(run)
    rows_of_half_width: dict[int, list[int]] = {}
    for dy in range(-radius, radius + 1):
        rows_of_half_width.setdefault(math.isqrt(radius * radius - dy * dy), []).append(dy)
    h = r1 - r0
    for half_width in range(radius + 1):
        if half_width:
            wider = run.clone()
            wider[:, :, 1:] |= run[:, :, :-1]
            wider[:, :, :-1] |= run[:, :, 1:]
            run = wider
        for dy in rows_of_half_width.get(half_width, ()):
            # box[y] |= run[y + dy] where both rows exist
            if abs(dy) >= h:
                continue
            if dy >= 0:
                box[:, : h - dy] |= run[:, dy:]
            else:
                box[:, -dy:] |= run[:, : h + dy]
    out[:, r0:r1, c0:c1] = _unpack_bits(torch, box, masks.shape[0])
    return out


#: Masks per int64 word in `dilate_masks` (63: their sum never reaches the sign bit).
_BITS = 63


def _pack_bits(torch: Any, masks: torch.Tensor) -> torch.Tensor:
    """(n, h, w) bool → (⌈n/63⌉, h, w) int64, mask i as bit i % 63 of word i // 63: a shift
    and an OR of the words then move and combine 63 masks at once, in an eighth of the bytes
    (on an H100 the bool ORs took 0.06 ms per image, the largest device stage; packed, the
    whole dilation took 0.045)."""
    n, h, w = masks.shape
    groups = -(-n // _BITS)
    padded = masks.new_zeros((groups * _BITS, h, w))
    padded[:n] = masks
    bits = torch.arange(_BITS, device=masks.device)
    weights = torch.bitwise_left_shift(torch.ones_like(bits), bits)[None, :, None, None]
    return (padded.view(groups, _BITS, h, w).to(torch.int64) * weights).sum(dim=1)


def _unpack_bits(torch: Any, words: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of `_pack_bits`: the first `n` masks, (n, h, w) bool."""
    groups, h, w = words.shape
    bits = torch.arange(_BITS, device=words.device)[None, :, None, None]
    masks = torch.bitwise_and(torch.bitwise_right_shift(words[:, None], bits), 1).to(torch.bool)
    return masks.reshape(groups * _BITS, h, w)[:n]


class TorchFeatures:
    """Fisher vectors and projections of many images at once on a torch device.

    Parameters
    ----------
    pca : PatchPCA
        The fitted patch PCA.
    gmm : DiagonalGMM
        The fitted visual dictionary.
    n_regions : int
        Intensity-order subregions R.
    patch_size : int
        Patch side P (odd).
    device : str, optional
        Torch device; None takes CUDA when present, else the CPU (`resolve_device`).
    batch_size : int, optional
        Images per batch; None takes 128 on CUDA and 8 on the CPU.

    Attributes
    ----------
    device : str
        The device the work runs on.
    n_features : int
        Length F of one Fisher vector.

    Examples
    --------
    >>> import numpy as np
    >>> from pecore.features import PatchPCA
    >>> from pecore.fisher import DiagonalGMM
    >>> rng = np.random.default_rng(0)
    >>> pca = PatchPCA(energy=0.9).fit(rng.random((200, 9)))
    >>> gmm = DiagonalGMM(n_components=2).fit(pca.transform(rng.random((200, 9))))
    >>> features = TorchFeatures(pca, gmm, n_regions=2, patch_size=3, device="cpu")
    >>> images = rng.integers(0, 256, (3, 12, 12)).astype(np.uint8)
    >>> rois = np.zeros((3, 12, 12), dtype=bool)
    >>> rois[:, 4:8, 4:8] = True
    >>> features.fisher_vectors(images, rois).shape == (3, features.n_features)
    True
    """

    def __init__(
        self,
        pca: PatchPCA,
        gmm: DiagonalGMM,
        *,
        n_regions: int,
        patch_size: int,
        device: str | None = None,
        batch_size: int | None = None,
    ) -> None:
        torch = _torch()
        if patch_size < 1 or patch_size % 2 == 0:
            raise ValueError(f"patch size must be odd and positive, got {patch_size}")
        self.device = resolve_device(device)
        self.n_regions = int(n_regions)
        self.patch_size = int(patch_size)
        on_cuda = self.device.startswith("cuda")
        self.batch_size = int(batch_size or (128 if on_cuda else 8))
        dev = self.device
        f32, f64 = torch.float32, torch.float64
        # the very arrays the numpy path multiplies with (PatchPCA / DiagonalGMM internals)
        self._projection = torch.as_tensor(pca._projection, dtype=f32, device=dev)
        self._offset = torch.as_tensor(pca._offset, dtype=f32, device=dev)
        self._coef = torch.as_tensor(gmm._coef, dtype=f32, device=dev)
        self._bias = torch.as_tensor(gmm._bias, dtype=f32, device=dev)
        self._mu = torch.as_tensor(gmm.means_, dtype=f64, device=dev)
        self._var = torch.as_tensor(gmm.variances_, dtype=f64, device=dev)
        self._sigma = torch.sqrt(self._var)
        self._active = torch.as_tensor(gmm.weights_ >= _PRIOR_EPS, device=dev)[:, None]
        self._sqrt_w = torch.as_tensor(
            np.sqrt(np.maximum(gmm.weights_, _PRIOR_EPS)), dtype=f64, device=dev
        )[:, None]
        self.n_components, self.n_dims = gmm.means_.shape
        self.n_features = self.n_regions * 2 * self.n_components * self.n_dims
        half = self.patch_size // 2
        steps = torch.arange(-half, half + 1, device=dev)
        # row-major P×P window offsets, as `extract_patches` flattens a block
        self._dr = steps.repeat_interleave(self.patch_size)
        self._dc = steps.repeat(self.patch_size)
        self._w_cache: tuple[tuple, np.ndarray, torch.Tensor] | None = None

    # -- Fisher vectors ----------------------------------------------------------------------
    def fisher_vectors(
        self,
        images: Sequence[np.ndarray],
        rois: Sequence[np.ndarray],
        *,
        radius: int = 0,
        components: torch.Tensor | None = None,
    ) -> np.ndarray:
        """Fisher vectors of images given their ROIs.

        Parameters
        ----------
        images : sequence of array_like of shape (height, width)
            Plain or cipher images (any real dtype).
        rois : sequence of array_like of bool, shape (height, width)
            Their dilated tumour masks (`pecore.pipeline.dilated_rois`), or their tumour masks
            when `radius` > 0.
        radius : int, default=0
            Dilate `rois` by this radius first; 0 takes them as they are. On CUDA the device
            does it (`dilate_masks`); on the CPU `pecore.roi.dilate_mask` (the same pixels; its
            distance transform on the mask's bounding box is some 30 times faster there).
        components : torch.Tensor, optional
            W on the device (`transform`): return the projections instead.

        Returns
        -------
        ndarray of float32, shape (n_images, n_features)
            One improved Fisher vector (R blocks) per image, as `FisherVectorEncoder.encode`
            (with `components`: their float64 projections, shape (n_images, m)).

        Raises
        ------
        ValueError
            If images and ROIs differ in number or shape, or an image is not 2-D.
        """
        if len(images) != len(rois):
            raise ValueError(f"{len(images)} images but {len(rois)} ROIs")
        if radius and not self.device.startswith("cuda"):
            rois, radius = [dilate_mask(np.asarray(r, dtype=bool), radius) for r in rois], 0
        out = (
            np.zeros((len(images), self.n_features), dtype=np.float32)
            if components is None
            else np.zeros((len(images), components.shape[1]), dtype=np.float64)
        )
        for image, roi in zip(images, rois, strict=True):
            shape = np.shape(image)
            if len(shape) != 2:
                raise ValueError(f"image must be 2-D, got shape {shape}")
            if np.shape(roi) != shape:
                raise ValueError(f"mask shape {np.shape(roi)} does not match image shape {shape}")
        for start in range(0, len(images), self.batch_size):
            batch = range(start, min(start + self.batch_size, len(images)))
            out[start : batch.stop] = self._batch(
                [images[i] for i in batch], [rois[i] for i in batch], radius, components
            )
        return out

    def transform(
        self,
        images: Sequence[np.ndarray],
        rois: Sequence[np.ndarray],
        components: np.ndarray,
        *,
        radius: int = 0,
    ) -> np.ndarray:
        """``project(fisher_vectors(images, rois), components)`` without taking the Fisher
        vectors off the device.

        The same float32 Fisher vectors meet the same float64 product as in `project`; only
        the (n_images, m) projections travel back, not F = 2·K·d·R floats per image (332 KB at
        D = 64), which cost more than the features themselves on a fast device.

        Parameters
        ----------
        images, rois, radius
            As in `fisher_vectors`.
        components : array_like of shape (F, m)
            The first m columns of the learned metric's W.

        Returns
        -------
        ndarray of float64, shape (n_images, m)
            The projections.
        """
        w = self._components(components)
        return self.fisher_vectors(images, rois, radius=radius, components=w)

    def _components(self, components: np.ndarray) -> torch.Tensor:
        """W on the device in float64, kept while the caller passes the same memory (uploading
        an F×m float64 matrix per batch would cost 42 MB at D = 64). The key is the array's
        address, shape and strides, so a fresh view of the same columns hits; the cache holds
        the array, so its memory cannot be reused by another while cached."""
        torch = _torch()
        components = np.asarray(components)
        key = (components.__array_interface__["data"][0], components.shape, components.strides)
        cached = self._w_cache
        if cached is None or cached[0] != key:
            tensor = torch.as_tensor(np.asarray(components, dtype=np.float64), device=self.device)
            cached = self._w_cache = (key, components, tensor)
        return cached[2]

    def _batch(
        self,
        images: list[np.ndarray],
        rois: list[np.ndarray],
        radius: int,
        components: torch.Tensor | None = None,
    ) -> np.ndarray:
        torch = _torch()
        # named stages, for `pecbir bench-index --stages` (torch.profiler); no cost otherwise
        stage = torch.profiler.record_function
        n_images = len(images)
        with stage("pecbir.upload"):
            crops = _RoiCrops(images, rois, margin=radius + self.patch_size // 2)
            x = self._upload(torch, crops.pixels).to(torch.float32)
            roi = self._upload(torch, crops.masks)
            sides = torch.as_tensor(crops.sides, device=self.device)  # (B, 2): crop h, w
        if radius:
            with stage("pecbir.dilate"):
                roi = dilate_masks(roi, radius)
                # the disk stops at the slice's border, not at the batch's padding beyond it
                _, height, width = roi.shape
                inside_rows = torch.arange(height, device=self.device)[None, :] < sides[:, :1]
                inside_cols = torch.arange(width, device=self.device)[None, :] < sides[:, 1:]
                roi &= inside_rows[:, :, None] & inside_cols[:, None, :]
        _, height, width = x.shape
        with stage("pecbir.roi_pixels"):
            # per-image min–max normalisation of the whole slice, as `minmax_normalise`
            # (float32, one division), from the extremes the host took before cropping
            lo = torch.as_tensor(crops.low, device=self.device)[:, None, None]
            span = torch.as_tensor(crops.high, device=self.device)[:, None, None] - lo
            x = (x - lo) / torch.where(span > 0, span, 1.0)  # ÷1 is exact: constant image → 0
            # ROI pixels in raster order, image by image
            which, rows, cols = torch.nonzero(roi, as_tuple=True)
            counts = roi.sum(dim=(1, 2))
            values = x[which, rows, cols]
        with stage("pecbir.subregions"):
            regions = self._regions(torch, values, which, counts)
            segment = which * self.n_regions + regions
            segment, order = torch.sort(segment, stable=True)
            which, rows, cols = which[order], rows[order], cols[order]
            runs = _Runs(torch, segment, n_images * self.n_regions)
        if runs.n_runs == 0:  # no ROI pixel in the whole batch: every block is zero
            width = self.n_features if components is None else components.shape[1]
            return np.zeros(
                (n_images, width), dtype=np.float32 if components is None else np.float64
            )
        with stage("pecbir.patches_pca"):
            # in the runs' layout from here on: padding slots repeat patch 0, posterior 0
            source = runs.source
            patches = self._patches(torch, x, which[source], rows[source], cols[source], sides)
            y = patches @ self._projection
            y -= self._offset
            moments = torch.cat([y, y * y], dim=1)
            del patches, y
        with stage("pecbir.posteriors"):
            log_lik = moments @ self._coef
            log_lik += self._bias
            posteriors = torch.softmax(log_lik, dim=1)
            posteriors = torch.where(
                (posteriors >= _POSTERIOR_EPS) & runs.filled[:, None], posteriors, 0.0
            )
            del log_lik
        with stage("pecbir.fisher"):
            blocks = self._encode(torch, posteriors, moments, runs)
        blocks = blocks.reshape(n_images, self.n_features)
        if components is not None:
            with stage("pecbir.project"):
                blocks = blocks.to(torch.float64) @ components
        with stage("pecbir.download"):
            return blocks.cpu().numpy()

    def _upload(self, torch: Any, array: np.ndarray) -> torch.Tensor:
        """The array on the device; to CUDA through page-locked memory (torch caches those
        blocks), since a pageable copy ran at about 1.7 GB/s and was the largest device stage
        on full 512² slices (`bench-index --stages`)."""
        tensor = torch.from_numpy(array)
        if self.device.startswith("cuda"):
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def _regions(
        self, torch: Any, values: torch.Tensor, which: torch.Tensor, counts: torch.Tensor
    ) -> torch.Tensor:
        """`pecore.roi.intensity_regions` of each image's ROI values, all images at once."""
        r = self.n_regions
        if r == 1:
            return torch.zeros_like(which)
        n_images = counts.shape[0]
        longest = max(int(counts.max()), 1)
        starts = torch.cumsum(counts, 0) - counts
        position = torch.arange(values.shape[0], device=values.device) - starts[which]
        padded = torch.full(
            (n_images, longest), math.inf, dtype=torch.float64, device=values.device
        )
        padded[which, position] = values.to(torch.float64)
        sorted_values = torch.sort(padded, dim=1).values
        cuts = _hazen_cuts(torch, sorted_values, counts.clamp(min=1), r)
        return torch.searchsorted(cuts.contiguous(), padded.contiguous(), right=True)[
            which, position
        ]

    def _patches(
        self,
        torch: Any,
        x: torch.Tensor,
        which: torch.Tensor,
        rows: torch.Tensor,
        cols: torch.Tensor,
        sides: torch.Tensor,
    ) -> torch.Tensor:
        """The P×P patches at (rows, cols) of the crops, reflect-padded where they leave their
        slice: a crop ends short of the slice's border only `margin` pixels past the ROI, so a
        patch leaves its crop only where the crop ends at the slice's border."""
        half = self.patch_size // 2
        _, height, width = x.shape
        heights, widths = sides[which, 0], sides[which, 1]
        inside = (
            bool(
                (rows >= half).all()
                & (cols >= half).all()
                & (rows < heights - half).all()
                & (cols < widths - half).all()
            )
            if rows.numel()
            else True
        )
        if inside:  # the usual case: the P×P windows as a view, indexed by their corner
            windows = x.unfold(1, self.patch_size, 1).unfold(2, self.patch_size, 1)
            return windows[which, rows - half, cols - half].reshape(rows.shape[0], -1)
        r = rows[:, None] + self._dr
        c = cols[:, None] + self._dc
        h, w = heights[:, None], widths[:, None]
        # numpy's "reflect" (edge not repeated); one reflection suffices for P/2 < side
        r = torch.where(r < 0, -r, torch.where(r >= h, 2 * (h - 1) - r, r))
        c = torch.where(c < 0, -c, torch.where(c >= w, 2 * (w - 1) - c, c))
        return x.reshape(-1)[(which[:, None] * height + r) * width + c]

    def _encode(
        self, torch: Any, posteriors: torch.Tensor, moments: torch.Tensor, runs: _Runs
    ) -> torch.Tensor:
        """Improved Fisher vector blocks of every (image, subregion) segment, (S, 2·K·d), from
        the runs' posteriors and moments (a padding slot's posterior is 0)."""
        k, d = self.n_components, self.n_dims
        n_segments = runs.sizes.shape[0]
        dev = moments.device
        g = posteriors.view(runs.n_runs, _RUN, k)
        m = moments.view(runs.n_runs, _RUN, 2 * d)
        mass = torch.zeros((n_segments, k), dtype=torch.float64, device=dev)
        mass.index_add_(0, runs.segment, g.sum(dim=1, dtype=torch.float64))
        mass = mass[:, :, None]  # (S, K, 1)
        partial = torch.bmm(g.transpose(1, 2), m)  # (runs, K, 2d)
        sums = torch.zeros((n_segments, k, 2 * d), dtype=torch.float64, device=dev)
        sums.index_add_(0, runs.segment, partial.to(torch.float64))  # (S, K, 2d)
        del partial
        s1, s2 = sums[:, :, :d], sums[:, :, d:]
        t = runs.sizes.to(torch.float64)[:, None, None]
        mu, var = self._mu, self._var
        u = (s1 - mu * mass) / (self._sigma * (t * self._sqrt_w))
        v = ((s2 - 2.0 * mu * s1 + mu**2 * mass) / var - mass) / (t * math.sqrt(2.0) * self._sqrt_w)
        block = torch.cat(
            [
                torch.where(self._active, u, 0.0).reshape(n_segments, k * d),
                torch.where(self._active, v, 0.0).reshape(n_segments, k * d),
            ],
            dim=1,
        )
        block = torch.sign(block) * torch.sqrt(torch.abs(block))
        norms = torch.linalg.vector_norm(block, dim=1, keepdim=True).clamp(min=1e-12)
        block = block / norms
        block = torch.where(runs.sizes[:, None] > 0, block, 0.0)  # an empty subregion: zeros
        return block.to(torch.float32)

    # -- projection --------------------------------------------------------------------------
    def project(self, fisher_vectors: np.ndarray, components: np.ndarray) -> np.ndarray:
        """``fisher_vectors @ components`` in float64 on the device (`CFML.transform`).

        Parameters
        ----------
        fisher_vectors : array_like of shape (n_images, F)
            Fisher vectors.
        components : array_like of shape (F, m)
            The first m columns of the learned metric's W.

        Returns
        -------
        ndarray of float64, shape (n_images, m)
            The projections.
        """
        torch = _torch()
        w = self._components(components)
        fisher_vectors = np.asarray(fisher_vectors)
        out = np.empty((fisher_vectors.shape[0], w.shape[1]), dtype=np.float64)
        step = 4096
        for start in range(0, fisher_vectors.shape[0], step):
            block = torch.as_tensor(fisher_vectors[start : start + step], device=self.device)
            out[start : start + step] = (block.to(torch.float64) @ w).cpu().numpy()
        return out


class _Runs:
    """Each (image, subregion) segment's patches as runs of `_RUN` slots, the last one padded:
    the layout in which patches, PCA and posteriors are computed, so that all posterior-weighted
    sums are one batched product over the runs with no copy into it.

    Parameters
    ----------
    segment : torch.Tensor of int64, shape (n_patches,)
        Each patch's segment, sorted (a segment's patches are contiguous).
    n_segments : int
        Number of segments S.

    Attributes
    ----------
    sizes : torch.Tensor of int64, shape (S,)
        Patches per segment.
    n_runs : int
        Number of runs.
    segment : torch.Tensor of int64, shape (n_runs,)
        Each run's segment.
    source : torch.Tensor of int64, shape (n_runs · _RUN,)
        The patch in each slot; 0 in a padding slot.
    filled : torch.Tensor of bool, shape (n_runs · _RUN,)
        False in a padding slot.
    """

    def __init__(self, torch: Any, segment: torch.Tensor, n_segments: int) -> None:
        dev = segment.device
        self.sizes = torch.bincount(segment, minlength=n_segments)
        runs = (self.sizes + (_RUN - 1)) // _RUN
        self.n_runs = int(runs.sum())
        first_run = torch.cumsum(runs, 0) - runs
        starts = torch.cumsum(self.sizes, 0) - self.sizes
        patch = torch.arange(segment.shape[0], device=dev)
        slot = first_run[segment] * _RUN + (patch - starts[segment])
        self.source = torch.zeros(self.n_runs * _RUN, dtype=torch.int64, device=dev)
        self.source[slot] = patch
        self.filled = torch.zeros(self.n_runs * _RUN, dtype=torch.bool, device=dev)
        self.filled[slot] = True
        self.segment = torch.repeat_interleave(
            torch.arange(n_segments, device=dev), runs, output_size=self.n_runs
        )


class _RoiCrops:
    """A batch cut down to what the features read: each slice's ROI bounding box plus
    `margin` (the dilation radius still to apply and the patch half-width), clipped to the
    slice, at the top left of a canvas as large as the batch's largest box.

    The device then moves and touches a fraction of each 512² slice (about a twentieth for
    the dataset's tumours). The min–max extremes are taken here over the whole slice, so the
    normalised values are those of the uncropped slice, bit for bit.

    Attributes
    ----------
    pixels : ndarray of uint8 or float32, shape (n, H, W)
        The crops (uint8 where every slice is uint8).
    masks : ndarray of bool, shape (n, H, W)
        Their ROIs; False on the padding.
    sides : ndarray of int64, shape (n, 2)
        Each crop's height and width.
    low, high : ndarray of float32, shape (n,)
        Each whole slice's minimum and maximum.
    """

    def __init__(
        self, images: Sequence[np.ndarray], rois: Sequence[np.ndarray], *, margin: int
    ) -> None:
        arrays = [np.asarray(image) for image in images]
        if any(a.dtype != np.uint8 for a in arrays):  # exact either way: uint8 → float32
            arrays = [a.astype(np.float32) for a in arrays]
        masks = [np.asarray(r, dtype=bool) for r in rois]
        boxes = [_box(mask, margin) for mask in masks]
        self.sides = np.array([(b[1] - b[0], b[3] - b[2]) for b in boxes], dtype=np.int64)
        height, width = (int(v) for v in self.sides.max(axis=0))
        n = len(arrays)
        self.pixels = np.zeros((n, height, width), dtype=arrays[0].dtype if n else np.uint8)
        self.masks = np.zeros((n, height, width), dtype=bool)
        self.low = np.empty(n, dtype=np.float32)
        self.high = np.empty(n, dtype=np.float32)
        for i, (array, mask, (r0, r1, c0, c1)) in enumerate(zip(arrays, masks, boxes, strict=True)):
            self.pixels[i, : r1 - r0, : c1 - c0] = array[r0:r1, c0:c1]
            self.masks[i, : r1 - r0, : c1 - c0] = mask[r0:r1, c0:c1]
            self.low[i], self.high[i] = array.min(), array.max()


def _box(mask: np.ndarray, margin: int) -> tuple[int, int, int, int]:
    """(r0, r1, c0, c1): the mask's bounding box grown by `margin`, clipped to the mask; a
    1×1 box at the origin for an empty mask (it yields no patch)."""
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return 0, 1, 0, 1
    cols = np.flatnonzero(mask[rows[0] : rows[-1] + 1].any(axis=0))  # only the rows it spans
    height, width = mask.shape
    return (
        max(int(rows[0]) - margin, 0),
        min(int(rows[-1]) + margin + 1, height),
        max(int(cols[0]) - margin, 0),
        min(int(cols[-1]) + margin + 1, width),
    )
