"""Files named by manifest rows: found inside the image root, never outside it."""

from __future__ import annotations

import os

import pytest

from shared.scans.manifest import file_under


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
