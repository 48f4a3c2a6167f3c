"""Diagnostic (informational, training split only): does pe-roi-t16 lose retrieval through
the *positions* it reads or through the *scrambling*?

The unscrambled pe-roi-t512 (one tile: the ROI ⊕ margin blanked out of the slice, under
"ours"), evaluated exactly as `pecbir pe-roi-select` evaluates its candidates (fold 1 left
out, fold 2 queries folds 3–5, per-image keys, D = 16, CFML dim 10), with pe-roi-t512's own
seed (so each row differs from its 85.27 only by what the row names), and again with the seed
of the scrambled candidate it mirrors (pe-roi-t16-in, pe-roi-t16-rf: the same GMM seeds, a
second seed for the noise), but:

- "t512-in16": only the ROI positions whose 9×9 patch lies inside one tile of the 16-pixel grid
  (the positions of pe-roi-t16-in, `RoiCipher.tile_interior`), patches unchanged;
- "t512-rf16": every ROI position, each patch cut from its own 16×16 grid cell reflected at the
  cell's border (the patches of pe-roi-t16-rf, without the scrambling).

Usage (from the repository root):
    PECBIR_DATA=… python results/pe-roi/selection/reflected/diagnostic.py CACHE OUT
"""

from __future__ import annotations

import json
import sys
import time
import zlib
from dataclasses import replace
from pathlib import Path

import numpy as np

from pecbir.commands.pe_roi_select import _Rows
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

OUTER, INNER, SIZE, SEED, KEY_SEED = 1, 2, 16, 0, 2025


class _Masked:
    """Rows of a mask stack, each AND a fixed bool image."""

    def __init__(self, stack: np.ndarray, keep: np.ndarray) -> None:
        self.stack, self.keep = stack, keep

    def __len__(self) -> int:
        return len(self.stack)

    def __getitem__(self, i: int) -> np.ndarray:
        return np.asarray(self.stack[i]) & self.keep


def main(cache: Path, out: Path) -> None:
    start = time.perf_counter()
    data = load_figshare(default_data_path(), cache_dir=cache)
    keep = np.flatnonzero(data.folds != OUTER)
    folds = np.asarray(data.folds)[keep]
    images, masks = _Rows(data.images, keep), _Rows(data.masks, keep)
    labels, ids = np.asarray(data.labels)[keep], np.asarray(data.index)[keep]
    condition = Condition("pe-roi-t512", "per-image")
    stack = cipher_images(images, ids, [condition], KEY_SEED, cache, masks=masks)[condition.name]
    cloud = condition_masks(masks, ids, [condition], KEY_SEED, cache)[condition.name]
    config = condition_fold_config(ExperimentConfig(n_jobs=2), condition)
    interior = RoiCipher(tile=16).tile_interior(stack.shape[1:])
    variants = {
        "t512-in16": (_Masked(cloud, interior), config, "pe-roi-t16-in"),
        "t512-rf16": (
            _Rows(cloud, np.arange(len(cloud))),
            replace(config, patch_tile=16),
            "pe-roi-t16-rf",
        ),
    }
    results, seeds = {}, {}
    units = cache / "pe_roi_diagnostic"
    units.mkdir(parents=True, exist_ok=True)
    runs = [
        (variant, source)
        for variant, (_, _, twin) in variants.items()
        for source in ("pe-roi-t512", twin)
    ]
    for variant, source in runs:
        rois, fold_config, _ = variants[variant]
        name = f"{variant}, seed of {source}"
        # pe-roi-select's seed of that candidate
        seed_name = Condition(source, "per-image").seed_name
        seed = seeds[name] = fold_seed([SEED, INNER, zlib.crc32(seed_name.encode())])
        file = units / f"{variant}_{source}_o{OUTER}_i{INNER}_D{SIZE}_k{KEY_SEED}.json"
        if file.is_file():
            results[name] = json.loads(file.read_text())
            continue
        unit = evaluate_fold(
            stack,
            rois,
            labels,
            folds,
            query_fold=INNER,
            dictionary_sizes=[SIZE],
            **fold_config.fold_params(),
            random_state=seed,
            rois=rois,
        )[SIZE]
        file.write_text(json.dumps(unit))
        results[name] = unit
        print(name, 100 * unit["by_dim"]["10"]["mAP"], 100 * unit["by_dim"]["10"]["P@10"])
    document = {
        "description": __doc__.split("\n\n")[0],
        "command": "python results/pe-roi/selection/reflected/diagnostic.py "
        + " ".join(sys.argv[1:]),
        "outer_fold_left_out": OUTER,
        "inner_query_fold": INNER,
        "dictionary_size": SIZE,
        "seeds": seeds,
        "key_seed": KEY_SEED,
        "map_percent": {n: 100.0 * r["by_dim"]["10"]["mAP"] for n, r in results.items()},
        "p10_percent": {n: 100.0 * r["by_dim"]["10"]["P@10"] for n, r in results.items()},
        "wall_time_s": time.perf_counter() - start,
        "units": results,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnostic.json").write_text(json.dumps(document, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
