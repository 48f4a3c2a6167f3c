"""Compatibility path: the old `pecbir_indexer.app:celery_app` (use `pecbir_indexer.celery:app`).

Kept only while the process harness (`libs/harness`) and `pecbir serve` still name the old
path; delete it once they use `pecbir_indexer.celery:app` and `pecbir_indexer.tasks`.
"""

from __future__ import annotations

from pecbir_indexer.celery import app as celery_app
from pecbir_indexer.tasks import run_eagerly, use_eager_mode

__all__ = ["celery_app", "run_eagerly", "use_eager_mode"]
