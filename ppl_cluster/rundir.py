"""One writer per run directory, and ``--overwrite`` that never leaves two runs mixed.

A writer holds an OS advisory lock (``flock``) on ``RUN/.lock`` for its whole run. The kernel
releases it when the process ends, however it ends, so a lock left by a dead process is simply
taken again; a live holder is named (PID and host, written into the file) in the refusal.
Readers (``evaluate``, ``sample``, ...) take no lock: every file is replaced atomically.

``--overwrite`` first moves the old run into ``RUN/.previous/``. :func:`settle` then keeps the
new run once it has written a checkpoint, and otherwise puts the old one back, byte for byte;
it runs when the writer exits and, after a kill, when the next writer takes the lock.

``manifest.json`` lists the files that belong to the run, with their sizes and SHA-256.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from .checkpoint import atomic_write_bytes, remove_stale_temps
from .errors import RunDirError
from .files import source

LOCK = ".lock"
PREVIOUS = ".previous"
MANIFEST = "manifest.json"
_held: set[str] = set()  # real paths this process holds: the lock is re-entrant


def _os_error(exc: OSError, directory: str) -> RunDirError:
    return RunDirError(f"cannot write the run directory {directory}: "
                       f"{exc.strerror or exc} ({exc.filename or directory})")


@contextmanager
def locked(directory: str) -> Iterator[None]:
    """Hold ``directory``'s writer lock (creating the directory), or raise RunDirError naming
    the process that holds it. Re-entrant within one process. On taking it, an interrupted
    ``--overwrite`` is settled and temp files of killed writes are removed."""
    key = os.path.realpath(directory)
    if key in _held:  # the outermost holder releases it
        yield
        return
    created = not os.path.isdir(directory)
    fd = _take(directory)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        _held.add(key)
        settle(directory)
        for sub in (directory, os.path.join(directory, "restarts")):
            if os.path.isdir(sub):
                remove_stale_temps(sub)
        yield
    finally:
        _held.discard(key)
        # Removed while still held: a process that opened it meanwhile finds it unlinked
        # (see _take) and starts over.
        try:
            os.unlink(os.path.join(directory, LOCK))
        except FileNotFoundError:
            pass
        if created and is_empty(directory):  # a run that failed before writing anything
            try:
                os.rmdir(directory)
            except OSError:
                pass  # something appeared meanwhile: leave it
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _take(directory: str) -> int:
    """An open, locked descriptor of ``directory``'s lock file (RunDirError if held)."""
    path = os.path.join(directory, LOCK)
    while True:
        try:
            os.makedirs(directory, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as exc:
            raise _os_error(exc, directory) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").split()
            os.close(fd)
            who = f"PID {holder[0]} on {holder[1]}" if len(holder) >= 2 else "another process"
            raise RunDirError(f"{directory} is in use by another run ({who}): wait for it to "
                              "end or choose another --out") from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # its holder removed it as we took it: take the new one


def held(directory: str) -> bool:
    """Whether this process holds ``directory``'s writer lock."""
    return os.path.realpath(directory) in _held


def _entries(directory: str) -> list[str]:
    return [n for n in os.listdir(directory) if n not in (LOCK, PREVIOUS)]


def is_empty(directory: str) -> bool:
    """No run in ``directory`` (missing, or only the lock files)."""
    return not os.path.isdir(directory) or not _entries(directory)


def set_aside(directory: str) -> None:
    """Move the run in ``directory`` into ``.previous/`` (the caller holds the lock); the next
    :func:`settle` keeps or restores it."""
    aside = os.path.join(directory, PREVIOUS)
    try:
        os.makedirs(aside)
        for name in _entries(directory):
            os.replace(os.path.join(directory, name), os.path.join(aside, name))
    except OSError as exc:
        settle(directory)
        raise _os_error(exc, directory) from None


def _has_checkpoint(directory: str) -> bool:
    restarts = os.path.join(directory, "restarts")
    return os.path.isfile(os.path.join(directory, "checkpoint.pt")) or (
        os.path.isdir(restarts) and any(n.endswith(".pt") and not n.startswith(".")
                                        for n in os.listdir(restarts)))


def settle(directory: str) -> str | None:
    """Finish an ``--overwrite`` in ``directory``: keep the new run if it wrote a checkpoint
    ("new"), else remove what it wrote and bring the old run back ("old"); None if there was
    nothing to settle."""
    aside = os.path.join(directory, PREVIOUS)
    if not os.path.isdir(aside):
        return None
    # The choice is made durable before acting on it, so that a kill midway is finished the
    # same way by the next writer.
    restoring = os.path.join(aside, ".restore")
    if not os.path.exists(restoring):
        if _has_checkpoint(directory):
            shutil.rmtree(aside)
            return "new"
        open(restoring, "w").close()
    for name in _entries(directory):
        path = os.path.join(directory, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)
    for name in os.listdir(aside):
        if name != ".restore":
            os.replace(os.path.join(aside, name), os.path.join(directory, name))
    os.unlink(restoring)
    os.rmdir(aside)
    return "old"


def record(directory: str, *paths: str) -> None:
    """Add ``paths`` (files inside ``directory``) to its manifest, with size and SHA-256; a
    short lock on the directory serialises concurrent writers (a fit, an evaluate beside it)."""
    entries: dict[str, Any] = {}
    for path in paths:
        rel = os.path.relpath(os.path.abspath(path), os.path.abspath(directory))
        if rel.startswith(os.pardir) or not os.path.isfile(path):
            continue  # written outside the run (e.g. sample --out elsewhere)
        found = source(path)
        entries[rel] = {"bytes": found["bytes"], "sha256": found["sha256"]}
    if not entries:
        return
    fd = os.open(directory, os.O_RDONLY)  # the directory itself: no lock file to leave behind
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        files = read_manifest(directory)
        files.update(entries)
        text = json.dumps({"files": dict(sorted(files.items()))}, indent=2) + "\n"
        atomic_write_bytes(os.path.join(directory, MANIFEST), text.encode())
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def read_manifest(directory: str) -> dict[str, Any]:
    """The files the manifest of ``directory`` lists ({} when it has none)."""
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as fh:
            files = json.load(fh)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        raise RunDirError(f"{path} is not a valid manifest") from None
    if not isinstance(files, dict):
        raise RunDirError(f"{path} is not a valid manifest")
    return files

