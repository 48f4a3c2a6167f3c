"""What a sealed collection's Fisher vectors leak: inversion, membership, re-identification.

In the sealed mode (issue 12, `pecore.owner_features`) the cloud holds no pixel, only each
image's Fisher vector and the published patch model.  These attacks measure what that leaks to
a cloud that also holds a *public* labelled set of plain slices and masks (patients disjoint
from the collection's), featurised with the same published model:

- `NearestTemplateAttack`: the public slice whose vector is nearest is the reconstruction
  (k = 1), or the mean of the k nearest;
- `RidgeInversionAttack`: linear (kernel) ridge from Fisher vector to ROI appearance and to
  a thumbnail of the whole slice, its penalty chosen by patient-disjoint cross-validation on
  the public set alone;
- `membership_attack`: can the cloud tell whether a patient is in the collection from a
  *different* slice of that patient (nearest-neighbour distance AUC), and does the nearest
  stored vector belong to that patient (re-identification)?

Reconstructions are scored like the image attacks (`pecore.attacks.score`: SSIM and PSNR,
data range 255, better polarity) on the ROI crop (the dilated tumour mask's bounding box,
resampled to `CROP_SIZE`²; scored there, and given its location, which the vector does not
reveal) and on the full slice.  `sealed_attack_suite` runs the whole protocol on a dataset.
Nothing here asserts a security property: every number comes from running an attack.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pecore import attacks
from pecore.roi import dilate_mask

__all__ = [
    "CROP_SIZE",
    "SUITE_VERSION",
    "THUMB_SIZE",
    "NearestTemplateAttack",
    "RidgeInversionAttack",
    "SealedAttackSplit",
    "membership_attack",
    "roi_crop",
    "score_reconstructions",
    "sealed_attack_suite",
    "slice_from_thumbnail",
    "slice_thumbnail",
]

#: Bump when anything changes `sealed_attack_suite`'s numbers (callers key caches on it).
SUITE_VERSION = 1
#: Side of the resampled ROI crop the attacks predict and are scored on.
CROP_SIZE = 64
#: Side of the whole-slice thumbnail the regressor predicts (upsampled to score).
THUMB_SIZE = 128


def _resize(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    from skimage.transform import resize

    out = resize(np.asarray(image, dtype=np.float64), shape, order=1, anti_aliasing=True)
    return out.astype(np.float32)


def roi_crop(
    image: np.ndarray, mask: np.ndarray, *, radius: int, size: int = CROP_SIZE
) -> np.ndarray:
    """The bounding box of the tumour mask dilated by `radius`, resampled to `size`².

    Parameters
    ----------
    image : array_like of shape (height, width)
        A plain slice.
    mask : array_like of shape (height, width)
        Its tumour mask.
    radius : int
        Dilation radius (the pipeline's ROI).
    size : int, default=CROP_SIZE
        Side of the output.

    Returns
    -------
    ndarray of float32, shape (size, size)
        Intensities on the image's 0..255 scale.

    Raises
    ------
    ValueError
        If the mask is empty.
    """
    roi = dilate_mask(np.asarray(mask, dtype=bool), radius)
    rows, cols = np.nonzero(roi)
    if rows.size == 0:
        raise ValueError("empty tumour mask: no ROI to crop")
    box = np.asarray(image)[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    return _resize(box, (size, size))


def slice_thumbnail(image: np.ndarray, size: int = THUMB_SIZE) -> np.ndarray:
    """The whole slice resampled to `size`² (float32, 0..255)."""
    return _resize(image, (size, size))


def slice_from_thumbnail(thumbnail: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """A thumbnail brought back to the slice's `shape` as uint8 (to score against the slice)."""
    from skimage.transform import resize

    out = resize(np.asarray(thumbnail, dtype=np.float64), shape, order=1, anti_aliasing=False)
    return _to_uint8(out)


def _to_uint8(values: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


class NearestTemplateAttack:
    """Reconstruction = the target of the nearest public vector (mean of the `n_neighbors`).

    Parameters
    ----------
    n_neighbors : int, default=1
        Public vectors averaged; 1 returns the nearest template itself.

    Attributes
    ----------
    neighbors_ : ndarray of int, shape (n_queries, n_neighbors)
        Public rows chosen for the last `predict` (nearest first).
    """

    def __init__(self, *, n_neighbors: int = 1) -> None:
        self.n_neighbors = n_neighbors

    def fit(self, fisher_vectors: np.ndarray, targets: np.ndarray) -> NearestTemplateAttack:
        """Hold the public vectors (n, F) and their targets (n, ...)."""
        if len(fisher_vectors) != len(targets):
            raise ValueError(f"{len(fisher_vectors)} vectors but {len(targets)} targets")
        if not 1 <= self.n_neighbors <= len(fisher_vectors):
            raise ValueError(f"n_neighbors={self.n_neighbors} with {len(fisher_vectors)} vectors")
        self.public_ = np.asarray(fisher_vectors, dtype=np.float32)
        self.targets_ = np.asarray(targets)
        return self

    def predict(self, fisher_vectors: np.ndarray) -> np.ndarray:
        """The reconstruction of every query vector (float32, the targets' shape)."""
        distances = _squared_distances(np.asarray(fisher_vectors, dtype=np.float32), self.public_)
        order = np.argsort(distances, axis=1, kind="stable")[:, : self.n_neighbors]
        self.neighbors_ = order
        return self.targets_[order].astype(np.float32).mean(axis=1)


class RidgeInversionAttack:
    """Linear ridge from Fisher vector to a flattened target, in the dual (n ≪ F).

    The penalty is chosen from `alphas` by grouped cross-validation on the training set only
    (groups = public folds or patients), then the model is refitted on all of it.

    Parameters
    ----------
    alphas : sequence of float, default 10**k for k in -3..3
        Candidate penalties, relative to the mean diagonal of the Gram matrix.

    Attributes
    ----------
    alpha_ : float
        The chosen (relative) penalty.
    cv_mse_ : dict of float to float
        Cross-validated mean squared error of each candidate.
    """

    def __init__(self, *, alphas: Sequence[float] = tuple(10.0**k for k in range(-3, 4))) -> None:
        self.alphas = alphas

    def fit(
        self, fisher_vectors: np.ndarray, targets: np.ndarray, groups: np.ndarray
    ) -> RidgeInversionAttack:
        """Choose the penalty by leave-one-group-out CV, then fit on every row."""
        x = np.asarray(fisher_vectors, dtype=np.float64)
        y = np.asarray(targets, dtype=np.float64).reshape(len(x), -1)
        groups = np.asarray(groups)
        if len(np.unique(groups)) < 2:
            raise ValueError("need at least two groups to choose the penalty")
        self.cv_mse_ = {}
        for alpha in self.alphas:
            errors = []
            for group in np.unique(groups):
                held = groups == group
                model = _DualRidge(float(alpha)).fit(x[~held], y[~held])
                errors.append(np.mean((model.predict(x[held]) - y[held]) ** 2) * held.sum())
            self.cv_mse_[float(alpha)] = float(np.sum(errors) / len(x))
        self.alpha_ = min(self.cv_mse_, key=self.cv_mse_.get)
        self.model_ = _DualRidge(self.alpha_).fit(x, y)
        self.target_shape_ = np.asarray(targets).shape[1:]
        return self

    def predict(self, fisher_vectors: np.ndarray) -> np.ndarray:
        """The predicted targets (float32, the targets' shape)."""
        out = self.model_.predict(np.asarray(fisher_vectors, dtype=np.float64))
        return out.reshape(len(out), *self.target_shape_).astype(np.float32)


class _DualRidge:
    """Ridge with intercept solved through the n×n Gram matrix (penalty relative to its trace)."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha

    def fit(self, x: np.ndarray, y: np.ndarray) -> _DualRidge:
        self.x_mean_ = x.mean(axis=0)
        self.y_mean_ = y.mean(axis=0)
        self.xc_ = x - self.x_mean_
        gram = self.xc_ @ self.xc_.T
        scale = float(np.mean(np.diag(gram))) or 1.0
        gram[np.diag_indices_from(gram)] += self.alpha * scale
        self.dual_ = np.linalg.solve(gram, y - self.y_mean_)
        return self

    def predict(self, x: np.ndarray) -> np.ndarray:
        return (x - self.x_mean_) @ self.xc_.T @ self.dual_ + self.y_mean_


def _squared_distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(len(a), len(b)) squared Euclidean distances, float64, clipped at 0."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    out = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
    return np.maximum(out, 0.0)


def _summary(values: Sequence[float]) -> dict[str, float | int]:
    values = np.asarray(values, dtype=np.float64)
    return {
        "median": float(np.median(values)),
        "mean": float(values.mean()),
        "worst": float(values.max()),  # worst for the owner: the best reconstruction
        "min": float(values.min()),
        "n": int(values.size),
    }


def score_reconstructions(
    true_crops: np.ndarray,
    predicted_crops: np.ndarray,
    true_slices: np.ndarray,
    predicted_slices: np.ndarray,
) -> dict[str, dict[str, dict[str, float | int]]]:
    """SSIM/PSNR (`pecore.attacks.score`) of ROI crops and full slices: median, mean, worst.

    "worst" is worst for the owner: the highest score over the victims.

    Parameters
    ----------
    true_crops, predicted_crops : numpy.ndarray
        (n, CROP_SIZE, CROP_SIZE), 0..255 (rounded to uint8 to score).
    true_slices, predicted_slices : numpy.ndarray
        (n, H, W) uint8 slices and their reconstructions.

    Returns
    -------
    dict
        {"roi": {"ssim": ..., "psnr": ...}, "slice": {...}}, each a summary over victims.
    """
    out: dict[str, dict[str, dict[str, float | int]]] = {}
    for name, truth, guess in (
        ("roi", true_crops, predicted_crops),
        ("slice", true_slices, predicted_slices),
    ):
        rows = [
            attacks.score(_to_uint8(t), _to_uint8(g)) for t, g in zip(truth, guess, strict=True)
        ]
        out[name] = {
            "ssim": _summary([float(r["ssim"]) for r in rows]),
            "psnr": _summary([float(r["psnr"]) for r in rows]),
        }
    return out


def membership_attack(
    collection: np.ndarray,
    collection_patients: np.ndarray,
    member_probes: np.ndarray,
    member_probe_patients: np.ndarray,
    outsider_probes: np.ndarray,
) -> dict[str, float]:
    """Patient membership and re-identification from the nearest stored vector.

    Every probe is a slice the collection does not hold; member probes come from patients
    with other slices in the collection, outsider probes from patients without any.

    Parameters
    ----------
    collection : numpy.ndarray
        (n, F) vectors the cloud holds.
    collection_patients : numpy.ndarray
        Their patients.
    member_probes, outsider_probes : numpy.ndarray
        (m, F) and (o, F) vectors of the probe slices.
    member_probe_patients : numpy.ndarray
        The member probes' patients.

    Returns
    -------
    dict
        ``auc``: ROC AUC of "member" scored by minus the nearest distance (0.5 = chance);
        ``tpr_at_1pct_fpr``; ``reidentification_top1``: fraction of member probes whose
        nearest stored vector is their own patient's; ``chance_top1``: that rate for a
        guess proportional to the patients' slice counts.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    members = _squared_distances(member_probes, collection)
    outsiders = _squared_distances(outsider_probes, collection)
    scores = -np.sqrt(np.concatenate([members.min(1), outsiders.min(1)]))
    truth = np.r_[np.ones(len(members)), np.zeros(len(outsiders))]
    fpr, tpr, _ = roc_curve(truth, scores)
    nearest = np.asarray(collection_patients)[members.argmin(1)]
    _, counts = np.unique(collection_patients, return_counts=True)
    return {
        "auc": float(roc_auc_score(truth, scores)),
        "tpr_at_1pct_fpr": float(np.max(tpr[fpr <= 0.01], initial=0.0)),
        "reidentification_top1": float(np.mean(nearest == np.asarray(member_probe_patients))),
        "chance_top1": float(np.sum((counts / counts.sum()) ** 2)),
        "n_member_probes": len(members),
        "n_outsider_probes": len(outsiders),
    }


@dataclass(frozen=True)
class SealedAttackSplit:
    """Who holds what, by the dataset's patient-disjoint folds.

    Attributes
    ----------
    collection_folds : tuple of int
        Patients of the sealed collection; a seeded `probe_fraction` of each one's slices is
        held back as member probes (the rest is stored; the patch model is fitted on it).
    public_folds : tuple of int
        The attacker's labelled plain slices and masks (inversion training, templates).
    outsider_folds : tuple of int
        Patients in neither: the membership attack's non-member probes.
    probe_fraction : float
        Share of each collection patient's slices held back (patients with ≥ 2 slices).
    """

    collection_folds: tuple[int, ...] = (4, 5)
    public_folds: tuple[int, ...] = (1, 2)
    outsider_folds: tuple[int, ...] = (3,)
    probe_fraction: float = 0.25

    def rows(
        self, folds: np.ndarray, patients: np.ndarray, rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        """Row indices of "stored", "member_probes", "public" and "outsiders"."""
        roles = (self.collection_folds, self.public_folds, self.outsider_folds)
        if len(set().union(*roles)) != sum(len(r) for r in roles):
            raise ValueError(f"the folds of {self} overlap")
        in_collection = np.flatnonzero(np.isin(folds, self.collection_folds))
        probes = []
        for patient in np.unique(patients[in_collection]):
            own = in_collection[patients[in_collection] == patient]
            n_probe = int(np.floor(self.probe_fraction * own.size))
            if own.size >= 2 and n_probe >= 1:
                probes.extend(rng.choice(own, size=n_probe, replace=False).tolist())
        probes = np.sort(np.asarray(probes, dtype=np.int64))
        return {
            "stored": np.setdiff1d(in_collection, probes),
            "member_probes": probes,
            "public": np.flatnonzero(np.isin(folds, self.public_folds)),
            "outsiders": np.flatnonzero(np.isin(folds, self.outsider_folds)),
        }


def sealed_attack_suite(
    images: np.ndarray,
    masks: np.ndarray,
    patients: np.ndarray,
    folds: np.ndarray,
    *,
    split: SealedAttackSplit = SealedAttackSplit(),
    dictionary_size: int = 64,
    n_victims: int = 64,
    n_regions: int = 8,
    patch_size: int = 9,
    radius: int = 24,
    pca_energy: float = 0.99,
    n_train_patches: int = 300_000,
    n_neighbors: int = 10,
    seed: int = 0,
    n_jobs: int | None = None,
    progress: Callable[[str, int], object] | None = None,
) -> tuple[dict[str, object], dict[str, np.ndarray]]:
    """Fit the published model on the stored slices, featurise everyone, run every attack.

    Parameters
    ----------
    images : numpy.ndarray
        (N, H, W) uint8 plain slices.
    masks : numpy.ndarray
        (N, H, W) tumour masks.
    patients : numpy.ndarray
        Patient of every slice.
    folds : numpy.ndarray
        Patient-disjoint fold of every slice (`split` gives each fold a role).
    split : SealedAttackSplit
        The roles of the folds.
    dictionary_size : int, default=64
        The collection's GMM size D.
    n_victims : int, default=64
        Stored slices reconstructed and scored (a seeded sample).
    n_regions, patch_size, radius, pca_energy, n_train_patches : int or float
        The pipeline's parameters (method spec defaults).
    n_neighbors : int, default=10
        k of the k-nearest-templates mean.
    seed : int, default=0
        Seed of the probe hold-back, the victims' sample and the patch model.
    n_jobs : int, optional
        Encoding threads.
    progress : callable, optional
        Called with (stage name, images done since the last call).

    Returns
    -------
    tuple of (dict, dict)
        The scores (per attack: "roi"/"slice" SSIM/PSNR summaries; "membership"; the split's
        sizes and settings), and example arrays (the first victim's slice, crop and each
        attack's reconstructions) for figures.
    """
    from pecore.owner_features import owner_fisher_vectors
    from pecore.pipeline import dilated_rois, fit_patch_model

    patients = np.asarray(patients)
    rng = np.random.default_rng(seed)
    rows = split.rows(np.asarray(folds), patients, rng)
    stored, public = rows["stored"], rows["public"]
    victims = np.sort(rng.choice(stored, size=min(n_victims, stored.size), replace=False))
    needed = np.unique(np.concatenate(list(rows.values())))
    rois = dict(zip(needed.tolist(), dilated_rois([masks[i] for i in needed], radius), strict=True))

    def note(stage: str) -> Callable[[int], object] | None:
        return None if progress is None else (lambda n: progress(stage, n))

    # The owner publishes the patch model it fitted on its own stored (plain) slices.
    model = fit_patch_model(
        [images[i] for i in stored],
        [masks[i] for i in stored],
        [dictionary_size],
        patch_size=patch_size,
        radius=radius,
        pca_energy=pca_energy,
        n_train_patches=n_train_patches,
        random_state=seed,
        rois=[rois[i] for i in stored],
    )
    (vectors,) = owner_fisher_vectors(
        [images[i] for i in needed],
        [masks[i] for i in needed],
        model,
        n_regions=n_regions,
        patch_size=patch_size,
        rois=[rois[i] for i in needed],
        n_jobs=n_jobs,
        progress=note("Fisher vectors"),
    )
    where = {int(i): k for k, i in enumerate(needed)}

    def fv(indices: np.ndarray) -> np.ndarray:
        return vectors[[where[int(i)] for i in indices]]

    def crops(indices: np.ndarray) -> np.ndarray:
        return np.stack([roi_crop(images[i], masks[i], radius=radius) for i in indices])

    public_crops = crops(public)
    public_thumbs = np.stack([slice_thumbnail(images[i]) for i in public])
    victim_crops = crops(victims)
    victim_slices = images[victims]
    shape = victim_slices.shape[1:]

    def as_slices(thumbs: np.ndarray) -> np.ndarray:
        return np.stack([slice_from_thumbnail(t, shape) for t in thumbs])

    results: dict[str, object] = {}
    examples: dict[str, np.ndarray] = {"plain": victim_slices[0], "roi": victim_crops[0]}
    # no features at all: the public mean (what any attacker has without the vectors)
    mean_crop = np.repeat(public_crops.mean(0, keepdims=True), len(victims), axis=0)
    mean_slice = as_slices(np.repeat(public_thumbs.mean(0, keepdims=True), len(victims), axis=0))
    results["public mean (no features; reference)"] = score_reconstructions(
        victim_crops, mean_crop, victim_slices, mean_slice
    )
    examples["public mean (no features; reference)"] = mean_slice[0]
    for k in sorted({1, n_neighbors}):
        name = "nearest template" if k == 1 else f"mean of {k} nearest templates"
        attack = NearestTemplateAttack(n_neighbors=k).fit(fv(public), public_crops)
        predicted_crops = attack.predict(fv(victims))
        nearest = public[attack.neighbors_]
        if k == 1:  # the template's own slice, at full resolution
            predicted_slices = images[nearest[:, 0]]
        else:
            predicted_slices = _to_uint8(
                np.stack([images[n].astype(np.float32).mean(0) for n in nearest])
            )
        results[name] = score_reconstructions(
            victim_crops, predicted_crops, victim_slices, predicted_slices
        )
        examples[name] = predicted_slices[0]
    groups = np.asarray(folds)[public]
    targets = np.concatenate(
        [public_crops.reshape(len(public), -1), public_thumbs.reshape(len(public), -1)], axis=1
    )
    ridge = RidgeInversionAttack().fit(fv(public), targets, groups)
    predicted = ridge.predict(fv(victims))
    n_crop = CROP_SIZE * CROP_SIZE
    predicted_crops = predicted[:, :n_crop].reshape(-1, CROP_SIZE, CROP_SIZE)
    predicted_slices = as_slices(predicted[:, n_crop:].reshape(-1, THUMB_SIZE, THUMB_SIZE))
    results["ridge regression (FV → ROI crop, thumbnail)"] = {
        **score_reconstructions(victim_crops, predicted_crops, victim_slices, predicted_slices),
        "alpha": ridge.alpha_,
        "cv_mse": {str(a): v for a, v in ridge.cv_mse_.items()},
    }
    examples["ridge regression (FV → ROI crop, thumbnail)"] = predicted_slices[0]
    examples["ridge ROI crop"] = _to_uint8(predicted_crops[0])
    membership = membership_attack(
        fv(stored),
        patients[stored],
        fv(rows["member_probes"]),
        patients[rows["member_probes"]],
        fv(rows["outsiders"]),
    )
    # the same slice featurised twice gives the same vector (deterministic features)
    again = owner_fisher_vectors(
        [images[i] for i in victims[:4]],
        [masks[i] for i in victims[:4]],
        model,
        n_regions=n_regions,
        patch_size=patch_size,
        radius=radius,
    )[0]
    membership["exact_copy_distance"] = float(np.abs(again - fv(victims[:4])).max())
    document = {
        "attacks": results,
        "membership": membership,
        "setting": {
            "dictionary_size": dictionary_size,
            "fv_dim": int(vectors.shape[1]),
            "pca_dim": int(model.pca.n_components_),
            "collection_folds": list(split.collection_folds),
            "public_folds": list(split.public_folds),
            "outsider_folds": list(split.outsider_folds),
            "probe_fraction": split.probe_fraction,
            "n_stored": int(stored.size),
            "n_public": int(public.size),
            "n_member_probes": int(rows["member_probes"].size),
            "n_outsiders": int(rows["outsiders"].size),
            "n_victims": int(victims.size),
            "victims": victims.tolist(),
            "crop_size": CROP_SIZE,
            "thumbnail_size": THUMB_SIZE,
            "seed": seed,
        },
    }
    return document, examples
