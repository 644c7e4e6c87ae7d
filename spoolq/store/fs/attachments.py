"""Attachments of the filesystem store: copy (or reflink, or a link on request), hash, record,
publish by rename."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, BinaryIO

from ... import durable
from ...errors import InvalidInput
from ...model import COMPACT_JSON, AttachmentInfo
from ..base import AttachmentSource, attachment_name, checked_path

CHUNK = 1024 * 1024


def add_attachment(attach_dir: Path, src: AttachmentSource, sync: bool) -> AttachmentInfo:
    """Store one attachment in ``attach_dir``: a copy (a reflink where the filesystem can
    share extents), or a hard link when ``src.link`` and the file is on the same filesystem.

    The data lands as ``.<name>.<pid>.tmp``, is hashed (md5, sha256) and fsync'd, its
    metadata is written to ``.<name>.json``, and one rename publishes it under its name
    (re-attaching the same name replaces it). On any error the temporary file is removed.
    The hashes are taken from the stored copy itself, so they describe what is stored.
    """
    name = attachment_name(src)
    tmp = attach_dir / f".{name}.{os.getpid()}.tmp"  # the pid tells sweep whether its writer lives
    final = attach_dir / name
    md5, sha = hashlib.md5(), hashlib.sha256()
    size = 0
    linked = False
    try:
        if src.path is not None:
            path = src.path
            st = checked_path(path)
            if src.link and st.st_dev == os.stat(attach_dir).st_dev:
                try:
                    durable.link(path, tmp)
                    linked = True
                except OSError:
                    linked = False  # e.g. protected_hardlinks: fall back to a copy
            if linked:
                with open(tmp, "rb") as f:
                    size = _hash_stream(f, md5, sha)
                    if sync:
                        durable.fsync_fd(f.fileno())
            else:
                with open(path, "rb") as f:
                    size = _copy_file(f, tmp, md5, sha, sync)
        elif src.stream is not None:
            if _has_fd(src.stream):  # an open file (clone, dup): a reflink where the filesystem can
                size = _copy_file(src.stream, tmp, md5, sha, sync)
            else:
                size = _copy_stream(src.stream, tmp, md5, sha, sync)
        else:
            raise InvalidInput("an attachment needs a path or a stream")
        info = AttachmentInfo(name=name, size=size, md5=md5.hexdigest(), sha256=sha.hexdigest(),
                              path=str(final))
        # No path in the file: the message directory moves from state to state.
        meta: dict[str, Any] = {"md5": info.md5, "sha256": info.sha256, "size": info.size}
        if linked:  # served although it has other links: spoolq made this one (store/fs/beneath.py)
            meta["linked_inode"] = os.stat(tmp).st_ino
        durable.write_replace(attach_dir / f".{name}.json", _json(meta), sync=sync)
        if _same_file(tmp, final):
            os.unlink(tmp)  # the same file linked again: rename(2) of two links to one inode does nothing
        else:
            durable.rename(tmp, final, sync=sync)
        return info
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _has_fd(f: BinaryIO) -> bool:
    try:
        f.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is an OSError
        return False
    return True


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _hash_stream(f: BinaryIO, md5: Any, sha: Any) -> int:
    size = 0
    while chunk := f.read(CHUNK):
        md5.update(chunk)
        sha.update(chunk)
        size += len(chunk)
    return size


def _copy_file(f: BinaryIO, tmp: Path, md5: Any, sha: Any, sync: bool) -> int:
    """Copy the open file ``f`` to ``tmp``: a reflink (FICLONE) where the filesystem can,
    then hashed by reading the clone; else a streamed copy, hashed on the way."""
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        if durable.clone_file(f.fileno(), fd):
            with os.fdopen(os.dup(fd), "rb") as clone:
                size = _hash_stream(clone, md5, sha)
            if sync:
                durable.fsync_fd(fd)
            return size
    finally:
        os.close(fd)
    return _copy_stream(f, tmp, md5, sha, sync)


def _copy_stream(f: BinaryIO, tmp: Path, md5: Any, sha: Any, sync: bool) -> int:
    size = 0
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        while chunk := f.read(CHUNK):
            md5.update(chunk)
            sha.update(chunk)
            durable.write_stream_chunk(fd, chunk)
            size += len(chunk)
        if sync:
            durable.fsync_fd(fd)
    finally:
        os.close(fd)
    return size


def _json(obj: Any) -> bytes:
    return COMPACT_JSON.encode(obj).encode()
