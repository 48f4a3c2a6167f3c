"""The radiologist's view: web pages of the encryptor, inside the hospital's network.

Served under ``/ui`` by the encryptor itself, because only there can hits be decrypted. A
user signs in with a user token of this encryptor (`session`), queries with an uploaded
slice and mask or with one of the hospital's stored studies, and sees the most similar cases
decrypted, with class, a 0–100 similarity, the tumour outline and the owning hospital
(`results`); another hospital's case is opened through its audited key release or shown as
"not released". Server-rendered (Jinja2) with one small script; every asset is served here.
"""

from __future__ import annotations

from pecbir_encryptor.web.views import UI_PREFIX, install

__all__ = ["UI_PREFIX", "install"]
