"""Object store: filesystem back end (unit) and the S3 path against moto_server (integration)."""

from __future__ import annotations

from datetime import timedelta

import httpx
import pytest

from pecbir_contracts.store import FilesystemStore, MinioStore, ObjectNotFound, store_from_url


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


def test_filesystem_store(tmp_path):
    store = FilesystemStore(tmp_path)
    _exercise(store)
    assert store.presigned_get_url("tenants/a/x/1.bin", timedelta(seconds=5)) is None
    assert not list(tmp_path.rglob(".tmp-*"))
    assert isinstance(store_from_url(f"file://{tmp_path}"), FilesystemStore)


@pytest.mark.integration
def test_minio_client_against_moto_server(tmp_path):
    from pecbir.procs import moto_s3

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
