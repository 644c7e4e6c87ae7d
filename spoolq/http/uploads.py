"""Request bodies that may be large: forms parsed as a stream, files spooled to disk.

Uploaded files are written straight to a temporary file in the spool root (same
filesystem as the queues), so attaching one is a hard link, not a copy, and memory use
stays at one chunk however large the file is (issue 4, "Streaming"). Small fields are
kept in memory up to :data:`MAX_FIELD_BYTES`.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qsl

from python_multipart.multipart import MultipartParser, MultipartState, parse_options_header
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request

from ..errors import TooLarge
from ..model import MAX_SEND_BYTES
from .errors import BadRequest

MAX_FIELD_BYTES = MAX_SEND_BYTES
"""All the non-file fields of one form together (a message as sent, model.MAX_SEND_BYTES):
before, 1,000 fields of 2 MiB each were allowed (2 GB)."""
MAX_FIELDS = 100
"""Parts (fields and files) of one form: RQ's largest form has a dozen."""
MAX_PART_HEADER_BYTES = 8192
MAX_URLENCODED_BYTES = 2 * MAX_SEND_BYTES
"""An urlencoded form (RQ's routes): a message's fields, percent-encoding doubling them
(the same number as limits.MAX_BODY, the cap on any non-upload body)."""
FLUSH_BYTES = 1024 * 1024
UPLOAD_PREFIX = "upload."


@dataclass
class UploadedFile:
    """A file part of a multipart form, already on disk at ``path``."""

    field: str
    filename: str
    path: Path
    size: int = 0
    content_type: str = ""


@dataclass
class ParsedForm:
    """Form fields (all values per name) and uploaded files."""

    fields: dict[str, list[str]] = field(default_factory=dict)
    files: list[UploadedFile] = field(default_factory=list)

    def get(self, name: str, default: str | None = None) -> str | None:
        values = self.fields.get(name)
        return values[0] if values else default

    def getlist(self, name: str) -> list[str]:
        return list(self.fields.get(name, []))

    def file(self, name: str) -> UploadedFile | None:
        for f in self.files:
            if f.field == name:
                return f
        return None

    def items(self) -> Iterator[tuple[str, str]]:
        for k, vs in self.fields.items():
            for v in vs:
                yield k, v

    def cleanup(self) -> None:
        """Remove the spooled files (an attached file keeps its hard link in the store)."""
        for f in self.files:
            try:
                os.unlink(f.path)
            except OSError:
                pass


def sweep_uploads(upload_dir: Path) -> None:
    """Remove spooled uploads left by a process that died mid-request."""
    try:
        names = os.listdir(upload_dir)
    except OSError:
        return
    for n in names:
        parts = n.split(".")
        if n.startswith(UPLOAD_PREFIX) and len(parts) > 2 and parts[1].isdigit():
            pid = int(parts[1])
            if pid == os.getpid():
                continue
            try:
                os.kill(pid, 0)
                continue
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
            try:
                os.unlink(upload_dir / n)
            except OSError:
                pass


class _StreamingForm:
    """Callbacks for python-multipart's push parser, writing file parts to disk as they come."""

    def __init__(self, upload_dir: Path, files: bool = True) -> None:
        self.upload_dir = upload_dir
        self.files = files
        self.form = ParsedForm()
        self._headers: dict[str, str] = {}
        self._hname = b""
        self._hvalue = b""
        self._name = ""
        self._file: IO[bytes] | None = None
        self._upload: UploadedFile | None = None
        self._buf = bytearray()
        self.nfields = 0
        self.field_bytes = 0  # non-file bytes of the whole form so far
        self.header_bytes = 0  # header bytes of the current part

    def callbacks(self) -> Any:
        return {
            "on_part_begin": self.on_part_begin,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
        }

    def on_part_begin(self) -> None:
        self._headers = {}
        self._buf = bytearray()
        self._file = None
        self._upload = None
        self.header_bytes = 0
        self.nfields += 1
        if self.nfields > MAX_FIELDS:
            raise BadRequest(f"too many form parts (limit {MAX_FIELDS})")

    def _header_bytes(self, n: int) -> None:
        self.header_bytes += n
        if self.header_bytes > MAX_PART_HEADER_BYTES:
            raise BadRequest(f"a form part's headers are longer than {MAX_PART_HEADER_BYTES} bytes")

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_bytes(end - start)
        self._hname += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_bytes(end - start)
        self._hvalue += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._hname.decode("latin-1").lower()] = self._hvalue.decode("latin-1")
        self._hname = b""
        self._hvalue = b""

    def on_headers_finished(self) -> None:
        disp, opts = parse_options_header(self._headers.get("content-disposition", ""))
        if disp != b"form-data":
            raise BadRequest("multipart part without Content-Disposition: form-data")
        self._name = opts.get(b"name", b"").decode("utf-8", "replace")
        if b"filename" in opts:
            if not self.files:
                raise BadRequest(f"this route takes no files (form part {self._name!r} is one)")
            filename = os.path.basename(opts[b"filename"].decode("utf-8", "replace").replace("\\", "/"))
            fd, path = tempfile.mkstemp(prefix=f"{UPLOAD_PREFIX}{os.getpid()}.", dir=self.upload_dir)
            self._file = os.fdopen(fd, "wb")
            self._upload = UploadedFile(field=self._name, filename=filename, path=Path(path),
                                        content_type=self._headers.get("content-type", ""))
            self.form.files.append(self._upload)

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._file is not None and self._upload is not None:
            self._file.write(data[start:end])
            self._upload.size += end - start
            return
        self._buf += data[start:end]
        self.field_bytes += end - start
        if self.field_bytes > MAX_FIELD_BYTES:
            raise TooLarge(f"the form's fields (files aside) are larger than {MAX_FIELD_BYTES} bytes; "
                           "send bulk data as a file")

    def on_part_end(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
            return
        self.form.fields.setdefault(self._name, []).append(self._buf.decode("utf-8", "replace"))

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


async def parse_form(request: Request, upload_dir: Path, files: bool = False) -> ParsedForm:
    """Parse a urlencoded or multipart body. Raise BadRequest for anything else or malformed,
    and for a file part unless the route takes ``files`` (nothing is written to disk then)."""
    ctype, opts = parse_options_header(request.headers.get("content-type", ""))
    if ctype == b"application/x-www-form-urlencoded":
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_URLENCODED_BYTES:
                raise TooLarge(f"form body larger than {MAX_URLENCODED_BYTES} bytes")
        form = ParsedForm()
        try:
            pairs = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True,
                              max_num_fields=MAX_FIELDS)
        except ValueError as e:
            raise BadRequest(f"bad form body: {e}") from None
        for k, v in pairs:
            form.fields.setdefault(k, []).append(v)
        return form
    if ctype != b"multipart/form-data":
        raise BadRequest("expected a form body (application/x-www-form-urlencoded or multipart/form-data)")
    boundary = opts.get(b"boundary")
    if not boundary:
        raise BadRequest("multipart/form-data without a boundary")
    if files:
        upload_dir.mkdir(parents=True, exist_ok=True)
    sink = _StreamingForm(upload_dir, files)
    try:
        parser = MultipartParser(boundary, sink.callbacks())
    except ValueError as e:
        raise BadRequest(f"bad multipart boundary: {e}") from None
    pending = bytearray()
    try:
        async for chunk in request.stream():
            pending += chunk
            if len(pending) >= FLUSH_BYTES:
                data, pending = bytes(pending), bytearray()
                await run_in_threadpool(_feed, parser, data)
        if pending:
            await run_in_threadpool(_feed, parser, bytes(pending))
        await run_in_threadpool(_finish, parser)
    except BaseException:
        sink.close()
        sink.form.cleanup()
        raise
    sink.close()
    return sink.form


def _feed(parser: MultipartParser, data: bytes) -> None:
    try:
        parser.write(data)
    except (BadRequest, TooLarge):
        raise
    except Exception as e:  # python-multipart raises its own error types for malformed input
        raise BadRequest(f"malformed multipart body: {e}") from None


def _finish(parser: MultipartParser) -> None:
    try:
        parser.finalize()
    except Exception as e:
        raise BadRequest(f"malformed multipart body: {e}") from None
    # finalize() accepts a body cut short; a complete one ends with the closing boundary.
    if parser.state != MultipartState.END:
        raise BadRequest("truncated multipart body (no closing boundary)")


@asynccontextmanager
async def form_of(request: Request, upload_dir: Path, files: bool = False) -> Any:
    """``async with form_of(request, dir) as form:`` spooled files are removed on exit. Only
    routes that store uploads pass ``files=True``; elsewhere a file part is a 400."""
    form = await parse_form(request, upload_dir, files)
    try:
        yield form
    finally:
        form.cleanup()
