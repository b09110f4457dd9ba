"""Running the console under uvicorn: ``sipwire console`` (and the console half of ``sipwire run``).

The listening socket is bound here, before uvicorn starts, so a port of 0
is resolved at once and the chosen address is logged, as the transport
does. Startup problems (address in use, htmx not installed, token file
not writable) end the process with exit status 1 and one sentence.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading

import uvicorn

from sipwire.config import Settings
from sipwire.console.assets import AssetsMissingError
from sipwire.console.auth import AuthSetupError
from sipwire.errors import ConfigurationError

log = logging.getLogger("sipwire.console")

LISTEN_BACKLOG = 128


class ConsoleStartupError(ConfigurationError):
    """The console cannot start; the message says why."""


def bind(settings: Settings) -> socket.socket:
    host, port = settings.console_address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted sockets inherit TCP_NODELAY on Linux. Without it, a response written as headers
    # then body waits for the client's delayed ACK: ~40 ms on every request of a kept-alive
    # connection (measured by bench/consolebench.py).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise ConsoleStartupError(f"cannot listen on {settings.console_listen}: {error.strerror}") from error
    sock.listen(LISTEN_BACKLOG)
    return sock


def watch_lifeline(fd: int, server: uvicorn.Server) -> None:
    """Stop ``server`` once the process holding the other end of the pipe ``fd`` is gone (EOF).

    ``sipwire run`` gives its console child such a pipe, so the console never
    outlives it, even when it is killed with SIGKILL.
    """

    def wait() -> None:
        with contextlib.suppress(OSError):
            while os.read(fd, 1):
                pass
        log.warning("the sipwire run process that started this console is gone: stopping")
        server.should_exit = True

    threading.Thread(target=wait, name="sipwire-lifeline", daemon=True).start()


def serve(settings: Settings, lifeline: int | None = None) -> int:
    """Serve until SIGINT/SIGTERM (or EOF on ``lifeline``); the exit status for the command line."""
    from sipwire.console.app import create_app  # noqa: PLC0415 - keeps `sipwire transport` free of web imports

    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s console[%(process)d] %(levelname)s %(name)s: %(message)s",
    )
    try:
        app = create_app(settings)
        sock = bind(settings)
    except (AssetsMissingError, AuthSetupError, ConsoleStartupError) as error:
        log.error("cannot start the console: %s", error)
        return 1
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    log.info("console listening on http://%s/ (API docs at /docs), transport instance %s", shown, settings.instance)
    config = uvicorn.Config(
        app,
        log_level=settings.log_level,
        access_log=settings.log_level == "debug",
        server_header=False,
        lifespan="on",
    )
    server = uvicorn.Server(config)
    if lifeline is not None:
        watch_lifeline(lifeline, server)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:
        pass  # uvicorn re-raises SIGINT after its graceful shutdown: Ctrl-C is a normal stop here
    finally:
        sock.close()
    return 0
