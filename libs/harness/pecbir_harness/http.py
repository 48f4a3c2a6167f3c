"""An ASGI app served over real HTTP on loopback, in a thread of this process.

A browser needs a socket: the embedded system's apps are reached in-process by its own
clients, but a page under test (or the demo's page) must be served by a real server. The
app's code paths are unchanged; only the transport differs.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["serve_in_thread"]


@contextmanager
def serve_in_thread(app: object, *, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `app` with uvicorn in a daemon thread; yield its base URL; stop it on exit.

    Parameters
    ----------
    app
        The ASGI application.
    host
        Interface to listen on (loopback by default).
    port
        Port; 0 picks a free one.

    Yields
    ------
    str
        ``http://host:port``.
    """
    import uvicorn

    from pecbir_harness.procs import free_port

    port = port or free_port()
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name=f"uvicorn:{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the HTTP server on {host}:{port} did not start")
        time.sleep(0.02)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
