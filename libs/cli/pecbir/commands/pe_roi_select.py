"""`pecbir pe-roi-select`: choose pe-roi's tile size and transform set on training folds only.

Inside the training folds of one outer query fold (default: fold 1 is left out entirely), one
inner fold (default 2) queries the other training folds, per-image keys, D = 16, for every
candidate "pe-roi-t<b>[d|dn]" (`pecore.cipher_roi`).

The rule (issue 13): the privacy target is a hard constraint, retrieval decides among the
candidates that meet it.

1. Privacy: from `pecbir jigsaw-report`'s report.json (--jigsaw-report), on the attacked
   slices of the training folds only (a slice of the outer fold is dropped), the best attack
   per slice (the highest ROI SSIM of the pixel-level and the jigsaw stage; the oracle uses the
   true keys and is a bound, not an attack) must stay at or below --roi-ssim-max (0.30) on
   every slice: the worst slice decides.  A candidate the report did not attack is not
   eligible, except "<base>-in" (patches inside tiles only) or "<base>-rf" (tile-reflected
   patches) of an attacked base: its cloud image is the base's and its mask the base's ("-rf")
   or a function of the base's mask and the public tile grid ("-in"), so every attack on it is
   one on the base, whose numbers it takes (`inherit_privacy`).
2. Retrieval: among the eligible candidates, the highest training-split mAP.

No number of the outer (query) fold enters the choice.  Writes results.json and selection.md
to --out; candidate units are cached under --cache, or taken from an earlier results.json of
this command with the same split, D and seeds (--reuse), so that the rule can be re-applied
without recomputing them.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import zlib
from pathlib import Path

import numpy as np

from pecbir.commands.jigsaw_report import ATTACK_STAGES

DEFAULT_CANDIDATES = "pe-roi-t16dn,pe-roi-t16,pe-roi-t32,pe-roi-t16d,pe-roi-t32dn,pe-roi-t16dn-in"


class _Rows:
    """Rows `rows` of a (memory-mapped) stack, read one at a time: no copy of the subset."""

    def __init__(self, stack: np.ndarray, rows: np.ndarray) -> None:
        self.stack, self.rows = stack, rows
        self.shape = (rows.size, *stack.shape[1:])

    def __len__(self) -> int:
        return self.rows.size

    def __getitem__(self, i: int) -> np.ndarray:
        return np.asarray(self.stack[self.rows[i]])


def training_split(data, outer_fold: int, inner_fold: int):
    """(images, masks, labels, ids, folds) of the slices outside `outer_fold` (images and
    masks read on access), for the inner protocol: `inner_fold` queries the other folds."""
    keep = np.flatnonzero(data.folds != outer_fold)
    folds = np.asarray(data.folds)[keep]
    if not np.any(folds == inner_fold):
        raise ValueError(f"inner fold {inner_fold} has no images outside the outer fold")
    labels, ids = np.asarray(data.labels)[keep], np.asarray(data.index)[keep]
    return _Rows(data.images, keep), _Rows(data.masks, keep), labels, ids, folds


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
    parser.add_argument(
        "--roi-ssim-max",
        type=float,
        default=0.30,
        help="privacy constraint: worst training-fold slice's best-attack ROI SSIM (default 0.30)",
    )
    parser.add_argument(
        "--jigsaw-report",
        type=Path,
        default=Path("results/security/jigsaw/report.json"),
        help="pecbir jigsaw-report's report.json (the attacks the constraint reads)",
    )
    parser.add_argument(
        "--reuse",
        type=Path,
        default=None,
        help="an earlier results.json of this command: its units (same split, D, seeds) are "
        "used instead of recomputing them",
    )
    parser.add_argument(
        "--recompute",
        default="",
        help="candidates whose --reuse units are not taken (computed, or read from --cache)",
    )
    parser.add_argument("--data", default=None, help="dataset .h5 (default $PECBIR_DATA)")
    parser.add_argument("--cache", type=Path, default=Path("cache"))
    parser.add_argument("--out", type=Path, default=Path("results/pe-roi/selection"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--key-seed", type=int, default=2025)
    parser.add_argument("--jobs", type=int, default=2)
    parser.set_defaults(func=run)


def roi_privacy(report: dict, folds: np.ndarray, outer_fold: int) -> dict[str, dict[str, float]]:
    """Per scheme of a jigsaw report: the best attack's ROI SSIM on its training-fold slices.

    Parameters
    ----------
    report : dict
        `pecbir jigsaw-report`'s report.json.
    folds : numpy.ndarray
        Fold of every dataset row (the report names slices by row).
    outer_fold : int
        The query fold left out: its slices are dropped.

    Returns
    -------
    dict
        {explicit scheme name: {"median", "worst", "n_slices"}}, the best of `ATTACK_STAGES`
        per slice, then median and worst (max) over the slices.  A scheme and its "-in"
        twin share their cloud image, and the twin's mask is computable from the scheme's, so
        per slice both take the best attack on either (an attack on the twin is one on the
        scheme; taking it for the twin too is the conservative side).
    """
    from pecore.cipher_variants import any_scheme

    by_slice: dict[str, dict[int, float]] = {}
    for scheme, entries in report["per_slice"].items():
        by_slice[any_scheme(scheme).legacy_name] = {
            int(entry["id"]["row"]): max(
                entry[stage]["ssim_roi"] for stage in ATTACK_STAGES if stage in entry
            )
            for entry in entries
            if int(folds[entry["id"]["row"]]) != outer_fold
        }
    privacy = {}
    for name, rows in by_slice.items():
        twins = [other for other in by_slice if _image_name(other) == _image_name(name)]
        best = [max(by_slice[t].get(row, -1.0) for t in twins) for row in rows]
        if best:
            privacy[name] = {
                "median": float(np.median(best)),
                "worst": float(np.max(best)),
                "n_slices": len(best),
            }
    return privacy


def inherit_privacy(
    names: list[str], privacy: dict[str, dict[str, float]]
) -> dict[str, dict[str, float]]:
    """`privacy` for `names`, an unattacked "<base>-in|-rf[-p<P>]" taking its attacked base's
    numbers.

    pe-roi-t<b>[d|dn]-in[-p<P>] sends the cloud the same image as its base and, as its mask,
    the base's cloud mask restricted to the public tile interiors (for patches of side P);
    pe-roi-t<b>[d|dn]-rf[-p<P>] sends the base's image and mask unchanged (only the cloud's
    patch extraction differs): whatever an attacker does with either view can be done with
    the base's, so the base's attack numbers bound it.
    """
    out: dict[str, dict[str, float]] = {}
    for name in names:
        base = _image_name(name)
        if name in privacy:
            out[name] = privacy[name]
        elif base != name and base in privacy:
            out[name] = {**privacy[base], "attacked_as": base}
    return out


def _image_name(name: str) -> str:
    """The pe-roi scheme sending the same cloud image with the whole moved ROI as mask
    (`RoiCipher.image_name`); any other scheme's name as it is."""
    from pecore.cipher_roi import RoiCipher, is_roi_scheme

    return RoiCipher.from_name(name).image_name if is_roi_scheme(name) else name


def choose(
    rows: dict[str, float], privacy: dict[str, dict[str, float]], roi_ssim_max: float
) -> str | None:
    """The selection rule (see the module docstring); None when no candidate is private enough.

    Parameters
    ----------
    rows : dict
        {explicit scheme name: training-split mAP %}.
    privacy : dict
        `roi_privacy` of the candidates (a candidate missing from it is not eligible).
    roi_ssim_max : float
        The constraint on the worst slice's best-attack ROI SSIM.

    Returns
    -------
    str or None
        The chosen candidate's explicit name.
    """
    eligible = {
        name: value
        for name, value in rows.items()
        if name in privacy and privacy[name]["worst"] <= roi_ssim_max
    }
    if not eligible:
        return None
    return max(eligible, key=lambda name: (eligible[name], name))


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pecbir.experiment import (
        Condition,
        ExperimentConfig,
        cipher_images,
        condition_fold_config,
        condition_masks,
    )
    from pecore.cipher_roi import RoiCipher
    from pecore.datasets import default_data_path, load_figshare
    from pecore.model_selection import evaluate_fold, fold_seed

    start = time.perf_counter()
    names = [RoiCipher.from_name(c.strip()).name for c in args.candidates.split(",") if c.strip()]
    if not names:
        raise ValueError("no candidates")
    if not args.jigsaw_report.is_file():
        raise ValueError(
            f"--jigsaw-report {args.jigsaw_report}: no such file (pecbir jigsaw-report)"
        )
    data_path = Path(args.data) if args.data else default_data_path()
    data = load_figshare(data_path, cache_dir=args.cache)
    images, masks, labels, ids, folds = training_split(data, args.outer_fold, args.inner_fold)
    conditions = [Condition(n, "per-image") for n in names]
    explicit = {c.name: RoiCipher.from_name(c.scheme).legacy_name for c in conditions}
    recompute = {
        RoiCipher.from_name(c.strip()).legacy_name for c in args.recompute.split(",") if c.strip()
    }
    reused = {
        name: unit
        for name, unit in _reusable_units(args, len(folds)).items()
        if name not in recompute
    }
    results: dict[str, dict[str, object]] = {
        c.name: reused[explicit[c.name]] for c in conditions if explicit[c.name] in reused
    }
    todo = [c for c in conditions if c.name not in results]
    if todo:
        stacks = cipher_images(images, ids, todo, args.key_seed, args.cache, masks=masks)
        clouds = condition_masks(masks, ids, todo, args.key_seed, args.cache)
        config = ExperimentConfig(n_jobs=args.jobs)
        units = args.cache / "pe_roi_selection"
        units.mkdir(parents=True, exist_ok=True)
    for condition in todo:
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
                **condition_fold_config(config, condition).fold_params(),
                random_state=seed,
                rois=_Rows(cloud, np.arange(len(cloud))),
                progress=bar.update,
            )[args.dict_size]
        file.write_text(json.dumps(fresh))
        results[condition.name] = fresh
    # by the explicit spelling pe-roi-t<b>[d|dn]: "pe-roi" names the configuration chosen
    headline = {explicit[n]: 100.0 * float(r["by_dim"]["10"]["mAP"]) for n, r in results.items()}
    report = json.loads(args.jigsaw_report.read_text())
    privacy = inherit_privacy(
        list(headline), roi_privacy(report, np.asarray(data.folds), args.outer_fold)
    )
    chosen = choose(headline, privacy, args.roi_ssim_max)
    document = {
        "description": "pe-roi selection on training folds only: privacy constraint (worst "
        "training-fold slice's best-attack ROI SSIM), then the best mAP of the inner fold "
        "against the other training folds (per-image keys, CFML dim 10)",
        "command": "pecbir " + " ".join(sys.argv[1:]),
        "outer_fold_left_out": args.outer_fold,
        "inner_query_fold": args.inner_fold,
        "n_images": len(folds),
        "dictionary_size": args.dict_size,
        "roi_ssim_max": args.roi_ssim_max,
        "attack_stages": list(ATTACK_STAGES),
        "jigsaw_report": str(args.jigsaw_report),
        "jigsaw_report_commands": report.get("commands", [report.get("command")]),
        "seed": args.seed,
        "key_seed": args.key_seed,
        "map_percent": headline,
        "p10_percent": {
            explicit[n]: 100.0 * float(r["by_dim"]["10"]["P@10"]) for n, r in results.items()
        },
        "roi_privacy": privacy,
        "chosen": chosen,
        "reused_units_from": str(args.reuse) if reused else None,
        "reused_units": sorted(explicit[n] for n in results if explicit[n] in reused),
        "wall_time_s": time.perf_counter() - start,
        "units": {explicit[n]: r for n, r in results.items()},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(document, indent=1))
    lines = [
        f"# pe-roi selection (training folds of fold {args.outer_fold} only; inner query fold "
        f"{args.inner_fold}, D = {args.dict_size}, per-image keys, CFML dim 10)",
        "",
        "| candidate | tile | transforms | patches | P | best attack ROI SSIM, median / worst "
        "(training-fold slices) | meets ≤ "
        f"{args.roi_ssim_max:.2f} | mAP % | P@10 % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, value in headline.items():
        scheme = RoiCipher.from_name(name)
        held = privacy.get(name)
        attack = f"{held['median']:.2f} / {held['worst']:.2f}" if held else "not attacked"
        if held and "attacked_as" in held:
            attack += f" (as {held['attacked_as']}: same cloud image)"
        meets = "yes" if held and held["worst"] <= args.roi_ssim_max else "no"
        lines.append(
            f"| {name} | {scheme.tile} | {scheme.transforms} | {scheme.positions}"
            f"{', tile-reflected' if scheme.reflect else ''} | "
            f"{scheme.patch_size} | {attack} | "
            f"{meets} | {value:.2f} | {document['p10_percent'][name]:.2f} |"
        )
    n_slices = max((v["n_slices"] for v in privacy.values()), default=0)
    lines += [
        "",
        f"Rule: privacy first, as a hard constraint (the best of the {'/'.join(ATTACK_STAGES)} "
        f"attacks, per slice, on the {n_slices} attacked slices outside fold "
        f"{args.outer_fold}: worst slice ≤ {args.roi_ssim_max:.2f}), then the highest "
        f"training-split mAP. Chosen: **{chosen or 'none (no candidate meets the constraint)'}**.",
        "",
        f"Command: `{document['command']}`",
        "",
    ]
    (args.out / "selection.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0 if chosen else 1


def _reusable_units(args: argparse.Namespace, n_images: int) -> dict[str, dict[str, object]]:
    """Units of an earlier results.json (--reuse) made with this split, D and seeds."""
    if args.reuse is None:
        return {}
    previous = json.loads(args.reuse.read_text())
    same = {
        "outer_fold_left_out": args.outer_fold,
        "inner_query_fold": args.inner_fold,
        "n_images": n_images,
        "dictionary_size": args.dict_size,
        "seed": args.seed,
        "key_seed": args.key_seed,
    }
    differs = [key for key, value in same.items() if previous.get(key) != value]
    if differs:
        raise ValueError(f"--reuse {args.reuse} was made with other {', '.join(differs)}")
    return dict(previous["units"])
