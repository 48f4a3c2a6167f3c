"""`python -m pecbir_indexer` = a Celery worker on the indexer's queues."""

from __future__ import annotations

import sys

from pecbir_contracts.tasks import WORKER_QUEUES
from pecbir_indexer.celery import app


def main(argv: list[str] | None = None) -> None:
    args = ["worker", "--loglevel", "INFO", "-Q", ",".join(WORKER_QUEUES)]
    app.worker_main([*args, *(argv if argv is not None else sys.argv[1:])])


if __name__ == "__main__":
    main()
