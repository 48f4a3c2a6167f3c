"""`pecbir jigsaw-report`: the jigsaw attack (`pecore.jigsaw`) on pe, the tile variants and pe-roi.

For a fixed, seeded sample of dataset slices and per-image keys (master key from --seed), every
scheme is attacked with the best pixel-level ciphertext-only reconstruction and, for tiled
schemes, the jigsaw solver; SSIM is measured on the full slice and inside the ROI (tumour mask
dilated by 24 px).  Two reference rows cost the attacker nothing: the all-black guess (what
any attacker scores on the full slice from the black background alone) and, for tiled schemes,
the stage-1 tiles at random places (chance level inside the ROI).  Writes report.json,
report.md and an example PNG of the best attack on pe-roi to --out.

--baselines adds (or refreshes) the no-ciphertext baselines of an existing report in --out
without rerunning any attack: the best guesses that never see a cipher, all-black and the mean
image of the data set's other slices (`no_cipher_baselines`), on the report's slices, and each
scheme's best attack's advantage over the better of them (`advantage_over_guessing`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

DEFAULT_SCHEMES = "ours,ours-bs32,ours-bs64,pe-roi-t32,pe-roi-t16,pe-roi"


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "jigsaw-report",
        help="jigsaw-solver attack on pe, tile variants and pe-roi (full slice and ROI SSIM)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--schemes", default=DEFAULT_SCHEMES)
    parser.add_argument("--images", type=int, default=20, help="slices attacked")
    parser.add_argument("--seed", type=int, default=0, help="slice choice and master key seed")
    parser.add_argument("--data", default=None, help="dataset .h5 (default $PECBIR_DATA)")
    parser.add_argument("--cache", type=Path, default=None, help="decoded-image cache directory")
    parser.add_argument("--out", type=Path, default=Path("results/security/jigsaw"))
    parser.add_argument(
        "--append",
        action="store_true",
        help="add --schemes to the report.json in --out (same seed and slices), keep the rest",
    )
    parser.add_argument(
        "--baselines",
        action="store_true",
        help="only add the no-ciphertext baselines (all-black, mean image) to the report in --out",
    )
    parser.set_defaults(func=run)


#: Guesses that see no cipher (the attacker's prior alone).
NO_CIPHER_GUESSES = ("all-black guess", "mean-image guess")
#: Stages of `pecore.jigsaw.attack_slice` that are attacks (the oracle uses the true keys).
ATTACK_STAGES = ("pixel", "jigsaw")


def no_cipher_baselines(data, rows: list[int]) -> dict[str, object]:
    """SSIM of the guesses that never see a cipher, per slice of `rows`.

    The mean image is the rounded pixel mean of every slice of the data set except the attacked
    ones: what an attacker who knows the population, not the image, would guess.

    Returns
    -------
    dict
        {"per_slice": [{guess: score_regions(...)} per row], "summary": {guess: {metric:
        median/worst/mean}}}.
    """
    from pecore.jigsaw import score_regions

    attacked = set(rows)
    total = np.zeros(np.asarray(data.images[0]).shape, dtype=np.float64)
    n = 0
    for row in range(len(data.labels)):
        if row not in attacked:
            total += np.asarray(data.images[row], dtype=np.float64)
            n += 1
    mean = np.rint(total / max(n, 1)).astype(np.uint8)
    per_slice = []
    for row in rows:
        plain = np.asarray(data.images[row])
        mask = np.asarray(data.masks[row])
        per_slice.append(
            {
                "all-black guess": score_regions(plain, np.zeros_like(plain), mask),
                "mean-image guess": score_regions(plain, mean, mask),
                "id": {"row": int(row), "index": int(data.index[row])},
            }
        )
    summary = {
        guess: {
            metric: _median_worst([r[guess][metric] for r in per_slice])
            for metric in per_slice[0][guess]
        }
        for guess in NO_CIPHER_GUESSES
    }
    return {"n_mean_slices": n, "per_slice": per_slice, "summary": summary}


def advantage_over_guessing(document: dict) -> dict[str, dict[str, dict[str, float]]]:
    """Per scheme and region: the best attack's SSIM minus the better no-cipher guess's, per
    slice, then median / worst (max) / mean over the slices."""
    guesses = document["no_cipher"]["per_slice"]
    out: dict[str, dict[str, dict[str, float]]] = {}
    for scheme, entries in document["per_slice"].items():
        out[scheme] = {}
        for metric in ("ssim_full", "ssim_roi"):
            gaps = []
            for entry, guess in zip(entries, guesses, strict=True):
                attack = max(entry[s][metric] for s in ATTACK_STAGES if s in entry)
                gaps.append(attack - max(guess[g][metric] for g in NO_CIPHER_GUESSES))
            out[scheme][metric] = _median_worst(gaps)
    return out


def _median_worst(values: list[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {
        "median": float(np.nanmedian(array)),
        "worst": float(np.nanmax(array)),
        "mean": float(np.nanmean(array)),
    }


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from pecore.cipher_variants import any_scheme
    from pecore.datasets import default_data_path, load_figshare
    from pecore.envelope import scenario_key_stream
    from pecore.jigsaw import attack_slice, score_regions
    from pecore.keys import MasterKey

    start = time.perf_counter()
    if args.baselines:
        return _add_baselines(args)
    if args.images < 1:
        raise ValueError(f"--images must be >= 1, got {args.images}")
    # pe-roi by its explicit spelling (pe-roi-t<b>[d|dn]): "pe-roi" names whichever was chosen
    schemes = [any_scheme(s.strip()).legacy_name for s in args.schemes.split(",") if s.strip()]
    data_path = Path(args.data) if args.data else default_data_path()
    data = load_figshare(data_path, cache_dir=args.cache)
    rng = np.random.default_rng(args.seed)
    chosen = np.sort(rng.choice(len(data.labels), size=args.images, replace=False))
    master = MasterKey.from_seed(args.seed)
    rows: dict[str, list[dict[str, dict[str, float]]]] = {s: [] for s in schemes}
    best: tuple[float, int, dict[str, np.ndarray]] | None = None
    with tqdm(total=len(chosen) * len(schemes), desc="jigsaw attacks", unit="attack") as bar:
        for row in chosen:
            plain = np.asarray(data.images[row])
            mask = np.asarray(data.masks[row])
            image_id = str(int(data.index[row]))
            stream = scenario_key_stream(
                "per-image", master=master, image_id=image_id, n_pixels=plain.size
            )
            for scheme in schemes:
                result = attack_slice(plain, mask, scheme=scheme, stream=stream, nonce=image_id)
                scores = dict(result.scores)
                scores["all-black guess"] = score_regions(plain, np.zeros_like(plain), mask)
                scores["id"] = {"row": int(row), "index": int(data.index[row])}
                rows[scheme].append(scores)
                if scheme == any_scheme("pe-roi").legacy_name and "jigsaw" in scores:
                    value = scores["jigsaw"]["ssim_roi"]
                    if best is None or value > best[0]:
                        best = (value, int(row), {"plain": plain, **result.images})
                bar.update(1)
    summary = {
        scheme: {
            stage: {
                metric: _median_worst([r[stage][metric] for r in entries])
                for metric in entries[0][stage]
            }
            for stage in entries[0]
            if stage != "id"
        }
        for scheme, entries in rows.items()
    }
    commands = ["pecbir " + " ".join(sys.argv[1:])]
    no_cipher = None
    previous_path = args.out / "report.json"
    if args.append and previous_path.is_file():
        previous = json.loads(previous_path.read_text())
        if previous["seed"] != args.seed or previous["rows"] != [int(r) for r in chosen]:
            raise ValueError(f"{previous_path} was made with another seed or other slices")
        rows = {**previous["per_slice"], **rows}
        summary = {**previous["summary"], **summary}
        commands = [*previous.get("commands", [previous["command"]]), *commands]
        no_cipher = previous.get("no_cipher")  # same slices: the guesses still hold
    document = {
        "description": "jigsaw attack (pecore.jigsaw): stage 1 = tile-wise clear-pixel "
        "inpainting, stage 2 = MGC + best buddies + Kruskal placement; per-image keys; "
        "median / worst (max) / mean over the slices",
        "command": commands[0],
        "commands": commands,
        "seed": args.seed,
        "rows": [int(r) for r in chosen],
        "summary": summary,
        "per_slice": rows,
        "seconds": time.perf_counter() - start,
    }
    if no_cipher is not None:
        document["no_cipher"] = no_cipher
        document["advantage_over_guessing"] = advantage_over_guessing(document)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(document, indent=1))
    (args.out / "report.md").write_text(markdown(document))
    if best is not None:
        _example_png(best[2], args.out / "pe_roi_best_attack.png", best[1], best[0])
    print(markdown(document))
    return 0


def markdown(document: dict[str, object]) -> str:
    """report.md: one table per scheme, median and worst (max) over the slices."""
    lines = [
        f"# Jigsaw attack: {len(document['rows'])} slices, per-image keys (seed "
        f"{document['seed']})",
        "",
        "Median / worst (max over slices). SSIM against the plain slice (best polarity); ROI ="
        " tumour mask dilated by 24 px. `pixel`: stage 1 as found (tiles scrambled); `jigsaw`:"
        " stage 2; `oracle`: stage-1 tiles put back with the true keys (the bound for any"
        " placement algorithm); `all-black guess` and `random placement`: what an attacker gets"
        " with no placement information.",
        "",
        "| scheme | stage | SSIM full | SSIM ROI | neighbour acc. | direct acc. |",
        "|---|---|---|---|---|---|",
    ]
    for scheme, stages in document["summary"].items():
        for stage, metrics in stages.items():
            neighbour = metrics.get("neighbour_accuracy")
            direct = metrics.get("direct_accuracy")
            lines.append(
                f"| {scheme} | {stage} | {metrics['ssim_full']['median']:.3f} / "
                f"{metrics['ssim_full']['worst']:.3f} | {metrics['ssim_roi']['median']:.3f} / "
                f"{metrics['ssim_roi']['worst']:.3f} | "
                + (f"{neighbour['median']:.2f} / {neighbour['worst']:.2f}" if neighbour else "")
                + " | "
                + (f"{direct['median']:.2f} / {direct['worst']:.2f}" if direct else "")
                + " |"
            )
    if "no_cipher" in document:
        lines += _baseline_markdown(document)
    commands = document.get("commands", [document["command"]])
    lines += ["", "Commands: " + ", ".join(f"`{c}`" for c in commands), ""]
    return "\n".join(lines)


def _add_baselines(args: argparse.Namespace) -> int:
    """--baselines: the no-cipher guesses on the slices of the report in --out."""
    from pecore.datasets import default_data_path, load_figshare

    path = args.out / "report.json"
    if not path.is_file():
        raise ValueError(f"--baselines: no report at {path} (run pecbir jigsaw-report first)")
    document = json.loads(path.read_text())
    data_path = Path(args.data) if args.data else default_data_path()
    data = load_figshare(data_path, cache_dir=args.cache)
    document["no_cipher"] = no_cipher_baselines(data, [int(r) for r in document["rows"]])
    document["no_cipher"]["command"] = "pecbir " + " ".join(sys.argv[1:])
    document["advantage_over_guessing"] = advantage_over_guessing(document)
    path.write_text(json.dumps(document, indent=1))
    (args.out / "report.md").write_text(markdown(document))
    print("\n".join(_baseline_markdown(document)))
    return 0


def _baseline_markdown(document: dict) -> list[str]:
    summary = document["no_cipher"]["summary"]
    lines = [
        "",
        "## No-ciphertext baselines and each attack's advantage over guessing",
        "",
        "What an attacker scores without any cipher: all black, and the mean image of the "
        f"{document['no_cipher']['n_mean_slices']} other slices of the data set (median / worst "
        "over the same slices).",
        "",
        "| guess | SSIM full | SSIM ROI |",
        "|---|---|---|",
    ]
    for guess, metrics in summary.items():
        lines.append(
            f"| {guess} | {metrics['ssim_full']['median']:.3f} / "
            f"{metrics['ssim_full']['worst']:.3f} | {metrics['ssim_roi']['median']:.3f} / "
            f"{metrics['ssim_roi']['worst']:.3f} |"
        )
    lines += [
        "",
        "Advantage = best attack (pixel or jigsaw stage) − the better guess, per slice; "
        "median / worst (max) over the slices. Near 0: the attack shows no more than guessing.",
        "",
        "| scheme | advantage SSIM full | advantage SSIM ROI |",
        "|---|---|---|",
    ]
    for scheme, by_metric in document["advantage_over_guessing"].items():
        full, roi = by_metric["ssim_full"], by_metric["ssim_roi"]
        lines.append(
            f"| {scheme} | {full['median']:+.3f} / {full['worst']:+.3f} | "
            f"{roi['median']:+.3f} / {roi['worst']:+.3f} |"
        )
    lines.append("")
    lines.append(f"Command: `{document['no_cipher']['command']}`")
    return lines


def _example_png(images: dict[str, np.ndarray], path: Path, row: int, value: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = ["plain", "cipher", "pixel", "jigsaw", "oracle"]
    titles = {
        "plain": f"plain slice (row {row})",
        "cipher": "pe-roi cipher (cloud's view)",
        "pixel": "stage 1: tile-wise inpainting",
        "jigsaw": f"stage 2: jigsaw, ROI SSIM {value:.2f}",
        "oracle": "bound: perfect placement",
    }
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.6))
    for ax, name in zip(axes, panels, strict=True):
        ax.imshow(images[name], cmap="gray", vmin=0, vmax=255)
        ax.set_title(titles[name], fontsize=9)
        ax.axis("off")
    fig.suptitle("Best jigsaw attack on pe-roi over the sample (highest ROI SSIM)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
