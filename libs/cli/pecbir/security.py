"""The security report: attacks and cipher statistics for every scheme, measured on real images.

Used by `pecbir security-report` (pecbir.commands.security_report).  Writes report.md,
report.json and PNG figures into one directory.  Nothing here asserts a security property;
every number comes from running an attack or a statistic on cipher images, or, for the
sealed mode, on the Fisher vectors the cloud holds (`pecore.feature_attacks`).
"""

from __future__ import annotations

import io
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pecbir.experiment import SEALED, read_headline_maps
from pecore import attacks
from pecore.attack_suite import AttackImages, attack_scheme, cipher_statistics
from pecore.cipher import SCHEMES
from pecore.cipher_variants import VARIANT_SCHEMES, TileScrambled, any_scheme
from pecore.datasets import decode_webp, default_data_path
from pecore.envelope import KEY_MODES, canonical_key_mode
from pecore.keys import MasterKey

#: The paper's display labels of the key modes ("same": θ* for every image, see
#: `pecore.envelope.scenario_key_stream`).
MODE_LABEL = {"same": "same key (k_i = k_j)", "per-image": "different keys (k_i ≠ k_j)"}


def scheme_label(scheme: str) -> str:
    """The registry's display label; a variant's also names the variant ("… (ours-bs64)")."""
    if scheme == SEALED:
        return "Sealed (owner-side FV)"
    resolved = any_scheme(scheme)
    if isinstance(resolved, TileScrambled):
        return f"{resolved.label} ({resolved.name})"
    return resolved.label


@dataclass
class ReportConfig:
    out_dir: Path = Path("results/security")
    n_images: int = 8
    n_mask_images: int = 16
    n_kpa_images: int = 3
    kpa_pairs: int = 1
    seed: int = 0
    data_path: Path | None = None
    experiment_results: tuple[Path, ...] = ()
    variants: tuple[str, ...] = VARIANT_SCHEMES
    natural_image: str = "camera"
    #: The sealed mode's feature-inversion / membership attacks (`pecore.feature_attacks`).
    sealed: bool = True
    sealed_victims: int = 64
    sealed_dictionary_size: int = 64
    #: Where the decoded dataset is cached (`pecore.datasets.load_figshare`).
    cache_dir: Path | None = Path("cache")
    #: `pecbir jigsaw-report`'s report.json (pe-roi and the jigsaw attack); default
    #: `DEFAULT_JIGSAW_REPORT` where it exists.
    jigsaw_report: Path | None = None
    #: `pecbir experiment` results.json holding the pe-roi conditions.
    pe_roi_results: Path | None = None


DEFAULT_JIGSAW_REPORT = Path("results/security/jigsaw/report.json")


# --------------------------------------------------------------------------- data
def load_image_set(config: ReportConfig) -> AttackImages:
    """Pick natively 512×512 rows with a seeded generator and decode only those."""
    import h5py

    path = config.data_path or default_data_path()
    if not Path(path).is_file():
        raise FileNotFoundError(f"dataset file not found at {path}; set PECBIR_DATA or pass --data")
    with h5py.File(path, "r") as handle:
        native = handle["native_size"][:]
        index = handle["index"][:]
        rows = np.flatnonzero((native == 512).all(axis=1))
        rng = np.random.default_rng(config.seed)
        n_total = max(config.n_images, config.n_mask_images) + config.kpa_pairs
        if n_total > rows.size:
            raise ValueError(f"asked for {n_total} images, the dataset has {rows.size}")
        chosen = rng.choice(rows, size=n_total, replace=False)
        blobs = handle["images_webp"]
        images = np.stack(
            [decode_webp(blobs[int(r)]) for r in tqdm(chosen, desc="decode images", leave=False)]
        )
    n_main = max(config.n_images, config.n_mask_images)
    ids = [f"figshare-{int(index[r])}" for r in chosen]
    return AttackImages(
        eval_images=images[: config.n_images],
        eval_ids=ids[: config.n_images],
        mask_images=images[: config.n_mask_images],
        known_images=images[n_main:],
        known_ids=ids[n_main:],
        source=f"{path} (rows chosen with seed {config.seed})",
    )


def natural_image(name: str) -> np.ndarray:
    """A grey test image that ships with scikit-image (no download)."""
    from skimage import color, data, util

    image = getattr(data, name)()
    if image.ndim == 3:
        image = util.img_as_ubyte(color.rgb2gray(image[..., :3]))
    return np.ascontiguousarray(image.astype(np.uint8))


# --------------------------------------------------------------------------- attacks
def run_attacks(
    config: ReportConfig,
    images: AttackImages,
    master: MasterKey,
    schemes: list[str],
    progress: tqdm,
    mask_cache: dict[str, attacks.SharedMaskEstimator],
) -> tuple[dict, dict]:
    """`pecore.attack_suite.attack_scheme` for every scheme and key mode, with progress.

    Returns (results, examples): examples holds the first image's attack outputs per key mode
    and scheme, for the figures.
    """
    results: dict[str, dict] = {}
    examples: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for scheme in schemes:
        results[scheme] = {}
        for mode in KEY_MODES:
            progress.set_postfix_str(f"{scheme} / {mode} key")
            scores, example = attack_scheme(
                scheme=scheme,
                key_mode=mode,
                images=images,
                master=master,
                kpa_pairs=config.kpa_pairs,
                n_kpa_images=config.n_kpa_images,
                mask_cache=mask_cache,
            )
            results[scheme][mode] = scores
            examples.setdefault(mode, {})[scheme] = example
            progress.update(1)
    return results, examples


def default_experiment_results() -> list[Path]:
    """Every results/*/results.json under the working directory (`read_headline_maps` picks)."""
    paths = sorted(Path("results").glob("*/results.json"))
    # results/pe-roi holds only the pe-roi conditions (read by `pe_roi_frontier`)
    return [p for p in paths if p.parent.name not in ("security", "pe-roi")]


def run_sealed_attacks(config: ReportConfig) -> tuple[dict, dict[str, np.ndarray]]:
    """`pecore.feature_attacks.sealed_attack_suite` on the dataset, with a progress bar.

    The scores and example arrays are cached under `config.cache_dir` (keyed by the dataset
    file, the suite's version and settings), so that a rerun of the report reuses them.
    """
    import hashlib

    from pecore.datasets import load_figshare
    from pecore.feature_attacks import SUITE_VERSION, sealed_attack_suite

    path = Path(config.data_path or default_data_path())
    stat = path.stat()
    settings = {
        "data": f"{path.name}:{stat.st_size}",
        "suite_version": SUITE_VERSION,
        "dictionary_size": config.sealed_dictionary_size,
        "n_victims": config.sealed_victims,
        "seed": config.seed,
    }
    key = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    cached = None if config.cache_dir is None else Path(config.cache_dir) / "sealed_attacks" / key
    if cached is not None and cached.with_suffix(".npz").is_file():
        examples = dict(np.load(cached.with_suffix(".npz"), allow_pickle=False))
        return json.loads(cached.with_suffix(".json").read_text()), examples
    data = load_figshare(path, cache_dir=config.cache_dir)
    bars: dict[str, tqdm] = {}

    def progress(stage: str, n: int) -> None:
        if stage not in bars:
            bars[stage] = tqdm(total=len(data), desc=f"sealed: {stage}", unit="img", leave=False)
        bars[stage].update(n)

    document, examples = sealed_attack_suite(
        np.asarray(data.images),
        data.masks,
        data.pids,
        data.folds,
        dictionary_size=config.sealed_dictionary_size,
        n_victims=config.sealed_victims,
        seed=config.seed,
        progress=progress,
    )
    for bar in bars.values():
        bar.close()
    document["setting"]["victim_ids"] = [
        f"figshare-{int(data.index[i])}" for i in document["setting"]["victims"]
    ]
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        cached.with_suffix(".json").write_text(json.dumps(document))
        np.savez(cached.with_suffix(".npz"), **examples)  # written last: marks the entry whole
    return document, examples


def best_sealed_attack(sealed: dict) -> tuple[str, dict]:
    """The feature attack whose full-slice reconstructions score the highest mean SSIM."""
    attacks_ = sealed["attacks"]
    name = max(attacks_, key=lambda n: attacks_[n]["slice"]["ssim"]["mean"])
    return name, attacks_[name]


# --------------------------------------------------------------------------- figures
def _imshow_grid(path: Path, rows: list[tuple[str, list[tuple[str, np.ndarray | None]]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(rows), max(len(r[1]) for r in rows)
    figure, axes = plt.subplots(n_rows, n_cols, figsize=(2.1 * n_cols, 2.25 * n_rows))
    axes = np.atleast_2d(axes)
    for r, (row_label, panels) in enumerate(rows):
        for c in range(n_cols):
            axis = axes[r, c]
            axis.set_xticks([])
            axis.set_yticks([])
            if c >= len(panels) or panels[c][1] is None:
                axis.axis("off")
                continue
            title, image = panels[c]
            axis.imshow(image, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
            axis.set_title(title, fontsize=7)
            if c == 0:
                axis.set_ylabel(row_label, fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, dpi=100)
    plt.close(figure)
    _save_grey_png(buffer, path)


def _save_grey_png(buffer: io.BytesIO, path: Path) -> None:
    """The panels are grey images: one 8-bit channel instead of RGBA keeps the PNG ~4× smaller."""
    from PIL import Image

    buffer.seek(0)
    Image.open(buffer).convert("L").save(path, optimize=True)


def fig6(
    path: Path,
    plain: np.ndarray,
    outputs: dict[str, dict[str, np.ndarray]],
    columns: list[str],
    title_scores: Callable[[np.ndarray], str],
) -> None:
    rows = []
    for scheme, images in outputs.items():
        panels: list[tuple[str, np.ndarray | None]] = [("plain", plain)]
        for column in columns:
            image = images.get(column)
            label = column if image is None else f"{column}\n{title_scores(image)}"
            panels.append((label, image))
        rows.append((scheme_label(scheme).split(" (")[0], panels))
    _imshow_grid(path, rows)


def frontier_plot(path: Path, points: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.4))
    have_map = [p for p in points if p["map"] is not None]
    markers = {"same": "o", "per-image": "s", SEALED: "*"}
    if have_map:
        for point in have_map:
            jigsaw = point.get("source") == "jigsaw-report"
            marker = (
                "D" if jigsaw else markers[SEALED if point["scheme"] == SEALED else point["mode"]]
            )
            axis.scatter(point["best_ssim"], point["map"], marker=marker, s=50)
            label = point["scheme"] if jigsaw else scheme_label(point["scheme"]).split(" (")[0]
            axis.annotate(
                f"{label}, {point['mode']}"
                + (f" (ROI {point['best_ssim_roi']:.2f})" if jigsaw else ""),
                (point["best_ssim"], point["map"]),
                fontsize=7,
                xytext=(4, 3),
                textcoords="offset points",
            )
        axis.set_ylabel("retrieval mAP (%)")
        axis.set_xlabel(
            "best attack without keys: mean SSIM to plain, full slice (lower = more private)"
            "\n◆ pe-roi: jigsaw attack report, ROI SSIM in brackets"
        )
        axis.set_title("privacy–utility frontier (dataset images)")
    else:
        labels = [f"{p['scheme']}\n{p['mode']}" for p in points]
        axis.bar(range(len(points)), [p["best_ssim"] for p in points], color="tab:gray")
        axis.set_xticks(range(len(points)), labels, fontsize=6, rotation=90)
        axis.set_ylabel("best attack SSIM (no keys)")
        axis.set_title("privacy side only: retrieval mAP not available")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def sealed_figure(path: Path, examples: dict[str, np.ndarray]) -> None:
    """The first victim and each feature attack's reconstruction (slice row, ROI-crop row)."""
    plain = examples["plain"]
    names = [n for n in examples if n not in ("plain", "roi", "ridge ROI crop")]
    slices: list[tuple[str, np.ndarray | None]] = [("plain slice", plain)]
    for name in names:
        s = attacks.score(plain, examples[name])
        slices.append((f"{name}\nSSIM {s['ssim']:.2f}  PSNR {s['psnr']:.1f}", examples[name]))
    roi = np.clip(np.rint(examples["roi"]), 0, 255).astype(np.uint8)
    crop = examples["ridge ROI crop"]
    s = attacks.score(roi, crop)
    crops: list[tuple[str, np.ndarray | None]] = [
        ("plain ROI crop", roi),
        (f"ridge ROI crop\nSSIM {s['ssim']:.2f}  PSNR {s['psnr']:.1f}", crop),
    ]
    _imshow_grid(path, [("sealed: from the vector", slices), ("ROI", crops)])


def ssim_heatmap(path: Path, results: dict, mode: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    schemes = list(results)
    names = sorted({name for s in schemes for name in results[s][mode]}, key=_attack_order)
    grid = np.full((len(names), len(schemes)), np.nan)
    for j, scheme in enumerate(schemes):
        for i, name in enumerate(names):
            if name in results[scheme][mode]:
                grid[i, j] = results[scheme][mode][name]["ssim"]["mean"]
    figure, axis = plt.subplots(figsize=(1.5 + 1.2 * len(schemes), 0.9 + 0.42 * len(names)))
    image = axis.imshow(grid, cmap="magma", vmin=0, vmax=1, aspect="auto")
    axis.set_xticks(range(len(schemes)), [s for s in schemes], fontsize=8)
    axis.set_yticks(range(len(names)), names, fontsize=7)
    for i in range(len(names)):
        for j in range(len(schemes)):
            if not np.isnan(grid[i, j]):
                colour = "white" if grid[i, j] < 0.6 else "black"
                axis.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", fontsize=7,
                          color=colour)  # fmt: skip
    axis.set_title(f"mean SSIM of attack output vs plain — {MODE_LABEL[mode]}", fontsize=9)
    figure.colorbar(image, ax=axis, fraction=0.04)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


_ATTACK_ORDER = (
    "cipher image",
    "leading-bit A",
    "leading-bit A′",
    "leading-bit B",
    "median 3",
    "median 5",
    "leading-bit B +",
    "clear-pixel",
    "shared-mask",
    "tile-wise",
    "known-plaintext",
)


def _attack_order(name: str) -> tuple[int, str]:
    """Table order: by the longest listed prefix of the attack name, unknown names last."""
    matches = [(len(p), rank) for rank, p in enumerate(_ATTACK_ORDER) if name.startswith(p)]
    return (max(matches)[1] if matches else len(_ATTACK_ORDER), name)


# --------------------------------------------------------------------------- report
def best_ciphertext_only(mode_results: dict[str, dict]) -> tuple[str, dict]:
    candidates = {
        name: r
        for name, r in mode_results.items()
        if r["threat"].startswith("ciphertext-only") and name != "cipher image (no attack)"
    }
    name = max(candidates, key=lambda n: candidates[n]["ssim"]["mean"])
    return name, candidates[name]


def frontier_points(
    results: dict, sealed: dict | None, retrieval: dict[tuple[str, str], float]
) -> list[dict]:
    """One point per scheme and key mode (best ciphertext-only attack), and one for sealed."""
    frontier = []
    for scheme, by_mode in results.items():
        for mode in KEY_MODES:
            name, best = best_ciphertext_only(by_mode[mode])
            kpa = {n: r for n, r in by_mode[mode].items() if n.startswith("known")}
            frontier.append(
                {
                    "scheme": scheme,
                    "mode": mode,
                    "best_attack": name,
                    "best_ssim": best["ssim"]["mean"],
                    "best_psnr": best["psnr"]["mean"],
                    "known_plaintext_ssim": (
                        next(iter(kpa.values()))["ssim"]["mean"] if kpa else None
                    ),
                    "map": retrieval.get((scheme, mode)),
                }
            )
    if sealed is not None:
        name, best = best_sealed_attack(sealed)
        frontier.append(
            {
                "scheme": SEALED,
                "mode": "per-image",
                "best_attack": f"{name} (on the Fisher vectors)",
                "best_ssim": best["slice"]["ssim"]["mean"],
                "best_psnr": best["slice"]["psnr"]["mean"],
                "known_plaintext_ssim": None,
                "map": retrieval.get((SEALED, "per-image")),
            }
        )
    return frontier


def refresh_report(config: ReportConfig) -> dict:
    """Update the report in `config.out_dir` without rerunning the cipher attacks.

    Re-reads the frontier's retrieval mAPs from `config.experiment_results` (default: every
    results/*/results.json) and, with `config.sealed`, adds the sealed mode's attacks
    (`run_sealed_attacks`, cached) and their figure; rewrites report.json, report.md and
    frontier.png.  A report written before the scheme and key-mode renames ("25",
    "different") is read in today's names.
    """
    out_dir = Path(config.out_dir)
    document = _current_names(json.loads((out_dir / "report.json").read_text()))
    if config.sealed:
        sealed, examples = run_sealed_attacks(config)
        document["attacks_sealed"] = sealed
        sealed_figure(out_dir / "sealed_inversion.png", examples)
        document["figures"]["sealed"] = "sealed_inversion.png"
    paths = list(config.experiment_results) or default_experiment_results()
    retrieval, document["retrieval_source"] = read_headline_maps(paths)
    document["frontier"] = frontier_points(
        document["attacks_dataset"], document.get("attacks_sealed"), retrieval
    )
    jigsaw_path, jigsaw = read_jigsaw_report(config)
    if jigsaw is not None:
        document["frontier"] += pe_roi_points(config, jigsaw, retrieval)
        document["jigsaw"] = {"source": str(jigsaw_path), **jigsaw["summary"]}
        document["jigsaw_no_cipher"] = jigsaw_no_cipher(jigsaw)
    document["plain_map"] = retrieval.get(("plain", "same"))
    document["config"]["experiment_results"] = [str(p) for p in paths]
    frontier_plot(out_dir / "frontier.png", document["frontier"])
    (out_dir / "report.json").write_text(json.dumps(document, indent=2, ensure_ascii=False))
    (out_dir / "report.md").write_text(render_markdown(document, list(document["attacks_dataset"])))
    return document


def _current_names(document: dict) -> dict:
    """`document` with schemes and key modes in today's names ("25" → "np", "different" →
    "per-image"), as `render_markdown` reads them."""

    def mode(name: str) -> str:
        try:
            return canonical_key_mode(name)
        except ValueError:  # not a key mode: kept as it is
            return name

    for key in ("attacks_dataset", "attacks_natural"):
        document[key] = {
            any_scheme(scheme).name: {mode(m): r for m, r in by_mode.items()}
            for scheme, by_mode in document[key].items()
        }
    for key in ("statistics_dataset", "statistics_natural"):
        document[key] = {
            (name if name in _STATISTICS_ENTRIES else any_scheme(name).name): value
            for name, value in document[key].items()
        }
    document["figures"] = {
        "_".join([*name.split("_")[:-1], mode(name.split("_")[-1])]): file
        for name, file in document["figures"].items()
    }
    return document


#: Entries of a report's statistics that are not schemes.
_STATISTICS_ENTRIES = ("plain", "key_streams", "uniform_reference")


def run_report(config: ReportConfig) -> dict:
    """Run everything, write report.md / report.json / figures, return the JSON document."""
    started = time.perf_counter()
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    schemes = [*SCHEMES, *(any_scheme(v).name for v in config.variants)]
    images = load_image_set(config)
    natural = natural_image(config.natural_image)
    master = MasterKey.from_seed(config.seed)
    total_steps = 2 * len(schemes) * 2 + 2 * len(schemes)
    with tqdm(total=total_steps, desc="security report", unit="step") as progress:
        mask_cache: dict[str, attacks.SharedMaskEstimator] = {}
        results, examples = run_attacks(config, images, master, schemes, progress, mask_cache)
        natural_set = AttackImages(
            eval_images=natural[None],
            eval_ids=["natural"],
            mask_images=images.mask_images,
            known_images=images.known_images,
            known_ids=images.known_ids,
            source=f"skimage.data.{config.natural_image}()",
        )
        natural_config = ReportConfig(**{**asdict(config), "n_kpa_images": 1})
        natural_results, natural_examples = run_attacks(
            natural_config, natural_set, master, schemes, progress, mask_cache
        )

        def scheme_done(scheme: str) -> None:
            progress.set_postfix_str(f"statistics {scheme}")
            progress.update(1)

        statistics = cipher_statistics(
            images.eval_images, ids=images.eval_ids, schemes=schemes, on_scheme=scheme_done
        )
        natural_statistics = cipher_statistics(
            natural[None], ids=["natural"], schemes=schemes, on_scheme=scheme_done
        )
    sealed, sealed_examples = run_sealed_attacks(config) if config.sealed else (None, {})

    experiment_paths = list(config.experiment_results) or default_experiment_results()
    retrieval, retrieval_source = read_headline_maps(experiment_paths)
    frontier = frontier_points(results, sealed, retrieval)
    plain_map = retrieval.get(("plain", "same"))
    jigsaw_path, jigsaw = read_jigsaw_report(config)
    if jigsaw is not None:
        frontier += pe_roi_points(config, jigsaw, retrieval)

    def fig_scores(reference: np.ndarray) -> Callable[[np.ndarray], str]:
        def text(image: np.ndarray) -> str:
            s = attacks.score(reference, image)
            return f"SSIM {s['ssim']:.2f}  PSNR {s['psnr']:.1f}"

        return text

    columns = [
        "cipher",
        "leading-bit B",
        "median 5×5",
        "clear-pixel inpainting",
        "shared-mask inpainting",
        "known-plaintext (1 pair)",
    ]
    figures = {}
    for mode in KEY_MODES:
        name = f"fig6_natural_{mode}_key.png"
        fig6(
            out_dir / name,
            natural,
            natural_examples[mode],
            columns,
            fig_scores(natural),
        )
        figures[f"natural_{mode}"] = name
        name = f"fig6_mri_{mode}_key.png"
        fig6(
            out_dir / name,
            images.eval_images[0],
            examples[mode],
            columns,
            fig_scores(images.eval_images[0]),
        )
        figures[f"mri_{mode}"] = name
        name = f"attack_ssim_{mode}_key.png"
        ssim_heatmap(out_dir / name, results, mode)
        figures[f"heatmap_{mode}"] = name
    frontier_plot(out_dir / "frontier.png", frontier)
    figures["frontier"] = "frontier.png"
    if sealed is not None:
        sealed_figure(out_dir / "sealed_inversion.png", sealed_examples)
        figures["sealed"] = "sealed_inversion.png"

    document = {
        "config": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
            "experiment_results": [str(p) for p in experiment_paths],
            "cache_dir": None if config.cache_dir is None else str(config.cache_dir),
        },
        "environment": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "machine": platform.machine(),
            "cpu_count": os.cpu_count(),
        },
        "data": {
            "dataset": images.source,
            "eval_ids": images.eval_ids,
            "known_plaintext_ids": images.known_ids[: config.kpa_pairs],
            "natural_image": f"skimage.data.{config.natural_image}()",
        },
        "attacks_dataset": results,
        "attacks_natural": natural_results,
        "statistics_dataset": statistics,
        "statistics_natural": natural_statistics,
        "attacks_sealed": sealed,
        "frontier": frontier,
        "jigsaw": None if jigsaw is None else {"source": str(jigsaw_path), **jigsaw["summary"]},
        "jigsaw_no_cipher": None if jigsaw is None else jigsaw_no_cipher(jigsaw),
        "retrieval_source": retrieval_source,
        "plain_map": plain_map,
        "figures": figures,
        "seconds": time.perf_counter() - started,
    }
    (out_dir / "report.json").write_text(json.dumps(document, indent=2, ensure_ascii=False))
    (out_dir / "report.md").write_text(render_markdown(document, schemes))
    return document


# --------------------------------------------------------------------------- markdown
def _fmt(summary: dict | None, digits: int = 3) -> str:
    if summary is None:
        return "–"
    return f"{summary['mean']:.{digits}f} ± {summary['std']:.{digits}f}"


def render_markdown(document: dict, schemes: list[str]) -> str:
    config = document["config"]
    lines = [
        "# Security report: attacks on the perceptual encryptions",
        "",
        "Generated by `pecbir security-report`; every number below is measured by running the",
        "attack or statistic (report.json has all of them, including std/min/max).",
        "",
        f"- Dataset images: {len(document['data']['eval_ids'])} (512×512, seed "
        f"{config['seed']}; {document['data']['dataset']}); same-key mask estimate from "
        f"{config['n_mask_images']} cipher images; known-plaintext attack: "
        f"{config['kpa_pairs']} known pair(s), scored on {config['n_kpa_images']} images.",
        f"- Natural image: {document['data']['natural_image']}.",
        "- Same key: the paper's θ* (`PAPER_KEY`) for every image.  Different keys (key mode "
        "per-image): `derive_image_key(MasterKey.from_seed(seed), image_id, N)`.",
        "- SSIM/PSNR (skimage, data range 255) against the plain image; the better of the two "
        "polarities (plain, 255 − plain) is kept.  Entries are mean ± std over images.",
        f"- Run time: {document['seconds']:.0f} s.",
        "",
    ]
    for title, key in (("Dataset images", "attacks_dataset"), ("Natural image", "attacks_natural")):
        for mode in KEY_MODES:
            lines += [f"## Attacks — {title}, {MODE_LABEL[mode]}", ""]
            names = sorted({n for s in schemes for n in document[key][s][mode]}, key=_attack_order)
            header = "| attack | " + " | ".join(s for s in schemes) + " |"
            lines += [header, "|" + "---|" * (len(schemes) + 1)]
            for metric in ("ssim", "psnr"):
                for name in names:
                    cells = []
                    for scheme in schemes:
                        entry = document[key][scheme][mode].get(name)
                        digits = 3 if metric == "ssim" else 1
                        if entry is None:
                            cells.append("–")
                        elif len(document["data"]["eval_ids"]) == 1 or key == "attacks_natural":
                            cells.append(f"{entry[metric]['mean']:.{digits}f}")
                        else:
                            cells.append(_fmt(entry[metric], digits))
                    lines.append(f"| {metric.upper()}: {name} | " + " | ".join(cells) + " |")
            lines.append("")
            folded_rows = []
            for name in names:
                if not name.startswith("leading-bit A"):
                    continue
                cells = [
                    f"{document[key][s][mode][name]['ssim_vs_folded']['mean']:.3f}" for s in schemes
                ]
                folded_rows.append(f"| SSIM vs folded min(p,255−p): {name} | " + " | ".join(cells))
            lines += [header, "|" + "---|" * (len(schemes) + 1)]
            lines += [row + " |" for row in folded_rows]
            lines.append("")
            extra = []
            for scheme in schemes:
                entry = document[key][scheme][mode]
                for name, value in entry.items():
                    details = []
                    if "mask_accuracy" in value:
                        details.append(f"mask positions right {100 * value['mask_accuracy']:.1f} %")
                    if "exact_pixels" in value:
                        details.append(
                            f"pixels exact {100 * value['exact_pixels']['mean']:.1f} %, "
                            f"unambiguous {100 * value['unambiguous_pixels']['mean']:.1f} %"
                        )
                    if "identity_positions_found" in value:
                        details.append(
                            "k = 0 positions classified right "
                            f"{100 * value['identity_positions_found']:.1f} %"
                        )
                    if "jigsaw_neighbour_accuracy" in value:
                        details.append(
                            "tile neighbours re-matched "
                            f"{100 * value['jigsaw_neighbour_accuracy']['mean']:.1f} %"
                        )
                    if details:
                        extra.append(f"- {scheme}, {name}: " + "; ".join(details))
            if extra:
                lines += [*extra, ""]
            figure = document["figures"].get(
                f"{'mri' if key == 'attacks_dataset' else 'natural'}_{mode}"
            )
            if figure:
                lines += [f"![{title}, {mode} key]({figure})", ""]
    stats_sections = (
        ("dataset images", "statistics_dataset"),
        ("natural image", "statistics_natural"),
    )
    for title, key in stats_sections:
        stats = document[key]
        lines += [f"## Cipher statistics — {title} (paper key θ*)", ""]
        columns = ["plain", *schemes]
        lines += ["| statistic | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 1)]
        metrics = [m for m in stats[schemes[0]] if m in stats[schemes[0]]]
        for metric in metrics:
            cells = []
            for column in columns:
                value = stats[column].get(metric)
                cells.append("–" if value is None else _stat(metric, value))
            lines.append(f"| {metric} | " + " | ".join(cells) + " |")
        reference = stats["uniform_reference"]
        lines += [
            "",
            f"Two independent uniform images: NPCR {reference['npcr']:.2f} %, UACI "
            f"{reference['uaci']:.2f} %.  Perturbed key streams: "
            + "; ".join(
                f"{name}: {100 * v['fraction_of_positions_differing']:.1f} % of k differ"
                for name, v in stats["key_streams"].items()
            )
            + ".",
            "",
        ]
    if document.get("attacks_sealed"):
        lines += _sealed_markdown(document["attacks_sealed"], document["figures"].get("sealed"))
    lines += [
        "## Privacy–utility frontier",
        "",
        f"Retrieval mAP source: {document['retrieval_source']}.",
    ]
    if document["plain_map"] is not None:
        lines.append(f"Non-secure (plain) mAP: {document['plain_map']:.2f} %.")
    lines += [
        "",
        "| scheme | key mode | retrieval mAP (%) | best attack without keys | its SSIM | its "
        "PSNR (dB) | known-plaintext SSIM |",
        "|---|---|---|---|---|---|---|",
    ]
    for point in document["frontier"]:
        map_text = "not available" if point["map"] is None else f"{point['map']:.2f}"
        kpa = point["known_plaintext_ssim"]
        lines.append(
            f"| {point['scheme']} | {point['mode']} | {map_text} | {point['best_attack']} | "
            f"{point['best_ssim']:.3f} | {point['best_psnr']:.1f} | "
            f"{'–' if kpa is None else f'{kpa:.3f}'} |"
        )
    lines += ["", "![frontier](frontier.png)", ""]
    if document.get("jigsaw"):
        lines += _jigsaw_markdown(document["jigsaw"])
    if document.get("jigsaw_no_cipher"):
        lines += _no_cipher_markdown(document["jigsaw_no_cipher"])
    lines += [
        "Heat maps of all attacks: "
        + ", ".join(
            f"[{mode} key]({document['figures'][f'heatmap_{mode}']})" for mode in KEY_MODES
        ),
        "",
    ]
    return "\n".join(lines)


def _sealed_markdown(sealed: dict, figure: str | None) -> list[str]:
    """The sealed mode's section: feature-inversion scores and membership numbers."""
    setting, membership = sealed["setting"], sealed["membership"]
    lines = [
        "## Sealed mode: what the Fisher vectors leak",
        "",
        f"The cloud holds each stored slice's Fisher vector (D = {setting['dictionary_size']}, "
        f"{setting['fv_dim']} float32 values) and the published patch model (PCA "
        f"{setting['pca_dim']} dims + GMM), fitted by the owner on its {setting['n_stored']} "
        f"stored plain slices (patients of folds {setting['collection_folds']}).  The attacker "
        f"also holds a public labelled set of {setting['n_public']} plain slices with masks "
        f"(folds {setting['public_folds']}, patients disjoint from the collection's) and "
        "featurises it with the published model.  Reconstructions of "
        f"{setting['n_victims']} seeded victims (seed {setting['seed']}) are scored like the "
        "image attacks; the ROI crop (dilated mask's box resampled to "
        f"{setting['crop_size']}²) is scored given its location, which the vector does not "
        "reveal; 'worst' is the best reconstruction over the victims (worst for the owner).",
        "",
        "| attack (cloud: vectors + public set) | ROI SSIM median | ROI SSIM worst | ROI PSNR "
        "median | slice SSIM median | slice SSIM mean | slice SSIM worst | slice PSNR median |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in sealed["attacks"].items():
        roi, whole = r["roi"], r["slice"]
        lines.append(
            f"| {name} | {roi['ssim']['median']:.3f} | {roi['ssim']['worst']:.3f} | "
            f"{roi['psnr']['median']:.1f} | {whole['ssim']['median']:.3f} | "
            f"{whole['ssim']['mean']:.3f} | {whole['ssim']['worst']:.3f} | "
            f"{whole['psnr']['median']:.1f} |"
        )
    lines += [
        "",
        f"Membership (a probe is a slice the collection does not store: "
        f"{membership['n_member_probes']} held-back slices of stored patients against "
        f"{membership['n_outsider_probes']} slices of patients of folds "
        f"{setting['outsider_folds']}): nearest-stored-vector distance AUC "
        f"{membership['auc']:.3f} (0.5 = chance), TPR at 1 % FPR "
        f"{100 * membership['tpr_at_1pct_fpr']:.1f} %.  Re-identification: the nearest stored "
        f"vector is the probe's own patient's for {100 * membership['reidentification_top1']:.1f} "
        f"% of member probes (chance {100 * membership['chance_top1']:.1f} %).  A slice the "
        "attacker already holds is linked to its stored copy exactly (the features are "
        f"deterministic: max difference {membership['exact_copy_distance']:.1g}).",
        "",
    ]
    if figure:
        lines += [f"![sealed mode: reconstructions from the vectors]({figure})", ""]
    return lines


def _stat(metric: str, value: float) -> str:
    if metric == "chi2_p":
        return f"{value:.2g}"
    if metric == "chi2":
        return f"{value:.3g}"
    if metric.startswith(("npcr", "uaci", "wrong_key_pixels")):
        return f"{value:.2f} %" if value >= 0.1 or value == 0 else f"{value:.2g} %"
    return f"{value:.4f}"


# --------------------------------------------------------------------------- pe-roi / jigsaw
def read_jigsaw_report(config: ReportConfig) -> tuple[Path, dict | None]:
    """(path, contents) of `pecbir jigsaw-report`'s report.json; None where it is not written."""
    path = config.jigsaw_report or DEFAULT_JIGSAW_REPORT
    return path, (json.loads(path.read_text()) if path.is_file() else None)


def pe_roi_points(
    config: ReportConfig, jigsaw: dict, retrieval: dict[tuple[str, str], float]
) -> list[dict]:
    """The pe-roi frontier points, their mAP from the pe-roi results where measured (every
    Table 1 run under results/pe-roi/, each scheme by its explicit spelling)."""
    if config.pe_roi_results is not None:
        paths = [config.pe_roi_results]
    else:  # selection/ holds inner-fold units of the training split, not Table 1
        paths = [
            p
            for p in sorted(Path("results/pe-roi").rglob("results.json"))
            if "selection" not in p.parts
        ]
    roi_map, _ = read_headline_maps(paths)
    return pe_roi_frontier(jigsaw, {**retrieval, **roi_map})


_JIGSAW_ATTACKS = ("pixel", "jigsaw")


def pe_roi_frontier(jigsaw: dict, retrieval: dict[tuple[str, str], float]) -> list[dict]:
    """Frontier points of the pe-roi schemes in a `pecbir jigsaw-report` report.json.

    The best attack is the stage (pixel-level as found, or jigsaw) with the highest mean SSIM,
    on the full slice and, separately, inside the ROI; per-image keys (the report's only mode).
    """
    points = []
    summary = dict(jigsaw["summary"])
    # a pe-roi scheme with -in, -rf or -p<P> sends its image twin's cloud image
    # (pe-roi-t<b>[d|dn]) and a mask that is a function of the twin's and the public tile grid:
    # the twin's attacks are attacks on it
    attacked_as = {}
    for scheme, _ in retrieval:
        if not scheme.startswith("pe-roi"):
            continue
        twin = any_scheme(scheme).image_name
        if scheme not in summary and twin != scheme and twin in summary:
            summary[scheme], attacked_as[scheme] = summary[twin], twin
    for scheme, stages in summary.items():
        if not scheme.startswith("pe-roi"):
            continue
        found = {name: stages[name] for name in _JIGSAW_ATTACKS if name in stages}
        name, best = max(found.items(), key=lambda kv: kv[1]["ssim_full"]["mean"])
        roi_name, roi_best = max(found.items(), key=lambda kv: kv[1]["ssim_roi"]["mean"])
        points.append(
            {
                "scheme": scheme,
                "mode": "per-image",
                "best_attack": name
                + (f" (as {attacked_as[scheme]})" if scheme in attacked_as else ""),
                "best_ssim": best["ssim_full"]["mean"],
                "best_psnr": best["psnr_full"]["mean"],
                "best_ssim_roi": roi_best["ssim_roi"]["mean"],
                "best_attack_roi": roi_name,
                "all_black_ssim": stages["all-black guess"]["ssim_full"]["mean"],
                "known_plaintext_ssim": None,
                # retrieval names pe-roi schemes by their explicit spellings (read_headline_map)
                "map": retrieval.get((scheme, "per-image")),
                "source": "jigsaw-report",
            }
        )
    return points


def jigsaw_no_cipher(jigsaw: dict) -> dict | None:
    """The jigsaw report's no-ciphertext guesses and each scheme's advantage over them
    (`pecbir jigsaw-report --baselines`); None where the report has none."""
    if "no_cipher" not in jigsaw:
        return None
    return {
        "guesses": jigsaw["no_cipher"]["summary"],
        "n_mean_slices": jigsaw["no_cipher"]["n_mean_slices"],
        "advantage": jigsaw["advantage_over_guessing"],
    }


def _no_cipher_markdown(baseline: dict) -> list[str]:
    def cell(entry: dict, sign: str = "") -> str:
        return f"{entry['median']:{sign}.2f} / {entry['worst']:{sign}.2f}"

    lines = [
        "### Against guessing without the cipher",
        "",
        "Best guesses that never see a cipher, on the jigsaw report's slices: all black, and the "
        f"mean image of the {baseline['n_mean_slices']} other slices of the data set. A scheme's "
        "advantage is its best attack (pixel or jigsaw stage) minus the better guess, per slice "
        "(median / worst); at or below 0 the attack recovers no more than the population prior.",
        "",
        "| guess | SSIM full | SSIM ROI |",
        "|---|---|---|",
    ]
    for guess, metrics in baseline["guesses"].items():
        lines.append(f"| {guess} | {cell(metrics['ssim_full'])} | {cell(metrics['ssim_roi'])} |")
    lines += ["", "| scheme | advantage, SSIM full | advantage, SSIM ROI |", "|---|---|---|"]
    for scheme, metrics in baseline["advantage"].items():
        lines.append(
            f"| {scheme} | {cell(metrics['ssim_full'], '+')} | {cell(metrics['ssim_roi'], '+')} |"
        )
    return [*lines, ""]


def _jigsaw_markdown(summary: dict) -> list[str]:
    lines = [
        "## Jigsaw attack: pe, the tile variants and pe-roi",
        "",
        f"From {summary['source']} (`pecbir jigsaw-report`; its report.md has every stage and "
        "the commands).",
        "Per-image keys; median / worst over the slices; SSIM against the plain slice (full) and "
        "inside the ROI (tumour mask dilated by 24 px). The all-black guess needs no cipher at "
        "all: it is the floor of any full-slice number.",
        "",
        "| scheme | best attack, full slice | SSIM full | best attack, ROI | SSIM ROI | "
        "neighbour acc. | direct acc. | all-black SSIM full |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for scheme, stages in summary.items():
        if scheme == "source":
            continue
        found = {n: stages[n] for n in _JIGSAW_ATTACKS if n in stages}
        full = max(found, key=lambda n: found[n]["ssim_full"]["median"])
        roi = max(found, key=lambda n: found[n]["ssim_roi"]["median"])
        jig = stages.get("jigsaw", {})

        def cell(entry: dict | None) -> str:
            return "–" if not entry else f"{entry['median']:.2f} / {entry['worst']:.2f}"

        lines.append(
            f"| {scheme} | {full} | {cell(found[full]['ssim_full'])} | {roi} | "
            f"{cell(found[roi]['ssim_roi'])} | {cell(jig.get('neighbour_accuracy'))} | "
            f"{cell(jig.get('direct_accuracy'))} | "
            f"{cell(stages['all-black guess']['ssim_full'])} |"
        )
    return [*lines, ""]
