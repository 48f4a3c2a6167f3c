"""`pecbir lambda-select`: choose CFML's ridge λ per dictionary size on training folds only.

The protocol of `pecbir pe-roi-select`: the outer query fold (default 1) is left out entirely;
inside the other folds, one inner fold (default 2) queries the remaining training folds, with
per-image keys.  For every condition, seed and dictionary size D the Fisher vectors are
computed once and CFML is fitted at every λ of --metric-lambdas (`CFML.fit_path`: the Gram
matrix, its eigendecomposition and the scatter matrices are shared, only the small generalised
eigensolve is repeated).

The rule: per condition and D, the λ with the highest inner-fold mAP (CFML dim 10, mean over
--seeds); and one λ for every D, the highest mean over D.  A chosen λ that beats --baseline
(Cheng's 1.5e-4) by no more than --margin mAP points (the inner fold's seed noise) is reported
as not clearly better.  No number of the outer fold enters.  Writes results.json and
selection.md to --out; units are cached under --cache/lambda_selection.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
import zlib
from pathlib import Path

import numpy as np

from pecbir.commands.experiment import _float_list, _int_list, _str_list
from pecore.metric import CFML

BASELINE = CFML().reg  # Cheng's λ, the estimator's default
DEFAULT_LAMBDAS = f"{BASELINE},1e-3,1e-2,1e-1,1"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "lambda-select",
        help="choose CFML's ridge λ per D by retrieval on training folds only",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--conditions",
        type=_str_list,
        default=["pe-roi"],
        help="schemes, per-image keys (any `pecbir experiment` cipher condition; default pe-roi)",
    )
    parser.add_argument("--outer-fold", type=int, default=1, help="query fold left out entirely")
    parser.add_argument("--inner-fold", type=int, default=2, help="training fold used as queries")
    parser.add_argument("--dict-sizes", type=_int_list, default=[16, 32, 64])
    parser.add_argument(
        "--metric-lambdas",
        type=_float_list,
        default=_float_list(DEFAULT_LAMBDAS),
        help=f"CFML ridge values λ to compare (default {DEFAULT_LAMBDAS})",
    )
    parser.add_argument("--seeds", type=_int_list, default=[0], help="sampling/GMM seeds")
    parser.add_argument(
        "--baseline", type=float, default=BASELINE, help="the λ a choice is compared with"
    )
    parser.add_argument(
        "--margin",
        type=float,
        default=1.0,
        help="mAP points a chosen λ must beat --baseline by to count as clearly better "
        "(the inner fold's seed noise; default 1.0)",
    )
    parser.add_argument("--data", default=None, help="dataset .h5 (default $PECBIR_DATA)")
    parser.add_argument("--cache", type=Path, default=Path("cache"))
    parser.add_argument("--out", type=Path, default=Path("results/pe-roi/selection/lambda"))
    parser.add_argument("--key-seed", type=int, default=2025)
    parser.add_argument("--jobs", type=int, default=2)
    parser.set_defaults(func=run)


def choose_lambdas(
    table: dict[int, dict[float, float]], baseline: float, margin: float
) -> dict[str, object]:
    """The rule of the module docstring, on one condition's mean inner-fold mAPs.

    Parameters
    ----------
    table : dict
        {D: {λ: mean mAP %}}, every D with the same λ.
    baseline : float
        The λ a choice is compared with (must be in the table).
    margin : float
        mAP points a choice must gain over `baseline` to count as clearly better.

    Returns
    -------
    dict
        ``per_d``: {D: {"lambda", "map", "gain", "clear"}}; ``common``: the same for the one
        λ of the highest mean over D (its "map" and "gain" are means over D).  Ties go to
        the larger λ (the more regularised metric).
    """
    sizes = sorted(table)
    lams = sorted(table[sizes[0]])
    per_d: dict[int, dict[str, object]] = {}
    for size in sizes:
        best = max(lams, key=lambda lam: (table[size][lam], lam))
        gain = table[size][best] - table[size][baseline]
        per_d[size] = {
            "lambda": best,
            "map": table[size][best],
            "gain": gain,
            "clear": gain > margin,
        }
    means = {lam: float(np.mean([table[s][lam] for s in sizes])) for lam in lams}
    best = max(lams, key=lambda lam: (means[lam], lam))
    gain = means[best] - means[baseline]
    common = {"lambda": best, "map": means[best], "gain": gain, "clear": gain > margin}
    return {"per_d": per_d, "common": common}


def _unit_file(cache: Path, condition, fields: dict[str, object]) -> Path:
    digest = hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]
    return (
        cache
        / "lambda_selection"
        / (
            f"{condition.slug}_o{fields['outer']}_i{fields['inner']}_D{fields['D']}"
            f"_s{fields['seed']}_l{fields['lambda']}_{digest}.json"
        )
    )


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pecbir.commands.pe_roi_select import _Rows, training_split
    from pecbir.experiment import (
        ALGORITHM_VERSION,
        Condition,
        ExperimentConfig,
        cipher_images,
        condition_fold_config,
        condition_masks,
    )
    from pecore.datasets import default_data_path, load_figshare
    from pecore.model_selection import (
        evaluate_fold,
        fold_seed,
        lambda_key,
        unit_at_lambda,
    )
    from pecore.pipeline import dilated_rois

    start = time.perf_counter()
    lambdas = list(dict.fromkeys(float(v) for v in args.metric_lambdas))
    if args.baseline not in lambdas:
        lambdas.insert(0, float(args.baseline))
    sizes = sorted(set(args.dict_sizes))
    conditions = [Condition(c, "per-image") for c in args.conditions]
    if any(c.scheme is None or c.is_sealed for c in conditions):
        raise ValueError("lambda-select compares cipher conditions (per-image keys)")
    data_path = Path(args.data) if args.data else default_data_path()
    data = load_figshare(data_path, cache_dir=args.cache)
    images, masks, labels, ids, folds = training_split(data, args.outer_fold, args.inner_fold)
    (args.cache / "lambda_selection").mkdir(parents=True, exist_ok=True)
    units: dict[str, dict[int, dict[int, dict[float, dict[str, object]]]]] = {}
    for condition in conditions:
        config = condition_fold_config(ExperimentConfig(n_jobs=args.jobs), condition)
        params = {k: v for k, v in config.fold_params().items() if k != "n_jobs"}
        units[condition.name] = {}
        stack = cloud = rois = None
        for seed in args.seeds:
            files = {
                (size, lam): _unit_file(
                    args.cache,
                    condition,
                    {
                        **params,
                        "metric_lambda": lam,
                        "lambda": lambda_key(lam),
                        "condition": condition.seed_name,
                        "outer": args.outer_fold,
                        "inner": args.inner_fold,
                        "n_images": len(folds),
                        "D": size,
                        "seed": seed,
                        "key_seed": args.key_seed,
                        "algorithm_version": ALGORITHM_VERSION,
                    },
                )
                for size in sizes
                for lam in lambdas
            }
            found = {key: json.loads(f.read_text()) for key, f in files.items() if f.is_file()}
            missing = [s for s in sizes if any((s, lam) not in found for lam in lambdas)]
            if missing:
                if stack is None:
                    stack = cipher_images(
                        images, ids, [condition], args.key_seed, args.cache, masks=masks
                    )[condition.name]
                    cloud = condition_masks(masks, ids, [condition], args.key_seed, args.cache)[
                        condition.name
                    ]
                    rois = (
                        _Rows(cloud, np.arange(len(cloud)))
                        if config.radius == 0
                        else dilated_rois(cloud, config.radius)
                    )
                random_state = fold_seed(
                    [seed, args.inner_fold, zlib.crc32(condition.seed_name.encode())]
                )
                with tqdm(total=len(images), desc=f"{condition.name} s{seed}", unit="img") as bar:
                    fresh = evaluate_fold(
                        stack,
                        cloud,
                        labels,
                        folds,
                        query_fold=args.inner_fold,
                        dictionary_sizes=missing,
                        **config.fold_params(),
                        random_state=random_state,
                        rois=rois,
                        progress=bar.update,
                        extra_lambdas=lambdas,
                    )
                for size, unit in fresh.items():
                    for lam in lambdas:
                        if (size, lam) not in found:
                            found[size, lam] = unit_at_lambda(unit, lam)
                            files[size, lam].write_text(json.dumps(found[size, lam]))
            for (size, lam), unit in found.items():
                units[condition.name].setdefault(seed, {}).setdefault(size, {})[lam] = unit

    def score(unit: dict[str, object], metric: str = "mAP") -> float:
        return 100.0 * float(unit["by_dim"]["10"][metric])

    document: dict[str, object] = {
        "description": "CFML ridge λ chosen on training folds only: the inner fold queries the "
        "other training folds (outer fold left out), per-image keys, CFML dim 10, mean over "
        "seeds",
        "command": "pecbir " + " ".join(sys.argv[1:]),
        "outer_fold_left_out": args.outer_fold,
        "inner_query_fold": args.inner_fold,
        "n_images": len(folds),
        "dictionary_sizes": sizes,
        "metric_lambdas": lambdas,
        "seeds": list(args.seeds),
        "key_seed": args.key_seed,
        "baseline": args.baseline,
        "margin": args.margin,
        "conditions": {},
    }
    lines = [
        f"# CFML λ on training folds only (fold {args.outer_fold} left out; inner query fold "
        f"{args.inner_fold} against the other training folds; per-image keys; CFML dim 10; "
        f"mean ± std over seeds {', '.join(map(str, args.seeds))})",
        "",
    ]
    for condition in conditions:
        by_seed = units[condition.name]
        table: dict[int, dict[float, float]] = {}
        spread: dict[int, dict[float, float]] = {}
        for size in sizes:
            table[size], spread[size] = {}, {}
            for lam in lambdas:
                values = [score(by_seed[seed][size][lam]) for seed in args.seeds]
                table[size][lam], spread[size][lam] = float(np.mean(values)), float(np.std(values))
        choice = choose_lambdas(table, args.baseline, args.margin)
        document["conditions"][condition.name] = {
            "map_percent": {
                str(s): {lambda_key(lam): v for lam, v in row.items()} for s, row in table.items()
            },
            "map_std_over_seeds": {
                str(s): {lambda_key(lam): v for lam, v in row.items()} for s, row in spread.items()
            },
            "map_percent_per_seed": {
                str(seed): {
                    str(s): {lambda_key(lam): score(u) for lam, u in row.items()}
                    for s, row in by_size.items()
                }
                for seed, by_size in by_seed.items()
            },
            "p10_percent_per_seed": {
                str(seed): {
                    str(s): {lambda_key(lam): score(u, "P@10") for lam, u in row.items()}
                    for s, row in by_size.items()
                }
                for seed, by_size in by_seed.items()
            },
            "cfml_eigenvalues": {
                str(seed): {
                    str(s): {lambda_key(lam): u["cfml_eigenvalues"] for lam, u in row.items()}
                    for s, row in by_size.items()
                }
                for seed, by_size in by_seed.items()
            },
            "fv_dim": {str(s): by_seed[args.seeds[0]][s][lambdas[0]]["fv_dim"] for s in sizes},
            "chosen": {
                "per_d": {str(s): c for s, c in choice["per_d"].items()},
                "common": choice["common"],
            },
        }
        lines += [
            f"## {condition.name}",
            "",
            "| D | FV dim | " + " | ".join(f"λ = {lam:g}" for lam in lambdas) + " | best λ |",
            "|---|---|" + "---|" * len(lambdas) + "---|",
        ]
        for size in sizes:
            cells = [
                f"{table[size][lam]:.2f}"
                + (f" ± {spread[size][lam]:.2f}" if len(args.seeds) > 1 else "")
                for lam in lambdas
            ]
            chosen = choice["per_d"][size]
            fv_dim = document["conditions"][condition.name]["fv_dim"][str(size)]
            lines.append(
                f"| {size} | {fv_dim} | "
                + " | ".join(cells)
                + f" | {chosen['lambda']:g} ({chosen['gain']:+.2f}"
                f"{', clear' if chosen['clear'] else ''}) |"
            )
        common = choice["common"]
        lines += [
            "",
            f"One λ for every D: **{common['lambda']:g}** (mean over D {common['map']:.2f}, "
            f"{common['gain']:+.2f} against λ = {args.baseline:g}; "
            f"{'clearly' if common['clear'] else 'not clearly'} better by the "
            f"{args.margin:g}-point margin).",
            "",
        ]
    document["wall_time_s"] = time.perf_counter() - start
    lines += [f"Command: `{document['command']}`", ""]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(document, indent=1))
    (args.out / "selection.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0
