"""The retrieval experiment of Ahmad et al. 2025, Tables 1–2 (method spec §0.1, §6, §7.2).

For every condition (non-secure, or scheme [25]/[26]/[27]/ours under the same key or one key per
image), every query fold and every dictionary size D: learn PCA + GMM(D) + CFML on the database
folds of the (cipher) images, rank the database for each query, score mAP / P@5 / P@10 for
CFML output dimensions 1..10. Work shared across D (cipher images, patches, PCA, one pass over
the images per fold) is done once; cipher images and finished (condition, fold, D) results are
cached under `cache/` so that a rerun or an extended run only computes what is missing.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import platform
import resource
import time
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

#: Bump when anything changes the numbers, so that cached fold results are not reused.
ALGORITHM_VERSION = 3

SCHEMES = ("25", "26", "27", "ours")
#: Tag of the mask handling of "<inner>-bs<b>" conditions (part of their unit cache key only).
VARIANT_MASKS = "scramble_mask(mask, stream, scheme, nonce=str(index)), pecbir/block-scramble/v1"
KEY_MODES = ("same", "different")
DICTIONARY_SIZES = (16, 32, 64)
DIMS = tuple(range(1, 11))
HEADLINE_DIM = 10
METRICS = ("mAP", "P@5", "P@10")

#: Ahmad et al. 2025, Table 1 (mean ± std % over 5 folds), for side-by-side comparison only.
PAPER_TABLE1: dict[tuple[int, str], tuple[float, float, float]] = {
    (16, "non-secure"): (89.89, 87.16, 87.16),
    (16, "25/same"): (81.82, 80.26, 80.39),
    (16, "26/same"): (86.66, 83.79, 83.95),
    (16, "27/same"): (81.65, 77.51, 77.50),
    (16, "ours/same"): (87.06, 83.89, 83.84),
    (16, "25/different"): (74.57, 72.57, 72.79),
    (16, "26/different"): (80.17, 75.98, 75.96),
    (16, "27/different"): (77.96, 72.61, 72.64),
    (16, "ours/different"): (83.52, 80.05, 80.19),
    (32, "non-secure"): (92.49, 90.14, 90.10),
    (32, "25/same"): (84.86, 82.37, 82.40),
    (32, "26/same"): (88.84, 85.99, 85.88),
    (32, "27/same"): (86.00, 81.47, 81.51),
    (32, "ours/same"): (89.44, 86.40, 86.43),
    (32, "25/different"): (77.55, 74.16, 74.06),
    (32, "26/different"): (83.42, 78.38, 78.47),
    (32, "27/different"): (80.38, 74.25, 74.30),
    (32, "ours/different"): (86.32, 82.15, 82.22),
    (64, "non-secure"): (94.02, 91.75, 91.80),
    (64, "25/same"): (86.51, 83.44, 83.32),
    (64, "26/same"): (90.72, 87.93, 87.97),
    (64, "27/same"): (88.80, 85.03, 85.05),
    (64, "ours/same"): (91.41, 88.38, 88.44),
    (64, "25/different"): (79.71, 74.69, 74.63),
    (64, "26/different"): (85.48, 81.21, 81.15),
    (64, "27/different"): (84.26, 79.09, 79.11),
    (64, "ours/different"): (88.56, 85.22, 85.17),
}

#: Ahmad et al. 2025, Table 2 (D = 64 block), per class: (mAP, P@5, P@10).
PAPER_TABLE2: dict[tuple[str, int], tuple[float, float, float]] = {
    ("non-secure", 1): (88.06, 86.05, 86.05),
    ("non-secure", 2): (97.14, 94.91, 95.01),
    ("non-secure", 3): (93.75, 91.24, 91.25),
    ("26/same", 1): (82.29, 80.55, 80.61),
    ("26/same", 2): (95.48, 91.60, 91.71),
    ("26/same", 3): (90.21, 88.30, 88.24),
    ("26/different", 1): (75.89, 72.89, 72.98),
    ("26/different", 2): (92.34, 86.77, 86.92),
    ("26/different", 3): (82.72, 79.47, 79.02),
    ("ours/same", 1): (83.53, 81.91, 81.60),
    ("ours/same", 2): (95.39, 91.59, 91.85),
    ("ours/same", 3): (91.74, 85.22, 89.01),
    ("ours/different", 1): (80.22, 77.90, 77.71),
    ("ours/different", 2): (94.49, 90.65, 90.79),
    ("ours/different", 3): (86.51, 83.38, 83.14),
}


@dataclass(frozen=True)
class Condition:
    """`scheme` None = non-secure (plain uint8 images)."""

    scheme: str | None
    key_mode: str | None = None

    @property
    def is_variant(self) -> bool:
        """A tile-scrambled scheme of `pecore.cipher_variants` ("<inner>-bs<b>")."""
        return is_variant_scheme(self.scheme)

    @property
    def name(self) -> str:
        return "non-secure" if self.scheme is None else f"{self.scheme}/{self.key_mode}"

    @property
    def slug(self) -> str:
        return self.name.replace("/", "-")

    @property
    def label(self) -> str:
        if self.scheme is None:
            return "Non-secure [3]"
        if self.is_variant:
            from pecore.cipher_variants import parse_variant

            inner, block = parse_variant(self.scheme)
            scheme = "Ours" if inner == "ours" else f"[{inner}]"
            scheme += f" + {block}×{block} tile scramble"
        else:
            scheme = "Ours" if self.scheme == "ours" else f"[{self.scheme}]"
        keys = "same key" if self.key_mode == "same" else "diff. keys"
        return f"{keys} {scheme}"


def is_variant_scheme(scheme: str | None) -> bool:
    """True for "<inner>-bs<b>" names that `pecore.cipher_variants.parse_variant` accepts."""
    if scheme is None or scheme in SCHEMES:
        return False
    from pecore.cipher_variants import parse_variant

    try:
        parse_variant(scheme)
    except ValueError:
        return False
    return True


def all_conditions(
    schemes: Sequence[str], key_modes: Sequence[str], plain: bool
) -> list[Condition]:
    out = [Condition(None)] if plain else []
    for mode in key_modes:
        for scheme in schemes:
            out.append(Condition(scheme, mode))
    return out


@dataclass
class ExperimentConfig:
    dictionary_sizes: tuple[int, ...] = DICTIONARY_SIZES
    conditions: tuple[Condition, ...] = ()
    folds: tuple[int, ...] = (1, 2, 3, 4, 5)
    fold_file: str | None = None
    n_regions: int = 8
    patch_size: int = 9
    radius: int = 24
    pca_energy: float = 0.99
    n_train_patches: int = 300_000
    metric_lambda: float = 1.5e-4
    seed: int = 0
    key_seed: int = 2025
    #: Variant conditions only: "cloud" = the cloud dilates the scrambled tumour mask by `radius`;
    #: "owner" = the owner scrambles the already dilated ROI and the cloud uses it as it is.
    variant_roi: str = "cloud"
    n_jobs: int = 2
    data_path: str | None = None
    cache_dir: str = "cache"
    out_dir: str = "results/experiment"
    extra: dict[str, object] = field(default_factory=dict)

    def model_params(self) -> dict[str, object]:
        return {
            "n_regions": self.n_regions,
            "patch_size": self.patch_size,
            "radius": self.radius,
            "pca_energy": self.pca_energy,
            "n_train_patches": self.n_train_patches,
            "metric_lambda": self.metric_lambda,
            "seed": self.seed,
            "key_seed": self.key_seed,
            "algorithm_version": ALGORITHM_VERSION,
        }


# ------------------------------------------------------------------------------ inputs
def read_fold_file(path: str | Path, index: np.ndarray) -> np.ndarray:
    """Folds from a CSV with columns `index,fold` (index = figshare file number, 1..3064)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"fold file not found: {path}")
    mapping: dict[int, int] = {}
    with path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is None or not {"index", "fold"} <= set(reader.fieldnames):
            raise ValueError(f"{path}: expected a header with columns 'index' and 'fold'")
        for line, row in enumerate(reader, start=2):
            try:
                mapping[int(row["index"])] = int(row["fold"])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{path}:{line}: bad row {row}") from exc
    missing = [int(i) for i in index if int(i) not in mapping]
    if missing:
        raise ValueError(f"{path}: no fold for {len(missing)} images, e.g. index {missing[:5]}")
    return np.array([mapping[int(i)] for i in index], dtype=np.int64)


def _cipher_path(cache_dir: Path, condition: Condition, key_seed: int, ids: np.ndarray) -> Path:
    seed_part = f"-k{key_seed}" if condition.key_mode == "different" else ""
    digest = hashlib.sha1(np.ascontiguousarray(ids).tobytes()).hexdigest()[:10]
    return cache_dir / "ciphers" / f"{condition.slug}{seed_part}-{digest}.npy"


def _mask_path(
    cache_dir: Path,
    condition: Condition,
    key_seed: int,
    ids: np.ndarray,
    dilate: int | None = None,
) -> Path:
    path = _cipher_path(cache_dir, condition, key_seed, ids)
    return path.with_name(path.stem + ("-masks.npy" if dilate is None else f"-roi{dilate}.npy"))


def _load_stack(path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    if not path.is_file():
        return None
    stack = np.load(path, mmap_mode="r")
    return stack if stack.shape == shape else None


def condition_masks(
    masks: np.ndarray,
    ids: np.ndarray,
    conditions: Sequence[Condition],
    key_seed: int,
    cache_dir: Path,
    dilate: int | None = None,
) -> dict[str, np.ndarray]:
    """The ROI masks each condition's features are extracted in (name -> stack).

    Plain and standard-scheme conditions use `masks` as they are; a tile-scrambled variant uses
    the masks moved with its tiles, written by `cipher_images(..., masks=masks)`.
    """
    out: dict[str, np.ndarray] = {}
    for condition in conditions:
        if not condition.is_variant:
            out[condition.name] = masks
            continue
        path = _mask_path(cache_dir, condition, key_seed, ids, dilate)
        stack = _load_stack(path, tuple(masks.shape))
        if stack is None:
            raise FileNotFoundError(
                f"no scrambled masks for {condition.name} in {cache_dir}; "
                "build them with cipher_images(..., masks=masks, dilate=dilate)"
            )
        out[condition.name] = stack
    return out


def cipher_images(
    images: np.ndarray,
    ids: np.ndarray,
    conditions: Sequence[Condition],
    key_seed: int,
    cache_dir: Path,
    masks: np.ndarray | None = None,
    dilate: int | None = None,
) -> dict[str, np.ndarray]:
    """Cipher image stacks of `conditions` (name -> stack), memory-mapped from `cache_dir`.

    A tile-scrambled variant ("<inner>-bs<b>") encrypts with `encrypt_variant` and nonce
    str(index) (the string its key is derived from), and needs `masks`: the masks moved with
    the tiles (`scramble_mask`, same stream and nonce) are cached beside the cipher stack, for
    `condition_masks`.  With `dilate`, the masks are dilated by that radius before scrambling
    (the owner ships the ROI itself).

    Missing stacks are built in one pass over the images, so that each per-image key stream is
    made once for all schemes. Same key: every image uses the paper's key θ* (SSLMKey()).
    Different keys: image i uses derive_image_key(MasterKey.from_seed(key_seed), str(index_i)),
    one validated key per image, with the stream its validation computed.
    """
    from tqdm import tqdm

    from pecore.cipher import encrypt
    from pecore.cipher_variants import encrypt_variant, scramble_mask
    from pecore.keys import (
        MasterKey,
        SSLMKey,
        derive_image_key_and_stream,
        key_stream,
    )
    from pecore.roi import dilate_mask

    stacks: dict[str, np.ndarray] = {}
    todo: dict[str, list[Condition]] = {}
    for condition in conditions:
        if condition.scheme is None:
            stacks[condition.name] = images
            continue
        path = _cipher_path(cache_dir, condition, key_seed, ids)
        stack = _load_stack(path, tuple(images.shape))
        if stack is not None and (
            not condition.is_variant
            or _load_stack(
                _mask_path(cache_dir, condition, key_seed, ids, dilate), tuple(images.shape)
            )
            is not None
        ):
            stacks[condition.name] = stack
            continue
        if condition.is_variant and masks is None:
            raise ValueError(f"{condition.name} needs the ROI masks to scramble (masks=...)")
        todo.setdefault(str(condition.key_mode), []).append(condition)
    for mode, group in todo.items():
        paths = {c.name: _cipher_path(cache_dir, c, key_seed, ids) for c in group}
        next(iter(paths.values())).parent.mkdir(parents=True, exist_ok=True)
        # Stream the stacks to disk in image order with plain writes: a writable memmap would
        # keep every written page resident (and counted in this process's peak memory).
        for condition in group:
            if condition.is_variant:
                paths[condition.name + "#masks"] = _mask_path(
                    cache_dir, condition, key_seed, ids, dilate
                )
        outs = {}
        for name, path in paths.items():
            fh = path.with_suffix(".tmp.npy").open("wb")
            descr = "|b1" if name.endswith("#masks") else "|u1"
            np.lib.format.write_array_header_1_0(
                fh, {"descr": descr, "fortran_order": False, "shape": tuple(images.shape)}
            )
            outs[name] = fh
        master = MasterKey.from_seed(key_seed) if mode == "different" else None
        same_streams: dict[int, np.ndarray] = {}
        batch = 32
        names = ", ".join(c.name for c in group)
        with (
            tqdm(total=len(images), desc=f"encrypt {names}", unit="img", leave=False) as bar,
            ThreadPoolExecutor(2) as pool,
        ):
            for start in range(0, len(images), batch):
                rows = list(range(start, min(start + batch, len(images))))
                if master is None:
                    streams = []
                    for i in rows:
                        size = images[i].size
                        if size not in same_streams:
                            same_streams[size] = key_stream(SSLMKey(), size)
                        streams.append(same_streams[size])
                else:
                    # the derivation validates each stream in numba code that releases the GIL
                    derived = pool.map(
                        derive_image_key_and_stream,
                        [master] * len(rows),
                        [str(int(ids[i])) for i in rows],
                        [images[i].size for i in rows],
                    )
                    streams = [stream for _key, stream in derived]
                for i, stream in zip(rows, streams, strict=True):
                    image = np.ascontiguousarray(images[i])
                    for condition in group:
                        if condition.is_variant:
                            nonce = str(int(ids[i]))
                            cipher = encrypt_variant(image, stream, condition.scheme, nonce=nonce)
                            roi = np.asarray(masks[i], dtype=bool)
                            if dilate is not None:
                                roi = dilate_mask(roi, dilate)
                            moved = scramble_mask(roi, stream, condition.scheme, nonce=nonce)
                            mask_bytes = np.ascontiguousarray(moved, dtype=bool).tobytes()
                            outs[condition.name + "#masks"].write(mask_bytes)
                        else:
                            cipher = encrypt(image, stream, condition.scheme)
                        outs[condition.name].write(np.ascontiguousarray(cipher).tobytes())
                bar.update(len(rows))
        for name, fh in outs.items():
            fh.close()
            paths[name].with_suffix(".tmp.npy").replace(paths[name])
            if not name.endswith("#masks"):
                stacks[name] = np.load(paths[name], mmap_mode="r")
        outs.clear()
    return stacks


# ------------------------------------------------------------------------------ one fold
def _unit_key(
    config: ExperimentConfig, condition: Condition, fold: int, size: int, folds_digest: str
) -> str:
    fields = {
        "params": config.model_params(),
        "condition": condition.name,
        "fold": fold,
        "D": size,
        "folds": folds_digest,
        "data": config.extra.get("data_id"),
    }
    if condition.is_variant:  # only here, so that the standard conditions' keys stay as they were
        fields["masks"] = VARIANT_MASKS
        if config.variant_roi != "cloud":
            fields["masks"] += f", ROI dilated by the owner (radius {config.radius})"
    payload = json.dumps(fields, sort_keys=True)
    return hashlib.sha1(payload.encode()).hexdigest()[:16]


def run_fold(
    images: np.ndarray,
    masks: np.ndarray,
    labels: np.ndarray,
    folds: np.ndarray,
    fold: int,
    sizes: Sequence[int],
    config: ExperimentConfig,
    seed_words: Sequence[int],
    rois: Sequence[np.ndarray] | None = None,
) -> dict[int, dict[str, object]]:
    """Learn on the database folds, evaluate the queries of `fold`, for every D in `sizes`.

    `rois`: the masks already dilated by `config.radius` (shared across folds and conditions).
    """
    from tqdm import tqdm

    from pecore.evaluate import retrieval_metrics
    from pecore.fisher import FisherVectorEncoder
    from pecore.metric import CFML
    from pecore.pipeline import encode_images, fit_patch_model

    train = np.flatnonzero(folds != fold)
    query = np.flatnonzero(folds == fold)
    timings: dict[str, float] = {}
    start = time.perf_counter()
    seed = int(np.random.SeedSequence(list(seed_words)).generate_state(1)[0])
    model = fit_patch_model(
        [images[i] for i in train],
        [masks[i] for i in train],
        sizes,
        patch_size=config.patch_size,
        radius=config.radius,
        pca_energy=config.pca_energy,
        n_train_patches=config.n_train_patches,
        random_state=seed,
        rois=None if rois is None else [rois[i] for i in train],
    )
    timings["pca_gmm_s"] = time.perf_counter() - start
    encoders = [FisherVectorEncoder(model.gmms[s], n_regions=config.n_regions) for s in sizes]
    start = time.perf_counter()
    with tqdm(total=len(images), desc="  Fisher vectors", unit="img", leave=False) as bar:
        fvs = encode_images(
            images,
            masks,
            model.pca,
            encoders,
            patch_size=config.patch_size,
            radius=config.radius,
            rois=rois,
            n_jobs=config.n_jobs,
            progress=bar.update,
        )
    timings["encode_s"] = time.perf_counter() - start
    out: dict[int, dict[str, object]] = {}
    for size in sizes:
        fv = fvs.pop(0)  # dropped after its metric: at D = 64 one FV matrix is 1 GB
        start = time.perf_counter()
        # fv[train] is a fresh copy already, so CFML may centre it in place
        metric = CFML(reg=config.metric_lambda, n_components=max(DIMS), copy=False).fit(
            fv[train], labels[train]
        )
        projected = metric.transform(fv)
        cfml_s = time.perf_counter() - start
        del fv
        by_dim = {}
        for dim in DIMS:
            if dim > projected.shape[1]:
                break
            scores = retrieval_metrics(
                projected[query, :dim], labels[query], projected[train, :dim], labels[train]
            )
            scores.pop("ap")
            scores["per_class"] = {str(c): v for c, v in scores["per_class"].items()}
            by_dim[str(dim)] = scores
        gmm = model.gmms[size]
        out[size] = {
            "fold": fold,
            "D": size,
            "n_query": int(query.size),
            "n_database": int(train.size),
            "pca_dim": int(model.pca.n_components_),
            "fv_dim": int(encoders[sizes.index(size)].n_features),
            "n_training_patches": model.n_training_patches,
            "gmm_iterations": int(gmm.n_iter_),
            "gmm_converged": bool(gmm.converged_),
            "gmm_restarts": int(gmm.n_restarts_),
            "cfml_rank": int(metric.rank_),
            "cfml_eigenvalues": metric.eigenvalues_.tolist(),
            "seed": seed,
            "timings_s": {**timings, "cfml_s": cfml_s},
            "by_dim": by_dim,
        }
    return out


# ------------------------------------------------------------------------------ the run
def peak_memory_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def run_experiment(config: ExperimentConfig) -> dict[str, object]:
    from tqdm import tqdm

    from pecore.datasets import default_data_path, load_figshare
    from pecore.pipeline import dilated_rois

    wall_start = time.perf_counter()
    cache_dir = Path(config.cache_dir)
    data_path = Path(config.data_path) if config.data_path else default_data_path()
    log.info("loading %s", data_path)
    data = load_figshare(data_path, cache_dir=cache_dir)
    stat = data_path.stat()
    config.extra["data_id"] = f"{data_path.name}:{stat.st_size}"
    folds = read_fold_file(config.fold_file, data.index) if config.fold_file else data.folds
    folds_digest = hashlib.sha1(folds.astype(np.int64).tobytes()).hexdigest()[:12]
    for fold in config.folds:
        if not np.any(folds == fold):
            raise ValueError(f"fold {fold} has no images")
    units_dir = cache_dir / "experiment_units"
    units_dir.mkdir(parents=True, exist_ok=True)
    fold_results: dict[str, dict[int, dict[int, dict[str, object]]]] = {}
    n_units = len(config.conditions) * len(config.folds)
    # Build every missing cipher stack of a key mode in one pass (one key stream per image).
    pending = list(config.conditions)
    dilated: tuple[np.ndarray, list[np.ndarray]] | None = None  # (mask stack, its ROIs)
    # the ROI radius variant masks are dilated by before scrambling (None: the cloud dilates)
    dilate = config.radius if config.variant_roi == "owner" else None
    with tqdm(total=n_units, desc="condition×fold", unit="unit") as bar:
        for condition in config.conditions:
            fold_results[condition.name] = {}
            images = None  # built or mapped only if some fold result is missing
            masks = data.masks
            owner_roi = condition.is_variant and config.variant_roi == "owner"
            fold_config = replace(config, radius=0) if owner_roi else config
            for fold in config.folds:
                keys = {
                    s: _unit_key(config, condition, fold, s, folds_digest)
                    for s in config.dictionary_sizes
                }
                cached = {}
                for size, key in keys.items():
                    file = units_dir / f"{condition.slug}_f{fold}_D{size}_{key}.json"
                    if file.is_file():
                        cached[size] = json.loads(file.read_text())
                missing = [s for s in config.dictionary_sizes if s not in cached]
                if missing:
                    if images is None:
                        images = cipher_images(
                            data.images,
                            data.index,
                            pending,
                            config.key_seed,
                            cache_dir,
                            masks=data.masks,
                            dilate=dilate,
                        )[condition.name]
                        masks = condition_masks(
                            data.masks, data.index, [condition], config.key_seed, cache_dir, dilate
                        )[condition.name]
                    bar.set_postfix_str(f"{condition.name} fold {fold} D={missing}")
                    seed_words = [config.seed, fold, zlib.crc32(condition.name.encode())]
                    if dilated is None or dilated[0] is not masks:
                        # one stack at a time (3064 × 512² bool = 0.8 GB), reused across folds
                        dilated = (masks, dilated_rois(masks, fold_config.radius))
                    fresh = run_fold(
                        images,
                        masks,
                        data.labels,
                        folds,
                        fold,
                        missing,
                        fold_config,
                        seed_words,
                        rois=dilated[1],
                    )
                    for size, result in fresh.items():
                        file = units_dir / f"{condition.slug}_f{fold}_D{size}_{keys[size]}.json"
                        text = json.dumps(result)
                        file.write_text(text)
                        cached[size] = json.loads(text)  # same key types as a cached result
                        cached[size]["cached"] = False
                    log.info(
                        "%s fold %d: %s (peak RSS %.2f GiB)",
                        condition.name,
                        fold,
                        ", ".join(
                            f"D={s} mAP={cached[s]['by_dim'][str(HEADLINE_DIM)]['mAP']:.4f}"
                            for s in missing
                        ),
                        peak_memory_bytes() / 2**30,
                    )
                else:
                    for result in cached.values():
                        result["cached"] = True
                fold_results[condition.name][fold] = cached
                bar.update(1)
    results = summarise(config, fold_results, folds_digest)
    results["wall_time_s"] = time.perf_counter() - wall_start
    results["peak_memory_bytes"] = peak_memory_bytes()
    results["machine"] = {"platform": platform.platform(), "python": platform.python_version()}
    return results


def summarise(
    config: ExperimentConfig,
    fold_results: dict[str, dict[int, dict[int, dict[str, object]]]],
    folds_digest: str,
) -> dict[str, object]:
    from pecore.evaluate import summarise_folds

    summary: dict[str, dict[str, dict[str, dict[str, object]]]] = {}
    for name, by_fold in fold_results.items():
        summary[name] = {}
        for size in config.dictionary_sizes:
            summary[name][str(size)] = {}
            for dim in DIMS:
                entry: dict[str, object] = {}
                rows = [by_fold[f][size]["by_dim"].get(str(dim)) for f in config.folds]
                if any(r is None for r in rows):
                    continue
                for metric in METRICS:
                    entry[metric] = summarise_folds([100.0 * r[metric] for r in rows])
                per_class = {}
                for label in sorted({int(c) for r in rows for c in r["per_class"]}):
                    per_class[str(label)] = {
                        metric: summarise_folds(  # over the folds with queries of the class
                            [
                                100.0 * r["per_class"][str(label)][metric]
                                for r in rows
                                if str(label) in r["per_class"]
                            ]
                        )
                        for metric in METRICS
                    }
                entry["per_class"] = per_class
                summary[name][str(size)][str(dim)] = entry
    return {
        "description": "Ahmad et al. 2025 Tables 1-2 reproduction (mean ± population std over "
        "folds, in %); CFML dim 1..10, headline dim = 10",
        "config": {
            **config.model_params(),
            "dictionary_sizes": list(config.dictionary_sizes),
            "conditions": [c.name for c in config.conditions],
            "folds": list(config.folds),
            "fold_file": config.fold_file,
            "folds_digest": folds_digest,
            "n_jobs": config.n_jobs,
            "variant_roi": config.variant_roi,
            "data": config.extra.get("data_id"),
            "headline_dim": HEADLINE_DIM,
            "different_keys": "derive_image_key(MasterKey.from_seed(key_seed), str(index))",
            "same_key": "SSLMKey() (paper key θ*)",
        },
        "summary": summary,
        "folds": {
            name: {
                str(f): {str(s): r for s, r in by_size.items()} for f, by_size in by_fold.items()
            }
            for name, by_fold in fold_results.items()
        },
    }


# ------------------------------------------------------------------------------ reports
def _fmt(entry: dict[str, float]) -> str:
    if entry["n"] > 1:
        return f"{entry['mean']:.2f} ± {entry['std']:.2f}"
    return f"{entry['mean']:.2f}"


def markdown_tables(results: dict[str, object], dim: int = HEADLINE_DIM) -> str:
    config = results["config"]
    summary = results["summary"]
    n_folds = len(config["folds"])
    lines = [
        f"# Retrieval on plain and cipher images (CFML dim = {dim}, {n_folds} fold(s), "
        "mean ± std %)",
        "",
        "## Table 1",
        "",
        "| D | Method | mAP | Prec@5 | Prec@10 | paper mAP | Δ mAP |",
        "|---|---|---|---|---|---|---|",
    ]
    for size in config["dictionary_sizes"]:
        for name in config["conditions"]:
            entry = summary.get(name, {}).get(str(size), {}).get(str(dim))
            if not entry:
                continue
            condition = _condition_from_name(name)
            paper = PAPER_TABLE1.get((size, name))
            paper_cells = (
                f"{paper[0]:.2f} | {entry['mAP']['mean'] - paper[0]:+.2f}" if paper else " | "
            )
            lines.append(
                f"| {size} | {condition.label} | {_fmt(entry['mAP'])} | {_fmt(entry['P@5'])} | "
                f"{_fmt(entry['P@10'])} | {paper_cells} |"
            )
    size2 = 64 if 64 in config["dictionary_sizes"] else max(config["dictionary_sizes"])
    lines += [
        "",
        f"## Table 2 (per class, D = {size2}; T1 meningioma, T2 glioma, T3 pituitary)",
        "",
        "| Method | Class | mAP | Prec@5 | Prec@10 | paper mAP |",
        "|---|---|---|---|---|---|",
    ]
    for name in config["conditions"]:
        entry = summary.get(name, {}).get(str(size2), {}).get(str(dim))
        if not entry:
            continue
        for label, scores in entry["per_class"].items():
            paper = PAPER_TABLE2.get((name, int(label))) if size2 == 64 else None
            lines.append(
                f"| {_condition_from_name(name).label} | T{label} | {_fmt(scores['mAP'])} | "
                f"{_fmt(scores['P@5'])} | {_fmt(scores['P@10'])} | "
                f"{f'{paper[0]:.2f}' if paper else ''} |"
            )
    lines += ["", f"## mAP against CFML output dimension (D = {size2})", ""]
    lines.append("| Method | " + " | ".join(f"dim {d}" for d in DIMS) + " |")
    lines.append("|---|" + "---|" * len(DIMS))
    for name in config["conditions"]:
        by_dim = summary.get(name, {}).get(str(size2), {})
        cells = [f"{by_dim[str(d)]['mAP']['mean']:.2f}" if str(d) in by_dim else "" for d in DIMS]
        lines.append(f"| {_condition_from_name(name).label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Wall time {results.get('wall_time_s', 0) / 60:.1f} min, peak memory "
        f"{results.get('peak_memory_bytes', 0) / 2**30:.2f} GiB (this process).",
        "",
    ]
    return "\n".join(lines)


def _condition_from_name(name: str) -> Condition:
    if name == "non-secure":
        return Condition(None)
    scheme, mode = name.split("/")
    return Condition(scheme, mode)


def plot_map_vs_d(results: dict[str, object], path: Path, dim: int = HEADLINE_DIM) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = results["config"]
    summary = results["summary"]
    sizes = config["dictionary_sizes"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for ax, mode in zip(axes, ("same", "different"), strict=True):
        for name in config["conditions"]:
            condition = _condition_from_name(name)
            if condition.scheme is not None and condition.key_mode != mode:
                continue
            xs, ys, es = [], [], []
            for size in sizes:
                entry = summary.get(name, {}).get(str(size), {}).get(str(dim))
                if entry:
                    xs.append(size)
                    ys.append(entry["mAP"]["mean"])
                    es.append(entry["mAP"]["std"])
            if not xs:
                continue
            line = ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=condition.label)
            paper = [PAPER_TABLE1.get((s, name)) for s in xs]
            if all(paper):
                ax.plot(xs, [p[0] for p in paper], ls=":", marker="x", color=line[0].get_color())
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.set_xlabel("dictionary size D (GMM components)")
        ax.set_title(f"{'same key' if mode == 'same' else 'different keys'} (dotted: paper)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel(f"mAP % (CFML dim {dim}, mean ± std over folds)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(results: dict[str, object], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(results, indent=1, sort_keys=False))
    md_path = out_dir / "tables.md"
    md_path.write_text(markdown_tables(results))
    png_path = out_dir / "map_vs_d.png"
    plot_map_vs_d(results, png_path)
    return [json_path, md_path, png_path]
