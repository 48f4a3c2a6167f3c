"""`pecbir experiment`: Tables 1–2 of Ahmad et al. 2025 (retrieval on plain and cipher images).

Writes results/<run>/results.json, tables.md (Table 1 and Table 2 layout, mean ± std over folds)
and map_vs_d.png. Cipher images and finished (condition, fold, D) results are cached under
--cache, so the same command twice gives the same numbers and the second run is fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from pecore.cipher import SCHEMES

log = logging.getLogger(__name__)


def _int_list(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from exc


def _float_list(text: str) -> list[float]:
    try:
        values = [float(t) for t in text.split(",") if t.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values


def _str_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _aliases() -> list[str]:
    return [alias for scheme in SCHEMES.values() for alias in scheme.aliases]


def _is_scheme(name: str) -> bool:
    from pecore.cipher_variants import any_scheme

    try:
        any_scheme(name)
    except ValueError:
        return False
    return True


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "experiment",
        help="retrieval experiment: paper Tables 1-2 (mAP, P@5, P@10 over folds)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--run", default=None, help="run name: output goes to results/<run>/")
    parser.add_argument("--out", type=Path, default=None, help="output directory (overrides --run)")
    parser.add_argument(
        "--dict-sizes", type=_int_list, default=[16, 32, 64], help="GMM sizes D (default 16,32,64)"
    )
    parser.add_argument(
        "--conditions",
        type=_str_list,
        default=["non-secure", *SCHEMES],
        help=f"any of non-secure,{','.join(SCHEMES)} (or their aliases {','.join(_aliases())}), "
        "tile-scrambled variants <inner>-bs<b>, e.g. ours-bs32,ours-bs64, pe-roi "
        "(pecore.cipher_roi), and sealed (the owner featurises plain images, the cloud sees "
        "only Fisher vectors; key mode per-image whatever --key-modes says) (default: "
        "non-secure and every registered scheme)",
    )
    parser.add_argument(
        "--key-modes",
        type=_str_list,
        default=["same", "per-image"],
        help="same (the paper's key θ* for every image), per-image (keys derived from "
        "--key-seed; old spelling: different); default both",
    )
    parser.add_argument(
        "--query-folds",
        type=_int_list,
        default=[1, 2, 3, 4, 5],
        help="which folds to run as query folds (default 1,2,3,4,5)",
    )
    parser.add_argument(
        "--folds",
        dest="fold_file",
        default=None,
        help="CSV with columns index,fold (figshare file number -> fold); default: the "
        "reference split",
    )
    parser.add_argument(
        "--quick", action="store_true", help="fold 1, D=16, non-secure and ours (both key modes)"
    )
    parser.add_argument("--data", default=None, help="dataset .h5 (default $PECBIR_DATA)")
    parser.add_argument("--cache", type=Path, default=Path("cache"), help="cache directory")
    parser.add_argument("--seed", type=int, default=0, help="sampling / GMM seed")
    parser.add_argument("--key-seed", type=int, default=2025, help="master seed, per-image keys")
    parser.add_argument("--jobs", type=int, default=2, help="encoding threads")
    parser.add_argument("--n-train-patches", type=int, default=300_000)
    parser.add_argument(
        "--metric-lambdas",
        type=_float_list,
        default=[1.5e-4],
        help="CFML ridge values λ, scored on the same Fisher vectors; the first is the "
        "headline (tables.md's Table 1), every one is recorded (results.json "
        "summary_by_lambda, a λ table in tables.md) (default 1.5e-4, Cheng's value)",
    )
    parser.add_argument(
        "--variant-roi",
        choices=("cloud", "owner"),
        default="cloud",
        help="tile-scrambled variants: 'cloud' dilates the scrambled tumour mask (default); "
        "'owner' scrambles the ROI dilated on the plain image and uses it as it is",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pecbir.experiment import (
        SEALED,
        ExperimentConfig,
        all_conditions,
        markdown_tables,
        run_experiment,
        write_outputs,
    )
    from pecore.cipher_roi import is_roi_scheme
    from pecore.cipher_variants import any_scheme, is_variant_scheme
    from pecore.envelope import canonical_key_mode

    conditions = args.conditions
    sizes, folds, modes = args.dict_sizes, args.query_folds, args.key_modes
    if args.quick:
        conditions, sizes, folds = ["non-secure", "ours"], [16], [1]
    modes_free = ("non-secure", SEALED)  # conditions that are not a cipher scheme
    unknown = [c for c in conditions if c not in modes_free and not _is_scheme(c)]
    if unknown:
        raise ValueError(
            f"unknown condition(s) {unknown}; choose from non-secure, {SEALED}, "
            f"{', '.join(SCHEMES)}, a tile-scrambled variant '<inner>-bs<b>' (e.g. ours-bs32) "
            "or pe-roi"
        )
    schemes = list(dict.fromkeys(any_scheme(c).name for c in conditions if c not in modes_free))
    variants = [c for c in schemes if is_variant_scheme(c) or is_roi_scheme(c)]
    modes = list(dict.fromkeys(canonical_key_mode(m) for m in modes))
    if not sizes or any(s < 1 for s in sizes):
        raise ValueError(f"bad dictionary sizes {sizes}")
    run_name = args.run or ("quick" if args.quick else "experiment")
    out_dir = args.out or Path("results") / run_name
    config = ExperimentConfig(
        dictionary_sizes=tuple(sorted(set(sizes))),
        conditions=tuple(
            all_conditions(
                [c for c in SCHEMES if c in schemes] + variants,
                modes,
                "non-secure" in conditions,
                sealed=SEALED in conditions,
            )
        ),
        folds=tuple(folds),
        fold_file=args.fold_file,
        n_train_patches=args.n_train_patches,
        metric_lambda=args.metric_lambdas[0],
        extra_lambdas=tuple(args.metric_lambdas[1:]),
        seed=args.seed,
        key_seed=args.key_seed,
        n_jobs=args.jobs,
        variant_roi=args.variant_roi,
        data_path=args.data,
        cache_dir=str(args.cache),
        out_dir=str(out_dir),
    )
    if not config.conditions:
        raise ValueError("no conditions selected")
    results = run_experiment(config)
    results["command"] = "pecbir " + " ".join(sys.argv[1:])
    paths = write_outputs(results, out_dir)
    print(markdown_tables(results))
    for path in paths:
        print(f"wrote {path}")
    return 0
