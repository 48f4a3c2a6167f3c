"""`pecbir serve`: the cloud services as real processes (gateway, search, indexer workers).

Configuration comes from the environment (see README): PECBIR_TOKEN_SECRET, PECBIR_STORE_URL
(an S3/MinIO endpoint, http://host:port), PECBIR_S3_ACCESS_KEY, PECBIR_S3_SECRET_KEY,
PECBIR_S3_BUCKET, PECBIR_BROKER_URL (Redis). With --encryptor, also the owner-side encryptor
(PECBIR_ENCRYPTOR_* variables); in a real deployment it runs at the hospital, not here.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    from pecbir_harness.services import SERVICES

    parser = subparsers.add_parser("serve", help="run gateway, search and indexer workers")
    parser.add_argument("--host", default="127.0.0.1")
    for spec in SERVICES.values():
        if spec.kind == "http":
            parser.add_argument(f"--{spec.name}-port", type=int, default=spec.port)
    parser.add_argument("--workers", type=int, default=1, help="Celery worker processes")
    parser.add_argument("--encryptor", action="store_true", help="also run the encryptor")
    parser.set_defaults(func=run)


def _require(names: list[str]) -> None:
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        raise ValueError(f"set the environment variables {', '.join(missing)} (see README)")


def run(args: argparse.Namespace) -> int:
    from pecbir_harness.services import SERVICES, cloud_services

    _require(["PECBIR_TOKEN_SECRET", "PECBIR_STORE_URL", "PECBIR_BROKER_URL"])
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ)
    env.setdefault("PECBIR_SEARCH_URL", f"http://{args.host}:{args.search_port}")
    # One BLAS/OpenMP thread per service process, as in deploy/k8s: a request's small matrix
    # products lose more to thread hand-off than they gain, and concurrent requests contend.
    for name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(name, "1")

    specs = cloud_services()
    if args.encryptor:
        encryptor = SERVICES["encryptor"]
        _require([encryptor.env_name("tenant"), encryptor.env_name("master_key")])
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
