"""DICOM DIMSE in: a C-STORE SCP (with C-ECHO) in the encryptor, for PACS that route by DIMSE.

Most PACS forward studies with C-STORE, not STOW-RS. This SCP (pynetdicom) takes them on its
own port and sends every instance down the same path as STOW-RS
(`pecbir_encryptor.dicom_ingest.store_instances`): one C-STORE is a batch of one, so an image
and its SEG meet in the pending store whatever their order or association. Each C-STORE gets
its own status: 0x0000 stored, 0xB000 stored with a warning (the image waits for its SEG, the
SEG for its image, no class label), or the failure of STOW-RS (0xA700 out of resources: the
cloud is busy, retry; 0xA900 not an image; 0xC000 cannot understand: undecodable, too large;
0x0110 processing failure), with an Error Comment saying why.

Who may associate: calling AE titles on an allow-list (nothing is allowed by default), the
called AE title must be this one, at most `max_associations` at once (more are rejected,
"local limit exceeded"), PDUs and idle time bounded; TLS when a certificate is configured.
Every association and refusal is audited.

Where it goes: each calling AE title may be mapped to a collection of this hospital's tenant
(`DimseConfig.collections`: a modality's or a department's PACS to its own collection); a
mapped AE title is allowed by being mapped, and an allowed one without a mapping goes to the
default collection. The tenant is always the encryptor's own (one encryptor per tenant), so a
mapping can never send images into another hospital's collections.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pecbir_encryptor.core import Encryptor
from pecbir_encryptor.dicom import SEG_SOP_CLASS, read_instance
from pecbir_encryptor.dicom_ingest import store_instances

__all__ = [
    "STORAGE_CLASSES",
    "TRANSFER_SYNTAXES",
    "DimseConfig",
    "check_ae_title",
    "start_scp",
]

log = logging.getLogger(__name__)

# What the SCP accepts: MR images (classic and enhanced: single-frame is checked later), the
# SEG, and the secondary captures some archives wrap slices in.
STORAGE_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.4",  # MR Image Storage
    "1.2.840.10008.5.1.4.1.1.4.1",  # Enhanced MR Image Storage
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
    SEG_SOP_CLASS,  # Segmentation Storage
)
# Every transfer syntax the encryptor decodes (`pecore.io.read_dicom`): a PACS may send the
# instance as stored, no transcoding needed.
TRANSFER_SYNTAXES = (
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2.2",
    "1.2.840.10008.1.2.1.99",
    "1.2.840.10008.1.2.5",
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70",
    "1.2.840.10008.1.2.4.80",
    "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.201",
    "1.2.840.10008.1.2.4.202",
    "1.2.840.10008.1.2.4.203",
)
# An Error Comment holds 64 characters.
_COMMENT = 64


def check_ae_title(value: str) -> str:
    """An AE title as DICOM allows it (PS3.5 AE: 1-16 characters of the default repertoire,
    no backslash or control character; leading and trailing spaces are not significant);
    ValueError naming the problem."""
    title = value.strip()
    if not 1 <= len(title) <= 16:
        raise ValueError(f"AE title {value!r}: 1 to 16 characters, not {len(title)}")
    if not title.isascii() or any(c == "\\" or not c.isprintable() for c in title):
        raise ValueError(f"AE title {value!r}: printable ASCII only, no backslash")
    return title


@dataclass(frozen=True)
class DimseConfig:
    """How the SCP listens and whom it serves.

    Attributes
    ----------
    port
        TCP port (host: `host`).
    ae_title
        This SCP's AE title (the called AE title must be it).
    allowed
        Calling AE titles allowed to associate (empty: nobody, unless mapped below).
    collection
        The collection a C-STORE goes to when its calling AE title has no mapping.
    host
        Address to listen on.
    max_associations
        Associations at once; more are rejected.
    max_pdu
        Largest PDU accepted (bytes).
    idle_timeout_s
        An association idle this long is aborted.
    tls_cert, tls_key, tls_ca
        PEM files: the SCP's certificate and key (TLS on when given) and, optionally, the
        CA whose client certificates it requires.
    collections
        Calling AE title → the collection of this tenant its C-STOREs go to; a mapped AE
        title may associate.
    """

    port: int
    ae_title: str
    allowed: frozenset[str]
    collection: str
    host: str = "0.0.0.0"
    max_associations: int = 4
    max_pdu: int = 1 << 20
    idle_timeout_s: float = 60.0
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    collections: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from pecbir_contracts.layout import check_name

        for title in (*self.allowed, *self.collections):
            check_ae_title(title)
        for collection in (self.collection, *self.collections.values()):
            check_name(collection, "collection")

    @property
    def calling_aes(self) -> frozenset[str]:
        """Every calling AE title that may associate: allowed or mapped."""
        return frozenset(t.strip() for t in (*self.allowed, *self.collections))

    def collection_for(self, calling: str) -> str:
        """The collection the C-STOREs of calling AE title `calling` go to."""
        mapped = {title.strip(): name for title, name in self.collections.items()}
        return mapped.get(calling.strip(), self.collection)


def _tls(config: DimseConfig) -> ssl.SSLContext | None:
    if config.tls_cert is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(config.tls_cert, config.tls_key)
    if config.tls_ca is not None:
        context.load_verify_locations(config.tls_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _status(code: int, comment: str | None = None):  # -> pydicom Dataset
    from pydicom.dataset import Dataset

    status = Dataset()
    status.Status = code
    if comment:
        status.ErrorComment = comment[:_COMMENT]
    return status


def start_scp(encryptor: Encryptor, config: DimseConfig, *, max_pixels: int):
    """Start the C-STORE / C-ECHO SCP in background threads; the running server.

    Parameters
    ----------
    encryptor
        The owner-side operations (ingest, pending store, audit log).
    config
        Port, AE titles, limits, TLS.
    max_pixels
        Largest image decoded (as on every other path).

    Returns
    -------
    pynetdicom.transport.ThreadedAssociationServer
        Call its ``shutdown()`` to stop it.
    """
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import Verification

    ae = AE(ae_title=config.ae_title)
    ae.require_called_aet = True
    ae.require_calling_aet = sorted(config.calling_aes) or ["\x00nobody"]
    ae.maximum_associations = config.max_associations
    ae.maximum_pdu_size = config.max_pdu
    ae.network_timeout = config.idle_timeout_s
    ae.acse_timeout = 30
    ae.dimse_timeout = config.idle_timeout_s
    ae.add_supported_context(Verification)
    for sop_class in STORAGE_CLASSES:
        ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
    audit = encryptor.audit

    def on_store(event):
        calling = event.assoc.requestor.ae_title.strip()
        collection = config.collection_for(calling)
        try:
            data = event.encoded_dataset(include_meta=True)
        except Exception as exc:  # pynetdicom raises several types for a broken data set
            audit.write(
                action="c-store", calling=calling, collection=collection, outcome="refused",
                reason=str(exc),
            )  # fmt: skip
            return _status(0xC000, f"cannot read the data set: {exc}")
        instance = read_instance(data, "application/dicom", max_pixels=max_pixels)
        stored, failed = store_instances(
            encryptor,
            [instance],
            collection=collection,
            label=None,
            role="template",
            retrieve_url=lambda _instance, image_id: image_id,
            max_pixels=max_pixels,
        )
        audit.write(
            action="c-store", calling=calling, collection=collection,
            stored=len(stored), failed=len(failed),
        )  # fmt: skip
        if failed:
            _cls, _uid, reason, text = failed[0]
            return _status(reason, text)
        warning = stored[0][3] if stored else None
        return _status(warning[0], warning[1]) if warning else _status(0x0000)

    def on_echo(event):
        audit.write(action="c-echo", calling=event.assoc.requestor.ae_title.strip())
        return 0x0000

    def on_rejected(event):
        audit.write(
            action="dimse-association",
            calling=event.assoc.requestor.ae_title.strip(),
            outcome="rejected",
        )

    handlers = [
        (evt.EVT_C_STORE, on_store),
        (evt.EVT_C_ECHO, on_echo),
        (evt.EVT_REJECTED, on_rejected),
    ]
    server = ae.start_server(
        (config.host, config.port),
        block=False,
        evt_handlers=handlers,
        ssl_context=_tls(config),
    )
    routes = {title: config.collection_for(title) for title in sorted(config.calling_aes)}
    log.info(
        "DIMSE C-STORE SCP %s on %s:%d (calling AE -> collection: %s; default %s)",
        config.ae_title,
        config.host,
        config.port,
        ", ".join(f"{t} -> {c}" for t, c in routes.items()) or "nobody allowed",
        config.collection,
    )
    return server
