"""`pecbir serve`: the cloud services as real processes (gateway, search, indexer workers).

Configuration comes from the environment (see README and ENVIRONMENT below). With
--encryptor, also the owner-side encryptor (PECBIR_ENCRYPTOR_* variables); in a real
deployment it runs at the hospital, not here. With --one-box, everything on loopback with
nothing to configure: a single-node Ceph radosgw, a private Redis, the three cloud services and
the encryptor, keys and token secrets made once under --dir; it prints the URLs and tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

REQUIRED = {
    "PECBIR_TOKEN_SECRET": "HMAC secret of the bearer tokens the gateway accepts",
    "PECBIR_STORE_URL": "object store: http(s)://host:port of an S3 server (or file:///path)",
    "PECBIR_BROKER_URL": "Redis URL of the Celery broker and event bus (redis://host:port/0)",
}
OPTIONAL = {
    "PECBIR_S3_ACCESS_KEY": "S3 access key",
    "PECBIR_S3_SECRET_KEY": "S3 secret key",
    "PECBIR_S3_BUCKET": "S3 bucket (default pecbir)",
    "PECBIR_S3_SSE_C_KEY": "base64 of a 32-byte SSE-C key (services/README.md)",
    "PECBIR_ENCRYPTOR_TENANT": "with --encryptor: the hospital's tenant id",
    "PECBIR_ENCRYPTOR_MASTER_KEY": "with --encryptor: path of the master key file",
}


def _environment_help() -> str:
    lines = ["ENVIRONMENT (required unless --one-box):"]
    lines += [f"  {name:<30} {text}" for name, text in REQUIRED.items()]
    lines += ["optional:"] + [f"  {name:<30} {text}" for name, text in OPTIONAL.items()]
    return "\n".join(lines)


def register(subparsers: argparse._SubParsersAction) -> None:
    from pecbir_harness.services import SERVICES

    parser = subparsers.add_parser(
        "serve",
        help="run gateway, search and indexer workers (--one-box: the whole stack on loopback)",
        description=__doc__,
        epilog=_environment_help(),
        formatter_class=lambda prog: argparse.RawDescriptionHelpFormatter(prog, width=100),
    )
    parser.add_argument("--host", default="127.0.0.1", help="interface (default %(default)s)")
    for spec in SERVICES.values():
        if spec.kind == "http":
            parser.add_argument(
                f"--{spec.name}-port",
                type=int,
                default=spec.port,
                help=f"{spec.name} port (default %(default)s)",
            )
    parser.add_argument(
        "--workers", type=int, default=1, help="Celery worker processes (default %(default)s)"
    )
    parser.add_argument("--encryptor", action="store_true", help="also run the encryptor")
    parser.add_argument(
        "--one-box",
        action="store_true",
        help="start radosgw, Redis, the cloud services and the encryptor on loopback and print "
        "the URLs and tokens to use (needs Debian's radosgw ceph-mon ceph-osd and redis-server)",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path("var/one-box"),
        help="--one-box: folder of its S3 data, Redis, keys and logs, kept between runs "
        "(default %(default)s)",
    )
    parser.set_defaults(func=run)


def _require(env: dict[str, str], names: list[str]) -> None:
    missing = [n for n in names if not env.get(n)]
    if missing:
        raise ValueError(f"set {', '.join(missing)} (`pecbir serve --help` lists them)")


def run(args: argparse.Namespace) -> int:
    if not args.one_box:
        return _serve(args, dict(os.environ))
    with contextlib.ExitStack() as stack:
        env = _one_box(args, stack)
        return _serve(args, env, on_ready=lambda: _print_one_box(args, env))


def _secret(path: Path) -> str:
    """A secret made once and kept in `path` (mode 600)."""
    if not path.exists():
        path.write_text(secrets.token_hex(32))
        path.chmod(0o600)
    return path.read_text().strip()


def _one_box(args: argparse.Namespace, stack: contextlib.ExitStack) -> dict[str, str]:
    """Start radosgw and Redis under args.dir; the environment of every service."""
    from pecbir_harness.procs import RedisProcess, S3Bucket, free_port
    from pecbir_harness.radosgw import RadosGateway
    from pecbir_harness.services import SERVICES
    from pecore.keys import MasterKey

    folder = args.dir.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    print(f"one-box: starting radosgw and Redis in {folder} ...", flush=True)
    gateway = RadosGateway(folder / "radosgw")
    stack.callback(gateway.stop)
    s3 = S3Bucket.on(gateway.start(), "pecbir")
    redis = RedisProcess(folder / "redis").start()
    stack.callback(redis.stop)
    key_path = folder / "master.key"
    if not key_path.exists():
        MasterKey.generate().save(key_path)
    encryptor = SERVICES["encryptor"]
    args.encryptor = True
    env = {
        **os.environ,
        **s3.env(),
        "PECBIR_BROKER_URL": redis.url,
        "PECBIR_TOKEN_SECRET": _secret(folder / "token_secret"),
        "PECBIR_OPS_PORT": str(free_port()),
        encryptor.env_name("tenant"): "hospital-a",
        encryptor.env_name("master_key"): str(key_path),
        encryptor.env_name("user_token_secret"): _secret(folder / "user_token_secret"),
        encryptor.env_name("audit_log"): str(folder / "audit.jsonl"),
        encryptor.env_name("pending_dir"): str(folder / "pending"),
        encryptor.env_name("content_index"): str(folder / "content-index"),
        encryptor.env_name("dicom_refs_dir"): str(folder / "dicom-refs"),
        encryptor.env_name("pacs_credentials"): str(folder / "pacs-credentials.json"),
    }
    # The encryptor calls the gateway as the tenant's operator.
    env[encryptor.env_name("gateway_token")] = _one_box_tokens(env)["operator"]
    return env


def _one_box_tokens(env: dict[str, str]) -> dict[str, str]:
    from pecbir_contracts.auth import ENCRYPTOR_TOKEN, GATEWAY_TOKEN, mint_token

    tenant, day = env["PECBIR_ENCRYPTOR_TENANT"], 24 * 3600
    return {
        "operator": mint_token(
            env["PECBIR_TOKEN_SECRET"].encode(),
            kind=GATEWAY_TOKEN,
            sub="operator",
            tenant=tenant,
            scopes=("upload", "search", "read", "train"),
            ttl_s=day,
        ),
        "user": mint_token(
            env["PECBIR_ENCRYPTOR_USER_TOKEN_SECRET"].encode(),
            kind=ENCRYPTOR_TOKEN,
            sub="radiologist",
            tenant=tenant,
            scopes=("upload", "search", "decrypt", "key-release"),
            ttl_s=ENCRYPTOR_TOKEN.max_ttl_s,
        ),
    }


def _print_one_box(args: argparse.Namespace, env: dict[str, str]) -> None:
    tokens = _one_box_tokens(env)
    host = args.host
    print(
        f"""
one-box ready (loopback only; data, keys and logs in {args.dir.resolve()}):
  encryptor (hospital side)  http://{host}:{args.encryptor_port}   docs: /docs
  gateway   (cloud)          http://{host}:{args.gateway_port}   docs: /docs
  search    (cloud)          http://{host}:{args.search_port}
  S3 (Ceph radosgw)          {env["PECBIR_STORE_URL"]}  bucket {env["PECBIR_S3_BUCKET"]}
  Redis                      {env["PECBIR_BROKER_URL"]}
tokens (24 h; tenant {env["PECBIR_ENCRYPTOR_TENANT"]}):
  export PECBIR_USER_TOKEN={tokens["user"]}
  export PECBIR_OPERATOR_TOKEN={tokens["operator"]}
try:
  curl -H "Authorization: Bearer $PECBIR_USER_TOKEN" -F image=@slice.png -F mask=@mask.png \\
       -F label=1 http://{host}:{args.encryptor_port}/v1/collections/brain/images
Ctrl-C stops everything (the data stays; `deploy/local/radosgw destroy --dir \
{args.dir.resolve() / "radosgw"}` removes the S3 data).
""",
        flush=True,
    )


def _serve(args: argparse.Namespace, env: dict[str, str], on_ready=None) -> int:
    from pecbir_harness.services import SERVICES, cloud_services

    missing = [name for name in REQUIRED if not env.get(name)]
    if missing:
        raise ValueError(
            f"set {', '.join(missing)} (`pecbir serve --help` lists them), or use --one-box"
        )
    bin_dir = Path(sys.executable).parent
    env.setdefault("PECBIR_SEARCH_URL", f"http://{args.host}:{args.search_port}")
    # One BLAS/OpenMP thread per service process, as in deploy/k8s: a request's small matrix
    # products lose more to thread hand-off than they gain, and concurrent requests contend.
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(name, "1")

    specs = cloud_services()
    if args.encryptor:
        encryptor = SERVICES["encryptor"]
        _require(env, [encryptor.env_name("tenant"), encryptor.env_name("master_key")])
        env.setdefault(encryptor.env_name("gateway_url"), f"http://{args.host}:{args.gateway_port}")
        specs.append(encryptor)
    commands: dict[str, list[str]] = {}
    for spec in specs:
        command = spec.command(
            host=args.host, port=getattr(args, f"{spec.name}_port", None), bin_dir=bin_dir
        )
        if spec.kind == "worker":
            command += ["--concurrency", str(args.workers), "--loglevel", "INFO"]
        commands[spec.name] = command
    processes = {
        name: subprocess.Popen(command, env=env, start_new_session=True)
        for name, command in commands.items()
    }
    print("started: " + ", ".join(f"{n} (pid {p.pid})" for n, p in processes.items()))
    stopping = False
    ready = on_ready is None

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    exit_code = 0
    while not stopping:
        for name, process in processes.items():
            if process.poll() is not None:
                print(f"{name} exited with code {process.returncode}; stopping the others")
                exit_code = process.returncode or 1
                stopping = True
        if not ready and not stopping and _all_answer(args, specs):
            ready = True
            on_ready()
        time.sleep(0.5)
    for process in processes.values():
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
    for process in processes.values():
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
    return exit_code


def _all_answer(args: argparse.Namespace, specs: list) -> bool:
    import httpx

    for spec in specs:
        if spec.kind != "http":
            continue
        url = f"http://{args.host}:{getattr(args, f'{spec.name}_port')}{spec.health_path}"
        try:
            if httpx.get(url, timeout=1).status_code != 200:
                return False
        except httpx.HTTPError:
            return False
    return True
