"""`pecbir demo`: the whole system on one machine, no servers to install.

A hospital's encryptor encrypts N dataset images (per-image keys) and uploads them with their
tumour masks; the cloud gateway stores them, the indexer trains a model version on the cipher
templates and indexes every image, the search service answers k-NN queries for encrypted
query images; the hits come back encrypted and only the encryptor decrypts them (after
checking the owner's integrity tag). Prints mAP and P@10 and writes a montage PNG; then, in a
terminal, serves the radiologist's page on the demo data until Ctrl-C (--serve).

Embedded mode: filesystem object store, in-process event bus, Celery in eager mode (tasks run
inside the request that queued them), FastAPI apps reached in-process. `pecbir serve` runs
the same services as real processes against Redis and S3.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from pecbir_contracts import routes


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="run the whole encrypted-retrieval loop on this machine",
        description=__doc__.split("\n\n")[1],
    )
    parser.add_argument("--images", type=int, default=300, help="dataset images to use")
    parser.add_argument("--query-fold", type=int, default=1, help="fold whose images are queries")
    parser.add_argument("--data", type=Path, default=None, help="dataset .h5 (default PECBIR_DATA)")
    parser.add_argument("--synthetic", action="store_true", help="use generated images")
    parser.add_argument("--n-components", type=int, default=16, help="GMM components (D)")
    parser.add_argument("--n-train-patches", type=int, default=60_000, help="PCA/GMM sample")
    parser.add_argument("--dim", type=int, default=10, help="learned metric dimension")
    parser.add_argument("--radius", type=int, default=24, help="ROI dilation radius")
    parser.add_argument("--montage-queries", type=int, default=3)
    parser.add_argument("--montage-hits", type=int, default=5)
    parser.add_argument(
        "--seed", type=int, default=0, help="sample, model and demo master key seed"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="run folder (default: a new results/runs/demo-<UTC time>; results/demo holds the "
        "committed reference run)",
    )
    parser.add_argument(
        "--serve",
        choices=("auto", "yes", "no"),
        default="auto",
        help="then serve the radiologist's page (/ui) on the demo data until Ctrl-C: yes, no, "
        "or auto = when run in a terminal (default %(default)s; scripts get 'no')",
    )
    parser.add_argument(
        "--port", type=int, default=8765, help="port of the page (default %(default)s; 0: any)"
    )
    parser.set_defaults(func=run)


def _pick(dataset, n: int, query_fold: int, seed: int):
    """A class-stratified sample: about 80 % database (other folds), 20 % queries (query fold)."""
    rng = np.random.default_rng(seed)
    n_query = max(3, n // 5)
    is_query = dataset.folds == query_fold
    chosen = []
    for pool, count in (
        (np.flatnonzero(~is_query), n - n_query),
        (np.flatnonzero(is_query), n_query),
    ):
        labels = dataset.labels[pool]
        picked = []
        for label in np.unique(labels):
            members = pool[labels == label]
            share = round(count * members.size / pool.size)
            picked.extend(rng.choice(members, size=min(share, members.size), replace=False))
        chosen.append(np.sort(np.asarray(picked, dtype=np.int64)))
    return chosen[0], chosen[1]


def _npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _load(args: argparse.Namespace):
    from pecore.datasets import default_data_path, load_figshare, make_synthetic

    path = args.data or default_data_path()
    if not args.synthetic and Path(path).is_file():
        print(f"dataset: {path}")
        return load_figshare(path, cache_dir=Path("cache")), "figshare"
    why = "requested" if args.synthetic else f"{path} absent"
    print(f"dataset: generated (make_synthetic), {why}")
    return make_synthetic(n_images=max(args.images, 60), size=128, seed=args.seed), "synthetic"


NOISY_LOGGERS = (
    "httpx",
    "celery",
    "kombu",
    "pecbir.access",
    "pecbir_encryptor",
    "pecbir_gateway",
    "pecbir_indexer",
    "pecbir_search",
)


def run(args: argparse.Namespace) -> int:
    import logging

    from tqdm import tqdm

    from pecbir_harness.embedded import EmbeddedSystem
    from pecore.evaluate import average_precision, precision_at
    from pecore.keys import MasterKey

    # One log line per in-process request or eager task would bury the progress bars.
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
    started = time.perf_counter()
    dataset, source = _load(args)
    database, queries = _pick(dataset, args.images, args.query_fold, args.seed)
    radius = args.radius if source == "figshare" else min(args.radius, 8)
    params = {
        "n_components": args.n_components,
        "n_regions": 8,
        "patch_size": 9,
        "radius": radius,
        "n_train_patches": args.n_train_patches,
        "dim": args.dim,
        "random_state": args.seed,
    }
    print(
        f"{len(database)} database images (folds ≠ {args.query_fold}), {len(queries)} queries "
        f"(fold {args.query_fold}); model: {json.dumps(params)}"
    )
    if args.out is None:
        args.out = Path("results/runs") / time.strftime("demo-%Y%m%dT%H%M%SZ", time.gmtime())
    args.out.mkdir(parents=True, exist_ok=True)
    workdir = args.out / "system"
    shutil.rmtree(workdir, ignore_errors=True)
    # A published demo key, so that the same command gives the same numbers; never for data.
    master = MasterKey.from_seed(args.seed)
    print(
        f"run folder: {args.out.resolve()}\n"
        f"demo master key: MasterKey.from_seed({args.seed}), key id {master.key_id} "
        "(a DEMO key anyone can recompute: never use it for real images)"
    )
    timings: dict[str, float] = {}
    with EmbeddedSystem(workdir, tenant="hospital-a", master=master) as system:
        enc = system.encryptor
        image_ids: dict[str, int] = {}
        t0 = time.perf_counter()
        for row in tqdm(database, desc="encrypt + upload", unit="img"):
            answer = enc.post(
                routes.ENCRYPTOR_IMAGES.format(collection="brain"),
                files={
                    "image": ("slice.npy", _npy(dataset.images[row])),
                    "mask": ("mask.npy", _npy(dataset.masks[row])),
                },
                data={"label": str(int(dataset.labels[row])), "train": "true"},
            )
            if answer.status_code != 202:
                raise RuntimeError(f"upload of row {row} failed: {answer.text}")
            image_ids[answer.json()["upload"]["image_id"]] = int(row)
        timings["upload_s"] = time.perf_counter() - t0

        print("training a model version on the cipher templates, then indexing (eager tasks)…")
        t0 = time.perf_counter()
        trained = system.gateway.post(
            routes.GATEWAY_MODEL_TRAIN.format(collection="brain"), json=params
        )
        if trained.status_code != 202:
            raise RuntimeError(f"training request refused: {trained.text}")
        state = system.gateway.get(trained.json()["status_url"]).json()
        if state["state"] != "trained":
            raise RuntimeError(f"training failed: {state}")
        status = system.wait_searchable("brain", len(database))
        timings["train_and_index_s"] = time.perf_counter() - t0
        manifest = state["manifest"]
        print(
            f"model {manifest['version']}: F = {manifest['feature_dim']}, trained in "
            f"{manifest['train_seconds']:.1f} s; search serves {status['n_vectors']} vectors"
        )

        relevant, hits_of = [], {}
        t0 = time.perf_counter()
        for row in tqdm(queries, desc="encrypted queries", unit="query"):
            answer = enc.post(
                routes.ENCRYPTOR_SEARCH.format(collection="brain"),
                files={
                    "image": ("q.npy", _npy(dataset.images[row])),
                    "mask": ("m.npy", _npy(dataset.masks[row])),
                },
                data={"k": str(len(database))},
            )
            if answer.status_code != 200:
                raise RuntimeError(f"query {row} failed: {answer.text}")
            hits = answer.json()["hits"]
            ranked = np.array([dataset.labels[image_ids[h["image_id"]]] for h in hits])
            relevant.append(ranked == dataset.labels[row])
            hits_of[int(row)] = hits
        timings["queries_s"] = time.perf_counter() - t0
        relevant = np.asarray(relevant)
        mean_ap = float(average_precision(relevant).mean())
        p_at_10 = float(precision_at(relevant, min(10, relevant.shape[1])).mean())

        montage = _montage(system, dataset, queries, hits_of, image_ids, args)
        timings["total_s"] = time.perf_counter() - started
        summary = {
            "source": source,
            "n_database": len(database),
            "n_queries": len(queries),
            "query_fold": args.query_fold,
            "params": params,
            "scheme": "ours",
            "key_mode": "per-image",
            "mAP": round(mean_ap, 4),
            "P@10": round(p_at_10, 4),
            "feature_dim": manifest["feature_dim"],
            "timings_s": {k: round(v, 2) for k, v in timings.items()},
            "mode": "embedded (filesystem store, in-process bus, Celery eager)",
        }
        (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print()
        print("| images (db/query) | D | mAP | P@10 | total |")
        print("|---|---|---|---|---|")
        print(
            f"| {len(database)}/{len(queries)} | {args.n_components} | {mean_ap:.4f} "
            f"| {p_at_10:.4f} | {timings['total_s']:.0f} s |"
        )
        print(f"wrote {args.out / 'summary.json'} and {montage}")
        for what, folder in (("store", workdir / "store"), ("dataset cache", Path("cache"))):
            if folder.exists():
                size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
                print(f"{what}: {folder.resolve()} ({size / 2**20:.1f} MiB)")
        if source == "figshare" and len(database) < 2000:
            print(
                "note: a subset with a small D and patch sample; the paper's figures use all 3064."
            )
        if _should_serve(args.serve):
            _serve_page(system, args.port)
    return 0


def _should_serve(choice: str) -> bool:
    """`--serve`: auto serves when a person runs the demo in a terminal, never in a script."""
    if choice == "auto":
        return sys.stdin.isatty() and sys.stdout.isatty()
    return choice == "yes"


def _serve_page(system, port: int) -> None:
    """The radiologist's page of the demo's encryptor on loopback, until Ctrl-C."""
    from pecbir_harness.http import serve_in_thread

    with serve_in_thread(system.encryptor_app, port=port) as url:
        print(
            f"""
The radiologist's view of these {system.tenant} images (loopback only):

    {url}/ui/

Sign in with this demo user token (12 h; made for this run only):

    {system.user_token()}

Pick a stored study (or upload a slice and its mask) and press "Find similar cases".
Ctrl-C stops the page (`pecbir demo --serve no` runs without it).""",
            flush=True,
        )
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("\npage stopped")


def _montage(system, dataset, queries, hits_of, image_ids, args) -> Path:
    """Query (plain and as the cloud sees it) + top hits decrypted by the encryptor (Fig. 5)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pecore.datasets import CLASS_NAMES
    from pecore.envelope import seal

    picked = []
    for label in sorted(set(dataset.labels[queries].tolist())):
        picked.extend([q for q in queries if dataset.labels[q] == label][:1])
    picked = picked[: args.montage_queries]
    columns = 2 + args.montage_hits
    figure, axes = plt.subplots(
        len(picked), columns, figsize=(2.2 * columns, 2.4 * len(picked)), squeeze=False
    )
    for row_axes, query in zip(axes, picked, strict=True):
        hits = hits_of[int(query)][: args.montage_hits]
        plain_query = dataset.images[query]
        # What the cloud sees of a query: its cipher image under a fresh per-image key.
        cipher, _ = seal(plain_query, system.master, f"montage-{int(query)}")
        panels = [
            (plain_query, f"query: {CLASS_NAMES.get(int(dataset.labels[query]), '?')}", None),
            (cipher, "query as the cloud sees it", None),
        ]
        for hit in hits:
            plain = system.encryptor.get(
                routes.ENCRYPTOR_PLAIN_IMAGE.format(collection="brain", image_id=hit["image_id"]),
                params={"format": "npy"},
            )
            image = np.load(io.BytesIO(plain.content))
            label = int(dataset.labels[image_ids[hit["image_id"]]])
            match = label == int(dataset.labels[query])
            panels.append(
                (
                    image,
                    f"#{hit['rank']} {CLASS_NAMES.get(label, '?')}\nd={hit['distance']:.3g}",
                    match,
                )
            )
        for ax, (image, title, match) in zip(row_axes, panels, strict=False):
            ax.imshow(image, cmap="gray")
            ax.set_title(title, fontsize=8, color={True: "green", False: "red"}.get(match, "black"))
            ax.set_xticks([])
            ax.set_yticks([])
    figure.suptitle(
        "Encrypted retrieval: query, its cipher image, top hits decrypted by the owner",
        fontsize=9,
    )
    figure.tight_layout()
    path = args.out / "montage.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
