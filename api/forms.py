"""Multipart forms: small, plainly written ones read in one pass, the rest by Starlette.

Starlette's parser (python-multipart) is a streaming state machine that calls back into
Python for every header, field and chunk, and spools each file: ~45 µs for a form of
a small image and a sentence, a fifth of a cache-hit request's CPU. A form that is
small (its body read whole) and written the way browsers, curl and the HTTP libraries
write it is parsed here with a few ``bytes.find`` calls instead. Anything else,
large, chunked, unusual or wrong, goes to Starlette's parser, which gives the same
errors as ever: this reader says "not mine" (None), never "bad".

What counts as plain, part by part (RFC 7578 as clients write it):

- the body starts with ``--BOUNDARY`` CRLF and ends with ``--BOUNDARY--``, with
  nothing after but one CRLF; the Content-Type has one parameter, ``boundary``;
- at most 8 header lines a part (python-multipart's limit), each ``Token: value``
  under 4 KB, with a single ``Content-Disposition: form-data; name="..."`` and
  optionally ``; filename="..."``, quoted, with no quote, backslash or line break
  inside;
- each boundary in the body is followed by CRLF or, the last, by ``--``.

The result is the same ``FormData`` Starlette builds (text fields decoded from UTF-8,
else Latin-1; files as ``UploadFile``), which ``tests/api/test_forms.py`` holds equal to
Starlette's on generated and mutated bodies.
"""

from __future__ import annotations

import io
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.datastructures import FormData, Headers, UploadFile
from starlette.requests import Request

# Bodies up to Starlette's spooling size: it would have held them in memory too.
SMALL_BODY = 1024 * 1024
MAX_HEADER_LINES = 8  # python-multipart's per-part default
MAX_HEADER_LINE = 4096  # under python-multipart's 4096 + 128

# RFC 2046's boundary characters, less the space (never sent by clients).
_CONTENT_TYPE = re.compile(
    r"multipart/form-data;[ \t]*boundary=(?P<q>\"?)(?P<b>[0-9A-Za-z'()+_,\-./:=?]{1,70})(?P=q)",
    re.IGNORECASE,
)
_HEADER = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+): *([^\r\n]*)")
_PARAM = re.compile(rb';[ \t]*(name|filename)="([^"\\\r\n]*)"')


class InMemory(io.BytesIO):
    """A file's bytes, marked as never rolled to disk: ``UploadFile`` reads, seeks and
    closes a ``SpooledTemporaryFile`` whose ``_rolled`` is false in place, and any other
    file through a thread (two hops a request)."""

    _rolled = False


def plain_boundary(content_type: str) -> bytes | None:
    """The boundary of a ``multipart/form-data; boundary=...`` header with no other
    parameter, or None."""
    m = _CONTENT_TYPE.fullmatch(content_type)
    return m.group("b").encode() if m else None


def _text(raw: bytes) -> str:
    """As Starlette decodes names and fields of a UTF-8 form."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _disposition(value: bytes) -> dict[bytes, bytes] | None:
    """``form-data; name="..."[; filename="..."]``'s parameters, or None."""
    if not value.startswith(b"form-data"):
        return None
    params: dict[bytes, bytes] = {}
    pos = len(b"form-data")
    while pos < len(value):
        m = _PARAM.match(value, pos)
        if m is None or m.group(1) in params:
            return None
        params[m.group(1)] = m.group(2)
        pos = m.end()
    return params if b"name" in params else None


def parse_plain(body: bytes, boundary: bytes, max_files: int, max_fields: int) -> FormData | None:
    """The form in ``body``, or None when it is not plainly written (see the module's
    text) or has more files or fields than allowed (Starlette then says why)."""
    opener = b"--" + boundary
    if not body.startswith(opener):
        return None
    delimiter = b"\r\n" + opener
    items: list[tuple[str, str | UploadFile]] = []
    files = fields = 0
    pos = len(opener)  # just past a boundary
    while True:
        after = body[pos : pos + 2]
        if after == b"--":
            if body[pos + 2 :] not in (b"", b"\r\n"):
                return None
            return FormData(items)
        if after != b"\r\n":
            return None
        start = pos + 2
        end = body.find(delimiter, start)
        if end < 0:
            return None
        head_end = body.find(b"\r\n\r\n", start, end)
        if head_end < 0:
            return None
        lines = body[start:head_end].split(b"\r\n")
        if len(lines) > MAX_HEADER_LINES:
            return None
        headers: list[tuple[bytes, bytes]] = []
        params: dict[bytes, bytes] | None = None
        for line in lines:
            m = _HEADER.fullmatch(line) if len(line) < MAX_HEADER_LINE else None
            if m is None:
                return None
            name = m.group(1).lower()
            headers.append((name, m.group(2)))
            if name == b"content-disposition":
                if params is not None:
                    return None
                params = _disposition(m.group(2))
                if params is None:
                    return None
        if params is None:
            return None
        data = body[head_end + 4 : end]
        if b"filename" in params:
            files += 1
            if files > max_files:
                return None
            upload = UploadFile(
                InMemory(data),
                size=len(data),
                filename=_text(params[b"filename"]),
                headers=Headers(raw=headers),
            )
            items.append((_text(params[b"name"]), upload))
        else:
            fields += 1
            if fields > max_fields:
                return None
            items.append((_text(params[b"name"]), _text(data)))
        pos = end + len(delimiter)


@asynccontextmanager
async def read_form(
    request: Request, *, max_files: int, max_fields: int
) -> AsyncIterator[FormData]:
    """The request's multipart form, its files closed on leaving: parsed here when
    small and plain, else by Starlette (streamed, spooled, with its errors)."""
    form: FormData | None = None
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) <= SMALL_BODY:
        boundary = plain_boundary(request.headers.get("content-type", ""))
        if boundary is not None:
            form = parse_plain(await request.body(), boundary, max_files, max_fields)
    if form is None:  # Starlette re-reads a body already read from the request
        async with request.form(max_files=max_files, max_fields=max_fields) as streamed:
            yield streamed
        return
    try:
        yield form
    finally:
        await form.close()
