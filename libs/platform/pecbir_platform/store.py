"""Object-store back ends behind `pecbir_contracts.store.ObjectStore`.

`FilesystemStore` is the embedded default (atomic, fsync'd writes: a `put` that returned is on
disk). `MinioStore` speaks the S3 API through the `minio` client (Ceph radosgw, MinIO, AWS S3).

"Nothing lost" on S3 (services/README.md, "Object store"): with `versioning=True`
(PECBIR_S3_VERSIONING) `MinioStore` enables versioning on its bucket at start and refuses a
bucket on which it stays off, so an overwrite or a delete keeps the previous version. It is off
by default because Ceph radosgw 16.2 ignores `If-None-Match: *` on a versioned bucket, and the
gateway's claims need it (its start-up check, `check_put_if_absent`, refuses such a store).
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from pecbir_contracts.layout import DEFAULT_BUCKET, probe_key
from pecbir_contracts.store import (
    ObjectNotFound,
    ObjectStore,
    StorageError,
    UnsupportedStore,
    check_key,
)

__all__ = [
    "FilesystemStore",
    "MinioStore",
    "StoreSettings",
    "check_put_if_absent",
    "iter_modified",
    "list_children",
    "list_modified",
    "store_from_url",
]

T = TypeVar("T")


class FilesystemStore:
    """Objects as files under `root`; writes are atomic (tmp + fsync + rename + dir fsync).

    `put_if_absent` links the fsync'd temporary file to the key (tmp + fsync + link + dir
    fsync): atomic across processes sharing the directory, on a file system with hard links.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"FilesystemStore({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    @staticmethod
    def _durable_temp(folder: Path, data: bytes) -> str:
        """`data` in a new fsync'd temporary file in `folder` (the caller renames or links it)."""
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError:
            Path(tmp).unlink(missing_ok=True)
            raise
        return tmp

    @staticmethod
    def _fsync_dir(folder: Path) -> None:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        path = self._path(key)
        tmp = None
        try:
            tmp = self._durable_temp(path.parent, bytes(data))
            os.replace(tmp, path)
            self._fsync_dir(path.parent)
        except OSError as exc:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
            raise StorageError(f"cannot write {path}: {exc}") from exc

    def put_if_absent(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> bool:
        # link(2) creates the name only if it does not exist, atomically for every process
        # sharing the directory; the linked file is already complete and fsync'd, so a reader
        # never sees a partial object under the key.
        path = self._path(key)
        tmp = None
        try:
            tmp = self._durable_temp(path.parent, bytes(data))
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            self._fsync_dir(path.parent)
            return True
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc}") from exc
        finally:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)

    def get(self, key: str) -> bytes:
        path = self._path(key)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(key) from None
        except OSError as exc:
            raise StorageError(f"cannot read {path}: {exc}") from exc

    def iter_chunks(self, key: str, chunk_size: int = 1 << 16) -> Iterator[bytes]:
        path = self._path(key)
        try:
            handle = path.open("rb")
        except FileNotFoundError:
            raise ObjectNotFound(key) from None
        return _file_chunks(handle, chunk_size)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def list(self, prefix: str) -> list[str]:
        base = self.root / prefix.rstrip("/") if prefix else self.root
        if prefix.endswith("/") and not base.is_dir():
            return []  # a folder that does not exist holds no key (no walk of its parent)
        search_root = base if base.is_dir() else base.parent
        if not search_root.is_dir():
            return []
        keys = []
        for dirpath, _dirs, files in os.walk(search_root):
            for name in files:
                if name.startswith(".tmp-"):
                    continue
                key = Path(dirpath, name).relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    keys.append(key)
        return sorted(keys)

    def presigned_get_url(self, key: str, expires: timedelta) -> str | None:
        return None

    def list_children(self, prefix: str) -> list[str]:
        """Names of the "folders" directly under `prefix` (which ends with '/')."""
        base = self.root / prefix
        if not base.is_dir():
            return []
        return sorted(entry.name for entry in os.scandir(base) if entry.is_dir())

    def list_modified(self, prefix: str) -> dict[str, float]:
        """Every key under `prefix` with the time of its last write (epoch seconds)."""
        times = {}
        for key in self.list(prefix):
            with contextlib.suppress(FileNotFoundError):  # deleted since the listing
                times[key] = self._path(key).stat().st_mtime
        return times

    def iter_modified(
        self, prefix: str, start_after: str | None = None
    ) -> Iterator[tuple[str, float]]:
        """(key, last write) of the keys under `prefix` after `start_after`, in key order.

        The directory walk lists the whole prefix whatever `start_after` is: the filesystem
        store serves one machine's collections, not 10⁷ objects (the S3 store pages)."""
        for key in self.list(prefix):
            if start_after is not None and key <= start_after:
                continue
            with contextlib.suppress(FileNotFoundError):  # deleted since the listing
                yield key, self._path(key).stat().st_mtime

    def stale_temp_files(self, older_than_s: float) -> list[Path]:
        """Temporary files of writes that never finished (a process killed between its
        write and its rename) last touched more than `older_than_s` seconds ago.

        A write in progress keeps its temporary file for milliseconds; a crash leaves it
        for ever. `list` never shows them; the janitor (pecbir_indexer.recovery) removes them.
        """
        cutoff = time.time() - older_than_s
        stale = []
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                if not name.startswith(".tmp-"):
                    continue
                path = Path(dirpath, name)
                with contextlib.suppress(FileNotFoundError):
                    if path.stat().st_mtime < cutoff:
                        stale.append(path)
        return sorted(stale)


def _file_chunks(handle: io.BufferedReader, chunk_size: int) -> Iterator[bytes]:
    with handle:
        while chunk := handle.read(chunk_size):
            yield chunk


#: S3 error codes that mean "these credentials are not accepted", not "the store is down".
_CREDENTIAL_ERRORS = ("AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId")


class MinioStore:
    """S3 through the `minio` client: one bucket, created at start (and versioned, on request).

    Parameters
    ----------
    sse_c_key
        32 bytes: every object is written and read with this customer-provided key (SSE-C).
        The store encrypts at rest and keeps only a salted hash of the key, so what it holds
        is unreadable without it. Presigned URLs are then off (a plain GET cannot carry the
        key): the gateway serves downloads through its own signed links.
    versioning
        Enable bucket versioning at start and refuse the store if it stays off. Off by
        default: radosgw 16.2 then stops honouring `If-None-Match: *` (module docstring).
    """

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        bucket: str = DEFAULT_BUCKET,
        *,
        secure: bool | None = None,
        region: str | None = "us-east-1",
        create_bucket: bool = True,
        versioning: bool = False,
        sse_c_key: bytes | None = None,
    ) -> None:
        import certifi
        import urllib3
        from minio import Minio
        from minio.sse import SseCustomerKey

        parsed = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
        self.endpoint = parsed.netloc
        self.bucket = bucket
        client_args: dict[str, Any] = {
            "access_key": access_key,
            "secret_key": secret_key,
            "secure": (parsed.scheme == "https") if secure is None else secure,
            "region": region,
        }
        self._client = Minio(parsed.netloc, **client_args)
        # A conditional PUT is not idempotent: a retry after a lost response would meet our
        # own object (412) and report the key as taken. So this client retries only failed
        # connections (nothing was sent); any other failure is a StorageError. Timeouts and
        # certificates as the minio client's default pool.
        no_resend = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=300, read=300),
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
            retries=urllib3.Retry(total=3, connect=3, read=0, status=0, other=0),
        )
        self._conditional = Minio(parsed.netloc, http_client=no_resend, **client_args)
        self._ssec = SseCustomerKey(sse_c_key) if sse_c_key is not None else None
        if create_bucket:
            self._guard(bucket, self._ensure_bucket)
        if versioning:
            self._guard(bucket, self._ensure_versioning)

    def __repr__(self) -> str:
        return f"MinioStore({self.endpoint!r}, bucket={self.bucket!r})"

    def _ensure_bucket(self) -> None:
        from minio.error import S3Error

        if self._client.bucket_exists(self.bucket):
            return
        try:
            self._client.make_bucket(self.bucket)
        except S3Error as exc:  # another replica created it in between
            if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise

    def _ensure_versioning(self) -> None:
        from minio.versioningconfig import ENABLED, VersioningConfig

        if self._client.get_bucket_versioning(self.bucket).status != ENABLED:
            self._client.set_bucket_versioning(self.bucket, VersioningConfig(ENABLED))
        if self._client.get_bucket_versioning(self.bucket).status != ENABLED:
            raise UnsupportedStore(
                f"{self!r}: bucket versioning stays off; the services need it so that an "
                "overwrite or delete keeps the previous version (services/README.md)"
            )

    def versions(self, key: str) -> list[tuple[str, bool]]:
        """(version id, is a delete marker) of every version of `key`, newest first."""

        def collect() -> list[tuple[str, bool]]:
            found = self._client.list_objects(
                self.bucket, prefix=check_key(key), include_version=True
            )
            mine = [obj for obj in found if obj.object_name == key]
            # AWS lists a key's versions newest first, radosgw 16.2 oldest first: sort.
            mine.sort(key=lambda obj: (obj.is_latest == "true", obj.last_modified), reverse=True)
            return [(obj.version_id, bool(obj.is_delete_marker)) for obj in mine]

        return self._guard(key, collect)

    def get_version(self, key: str, version_id: str) -> bytes:
        """The bytes of one earlier version of `key` (an operator's restore)."""

        def read() -> bytes:
            response = self._client.get_object(
                self.bucket, check_key(key), version_id=version_id, ssec=self._ssec
            )
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return self._guard(key, read)

    def _guard(self, key: str, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run one client call, mapping errors to ObjectNotFound / StorageError."""
        from minio.error import S3Error
        from urllib3.exceptions import HTTPError

        try:
            return func(*args, **kwargs)
        except S3Error as exc:
            if exc.code in ("NoSuchKey", "NoSuchObject"):
                raise ObjectNotFound(key) from None
            if exc.code in _CREDENTIAL_ERRORS:
                raise StorageError(
                    f"S3 endpoint {self.endpoint} refused the credentials ({exc.code}): check "
                    "PECBIR_S3_ACCESS_KEY and PECBIR_S3_SECRET_KEY"
                ) from exc
            raise StorageError(f"S3 error {exc.code} on {key!r}: {exc.message}") from exc
        except (HTTPError, OSError) as exc:
            raise StorageError(f"S3 endpoint {self.endpoint} unreachable: {exc}") from exc

    def put(self, key: str, data: bytes, content_type: str = "application/octet-stream") -> None:
        data = bytes(data)
        self._guard(
            key,
            self._client.put_object,
            self.bucket,
            check_key(key),
            io.BytesIO(data),
            len(data),
            content_type=content_type,
            sse=self._ssec,
        )

    def put_if_absent(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> bool:
        # An S3 conditional write: the store itself refuses the PUT with 412 if the key
        # exists, so this is atomic across gateway replicas (check_put_if_absent verifies
        # that the store honours it). `put_object` would turn If-None-Match into user
        # metadata (x-amz-meta-if-none-match), hence the client's single-PUT call.
        from minio.error import S3Error

        data = bytes(data)
        headers = {"Content-Type": content_type, "If-None-Match": "*"}
        if self._ssec is not None:
            headers.update(self._ssec.headers())

        def create() -> bool:
            try:
                self._conditional._put_object(self.bucket, check_key(key), data, headers)
            except S3Error as exc:
                if exc.code == "PreconditionFailed":
                    return False
                raise
            return True

        return self._guard(key, create)

    def get(self, key: str) -> bytes:
        def read() -> bytes:
            response = self._client.get_object(self.bucket, check_key(key), ssec=self._ssec)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

        return self._guard(key, read)

    def iter_chunks(self, key: str, chunk_size: int = 1 << 16) -> Iterator[bytes]:
        response = self._guard(
            key, self._client.get_object, self.bucket, check_key(key), ssec=self._ssec
        )

        def chunks() -> Iterator[bytes]:
            try:
                yield from response.stream(chunk_size)
            finally:
                response.close()
                response.release_conn()

        return chunks()

    def exists(self, key: str) -> bool:
        try:
            self._guard(key, self._client.stat_object, self.bucket, check_key(key), ssec=self._ssec)
        except ObjectNotFound:
            return False
        return True

    def delete(self, key: str) -> None:
        self._guard(key, self._client.remove_object, self.bucket, check_key(key))

    def list(self, prefix: str) -> list[str]:
        def collect() -> list[str]:
            objects = self._client.list_objects(self.bucket, prefix=prefix, recursive=True)
            return sorted(obj.object_name for obj in objects)

        return self._guard(prefix, collect)

    def list_children(self, prefix: str) -> list[str]:
        """Names of the "folders" directly under `prefix` (which ends with '/'): one
        delimited listing, whatever the number of objects below them."""

        def collect() -> list[str]:
            objects = self._client.list_objects(self.bucket, prefix=prefix, recursive=False)
            return sorted(
                obj.object_name[len(prefix) :].rstrip("/") for obj in objects if obj.is_dir
            )

        return self._guard(prefix, collect)

    def list_modified(self, prefix: str) -> dict[str, float]:
        """Every key under `prefix` with the time of its last write (epoch seconds)."""

        def collect() -> dict[str, float]:
            objects = self._client.list_objects(self.bucket, prefix=prefix, recursive=True)
            return {obj.object_name: obj.last_modified.timestamp() for obj in objects}

        return self._guard(prefix, collect)

    def iter_modified(
        self, prefix: str, start_after: str | None = None
    ) -> Iterator[tuple[str, float]]:
        """(key, last write) of the keys under `prefix` after `start_after`, in key order: a
        ListObjectsV2 from `start_after`, one page (1 000 keys) at a time as the caller reads,
        so a caller that stops early asks for no further page."""
        objects = self._guard(
            prefix,
            self._client.list_objects,
            self.bucket,
            prefix=prefix,
            recursive=True,
            start_after=start_after,
        )
        iterator = iter(objects)
        while True:
            obj = self._guard(prefix, next, iterator, None)
            if obj is None:
                return
            yield obj.object_name, obj.last_modified.timestamp()

    def presigned_get_url(self, key: str, expires: timedelta) -> str | None:
        if self._ssec is not None:
            return None  # the GET would need the key in its headers
        return self._guard(
            key, self._client.presigned_get_object, self.bucket, check_key(key), expires=expires
        )


def list_modified(store: ObjectStore, prefix: str) -> dict[str, float]:
    """Every key under `prefix` with the time of its last write, in epoch seconds.

    Parameters
    ----------
    store
        A back end of this module (both list modification times; others need a
        `list_modified` method of their own).
    prefix
        Key prefix to list.

    Returns
    -------
    dict of str to float
        Key → last-modified time (seconds since the epoch).

    Raises
    ------
    UnsupportedStore
        When the store cannot tell when its objects were written.
    """
    method = getattr(store, "list_modified", None)
    if method is None:
        raise UnsupportedStore(f"{store!r} cannot tell when its objects were written")
    return method(prefix)


def iter_modified(
    store: ObjectStore, prefix: str, start_after: str | None = None
) -> Iterator[tuple[str, float]]:
    """(key, last write in epoch seconds) of the keys under `prefix` that sort after
    `start_after` (None: all), in key order, read lazily: a caller that pages through a large
    prefix (the janitor's cursor, `pecbir_indexer.recovery`) stops when its page is full.

    Raises
    ------
    UnsupportedStore
        When the store cannot tell when its objects were written.
    """
    method = getattr(store, "iter_modified", None)
    if method is not None:
        return method(prefix, start_after)
    listed = list_modified(store, prefix)
    return iter(sorted((k, t) for k, t in listed.items() if start_after is None or k > start_after))


def list_children(store: ObjectStore, prefix: str) -> list[str]:
    """Names of the "folders" directly under `prefix` (ending with '/'), sorted.

    The back ends of this module ask the store for one level only (S3: a delimited listing);
    any other store's full listing under `prefix` stands in.

    Parameters
    ----------
    store
        An object store.
    prefix
        A key prefix ending with '/'.

    Returns
    -------
    list of str
        The distinct next path segments of the keys below `prefix` that have one more '/'.
    """
    method = getattr(store, "list_children", None)
    if method is not None:
        return method(prefix)
    names = {
        key[len(prefix) :].split("/", 1)[0]
        for key in store.list(prefix)
        if "/" in key[len(prefix) :]
    }
    return sorted(names)


def check_put_if_absent(store: ObjectStore) -> None:
    """Refuse a store on which `put_if_absent` overwrites an existing key.

    An S3-compatible store that ignores `If-None-Match: *` accepts the second conditional
    PUT; gateway replicas on it could accept one idempotency key for two bodies and hand out
    one model version twice. Costs two writes and a delete on a fresh key.
    """
    key = probe_key()
    try:
        created = store.put_if_absent(key, b"first", "text/plain")
        refused = not store.put_if_absent(key, b"second", "text/plain")
        kept = store.get(key) == b"first"
    finally:
        store.delete(key)
    if not (created and refused and kept):
        raise UnsupportedStore(
            f"{store!r} overwrote an existing object on a conditional write (PUT with "
            "If-None-Match: *); the gateway needs a store that refuses it with 412 "
            "Precondition Failed (see docs/operations.md, 'Object store requirements')"
        )


def store_from_url(url: str, **s3: str) -> ObjectStore:
    """`file:///path` (or a bare path) → FilesystemStore; `s3://` / `http(s)://` → MinioStore.

    For S3 the credentials come from `s3` (access_key, secret_key, bucket, region,
    sse_c_key: the base64 of 32 bytes or empty for no SSE-C, versioning: "true" or not).
    """
    if url.startswith("file://"):
        return FilesystemStore(url[len("file://") :])
    if url.startswith(("http://", "https://", "s3://")):
        endpoint = "http://" + url[len("s3://") :] if url.startswith("s3://") else url
        return MinioStore(
            endpoint,
            access_key=s3.get("access_key", ""),
            secret_key=s3.get("secret_key", ""),
            bucket=s3.get("bucket") or DEFAULT_BUCKET,
            region=s3.get("region") or "us-east-1",
            sse_c_key=_sse_c_key(s3.get("sse_c_key", "")),
            versioning=s3.get("versioning", "") in ("1", "true"),
        )
    if "://" in url:
        raise ValueError(f"unsupported object store URL {url!r} (use file://, http(s):// or s3://)")
    return FilesystemStore(url)


def _sse_c_key(text: str) -> bytes | None:
    if not text:
        return None
    try:
        key = base64.b64decode(text, validate=True)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ValueError("PECBIR_S3_SSE_C_KEY must be the base64 of 32 bytes")
    return key


class StoreSettings(BaseSettings):
    """Where a cloud service finds the object store (environment, prefix PECBIR_).

    The gateway, indexer and search settings inherit these fields, so the variable names and
    the way a store is opened are defined once.
    """

    model_config = SettingsConfigDict(env_prefix="PECBIR_", extra="ignore")

    store_url: str = Field(
        default="file://./var/store",
        description="file:///path (embedded) or http(s)://host:port of an S3/MinIO endpoint",
    )
    s3_access_key: str = ""
    s3_secret_key: SecretStr = SecretStr("")
    s3_bucket: str = DEFAULT_BUCKET
    s3_region: str = "us-east-1"
    s3_sse_c_key: SecretStr = Field(
        default=SecretStr(""),
        description="base64 of 32 bytes: SSE-C, the S3 store encrypts every object at rest "
        "with this key and does not keep it (empty: off)",
    )
    s3_versioning: bool = Field(
        default=False,
        description="enable and require bucket versioning (an overwrite or delete keeps the "
        "previous version); needs a store that still honours If-None-Match: * with it on",
    )

    def open_store(self) -> ObjectStore:
        return store_from_url(
            self.store_url,
            access_key=self.s3_access_key,
            secret_key=self.s3_secret_key.get_secret_value(),
            bucket=self.s3_bucket,
            region=self.s3_region,
            sse_c_key=self.s3_sse_c_key.get_secret_value(),
            versioning="true" if self.s3_versioning else "",
        )
