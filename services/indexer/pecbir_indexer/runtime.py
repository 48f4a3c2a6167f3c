"""What the tasks work with: object store, event bus, a cache of loaded model versions."""

from __future__ import annotations

import io
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from pecbir_contracts.events import EventBus
from pecbir_contracts.layout import CollectionLayout
from pecbir_contracts.store import ObjectStore
from pecbir_indexer.settings import IndexerSettings
from pecbir_platform.bus import bus_from_url


def feature_backend(settings: IndexerSettings) -> str:
    """ "numpy", or "torch:<device>" with the device resolved; ValueError where the device
    asked for is not there (readiness fails), ImportError where torch is not installed."""
    if settings.feature_backend == "numpy":
        return "numpy"
    from pecore.torch_features import resolve_device

    return f"torch:{resolve_device(settings.feature_device)}"


@dataclass
class Runtime:
    settings: IndexerSettings
    store: ObjectStore
    bus: EventBus
    _models: OrderedDict[tuple[str, str, str], object] = field(default_factory=OrderedDict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def pipeline_options(self) -> dict[str, object]:
        """How this worker runs a pipeline: threads and feature back end (not saved with it)."""
        return {
            "n_jobs": self.settings.encode_threads,
            "backend": self.settings.feature_backend,
            "device": self.settings.feature_device,
        }

    def feature_backend(self) -> str:
        """ "numpy", or "torch:<device>" (the model manifest records it)."""
        return feature_backend(self.settings)

    def model(self, layout: CollectionLayout, version: str):  # -> CBIRPipeline
        """The trained pipeline of `version` (loaded once, kept in a small LRU cache)."""
        from pecore.pipeline import CBIRPipeline

        key = (layout.tenant, layout.collection, version)
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
        pipeline = CBIRPipeline.load(io.BytesIO(self.store.get(layout.model(version))))
        pipeline.set_params(**self.pipeline_options())
        with self._lock:
            self._models[key] = pipeline
            while len(self._models) > self.settings.model_cache_size:
                self._models.popitem(last=False)
        return pipeline


_runtime: Runtime | None = None
_runtime_lock = threading.Lock()


def get_runtime() -> Runtime:
    """The process-wide runtime, built from the environment on first use."""
    global _runtime
    with _runtime_lock:
        if _runtime is None:
            settings = IndexerSettings()
            store = settings.open_store()
            _runtime = Runtime(
                settings, store, bus_from_url(settings.events_url or settings.broker_url)
            )
        return _runtime


def configure_runtime(
    store: ObjectStore, bus: EventBus, settings: IndexerSettings | None = None
) -> Runtime:
    """Use these back ends in this process (embedded mode, tests)."""
    global _runtime
    with _runtime_lock:
        _runtime = Runtime(settings or IndexerSettings(), store, bus)
        return _runtime
