"""Checksummed, atomically written tensor files (the format of ``UserStateStore.save``).

Layout: ``MAGIC (8 bytes) | sha256 of the payload (32 bytes) | payload length (8 bytes, little
endian) | payload``, where the payload is a ``torch.save`` of tensors, lists, dicts and plain
values, read back with ``torch.load(weights_only=True)`` (no code runs on load).

A write goes to a temporary file in the same folder, is fsynced, then renamed over the target
(``os.replace``), so a reader sees the old file or the new one, never a half-written one; a file
cut short anyway (a copy that died, a full disk) fails the length or checksum check with a clear
:class:`StateFileError`.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["MAGIC", "StateFileError", "read_checked", "write_atomic"]

MAGIC = b"TRMSTAT1"
_HEADER = len(MAGIC) + 32 + 8


class StateFileError(ValueError):
    """A state file is missing, truncated, corrupted or of another format."""


def write_atomic(path: str | os.PathLike[str], payload: Any) -> Path:
    """``torch.save`` ``payload`` to ``path`` atomically, behind a sha256 header.

    Args:
        path (str | os.PathLike): target file; its folder must exist.
        payload (Any): tensors / lists / dicts / str / int / float (weights_only-loadable).

    Example::

        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "x.pt")
        >>> _ = write_atomic(p, {"a": torch.arange(3)})
        >>> read_checked(p)["a"].tolist()
        [0, 1, 2]

    Returns:
        Path: the written path.
    """
    target = Path(path)
    if not target.parent.is_dir():
        raise StateFileError(f"cannot write {target}: folder {target.parent} does not exist")
    buf = io.BytesIO()
    torch.save(payload, buf)
    body = buf.getvalue()
    header = MAGIC + hashlib.sha256(body).digest() + struct.pack("<Q", len(body))
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header)
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
    return target


def read_checked(path: str | os.PathLike[str]) -> Any:
    """Read a :func:`write_atomic` file, checking magic, length and sha256; ``weights_only`` load.

    Args:
        path (str | os.PathLike): the file.

    Returns:
        Any: the payload.

    Raises:
        StateFileError: missing, truncated, corrupted or foreign file.
    """
    source = Path(path)
    if not source.is_file():
        raise StateFileError(f"state file {source} does not exist")
    data = source.read_bytes()
    if len(data) < _HEADER or data[: len(MAGIC)] != MAGIC:
        if len(data) < _HEADER and MAGIC.startswith(data[: len(MAGIC)]):
            raise StateFileError(
                f"state file {source} is truncated: {len(data)} bytes, shorter than its header"
            )
        raise StateFileError(f"{source} is not a torchrec-mamba state file (bad magic)")
    digest = data[len(MAGIC) : len(MAGIC) + 32]
    (length,) = struct.unpack("<Q", data[len(MAGIC) + 32 : _HEADER])
    body = data[_HEADER:]
    if len(body) != length:
        raise StateFileError(
            f"state file {source} is truncated or padded: header says {length} payload bytes, "
            f"found {len(body)}"
        )
    if hashlib.sha256(body).digest() != digest:
        raise StateFileError(f"state file {source} is corrupted: sha256 checksum mismatch")
    return torch.load(io.BytesIO(body), weights_only=True, map_location="cpu")
