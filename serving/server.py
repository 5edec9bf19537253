"""Run the app under uvicorn: in the foreground (``lookalike serve``) or in a thread.

``serve`` checks the store before anything slow happens, binds the port itself (a
port already in use fails at once, not after loading the model), and turns a failed
startup back into the exception that caused it, instead of uvicorn's bare exit.
``serve_in_thread`` runs the same server in a background thread on a free port and
yields its base URL, for tests and for programs that embed the server.
"""

from __future__ import annotations

import copy
import errno
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from fastapi import FastAPI

from lookalike.model.store import PointerError, Store, StoreError
from lookalike.pipeline.logs import DATE_FORMAT
from lookalike.serving.app import create_app
from lookalike.pipeline.versions import last_served_present, missing_current_hint, served_unusable
from lookalike.serving.backend import Backend, load_backend
from lookalike.serving.batcher import DEFAULT_MAX_BATCH, DEFAULT_MAX_WAIT_S
from lookalike.serving.engine import DEFAULT_INLINE_MAX_S, DEFAULT_MAX_EMBED_BATCH, BatchingConfig
from lookalike.serving.swap import DEFAULT_WATCH_INTERVAL_S, StoreReloader

log = logging.getLogger(__name__)


class ServerStartError(RuntimeError):
    """uvicorn stopped during startup; the cause is chained when known."""


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening-ready TCP socket on ``host:port`` (port 0 picks a free one)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except socket.gaierror as e:
        sock.close()
        raise ServerStartError(f"cannot listen on {host}:{port}: host {host!r} is not a known name or address "
                               f"({e.strerror or e})") from None
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            hint = " (is another server using it?)"
        elif e.errno == errno.EADDRNOTAVAIL:
            hint = f" (host {host!r} is not an address of this machine; 127.0.0.1 or 0.0.0.0 are)"
        elif e.errno == errno.EACCES:
            hint = " (ports below 1024 need privileges)"
        else:
            hint = ""
        raise ServerStartError(f"cannot listen on {host}:{port}: {e.strerror or e}{hint}") from None
    return sock


def base_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def run_server(app: FastAPI, sock: socket.socket, server: uvicorn.Server) -> None:
    """Run ``server`` on ``sock`` until it stops; re-raise the app's startup error if it had one
    (during the lifespan, or in a first load running in the background)."""
    app.state.stop_server = lambda: setattr(server, "should_exit", True)
    try:
        server.run(sockets=[sock])
    except SystemExit as e:  # uvicorn exits the process when startup fails
        cause = app.state.startup_error
        raise ServerStartError(f"server failed to start: {cause or f'uvicorn exit code {e.code}'}") from cause
    finally:
        sock.close()
    cause = app.state.startup_error
    if cause is not None:
        raise ServerStartError(f"server failed to start: {cause}") from cause


class _Server(uvicorn.Server):
    """A uvicorn server that logs its URL once it accepts connections."""

    url = ""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.url:
            log.info("serving on %s", self.url)


def uvicorn_log_config() -> dict[str, Any]:
    """uvicorn's logging set-up with our time stamps: its own lines and the access log
    (one line per request, on stdout) read ``2026-11-30 20:31:02 INFO: 127.0.0.1:40274 -
    "POST /v1/search/image HTTP/1.1" 200 OK``, so a request can be matched to a swap's log line."""
    config = copy.deepcopy(uvicorn.config.LOGGING_CONFIG)
    config["formatters"]["default"].update(fmt="%(asctime)s %(levelprefix)s %(message)s", datefmt=DATE_FORMAT)
    config["formatters"]["access"].update(
        fmt='%(asctime)s %(levelprefix)s %(client_addr)s - "%(request_line)s" %(status_code)s', datefmt=DATE_FORMAT)
    return config


def make_server(app: FastAPI, log_level: str, url: str = "", **config: Any) -> uvicorn.Server:
    config.setdefault("log_config", uvicorn_log_config())
    server = _Server(uvicorn.Config(app, log_level=log_level, lifespan="on", **config))
    server.url = url
    return server


def serve(
    workdir: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 8765,
    log_level: str = "info",
    *,
    watch_interval_s: float | None = DEFAULT_WATCH_INTERVAL_S,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_embed_batch: int = DEFAULT_MAX_EMBED_BATCH,
    batch_wait_ms: float = DEFAULT_MAX_WAIT_S * 1000,
    inline_max_ms: float = DEFAULT_INLINE_MAX_S * 1000,
    admin_token: str | None = None,
    access_log: bool = True,
    max_large_uploads: int | None = None,
) -> None:
    """Serve the CURRENT index of ``workdir`` until interrupted, following CURRENT as it moves.

    ``watch_interval_s`` (None or 0: never) is how often CURRENT is checked for a new
    version; ``max_batch`` (searches per ScaNN call), ``max_embed_batch`` (images per
    forward) and ``batch_wait_ms`` bound micro-batching (both maxima 1: off);
    ``inline_max_ms`` (0: never) lets a lone query that fast run on the event loop
    rather than a batcher's thread; ``admin_token`` defaults to $LOOKALIKE_ADMIN_TOKEN;
    ``access_log`` False drops the line per request (``uvicorn_log_config``);
    ``max_large_uploads`` bodies over 1 MiB are taken in at once (None: two per CPU). The
    server accepts connections at once and loads the model and index in the background
    (/healthz 200, /readyz and searches 503 meanwhile). Raises StoreError (saying which step
    to run) before loading anything when the workdir has no published index,
    ServerStartError when the port is taken, and the load's own error (the server stops)
    when the first load fails, with how to recover (``versions rollback`` or ``promote``).
    """
    store = Store.at(workdir)
    try:
        store.require_current_index()
    except StoreError as e:
        no_pointer = not isinstance(e, PointerError) and store.root.is_dir() and store.current_index() is None
        if no_pointer and last_served_present(store) is not None:
            raise StoreError(f"{store.root / 'CURRENT'} is missing or empty, but this store has served versions: "
                             f"{missing_current_hint(store)}") from None
        raise
    sock = bind_socket(host, port)

    def first_load() -> Backend:
        try:
            return load_backend(workdir, max_embed_batch)
        except Exception as e:  # e.g. a corrupt index file: say how to get a working version served
            raise served_unusable(store, store.current_index_or_none(), e) from e

    app = create_app(
        first_load,
        reloader=StoreReloader(workdir, max_embed_batch),
        watch_interval_s=watch_interval_s,
        batching=BatchingConfig(max_batch=max_batch, max_wait_s=batch_wait_ms / 1000, max_embed_batch=max_embed_batch,
                                inline_max_s=inline_max_ms / 1000),
        admin_token=admin_token,
        load_in_background=True,  # /healthz answers at once, /readyz (and searches) 503 until loaded
        settle_heap=True,  # this process is the server's own
        max_large_uploads=max_large_uploads,
    )
    log.info("loading the model and index in the background")
    try:
        run_server(app, sock, make_server(app, log_level, base_url(sock), access_log=access_log))
    except ServerStartError as e:
        if e.__cause__ is not None:
            raise e.__cause__ from None  # e.g. StoreError: the CLI prints its message
        raise


@contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0, startup_timeout_s: float = 120.0) -> Iterator[str]:
    """Run ``app`` in a daemon thread; yield its base URL once it accepts requests."""
    sock = bind_socket(host, port)
    url = base_url(sock)
    server = make_server(app, "warning", log_config=None)
    failure: list[BaseException] = []

    def target() -> None:
        try:
            run_server(app, sock, server)
        except BaseException as e:  # reported to the waiting caller below
            failure.append(e)

    thread = threading.Thread(target=target, name=f"uvicorn {url}", daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if failure or not thread.is_alive():
            raise ServerStartError(f"server at {url} failed to start") from (failure[0] if failure else None)
        if time.monotonic() > deadline:
            server.should_exit = True
            raise ServerStartError(f"server at {url} did not start within {startup_timeout_s:.0f}s")
        time.sleep(0.05)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=30)
