"""The shared-memory segment under a stats block: its name, attaching it, the mapping both sides share.

``multiprocessing.resource_tracker``: on Python < 3.13 every
``SharedMemory`` attach registers the segment, and the tracker unlinks it
when the attaching process exits, which would let a ``ctl`` run delete a
live transport's block. Every attach here unregisters at once (3.13+:
``track=False``); the writer registers again just before its own unlink
so the tracker's books balance.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import sys
import weakref
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from typing import TYPE_CHECKING, Final, Self

from sipwire.statedir import read_private, runtime_directory, write_private
from sipwire.transport.statsblock.layout import Capacities

if TYPE_CHECKING:
    from sipwire.config import Settings

#: The runtime-directory file that names the instance's current block. The name has a random part, so
#: another local user cannot create (squat) a segment under it first; readers trust only this file, in
#: a directory no other user controls (:mod:`sipwire.statedir`).
NAME_FILE: Final = "stats-block.name"
#: Random bytes in a block's name (hex-encoded).
NAME_RANDOM_BYTES: Final = 8


def block_name(instance: str, runtime_dir: str | os.PathLike[str], uid: int | None = None) -> str:
    """``sipwire.<uid>.<instance>.<hash of the runtime dir>``: the prefix of every block of an instance."""
    digest = hashlib.sha256(os.path.abspath(runtime_dir).encode()).hexdigest()[:12]
    return f"sipwire.{os.getuid() if uid is None else uid}.{instance[:64]}.{digest}"


def new_block_name(settings: Settings) -> str:
    """A fresh name for a transport's block: the instance's prefix and a random part."""
    return f"{block_name(settings.instance, settings.runtime_dir)}.{secrets.token_hex(NAME_RANDOM_BYTES)}"


def publish_block_name(settings: Settings, name: str) -> None:
    write_private(runtime_directory(settings) / NAME_FILE, name.encode("ascii"))


def published_block_name(settings: Settings) -> str | None:
    """The name the instance's transport published, or None (none yet, or not one of this instance's names)."""
    try:
        name = read_private(runtime_directory(settings) / NAME_FILE, limit=255).decode("ascii", "replace")
    except FileNotFoundError:
        return None
    return name if name.startswith(block_name(settings.instance, settings.runtime_dir) + ".") else None


# -- shared memory without resource_tracker surprises ------------------------------------------


def _open_shm(name: str, create: bool = False, size: int = 0) -> SharedMemory:
    """Create or attach ``name`` without leaving it registered with the resource tracker."""
    if sys.version_info >= (3, 13):
        return SharedMemory(name, create=create, size=size, track=False)
    shm = SharedMemory(name, create=create, size=size)
    # Python < 3.13 registers every attach; the tracker would unlink the block when this process exits.
    resource_tracker.unregister("/" + shm.name, "shared_memory")
    return shm


def _unlink_shm(shm: SharedMemory) -> None:
    if sys.version_info < (3, 13):
        # unlink() tells the tracker to forget the name; register first so that message balances.
        resource_tracker.register("/" + shm.name, "shared_memory")
    shm.unlink()


# -- the mapping both sides share -----------------------------------------------------------------


class _Block:
    def __init__(self, shm: SharedMemory, capacities: Capacities) -> None:
        self.shm = shm
        self.name = shm.name
        self.capacities = capacities
        self.layout = capacities.layout()
        buf = shm.buf
        assert buf is not None  # an open SharedMemory always has its buffer
        self._buf: memoryview = buf
        # The seqlock words: one aligned 8-byte load or store each (native 'Q').
        self._words: memoryview = buf.cast("Q")
        # This view pins the mapping: release it at exit too, before SharedMemory.__del__ tries to unmap
        # (else "BufferError: cannot close exported pointers exist" on a reader that never called close()).
        self._release_words = weakref.finalize(self, self._words.release)

    def close(self) -> None:
        """Unmap (our own view first: an exported buffer would keep the mapping alive)."""
        self._release_words()
        self.shm.close()  # releases shm.buf (self._buf) and unmaps

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
