"""Operations hooks of the search service: its metrics and readiness checks (used by `app`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import GaugeMetricFamily

from pecbir_contracts.layout import version_number
from pecbir_platform.observability import (
    Check,
    instrument_app,
    register_collector,
    store_check,
)
from pecbir_search.engine import SearchEngine


class SearchIndexCollector:
    """Vectors held and model versions served, read from the engine at scrape time."""

    def __init__(self, engine: SearchEngine) -> None:
        self.engine = engine

    def describe(self) -> list:
        # No up-front names: search and indexer both report `pecbir_model_version`, each from
        # its own process; tests that load both into one registry must not clash.
        return []

    def collect(self) -> Iterator[GaugeMetricFamily]:
        vectors = GaugeMetricFamily(
            "pecbir_search_vectors",
            "Vectors held in memory, by collection and role (serving/pending)",
            labels=["tenant", "collection", "role", "version"],
        )
        model = GaugeMetricFamily(
            "pecbir_model_version",
            "Model version number (vNNNN → NNNN) a service uses for a collection",
            labels=["service", "tenant", "collection", "role"],
        )
        held_bytes = GaugeMetricFamily(
            "pecbir_search_index_bytes",
            "Bytes allocated by the vector matrices (capacity, not only the rows in use)",
        )
        total_bytes = 0
        for state in list(self.engine._collections.values()):
            layout = state.layout
            for role, held in (("serving", state.serving), ("pending", state.pending)):
                if held is None:
                    continue
                labels = [layout.tenant, layout.collection, role]
                vectors.add_metric([*labels, held.name], len(held.index))
                model.add_metric(["search", *labels], version_number(held.name))
                total_bytes += held.index.nbytes
        held_bytes.add_metric([], total_bytes)
        events = GaugeMetricFamily(
            "pecbir_search_events_applied", "Events applied since the service started"
        )
        events.add_metric([], self.engine.events_applied)
        yield from (vectors, model, held_bytes, events)


def instrument(app: Any, engine: SearchEngine, following: bool) -> None:
    register_collector("search_index", SearchIndexCollector(engine))
    instrument_app(app, "search", readiness_checks(engine, following))


def readiness_checks(engine: SearchEngine, following: bool) -> dict[str, Check]:
    """Store reachable, model code importable, and (when following) event stream alive."""

    def models() -> bool:
        import pecore.pipeline  # noqa: F401  (loading a model needs it)

        return True

    checks: dict[str, Check] = {"store": store_check(engine.store), "models": models}
    if following and engine.bus is not None:
        bus: Any = engine.bus

        def events() -> bool:
            bus.last_id()
            thread = engine._thread
            if thread is not None and not thread.is_alive():
                raise RuntimeError("event follower thread died")
            return True

        checks["events"] = events
    return checks
