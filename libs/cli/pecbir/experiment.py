"""The retrieval experiment of Ahmad et al. 2025, Tables 1–2 (method spec §0.1, §6, §7.2).

For every condition (non-secure, or a scheme of `pecore.cipher.SCHEMES` ([25] np, [26] xor,
[27] chained, ours) or a tile-scrambled variant, under the paper's key θ* for
every image ("same") or one key per image ("per-image"), or the sealed mode of issue 12, where
the owner featurises its plain images and the cloud sees only Fisher vectors), every query
fold and every
dictionary size D: `pecore.model_selection.evaluate_fold` learns PCA + GMM(D) + CFML on the
database folds of the (cipher) images and scores the queries.  This module keeps the
bookkeeping: cipher images (`pecore.envelope.encrypt_stack`) and finished (condition, fold, D)
results are cached under `cache/` so that a rerun or an extended run only computes what is
missing; results.json, tables.md and the plot are written here and read back by
`read_headline_map`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import resource
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np

from pecore.cipher_roi import RoiCipher, is_roi_scheme
from pecore.cipher_variants import any_scheme, is_variant_scheme
from pecore.envelope import KEY_MODE_ALIASES, KEY_MODES, canonical_key_mode
from pecore.model_selection import CFML_DIMS, METRICS, paper_tables

log = logging.getLogger(__name__)

#: Bump when anything changes the numbers, so that cached fold results are not reused.
ALGORITHM_VERSION = 3

#: Tag of the mask handling of "<inner>-bs<b>" conditions (part of their unit cache key only).
VARIANT_MASKS = "scramble_mask(mask, stream, scheme, nonce=str(index)), pecbir/block-scramble/v1"
#: Tag of the mask handling of pe-roi conditions (their unit cache key only).
ROI_MASKS = "RoiCipher.cloud_mask(mask, stream, nonce=str(index)), pecbir/pe-roi/v1, radius 0"
DICTIONARY_SIZES = (16, 32, 64)
#: The sealed protection mode (issue 12): images sealed under per-image data keys, features
#: computed by the owner on the plain images.  A condition "sealed/per-image" in the grid.
SEALED = "sealed"
HEADLINE_DIM = CFML_DIMS[-1]
#: Key-mode spellings the seeds and cache keys were derived from before the rename to
#: "per-image": kept there (as the schemes' `legacy_name`), so that the numbers and existing
#: caches stay valid.
_SEED_SPELLING = {mode: alias for alias, mode in KEY_MODE_ALIASES.items()}


@dataclass(frozen=True)
class Condition:
    """`scheme` None = non-secure (plain uint8 images); `key_mode` is "same" or "per-image".

    "same" is the paper's key θ* (`pecore.keys.PAPER_KEY`) for every image, not the envelope's
    master-derived shared key.  `scheme` "sealed" (`SEALED`) is the sealed protection mode:
    its images are sealed under per-image data keys, which the features never depend on.
    Old spellings are read as the canonical ones: key mode "different" as "per-image",
    scheme "25" as "np" (`pecore.cipher_variants.any_scheme`).
    """

    scheme: str | None
    key_mode: str | None = None

    def __post_init__(self) -> None:
        if self.scheme == SEALED:
            if canonical_key_mode(self.key_mode or "per-image") != "per-image":
                raise ValueError("the sealed mode seals every image under its own data key")
            object.__setattr__(self, "key_mode", "per-image")
            return
        if self.scheme is not None:
            object.__setattr__(self, "scheme", any_scheme(self.scheme).name)
        if self.key_mode is not None:
            object.__setattr__(self, "key_mode", canonical_key_mode(self.key_mode))

    @property
    def is_variant(self) -> bool:
        """A tile-scrambled scheme of `pecore.cipher_variants` ("<inner>-bs<b>") or pe-roi:
        the cloud's masks are moved with the tiles (cached beside the cipher stack)."""
        return is_variant_scheme(self.scheme) or self.is_roi

    @property
    def is_roi(self) -> bool:
        """pe-roi (`pecore.cipher_roi`): its cloud mask is the moved ROI, used undilated."""
        return is_roi_scheme(self.scheme)

    @property
    def is_sealed(self) -> bool:
        """The sealed mode: the owner featurises plain images, the cloud sees only vectors."""
        return self.scheme == SEALED

    @property
    def name(self) -> str:
        return "non-secure" if self.scheme is None else f"{self.scheme}/{self.key_mode}"

    @property
    def seed_name(self) -> str:
        """`name` as spelled when the seeds and cache keys were fixed ("25/different")."""
        if self.scheme is None or self.is_sealed:
            return self.name
        scheme = any_scheme(self.scheme).legacy_name
        return f"{scheme}/{_SEED_SPELLING.get(str(self.key_mode), self.key_mode)}"

    @property
    def scheme_and_mode(self) -> tuple[str, str]:
        """(scheme, key mode) of a cipher condition."""
        return str(self.scheme), str(self.key_mode)

    @property
    def slug(self) -> str:
        """File-name form of `seed_name` (cache files keep their names across the rename)."""
        return self.seed_name.replace("/", "-")

    @property
    def label(self) -> str:
        if self.scheme is None:
            return "Non-secure [3]"
        if self.is_sealed:
            return "Sealed (owner-side FV)"
        keys = "same key" if self.key_mode == "same" else "diff. keys"
        return f"{keys} {any_scheme(self.scheme).label}"

    @classmethod
    def from_name(cls, name: str) -> Condition:
        """The condition named `name` in a results.json ("np/per-image", old "25/different")."""
        if name == "non-secure":
            return cls(None)
        scheme, mode = name.split("/")
        return cls(scheme, mode)


def all_conditions(
    schemes: Sequence[str], key_modes: Sequence[str], plain: bool, sealed: bool = False
) -> list[Condition]:
    out = [Condition(None)] if plain else []
    for mode in key_modes:
        for scheme in schemes:
            out.append(Condition(scheme, mode))
    if sealed:
        out.append(Condition(SEALED))
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
    #: More CFML ridge values scored on the same Fisher vectors (`evaluate_fold`'s
    #: `extra_lambdas`); each (condition, fold, D, λ) is cached under the key a run with
    #: `metric_lambda` = λ alone has, so `model_params` and the headline stay `metric_lambda`'s.
    extra_lambdas: tuple[float, ...] = ()
    #: Tile-reflected patches (pe-roi "-rf" spellings, `pecore.features.extract_patches`'
    #: `tile`); None: plain patches, and no entry in the parameters (cache keys unchanged).
    patch_tile: int | None = None
    seed: int = 0
    #: Master-key seed of the "per-image" keys (MasterKey.from_seed); "same" uses θ*.
    key_seed: int = 2025
    #: Variant conditions only: "cloud" = the cloud dilates the scrambled tumour mask by `radius`;
    #: "owner" = the owner scrambles the already dilated ROI and the cloud uses it as it is.
    variant_roi: str = "cloud"
    n_jobs: int = 2
    data_path: str | None = None
    cache_dir: str = "cache"
    out_dir: str = "results/experiment"
    extra: dict[str, object] = field(default_factory=dict)

    def _pipeline_params(self) -> dict[str, object]:
        """The retrieval pipeline's parameters, shared by `model_params` and `fold_params`."""
        params: dict[str, object] = {
            "n_regions": self.n_regions,
            "patch_size": self.patch_size,
            "radius": self.radius,
            "pca_energy": self.pca_energy,
            "n_train_patches": self.n_train_patches,
            "metric_lambda": self.metric_lambda,
        }
        if self.patch_tile is not None:  # only where set: the other conditions' keys stay put
            params["patch_tile"] = self.patch_tile
        return params

    def model_params(self) -> dict[str, object]:
        """What decides the numbers (cache keys, the results' config)."""
        return {
            **self._pipeline_params(),
            "seed": self.seed,
            "key_seed": self.key_seed,
            "algorithm_version": ALGORITHM_VERSION,
        }

    def fold_params(self) -> dict[str, object]:
        """The keyword parameters of `pecore.model_selection.evaluate_fold` this run uses."""
        return {**self._pipeline_params(), "n_jobs": self.n_jobs}


# ------------------------------------------------------------------------------ inputs
def _cipher_path(cache_dir: Path, condition: Condition, key_seed: int, ids: np.ndarray) -> Path:
    seed_part = f"-k{key_seed}" if condition.key_mode == "per-image" else ""
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

    Missing stacks are built by `pecore.envelope.encrypt_stack`, in one pass over the images
    per key mode (one key stream per image for all schemes): "same" = the paper's key θ* for
    every image, "per-image" = derive_image_key(MasterKey.from_seed(key_seed), str(index_i)).
    A tile-scrambled variant ("<inner>-bs<b>") uses nonce str(index) and needs `masks`: the
    masks moved with its tiles are cached beside the cipher stack, for `condition_masks`.  With
    `dilate`, the masks are dilated by that radius before scrambling (the owner ships the ROI).
    """
    from tqdm import tqdm

    from pecore.envelope import encrypt_stack
    from pecore.keys import MasterKey

    stacks: dict[str, np.ndarray] = {}
    todo: dict[str, list[Condition]] = {}
    for condition in conditions:
        if condition.scheme is None or condition.is_sealed:  # featurised on the plain images
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
        paths = {c.scheme: _cipher_path(cache_dir, c, key_seed, ids) for c in group}
        mask_paths = {
            c.scheme: _mask_path(cache_dir, c, key_seed, ids, dilate) for c in group if c.is_variant
        }
        next(iter(paths.values())).parent.mkdir(parents=True, exist_ok=True)
        # Stream the stacks to disk in image order with plain writes: a writable memmap would
        # keep every written page resident (and counted in this process's peak memory).
        outs = {
            (kind, scheme): _open_stack(path, descr, tuple(images.shape))
            for kind, descr, chosen in (("cipher", "|u1", paths), ("mask", "|b1", mask_paths))
            for scheme, path in chosen.items()
        }
        names = ", ".join(c.name for c in group)
        encrypted = encrypt_stack(
            images,
            image_ids=[str(int(i)) for i in ids],
            schemes=list(paths),
            key_mode=mode,
            master=MasterKey.from_seed(key_seed) if mode == "per-image" else None,
            masks=masks if mask_paths else None,
            dilate=dilate,
        )
        with tqdm(total=len(images), desc=f"encrypt {names}", unit="img", leave=False) as bar:
            for ciphers, moved in encrypted:
                for scheme, cipher in ciphers.items():
                    outs["cipher", scheme].write(np.ascontiguousarray(cipher).tobytes())
                for scheme, mask in moved.items():
                    outs["mask", scheme].write(np.ascontiguousarray(mask, dtype=bool).tobytes())
                bar.update(1)
        for (kind, scheme), fh in outs.items():
            fh.close()
            path = (paths if kind == "cipher" else mask_paths)[scheme]
            path.with_suffix(".tmp.npy").replace(path)
        for condition in group:
            stacks[condition.name] = np.load(paths[condition.scheme], mmap_mode="r")
    return stacks


def _open_stack(path: Path, descr: str, shape: tuple[int, ...]) -> BinaryIO:
    """A temporary .npy beside `path` with its header written, ready for the rows in order."""
    fh = path.with_suffix(".tmp.npy").open("wb")
    np.lib.format.write_array_header_1_0(
        fh, {"descr": descr, "fortran_order": False, "shape": shape}
    )
    return fh


# ------------------------------------------------------------------------------ one fold
def _unit_key(
    config: ExperimentConfig, condition: Condition, fold: int, size: int, folds_digest: str
) -> str:
    fields = {
        "params": config.model_params(),
        "condition": condition.seed_name,
        "fold": fold,
        "D": size,
        "folds": folds_digest,
        "data": config.extra.get("data_id"),
    }
    if condition.is_roi:
        fields["masks"] = ROI_MASKS
    elif condition.is_variant:  # only here, so that the standard conditions' keys stay as before
        fields["masks"] = VARIANT_MASKS
        if config.variant_roi != "cloud":
            fields["masks"] += f", ROI dilated by the owner (radius {config.radius})"
    payload = json.dumps(fields, sort_keys=True)
    return hashlib.sha1(payload.encode()).hexdigest()[:16]


def condition_fold_config(config: ExperimentConfig, condition: Condition) -> ExperimentConfig:
    """The pipeline parameters `condition`'s folds run with.

    Where the owner ships the ROI (pe-roi, or a variant with `variant_roi` "owner"), the cloud
    does not dilate it again (radius 0).  A pe-roi scheme also fixes the patch size: its cloud
    mask holds the positions whose patch of that size lies inside one tile (`RoiCipher`), and
    a "-rf" scheme cuts every patch from its own tile, reflected at the tile border
    (`patch_tile`).
    """
    owner_roi = condition.is_roi or (condition.is_variant and config.variant_roi == "owner")
    out = replace(config, radius=0) if owner_roi else config
    if condition.is_roi:
        scheme = RoiCipher.from_name(str(condition.scheme))
        out = replace(out, patch_size=scheme.patch_size)
        if scheme.reflect:
            out = replace(out, patch_tile=scheme.tile)
    return out


# ------------------------------------------------------------------------------ the run
def peak_memory_bytes() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def run_experiment(config: ExperimentConfig) -> dict[str, object]:
    from tqdm import tqdm

    from pecore.datasets import default_data_path, load_figshare, read_fold_file
    from pecore.model_selection import evaluate_fold, fold_seed, lambda_key, unit_at_lambda
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
    # the headline λ first, then the extra ones (each once)
    lambdas = list(dict.fromkeys([config.metric_lambda, *config.extra_lambdas]))
    by_lambda: dict[float, dict[str, dict[int, dict[int, dict[str, object]]]]] = {
        reg: {c.name: {} for c in config.conditions} for reg in lambdas
    }
    n_units = len(config.conditions) * len(config.folds)
    # Build every missing cipher stack of a key mode in one pass (one key stream per image).
    pending = list(config.conditions)
    dilated: tuple[np.ndarray, list[np.ndarray]] | None = None  # (mask stack, its ROIs)
    # the ROI radius variant masks are dilated by before scrambling (None: the cloud dilates)
    dilate = config.radius if config.variant_roi == "owner" else None
    with tqdm(total=n_units, desc="condition×fold", unit="unit") as bar:
        for condition in config.conditions:
            images = None  # built or mapped only if some fold result is missing
            masks = data.masks
            fold_config = condition_fold_config(config, condition)
            for fold in config.folds:
                # every (D, λ) is its own unit, keyed as a run at that λ alone keys it
                keys = {
                    (s, reg): _unit_key(
                        replace(config, metric_lambda=reg), condition, fold, s, folds_digest
                    )
                    for reg in lambdas
                    for s in config.dictionary_sizes
                }
                found: dict[tuple[int, float], dict[str, object]] = {}
                for (size, reg), key in keys.items():
                    file = units_dir / f"{condition.slug}_f{fold}_D{size}_{key}.json"
                    if file.is_file():
                        found[size, reg] = json.loads(file.read_text())
                missing = [
                    s
                    for s in config.dictionary_sizes
                    if any((s, reg) not in found for reg in lambdas)
                ]
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
                    # seeded by the condition's old spelling, so that the numbers stay put
                    seed_words = [config.seed, fold, zlib.crc32(condition.seed_name.encode())]
                    if dilated is None or dilated[0] is not masks:
                        # one stack at a time (3064 × 512² bool = 0.8 GB), reused across folds
                        dilated = (masks, dilated_rois(masks, fold_config.radius))
                    with tqdm(
                        total=len(images), desc="  Fisher vectors", unit="img", leave=False
                    ) as encoded:
                        fresh = evaluate_fold(
                            images,
                            masks,
                            data.labels,
                            folds,
                            query_fold=fold,
                            dictionary_sizes=missing,
                            **fold_config.fold_params(),
                            random_state=fold_seed(seed_words),
                            rois=dilated[1],
                            progress=encoded.update,
                            sealed=condition.is_sealed,
                            extra_lambdas=lambdas[1:],
                        )
                    for size, result in fresh.items():
                        for reg in lambdas:
                            if (size, reg) in found:  # cached already: kept as it was
                                continue
                            name = f"{condition.slug}_f{fold}_D{size}_{keys[size, reg]}.json"
                            text = json.dumps(unit_at_lambda(result, reg))
                            (units_dir / name).write_text(text)
                            found[size, reg] = json.loads(text)  # same key types as cached
                            found[size, reg]["cached"] = False
                    log.info(
                        "%s fold %d: %s (peak RSS %.2f GiB)",
                        condition.name,
                        fold,
                        ", ".join(
                            f"D={s} λ={reg:g} "
                            f"mAP={found[s, reg]['by_dim'][str(HEADLINE_DIM)]['mAP']:.4f}"
                            for s in missing
                            for reg in lambdas
                        ),
                        peak_memory_bytes() / 2**30,
                    )
                for result in found.values():
                    result.setdefault("cached", True)
                for reg in lambdas:
                    by_lambda[reg][condition.name][fold] = {
                        s: found[s, reg] for s in config.dictionary_sizes
                    }
                bar.update(1)
    results = summarise(config, by_lambda[config.metric_lambda], folds_digest)
    if config.extra_lambdas:
        results["config"]["metric_lambdas"] = list(lambdas)
        results["summary_by_lambda"] = {
            lambda_key(reg): summarise(config, by_lambda[reg], folds_digest)["summary"]
            for reg in lambdas
        }
        results["folds_by_lambda"] = {
            lambda_key(reg): summarise(config, by_lambda[reg], folds_digest)["folds"]
            for reg in lambdas[1:]
        }
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
            for dim in CFML_DIMS:
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
            # what "pe-roi" meant for this run: its explicit spelling (the chosen one changes)
            "roi_schemes": {
                str(c.scheme): any_scheme(str(c.scheme)).legacy_name
                for c in config.conditions
                if c.is_roi
            },
            "folds": list(config.folds),
            "fold_file": config.fold_file,
            "folds_digest": folds_digest,
            "n_jobs": config.n_jobs,
            "variant_roi": config.variant_roi,
            "data": config.extra.get("data_id"),
            "headline_dim": HEADLINE_DIM,
            "per_image_keys": "derive_image_key(MasterKey.from_seed(key_seed), str(index))",
            "same_key": "PAPER_KEY (the paper's θ*) for every image, not a master-derived key",
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
            condition = Condition.from_name(name)
            paper = _paper_table1(size, condition)
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
            paper = _paper_table2(Condition.from_name(name), label) if size2 == 64 else None
            lines.append(
                f"| {Condition.from_name(name).label} | T{label} | {_fmt(scores['mAP'])} | "
                f"{_fmt(scores['P@5'])} | {_fmt(scores['P@10'])} | "
                f"{f'{paper[0]:.2f}' if paper else ''} |"
            )
    lines += ["", f"## mAP against CFML output dimension (D = {size2})", ""]
    lines.append("| Method | " + " | ".join(f"dim {d}" for d in CFML_DIMS) + " |")
    lines.append("|---|" + "---|" * len(CFML_DIMS))
    for name in config["conditions"]:
        by_dim = summary.get(name, {}).get(str(size2), {})
        cells = [
            f"{by_dim[str(d)]['mAP']['mean']:.2f}" if str(d) in by_dim else "" for d in CFML_DIMS
        ]
        lines.append(f"| {Condition.from_name(name).label} | " + " | ".join(cells) + " |")
    by_lambda = results.get("summary_by_lambda") or {}
    if by_lambda:
        lams = list(by_lambda)
        lines += [
            "",
            f"## mAP against the CFML ridge λ (CFML dim {dim}; headline λ = "
            f"{config['metric_lambda']:g})",
            "",
            "| D | Method | " + " | ".join(f"λ = {float(lam):g}" for lam in lams) + " |",
            "|---|---|" + "---|" * len(lams),
        ]
        for size in config["dictionary_sizes"]:
            for name in config["conditions"]:
                cells = []
                for lam in lams:
                    entry = by_lambda[lam].get(name, {}).get(str(size), {}).get(str(dim))
                    cells.append(_fmt(entry["mAP"]) if entry else "")
                if any(cells):
                    label = Condition.from_name(name).label
                    lines.append(f"| {size} | {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Wall time {results.get('wall_time_s', 0) / 60:.1f} min, peak memory "
        f"{results.get('peak_memory_bytes', 0) / 2**30:.2f} GiB (this process).",
        "",
    ]
    return "\n".join(lines)


def _paper_table1(size: int, condition: Condition) -> list[float] | None:
    """The paper's (mAP, P@5, P@10) of `condition` at D = `size`, if it reports one."""
    return paper_tables()["table1"]["rows"].get(str(size), {}).get(condition.name)


def _paper_table2(condition: Condition, label: str) -> list[float] | None:
    """The paper's per-class (mAP, P@5, P@10) of `condition` at D = 64, if it reports one."""
    return paper_tables()["table2"]["rows"].get(condition.name, {}).get(str(label))


def plot_map_vs_d(results: dict[str, object], path: Path, dim: int = HEADLINE_DIM) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    config = results["config"]
    summary = results["summary"]
    sizes = config["dictionary_sizes"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    for ax, mode in zip(axes, KEY_MODES, strict=True):
        for name in config["conditions"]:
            condition = Condition.from_name(name)
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
            paper = [_paper_table1(s, condition) for s in xs]
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


# ------------------------------------------------------------------------------ reading back
def _headline_entries(
    path: Path | None,
) -> tuple[dict[tuple[str, str], tuple[int, int, float]], str]:
    """(scheme, key mode) → (number of folds, D, headline mAP %) of one results.json; a pe-roi
    scheme under the explicit spelling the file says it was computed with (`roi_schemes`)."""
    if path is None:
        return {}, "no experiment results file found (results/<run>/results.json)"
    if not Path(path).is_file():
        return {}, f"experiment results file {path} does not exist"
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return {}, f"could not read {path}: {exc}"
    if not isinstance(document, dict) or not isinstance(document.get("summary"), dict):
        return {}, f"{path} is not a `pecbir experiment` results.json (no summary)"
    config = document.get("config", {})
    dim = str(config.get("headline_dim", HEADLINE_DIM))
    n_folds = len(config.get("folds") or [])
    spellings = config.get("roi_schemes") or {}
    found: dict[tuple[str, str], tuple[int, int, float]] = {}
    sizes_used: set[str] = set()
    for name, by_size in document["summary"].items():
        condition = Condition.from_name(name)
        key = ("plain", "same") if condition.scheme is None else condition.scheme_and_mode
        if condition.is_roi:  # "pe-roi" names whichever scheme was chosen when the file was made
            written = name.split("/")[0]
            key = (any_scheme(spellings.get(written, written)).legacy_name, key[1])
        sizes = sorted((s for s in by_size if dim in by_size[s]), key=int)
        if sizes:
            value = float(by_size[sizes[-1]][dim]["mAP"]["mean"])
            found[key] = (n_folds, int(sizes[-1]), value)
            sizes_used.add(sizes[-1])
    if not found:
        return {}, f"{path} holds no condition with CFML dim {dim}"
    return found, (
        f"{path} (pecbir experiment summary: mAP in %, CFML dim {dim}, "
        f"D = {', '.join(sorted(sizes_used, key=int))}, folds {config.get('folds')})"
    )


def read_headline_map(path: Path | None) -> tuple[dict[tuple[str, str], float], str]:
    """(scheme, key mode) → headline mAP (%) from a results.json that `write_outputs` wrote.

    Reads summary[condition][D][headline dim]["mAP"]["mean"] at the largest D present for
    each condition; "non-secure" is returned as ("plain", "same") and old files' "different"
    as "per-image".  Returns ({}, reason) when there is no such file or it is not an
    experiment's results.json: the caller then reports the mAP as not available.
    """
    found, reason = _headline_entries(path)
    return {key: value for key, (_, _, value) in found.items()}, reason


def read_headline_maps(paths: Sequence[Path]) -> tuple[dict[tuple[str, str], float], str]:
    """`read_headline_map` over several results.json files (e.g. every results/*/).

    Each condition is taken from the file that measured it on the most folds, then at the
    largest D (the first such file on a tie), so that a quick one-fold run never stands in
    for a full one.  The reason names the files that contributed.
    """
    best: dict[tuple[str, str], tuple[int, int, float]] = {}
    origin: dict[tuple[str, str], int] = {}
    reasons: list[str] = []
    for number, path in enumerate(paths):
        found, reason = _headline_entries(path)
        reasons.append(reason)
        for key, entry in found.items():
            if key not in best or entry[:2] > best[key][:2]:
                best[key], origin[key] = entry, number
    if not best:
        return {}, "; ".join(reasons) or "no experiment results file found"
    used = sorted(set(origin.values()))
    return {key: value for key, (_, _, value) in best.items()}, "; ".join(reasons[n] for n in used)
