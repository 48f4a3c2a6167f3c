"""`pecbir security-report`: attacks, cipher statistics and the privacy–utility frontier.

Runs the ciphertext-only attacks (leading-bit A/A′/B, median filters, clear-pixel
inpainting, the same-key shared-mask attack) and the same-key known-plaintext attack on
dataset images and on a natural test image, for every scheme of `pecore.cipher.SCHEMES` and the
tile-scrambled variants of `pecore.cipher_variants`, and the feature-inversion, membership and
re-identification attacks on the sealed mode's Fisher vectors (`pecore.feature_attacks`);
writes report.md, report.json and PNG figures (Fig. 6-style panels, SSIM heat maps, the
sealed reconstructions, the frontier with one point per mode) to --out.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "security-report",
        help="measure attacks and cipher statistics; write results/security/",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--images", type=int, default=8, help="dataset images attacked")
    parser.add_argument(
        "--mask-images", type=int, default=16, help="cipher images for the same-key mask estimate"
    )
    parser.add_argument(
        "--kpa-images", type=int, default=3, help="images decrypted by the known-plaintext attack"
    )
    parser.add_argument("--kpa-pairs", type=int, default=1, help="known plain/cipher pairs")
    parser.add_argument("--seed", type=int, default=0, help="image choice and master key seed")
    parser.add_argument(
        "--data", type=Path, default=None, help="dataset .h5 file (default: $PECBIR_DATA)"
    )
    parser.add_argument(
        "--experiment-results",
        type=Path,
        nargs="+",
        default=[],
        help="results.json files of the experiment runner; each condition's mAP comes from the "
        "file with the most folds, then the largest D (default: every results/*/results.json)",
    )
    parser.add_argument(
        "--no-sealed",
        dest="sealed",
        action="store_false",
        help="skip the sealed mode's attacks on Fisher vectors (they featurise the dataset)",
    )
    parser.add_argument(
        "--sealed-victims", type=int, default=64, help="stored slices the feature attacks invert"
    )
    parser.add_argument(
        "--sealed-dict-size", type=int, default=64, help="the sealed collection's GMM size D"
    )
    parser.add_argument(
        "--cache", type=Path, default=Path("cache"), help="cache of the decoded dataset"
    )
    parser.add_argument(
        "--refresh",
        action="store_true",
        help="rerun no cipher attack: update the report already in --out with the retrieval "
        "mAPs of --experiment-results and (unless --no-sealed) the sealed mode's attacks; "
        "rewrites report.md, report.json and frontier.png",
    )
    parser.add_argument(
        "--variants",
        default="ours-bs32,ours-bs64",
        help="comma-separated variant schemes '<inner>-bs<tile>' ('' for none)",
    )
    parser.add_argument("--natural", default="camera", help="skimage.data image name")
    parser.add_argument(
        "--jigsaw-report",
        type=Path,
        default=None,
        help="pecbir jigsaw-report's report.json (default results/security/jigsaw/report.json "
        "where it exists): adds pe-roi and the jigsaw attack to the frontier and report",
    )
    parser.add_argument(
        "--pe-roi-results",
        type=Path,
        default=None,
        help="results.json of a pe-roi experiment (default: every run under results/pe-roi/)",
    )
    parser.add_argument("--out", type=Path, default=Path("results/security"))
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pecbir.security import ReportConfig, refresh_report, run_report

    for name in ("images", "mask_images", "kpa_images", "kpa_pairs", "sealed_victims"):
        if getattr(args, name) < (1 if name in ("images", "sealed_victims") else 0):
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    config = ReportConfig(
        out_dir=args.out,
        n_images=args.images,
        n_mask_images=max(args.mask_images, 2),
        n_kpa_images=min(args.kpa_images, args.images),
        kpa_pairs=args.kpa_pairs,
        seed=args.seed,
        data_path=args.data,
        experiment_results=tuple(args.experiment_results),
        variants=tuple(v.strip() for v in args.variants.split(",") if v.strip()),
        natural_image=args.natural,
        sealed=args.sealed,
        sealed_victims=args.sealed_victims,
        sealed_dictionary_size=args.sealed_dict_size,
        cache_dir=args.cache,
        jigsaw_report=args.jigsaw_report,
        pe_roi_results=args.pe_roi_results,
    )
    if args.refresh:
        if not (args.out / "report.json").is_file():
            raise FileNotFoundError(f"no report to refresh: {args.out / 'report.json'}")
        document = refresh_report(config)
        print(f"updated {args.out / 'report.md'} and report.json")
        _print_frontier(document)
        return 0
    document = run_report(config)
    print(f"wrote {args.out / 'report.md'} and report.json ({document['seconds']:.0f} s)")
    _print_frontier(document)
    return 0


def _print_frontier(document: dict) -> None:
    for point in document["frontier"]:
        map_text = "n/a" if point["map"] is None else f"{point['map']:.2f}"
        print(
            f"{point['scheme']:>10} {point['mode']:>9}  best attack SSIM {point['best_ssim']:.3f}"
            f" ({point['best_attack']})  mAP {map_text}"
        )
