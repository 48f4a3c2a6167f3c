"""Object store: filesystem back end (unit) and the S3 path against Ceph radosgw (integration):
signatures checked, presigned URLs that expire, conditional writes, versioning, SSE-C."""

from __future__ import annotations

import base64
import io
import multiprocessing
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from functools import partial

import httpx
import pytest

from pecbir_contracts.store import ObjectNotFound, ObjectStore, StorageError, UnsupportedStore
from pecbir_platform.store import (
    FilesystemStore,
    MinioStore,
    StoreSettings,
    check_put_if_absent,
    iter_modified,
    list_children,
    store_from_url,
)
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
    # One level at a time (the search service's start-up finds collections this way).
    assert list_children(store, "tenants/") == ["a", "b"]
    assert list_children(store, "tenants/a/") == ["x"]
    assert list_children(store, "tenants/a/x/") == list_children(store, "tenants/zzz/") == []
    assert store.exists("tenants/b/y.bin") and not store.exists("tenants/b/none")
    assert store.put_if_absent("tenants/b/once", b"1") is True
    assert store.put_if_absent("tenants/b/once", b"2") is False
    assert store.get("tenants/b/once") == b"1"
    store.put("tenants/a/x/1.bin", b"replaced")
    assert store.get("tenants/a/x/1.bin") == b"replaced"
    store.delete("tenants/b/y.bin")
    with pytest.raises(ObjectNotFound):
        store.get("tenants/b/y.bin")
    # Listings from a cursor, in key order, read lazily (the janitor's windows).
    store.put("tenants/a/x/3.bin", b"3")
    tail = list(iter_modified(store, "tenants/a/", "tenants/a/x/1.bin"))
    assert [key for key, _ in tail] == ["tenants/a/x/2.bin", "tenants/a/x/3.bin"]
    assert all(abs(modified - time.time()) < 600 for _, modified in tail)
    everything = [key for key, _ in iter_modified(store, "tenants/")]
    assert everything == [*(f"tenants/a/x/{i}.bin" for i in (1, 2, 3)), "tenants/b/once"]
    assert list(iter_modified(store, "tenants/", "tenants/b/once")) == []
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


def _bucket(radosgw, name: str):
    from pecbir_harness.procs import S3Bucket

    return S3Bucket.on(radosgw, name)


@pytest.mark.integration
def test_minio_client_against_radosgw(radosgw):
    s3 = _bucket(radosgw, "store-basics")
    store = s3.open()
    _exercise(store)
    via_url = store_from_url(
        s3.url, access_key=s3.access_key, secret_key=s3.secret_key, bucket=s3.bucket
    )
    assert via_url.get("tenants/a/x/1.bin") == b"replaced"


@pytest.mark.integration
def test_presigned_url_is_signed_and_expires(radosgw):
    store = _bucket(radosgw, "store-presign").open()
    store.put("scan.png", b"cipher bytes")
    url = store.presigned_get_url("scan.png", timedelta(seconds=2))
    assert httpx.get(url).content == b"cipher bytes"
    tampered = url.replace("scan.png", "scan.png2")
    assert httpx.get(tampered).status_code == 403
    time.sleep(3)
    expired = httpx.get(url)
    assert expired.status_code == 403 and b"AccessDenied" in expired.content


@pytest.mark.integration
@pytest.mark.parametrize("wrong", ["secret", "access key"])
def test_wrong_credentials_are_refused_at_start(radosgw, wrong):
    s3 = _bucket(radosgw, "store-creds")
    s3.open()  # the bucket exists: the refusal is about the credentials, not the bucket
    access = s3.access_key if wrong == "secret" else "NOSUCHKEY0000000"
    secret = s3.secret_key[::-1] if wrong == "secret" else s3.secret_key
    with pytest.raises(StorageError, match=r"refused the credentials.*PECBIR_S3_SECRET_KEY"):
        MinioStore(s3.url, access, secret, s3.bucket)


@pytest.mark.integration
def test_versioning_keeps_the_previous_version_and_radosgw_then_ignores_the_condition(radosgw):
    s3 = _bucket(radosgw, "store-versions")
    store = MinioStore(s3.url, s3.access_key, s3.secret_key, s3.bucket, versioning=True)
    assert store._client.get_bucket_versioning(s3.bucket).status == "Enabled"  # set at start
    store.put("model/v1.json", b"first")
    store.put("model/v1.json", b"second")
    store.delete("model/v1.json")
    assert not store.exists("model/v1.json")
    versions = store.versions("model/v1.json")
    assert [marker for _, marker in versions] == [True, False, False]
    assert [store.get_version("model/v1.json", v) for v, _ in versions[1:]] == [
        b"second",
        b"first",
    ]
    # Ceph 16.2's deviation: on a versioned bucket a conditional PUT (If-None-Match: *)
    # overwrites, so the gateway's start-up check refuses the store. When this fails, the
    # store honours it: make versioning the default (services/README.md, "Object store").
    with pytest.raises(UnsupportedStore, match="If-None-Match"):
        check_put_if_absent(store)
    unversioned = _bucket(radosgw, "store-unversioned").open()
    assert unversioned._client.get_bucket_versioning(unversioned.bucket).status is None


@pytest.mark.integration
def test_sse_c_objects_are_unreadable_without_the_key(radosgw):
    s3 = _bucket(radosgw, "store-ssec")
    key = bytes(range(32))
    sealed = MinioStore(s3.url, s3.access_key, s3.secret_key, s3.bucket, sse_c_key=key)
    sealed.put("a.png", b"cipher bytes")
    assert sealed.put_if_absent("b.png", b"once") and not sealed.put_if_absent("b.png", b"x")
    assert sealed.get("a.png") == b"cipher bytes" and sealed.get("b.png") == b"once"
    assert b"".join(sealed.iter_chunks("a.png", 4)) == b"cipher bytes"
    assert sealed.exists("a.png")
    assert sealed.presigned_get_url("a.png", timedelta(seconds=60)) is None
    with pytest.raises(StorageError, match="InvalidArgument"):
        s3.open().get("a.png")  # no key
    wrong = MinioStore(s3.url, s3.access_key, s3.secret_key, s3.bucket, sse_c_key=b"k" * 32)
    with pytest.raises(StorageError, match="InvalidArgument"):
        wrong.get("a.png")
    settings = StoreSettings(
        store_url=s3.url,
        s3_access_key=s3.access_key,
        s3_secret_key=s3.secret_key,
        s3_bucket=s3.bucket,
        s3_sse_c_key=base64.b64encode(key).decode(),
    )
    assert settings.open_store().get("a.png") == b"cipher bytes"


def test_a_bad_sse_c_key_setting_names_the_variable():
    with pytest.raises(ValueError, match="PECBIR_S3_SSE_C_KEY"):
        StoreSettings(store_url="http://127.0.0.1:1", s3_sse_c_key="c2hvcnQ=").open_store()


class MetadataConditionStore(MinioStore):
    """The condition passed the obvious way: `put_object` sends it as user metadata
    (x-amz-meta-if-none-match), which the store ignores."""

    def put_if_absent(self, key: str, data: bytes, content_type: str = "") -> bool:
        metadata = {"If-None-Match": "*"}
        self._client.put_object(self.bucket, key, io.BytesIO(data), len(data), metadata=metadata)
        return True


@pytest.mark.integration
def test_minio_conditional_write_is_honoured_and_atomic_across_processes(radosgw):
    s3 = _bucket(radosgw, "store-race")
    open_store = partial(MinioStore, s3.url, s3.access_key, s3.secret_key, s3.bucket)
    store = open_store()
    # No client-side existence check any more: only the store refusing the second PUT
    # (412) keeps the first object, so this fails if the header is not sent as one.
    assert store.put_if_absent("once.json", b"first") is True
    assert store.put_if_absent("once.json", b"second") is False
    assert store.get("once.json") == b"first"
    check_put_if_absent(store)
    with pytest.raises(UnsupportedStore):
        check_put_if_absent(MetadataConditionStore(s3.url, s3.access_key, s3.secret_key, s3.bucket))
    _race(open_store)
