"""The owner's keyring: the active master key plus retired ones, looked up by key id.

Rotating the master key is an owner-only act that re-encrypts nothing: new uploads are
encrypted and tagged under the new (active) key, while every image already in the cloud names
the key it was made with (`key.key_id`, `integrity.key_id`) and keeps decrypting with that
retired key for as long as the owner keeps it in the keyring.  The cloud never holds a key, so
it can neither rotate nor re-encrypt anything.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from pecore.keys import MasterKey

KEY_SUFFIX = ".key"


class UnknownKey(ValueError):
    """An image was made under a master key this keyring does not hold."""


class Keyring:
    def __init__(self, active: MasterKey, retired: Iterable[MasterKey] = ()) -> None:
        self.active = active
        self._keys = {key.key_id: key for key in retired}
        self._keys[active.key_id] = active

    @property
    def key_ids(self) -> list[str]:
        return sorted(self._keys)

    def masters(self) -> list[MasterKey]:
        """Every key held, the active one first."""
        return [self.active, *(key for key in self._keys.values() if key is not self.active)]

    def get(self, key_id: str) -> MasterKey:
        try:
            return self._keys[key_id]
        except KeyError:
            raise UnknownKey(
                f"master key {key_id} is not in this encryptor's keyring "
                f"(holds {', '.join(self.key_ids)}); refusing to decrypt"
            ) from None

    @classmethod
    def load(cls, active: Path, retired_dir: Path | None = None) -> Keyring:
        """The active key file plus every `*.key` file (0600) in `retired_dir`."""
        retired = []
        if retired_dir is not None and Path(retired_dir).is_dir():
            retired = [MasterKey.load(p) for p in sorted(Path(retired_dir).glob(f"*{KEY_SUFFIX}"))]
        return cls(MasterKey.load(active), retired)


def rotate(active: Path, retired_dir: Path) -> tuple[str, str]:
    """Retire the key in `active` into `retired_dir`, write a fresh one to `active`.

    Returns (old key id, new key id). The retired copy is written (0600, fsync'd) before the
    active file is replaced, so a crash in between loses no key.
    """
    old = MasterKey.load(active)
    retired_dir = Path(retired_dir)
    retired_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    kept = retired_dir / f"{old.key_id}{KEY_SUFFIX}"
    if not kept.exists():
        old.save(kept)
    elif MasterKey.load(kept).key_id != old.key_id:
        raise ValueError(f"{kept} holds another key; refusing to rotate")
    new = MasterKey.generate()
    staged = active.with_name(f".{active.name}.new")
    staged.unlink(missing_ok=True)
    new.save(staged)
    os.replace(staged, active)
    return old.key_id, new.key_id
