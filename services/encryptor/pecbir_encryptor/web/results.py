"""One query of the page: search every selected source, open the best hits, keep the result.

Whatever protects a collection (pe, sealed, ...), the search and the opening go through the
encryptor's own operations (`Encryptor.search`, `fetch_plain`, `open_released`), so the page
works for every mode those do. This hospital's hits are opened with its keys; another
hospital's through that owner's audited key release (`PeerKeys`), or shown "not released".

The result page is shown as soon as the collections are searched: each tile is opened when
the page asks for it (`QueryResult.open_tile`, once per tile, audited), so the first hit shows
as soon as it is open, not when all k are. Similarity: `pecbir_encryptor.web.similarity`.
"""

from __future__ import annotations

import csv
import io
import json
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice

import httpx
import numpy as np
from PIL import Image, ImageDraw

from pecbir_contracts.png import encode_png
from pecbir_contracts.schemas import MAX_K
from pecbir_encryptor.core import Encryptor
from pecbir_encryptor.gateway_client import GatewayError
from pecbir_encryptor.integrity import IntegrityError
from pecbir_encryptor.peers import NotReleased, PeerKeys
from pecbir_encryptor.web.similarity import relative_distances, similarity_scores
from pecore.cipher import to_uint8

__all__ = [
    "CLASS_NAMES",
    "Hit",
    "QueryResult",
    "ResultCache",
    "Source",
    "outline_png",
    "run_query",
]

# The dataset's classes (pecore.datasets.CLASS_NAMES), spelled here too: the encryptor image
# does not carry the dataset loaders' dependencies.
CLASS_NAMES: dict[int, str] = {1: "meningioma", 2: "glioma", 3: "pituitary"}
# Hits opened at most per query, whatever the class filter skips: bounds one query's work.
MAX_OPENED_PER_HIT = 4
# Hits opened at once (fetch from the cloud, key stream, decryption).
OPEN_THREADS = 4


@dataclass(frozen=True)
class Source:
    """A collection the page searches: this hospital's or one another hospital shares.

    Attributes
    ----------
    owner
        The owning hospital's tenant.
    collection
        The collection's name.
    """

    owner: str
    collection: str

    @property
    def label(self) -> str:
        return f"{self.owner}/{self.collection}"


@dataclass
class Hit:
    """One tile of the result: an opened hit, or why it is not shown.

    Attributes
    ----------
    rank
        Position on the page (1 = most similar).
    source
        Its collection and owner.
    image_id
        The cloud's id of the image.
    source_rank
        Its rank in its own collection's answer.
    distance
        The cloud's distance (learned metric), kept for the export.
    similarity
        0–100 (module docstring).
    label
        Its class, when known (after opening, or the cloud's label of a pe template).
    state
        "pending" (not opened yet), "shown", "not-released" (the owner refused its key) or
        "failed" (it did not open).
    reason
        Why it is not shown.
    mode
        How its collection is protected ("pe", "sealed", ...).
    png, outline, exact
        The plain image for display (8-bit PNG), its tumour outline (RGBA PNG), and the
        exact plain array when it is not 8-bit (sealed images keep their depth).
    open_ms
        How long opening it took (fetch, key release, decryption), once opened.
    lock
        Held while it is opened (the page's requests for one tile open it once).
    """

    rank: int
    source: Source
    image_id: str
    source_rank: int
    distance: float
    similarity: int
    label: int | None
    state: str = "pending"
    reason: str = ""
    mode: str = "pe"
    png: bytes = b""
    outline: bytes = b""
    exact: np.ndarray | None = None
    open_ms: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def class_name(self) -> str:
        return CLASS_NAMES.get(self.label, f"class {self.label}") if self.label else "unknown"


@dataclass
class QueryResult:
    """A query and its hits, as the page shows and exports them.

    Attributes
    ----------
    id
        Random id of the result (in its URLs).
    sub
        Who ran it (only they may see it).
    created
        Unix time.
    described
        What the query was ("upload: name.png", "stored study …").
    query_png, query_outline
        The query as shown (8-bit) and its outline.
    cloud_png
        What the cloud saw of the query, once made (`cloud_image`).
    cloud_text
        What the cloud saw, in words.
    cloud_maker
        Makes `cloud_png` when it is first asked for (pe: the query's cipher image; None when
        the cloud got no image).
    filters
        k, class and hospitals asked for.
    hits
        The tiles, best first.
    sources
        Per source: mode, model version, collection size, or the error.
    timings_ms
        search (and, with a class filter, the opening of hits of unknown class), in ms.
    opener
        Opens one pending tile (set by `run_query`).
    """

    id: str
    sub: str
    created: float
    described: str
    query_png: bytes
    query_outline: bytes
    cloud_png: bytes | None
    cloud_text: str
    filters: dict[str, object]
    cloud_maker: Callable[[], bytes] | None = None
    hits: list[Hit] = field(default_factory=list)
    sources: list[dict[str, object]] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)
    opener: Callable[[Hit], None] | None = field(default=None, repr=False)

    def open_tile(self, rank: int) -> Hit:
        """The tile at `rank`, opened first if it is pending (KeyError if none)."""
        hit = self.hit(rank)
        with hit.lock:
            if hit.state == "pending" and self.opener is not None:
                self.opener(hit)
        return hit

    def open_all(self) -> None:
        """Open every pending tile (the exports need them all), a few at a time."""
        with ThreadPoolExecutor(max_workers=OPEN_THREADS) as pool:
            list(pool.map(self.open_tile, [h.rank for h in self.hits]))

    def cloud_image(self) -> bytes | None:
        """The query's image as the cloud got it (made on first use: most views never ask)."""
        if self.cloud_png is None and self.cloud_maker is not None:
            self.cloud_png = self.cloud_maker()
        return self.cloud_png

    def hit(self, rank: int) -> Hit:
        """The tile at `rank` (KeyError if none)."""
        for hit in self.hits:
            if hit.rank == rank:
                return hit
        raise KeyError(rank)

    def export_rows(self) -> list[dict[str, object]]:
        """One row per tile: ids, owner, class, rank, similarity, distance, state."""
        return [
            {
                "rank": hit.rank,
                "owner": hit.source.owner,
                "collection": hit.source.collection,
                "image_id": hit.image_id,
                "class": hit.class_name if hit.state == "shown" or hit.label else "",
                "similarity": hit.similarity,
                "distance": hit.distance,
                "source_rank": hit.source_rank,
                "state": hit.state,
                "mode": hit.mode,
            }
            for hit in self.hits
        ]

    def export_json(self) -> str:
        """The query's export as JSON (ids, scores, filters, sources)."""
        return json.dumps(
            {
                "query": self.id,
                "described": self.described,
                "created": self.created,
                "filters": self.filters,
                "sources": self.sources,
                "hits": self.export_rows(),
            },
            indent=2,
        )

    def export_csv(self) -> str:
        """The query's export as CSV (one line per tile)."""
        buffer = io.StringIO()
        rows = self.export_rows()
        columns = list(rows[0]) if rows else ["rank", "image_id", "similarity"]
        writer = csv.DictWriter(buffer, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
        return buffer.getvalue()

    def montage_png(self) -> bytes:
        """The query and its tiles side by side, with captions (the export's picture)."""
        tile, caption = 192, 34
        panels = [(self.query_png, self.query_outline, "query", self.described[:30])]
        for hit in self.hits:
            if hit.state == "shown":
                title = f"#{hit.rank} {hit.class_name}  {hit.similarity}/100"
                panels.append((hit.png, hit.outline, title, hit.source.owner))
            else:
                panels.append((b"", b"", f"#{hit.rank} not released", hit.source.owner))
        columns = min(len(panels), 6)
        rows = -(-len(panels) // columns)
        sheet = Image.new("RGB", (columns * tile, rows * (tile + caption)), "white")
        draw = ImageDraw.Draw(sheet)
        for i, (png, outline, title, subtitle) in enumerate(panels):
            x, y = (i % columns) * tile, (i // columns) * (tile + caption)
            if png:
                image = Image.open(io.BytesIO(png)).convert("RGBA")
                if outline:
                    image.alpha_composite(Image.open(io.BytesIO(outline)).convert("RGBA"))
                sheet.paste(image.convert("RGB").resize((tile - 4, tile - 4)), (x + 2, y + 2))
            else:
                draw.rectangle((x + 2, y + 2, x + tile - 3, y + tile - 3), fill=(60, 60, 60))
                draw.text((x + 12, y + tile // 2 - 6), "key not released", fill="white")
            draw.text((x + 4, y + tile + 2), title, fill="black")
            draw.text((x + 4, y + tile + 16), subtitle, fill=(90, 90, 90))
        buffer = io.BytesIO()
        sheet.save(buffer, format="PNG")
        return buffer.getvalue()


class ResultCache:
    """The latest results, in this process's memory only (decrypted images never touch disk).

    Parameters
    ----------
    size
        Results kept; the oldest goes first.
    """

    def __init__(self, size: int = 16) -> None:
        self.size = size
        self._results: OrderedDict[str, QueryResult] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, result: QueryResult) -> None:
        """Keep `result` (dropping the oldest beyond `size`)."""
        with self._lock:
            self._results[result.id] = result
            while len(self._results) > self.size:
                self._results.popitem(last=False)

    def get(self, query_id: str, sub: str) -> QueryResult | None:
        """The result `query_id` if `sub` ran it; None otherwise (gone, or someone else's)."""
        with self._lock:
            result = self._results.get(query_id)
        return result if result is not None and result.sub == sub else None


def outline_png(mask: np.ndarray | None, shape: tuple[int, ...]) -> bytes:
    """The tumour outline of `mask` as an RGBA PNG: a two-pixel red line, transparent elsewhere.

    Parameters
    ----------
    mask
        The tumour mask (None: an empty overlay).
    shape
        The image's shape.

    Returns
    -------
    bytes
        PNG bytes of the same size as the image.
    """
    rgba = np.zeros((*shape[:2], 4), dtype=np.uint8)
    if mask is not None and mask.shape == tuple(shape[:2]):
        inside = np.asarray(mask, dtype=bool)
        padded = np.pad(inside, 1)
        interior = (
            padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:] & inside
        )
        edge = inside & ~interior
        # thicken by one pixel so that the line survives the page's downscaling
        grown = np.pad(edge, 1)
        edge = edge | grown[:-2, 1:-1] | grown[2:, 1:-1] | grown[1:-1, :-2] | grown[1:-1, 2:]
        rgba[edge] = (255, 70, 70, 255)
    buffer = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buffer, format="PNG")
    return buffer.getvalue()


def shown_uint8(image: np.ndarray) -> np.ndarray:
    """The 8-bit version of a plain image for display (unchanged when already 8-bit)."""
    image = np.asarray(image)
    return image if image.dtype == np.uint8 else to_uint8(image)[0]


def _cloud_view(
    encryptor: Encryptor, sources: list[Source], pixels: np.ndarray, mask: np.ndarray
) -> tuple[Callable[[], bytes] | None, str]:
    """What the cloud got of the query from the first source: (maker of its image, words)."""
    if not sources:
        return None, "nothing was sent"
    source = sources[0]
    owner = None if source.owner == encryptor.tenant else source.owner
    if owner is None and encryptor.stored_match(source.collection, pixels, mask) is not None:
        return None, (
            "no image and no vector: the query is one of this hospital's stored images, "
            "searched by reference to it"
        )
    mode = encryptor.mode_of(source.collection, owner)
    if mode != "pe":
        what = {
            "sealed": "only a feature vector computed here from the query's tumour region",
            "pe-roi": "the query's tumour region in scrambled, encrypted tiles",
        }.get(mode, "no image of the query")
        return None, f"{mode}: {what} (not shown here)"

    def cipher_png() -> bytes:
        # The same content-derived id, key and cipher as the search sent (`Encryptor.search`).
        protected = encryptor.protect(
            pixels,
            mask,
            opaque_id=encryptor.query_id_for(pixels, mask),
            role="query",
            collection=source.collection,
            owner=owner,
        )
        return encode_png(protected.cipher)

    return cipher_png, (
        "pe: the query's cipher image and its mask (the tumour's shape is visible; the pixels "
        "are encrypted under a key derived from the query's content)"
    )


def run_query(
    encryptor: Encryptor,
    peers: PeerKeys,
    *,
    sub: str,
    pixels: np.ndarray,
    mask: np.ndarray,
    described: str,
    sources: list[Source],
    k: int,
    label: int | None = None,
    exclude: str | None = None,
    budget: Callable[[], str | None] | None = None,
) -> QueryResult:
    """Search `sources` with a plain query and choose its `k` tiles; every step audited.

    The tiles are left pending: each is opened when the page asks for it
    (`QueryResult.open_tile`). Only with a class filter are the candidates whose class the
    cloud does not know (a sealed image that is no training template) opened here, in order,
    since whether they belong on the page is known only then.

    Parameters
    ----------
    encryptor
        This hospital's encryptor (search, open, audit log).
    peers
        Other hospitals' key release.
    sub
        The signed-in user.
    pixels, mask
        The plain query image and its tumour mask.
    described
        What the query is, for the page and the export.
    sources
        Collections to search.
    k
        Tiles wanted.
    label
        Keep hits of this class only (None: all).
    exclude
        Image id to leave out (the stored study the query was taken from).
    budget
        Called before each hit is opened: None to go on, or why the user's decryption
        budget refuses it (the tile then says so).

    Returns
    -------
    QueryResult
        The tiles, best first.

    Raises
    ------
    ValueError
        A bad query (its message says what is wrong); nothing was searched.
    """
    started = time.perf_counter()
    audit = encryptor.audit
    result = QueryResult(
        id=secrets.token_hex(12),
        sub=sub,
        created=time.time(),
        described=described,
        query_png=encode_png(shown_uint8(pixels)),
        query_outline=outline_png(mask, pixels.shape),
        cloud_png=None,
        cloud_text="",
        filters={"k": k, "class": label, "hospitals": sorted({s.owner for s in sources})},
    )

    def search(source: Source) -> tuple[Source, object, str]:
        owner = None if source.owner == encryptor.tenant else source.owner
        try:
            answer = encryptor.search(source.collection, pixels, mask, MAX_K, owner)
        except GatewayError as exc:
            return source, None, f"{exc.status}: {exc.detail}"
        except httpx.HTTPError as exc:
            return source, None, f"the cloud did not answer ({type(exc).__name__})"
        return source, answer, encryptor.mode_of(source.collection, owner)

    # The collections are searched at once (a bad query raises here, before anything opens).
    with ThreadPoolExecutor(max_workers=OPEN_THREADS) as pool:
        answers = list(pool.map(search, sources))
    found: list[tuple[Source, list, str]] = []
    for source, answer, mode in answers:
        if answer is None:
            result.sources.append({"source": source.label, "error": mode})
            continue
        result.sources.append(
            {
                "source": source.label,
                "mode": mode,
                "model_version": answer.model_version,
                "n_database": answer.n_database,
            }
        )
        found.append((source, [h for h in answer.hits if h.image_id != exclude], mode))
    # One scale for every collection searched (pooled ranks: `similarity`).
    distances = [np.array([h.distance for h in hits]) for _, hits, _ in found]
    scores = similarity_scores(distances)
    candidates: list[tuple[float, float, Source, object, str]] = []
    for (source, hits, mode), score, relative in zip(
        found, scores, map(relative_distances, distances), strict=True
    ):
        candidates += [
            (float(s), float(r), source, hit, mode)
            for s, r, hit in zip(score, relative, hits, strict=True)
        ]
    audit.write(
        action="ui-search",
        sub=sub,
        outcome="ok",
        query=result.id,
        sources=[s.label for s in sources],
        candidates=len(candidates),
    )
    result.cloud_maker, result.cloud_text = _cloud_view(encryptor, sources, pixels, mask)
    candidates.sort(key=lambda c: (-c[0], c[1]))
    if label is not None:
        # the cloud's own label of a template already says whether it is of that class
        candidates = [c for c in candidates if c[3].label is None or c[3].label == label]

    def open_one(tile: Hit) -> None:
        refusal = budget() if budget is not None else None
        if refusal is not None:
            tile.state, tile.reason = "failed", refusal
            return
        _open_hit(encryptor, peers, tile, sub=sub, query_id=result.id)

    result.opener = open_one
    queue = iter(candidates[: MAX_OPENED_PER_HIT * k])
    with ThreadPoolExecutor(max_workers=OPEN_THREADS) as pool:
        while len(result.hits) < k:
            batch = [
                Hit(
                    rank=0,
                    source=source,
                    image_id=hit.image_id,
                    source_rank=hit.rank,
                    distance=float(hit.distance),
                    similarity=round(score),
                    label=hit.label,
                    mode=mode,
                )
                for score, _, source, hit, mode in islice(queue, k - len(result.hits))
            ]
            if not batch:
                break
            # With a class filter, a hit of unknown class is opened now (in parallel, in
            # order, batch after batch until k are chosen): only then is its class known.
            list(pool.map(open_one, [t for t in batch if label is not None and t.label is None]))
            for tile in batch:
                if label is not None and tile.state == "shown" and tile.label != label:
                    continue  # its class was known only once opened (sealed)
                if label is not None and tile.state != "shown" and tile.label is None:
                    continue  # of unknown class: not shown under a class filter
                tile.rank = len(result.hits) + 1
                result.hits.append(tile)
    result.timings_ms = {"search": round(1000 * (time.perf_counter() - started), 1)}
    return result


def _open_hit(encryptor: Encryptor, peers: PeerKeys, tile: Hit, *, sub: str, query_id: str) -> None:
    """Open `tile` with this hospital's key or its owner's released one; audit the outcome."""
    source = tile.source
    record = {
        "sub": sub,
        "via": "ui",
        "query": query_id,
        "owner": source.owner,
        "collection": source.collection,
        "image_id": tile.image_id,
    }
    own = source.owner == encryptor.tenant
    started = time.perf_counter()
    try:
        if own:
            opened = encryptor.fetch_plain(source.collection, tile.image_id)
        else:
            try:
                released = peers.release(source.owner, source.collection, tile.image_id)
            except NotReleased as exc:
                tile.state, tile.reason = "not-released", exc.reason
                encryptor.audit.write(
                    action="key-request", outcome="not released", reason=exc.reason, **record
                )
                return
            encryptor.audit.write(action="key-request", outcome="released", **record)
            opened = encryptor.open_released(
                source.collection, tile.image_id, source.owner, released
            )
    except (IntegrityError, GatewayError, ValueError, httpx.HTTPError) as exc:
        tile.state, tile.reason = "failed", str(exc)[:200] or type(exc).__name__
        encryptor.audit.write(action="decrypt", outcome="refused", reason=tile.reason, **record)
        return
    encryptor.audit.write(action="decrypt", outcome="ok", **record)
    image = np.asarray(opened.image)
    tile.png = encode_png(shown_uint8(image))
    tile.outline = outline_png(opened.mask, image.shape)
    tile.exact = None if image.dtype == np.uint8 else image
    if opened.label is not None:
        tile.label = int(opened.label)
    tile.open_ms = round(1000 * (time.perf_counter() - started), 1)
    tile.state = "shown"
