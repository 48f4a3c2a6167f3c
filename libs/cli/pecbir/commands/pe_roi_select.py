"""`pecbir pe-roi-select`: choose pe-roi's tile size and transform set on training folds only.

Inside the training folds of one outer query fold (default: fold 1 is left out entirely), one
inner fold (default 2) queries the other training folds, per-image keys, D = 16, for every
candidate "pe-roi-t<b>[d|dn]" (`pecore.cipher_roi`).  The rule: among the candidates whose mAP
is at least `--tolerance` points below the best candidate's at most, take the smallest tile,
then the largest transform set (both make a jigsaw solver's work harder).  Writes
results.json and selection.md to --out; (candidate) results are cached under --cache.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from pathlib import Path

import numpy as np

DEFAULT_CANDIDATES = "pe-roi-t16dn,pe-roi-t16,pe-roi-t32,pe-roi-t16d,pe-roi-t32dn"


class _Rows:
    """Rows `rows` of a (memory-mapped) stack, read one at a time: no copy of the subset."""

    def __init__(self, stack: np.ndarray, rows: np.ndarray) -> None:
        self.stack, self.rows = stack, rows
        self.shape = (rows.size, *stack.shape[1:])

    def __len__(self) -> int:
        return self.rows.size

    def __getitem__(self, i: int) -> np.ndarray:
        return np.asarray(self.stack[self.rows[i]])


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pe-roi-select",
        help="choose pe-roi's tile size and transforms by retrieval on training folds only",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--candidates", default=DEFAULT_CANDIDATES, help="pe-roi-t<b>[d|dn],…")
    parser.add_argument("--outer-fold", type=int, default=1, help="query fold left out entirely")
    parser.add_argument("--inner-fold", type=int, default=2, help="training fold used as queries")
    parser.add_argument("--dict-size", type=int, default=16)
    parser.add_argument("--tolerance", type=float, default=1.0, help="mAP points")
    parser.add_argument("--data", default=None, help="dataset .h5 (default $PECBIR_DATA)")
    parser.add_argument("--cache", type=Path, default=Path("cache"))
    parser.add_argument("--out", type=Path, default=Path("results/pe-roi/selection"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--key-seed", type=int, default=2025)
    parser.add_argument("--jobs", type=int, default=2)
    parser.set_defaults(func=run)


def choose(rows: dict[str, float], tolerance: float) -> str:
    """The selection rule (see the module docstring) on {scheme name: mAP %}."""
    from pecore.cipher_roi import ROI_TRANSFORM_SETS, RoiCipher

    best = max(rows.values())
    eligible = [RoiCipher.from_name(n) for n, m in rows.items() if m >= best - tolerance]
    order = list(ROI_TRANSFORM_SETS)
    return min(eligible, key=lambda s: (s.tile, -order.index(s.transforms))).legacy_name


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pecbir.experiment import Condition, ExperimentConfig, cipher_images, condition_masks
    from pecore.cipher_roi import RoiCipher
    from pecore.datasets import default_data_path, load_figshare
    from pecore.model_selection import evaluate_fold, fold_seed

    start = time.perf_counter()
    names = [RoiCipher.from_name(c.strip()).name for c in args.candidates.split(",") if c.strip()]
    if not names:
        raise ValueError("no candidates")
    data_path = Path(args.data) if args.data else default_data_path()
    data = load_figshare(data_path, cache_dir=args.cache)
    keep = np.flatnonzero(data.folds != args.outer_fold)
    folds = np.asarray(data.folds)[keep]
    if not np.any(folds == args.inner_fold):
        raise ValueError(f"inner fold {args.inner_fold} has no images outside the outer fold")
    images = _Rows(data.images, keep)
    masks = _Rows(data.masks, keep)
    labels = np.asarray(data.labels)[keep]
    ids = np.asarray(data.index)[keep]
    conditions = [Condition(n, "per-image") for n in names]
    stacks = cipher_images(images, ids, conditions, args.key_seed, args.cache, masks=masks)
    clouds = condition_masks(masks, ids, conditions, args.key_seed, args.cache)
    params = ExperimentConfig(n_jobs=args.jobs, radius=0).fold_params()
    units = args.cache / "pe_roi_selection"
    units.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, object]] = {}
    for condition in conditions:
        file = units / (
            f"{condition.slug}_o{args.outer_fold}_i{args.inner_fold}_D{args.dict_size}"
            f"_s{args.seed}_k{args.key_seed}.json"
        )
        if file.is_file():
            results[condition.name] = json.loads(file.read_text())
            continue
        seed = fold_seed([args.seed, args.inner_fold, zlib.crc32(condition.seed_name.encode())])
        cloud = clouds[condition.name]
        with tqdm(total=len(images), desc=f"{condition.name} FVs", unit="img") as bar:
            fresh = evaluate_fold(
                stacks[condition.name],
                cloud,
                labels,
                folds,
                query_fold=args.inner_fold,
                dictionary_sizes=[args.dict_size],
                **params,
                random_state=seed,
                rois=_Rows(cloud, np.arange(len(cloud))),
                progress=bar.update,
            )[args.dict_size]
        file.write_text(json.dumps(fresh))
        results[condition.name] = fresh
    # by the explicit spelling pe-roi-t<b>[d|dn]: "pe-roi" names the configuration chosen
    explicit = {name: RoiCipher.from_name(name.split("/")[0]).legacy_name for name in results}
    headline = {explicit[n]: 100.0 * float(r["by_dim"]["10"]["mAP"]) for n, r in results.items()}
    chosen = choose(headline, args.tolerance)
    document = {
        "description": "pe-roi selection on training folds only: inner fold queries the other "
        "training folds (per-image keys, CFML dim 10)",
        "command": "pecbir " + " ".join(sys.argv[1:]),
        "outer_fold_left_out": args.outer_fold,
        "inner_query_fold": args.inner_fold,
        "n_images": int(keep.size),
        "dictionary_size": args.dict_size,
        "tolerance_map_points": args.tolerance,
        "seed": args.seed,
        "key_seed": args.key_seed,
        "map_percent": headline,
        "p10_percent": {
            explicit[n]: 100.0 * float(r["by_dim"]["10"]["P@10"]) for n, r in results.items()
        },
        "chosen": chosen,
        "wall_time_s": time.perf_counter() - start,
        "units": {explicit[n]: r for n, r in results.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(document, indent=1))
    lines = [
        f"# pe-roi selection (training folds of fold {args.outer_fold} only; inner query fold "
        f"{args.inner_fold}, D = {args.dict_size}, per-image keys, CFML dim 10)",
        "",
        "| candidate | tile | transforms | mAP % | P@10 % |",
        "|---|---|---|---|---|",
    ]
    for name, value in headline.items():
        scheme = RoiCipher.from_name(name)
        lines.append(
            f"| {name} | {scheme.tile} | {scheme.transforms} | {value:.2f} | "
            f"{document['p10_percent'][name]:.2f} |"
        )
    lines += [
        "",
        f"Rule: within {args.tolerance} mAP points of the best candidate, smallest tile, then "
        f"largest transform set. Chosen: **{chosen}**.",
        "",
        f"Command: `{document['command']}`",
        "",
    ]
    (args.out / "selection.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0
