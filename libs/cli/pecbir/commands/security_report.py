"""`pecbir security-report`: attacks, cipher statistics and the privacy–utility frontier.

Runs the ciphertext-only attacks (leading-bit A/A′/B, median filters, clear-pixel
inpainting, the same-key shared-mask attack) and the same-key known-plaintext attack on
dataset images and on a natural test image, for every scheme of `pecore.cipher.SCHEMES` and the
tile-scrambled variants of `pecore.cipher_variants`; writes report.md, report.json and PNG
figures (Fig. 6-style panels, SSIM heat maps, the frontier) to --out.
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
        default=None,
        help="results.json of the experiment runner (default: newest results/*/results.json)",
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
        help="results.json of the pe-roi experiment (default results/pe-roi/results.json)",
    )
    parser.add_argument("--out", type=Path, default=Path("results/security"))
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pecbir.security import ReportConfig, run_report

    for name in ("images", "mask_images", "kpa_images", "kpa_pairs"):
        if getattr(args, name) < (1 if name == "images" else 0):
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    config = ReportConfig(
        out_dir=args.out,
        n_images=args.images,
        n_mask_images=max(args.mask_images, 2),
        n_kpa_images=min(args.kpa_images, args.images),
        kpa_pairs=args.kpa_pairs,
        seed=args.seed,
        data_path=args.data,
        experiment_results=args.experiment_results,
        variants=tuple(v.strip() for v in args.variants.split(",") if v.strip()),
        natural_image=args.natural,
        jigsaw_report=args.jigsaw_report,
        pe_roi_results=args.pe_roi_results,
    )
    document = run_report(config)
    print(f"wrote {args.out / 'report.md'} and report.json ({document['seconds']:.0f} s)")
    for point in document["frontier"]:
        map_text = "n/a" if point["map"] is None else f"{point['map']:.2f}"
        print(
            f"{point['scheme']:>10} {point['mode']:>9}  best COA SSIM {point['best_ssim']:.3f}"
            f" ({point['best_attack']})  mAP {map_text}"
        )
    return 0
