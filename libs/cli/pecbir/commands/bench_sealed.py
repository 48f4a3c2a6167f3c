"""`pecbir bench-sealed`: what the sealed mode costs the owner, and whether answers are stable.

Measures, on the dataset (or synthetic images with --synthetic):
- owner-side cost per image on one core (BLAS and encoders held to one thread): sealing
  (AES-256-GCM, data key wrapped) and featurising (patch model → Fisher vector), next to the
  pe mode's protect (8-bit rule, key derivation, cipher, tag);
- the sealed blob's size against the pe cipher PNG's;
- the encryptor's throughput (images/s) for one DICOMweb STOW-RS push into a sealed
  collection (embedded system: every service in this process, the uploads' indexing included);
- repeated-query stability in both modes: the same query image searched `--repeats` times
  must give the identical top-10 every time (`--queries` queries).
Prints a table and writes JSON under results/sealed/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench-sealed", help="owner-side cost, blob size, STOW throughput and query stability"
    )
    parser.add_argument("--images", type=int, default=200, help="images in each collection")
    parser.add_argument("--owner-images", type=int, default=50, help="images timed one by one")
    parser.add_argument("--stow-images", type=int, default=40, help="images in the STOW push")
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--n-components", type=int, default=64, help="GMM size K (paper's D)")
    parser.add_argument("--n-train-patches", type=int, default=60_000)
    parser.add_argument("--synthetic", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("results/sealed/bench.json"))
    parser.set_defaults(func=run)


def _load(args: argparse.Namespace):
    from pecore.datasets import default_data_path, load_figshare, make_synthetic

    if not args.synthetic and default_data_path().is_file():
        return load_figshare(cache_dir=Path("cache")), "figshare"
    # stored images, new queries and the STOW push: all distinct
    n_images = args.images + args.queries + args.stow_images
    return make_synthetic(n_images=n_images, size=256, seed=0), "synthetic"


def _ms(seconds: list[float]) -> dict[str, float]:
    values = np.asarray(seconds) * 1000
    return {
        "median_ms": round(float(np.median(values)), 2),
        "p90_ms": round(float(np.percentile(values, 90)), 2),
    }


def _owner_cost(args, images, masks, model) -> dict[str, object]:
    """Seal, features and pe protect of `--owner-images` images, one at a time, one core."""
    from threadpoolctl import threadpool_limits
    from tqdm import tqdm

    from pecbir_contracts.png import encode_png
    from pecbir_encryptor.core import protect_image
    from pecbir_encryptor.sealed import features_of
    from pecore.keys import MasterKey
    from pecore.sealing import SealedIdentity, seal_image

    master = MasterKey.generate()
    seal_s, features_s, pe_s, blob_bytes, png_bytes = [], [], [], [], []
    model.n_jobs = 1
    with threadpool_limits(limits=1):
        for i in tqdm(range(args.owner_images), desc="owner side, one core", unit="img"):
            image, mask = images[i], masks[i]
            identity = SealedIdentity(tenant="bench", collection="sealed", image_id=f"b{i:07d}")
            started = time.perf_counter()
            blob = seal_image(
                image, mask, master, identity, metadata={"label": 1}, content_bound=True
            )
            seal_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            features_of(model, image, mask)
            features_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            protected = protect_image(
                image, mask, master=master, opaque_id=f"b{i:07d}", tenant="bench", collection="pe"
            )
            pe_s.append(time.perf_counter() - started)
            blob_bytes.append(len(blob))
            png_bytes.append(len(encode_png(protected.cipher)))
    total = [a + b for a, b in zip(seal_s, features_s, strict=True)]
    return {
        "n_images": args.owner_images,
        "image_shape": list(images[0].shape),
        "sealed_seal": _ms(seal_s),
        "sealed_features": _ms(features_s),
        "sealed_total": _ms(total),
        "pe_protect": _ms(pe_s),
        "sealed_blob_kib": round(statistics.mean(blob_bytes) / 1024, 1),
        "pe_cipher_png_kib": round(statistics.mean(png_bytes) / 1024, 1),
    }


def _ingest(system, collection: str, image, mask, label: int) -> None:
    from pecbir_contracts.routes import ENCRYPTOR_IMAGES

    answer = system.encryptor.post(
        ENCRYPTOR_IMAGES.format(collection=collection),
        files={"image": ("i.npy", _npy(image)), "mask": ("m.npy", _npy(mask))},
        data={"label": str(label), "train": "true"},
    )
    if answer.status_code != 202:
        raise RuntimeError(f"upload refused: {answer.status_code} {answer.text}")


def _npy(array: np.ndarray) -> bytes:
    import io

    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _stability(system, collection: str, images, masks, args, *, stored: bool) -> dict[str, object]:
    """Each of `args.queries` images searched `args.repeats` times: identical top-10s, and what
    the encryptor sent the cloud (a stored image goes by reference: no cipher, no vector)."""
    from tqdm import tqdm

    from pecbir_contracts.routes import ENCRYPTOR_SEARCH

    sent: list[str] = []

    def keep(request) -> None:
        if request.method == "POST" and request.url.path.endswith(("/search", "/fisher-vector")):
            sent.append(request.url.path)

    hooks = system.encryptor_app.state.encryptor.gateway.http.event_hooks["request"]
    hooks.append(keep)
    identical, seconds = 0, []
    try:
        for q in tqdm(range(args.queries), desc=f"stability {collection}", unit="query"):
            rankings = set()
            for _ in range(args.repeats):
                while True:
                    started = time.perf_counter()
                    answer = system.encryptor.post(
                        ENCRYPTOR_SEARCH.format(collection=collection),
                        files={
                            "image": ("q.npy", _npy(images[q])),
                            "mask": ("m.npy", _npy(masks[q])),
                        },
                        data={"k": "10"},
                    )
                    if answer.status_code != 429:
                        break
                    # the user's search budget (10/s): wait as a client would, untimed
                    time.sleep(float(answer.headers.get("retry-after", "1")))
                seconds.append(time.perf_counter() - started)
                if answer.status_code != 200:
                    raise RuntimeError(f"search refused: {answer.status_code} {answer.text}")
                rankings.add(tuple(hit["image_id"] for hit in answer.json()["hits"]))
            identical += len(rankings) == 1
    finally:
        hooks.remove(keep)
    by_reference = sum("/images/" in path for path in sent)
    return {
        "queries": args.queries,
        "stored_images": stored,
        "repeats": args.repeats,
        "identical_top10": identical,
        "identical_top10_pct": round(100 * identical / args.queries, 1),
        "searches_by_reference": by_reference,
        "searches_sending_a_query_cipher_or_vector": len(sent) - by_reference,
        "search_through_encryptor": _ms(seconds),
    }


def run(args: argparse.Namespace) -> int:
    import logging

    from tqdm import tqdm

    from pecbir_contracts.routes import ENCRYPTOR_STOW_STUDIES
    from pecbir_harness.dicom import stow_body
    from pecbir_harness.embedded import EmbeddedSystem
    from pecore.owner_features import PatchModelFeaturizer

    for noisy in ("httpx", "pecbir.access"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    dataset, source = _load(args)
    rng = np.random.default_rng(0)
    rows = rng.permutation(len(dataset))[: args.images]
    images = [dataset.images[r] for r in rows]
    masks = [dataset.masks[r] for r in rows]
    labels = [int(dataset.labels[r]) for r in rows]
    patch = {
        "n_components": args.n_components,
        "n_regions": 8,
        "patch_size": 9,
        "radius": 24,
        "n_train_patches": args.n_train_patches,
    }
    started = time.perf_counter()
    model = PatchModelFeaturizer(**patch).fit(images, masks)
    fit_s = time.perf_counter() - started
    results: dict[str, object] = {
        "source": source,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_1min": os.getloadavg()[0],
        },
        "patch_model": {**patch, "fit_images": len(images), "fit_seconds": round(fit_s, 1)},
        "owner": _owner_cost(args, images, masks, model),
    }
    sealed, pe = "sealed", "pe"
    with (
        tempfile.TemporaryDirectory() as tmp,
        EmbeddedSystem(Path(tmp), sealed_collections=frozenset({sealed})) as system,
    ):
        # The owner publishes the model it fitted (what `pecbir-encryptor patch-model` does).
        encryptor = system.encryptor_app.state.encryptor
        encryptor.patch_models.publish(sealed, model)
        for collection in (sealed, pe):
            for i in tqdm(range(args.images), desc=f"upload {collection}", unit="img"):
                _ingest(system, collection, images[i], masks[i], labels[i])
            trained = system.gateway.post(
                f"/v1/collections/{collection}/model/train",
                json={**patch, "dim": 10},
            )
            if trained.status_code != 202:
                raise RuntimeError(trained.text)
            system.wait_searchable(collection, args.images, timeout=3600)
        # One STOW-RS push of new images into the sealed collection (indexing included).
        stow_rows = rng.permutation(len(dataset))[: args.stow_images]
        names = {1: "meningioma", 2: "glioma", 3: "pituitary"}
        body, content_type = stow_body(
            [dataset.images[r].astype(np.uint16) for r in stow_rows],
            [dataset.masks[r] for r in stow_rows],
            [names.get(int(dataset.labels[r]), "glioma") for r in stow_rows],
        )
        started = time.perf_counter()
        answer = system.encryptor.post(
            ENCRYPTOR_STOW_STUDIES.format(collection=sealed),
            content=body,
            headers={"content-type": content_type},
        )
        stow_s = time.perf_counter() - started
        if answer.status_code != 200:
            raise RuntimeError(f"STOW refused: {answer.status_code} {answer.text[:300]}")
        results["stow_sealed"] = {
            "images": args.stow_images,
            "body_mib": round(len(body) / 2**20, 1),
            "seconds": round(stow_s, 2),
            "images_per_s": round(args.stow_images / stow_s, 2),
            "note": "embedded: encryptor, gateway, indexer (eager) and search in one process",
        }
        # Queries of stored images (by reference) and of images the hospital never stored
        # (a cipher, or in the sealed mode a vector, under the query's content-derived key).
        excluded = {int(r) for r in rows} | {int(r) for r in stow_rows}
        unseen = [r for r in rng.permutation(len(dataset)) if int(r) not in excluded]
        new_images = [dataset.images[r] for r in unseen[: args.queries]]
        new_masks = [dataset.masks[r] for r in unseen[: args.queries]]
        results["stability"] = {
            f"{mode}, stored": _stability(system, mode, images, masks, args, stored=True)
            for mode in (sealed, pe)
        } | {
            f"{mode}, new": _stability(system, mode, new_images, new_masks, args, stored=False)
            for mode in (sealed, pe)
        }
    _print(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


def _print(results: dict[str, object]) -> None:
    owner = results["owner"]
    stow = results["stow_sealed"]
    rows = [
        ("owner: seal (AES-256-GCM), median ms/img, 1 core", owner["sealed_seal"]["median_ms"]),
        ("owner: features (Fisher vector), median ms/img", owner["sealed_features"]["median_ms"]),
        ("owner: sealed total, median ms/img", owner["sealed_total"]["median_ms"]),
        ("owner: pe protect, median ms/img", owner["pe_protect"]["median_ms"]),
        ("sealed blob, KiB", owner["sealed_blob_kib"]),
        ("pe cipher PNG, KiB", owner["pe_cipher_png_kib"]),
        ("STOW-RS push into a sealed collection, images/s", stow["images_per_s"]),
    ]
    for mode, stable in results["stability"].items():
        rows.append(
            (
                f"{mode}: identical top-10 over {stable['repeats']} repeats, "
                f"% of {stable['queries']} queries",
                stable["identical_top10_pct"],
            )
        )
        rows.append(
            (
                f"{mode}: searches that sent a query cipher/vector (by reference)",
                f"{stable['searches_sending_a_query_cipher_or_vector']} "
                f"({stable['searches_by_reference']})",
            )
        )
    width = max(len(name) for name, _ in rows)
    print(f"{'measure':<{width}}  value")
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
