"""The one-pass multipart reader (``api/forms.py``) against Starlette's parser: on every
body it takes, it must build the same form; what it does not take goes to Starlette."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import httpx
import pytest
from starlette.datastructures import FormData, Headers, UploadFile
from starlette.formparsers import MultiPartException, MultiPartParser
from starlette.requests import Request

from api.forms import SMALL_BODY, InMemory, parse_plain, plain_boundary, read_form

Item = tuple[str, Any]


def _items(form: FormData) -> list[Item]:
    """A form as plain values: texts, and files as (filename, bytes, raw headers)."""
    out: list[Item] = []
    for name, value in form.multi_items():
        if isinstance(value, UploadFile):
            value.file.seek(0)
            out.append((name, (value.filename, value.file.read(), value.headers.raw, value.size)))
        else:
            out.append((name, value))
    return out


def starlette(body: bytes, content_type: str, max_files: int = 1000, max_fields: int = 1000):
    """Starlette's form of ``body`` as plain values, or the exception it raises."""

    async def parse() -> list[Item] | Exception:
        async def stream():
            yield body

        parser = MultiPartParser(
            Headers({"content-type": content_type}),
            stream(),
            max_files=max_files,
            max_fields=max_fields,
        )
        try:
            form = await parser.parse()
        except MultiPartException as exc:
            return exc
        try:
            return _items(form)
        finally:
            await form.close()

    return asyncio.run(parse())


def ours(body: bytes, content_type: str, max_files: int = 1000, max_fields: int = 1000):
    boundary = plain_boundary(content_type)
    if boundary is None:
        return None
    form = parse_plain(body, boundary, max_files, max_fields)
    return None if form is None else _items(form)


def written_by_httpx(data: dict[str, str], files: list[tuple[str, tuple[str, bytes]]]):
    request = httpx.Request("POST", "http://api/v1/jobs", data=data, files=files)
    return request.read(), request.headers["content-type"]


# Bytes a file may hold that look like multipart's own syntax.
TRICKY = b'\r\n--\r\n\r\n--x--\r\n\x00\xff\xfe;name="a"\r\n'


@pytest.mark.parametrize(
    "data,files",
    [
        ({"text": "a dog"}, [("image", ("a.jpg", b"\xff\xd8\xff\xe0jpeg bytes"))]),
        (
            {"text": "a dog", "premise": "a photo", "callback_url": "https://hooks.example/x"},
            [("image", ("photo of a dog.jpg", TRICKY))],
        ),
        (  # a batch: several files and texts
            {f"text_{i}": f"item {i}" for i in range(4)},
            [(f"image_{i}", (f"{i}.png", bytes(range(256)) * (i + 1))) for i in range(4)],
        ),
        ({"text": "ein Hund 🐕", "premise": ""}, [("image", ("Hündchen.jpg", b""))]),
    ],
)
def test_forms_written_by_a_client_are_read_in_one_pass_as_starlette_reads_them(data, files):
    body, content_type = written_by_httpx(data, files)
    got = ours(body, content_type)
    assert got is not None, "a client's ordinary form must take the one-pass reader"
    assert got == starlette(body, content_type)


BROWSER = (  # as Chrome's FormData writes it
    b"------WebKitFormBoundaryq4fV1xZ2TNp7Lr8k\r\n"
    b'Content-Disposition: form-data; name="image"; filename="cup.jpg"\r\n'
    b"Content-Type: image/jpeg\r\n\r\n"
    b"\xff\xd8\xff\xdb\r\n--\r\n"
    b"\r\n------WebKitFormBoundaryq4fV1xZ2TNp7Lr8k\r\n"
    b'Content-Disposition: form-data; name="text"\r\n\r\n'
    b"a cup of coffee"
    b"\r\n------WebKitFormBoundaryq4fV1xZ2TNp7Lr8k--\r\n",
    "multipart/form-data; boundary=----WebKitFormBoundaryq4fV1xZ2TNp7Lr8k",
)
CURL = (  # as curl -F writes it
    b"--------------------------d74496d66958873e\r\n"
    b'Content-Disposition: form-data; name="text"\r\n\r\n'
    b"a cup\r\n"
    b"\r\n--------------------------d74496d66958873e\r\n"
    b'Content-Disposition: form-data; name="image"; filename="cup.jpg"\r\n'
    b"Content-Type: image/jpeg\r\n\r\n"
    b"\xff\xd8jpeg"
    b"\r\n--------------------------d74496d66958873e--\r\n",
    "multipart/form-data; boundary=------------------------d74496d66958873e",
)


@pytest.mark.parametrize("body,content_type", [BROWSER, CURL], ids=["browser", "curl"])
def test_forms_written_by_browsers_and_curl_take_the_one_pass_reader(body, content_type):
    got = ours(body, content_type)
    assert got is not None
    assert got == starlette(body, content_type)
    assert dict((k, v) for k, v in got)["text"] in ("a cup of coffee", "a cup\r\n")


@pytest.mark.parametrize(
    "content_type",
    [
        "multipart/form-data; boundary=x; charset=latin-1",  # another parameter
        'multipart/form-data; boundary="x',  # unbalanced quote
        "multipart/form-data",
        "multipart/mixed; boundary=x",
        "multipart/form-data; boundary=" + "x" * 71,  # longer than RFC 2046 allows
    ],
)
def test_unusual_content_types_go_to_starlette(content_type):
    assert plain_boundary(content_type) is None


def test_quoted_and_unquoted_boundaries_are_read():
    assert plain_boundary('multipart/form-data; boundary="a:b=c"') == b"a:b=c"
    assert plain_boundary("Multipart/Form-Data;boundary=abc") == b"abc"


def test_more_files_or_fields_than_allowed_go_to_starlette_which_refuses_them():
    body, content_type = written_by_httpx(
        {"text": "a"}, [("image", ("a.jpg", b"1")), ("image_1", ("b.jpg", b"2"))]
    )
    assert ours(body, content_type, max_files=1) is None
    assert isinstance(starlette(body, content_type, max_files=1), MultiPartException)
    assert ours(body, content_type, max_fields=0) is None
    assert isinstance(starlette(body, content_type, max_fields=0), MultiPartException)
    assert ours(body, content_type, max_files=2, max_fields=1) is not None


@pytest.mark.parametrize(
    "extra",
    [
        [b"X-Long: " + b"a" * 5000],  # over python-multipart's 4 KB header line
        [b"X-Long: " + b"a" * 4090],  # under it, over ours
        [f"X-{i}: v".encode() for i in range(8)],  # 9 headers: over the count
    ],
    ids=["line-over-both", "line-over-ours", "too-many"],
)
def test_parts_with_long_or_many_headers_go_to_starlette(extra):
    body = (
        b"--x\r\n"
        + b"\r\n".join([b'Content-Disposition: form-data; name="text"', *extra])
        + b"\r\n\r\na dog\r\n--x--\r\n"
    )
    assert ours(body, "multipart/form-data; boundary=x") is None
    theirs = starlette(body, "multipart/form-data; boundary=x")
    assert isinstance(theirs, MultiPartException) == (len(extra[0]) > 4096 + 128 or len(extra) > 7)


def _random_form(rng: random.Random) -> tuple[bytes, str]:
    """A client-like form with random names, texts and files, sometimes written with the
    liberties clients rarely take (header case, spacing, extra headers, order)."""
    boundary = rng.choice(["x", "----b0und4ry", "a'b(c)d+e_f,g-h.i/j:k=l?m", "9" * 70])
    parts = []
    for _ in range(rng.randint(0, 4)):
        name = rng.choice(["image", "text", "a b", "naïve", "x;y", "", "Ω"])
        is_file = rng.random() < 0.5
        value = bytes(rng.choice(b'ab\r\n-x"\\;\xff\x00 =') for _ in range(rng.randint(0, 40)))
        if rng.random() < 0.2:
            value += b"\r\n--" + boundary.encode()[: rng.randint(0, len(boundary))]
        disposition = rng.choice(["Content-Disposition", "content-disposition"]) + ":"
        disposition += rng.choice([" ", "", "  "]) + "form-data"
        params = [f'name="{name}"']
        if is_file:
            params.append(f'filename="{rng.choice(["a.jpg", "", "ü.png", "x y"])}"')
        if rng.random() < 0.2:
            params.reverse()
        disposition += "".join(rng.choice(["; ", ";", ";\t"]) + p for p in params)
        headers = [disposition]
        if rng.random() < 0.4:
            headers.append("Content-Type: " + rng.choice(["image/jpeg", "text/plain; charset=x"]))
        if rng.random() < 0.1:
            headers.append("X-Extra:\tvalue ")
        rng.shuffle(headers)
        parts.append("\r\n".join(headers).encode("utf-8") + b"\r\n\r\n" + value)
    b = boundary.encode()
    body = b"".join(b"--" + b + b"\r\n" + p + b"\r\n" for p in parts) + b"--" + b + b"--"
    if rng.random() < 0.5:
        body += b"\r\n"
    if rng.random() < 0.3:
        boundary = f'"{boundary}"'
    return body, f"multipart/form-data; boundary={boundary}"


def _mutate(rng: random.Random, body: bytes) -> bytes:
    """One small corruption: a byte inserted, dropped or changed, a cut, a slice
    repeated, or a preamble or epilogue added."""
    interesting = b'\r\n-";\\ \t:=abX\x00\xff'
    i = rng.randint(0, len(body))
    kind = rng.randrange(7)
    if kind == 0:
        return body[:i] + bytes([rng.choice(interesting)]) + body[i:]
    if kind == 1:
        return body[:i] + body[i + 1 :]
    if kind == 2 and i < len(body):
        return body[:i] + bytes([rng.choice(interesting)]) + body[i + 1 :]
    if kind == 3:
        return body[:i]
    if kind == 4:
        j = rng.randint(i, min(len(body), i + 20))
        return body[:j] + body[i:j] + body[j:]
    if kind == 5:
        return b"\r\n" + body
    return body + rng.choice([b"epilogue", b"\r\n\r\n", b"--"])


# Starlette leaves the file of a part cut off by the body's end unclosed (it returns the
# parts before it, no error): the garbage collector's ResourceWarning is Starlette's.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_on_generated_and_corrupted_forms_the_reader_takes_only_what_starlette_reads_alike():
    rng = random.Random(20261202)
    taken = refused_by_both = 0
    for case in range(3000):
        body, content_type = _random_form(rng)
        for _ in range(rng.choice([0, 0, 1, 2])):
            body = _mutate(rng, body)
        got = ours(body, content_type)
        theirs = starlette(body, content_type)
        if got is None:
            refused_by_both += isinstance(theirs, Exception)
            continue
        taken += 1
        assert not isinstance(theirs, Exception), (case, body, content_type, theirs)
        assert got == theirs, (case, body, content_type)
    # Both sides of the split were exercised: most clean forms taken, corruptions left.
    assert taken > 1000, taken
    assert refused_by_both > 100, refused_by_both


def _request(body: bytes, headers: list[tuple[bytes, bytes]]) -> Request:
    sent = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> dict:
        return sent.pop() if sent else {"type": "http.disconnect"}

    scope = {"type": "http", "method": "POST", "path": "/", "headers": headers}
    return Request(scope, receive)


def test_read_form_parses_small_plain_forms_itself_and_hands_the_rest_to_starlette():
    body, content_type = written_by_httpx({"text": "a dog"}, [("image", ("a.jpg", b"jpeg"))])
    ctype = content_type.encode()

    async def files_of(body: bytes, headers: list[tuple[bytes, bytes]]) -> list[tuple]:
        async with read_form(_request(body, headers), max_files=1, max_fields=8) as form:
            upload = form["image"]
            assert isinstance(upload, UploadFile) and form["text"] == "a dog"
            return [type(upload.file), await upload.read(), upload.filename]

    def length(n: int) -> tuple[bytes, bytes]:
        return (b"content-length", str(n).encode())

    plain = asyncio.run(files_of(body, [(b"content-type", ctype), length(len(body))]))
    # InMemory is read in place: UploadFile sends other files' reads to a thread.
    assert plain == [InMemory, b"jpeg", "a.jpg"] and UploadFile(InMemory(b""))._in_memory
    # No declared length (chunked), too large a one, or a preamble: Starlette's parser.
    for headers, data in [
        ([(b"content-type", ctype)], body),
        ([(b"content-type", ctype), length(SMALL_BODY + 1)], body),
        ([(b"content-type", ctype), length(len(body) + 2)], b"\r\n" + body),
    ]:
        kind, read, name = asyncio.run(files_of(data, headers))  # closed on leaving
        assert kind is not InMemory and (read, name) == (b"jpeg", "a.jpg")
