"""Log lines that cannot flood: at most one per key per interval, with a count of the rest.

A peer that sends garbage 10,000 times a second must not make the
transport spend its time writing 10,000 log lines a second.
"""

from __future__ import annotations

import logging
import time


class RateLimitedLog:
    """Per-key rate limiter around a logger. Not thread-safe: one per owner thread."""

    def __init__(self, logger: logging.Logger, interval: float = 1.0) -> None:
        self._logger = logger
        self._interval = interval
        self._next: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, key: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now < self._next.get(key, 0.0):
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._next[key] = now + self._interval
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            message += f" ({suppressed} similar lines suppressed)"
        self._logger.log(level, message, *args)
