"""A real PACS on loopback for tests and benchmarks: Debian's Orthanc with its DICOMweb plugin.

`orthanc(folder, …)` starts ``Orthanc`` on free HTTP and DICOM ports with a configuration
that forwards to the encryptor the way a hospital wires it: a DICOMweb server ``pecbir``
(STOW-RS to the encryptor's root, HTTP basic with a PACS account) and a DICOM modality
``pecbir`` (C-STORE to the encryptor's SCP). The REST client (`Orthanc`) uploads instances
and runs Orthanc's own pushes (``/dicom-web/servers/pecbir/stow``, ``/modalities/pecbir/
store``) as jobs and waits for them. Where Orthanc (apt: ``orthanc orthanc-dicomweb``) is not
installed or does not start, `OrthancUnavailable` says why.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from pecbir_harness.procs import free_port

__all__ = ["DICOMWEB_PLUGIN", "Orthanc", "OrthancUnavailable", "orthanc"]

DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
# Orthanc's own REST credentials (loopback only; other users of the machine are kept out).
_USER, _PASSWORD = "pecbir-test", "pecbir-test-orthanc-password"


class OrthancUnavailable(RuntimeError):
    """Orthanc is not installed or did not start (the message says which)."""


@dataclass
class Orthanc:
    """A running Orthanc: its REST URL, DICOM port and AE title, and a client of it.

    Attributes
    ----------
    url
        Its REST API.
    dicom_port, aet
        Its DICOM listener and AE title.
    log
        Its log file.
    """

    url: str
    dicom_port: int
    aet: str
    log: Path

    @property
    def http(self) -> httpx.Client:
        """An authenticated client of its REST API."""
        return httpx.Client(base_url=self.url, auth=(_USER, _PASSWORD), timeout=120)

    def upload(self, data: bytes) -> dict:
        """Store one DICOM file in Orthanc; its answer (ID, ParentStudy, …)."""
        with self.http as http:
            answer = http.post("/instances", content=data)
        answer.raise_for_status()
        return answer.json()

    def run_job(self, path: str, resources: list[str], timeout_s: float = 300) -> dict:
        """POST `resources` to a push route (asynchronously) and wait for the job's end.

        Parameters
        ----------
        path
            ``/dicom-web/servers/<name>/stow`` or ``/modalities/<name>/store``.
        resources
            Orthanc ids of studies, series or instances.
        timeout_s
            How long to wait for the job.

        Returns
        -------
        dict
            The job's final state (``State`` "Success" or "Failure", ``ErrorDescription``…).
        """
        with self.http as http:
            answer = http.post(path, json={"Resources": resources, "Synchronous": False})
            answer.raise_for_status()
            job = answer.json()["ID"]
            deadline = time.monotonic() + timeout_s
            while True:
                state = http.get(f"/jobs/{job}").json()
                if state["State"] in ("Success", "Failure"):
                    return state
                if time.monotonic() > deadline:
                    raise TimeoutError(f"Orthanc job {job} still {state['State']}")
                time.sleep(0.1)


@contextlib.contextmanager
def orthanc(
    folder: Path,
    *,
    stow_url: str | None = None,
    stow_user: str | None = None,
    stow_password: str | None = None,
    scp: tuple[str, int] | None = None,
    aet: str = "ORTHANC",
) -> Iterator[Orthanc]:
    """Run Orthanc on loopback until the block ends.

    Parameters
    ----------
    folder
        Its storage, index, configuration and log (a new folder).
    stow_url
        The DICOMweb root it pushes to as server ``pecbir`` (…/dicomweb/<collection>/).
    stow_user, stow_password
        HTTP basic credentials it sends there (a PACS account and its API key).
    scp
        (AE title, port) of the DICOM peer ``pecbir`` on 127.0.0.1.
    aet
        Its own AE title.

    Raises
    ------
    OrthancUnavailable
        Not installed, or not answering 30 s after its start.
    """
    binary = shutil.which("Orthanc")
    if binary is None or not DICOMWEB_PLUGIN.exists():
        raise OrthancUnavailable("Orthanc or its DICOMweb plugin is not installed")
    folder.mkdir(parents=True, exist_ok=True)
    http_port, dicom_port = free_port(), free_port()
    config: dict = {
        "Name": "pecbir-test-pacs",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "storage"),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": aet,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {_USER: _PASSWORD},
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "Servers": {}},
        "DicomModalities": {},
        "HttpTimeout": 300,
        "DicomScuTimeout": 60,
        "StableAge": 1,
        "HttpVerbose": True,
    }
    if stow_url is not None:
        server: dict = {"Url": stow_url}
        if stow_user is not None:
            server.update(Username=stow_user, Password=stow_password)
        config["DicomWeb"]["Servers"]["pecbir"] = server
    if scp is not None:
        config["DicomModalities"]["pecbir"] = [scp[0], "127.0.0.1", scp[1]]
    path = folder / "orthanc.json"
    path.write_text(json.dumps(config, indent=1))
    log = folder / "orthanc.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(
            [binary, f"--logfile={log}", str(path)], stdout=output, stderr=subprocess.STDOUT
        )
    running = Orthanc(f"http://127.0.0.1:{http_port}", dicom_port, aet, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise OrthancUnavailable(f"Orthanc exited ({process.returncode}): {_tail(log)}")
            try:
                with running.http as http:
                    if http.get("/system").status_code == 200:
                        break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise OrthancUnavailable(f"Orthanc did not answer in 30 s: {_tail(log)}")
            time.sleep(0.2)
        yield running
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _tail(log: Path, n: int = 1500) -> str:
    try:
        return log.read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"
