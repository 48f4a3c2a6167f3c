"""The security report's attack suite and cipher statistics, on arrays (no files, no plots).

For one scheme and one of the paper's key modes ("same": θ* for every image; "per-image":
derived per image, see `pecore.envelope.scenario_key_stream`), `attack_scheme` encrypts the
evaluation images, runs every ciphertext-only attack of `pecore.attacks` on them, the
same-key shared-mask attack, the known-plaintext attack (standard schemes) and, for
tile-scrambled variants, the perfect-jigsaw reference, and scores each output with SSIM/PSNR
against the plain images.  `cipher_statistics` measures entropy, χ², correlations, NPCR/UACI
and wrong-key decryption under the paper's key.  Nothing here asserts a security property:
every number comes from running an attack or a statistic.  `pecbir security-report` picks
the images, shows progress and writes the report.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from pecore import attacks, cipherstats
from pecore.cipher import encrypt
from pecore.cipher_variants import (
    decrypt_any,
    encrypt_any,
    inner_scheme,
    parse_variant,
    tile_permutation,
    unscramble,
)
from pecore.envelope import canonical_key_mode, scenario_key_stream
from pecore.keys import PAPER_KEY, MasterKey, SSLMKey, key_stream, paper_key_stream

__all__ = [
    "AttackImages",
    "attack_scheme",
    "cipher_statistics",
    "ciphertext_only_attacks",
    "perturbed_keys",
    "score_stack",
    "summary",
]

Attack = Callable[[np.ndarray], np.ndarray]


@dataclass
class AttackImages:
    """The images one run of the suite attacks (all of one size).

    Attributes
    ----------
    eval_images : numpy.ndarray
        (n, H, W) uint8: attacked and scored.
    eval_ids : list of str
        Their ids (per-image key derivation input, variant nonce).
    mask_images : numpy.ndarray
        Cipher-only training set of the same-key shared-mask estimate.
    known_images : numpy.ndarray
        Plain images the known-plaintext attacker holds.
    known_ids : list of str
        Their ids.
    source : str
        Where the images came from (for the report).
    """

    eval_images: np.ndarray
    eval_ids: list[str]
    mask_images: np.ndarray
    known_images: np.ndarray
    known_ids: list[str]
    source: str


def ciphertext_only_attacks(scheme: str) -> dict[str, Attack]:
    """The per-image ciphertext-only attacks on `scheme`, by report name."""
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


def summary(values: Iterable[float]) -> dict[str, float]:
    """Mean, population std, min and max of `values`."""
    values = np.asarray(list(values), dtype=np.float64)
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "min": float(values.min()),
        "max": float(values.max()),
    }


def score_stack(plains: np.ndarray, recovered: np.ndarray, *, folded: bool) -> dict[str, object]:
    """SSIM/PSNR summaries of attack outputs against their plain images.

    Parameters
    ----------
    plains, recovered : numpy.ndarray
        (n, H, W) uint8 plain images and the attack's estimates of them.
    folded : bool
        Also score against the folded plain image min(p, 255 − p) (fixed-bit attacks).

    Returns
    -------
    dict
        ``ssim``/``psnr`` summaries (best polarity), ``inverted_polarity`` count, ``n``, and
        with `folded` ``ssim_vs_folded``/``psnr_vs_folded``.
    """
    rows = [attacks.score(p, r) for p, r in zip(plains, recovered, strict=True)]
    out: dict[str, object] = {
        "ssim": summary([float(r["ssim"]) for r in rows]),
        "psnr": summary([float(r["psnr"]) for r in rows]),
        "inverted_polarity": sum(r["polarity"] == "inverted" for r in rows),
        "n": len(rows),
    }
    if folded:
        folded_rows = [attacks.score_folded(p, r) for p, r in zip(plains, recovered, strict=True)]
        out["ssim_vs_folded"] = summary([r["ssim"] for r in folded_rows])
        out["psnr_vs_folded"] = summary([r["psnr"] for r in folded_rows])
    return out


def attack_scheme(
    *,
    scheme: str,
    key_mode: str,
    images: AttackImages,
    master: MasterKey,
    kpa_pairs: int,
    n_kpa_images: int,
    mask_cache: dict[str, attacks.SharedMaskEstimator],
) -> tuple[dict[str, dict], dict[str, np.ndarray]]:
    """Every attack of the suite on `scheme` under `key_mode`, scored on `images`.

    Parameters
    ----------
    scheme : str
        A scheme of `pecore.cipher` or a tile-scrambled variant ("<inner>-bs<b>").
    key_mode : str
        "same" (θ* for every image) or "per-image" (from `master`); alias "different".
    images : AttackImages
        Evaluation, mask-training and known-plaintext images.
    master : MasterKey
        Master key of the per-image keys.
    kpa_pairs : int
        Known plain/cipher pairs of the known-plaintext attack.
    n_kpa_images : int
        Evaluation images the known-plaintext attack decrypts.
    mask_cache : dict
        Same-key shared-mask estimators by scheme, filled on first use: the estimate depends
        only on the scheme and the mask images, so runs on other evaluation images reuse it.

    Returns
    -------
    tuple of (dict, dict)
        Scores by attack name (each with its ``threat``), and the first image's cipher and
        attack outputs by name (for figures).
    """
    key_mode = canonical_key_mode(key_mode)
    inner, tile = inner_scheme(scheme)
    plains = images.eval_images
    n_pixels = plains[0].size
    streams = [
        scenario_key_stream(key_mode, master=master, image_id=i, n_pixels=n_pixels)
        for i in images.eval_ids
    ]
    ciphers = np.stack(
        [
            encrypt_any(p, s, scheme, i)
            for p, s, i in zip(plains, streams, images.eval_ids, strict=True)
        ]
    )
    results: dict[str, dict] = {}
    outputs: dict[str, np.ndarray] = {}
    for name, attack in ciphertext_only_attacks(scheme).items():
        recovered = attack(ciphers)
        results[name] = {
            "threat": "ciphertext-only",
            **score_stack(plains, recovered, folded=name.startswith("leading-bit A")),
        }
        outputs[name] = recovered[0]
    if key_mode == "same":
        # The cloud holds every cipher image (the attacked ones among them).
        same = paper_key_stream(n_pixels)
        if scheme not in mask_cache:
            mask_ciphers = np.stack(
                [
                    encrypt_any(p, same, scheme, f"mask-{j}")
                    for j, p in enumerate(images.mask_images)
                ]
            )
            mask_cache[scheme] = attacks.SharedMaskEstimator(inner).fit(mask_ciphers)
        estimator = mask_cache[scheme]
        recovered = attacks.ClearPixelAttack(inner, clear_mask=estimator.clear_mask_).transform(
            ciphers
        )
        results["shared-mask inpainting"] = {
            "threat": f"ciphertext-only, {len(images.mask_images)} cipher images, same key",
            "mask_accuracy": float(np.mean(estimator.clear_mask_.ravel() == (same == 0))),
            **score_stack(plains, recovered, folded=False),
        }
        outputs["shared-mask inpainting"] = recovered[0]
    if tile is not None:
        results.update(_variant_references(plains, ciphers, streams, images.eval_ids, scheme))
    if tile is None:  # the known-plaintext attack models the registered schemes only
        kpa, kpa_output = _known_plaintext(
            images,
            scheme=scheme,
            key_mode=key_mode,
            master=master,
            kpa_pairs=kpa_pairs,
            n_kpa_images=n_kpa_images,
        )
        results.update(kpa)
        if kpa_output is not None:
            outputs["known-plaintext (1 pair)"] = kpa_output
    return results, {"cipher": ciphers[0], **outputs}


def _variant_references(
    plains: np.ndarray,
    ciphers: np.ndarray,
    streams: list[np.ndarray],
    ids: list[str],
    scheme: str,
) -> dict[str, dict]:
    """What a perfect jigsaw solver would add, and how well tiles can be re-matched."""
    inner, tile = parse_variant(scheme)
    n_tiles = (plains.shape[1] // tile) * (plains.shape[2] // tile)
    recovered = attacks.ClearPixelAttack(inner, tile=tile).transform(ciphers)
    oracle = []
    accuracy = []
    for r, s, i in zip(recovered, streams, ids, strict=True):
        permutation = tile_permutation(s, i, n_tiles)
        oracle.append(unscramble(r, permutation, tile))
        accuracy.append(attacks.jigsaw_neighbour_accuracy(r, permutation, tile))
    return {
        "tile-wise inpainting, tiles put back by an oracle (perfect jigsaw solver)": {
            "threat": "upper bound: ciphertext-only + a perfect jigsaw solver",
            "jigsaw_neighbour_accuracy": summary(accuracy),
            **score_stack(plains, np.stack(oracle), folded=False),
        }
    }


def _known_plaintext(
    images: AttackImages,
    *,
    scheme: str,
    key_mode: str,
    master: MasterKey,
    kpa_pairs: int,
    n_kpa_images: int,
) -> tuple[dict[str, dict], np.ndarray | None]:
    """Key recovery from `kpa_pairs` plain/cipher pairs, then decryption of other images.

    Same key: the pairs and the targets share the key stream.  Per-image keys: the pairs were
    encrypted under their own keys, so the recovered stream is the wrong one for the targets.
    """
    known = images.known_images[:kpa_pairs]
    known_ids = images.known_ids[:kpa_pairs]
    targets = images.eval_images[:n_kpa_images]
    target_ids = images.eval_ids[:n_kpa_images]
    if len(known) == 0 or len(targets) == 0:
        return {}, None
    n_pixels = targets[0].size

    def encrypted(plains: np.ndarray, ids: list[str]) -> np.ndarray:
        streams = [
            scenario_key_stream(key_mode, master=master, image_id=i, n_pixels=n_pixels) for i in ids
        ]
        return np.stack([encrypt(p, s, scheme) for p, s in zip(plains, streams, strict=True)])

    attack = attacks.KnownPlaintextAttack(scheme).fit(known, encrypted(known, known_ids))
    recovered = attack.transform(encrypted(targets, target_ids))
    name = f"known-plaintext ({len(known)} pair{'s' if len(known) > 1 else ''})"
    entry = {
        "threat": "known plaintext: "
        + ("same key for pairs and targets" if key_mode == "same" else "pairs under other keys"),
        "exact_pixels": summary(np.mean(recovered == targets, axis=(1, 2))),
        "unambiguous_pixels": summary(attack.certain_fraction_),
        **score_stack(targets, recovered, folded=False),
    }
    if key_mode == "same":
        entry["identity_positions_found"] = float(
            np.mean((attack.stream_ == 0) == (paper_key_stream(n_pixels) == 0))
        )
    return {name: entry}, recovered[0]


def perturbed_keys() -> dict[str, SSLMKey]:
    """θ* with one parameter moved by 1e-14, by name (key-sensitivity statistics)."""
    r0, r1, r2 = PAPER_KEY.r
    return {
        "r0 + 1e-14": SSLMKey(r=(r0 + 1e-14, r1, r2)),
        "x0 + 1e-14": SSLMKey(x0=PAPER_KEY.x0 + 1e-14),
    }


def cipher_statistics(
    plains: np.ndarray,
    *,
    ids: list[str],
    schemes: list[str],
    on_scheme: Callable[[str], object] | None = None,
) -> dict[str, dict]:
    """Entropy, χ², correlations, NPCR/UACI (plain and key change), wrong-key decryption.

    All under the paper's key; the perturbed keys differ from it by 1e-14 in one parameter.

    Parameters
    ----------
    plains : numpy.ndarray
        (n, H, W) uint8 plain images.
    ids : list of str
        Their ids (the tile-scrambled variants' nonces).
    schemes : list of str
        Schemes to measure.
    on_scheme : callable, optional
        Called with each scheme's name once its statistics are done (progress).

    Returns
    -------
    dict
        "plain" and every scheme: statistics averaged over the images; "key_streams": how
        much the perturbed streams differ; "uniform_reference": NPCR/UACI of two independent
        uniform images.
    """
    n_pixels = plains[0].size
    stream = paper_key_stream(n_pixels)
    perturbed = {name: key_stream(k, n_pixels) for name, k in perturbed_keys().items()}
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
        if on_scheme is not None:
            on_scheme(scheme)
    out["uniform_reference"] = dict(
        zip(("npcr", "uaci"), cipherstats.expected_npcr_uaci(), strict=True)
    )
    return out


def _mean_dicts(rows: list[dict[str, float]]) -> dict[str, float]:
    return {key: float(np.mean([row[key] for row in rows])) for key in rows[0]}
