"""Per-fold mAP rows and paired deltas of pe-roi-t16d for results/pe-roi/README.md, section 3.

Run from the repository root: ``python results/pe-roi/t16d/paired.py``. Reads the committed
results.json files only (CFML dim 10, the headline dimension); Δ is the per-fold difference,
mean ± population std over the 5 folds, as the runner's own std.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

DIM = "10"
RUNS = {
    "per-image": {
        "pe-roi-t16d": ("results/pe-roi/t16d/results.json", "pe-roi-t16d/per-image"),
        "pe-roi-t16dn-in": ("results/pe-roi/results.json", "pe-roi/per-image"),
        "pe": ("results/table1/results.json", "ours/different"),
    },
    "same": {
        "pe-roi-t16d": ("results/pe-roi/t16d/same/results.json", "pe-roi-t16d/same"),
        "pe-roi-t16dn-in": ("results/pe-roi/same/results.json", "pe-roi/same"),
        "pe": ("results/table1/results.json", "ours/same"),
    },
}


def per_fold(path: str, condition: str, size: str, metric: str = "mAP") -> np.ndarray:
    """The headline `metric` of each fold 1..5 at dictionary size `size`, in % (the files hold
    fractions)."""
    folds = json.loads(Path(path).read_text())["folds"][condition]
    return 100 * np.array([folds[str(k)][size]["by_dim"][DIM][metric] for k in range(1, 6)])


def main() -> None:
    """Print, per key mode and D, the folds, mean ± std, P@10 and the paired deltas."""
    for mode, runs in RUNS.items():
        print(f"## {mode}")
        for size in ("16", "32", "64"):
            values = {name: per_fold(path, cond, size) for name, (path, cond) in runs.items()}
            ours = values["pe-roi-t16d"]
            p10 = per_fold(*runs["pe-roi-t16d"], size, "P@10")
            deltas = [ours - values[other] for other in ("pe-roi-t16dn-in", "pe")]
            print(
                f"D={size} | "
                + " | ".join(f"{v:.2f}" for v in ours)
                + f" | {ours.mean():.2f} ± {ours.std():.2f}"
                + f" | P@10 {p10.mean():.2f} ± {p10.std():.2f} | "
                + " | ".join(f"{d.mean():+.2f} ± {d.std():.2f}" for d in deltas)
                + " | t16dn-in "
                + f"{values['pe-roi-t16dn-in'].mean():.2f}, pe {values['pe'].mean():.2f}"
            )
    for size in ("16", "32", "64"):
        same = per_fold(*RUNS["same"]["pe-roi-t16d"], size)
        per_image = per_fold(*RUNS["per-image"]["pe-roi-t16d"], size)
        gap = same - per_image
        print(f"D={size} pe-roi-t16d same - per-image, paired: {gap.mean():+.2f} ± {gap.std():.2f}")


if __name__ == "__main__":
    main()
