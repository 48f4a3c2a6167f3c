"""Per-collection state of the search service, catch-up from the store and live following.

For each (tenant, collection) the engine holds a *serving* version (model + vector index) and
possibly a *pending* one that a re-index is filling. The pending version replaces the serving
one, in a single reference swap, as soon as it holds every image the serving one holds
(but those the indexer gave up on under the pending version: `IndexFailedEvent`);
queries always see one consistent (model, matrix) pair. While a version is pending, uploads
are indexed with both (`records.live_versions`), so they are searchable at once and present
once after the swap.

Start-up reads a version's snapshot (`records.FeatureSnapshot`, written by the indexer's
janitor) and then only the feature records it lacks, several at a time, instead of one GET
per record.

Images the owner retired (a corrected version replaced them) are kept out: their ids are
read from the store at catch-up (`retired/`), a `RetireEvent` drops the vector from every
version held, and a vector of a retired id that arrives later (a redelivered or re-indexed
one) is ignored.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from pecbir_contracts.events import (
    AnyEvent,
    EventBus,
    IndexFailedEvent,
    RetireEvent,
    VectorEvent,
)
from pecbir_contracts.layout import (
    TENANTS_PREFIX,
    CollectionLayout,
    check_name,
    version_number,
)
from pecbir_contracts.records import (
    FeatureRecord,
    FeatureSnapshot,
    read_current_version,
    read_indexed_version,
    read_retired,
    read_version_failures,
)
from pecbir_contracts.schemas import IndexStatus
from pecbir_contracts.store import ObjectNotFound, ObjectStore
from pecbir_platform.observability import request_context
from pecbir_platform.store import list_children
from pecbir_search.index import ExactVectorIndex, VectorIndex, compile_kernels

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Version:
    """A model version with its vectors: what a query needs, swapped as one object."""

    name: str
    pipeline: object  # pecore.pipeline.CBIRPipeline
    index: VectorIndex
    # Images the indexer gave up on under this version when it was loaded (the swap to it
    # does not wait for them).
    failed: frozenset[str] = frozenset()


class CollectionState:
    def __init__(self, layout: CollectionLayout) -> None:
        self.layout = layout
        self.serving: Version | None = None
        self.pending: Version | None = None
        # Ids the serving version holds and the pending one not yet: the swap waits for none.
        self._missing: set[str] = set()
        # Ids the indexer gave up on under the pending version: never waited for.
        self._failed: set[str] = set()
        # Ids the owner retired: never (again) in an index of this collection.
        self.retired: set[str] = set()
        self.lock = threading.RLock()

    def set_pending(self, version: Version | None) -> None:
        """Start filling `version` (call with `lock` held); it takes over once it holds every
        image the serving version holds."""
        self.pending = version
        serving = self.serving
        self._failed = set(version.failed) if version is not None else set()
        if version is None or serving is None:
            self._missing = set()
        else:
            self._missing = {
                i for i in serving.index.ids() if i not in version.index and i not in self._failed
            }
        self._maybe_swap()

    def upsert(self, target: Version, image_id: str, vector: np.ndarray, label: int | None) -> None:
        """Add a vector to the serving or pending version (call with `lock` held); a retired
        image's (a redelivered or re-indexed one) is ignored."""
        if image_id in self.retired:
            return
        target.index.upsert(image_id, vector, label)
        pending = self.pending
        if pending is None:
            return
        if target is pending:
            self._missing.discard(image_id)
        elif (
            target is self.serving
            and image_id not in pending.index
            and image_id not in self._failed
        ):
            self._missing.add(image_id)

    def version_failed(self, version: str, image_id: str) -> None:
        """The indexer gave up on `image_id` under `version` (call with `lock` held): if that
        version is filling, the swap no longer waits for the image."""
        pending = self.pending
        if pending is not None and pending.name == version:
            self._failed.add(image_id)
            self._missing.discard(image_id)

    def retire(self, image_id: str) -> None:
        """Drop a retired image from every version held, for good (call with `lock` held)."""
        self.retired.add(image_id)
        self._missing.discard(image_id)
        for held in (self.serving, self.pending):
            if held is not None:
                held.index.remove(image_id)

    def status(self) -> IndexStatus:
        serving, pending = self.serving, self.pending
        return IndexStatus(
            collection=self.layout.collection,
            owner=self.layout.tenant,
            serving_version=serving.name if serving else None,
            n_vectors=len(serving.index) if serving else 0,
            pending_version=pending.name if pending else None,
            pending_vectors=len(pending.index) if pending else 0,
        )

    def _maybe_swap(self) -> None:
        pending, serving = self.pending, self.serving
        if pending is None:
            return
        if serving is None or not self._missing:
            self.serving, self.pending, self._missing = pending, None, set()
            log.info(
                "%s now serves %s (%d vectors)", self.layout.root, pending.name, len(pending.index)
            )


class SearchEngine:
    """Every collection's serving/pending versions, loaded from the store, kept up to date.

    Parameters
    ----------
    store
        The object store the indexer writes models and feature records to.
    bus
        The event stream to follow (None: catch-up from the store only).
    encode_threads
        Threads of a loaded pipeline for featurising queries.
    index_factory
        Makes the empty index of a version from ``(version, dim)``: any `VectorIndex`
        (default: the exact in-memory index).
    read_threads
        Feature records read at once when a version is loaded (those its snapshot lacks).
    """

    def __init__(
        self,
        store: ObjectStore,
        bus: EventBus | None,
        encode_threads: int | None = 1,
        *,
        index_factory: Callable[[str, int], VectorIndex] = ExactVectorIndex,
        read_threads: int = 8,
    ) -> None:
        self.store = store
        self.bus = bus
        self.encode_threads = encode_threads
        self.index_factory = index_factory
        self.read_threads = max(1, read_threads)
        self._collections: dict[tuple[str, str], CollectionState] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.events_applied = 0

    # -- loading -------------------------------------------------------------------------------
    def _load_version(
        self,
        layout: CollectionLayout,
        version: str,
        retired: set[str] | frozenset[str] = frozenset(),
    ) -> Version | None:
        from pecore.pipeline import CBIRPipeline

        try:
            pipeline = CBIRPipeline.load(io.BytesIO(self.store.get(layout.model(version))))
        except ObjectNotFound:
            return None
        pipeline.n_jobs = self.encode_threads
        records = {
            image_id: record
            for image_id, record in self._snapshot_records(layout, version).items()
            if image_id not in retired
        }
        keys = {}
        for key in self.store.list(layout.features_prefix(version)):
            image_id = layout.image_id_of_features(version, key)
            if image_id is not None and image_id not in records and image_id not in retired:
                keys[image_id] = key
        if keys:
            with ThreadPoolExecutor(min(self.read_threads, len(keys))) as pool:
                read = pool.map(self.store.get, keys.values())
                for image_id, data in zip(keys, read, strict=True):
                    records[image_id] = FeatureRecord.from_bytes(data)
        dim = next(iter(records.values())).vector.shape[0] if records else pipeline.projected_dim
        index = self.index_factory(version, dim)
        # In id order whatever came from where: the same insertion order (ties) every start.
        for image_id in sorted(records):
            record = records[image_id]
            index.upsert(image_id, record.vector, record.label)
        log.info(
            "loaded %s %s: %d vectors, %d read one by one",
            layout.root,
            version,
            len(index),
            len(keys),
        )
        failed = read_version_failures(self.store, layout, version)
        return Version(version, pipeline, index, failed)

    def _snapshot_records(self, layout: CollectionLayout, version: str) -> dict[str, FeatureRecord]:
        try:
            snapshot = FeatureSnapshot.from_bytes(self.store.get(layout.features_snapshot(version)))
        except ObjectNotFound:
            return {}
        except (ValueError, KeyError, OSError) as exc:  # the records are the truth: read them
            log.warning(
                "snapshot of %s %s unreadable (%s): reading records", layout.root, version, exc
            )
            return {}
        if snapshot.version != version:
            log.warning(
                "snapshot of %s %s names %s: ignored", layout.root, version, snapshot.version
            )
            return {}
        return snapshot.records()

    def collection(self, tenant: str, collection: str) -> CollectionState:
        """The state of a collection, caught up from the store on first use."""
        key = (tenant, collection)
        with self._lock:
            state = self._collections.get(key)
            if state is None:
                state = self._collections[key] = CollectionState(CollectionLayout(*key))
                fresh = True
            else:
                fresh = False
        with state.lock:  # also waits for a catch-up another thread started
            if fresh:
                self._catch_up(state)
        return state

    def _catch_up(self, state: CollectionState) -> None:
        layout = state.layout
        state.retired.update(read_retired(self.store, layout))
        current = read_current_version(self.store, layout)
        if current is None:
            return
        indexed = read_indexed_version(self.store, layout)
        if indexed is not None:
            # Serve the newest version whose re-index finished; a newer current one fills.
            serving = None
            if version_number(indexed) < version_number(current):
                serving = self._load_version(layout, indexed, state.retired)
            if serving is None:
                state.serving = self._load_version(layout, current, state.retired)
            else:
                state.serving = serving
                state.set_pending(self._load_version(layout, current, state.retired))
            log.info("caught up %s: %s", layout.root, state.status().model_dump())
            return
        # A store of an earlier release (no indexed.json): the previous version serves while
        # it holds more vectors.
        newest = self._load_version(layout, current, state.retired)
        previous = None
        number = version_number(current)
        for key in reversed(self.store.list(layout.models_prefix)):
            version = layout.version_of_model_key(key)
            if (
                version
                and version_number(version) < number
                and self.store.exists(layout.manifest(version))
            ):
                previous = self._load_version(layout, version, state.retired)
                break
        if previous is not None and (newest is None or len(previous.index) > len(newest.index)):
            state.serving = previous
            state.set_pending(newest)
        else:
            state.serving = newest
        log.info("caught up %s: %s", layout.root, state.status().model_dump())

    def catch_up_all(self) -> int:
        """Load every collection that has a current model (service start).

        Finds them level by level (tenants, then their collections: one delimited listing
        each) rather than by listing every object of the store.
        """
        count = 0
        for tenant in list_children(self.store, TENANTS_PREFIX):
            try:
                check_name(tenant, "tenant")
            except ValueError:
                continue  # not written by the gateway
            for collection in list_children(self.store, f"{TENANTS_PREFIX}{tenant}/collections/"):
                try:
                    layout = CollectionLayout(tenant, collection)
                except ValueError:
                    continue
                if self.store.exists(layout.current_model):
                    self.collection(layout.tenant, layout.collection)
                    count += 1
        return count

    # -- events --------------------------------------------------------------------------------
    def apply(self, event: AnyEvent) -> None:
        state = self.collection(event.tenant, event.collection)
        with state.lock:
            if isinstance(event, RetireEvent):
                state.retire(event.image_id)
            else:
                target = self._version_for(state, event.version)
                if target is not None and isinstance(event, VectorEvent):
                    state.upsert(target, event.image_id, np.asarray(event.vector), event.label)
                elif target is not None and isinstance(event, IndexFailedEvent):
                    state.version_failed(event.version, event.image_id)
            state._maybe_swap()
        self.events_applied += 1

    def _version_for(self, state: CollectionState, version: str) -> Version | None:
        for held in (state.serving, state.pending):
            if held is not None and held.name == version:
                return held
        newest = max(
            (version_number(v.name) for v in (state.serving, state.pending) if v), default=0
        )
        if version_number(version) < newest:
            return None  # an old version: ignore
        loaded = self._load_version(state.layout, version, state.retired)
        if loaded is None:
            log.warning("event for unknown model %s of %s", version, state.layout.root)
            return None
        self._catch_up_indexed(state, version)
        state.set_pending(loaded)
        return loaded

    def _catch_up_indexed(self, state: CollectionState, newer: str) -> None:
        """Before a newer version starts filling, serve the version the store records as
        indexed if this replica still serves an older one (its swap lagged behind the store):
        new uploads are no longer indexed with versions older than the indexed one, so
        keeping an older one until `newer` is complete would hide them that long."""
        indexed = read_indexed_version(self.store, state.layout)
        serving = state.serving
        if indexed is None or serving is None:
            return
        if not version_number(serving.name) < version_number(indexed) < version_number(newer):
            return
        # Loaded from the store: every record written so far (also those whose events this
        # replica has not applied yet); later ones arrive as events and are upserted.
        promoted = self._load_version(state.layout, indexed)
        if promoted is None:
            return
        state.serving = promoted
        state.set_pending(None)
        log.info(
            "%s now serves %s (indexed in the store; %d vectors)",
            state.layout.root,
            promoted.name,
            len(promoted.index),
        )

    def start(self) -> None:
        """Catch up from the store, then follow the event stream from before the catch-up."""
        compile_kernels()  # before serving: the first query must not pay the JIT compile
        after = None
        if self.bus is not None:
            try:
                after = self.bus.last_id()
            except Exception as exc:
                # Redis down while the service (re)starts (issue 15): serve what the store
                # holds, and once the stream is back follow it from its start. The position
                # before the catch-up is unknown, so an event may have come during it;
                # replaying is harmless (vectors are upserted by id, old versions ignored).
                log.warning("event stream unavailable at start (%s): will replay it", exc)
                after = "0-0"
        self.catch_up_all()
        if self.bus is None:
            return
        self._thread = threading.Thread(
            target=self._follow, args=(after,), name="pecbir-search-follow", daemon=True
        )
        self._thread.start()

    def _follow(self, after: str) -> None:
        assert self.bus is not None
        while not self._stop.is_set():
            try:
                events = self.bus.read(after, block_ms=500)
            except Exception as exc:
                log.warning("event stream unavailable (%s); retrying", exc)
                time.sleep(1.0)
                continue
            for event_id, event in events:
                with request_context(event.request_id):
                    try:
                        self.apply(event)
                        log.debug("applied %s event %s", event.kind, event_id)
                    except Exception:
                        log.exception("could not apply event %s", event_id)
                after = event_id

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
