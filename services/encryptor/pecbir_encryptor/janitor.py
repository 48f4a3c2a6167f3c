"""The encryptor's housekeeping, run periodically: waiting halves that expire, and
the cloud told which versions of corrected images are replaced (`PendingJanitor.run`, a task
of the app's event loop).

* **Expiry** (issue 14): an image whose SEG never comes, or a SEG whose image never comes,
  would wait in the pending store (`pecbir_encryptor.pending`) for ever. Each sweep removes
  the halves older than `PECBIR_ENCRYPTOR_PENDING_TTL_S` (default 90 days; a re-sent half
  starts its clock again), logs and audits each one (collection, kind, pseudonym, age: never
  a DICOM UID) and counts them (`pecbir_encryptor_pending_expired_total{kind}`). What waits,
  and for how long, is on `/metrics` (`pecbir_encryptor_pending_waiting`,
  `pecbir_encryptor_pending_oldest_seconds`), in `/healthz`'s details for the service's own
  tokens, and printed by `pecbir-encryptor pending`.
* **Retirement**: a corrected SEG makes a new version of an image; once it is searchable the
  old version is retired at the hospital (its hits dropped) and in the cloud (the gateway's
  retire call: out of the index and the training set). Searches do this as they meet such a
  version (`Encryptor.retired_versions`); the sweep does it too, so that a correction is
  completed in the cloud even if nobody searches the collection.
"""

from __future__ import annotations

import logging
import time

from prometheus_client import Counter, Gauge

from pecbir_encryptor.core import Encryptor
from pecbir_encryptor.pending import Expired

__all__ = ["EXPIRED", "PendingJanitor"]

log = logging.getLogger(__name__)

EXPIRED = Counter(
    "pecbir_encryptor_pending_expired",
    "Halves of image <-> SEG pairs removed because the other half did not come in time",
    ["kind"],
)
WAITING = Gauge(
    "pecbir_encryptor_pending_waiting",
    "Halves of image <-> SEG pairs waiting for the other half",
    ["collection", "kind"],
)
OLDEST = Gauge(
    "pecbir_encryptor_pending_oldest_seconds",
    "How long the oldest waiting half has waited",
    ["collection", "kind"],
)


class PendingJanitor:
    """Sweeps the pending store every `interval_s` seconds (see the module's text).

    Parameters
    ----------
    encryptor
        The owner side (its `pending` store, audit log and gateway client).
    ttl_s
        Time to live of a waiting half; None: halves never expire.
    interval_s
        Seconds between sweeps.
    """

    def __init__(self, encryptor: Encryptor, ttl_s: float | None, interval_s: float) -> None:
        self.encryptor = encryptor
        self.ttl_s = ttl_s
        self.interval_s = interval_s
        self.last_sweep: float | None = None

    def sweep(self, now: float | None = None) -> list[Expired]:
        """One pass: expire, retire replaced versions in the cloud, update the gauges."""
        pending = self.encryptor.pending
        if pending is None:
            return []
        expired = pending.expire(self.ttl_s, now) if self.ttl_s is not None else []
        for half in expired:
            log.warning(
                "pending %s %s of %s expired after %.0f s without its other half",
                half.kind,
                half.key,
                half.collection,
                half.age_s,
            )
            self.encryptor.audit.write(
                action="pending-expired",
                collection=half.collection,
                kind=half.kind,
                pseudonym=half.key,
                age_s=half.age_s,
            )
            EXPIRED.labels(half.kind).inc()
        for collection in pending.collections_with_versions():
            try:
                self.encryptor.retired_versions(collection)
            except Exception as exc:  # the cloud away: the next sweep tries again
                log.warning("could not settle corrected versions of %s: %s", collection, exc)
        for collection, kinds in pending.status(now).items():
            for kind, entry in kinds.items():
                WAITING.labels(collection, kind).set(entry["waiting"])
                OLDEST.labels(collection, kind).set(entry["oldest_s"])
        self.last_sweep = time.time() if now is None else now
        return expired

    def status(self) -> dict[str, object]:
        """What waits, the time to live and the last sweep (for `/healthz` and the CLI)."""
        pending = self.encryptor.pending
        return {
            "ttl_s": self.ttl_s,
            "last_sweep": self.last_sweep,
            "collections": pending.status() if pending is not None else {},
        }

    async def run(self) -> None:
        """Sweep now and then every `interval_s` seconds, until cancelled: a task of the
        app's event loop, each sweep on its worker threads. Not a thread of its own: one more
        long-lived thread in the process made glibc keep ~130 MB more of the ingest's
        allocations resident (measured with bench-pacs)."""
        import anyio

        while True:
            try:
                await anyio.to_thread.run_sync(self.sweep)
            except Exception:
                log.exception("pending-store sweep failed; next in %.0f s", self.interval_s)
            await anyio.sleep(self.interval_s)
