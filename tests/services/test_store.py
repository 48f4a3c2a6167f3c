"""Object store: filesystem back end (unit) and the S3 path against moto_server (integration)."""

from __future__ import annotations

import io
import multiprocessing
import traceback
from collections.abc import Callable
from datetime import timedelta
from functools import partial

import httpx
import pytest

from pecbir_contracts.store import ObjectNotFound, ObjectStore, UnsupportedStore
from pecbir_platform.store import FilesystemStore, MinioStore, check_put_if_absent, store_from_url
from tests.services.helpers import OverwritingStore

RACERS, ROUNDS = 8, 5


def _exercise(store) -> None:
    store.put("tenants/a/x/1.bin", b"one")
    store.put("tenants/a/x/2.bin", b"two" * 10_000)
    store.put("tenants/b/y.bin", b"b")
    assert store.get("tenants/a/x/1.bin") == b"one"
    assert b"".join(store.iter_chunks("tenants/a/x/2.bin", 1000)) == b"two" * 10_000
    assert store.list("tenants/a/") == ["tenants/a/x/1.bin", "tenants/a/x/2.bin"]
    assert store.list("tenants/a/x/1") == ["tenants/a/x/1.bin"]
    assert store.list("tenants/zzz/") == []
    assert store.exists("tenants/b/y.bin") and not store.exists("tenants/b/none")
    assert store.put_if_absent("tenants/b/once", b"1") is True
    assert store.put_if_absent("tenants/b/once", b"2") is False
    assert store.get("tenants/b/once") == b"1"
    store.put("tenants/a/x/1.bin", b"replaced")
    assert store.get("tenants/a/x/1.bin") == b"replaced"
    store.delete("tenants/b/y.bin")
    with pytest.raises(ObjectNotFound):
        store.get("tenants/b/y.bin")
    for bad in ("", "/abs", "a/../b", "a//b"):
        with pytest.raises(ValueError):
            store.put(bad, b"x")


def _claim(open_store: Callable[[], ObjectStore], racer: int, barrier, results) -> None:
    """One racing process: its own store object, put_if_absent on each round's key."""
    try:
        store = open_store()
        won = []
        for round_ in range(ROUNDS):
            barrier.wait(timeout=120)
            won.append(store.put_if_absent(f"race/{round_}.json", f"racer {racer}".encode()))
        results.put((racer, won))
    except BaseException:
        results.put((racer, traceback.format_exc()))


def _race(open_store: Callable[[], ObjectStore]) -> None:
    """RACERS processes (not threads: nothing in-process may serialise them) call
    put_if_absent on one key at the same moment, ROUNDS times: one wins each round, and
    the object holds the winner's bytes."""
    spawn = multiprocessing.get_context("spawn")
    barrier, results = spawn.Barrier(RACERS), spawn.Queue()
    racers = [
        spawn.Process(target=_claim, args=(open_store, i, barrier, results)) for i in range(RACERS)
    ]
    for process in racers:
        process.start()
    try:
        outcome = dict(results.get(timeout=300) for _ in racers)
    finally:
        for process in racers:
            process.join(30)
            if process.is_alive():
                process.kill()
    failed = {racer: out for racer, out in outcome.items() if isinstance(out, str)}
    assert not failed, failed
    store = open_store()
    for round_ in range(ROUNDS):
        winners = [racer for racer, won in outcome.items() if won[round_]]
        assert len(winners) == 1, f"round {round_}: racers {winners} all created the key"
        assert store.get(f"race/{round_}.json") == f"racer {winners[0]}".encode()


def test_filesystem_store(tmp_path):
    store = FilesystemStore(tmp_path)
    _exercise(store)
    assert store.presigned_get_url("tenants/a/x/1.bin", timedelta(seconds=5)) is None
    assert not list(tmp_path.rglob(".tmp-*"))
    assert isinstance(store_from_url(f"file://{tmp_path}"), FilesystemStore)


def test_filesystem_put_if_absent_is_atomic_across_processes(tmp_path):
    _race(partial(FilesystemStore, tmp_path))
    assert not list(tmp_path.rglob(".tmp-*"))


def test_start_up_check_refuses_a_store_that_overwrites(tmp_path):
    check_put_if_absent(FilesystemStore(tmp_path / "good"))
    with pytest.raises(UnsupportedStore, match="If-None-Match"):
        check_put_if_absent(OverwritingStore(tmp_path / "bad"))
    # The probe cleans up after itself, whatever the verdict.
    assert FilesystemStore(tmp_path).list("") == []


@pytest.mark.integration
def test_minio_client_against_moto_server(tmp_path):
    from pecbir_harness.procs import moto_s3

    with moto_s3() as endpoint:
        store = MinioStore(endpoint, access_key="test", secret_key="test-secret", bucket="pecbir")
        _exercise(store)
        # A presigned URL is a plain HTTP GET (moto does not enforce signature or expiry:
        # this checks the URL shape, not S3 security).
        url = store.presigned_get_url("tenants/a/x/1.bin", timedelta(minutes=5))
        assert httpx.get(url).content == b"replaced"
        via_url = store_from_url(
            endpoint, access_key="test", secret_key="test-secret", bucket="pecbir"
        )
        assert via_url.get("tenants/a/x/1.bin") == b"replaced"


class MetadataConditionStore(MinioStore):
    """The condition passed the obvious way: `put_object` sends it as user metadata
    (x-amz-meta-if-none-match), which the store ignores."""

    def put_if_absent(self, key: str, data: bytes, content_type: str = "") -> bool:
        metadata = {"If-None-Match": "*"}
        self._client.put_object(self.bucket, key, io.BytesIO(data), len(data), metadata=metadata)
        return True


@pytest.mark.integration
def test_minio_conditional_write_is_honoured_and_atomic_across_processes():
    from pecbir_harness.procs import moto_s3

    with moto_s3() as endpoint:
        open_store = partial(MinioStore, endpoint, "test", "test-secret", "pecbir")
        store = open_store()
        # No client-side existence check any more: only the store refusing the second PUT
        # (412) keeps the first object, so this fails if the header is not sent as one.
        assert store.put_if_absent("once.json", b"first") is True
        assert store.put_if_absent("once.json", b"second") is False
        assert store.get("once.json") == b"first"
        check_put_if_absent(store)
        with pytest.raises(UnsupportedStore):
            check_put_if_absent(MetadataConditionStore(endpoint, "test", "test-secret", "pecbir"))
        _race(open_store)
