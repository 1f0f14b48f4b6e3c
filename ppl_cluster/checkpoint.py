"""Atomic checkpoints of plain tensors and containers, loaded with ``weights_only=True``."""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from typing import Any

import torch

from .errors import CheckpointError

FORMAT = "ppl-cluster/1"
DIGEST = "sha256"  # key, beside "format", of the state's content digest (see :func:`digest`)
TEMP_PREFIX = ".tmp-"  # of atomic_write_bytes's temporary files


def _read_umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m


# os.umask can only be read by setting it, which races with other threads: do it once, at
# import, and prefer /proc (Linux), which reads the current value without changing it.
_IMPORT_UMASK = _read_umask()


def current_umask() -> int:
    """The process's umask, read without changing it where the OS allows (else as at import)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    return _IMPORT_UMASK


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the new one, never half.
    The file gets the mode ``open`` would give it (0666 less the umask)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=TEMP_PREFIX, suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            # mkstemp creates the file 0600 whatever the umask.
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def remove_stale_temps(directory: str) -> list[str]:
    """Delete the temporary files (``.tmp-*``) that interrupted :func:`atomic_write_bytes`
    calls left in ``directory`` (not its subfolders); returns their names, sorted. Only safe
    while no other process writes there (e.g. with the run directory locked)."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return []
    for entry in entries:
        if entry.name.startswith(TEMP_PREFIX) and not entry.is_dir(follow_symlinks=False):
            try:
                os.unlink(entry.path)
            except FileNotFoundError:
                continue
            removed.append(entry.name)
    return sorted(removed)


_SCALAR_TAGS = {str: b"S", int: b"I", float: b"F", bool: b"b", type(None): b"N"}


def _put(h: Any, tag: bytes, payload: bytes | memoryview) -> None:
    m = memoryview(payload)
    h.update(tag + m.nbytes.to_bytes(8, "little"))
    h.update(m)


def _update(h: Any, value: Any) -> None:
    """Feed ``value`` to hash ``h`` unambiguously: a one-byte type tag, a length, the content."""
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise TypeError(f"cannot digest a {value.layout} tensor")
        t = value.detach().cpu().resolve_conj().resolve_neg().contiguous()
        _put(h, b"T", f"{t.dtype}{tuple(t.shape)}".encode())
        _put(h, b"B", memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    elif isinstance(value, dict):
        _put(h, b"D", str(len(value)).encode())
        for k, v in value.items():
            _update(h, k)
            _update(h, v)
    elif isinstance(value, (list, tuple)):
        _put(h, b"L" if isinstance(value, list) else b"U", str(len(value)).encode())
        for v in value:
            _update(h, v)
    elif type(value) in _SCALAR_TAGS:
        # repr round-trips floats exactly.
        _put(h, _SCALAR_TAGS[type(value)], repr(value).encode("utf-8", "surrogatepass"))
    else:
        raise TypeError(f"cannot digest a {type(value).__name__} in a checkpoint")


def digest(state: Any) -> str:
    """SHA-256 (hex) of ``state``: containers walked in order, each tensor's dtype, shape and
    bytes, each str/int/float/bool/None's type and repr (TypeError for anything else)."""
    h = hashlib.sha256()
    _update(h, state)
    return h.hexdigest()


def save(path: str, state: dict[str, Any]) -> None:
    """Write ``state`` atomically with its format and digest (:func:`load` checks both)."""
    body = {"format": FORMAT, **{k: v for k, v in state.items() if k != DIGEST}}
    # The digest key goes second, so that load's dict, once it is popped, is ``body`` in order.
    buf = io.BytesIO()
    torch.save({"format": FORMAT, DIGEST: digest(body), **body}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load(path: str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint written by :func:`save`; anything else, or one whose contents changed
    since, raises CheckpointError. Checkpoints without a digest (older versions) still load."""
    if not os.path.isfile(path):
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path} is not a readable ppl-cluster checkpoint ({first[:120]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a ppl-cluster checkpoint (format {FORMAT} expected)")
    if DIGEST in state:
        saved = state.pop(DIGEST)
        try:
            same = isinstance(saved, str) and digest(state) == saved
        except TypeError:
            same = False
        if not same:
            raise CheckpointError(
                f"{path} is corrupt: its contents do not match the checksum saved with them")
    return state
