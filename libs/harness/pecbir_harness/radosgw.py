"""A single-node Ceph object gateway on loopback: one monitor, one OSD, radosgw (beast).

A real S3 server for the integration tests, `deploy/local/radosgw` and the one-box trial: it
checks signatures (a wrong secret gets 403), expires presigned URLs, honours
`If-None-Match: *`, keeps object versions and does SSE-C. Debian's packages
(`apt-get install --no-install-recommends radosgw ceph-mon ceph-osd`) are all it needs; the
daemons run as the calling user with their configuration, keys, logs and data in one folder.

Why the configuration looks as it does (measured on Ceph 16.2, issue 11):

- `paxos propose interval = 0.1` takes a fresh start from 13-19 s to 3-5 s;
- memstore keeps its data across a stop only with `osd fast shutdown = false` (it writes its
  objects out at a clean shutdown; a SIGKILL loses them). `objectstore="bluestore"` puts the
  OSD on a sparse file instead (durable at every write, about half the PUT rate);
- `cluster addr = 127.0.0.1`, or the OSD binds every interface;
- the daemons stop one after another (gateway, OSD, monitor): about 6 s, all at once 30 s;
- readiness is an answer carrying `x-amz-request-id` (radosgw's), not just any 200 on the
  port, which another server might hold;
- `rgw crypt require ssl = false`: SSE-C over plain HTTP on loopback (radosgw refuses it
  otherwise, as AWS does).

Nothing here talks to a shared cluster: the monitor and gateway ports are free loopback ports
chosen at creation and kept in `state.json`, so a stopped folder starts again on the same
addresses with its data.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = [
    "DAEMONS",
    "PACKAGES",
    "RadosGateway",
    "RadosGatewayUnavailable",
    "main",
    "missing_binaries",
    "radosgw",
]

#: Debian packages that provide the binaries (what `.ci/run` installs).
PACKAGES = ("radosgw", "ceph-mon", "ceph-osd")
#: Start order; they stop in the reverse order.
DAEMONS = ("mon", "osd", "rgw")
_BINARIES = ("ceph", "ceph-authtool", "monmaptool", "ceph-mon", "ceph-osd", "radosgw")
_BINARIES += ("radosgw-admin",)
_USER = "pecbir"
#: The cluster's keys and their capabilities (one keyring file holds them all).
_KEYS = {
    "mon.": (("mon", "allow *"),),
    "client.admin": (("mon", "allow *"), ("osd", "allow *"), ("mgr", "allow *")),
    "osd.0": (("mon", "allow profile osd"), ("osd", "allow *")),
    "client.rgw": (("mon", "allow rw"), ("osd", "allow rwx")),
}


class RadosGatewayUnavailable(RuntimeError):
    """radosgw cannot run here (binaries missing) or did not come up (the message says why)."""


def missing_binaries() -> list[str]:
    return [name for name in _BINARIES if shutil.which(name) is None]


def _free_port() -> int:
    # As procs.free_port; this module uses the standard library only (deploy/local/radosgw).
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@dataclass
class _State:
    fsid: str
    osd_uuid: str
    mon_port: int
    rgw_port: int
    access_key: str
    secret_key: str
    bucket: str
    objectstore: str
    registered: bool = False  # the OSD is in the OSD map and the S3 user exists


class RadosGateway:
    """One folder, one cluster: `start()` creates it on first use and (re)starts its daemons;
    both `start()` and `stop()` are idempotent and work across processes (pid files)."""

    def __init__(
        self,
        folder: str | os.PathLike[str],
        *,
        bucket: str = "pecbir",
        objectstore: str = "memstore",
        startup_timeout: float = 90.0,
    ) -> None:
        if objectstore not in ("memstore", "bluestore"):
            raise ValueError(f"objectstore must be memstore or bluestore, not {objectstore!r}")
        self.folder = Path(folder).resolve()
        self.bucket = bucket
        self.objectstore = objectstore
        self.startup_timeout = startup_timeout
        self._children: dict[str, subprocess.Popen] = {}

    # -- what a client needs --

    @property
    def state(self) -> _State:
        return _State(**json.loads((self.folder / "state.json").read_text()))

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.state.rgw_port}"

    def env(self) -> dict[str, str]:
        """The store settings of the cloud services (pecbir_platform.store.StoreSettings)."""
        state = self.state
        return {
            "PECBIR_STORE_URL": self.endpoint,
            "PECBIR_S3_ACCESS_KEY": state.access_key,
            "PECBIR_S3_SECRET_KEY": state.secret_key,
            "PECBIR_S3_BUCKET": state.bucket,
        }

    # -- life cycle --

    def start(self) -> RadosGateway:
        missing = missing_binaries()
        if missing:
            raise RadosGatewayUnavailable(
                f"no {', '.join(missing)} on PATH (install Debian's "
                f"{' '.join(PACKAGES)} with apt-get install --no-install-recommends)"
            )
        if not (self.folder / "state.json").exists():
            self._create()
        state = self.state
        try:
            self._start_daemon("mon")
            if not state.registered:
                self._ceph("osd", "new", state.osd_uuid, "0")
            self._start_daemon("osd")
            self._start_daemon("rgw")
            self._wait_for_gateway()
            if not state.registered:
                self._admin(
                    "user",
                    "create",
                    f"--uid={_USER}",
                    f"--display-name={_USER}",
                    f"--access-key={state.access_key}",
                    f"--secret-key={state.secret_key}",
                )
                state.registered = True
                self._save(state)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for daemon in reversed(DAEMONS):
            self.stop_daemon(daemon)

    def running(self) -> dict[str, bool]:
        return {daemon: self._pid(daemon) is not None for daemon in DAEMONS}

    def pids(self) -> dict[str, int]:
        """Live daemons by program name (`ceph-mon`, `ceph-osd`, `radosgw`)."""
        pids = {self._command(daemon)[0]: self._pid(daemon) for daemon in DAEMONS}
        return {name: pid for name, pid in pids.items() if pid is not None}

    def status(self) -> dict[str, object]:
        if not (self.folder / "state.json").exists():
            return {"folder": str(self.folder), "created": False}
        return {
            "folder": str(self.folder),
            "created": True,
            "daemons": self.running(),
            "answering": self._answers(),
            "objectstore": self.state.objectstore,
            "data_bytes": _size(self.folder),
            **self.env(),
        }

    def stop_daemon(
        self, daemon: str, timeout: float = 60.0, sig: signal.Signals = signal.SIGTERM
    ) -> None:
        """SIGTERM and wait (a clean stop: memstore writes its objects out); `sig=SIGKILL`
        for a hard kill (the S3 gateway only: it holds no data, the OSD does)."""
        pid = self._pid(daemon)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
            deadline = time.monotonic() + timeout
            while self._pid(daemon) is not None and time.monotonic() < deadline:
                time.sleep(0.05)
            if self._pid(daemon) is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        child = self._children.pop(daemon, None)
        if child is not None:
            child.wait(10)
        (self._run / f"{daemon}.pid").unlink(missing_ok=True)

    def start_daemon(self, daemon: str) -> None:
        """Start one stopped daemon again (the gateway after an outage) and wait for it."""
        self._start_daemon(daemon)
        if daemon == "rgw":
            self._wait_for_gateway()

    # -- internals --

    @property
    def _conf(self) -> Path:
        return self.folder / "ceph.conf"

    @property
    def _run(self) -> Path:
        return self.folder / "run"

    def _save(self, state: _State) -> None:
        tmp = self.folder / "state.json.tmp"
        tmp.write_text(json.dumps(asdict(state), indent=2) + "\n")
        tmp.replace(self.folder / "state.json")

    def _create(self) -> None:
        if self.folder.exists() and any(self.folder.iterdir()):
            raise RadosGatewayUnavailable(
                f"{self.folder} is not empty and holds no state.json: not a radosgw folder"
            )
        for sub in ("run", "log", "mon/a", "osd/0"):
            (self.folder / sub).mkdir(parents=True, exist_ok=True)
        state = _State(
            fsid=str(uuid.uuid4()),
            osd_uuid=str(uuid.uuid4()),
            mon_port=_free_port(),
            rgw_port=_free_port(),
            access_key="PECBIR" + secrets.token_hex(7).upper(),
            secret_key=secrets.token_urlsafe(30),
            bucket=self.bucket,
            objectstore=self.objectstore,
        )
        self._conf.write_text(_config(self.folder, state))
        keyring = str(self.folder / "keyring")
        self._tool(["ceph-authtool", keyring, "--create-keyring"])
        for entity, caps in _KEYS.items():
            cap_args = [arg for daemon, cap in caps for arg in ("--cap", daemon, cap)]
            self._tool(["ceph-authtool", keyring, "--gen-key", "-n", entity, *cap_args])
        monmap = str(self.folder / "monmap")
        mon_addr = f"[v2:127.0.0.1:{state.mon_port}]"
        conf = ["-c", str(self._conf)]
        self._tool(
            ["monmaptool", "--create", "--fsid", state.fsid, "--addv", "a", mon_addr, monmap]
        )
        # --mkfs seeds the monitor's key database with every key (and caps) of the keyring.
        self._tool(
            ["ceph-mon", *conf, "--mkfs", "-i", "a", "--monmap", monmap, "--keyring", keyring]
        )
        osd_uuid = ["--osd-uuid", state.osd_uuid]
        self._tool(["ceph-osd", *conf, "--no-mon-config", "--mkfs", "-i", "0", *osd_uuid])
        self._save(state)

    def _tool(self, args: list[str], timeout: float = 60.0) -> str:
        try:
            done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise RadosGatewayUnavailable(
                f"{args[0]} {args[1]} timed out after {timeout} s"
            ) from exc
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
            raise RadosGatewayUnavailable(
                f"{' '.join(args[:3])} failed ({done.returncode}): {' | '.join(tail)} "
                f"(logs: {self.folder / 'log'})"
            )
        return done.stdout

    def _ceph(self, *args: str) -> str:
        return self._tool(["ceph", "-c", str(self._conf), "--connect-timeout", "30", *args])

    def _admin(self, *args: str) -> str:
        return self._tool(["radosgw-admin", "-c", str(self._conf), *args])

    def _command(self, daemon: str) -> list[str]:
        conf = ["-c", str(self._conf), "-f"]
        return {
            "mon": ["ceph-mon", *conf, "-i", "a"],
            "osd": ["ceph-osd", *conf, "-i", "0"],
            "rgw": ["radosgw", *conf, "-n", "client.rgw"],
        }[daemon]

    def _pid(self, daemon: str) -> int | None:
        try:
            pid = int((self._run / f"{daemon}.pid").read_text())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def _start_daemon(self, daemon: str) -> None:
        if self._pid(daemon) is not None:
            return
        log = open(self.folder / "log" / f"{daemon}.out", "ab")  # noqa: SIM115
        with log:
            proc = subprocess.Popen(
                self._command(daemon),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # outlives `deploy/local/radosgw start`
            )
        self._children[daemon] = proc
        (self._run / f"{daemon}.pid").write_text(f"{proc.pid}\n")
        time.sleep(0.2)
        if proc.poll() is not None:
            raise RadosGatewayUnavailable(
                f"{self._command(daemon)[0]} exited at once with code {proc.returncode} "
                f"(see {self.folder / 'log'})"
            )

    def _answers(self) -> bool:
        """radosgw answers on its port (its replies carry x-amz-request-id)."""
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(self.endpoint, timeout=2) as response:
                headers = response.headers
        except urllib.error.HTTPError as exc:
            headers = exc.headers
        except OSError:
            return False
        return headers.get("x-amz-request-id") is not None

    def _wait_for_gateway(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            for daemon in DAEMONS:
                if self._pid(daemon) is None:
                    raise RadosGatewayUnavailable(
                        f"{self._command(daemon)[0]} stopped during start-up "
                        f"(see {self.folder / 'log'})"
                    )
            if self._answers():
                return
            time.sleep(0.1)
        raise RadosGatewayUnavailable(
            f"radosgw not answering on {self.endpoint} after {self.startup_timeout} s "
            f"(see {self.folder / 'log'})"
        )


def _config(folder: Path, state: _State) -> str:
    osd = (
        "osd objectstore = memstore\n"
        "memstore device bytes = 4294967296\n"
        # memstore writes its objects out only at a clean shutdown (issue 11).
        "osd fast shutdown = false\n"
        if state.objectstore == "memstore"
        else "osd objectstore = bluestore\n"
        # A sparse file in the OSD folder; leave `bluestore block path` unset (issue 11).
        "bluestore block create = true\n"
        "bluestore block size = 10737418240\n"
        "bluestore fsck on mount = false\n"
    )
    return f"""\
[global]
fsid = {state.fsid}
mon host = [v2:127.0.0.1:{state.mon_port}]
public addr = 127.0.0.1
cluster addr = 127.0.0.1
ms bind msgr1 = false
ms bind ipv6 = false
keyring = {folder}/keyring
run dir = {folder}/run
admin socket = {folder}/run/$name.asok
log file = {folder}/log/$name.log
log to stderr = false
err to stderr = false
mon cluster log file = {folder}/log/cluster.log
auth allow insecure global id reclaim = false
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
osd pool default pg autoscale mode = off
osd crush chooseleaf type = 0
mon allow pool size one = true
mon warn on pool no redundancy = false
mon data avail warn = 2
mon data avail crit = 1
paxos propose interval = 0.1

[mon.a]
mon data = {folder}/mon/a

[osd.0]
osd data = {folder}/osd/0
{osd}
[client.rgw]
rgw frontends = beast endpoint=127.0.0.1:{state.rgw_port}
rgw data = {folder}/rgw
rgw crypt require ssl = false
rgw enable usage log = false
"""


def _size(folder: Path) -> int:
    # st_blocks: a sparse bluestore file counts what it holds, not its nominal size.
    return sum(p.lstat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())


@contextlib.contextmanager
def radosgw(folder: Path, **kwargs: object) -> Iterator[RadosGateway]:
    """A started gateway for the duration of the block, stopped (every daemon) after it."""
    gateway = RadosGateway(folder, **kwargs)  # type: ignore[arg-type]
    try:
        yield gateway.start()
    finally:
        gateway.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="deploy/local/radosgw",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("action", choices=("start", "stop", "status", "env", "destroy"))
    parser.add_argument(
        "--dir",
        default=os.environ.get("PECBIR_RADOSGW_DIR", "/tmp/pecbir-radosgw"),
        help="folder holding configuration, keys, logs and data ($PECBIR_RADOSGW_DIR)",
    )
    parser.add_argument("--objectstore", choices=("memstore", "bluestore"), default="memstore")
    parser.add_argument("--bucket", default="pecbir")
    args = parser.parse_args(argv)
    gateway = RadosGateway(args.dir, bucket=args.bucket, objectstore=args.objectstore)
    try:
        if args.action == "start":
            began = time.monotonic()
            gateway.start()
            print(f"# radosgw up in {time.monotonic() - began:.1f} s; data in {gateway.folder}")
        elif args.action == "stop":
            gateway.stop()
            print(f"# stopped ({gateway.folder} kept; `destroy` removes it)")
            return 0
        elif args.action == "destroy":
            gateway.stop()
            shutil.rmtree(gateway.folder, ignore_errors=True)
            print(f"# removed {gateway.folder}")
            return 0
        elif args.action == "status":
            status = gateway.status()
            print(json.dumps(status, indent=2))
            return 0 if status.get("answering") else 3
        if not (gateway.folder / "state.json").exists():
            print(f"no radosgw in {gateway.folder} (run start)", file=sys.stderr)
            return 1
        for name, value in gateway.env().items():
            print(f"export {name}={value}")
    except RadosGatewayUnavailable as exc:
        print(f"radosgw: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
