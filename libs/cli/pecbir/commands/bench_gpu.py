"""`pecbir bench-gpu`: the torch feature back end against the numpy/numba reference (issue 17).

On the reference split (query fold f, database = the other folds; plain images): PCA and GMM are
fitted once by the reference code on the database; every image's Fisher vector is computed by
both back ends, timed (images/s over the whole dataset: ROI, patches, PCA, posteriors, FV); then

- Fisher-vector agreement: max-abs difference, max and median relative L2 error per image;
- retrieval parity with the *same* CFML (fitted on the reference database vectors): mAP of each
  back end, the difference in points, and the fraction of queries whose top-10 lists are
  identical;
- a model trained end to end with the torch back end (CFML on torch vectors): its mAP.

PCA, GMM and CFML are always fitted by the reference code (a torch fit is not implemented), so
the "fit stays on the CPU" branch of the issue applies. Prints a table and writes JSON; the
device is whatever `--device` resolves to (CUDA when present, else the CPU).

The lent GPU machine cannot read ../shared/data: `--export-crops crops.npz` writes, for every
slice, the crop its features read (the dilated ROI's bounding box plus the patch margin) with
one extra top row that holds the image's minimum and maximum, so min–max normalisation and
therefore every Fisher vector are those of the whole image; `--crops crops.npz` benchmarks on
it (about 30 MB for the 3064 slices, within what travels to the device).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from pathlib import Path

import numpy as np


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench-gpu", help="torch feature back end vs numpy reference: parity and images/s"
    )
    parser.add_argument("--folds", default="1", help="comma-separated query folds")
    parser.add_argument("--sizes", default="64", help="comma-separated dictionary sizes D")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if present)")
    parser.add_argument("--batch-size", type=int, default=None, help="images per torch batch")
    parser.add_argument("--limit", type=int, default=None, help="first N dataset rows only")
    parser.add_argument(
        "--synthetic", type=int, default=0, help="use N generated images instead of the dataset"
    )
    parser.add_argument("--n-train-patches", type=int, default=300_000)
    parser.add_argument(
        "--cpu-jobs", type=int, default=1, help="processes for the numpy reference (its img/s)"
    )
    parser.add_argument("--crops", type=Path, default=None, help="slices from --export-crops")
    parser.add_argument(
        "--export-crops", type=Path, default=None, help="write the slices' crops and stop"
    )
    parser.add_argument(
        "--capped-ranks",
        type=lambda text: [int(r) for r in text.split(",") if r],
        default=[],
        help="also fit CFML rank-capped at these k (comma-separated) and report its mAP",
    )
    parser.add_argument(
        "--cipher",
        action="store_true",
        help="export crops of cipher slices (the paper's cipher, per-image keys, seed 0)",
    )
    parser.add_argument("--out", type=Path, default=Path("results/gpu/bench.json"))
    parser.set_defaults(func=run)


def _dataset(args: argparse.Namespace):
    from pecore.datasets import load_figshare, make_synthetic

    if args.synthetic:
        return make_synthetic(n_images=args.synthetic, size=64, seed=0), "generated images"
    if args.crops is not None:
        return _load_crops(args.crops), f"figshare slices, feature crops ({args.crops.name})"
    return load_figshare(limit=args.limit), "figshare brain-tumour dataset (plain images)"


RADIUS, PATCH_SIZE, N_REGIONS = 24, 9, 8


def export_crops(data, path: Path) -> None:
    """Each slice cut to what its features read, with an extra first row [min, max, min, …]."""
    from pecore.roi import dilate_mask

    margin = PATCH_SIZE // 2
    pixels, masks, shapes = [], [], []
    for image, mask in zip(data.images, data.masks, strict=True):
        roi = dilate_mask(mask, RADIUS)
        rows, cols = np.flatnonzero(roi.any(axis=1)), np.flatnonzero(roi.any(axis=0))
        r0, r1 = max(rows[0] - margin, 0), min(rows[-1] + margin + 1, image.shape[0])
        c0, c1 = max(cols[0] - margin, 0), min(cols[-1] + margin + 1, image.shape[1])
        crop = np.full((r1 - r0 + 1, c1 - c0), image.min(), dtype=image.dtype)
        crop[0, 1] = image.max()
        crop[1:] = image[r0:r1, c0:c1]
        cut = np.zeros(crop.shape, dtype=bool)
        cut[1:] = mask[r0:r1, c0:c1]
        pixels.append(crop.ravel())
        masks.append(cut.ravel())
        shapes.append(crop.shape)
    np.savez_compressed(
        path,
        pixels=np.concatenate(pixels),
        masks=np.packbits(np.concatenate(masks)),
        shapes=np.array(shapes, dtype=np.int64),
        labels=data.labels,
        folds=data.folds,
    )


def _load_crops(path: Path):
    from types import SimpleNamespace

    with np.load(path) as saved:
        shapes = saved["shapes"]
        sizes = shapes.prod(axis=1)
        flat_masks = np.unpackbits(saved["masks"], count=int(sizes.sum())).astype(bool)
        cuts = np.cumsum(sizes)[:-1]
        # one canvas for all, so that the torch back end batches them: padded with each
        # crop's minimum (below and right of it), which no patch reads and no min–max changes
        height, width = shapes.max(axis=0)
        images = np.empty((len(shapes), height, width), dtype=saved["pixels"].dtype)
        masks = np.zeros((len(shapes), height, width), dtype=bool)
        pieces = zip(
            np.split(saved["pixels"], cuts), np.split(flat_masks, cuts), shapes, strict=True
        )
        for i, (pixels, mask, (h, w)) in enumerate(pieces):
            images[i] = pixels.min()
            images[i, :h, :w] = pixels.reshape(h, w)
            masks[i, :h, :w] = mask.reshape(h, w)
        return SimpleNamespace(
            images=images, masks=masks, labels=saved["labels"], folds=saved["folds"]
        )


def _encrypted(images: np.ndarray) -> np.ndarray:
    """The slices under the paper's cipher ("ours"), one per-image key each (seed 0)."""
    from tqdm import tqdm

    from pecore.envelope import encrypt_stack
    from pecore.keys import MasterKey

    out = np.empty_like(images)
    stream = encrypt_stack(
        images,
        image_ids=[str(i) for i in range(len(images))],
        schemes=["ours"],
        key_mode="per-image",
        master=MasterKey.from_seed(0),
    )
    for i, (ciphers, _) in enumerate(tqdm(stream, total=len(images), desc="encrypt", unit="img")):
        out[i] = ciphers["ours"]
    return out


def _top_k_identical(zq: np.ndarray, zd: np.ndarray, tq: np.ndarray, td: np.ndarray, k: int):
    from pecore.evaluate import rank_database

    same = np.all(rank_database(zq, zd)[:, :k] == rank_database(tq, td)[:, :k], axis=1)
    return float(same.mean())


def _fold(data, fold: int, size: int, args: argparse.Namespace, device: str) -> dict[str, object]:
    from tqdm import tqdm

    from pecore.evaluate import retrieval_metrics
    from pecore.fisher import FisherVectorEncoder
    from pecore.metric import CFML
    from pecore.pipeline import dilated_rois, encode_images, fit_patch_model
    from pecore.torch_features import TorchFeatures

    query, database = data.folds == fold, data.folds != fold
    images, masks, labels = data.images, data.masks, data.labels
    radius, patch_size, n_regions = RADIUS, PATCH_SIZE, N_REGIONS
    rois = dilated_rois(masks, radius)
    db = np.flatnonzero(database)
    started = time.perf_counter()
    model = fit_patch_model(
        [images[i] for i in db],
        [masks[i] for i in db],
        [size],
        n_train_patches=args.n_train_patches,
        rois=[rois[i] for i in db],
    )
    fit_seconds = time.perf_counter() - started
    pca, gmm = model.pca, model.gmms[size]
    encoder = FisherVectorEncoder(gmm, n_regions=n_regions)

    with tqdm(total=len(images), desc=f"numpy D={size} fold {fold}", unit="img") as bar:
        started = time.perf_counter()
        (reference,) = encode_images(
            images, masks, pca, [encoder], rois=rois, n_jobs=args.cpu_jobs, progress=bar.update
        )
        numpy_seconds = time.perf_counter() - started
    features = TorchFeatures(
        pca,
        gmm,
        n_regions=n_regions,
        patch_size=patch_size,
        device=device,
        batch_size=args.batch_size,
    )
    features.fisher_vectors(images[:2], rois[:2])  # warm-up (allocator, kernels)
    started = time.perf_counter()
    fv = np.empty_like(reference)
    step = features.batch_size * 4
    for start in tqdm(range(0, len(images), step), desc=f"torch D={size} fold {fold}"):
        fv[start : start + step] = features.fisher_vectors(
            images[start : start + step], rois[start : start + step]
        )
    torch_seconds = time.perf_counter() - started

    diff = fv.astype(np.float64) - reference
    relative = np.linalg.norm(diff, axis=1) / np.maximum(np.linalg.norm(reference, axis=1), 1e-12)
    metric = CFML(n_components=10).fit(reference[database], labels[database])
    components = metric.components_[:, :10]
    zq, zd = metric.transform(reference[query], 10), metric.transform(reference[database], 10)
    tq = features.project(fv[query], components)
    td = features.project(fv[database], components)
    numpy_map = float(retrieval_metrics(zq, labels[query], zd, labels[database])["mAP"])
    torch_map = float(retrieval_metrics(tq, labels[query], td, labels[database])["mAP"])
    trained = CFML(n_components=10).fit(fv[database], labels[database])
    trained_map = float(
        retrieval_metrics(
            features.project(fv[query], trained.components_[:, :10]),
            labels[query],
            features.project(fv[database], trained.components_[:, :10]),
            labels[database],
        )["mAP"]
    )
    # the rank-capped (randomised subspace) CFML of consortium-scale training, on the same
    # reference vectors: what the cap costs in retrieval where the exact fit is still possible
    capped_map = {}
    for rank in args.capped_ranks:
        capped = CFML(n_components=10, max_rank=rank).fit_chunks(
            [reference[database]], labels[database]
        )
        capped_map[str(rank)] = float(
            retrieval_metrics(
                capped.transform(reference[query]),
                labels[query],
                capped.transform(reference[database]),
                labels[database],
            )["mAP"]
        )
    return {
        "fold": fold,
        "dictionary_size": size,
        "pca_dims": int(pca.n_components_),
        "feature_dim": int(reference.shape[1]),
        "n_queries": int(query.sum()),
        "n_database": int(database.sum()),
        "patch_model_fit_seconds_cpu": fit_seconds,
        "numpy_images_per_s": len(images) / numpy_seconds,
        "torch_images_per_s": len(images) / torch_seconds,
        "fv_max_abs_error": float(np.abs(diff).max()),
        "fv_max_relative_l2_error": float(relative.max()),
        "fv_median_relative_l2_error": float(np.median(relative)),
        "map_numpy": numpy_map,
        "map_torch": torch_map,
        "map_difference_points": 100.0 * (torch_map - numpy_map),
        "top10_identical_fraction": _top_k_identical(zq, zd, tq, td, 10),
        "map_torch_trained_cfml": trained_map,
        "map_rank_capped_cfml": capped_map,
    }


def run(args: argparse.Namespace) -> int:
    import torch

    from pecore.torch_features import resolve_device

    if args.export_crops is not None:  # before the encryption, not after it
        args.export_crops.parent.mkdir(parents=True, exist_ok=True)
    data, source = _dataset(args)
    if args.export_crops is not None:
        if args.cipher:
            data = dataclasses.replace(data, images=_encrypted(data.images))
        export_crops(data, args.export_crops)
        print(f"wrote {args.export_crops} ({args.export_crops.stat().st_size / 2**20:.1f} MiB)")
        return 0
    device = resolve_device(args.device)
    folds = [int(f) for f in args.folds.split(",")]
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = [_fold(data, fold, size, args, device) for size in sizes for fold in folds]
    report = {
        "benchmark": "gpu",
        "image_source": source,
        "n_images": len(data.labels),
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if device.startswith("cuda") else None,
        "fit": "PCA, GMM and CFML fitted by the numpy reference on the CPU (no torch fit)",
        "numpy_processes": args.cpu_jobs,
        "torch_threads": torch.get_num_threads(),
        "batch_size": args.batch_size,
        "machine": {
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "load_average_at_end": list(os.getloadavg()),
            "numpy": np.__version__,
            "torch": torch.__version__,
        },
        "targets": {"map_difference_points_max": 0.1, "top10_identical_fraction_min": 0.99},
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    header = (
        f"{'D':>3} {'fold':>4} {'numpy img/s':>11} {'torch img/s':>11} {'FV max abs':>10} "
        f"{'rel max':>9} {'rel med':>9} {'mAP np':>7} {'mAP t':>7} {'Δ pts':>7} {'top10 =':>7}"
    )
    print(f"device: {device}  ({source}, {len(data.labels)} images)")
    print(header)
    for r in rows:
        print(
            f"{r['dictionary_size']:>3} {r['fold']:>4} {r['numpy_images_per_s']:>11.1f} "
            f"{r['torch_images_per_s']:>11.1f} {r['fv_max_abs_error']:>10.2e} "
            f"{r['fv_max_relative_l2_error']:>9.2e} {r['fv_median_relative_l2_error']:>9.2e} "
            f"{100 * r['map_numpy']:>7.2f} {100 * r['map_torch']:>7.2f} "
            f"{r['map_difference_points']:>7.3f} {100 * r['top10_identical_fraction']:>6.1f}%"
        )
    print(f"wrote {args.out}")
    return 0
