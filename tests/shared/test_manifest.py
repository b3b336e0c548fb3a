"""Manifests: files named by rows found inside the image root, never outside it; lines
and CSV records read in bounded pieces, never held whole."""

from __future__ import annotations

import io
import json
import os
import tracemalloc

import pytest

from shared.errors import ManifestError, ManifestLineTooLongError, PayloadTooLargeError
from shared.scans.manifest import (
    SKIP_BYTES,
    check_jsonl_head,
    csv_to_jsonl,
    file_under,
    read_line,
    read_rows,
)


@pytest.fixture
def root(tmp_path):
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    (images / "a.jpg").write_bytes(b"a")
    (images / "sub" / "b.jpg").write_bytes(b"b")
    (tmp_path / "secret.jpg").write_bytes(b"s")
    (tmp_path / "images-other").mkdir()
    (tmp_path / "images-other" / "c.jpg").write_bytes(b"c")
    return images


def under(root, name):
    return file_under(root, name, "image", "OFA_IMAGE_ROOT")


def test_files_inside_the_root_are_found_with_symlinks_resolved(root):
    os.symlink(root / "sub" / "b.jpg", root / "link.jpg")
    assert under(root, "a.jpg") == root / "a.jpg"
    assert under(root, "sub/../sub/b.jpg") == root / "sub" / "b.jpg"
    assert under(root, "link.jpg") == root / "sub" / "b.jpg"


@pytest.mark.parametrize(
    "name", ["../secret.jpg", "../images-other/c.jpg", "escape.jpg", "/etc/hostname"]
)
def test_nothing_outside_the_root_is_reached(root, name):
    os.symlink(root.parent / "secret.jpg", root / "escape.jpg")
    with pytest.raises(ValueError, match="outside the image root"):
        under(root, name)


@pytest.mark.parametrize(
    ("name", "reason"),
    [("missing.jpg", "no image at"), ("sub", "no image at"), ("a\x00.jpg", "NUL character")],
)
def test_what_is_not_a_file_under_the_root_says_why(root, name, reason):
    with pytest.raises(ValueError, match=reason):
        under(root, name)


def test_a_server_without_an_image_root_says_which_setting(root):
    with pytest.raises(ValueError, match="OFA_IMAGE_ROOT"):
        file_under(None, "a.jpg", "image", "OFA_IMAGE_ROOT")


# --- lines read in bounded pieces ------------------------------------------------------


def write(path, *parts: bytes):
    with path.open("wb") as fh:
        for part in parts:
            fh.write(part)
    return path


def endless_line(path, mib: int, head: bytes = b'{"id": "long", "text": "', tail: bytes = b""):
    """A file whose (next) line is ``mib`` MiB long, written a MiB at a time."""
    with path.open("ab") as fh:
        fh.write(head)
        for _ in range(mib):
            fh.write(b"x" * (1 << 20))
        fh.write(b'"}\n' + tail)
    return path


def peak_allocated(fn):
    """``fn()``'s result (or exception) and the most memory Python allocated meanwhile."""
    tracemalloc.start()
    try:
        try:
            out = fn()
        except Exception as exc:
            out = exc
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_read_line_returns_lines_up_to_the_limit_and_skips_longer_ones(tmp_path):
    path = write(tmp_path / "m", b"12345\n", b"123456\n", b"1234567890\n", b"\n", b"1234567")
    with path.open("rb") as fh:
        got = [read_line(fh, 6) for _ in range(6)]
    # Exactly the limit (with its newline) is kept; one byte more is skipped whole.
    assert got == [b"12345\n", b"123456\n", None, b"\n", None, b""]


def test_a_line_too_long_is_skipped_in_bounded_reads(tmp_path):
    path = endless_line(tmp_path / "m", 64, tail=b'{"id": "next"}\n')
    with path.open("rb") as fh:
        got, peak = peak_allocated(lambda: (read_line(fh, 1000), read_line(fh, 1000)))
    assert got == (None, b'{"id": "next"}\n')
    assert peak < 4 * SKIP_BYTES, peak  # a 64 MiB line, never held whole


def test_the_head_check_refuses_a_first_line_too_long_without_holding_it(tmp_path):
    path = endless_line(tmp_path / "m.jsonl", 64, tail=b'{"id": "2", "text": "t"}\n')
    got, peak = peak_allocated(lambda: check_jsonl_head(path, 4096))
    assert isinstance(got, ManifestLineTooLongError), got
    assert "longer than 4096 bytes" in got.detail
    assert peak < 4 * SKIP_BYTES, peak


def test_the_head_check_counts_a_later_line_too_long_as_a_row(tmp_path):
    path = write(tmp_path / "m.jsonl", b'\n  \n{"id": "1", "text": "t"}\n')
    endless_line(path, 2, tail=b'\n{"id": "3", "text": "t"}')
    assert check_jsonl_head(path, 4096) == 3


def test_read_rows_makes_a_line_too_long_that_rows_error_and_goes_on(tmp_path):
    path = write(tmp_path / "m.jsonl", b'{"id": "1", "text": "a"}\n')
    endless_line(path, 8, tail=b'\n{"id": 3, "text": "c"}\n')
    rows, end = read_rows(path, 0, 0, 10, max_line=4096)
    assert [r.item_id for r in rows] == ["1", "", "3"]
    assert rows[1].fields == {
        "__error__": "row is longer than 4096 bytes (OFA_MAX_MANIFEST_LINE_BYTES)"
    }
    assert end == path.stat().st_size
    # Resumed one row at a time from each offset, the same rows.
    offset, again = 0, []
    for idx in range(3):
        (row,), offset = read_rows(path, offset, idx, 1, max_line=4096)
        again.append(row)
    assert again == rows and offset == end


def test_read_rows_defaults_to_this_process_line_limit(tmp_path):
    from shared.settings import get_settings

    limit = get_settings().manifest_line_bytes
    path = write(tmp_path / "m.jsonl", b'{"id": "a", "text": "' + b"x" * limit + b'"}\n')
    (row,), _ = read_rows(path, 0, 0, 10)
    assert f"longer than {limit} bytes" in row.fields["__error__"]


# --- CSV records, bounded while converting -----------------------------------------


def convert(text: str, max_line: int = 10_000) -> list[dict]:
    out = io.StringIO()
    n = csv_to_jsonl(io.StringIO(text, newline=""), out, max_cell_chars=1000, max_line=max_line)
    rows = [json.loads(line) for line in out.getvalue().splitlines()]
    assert len(rows) == n
    return rows


def test_csv_converts_as_before_blank_lines_extra_and_missing_cells():
    text = 'id,image,text,other\n1,a.jpg,"a, quoted\nline",x\n\n2,b.jpg\n3,c.jpg,t,o,extra\n'
    assert convert(text) == [
        {"id": "1", "image": "a.jpg", "text": "a, quoted\nline"},
        {"id": "2", "image": "b.jpg"},
        {"id": "3", "image": "c.jpg", "text": "t"},
    ]


@pytest.mark.parametrize(
    ("text", "error", "words"),
    [
        ("id,image,text\n1,a.jpg," + "x" * 600 + "\n", ManifestLineTooLongError, "CSV record 2"),
        # A quoted cell that never closes: the record runs on across lines, bounded too.
        ('id,image,text\n1,a.jpg,"' + "x\n" * 300, ManifestLineTooLongError, "CSV record 2"),
        ("id,image,text" + ",c" * 70 + "\n", ManifestError, "CSV record 1 has 73 columns"),
        ("id,image,text\n1,a.jpg,t" + ",c" * 70 + "\n", ManifestError, "CSV record 2 has 73"),
        # Counted before the csv module splits them (a field object each).
        ('id,image,text\n1,a.jpg,"' + "," * 20_000 + '"\n', ManifestError, "commas"),
    ],
)
def test_csv_records_too_long_or_too_wide_refuse_the_manifest(text, error, words):
    max_line = 500 if error is ManifestLineTooLongError else 100_000
    with pytest.raises(error, match=words):
        convert(text, max_line=max_line)


def test_a_csv_of_one_endless_line_is_refused_without_holding_it(tmp_path):
    path = write(tmp_path / "m.csv", b"id,image,text\n1,a.jpg,")
    endless_line(path, 64, head=b"")
    with path.open("rb") as raw:
        text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        got, peak = peak_allocated(lambda: csv_to_jsonl(text, io.StringIO(), 1 << 20, 1 << 20))
    assert isinstance(got, ManifestLineTooLongError), got
    assert peak < 8 * (1 << 20), peak  # ~the record limit (as str), not 64 MiB


def test_a_csv_converting_past_the_manifest_limit_is_refused_while_converting():
    text = "id,image,text\n" + "1,a.jpg,a cat\n" * 1000
    out = io.StringIO()
    with pytest.raises(PayloadTooLargeError, match="larger than 5000 bytes"):
        csv_to_jsonl(io.StringIO(text, newline=""), out, 1000, 1000, max_chars=5000)
    assert len(out.getvalue()) <= 5000  # stopped there, not after converting it all
