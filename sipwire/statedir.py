"""The instance's state directory and the private files in it, safe from other local users.

The runtime directory holds the control socket, the admin token, the dev TLS
key, the proxy's registrar and flow key, and the name of the stats block.
Another local user who could create or replace any of those could take
over the transport, so:

* the base is ``state_dir`` when configured, else ``$XDG_RUNTIME_DIR/sipwire``,
  else ``/tmp/sipwire-UID``;
* :func:`private_directory` creates a directory 0700, or accepts an existing
  one only when it is a real directory (not a symlink) owned by this user
  (the base may also be root's) and not writable by group or others (a
  sticky base such as ``/tmp`` is accepted: others cannot touch our entries);
* :func:`write_private` and :func:`read_private` open files with
  ``O_NOFOLLOW`` and create them 0600, so a planted symlink is refused.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

from sipwire.config import Settings
from sipwire.errors import ConfigurationError


class StateDirError(ConfigurationError):
    """A state directory or file is not safe to use; the message names it and says what to fix."""


def private_directory(path: Path, *, allow_root_owner: bool = False) -> Path:
    """Create ``path`` with mode 0700 (missing parents too), or check the existing one; return it."""
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    except OSError as error:
        raise StateDirError(f"cannot create the state directory {path}: {error.strerror}") from error
    try:
        info = os.lstat(path)
    except OSError as error:
        raise StateDirError(f"cannot inspect the state directory {path}: {error.strerror}") from error
    if stat.S_ISLNK(info.st_mode):
        raise StateDirError(f"state directory {path} is a symbolic link: remove it or set state_dir elsewhere")
    if not stat.S_ISDIR(info.st_mode):
        raise StateDirError(f"state directory {path} exists and is not a directory")
    owners = (os.getuid(), 0) if allow_root_owner else (os.getuid(),)
    if info.st_uid not in owners:
        raise StateDirError(
            f"state directory {path} belongs to uid {info.st_uid}, not to this user (uid {os.getuid()}): "
            "another user may have created it; remove it or set state_dir"
        )
    shared_writable = info.st_mode & (stat.S_IWGRP | stat.S_IWOTH)
    if shared_writable and not (allow_root_owner and info.st_mode & stat.S_ISVTX):
        raise StateDirError(
            f"state directory {path} is writable by group or others (mode {stat.S_IMODE(info.st_mode):o}): "
            f"run chmod go-w {path}"
        )
    return path


def runtime_directory(settings: Settings) -> Path:
    """The instance's runtime directory, created or checked (base first, then the instance)."""
    private_directory(settings.runtime_dir.parent, allow_root_owner=bool(settings.state_dir))
    return private_directory(settings.runtime_dir)


def write_private(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` with mode 0600, never through a symlink; ``exclusive``: fail if it exists."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | (os.O_EXCL if exclusive else os.O_TRUNC)
    descriptor = os.open(path, flags, 0o600)
    try:
        os.fchmod(descriptor, 0o600)  # an existing file keeps its mode on O_CREAT: force it
        os.write(descriptor, data)
    finally:
        os.close(descriptor)


def read_private(path: Path, limit: int = 65536) -> bytes:
    """Read at most ``limit`` bytes of ``path``, never through a symlink."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return os.read(descriptor, limit)
    finally:
        os.close(descriptor)


def instance_secret(directory: Path, name: str, size: int = 32) -> bytes:
    """A random secret kept in ``directory/name`` (0600), created once and shared by every process of the instance.

    Created under a temporary name and linked into place, so two workers
    starting at once agree on one value and never read half a file.
    """
    path = directory / name
    try:
        secret = read_private(path)
    except FileNotFoundError:
        secret = b""
    if len(secret) == size:
        return secret
    candidate = directory / f".{name}.{os.getpid()}.{secrets.token_hex(4)}"
    write_private(candidate, secrets.token_bytes(size), exclusive=True)
    try:
        os.link(candidate, path)
    except FileExistsError:
        pass  # another process won: use its secret
    finally:
        candidate.unlink()
    secret = read_private(path)
    if len(secret) != size:
        raise StateDirError(f"{path} does not hold a {size}-byte secret: remove it so a new one is made")
    return secret
