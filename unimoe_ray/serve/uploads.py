"""Request bodies read under a byte cap, before any work: JSON and multipart/form-data.

Starlette's `request.json()` and `request.form()` read the whole body first, and `form()` spools
every file part to a temporary file with no size limit. Here a body is read chunk by chunk from
`request.stream()` with a running count: a Content-Length over the cap is refused before a byte
is read, and a body that grows past the cap is refused at the chunk that crosses it (the rest is
never read). A multipart body is parsed while it arrives (python-multipart's push parser, the
one Starlette wraps) with a cap per part, so no part grows past its own cap, parts stay in memory
(nothing is spooled to disk), and the 413 names the part that crossed its cap.

Errors are UploadError (status 400 or 413, the message, the form field it concerns); the ingress
turns them into its OpenAI-shaped errors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

PART_OVERHEAD = 64 * 1024  # a multipart body's boundaries and part headers, all parts together
JSON_OVERHEAD = 16 * 1024  # a JSON body's keys, numbers and punctuation besides its texts and file


class UploadError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param, self.code = status, param, code


@dataclass(frozen=True)
class UploadedFile:
    filename: str
    content_type: str | None
    data: bytes


@dataclass(frozen=True)
class Form:
    fields: dict[str, str]  # text parts (a repeated name keeps its last value)
    files: dict[str, UploadedFile]


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MB"


def json_body_limit(*, file_bytes: int, text_chars: int) -> int:
    """The most bytes a JSON body may take: one base64 file of `file_bytes` (4/3 of its size),
    two texts of `text_chars` characters at 6 bytes each (a JSON \\uXXXX escape), and
    JSON_OVERHEAD for the rest."""
    return 4 * -(-file_bytes // 3) + 2 * 6 * text_chars + JSON_OVERHEAD


async def read_body(request: Request, *, limit: int, hint: str = "") -> bytes:
    """The whole body, at most `limit` bytes (else UploadError 413, having read at most one
    chunk past the cap). `hint` ends the message (which setting sets the cap)."""
    return b"".join([chunk async for chunk in _bounded_stream(request, limit, hint)])


async def _bounded_stream(request: Request, limit: int, hint: str) -> AsyncIterator[bytes]:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise UploadError(
            413, f"the request body is {_mb(int(declared))}: at most {_mb(limit)}{hint}", code="file_too_large"
        )
    seen = 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            raise UploadError(
                413, f"the request body is over {_mb(limit)}: at most {_mb(limit)}{hint}", code="file_too_large"
            )
        yield chunk


async def read_form(
    request: Request, *, files: dict[str, int], field_bytes: int, max_fields: int = 16, hint: str = ""
) -> Form:
    """A multipart/form-data body parsed while it is read.

    Args:
        files: the file fields the endpoint takes, each with its cap in bytes; a file part under
            another name, or a text part under one of these names, is refused (400).
        field_bytes: the cap of each text part.
        max_fields: text parts at most.
        hint: ends the body-size message (which setting sets the cap).

    The body as a whole may take the parts' caps plus PART_OVERHEAD; a part past its cap is a
    413 naming it (param), read no further.
    """
    _, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if not boundary:
        raise UploadError(400, "a multipart/form-data body needs the boundary parameter in its Content-Type")
    limit = sum(files.values()) + max_fields * field_bytes + PART_OVERHEAD
    form = _FormBuilder(files, field_bytes, max_fields)
    parser = MultipartParser(boundary, form.callbacks())  # part headers count toward `limit` too
    try:
        async for chunk in _bounded_stream(request, limit, hint):
            parser.write(chunk)
        parser.finalize()
    except MultipartParseError as err:
        raise UploadError(400, f"malformed multipart body: {err}") from None
    if not form.ended:
        raise UploadError(400, "the multipart body ended before its closing boundary")
    return Form(fields=form.fields, files=form.files)


class _FormBuilder:
    """python-multipart callbacks that collect parts in memory, each under its cap."""

    def __init__(self, files: dict[str, int], field_bytes: int, max_fields: int) -> None:
        self.file_caps, self.field_bytes, self.max_fields = files, field_bytes, max_fields
        self.fields: dict[str, str] = {}
        self.files: dict[str, UploadedFile] = {}
        self.ended = False
        self._n_fields = 0
        self._headers: dict[bytes, bytes] = {}
        self._field, self._value = b"", b""
        self._name: str = ""
        self._filename: str | None = None
        self._cap = 0
        self._data = bytearray()

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self._headers, self._data = {}, bytearray()

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        self._headers[self._field.lower()] = self._value
        self._field, self._value = b"", b""

    def _headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if disposition != b"form-data" or b"name" not in options:
            raise UploadError(400, "a multipart part has no 'Content-Disposition: form-data; name=...' header")
        self._name = options[b"name"].decode("utf-8", "replace")
        raw_filename = options.get(b"filename")
        self._filename = None if raw_filename is None else raw_filename.decode("utf-8", "replace")
        name, allowed = self._name, sorted(self.file_caps)
        if self._filename is not None:
            if name not in self.file_caps:
                raise UploadError(400, f"unexpected file field {name!r}: only {allowed} may be files", param=name)
            if name in self.files:
                raise UploadError(400, f"{name} is given twice: send one file", param=name)
            self._cap = self.file_caps[name]
        else:
            if name in self.file_caps:
                raise UploadError(400, f"{name} must be an uploaded file (multipart file field)", param=name)
            self._n_fields += 1
            if self._n_fields > self.max_fields:
                raise UploadError(400, f"more than {self.max_fields} form fields")
            self._cap = self.field_bytes

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if len(self._data) + (end - start) > self._cap:
            code = "file_too_large" if self._filename is not None else "field_too_large"
            raise UploadError(
                413, f"{self._name} is over {_mb(self._cap)}: at most {_mb(self._cap)}", param=self._name, code=code
            )
        self._data += data[start:end]

    def _part_end(self) -> None:
        if self._filename is not None:
            content_type = self._headers.get(b"content-type")
            self.files[self._name] = UploadedFile(
                self._filename, content_type and content_type.decode("latin-1"), bytes(self._data)
            )
            return
        try:
            self.fields[self._name] = self._data.decode("utf-8")
        except UnicodeDecodeError:
            raise UploadError(400, f"form field {self._name!r} is not valid UTF-8", param=self._name) from None

    def _end(self) -> None:
        self.ended = True
