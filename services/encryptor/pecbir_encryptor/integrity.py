"""The owner's integrity tag, as the encryptor sees it: pecore's envelope tag, one format.

The tag over cipher pixels, mask and metadata is made by `pecore.envelope.tag` and checked by
`pecore.envelope.verify_tag` (v2, and the v1 formats of records stored before it); the
encryptor reaches it through `pecbir_encryptor.wire`.  Made at upload time with a key derived
from the master key and checked before any decryption, it keeps the cloud from forging or
silently altering what it stores.
"""

from __future__ import annotations

from pecore.envelope import TamperedError

# The service's name for pecore's refusal: whatever the envelope refuses (no tag, another key,
# an altered byte) and whatever the encryptor refuses itself is one exception for app and CLI.
IntegrityError = TamperedError

__all__ = ["IntegrityError"]
