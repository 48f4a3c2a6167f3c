"""The radiologist's view: web pages of the encryptor, inside the hospital's network.

Served under ``/ui`` by the encryptor itself, because only there can hits be decrypted. A
user signs in with a user token of this encryptor (`session`), queries with an uploaded
slice and mask or with one of the hospital's stored studies, and sees the most similar cases
decrypted, tile by tile as each opens, with class, a 0–100 similarity (`similarity`), the
tumour outline, the owning hospital and, for this hospital's cases that came as DICOM, a link
to its DICOMweb viewer (`results`, `pecbir_encryptor.dicom_refs`); another hospital's case is
opened through its audited key release or shown as "not released". Server-rendered (Jinja2)
with one small script; every asset is served here.
"""

from __future__ import annotations

from pecbir_encryptor.web.views import UI_PREFIX, install

__all__ = ["UI_PREFIX", "install"]
