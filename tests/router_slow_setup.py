"""A router whose setup takes a while (``--router tests.router_slow_setup:route``), as a real one may.

Its ``setup`` hook sleeps :data:`SETUP_SECONDS`, then creates the file named by the
environment variable ``SIPWIRE_TEST_SETUP_MARK``; requests are answered like the
built-in ``responder``. The start-up tests use the mark to see whether the
transport accepted a connection before its worker could route.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from sipwire.config import Settings
from sipwire.transport.routers import responder
from sipwire.transport.routing import RouteContext
from sipwire.transport.sip import SipMessage

SETUP_SECONDS = 1.0
MARK_VARIABLE = "SIPWIRE_TEST_SETUP_MARK"


def setup(settings: Settings) -> None:
    time.sleep(SETUP_SECONDS)
    Path(os.environ[MARK_VARIABLE]).touch()


def route(message: SipMessage, ctx: RouteContext) -> None:
    responder.route(message, ctx)
