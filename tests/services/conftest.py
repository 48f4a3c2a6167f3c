from __future__ import annotations

from collections.abc import Sequence

import pytest

from pecbir_platform.store import FilesystemStore
from tests.services.helpers import TOKEN_SECRET


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
