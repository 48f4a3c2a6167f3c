"""The security report: attacks and cipher statistics for every scheme, measured on real images.

Used by `pecbir security-report` (pecbir.commands.security_report).  Writes report.md,
report.json and PNG figures into one directory.  Nothing here asserts a security property;
every number comes from running an attack or a statistic on cipher images.
"""

from __future__ import annotations

import io
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pecore import attacks, cipherstats
from pecore.cipher import SCHEMES, decrypt, encrypt
from pecore.cipher_variants import (
    VARIANT_SCHEMES,
    decrypt_variant,
    encrypt_variant,
    parse_variant,
    tile_permutation,
    unscramble,
)
from pecore.datasets import decode_webp, default_data_path
from pecore.keys import MasterKey, SSLMKey, derive_image_key, key_stream

KEY_MODES = ("same", "different")
MODE_LABEL = {"same": "same key (k_i = k_j)", "different": "different keys (k_i ≠ k_j)"}
SCHEME_LABEL = {"ours": "Ours", "25": "[25]", "26": "[26]", "27": "[27]"}


def scheme_label(scheme: str) -> str:
    if scheme in SCHEME_LABEL:
        return SCHEME_LABEL[scheme]
    inner, block = parse_variant(scheme)
    return f"{SCHEME_LABEL[inner]} + {block}×{block} tile scramble ({scheme})"


@dataclass
class ReportConfig:
    out_dir: Path = Path("results/security")
    n_images: int = 8
    n_mask_images: int = 16
    n_kpa_images: int = 3
    kpa_pairs: int = 1
    seed: int = 0
    data_path: Path | None = None
    experiment_results: Path | None = None
    variants: tuple[str, ...] = VARIANT_SCHEMES
    natural_image: str = "camera"


# --------------------------------------------------------------------------- data
@dataclass
class ImageSet:
    """Dataset rows used by the report (all natively 512×512)."""

    eval_images: np.ndarray  # (n, 512, 512) uint8: attacked and scored
    eval_ids: list[str]
    mask_images: np.ndarray  # cipher-only training set for the same-key mask estimate
    known_images: np.ndarray  # plain images the known-plaintext attacker holds
    known_ids: list[str]
    source: str


def load_image_set(config: ReportConfig) -> ImageSet:
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
    return ImageSet(
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


# --------------------------------------------------------------------------- keys and ciphers
@dataclass
class Keys:
    same: np.ndarray
    different: dict[str, np.ndarray] = field(default_factory=dict)
    master: MasterKey = field(default_factory=lambda: MasterKey.from_seed(0))

    def stream(self, mode: str, image_id: str, n_pixels: int) -> np.ndarray:
        if mode == "same":
            if self.same.size != n_pixels:
                self.same = key_stream(SSLMKey(), n_pixels)
            return self.same
        if image_id not in self.different:
            self.different[image_id] = derive_image_key(self.master, image_id, n_pixels).stream()
        return self.different[image_id]


def encrypt_any(image: np.ndarray, stream: np.ndarray, scheme: str, nonce: str) -> np.ndarray:
    if scheme in SCHEMES:
        return encrypt(image, stream, scheme)
    return encrypt_variant(image, stream, scheme, nonce)


def decrypt_any(cipher: np.ndarray, stream: np.ndarray, scheme: str, nonce: str) -> np.ndarray:
    if scheme in SCHEMES:
        return decrypt(cipher, stream, scheme)
    return decrypt_variant(cipher, stream, scheme, nonce)


def inner_scheme(scheme: str) -> tuple[str, int | None]:
    if scheme in SCHEMES:
        return scheme, None
    return parse_variant(scheme)


# --------------------------------------------------------------------------- attacks
Attack = Callable[[np.ndarray], np.ndarray]


def ciphertext_only_attacks(scheme: str) -> dict[str, Attack]:
    """The per-image ciphertext-only attacks, by report name."""
    inner, tile = inner_scheme(scheme)
    return {
        "cipher image (no attack)": lambda c: c,
        "leading-bit A": attacks.LeadingBitAttack("A").transform,
        "leading-bit A′": attacks.LeadingBitAttack("A'").transform,
        "leading-bit B": attacks.LeadingBitAttack("B").transform,
        "median 3×3": attacks.MedianFilterAttack(3).transform,
        "median 5×5": attacks.MedianFilterAttack(5).transform,
        "leading-bit B + median 3×3": attacks.Pipeline(
            attacks.LeadingBitAttack("B"), attacks.MedianFilterAttack(3)
        ).transform,
        "clear-pixel inpainting": attacks.ClearPixelAttack(inner, tile=tile).transform,
    }


def _score_stack(plains: np.ndarray, recovered: np.ndarray, folded: bool) -> dict[str, object]:
    rows = [attacks.score(p, r) for p, r in zip(plains, recovered, strict=True)]
    out: dict[str, object] = {
        "ssim": _summary([float(r["ssim"]) for r in rows]),
        "psnr": _summary([float(r["psnr"]) for r in rows]),
        "inverted_polarity": sum(r["polarity"] == "inverted" for r in rows),
        "n": len(rows),
    }
    if folded:
        folded_rows = [attacks.score_folded(p, r) for p, r in zip(plains, recovered, strict=True)]
        out["ssim_vs_folded"] = _summary([r["ssim"] for r in folded_rows])
        out["psnr_vs_folded"] = _summary([r["psnr"] for r in folded_rows])
    return out


def _summary(values: Iterable[float]) -> dict[str, float]:
    values = np.asarray(list(values), dtype=np.float64)
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
    }


def run_attacks(
    config: ReportConfig,
    images: ImageSet,
    keys: Keys,
    schemes: list[str],
    progress: tqdm,
    mask_cache: dict[str, attacks.SharedMaskEstimator],
) -> tuple[dict, dict]:
    """Mean SSIM/PSNR of every attack, scheme and key mode on the dataset images.

    Returns (results, examples): examples holds the first image's attack outputs per scheme
    for the figure.
    """
    results: dict[str, dict] = {}
    examples: dict[str, dict[str, np.ndarray]] = {}
    plains = images.eval_images
    n_pixels = plains[0].size
    for scheme in schemes:
        inner, tile = inner_scheme(scheme)
        results[scheme] = {}
        for mode in KEY_MODES:
            progress.set_postfix_str(f"{scheme} / {mode} key")
            streams = [keys.stream(mode, i, n_pixels) for i in images.eval_ids]
            ciphers = np.stack(
                [
                    encrypt_any(p, s, scheme, i)
                    for p, s, i in zip(plains, streams, images.eval_ids, strict=True)
                ]
            )
            mode_results: dict[str, dict] = {}
            outputs: dict[str, np.ndarray] = {}
            for name, attack in ciphertext_only_attacks(scheme).items():
                recovered = attack(ciphers)
                mode_results[name] = {
                    "threat": "ciphertext-only",
                    **_score_stack(plains, recovered, folded=name.startswith("leading-bit A")),
                }
                outputs[name] = recovered[0]
            if mode == "same":
                # The cloud holds every cipher image (the attacked ones among them); the
                # estimate depends only on the scheme and that set, so it is cached.
                if scheme not in mask_cache:
                    mask_ciphers = np.stack(
                        [
                            encrypt_any(p, keys.same, scheme, f"mask-{j}")
                            for j, p in enumerate(images.mask_images)
                        ]
                    )
                    mask_cache[scheme] = attacks.SharedMaskEstimator(inner).fit(mask_ciphers)
                estimator = mask_cache[scheme]
                true_clear = keys.same == 0
                recovered = attacks.ClearPixelAttack(
                    inner, clear_mask=estimator.clear_mask_
                ).transform(ciphers)
                mode_results["shared-mask inpainting"] = {
                    "threat": f"ciphertext-only, {len(images.mask_images)} cipher images, same key",
                    "mask_accuracy": float(np.mean(estimator.clear_mask_.ravel() == true_clear)),
                    **_score_stack(plains, recovered, folded=False),
                }
                outputs["shared-mask inpainting"] = recovered[0]
                examples.setdefault("_masks", {})[scheme] = estimator.clear_mask_
            if tile is not None:
                mode_results.update(_variant_references(plains, ciphers, streams, images, scheme))
            if scheme in SCHEMES:
                kpa, kpa_output = _known_plaintext(config, images, keys, scheme, mode)
                mode_results.update(kpa)
                if kpa_output is not None:
                    outputs["known-plaintext (1 pair)"] = kpa_output
            results[scheme][mode] = mode_results
            examples.setdefault(mode, {})[scheme] = {"cipher": ciphers[0], **outputs}
            progress.update(1)
    return results, examples


def _variant_references(
    plains: np.ndarray,
    ciphers: np.ndarray,
    streams: list[np.ndarray],
    images: ImageSet,
    scheme: str,
) -> dict[str, dict]:
    """What a perfect jigsaw solver would add, and how well tiles can be re-matched."""
    inner, tile = parse_variant(scheme)
    n_tiles = (plains.shape[1] // tile) * (plains.shape[2] // tile)
    recovered = attacks.ClearPixelAttack(inner, tile=tile).transform(ciphers)
    oracle = []
    accuracy = []
    for r, s, i in zip(recovered, streams, images.eval_ids, strict=True):
        permutation = tile_permutation(s, i, n_tiles)
        oracle.append(unscramble(r, permutation, tile))
        accuracy.append(attacks.jigsaw_neighbour_accuracy(r, permutation, tile))
    return {
        "tile-wise inpainting, tiles put back by an oracle (perfect jigsaw solver)": {
            "threat": "upper bound: ciphertext-only + a perfect jigsaw solver",
            "jigsaw_neighbour_accuracy": _summary(accuracy),
            **_score_stack(plains, np.stack(oracle), folded=False),
        }
    }


def _known_plaintext(
    config: ReportConfig, images: ImageSet, keys: Keys, scheme: str, mode: str
) -> tuple[dict[str, dict], np.ndarray | None]:
    """Key recovery from `kpa_pairs` plain/cipher pairs, then decryption of other images.

    Same key: the pairs and the targets share the key stream.  Different keys: the pairs were
    encrypted under their own keys, so the recovered stream is the wrong one for the targets.
    """
    known = images.known_images[: config.kpa_pairs]
    targets = images.eval_images[: config.n_kpa_images]
    target_ids = images.eval_ids[: config.n_kpa_images]
    if len(known) == 0 or len(targets) == 0:
        return {}, None
    n_pixels = targets[0].size
    known_ciphers = np.stack(
        [
            encrypt(p, keys.stream(mode, i, n_pixels), scheme)
            for p, i in zip(known, images.known_ids, strict=True)
        ]
    )
    attack = attacks.KnownPlaintextAttack(scheme).fit(known, known_ciphers)
    target_ciphers = np.stack(
        [
            encrypt(p, keys.stream(mode, i, n_pixels), scheme)
            for p, i in zip(targets, target_ids, strict=True)
        ]
    )
    recovered = attack.transform(target_ciphers)
    name = f"known-plaintext ({len(known)} pair{'s' if len(known) > 1 else ''})"
    entry = {
        "threat": "known plaintext: "
        + ("same key for pairs and targets" if mode == "same" else "pairs under other keys"),
        "exact_pixels": _summary(np.mean(recovered == targets, axis=(1, 2))),
        "unambiguous_pixels": _summary(attack.certain_fraction_),
        **_score_stack(targets, recovered, folded=False),
    }
    if mode == "same":
        entry["identity_positions_found"] = float(
            np.mean((attack.stream_ == 0) == (keys.same == 0))
        )
    return {name: entry}, recovered[0]


# --------------------------------------------------------------------------- statistics
def _perturbed_keys() -> dict[str, SSLMKey]:
    base = SSLMKey()
    r0, r1, r2 = base.r
    return {
        "r0 + 1e-14": SSLMKey(r=(r0 + 1e-14, r1, r2)),
        "x0 + 1e-14": SSLMKey(x0=base.x0 + 1e-14),
    }


def cipher_statistics(
    plains: np.ndarray, ids: list[str], schemes: list[str], progress: tqdm
) -> dict[str, dict]:
    """Entropy, χ², correlations, NPCR/UACI (plain and key change), wrong-key decryption.

    All under the paper's key; the perturbed keys differ from it by 1e-14 in one parameter.
    """
    n_pixels = plains[0].size
    stream = key_stream(SSLMKey(), n_pixels)
    perturbed = {name: key_stream(k, n_pixels) for name, k in _perturbed_keys().items()}
    out: dict[str, dict] = {
        "plain": _mean_dicts([cipherstats.describe(p) for p in plains]),
        "key_streams": {
            name: {
                "fraction_of_positions_differing": float(np.mean(s != stream)),
                "fraction_nonzero": float(np.mean(s > 0)),
            }
            for name, s in perturbed.items()
        },
    }
    height, width = plains[0].shape
    positions = {"centre pixel": (height // 2, width // 2), "last pixel": (height - 1, width - 1)}
    for scheme in schemes:
        progress.set_postfix_str(f"statistics {scheme}")
        rows: list[dict[str, float]] = []
        for plain, image_id in zip(plains, ids, strict=True):
            cipher = encrypt_any(plain, stream, scheme, image_id)
            row = cipherstats.describe(cipher)
            for label, (y, x) in positions.items():
                changed = plain.copy()
                changed[y, x] = np.uint8((int(changed[y, x]) + 1) % 256)
                npcr, uaci = cipherstats.npcr_uaci(
                    cipher, encrypt_any(changed, stream, scheme, image_id)
                )
                row[f"npcr_plain_{label}"] = npcr
                row[f"uaci_plain_{label}"] = uaci
            for name, other in perturbed.items():
                npcr, uaci = cipherstats.npcr_uaci(
                    cipher, encrypt_any(plain, other, scheme, image_id)
                )
                row[f"npcr_key_{name}"] = npcr
                row[f"uaci_key_{name}"] = uaci
                wrong = decrypt_any(cipher, other, scheme, image_id)
                row[f"wrong_key_pixels_differing_{name}"] = 100.0 * float(np.mean(wrong != plain))
                row[f"wrong_key_ssim_{name}"] = float(attacks.score(plain, wrong)["ssim"])
            rows.append(row)
        out[scheme] = _mean_dicts(rows)
        progress.update(1)
    out["uniform_reference"] = dict(
        zip(("npcr", "uaci"), cipherstats.expected_npcr_uaci(), strict=True)
    )
    return out


def _mean_dicts(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}


# --------------------------------------------------------------------------- retrieval mAP
def default_experiment_results() -> Path | None:
    """The newest results/*/results.json under the working directory, if any."""
    candidates = sorted(
        Path("results").glob("*/results.json"), key=lambda p: p.stat().st_mtime, reverse=True
    )
    candidates = [c for c in candidates if c.parent.name != "security"]
    return candidates[0] if candidates else None


_MAP_KEYS = ("map", "mAP", "mean_ap", "mean_average_precision")
_SCHEME_KEYS = ("scheme", "cipher", "encryption", "condition")
_MODE_KEYS = ("key_mode", "keys", "key", "mode")


def _normalise_mode(value: object) -> str | None:
    text = str(value).lower().replace("_", "-")
    if "diff" in text or "≠" in text or "per-image" in text:
        return "different"
    if "same" in text or "shared" in text or "=" in text:
        return "same"
    return None


def _normalise_scheme(value: object) -> str | None:
    text = str(value).strip().lower().strip("[]")
    known = (*SCHEMES, *VARIANT_SCHEMES, "plain")
    if text in known:
        return text
    for scheme in sorted(known, key=len, reverse=True):
        if text.startswith(scheme + "-") or text.startswith(scheme + "_"):
            return scheme
    return None


def read_retrieval_map(path: Path | None) -> tuple[dict[tuple[str, str], float], str]:
    """(scheme, key mode) → mAP from the experiment runner's results.json, best effort.

    Looks for objects holding a scheme, a key mode and an mAP anywhere in the JSON.  When
    several K / dim values are present the largest mAP per condition is kept (and said so).
    Returns ({}, reason) when nothing usable is found: mAP is then "not available".
    """
    if path is None:
        return {}, "no experiment results file found (results/<run>/results.json)"
    if not Path(path).is_file():
        return {}, f"experiment results file {path} does not exist"
    try:
        document = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return {}, f"could not read {path}: {exc}"
    runner = _read_experiment_summary(document)
    if runner:
        found_runner, how = runner
        return found_runner, f"{path} ({how})"
    found: dict[tuple[str, str], float] = {}

    def visit(node: object, context: dict[str, object]) -> None:
        if isinstance(node, dict):
            context = dict(context)
            for key in _SCHEME_KEYS:
                if key in node and _normalise_scheme(node[key]):
                    context["scheme"] = _normalise_scheme(node[key])
            for key in _MODE_KEYS:
                if key in node and isinstance(node[key], str) and _normalise_mode(node[key]):
                    context["mode"] = _normalise_mode(node[key])
            for key in _MAP_KEYS:
                value = node.get(key)
                if isinstance(value, dict):
                    value = value.get("mean")
                if isinstance(value, int | float) and "scheme" in context:
                    mode = context.get("mode", "same" if context["scheme"] == "plain" else None)
                    if mode is not None:
                        value = float(value) * (100.0 if value <= 1.0 else 1.0)
                        condition = (str(context["scheme"]), str(mode))
                        found[condition] = max(found.get(condition, -math.inf), value)
            for key, child in node.items():
                child_context = dict(context)
                if _normalise_scheme(key):
                    child_context["scheme"] = _normalise_scheme(key)
                if _normalise_mode(key) and not isinstance(child, int | float):
                    child_context["mode"] = _normalise_mode(key)
                visit(child, child_context)
        elif isinstance(node, list):
            for child in node:
                visit(child, context)

    visit(document, {})
    if not found:
        return {}, f"{path} holds no (scheme, key mode, mAP) entries this reader understands"
    return found, f"{path} (largest mAP per condition over the runs it holds, in %)"


def _read_experiment_summary(document: object) -> tuple[dict[tuple[str, str], float], str] | None:
    """The `pecbir experiment` layout: summary[condition][D][dim]["mAP"]["mean"] (in %).

    condition is "non-secure" or "<scheme>/<same|different>".  Uses the runner's headline
    CFML dim and the largest dictionary size D present for each condition.
    """
    if not isinstance(document, dict) or not isinstance(document.get("summary"), dict):
        return None
    config = document.get("config", {}) if isinstance(document.get("config"), dict) else {}
    dim = str(config.get("headline_dim", 10))
    found: dict[tuple[str, str], float] = {}
    sizes_used: set[str] = set()
    for name, by_size in document["summary"].items():
        if name == "non-secure":
            condition = ("plain", "same")
        elif isinstance(name, str) and name.count("/") == 1:
            scheme, mode = name.split("/")
            condition = (scheme, mode)
        else:
            continue
        if not isinstance(by_size, dict):
            continue
        sizes = sorted((s for s in by_size if dim in by_size[s]), key=int)
        if not sizes:
            continue
        entry = by_size[sizes[-1]][dim].get("mAP", {})
        if isinstance(entry, dict) and isinstance(entry.get("mean"), int | float):
            found[condition] = float(entry["mean"])
            sizes_used.add(sizes[-1])
    if not found:
        return None
    folds = config.get("folds")
    return found, (
        f"pecbir experiment summary: mAP in %, CFML dim {dim}, D = {', '.join(sorted(sizes_used))}"
        f", folds {folds}"
    )


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
    markers = {"same": "o", "different": "s"}
    if have_map:
        for point in have_map:
            axis.scatter(point["best_ssim"], point["map"], marker=markers[point["mode"]], s=50)
            axis.annotate(
                f"{scheme_label(point['scheme']).split(' (')[0]}, {point['mode']}",
                (point["best_ssim"], point["map"]),
                fontsize=7,
                xytext=(4, 3),
                textcoords="offset points",
            )
        axis.set_ylabel("retrieval mAP (%)")
        axis.set_xlabel("best ciphertext-only attack: mean SSIM to plain (lower = more private)")
        axis.set_title("privacy–utility frontier (dataset images)")
    else:
        labels = [f"{p['scheme']}\n{p['mode']}" for p in points]
        axis.bar(range(len(points)), [p["best_ssim"] for p in points], color="tab:gray")
        axis.set_xticks(range(len(points)), labels, fontsize=6, rotation=90)
        axis.set_ylabel("best ciphertext-only attack SSIM")
        axis.set_title("privacy side only: retrieval mAP not available")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


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


def run_report(config: ReportConfig) -> dict:
    """Run everything, write report.md / report.json / figures, return the JSON document."""
    started = time.perf_counter()
    out_dir = Path(config.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    schemes = [*SCHEMES, *config.variants]
    for variant in config.variants:
        parse_variant(variant)
    images = load_image_set(config)
    natural = natural_image(config.natural_image)
    keys = Keys(
        same=key_stream(SSLMKey(), images.eval_images[0].size),
        master=MasterKey.from_seed(config.seed),
    )
    total_steps = 2 * len(schemes) * 2 + 2 * len(schemes)
    with tqdm(total=total_steps, desc="security report", unit="step") as progress:
        mask_cache: dict[str, attacks.SharedMaskEstimator] = {}
        results, examples = run_attacks(config, images, keys, schemes, progress, mask_cache)
        natural_set = ImageSet(
            eval_images=natural[None],
            eval_ids=["natural"],
            mask_images=images.mask_images,
            known_images=images.known_images,
            known_ids=images.known_ids,
            source=f"skimage.data.{config.natural_image}()",
        )
        natural_config = ReportConfig(**{**asdict(config), "n_kpa_images": 1})
        natural_results, natural_examples = run_attacks(
            natural_config, natural_set, keys, schemes, progress, mask_cache
        )
        statistics = cipher_statistics(images.eval_images, images.eval_ids, schemes, progress)
        natural_statistics = cipher_statistics(natural[None], ["natural"], schemes, progress)

    experiment_path = config.experiment_results or default_experiment_results()
    retrieval, retrieval_source = read_retrieval_map(experiment_path)
    frontier = []
    for scheme in schemes:
        for mode in KEY_MODES:
            name, best = best_ciphertext_only(results[scheme][mode])
            kpa = {n: r for n, r in results[scheme][mode].items() if n.startswith("known")}
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
    plain_map = retrieval.get(("plain", "same"))

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

    document = {
        "config": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
            "experiment_results": str(experiment_path) if experiment_path else None,
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
        "frontier": frontier,
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
        "- Same key: the paper's θ* for every image.  Different keys: per-image keys from "
        "`derive_image_key(MasterKey.from_seed(seed), image_id, N)`.",
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
    lines += [
        "## Privacy–utility frontier",
        "",
        f"Retrieval mAP source: {document['retrieval_source']}.",
    ]
    if document["plain_map"] is not None:
        lines.append(f"Non-secure (plain) mAP: {document['plain_map']:.2f} %.")
    lines += [
        "",
        "| scheme | key mode | retrieval mAP (%) | best ciphertext-only attack | its SSIM | its "
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
    lines += [
        "Heat maps of all attacks: "
        + ", ".join(
            f"[{mode} key]({document['figures'][f'heatmap_{mode}']})" for mode in KEY_MODES
        ),
        "",
    ]
    return "\n".join(lines)


def _stat(metric: str, value: float) -> str:
    if metric == "chi2_p":
        return f"{value:.2g}"
    if metric == "chi2":
        return f"{value:.3g}"
    if metric.startswith(("npcr", "uaci", "wrong_key_pixels")):
        return f"{value:.2f} %" if value >= 0.1 or value == 0 else f"{value:.2g} %"
    return f"{value:.4f}"
