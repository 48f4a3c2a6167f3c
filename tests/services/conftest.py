from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import pytest

from pecbir_platform.store import FilesystemStore
from tests.services.helpers import TOKEN_SECRET, radosgw_unavailable

if TYPE_CHECKING:
    from pecbir_harness.radosgw import RadosGateway


class RecordingDispatcher:
    """Remembers the tasks the gateway queued (gateway tests without a broker)."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, tuple[object, ...]]] = []
        self.fail = False

    def send(self, task_name: str, args: Sequence[object]) -> None:
        from pecbir_gateway.dispatch import DispatchError

        if self.fail:
            raise DispatchError("broker unavailable (simulated)")
        self.sent.append((task_name, tuple(args)))


@pytest.fixture
def store(tmp_path) -> FilesystemStore:
    return FilesystemStore(tmp_path / "store")


@pytest.fixture
def token_secret() -> bytes:
    return TOKEN_SECRET


@pytest.fixture(scope="session")
def radosgw(tmp_path_factory) -> Iterator[RadosGateway]:
    """One Ceph radosgw (a real S3 server) for the whole run, 3-5 s to start; each test module
    takes its own bucket (`S3Bucket.on(radosgw, name)`). Where it cannot start, the tests that
    need it skip with the reason, except on CI (CI=true), where that is a failure."""
    from pecbir_harness.radosgw import RadosGatewayUnavailable, radosgw

    started = radosgw(tmp_path_factory.mktemp("radosgw"))
    try:
        gateway = started.__enter__()
    except RadosGatewayUnavailable as exc:
        radosgw_unavailable(str(exc))
    try:
        yield gateway
    finally:
        started.__exit__(None, None, None)
