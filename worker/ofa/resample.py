"""Pillow's bicubic resize, bit for bit, in a third of its time.

The reference preprocessor resizes with Pillow (``Image.resize(..., BICUBIC)``), and the
reference-equivalence tests hold our pixels to its exactly. Pillow's resampler is
scalar C: about 6 ms of a worker's ~10 ms per 1024x768 photo. This is the same
arithmetic arranged so that a compiler vectorises it:

- the same coefficients (bicubic, a = -0.5, support widened by the downscale factor,
  normalised, then rounded to 22-bit fixed point), computed once per size pair;
- the same two passes in the same order (horizontal first unless the height shrinks
  more than twice as much as the width), each rounding and clipping to uint8, the
  horizontal pass over only the rows the vertical pass reads;
- each pass runs down columns of a row-major block: every tap adds a whole row times
  one coefficient, so the inner loop is a multiply-add over contiguous bytes. The
  horizontal pass transposes first (as 32-bit RGBX pixels, in cache-sized tiles).

A plain JPEG (``shared.images.plain_jpeg``) is decoded by libjpeg-turbo straight into a
reused buffer (``decode_resize_jpeg``). Other images' pixels come from Pillow's own
buffer through the Arrow C data interface, copied once into a reused buffer
(``np.asarray`` of a decoded photo costs ~1.6 ms, this copy ~0.3). Images Pillow
stores in more than one block (over ~16 MB) and images not in RGB fall back to Pillow
itself. The kernels are compiled by numba once per machine (cached on
disk) and release the interpreter lock.
``tests/worker/ofa/test_resample.py`` checks equality with Pillow over many sizes.
"""

from __future__ import annotations

import ctypes
import math
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache

import numba
import numpy as np
import simplejpeg
from PIL import Image

from shared.images import plain_jpeg

__all__ = ["decode_resize_jpeg", "resize_bicubic", "warm_up"]

PRECISION_BITS = 22  # Pillow's 8-bit resampling precision (32 - 8 - 2)
HALF = 1 << (PRECISION_BITS - 1)
TILE = 16


def _bicubic(x: float) -> float:
    """Pillow's bicubic kernel (a = -0.5), the same double operations in the same order."""
    a = -0.5
    if x < 0.0:
        x = -x
    if x < 1.0:
        return ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    if x < 2.0:
        return (((x - 5) * x + 8) * x - 4) * a
    return 0.0


@lru_cache(maxsize=256)
def coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """For each output pixel: its first input pixel and tap count, (out, 2) int64, and
    its fixed-point weights, (out, ksize) int32; as Pillow's ``precompute_coeffs`` and
    ``normalize_coeffs_8bpc`` for a box covering the whole input."""
    scale = float(in_size) / out_size
    filterscale = max(scale, 1.0)
    support = 2.0 * filterscale
    ksize = math.ceil(support) * 2 + 1
    inv_filterscale = 1.0 / filterscale
    one = float(1 << PRECISION_BITS)
    bounds = np.zeros((out_size, 2), np.int64)
    weights = np.zeros((out_size, ksize), np.int32)
    for xx in range(out_size):
        center = (xx + 0.5) * scale
        xmin = max(int(center - support + 0.5), 0)
        taps = min(int(center + support + 0.5), in_size) - xmin
        ws = [_bicubic((x + xmin - center + 0.5) * inv_filterscale) for x in range(taps)]
        total = 0.0
        for w in ws:  # summed left to right, as Pillow does
            total += w
        if total != 0.0:
            ws = [w / total for w in ws]
        for x, w in enumerate(ws):
            weights[xx, x] = int(-0.5 + w * one) if w < 0 else int(0.5 + w * one)
        bounds[xx] = (xmin, taps)
    bounds.flags.writeable = False
    weights.flags.writeable = False
    return bounds, weights


def _kernel(fn: Callable[..., None]) -> Callable[..., None]:
    """Compiled without the interpreter lock, cached on disk where numba can write
    (``NUMBA_CACHE_DIR``, else beside this file or in the user's cache); with nowhere
    to write, compiled at each start instead (about a second)."""
    try:
        return numba.njit(cache=True, nogil=True)(fn)
    except RuntimeError:  # "cannot cache function ...: no locator available"
        return numba.njit(nogil=True)(fn)


@_kernel
def _down_columns(src, row0, bounds, weights, out):
    """out[o] = clip8(sum over k of src[row0 + first(o) + k] * weight(o, k)), for
    (rows, lanes) uint8 ``src`` and ``out`` rows of ``lanes`` bytes (4 per pixel), or of
    3 bytes per pixel when ``out`` is narrower (the alpha byte dropped)."""
    lanes = src.shape[1]
    rgb = out.shape[1] != lanes
    acc = np.empty(lanes, np.int32)
    clipped = np.empty(lanes, np.uint8)
    for o in range(out.shape[0]):
        first = bounds[o, 0] + row0
        acc[:] = HALF
        for k in range(bounds[o, 1]):
            w = weights[o, k]
            row = src[first + k]
            for j in range(lanes):
                acc[j] += np.int32(row[j]) * w
        line = out[o]
        if rgb:  # clipped over every lane (vectorised), then the alpha bytes dropped:
            for j in range(lanes):  # half the time of clipping 3 lanes in 4 in place
                clipped[j] = min(max(acc[j] >> PRECISION_BITS, 0), 255)
            for p in range(lanes // 4):
                line[p * 3] = clipped[p * 4]
                line[p * 3 + 1] = clipped[p * 4 + 1]
                line[p * 3 + 2] = clipped[p * 4 + 2]
        else:
            for j in range(lanes):
                line[j] = min(max(acc[j] >> PRECISION_BITS, 0), 255)


@_kernel
def _transpose(src, out):
    """out = src.T for 2-D uint32 arrays (one RGBX pixel per element), tile by tile."""
    rows, cols = src.shape
    for i0 in range(0, rows, TILE):
        i1 = min(i0 + TILE, rows)
        for j0 in range(0, cols, TILE):
            j1 = min(j0 + TILE, cols)
            for j in range(j0, j1):
                for i in range(i0, i1):
                    out[j, i] = src[i, j]


class _Scratch:
    """One resize's work buffers, kept for the next: a fresh multi-megabyte array is
    fresh pages, and first touching them (about 2 us per 4 KB page in this VM, ~1.5 ms
    for a 1024x768 photo's transpose) costs as much as the resize itself."""

    COPY, COLUMNS, RESIZED, BACK, MID, TURNED = range(6)

    def __init__(self) -> None:
        self.buffers = [np.empty(0, np.uint8) for _ in range(6)]

    def take(self, role: int, shape: tuple[int, ...], dtype: type) -> np.ndarray:
        """A ``shape`` array of ``dtype`` over buffer ``role`` (grown when too small)."""
        n = math.prod(shape) * np.dtype(dtype).itemsize
        if self.buffers[role].size < n:
            self.buffers[role] = np.empty(n, np.uint8)
        return self.buffers[role][:n].view(dtype).reshape(shape)


class _ScratchPool:
    """Scratch sets lent to at most ``os.cpu_count()`` resizes at once (the kernels
    release the interpreter lock, so more at once would only share the same cores and
    hold more memory: ~6 MB a set for a 1024x768 photo)."""

    def __init__(self, slots: int) -> None:
        self._slots = threading.BoundedSemaphore(slots)
        self._free: list[_Scratch] = []
        self._lock = threading.Lock()

    @contextmanager
    def lend(self) -> Iterator[_Scratch]:
        with self._slots:
            with self._lock:
                scratch = self._free.pop() if self._free else _Scratch()
            try:
                yield scratch
            finally:
                with self._lock:
                    self._free.append(scratch)


_POOL = _ScratchPool(os.cpu_count() or 1)


def _horizontal(
    s: _Scratch, px: np.ndarray, row0: int, rows: int, size: int, channels: int
) -> np.ndarray:
    """Rows ``row0:row0 + rows`` of (H, W, 4) ``px`` resized to ``size`` wide:
    (rows, size, channels) uint8 (4 channels: a view of scratch; 3: a new array)."""
    width = px.shape[1]
    bounds, weights = coefficients(width, size)
    pixels = px.view(np.uint32).reshape(px.shape[0], width)[row0 : row0 + rows]
    columns = s.take(s.COLUMNS, (width, rows), np.uint32)
    _transpose(pixels, columns)
    resized = s.take(s.RESIZED, (size, rows), np.uint32)
    _down_columns(columns.view(np.uint8), 0, bounds, weights, resized.view(np.uint8))
    back = s.take(s.BACK, (rows, size), np.uint32)
    _transpose(resized, back)
    rgbx = back.view(np.uint8).reshape(rows, size, 4)
    return rgbx if channels == 4 else np.ascontiguousarray(rgbx[:, :, :3])


def _vertical(out: np.ndarray, px: np.ndarray, first: int, in_h: int, size: int) -> np.ndarray:
    """(rows, W, 4) ``px``, rows ``first:`` of an input ``in_h`` tall, resized to
    ``size`` tall into ``out``, (size, W, 3 or 4) uint8."""
    bounds, weights = coefficients(in_h, size)
    _down_columns(px.reshape(px.shape[0], -1), -first, bounds, weights, out.reshape(size, -1))
    return out


def _resize(s: _Scratch, px: np.ndarray, width: int, height: int) -> np.ndarray:
    """(H, W, 4) uint8 RGBX pixels -> (height, width, 3) uint8, exactly as Pillow's
    ``Image.resize((width, height), BICUBIC)`` of the RGB image."""
    in_h, in_w = px.shape[:2]
    need_h, need_v = width != in_w, height != in_h
    if not need_h and not need_v:
        return np.ascontiguousarray(px[:, :, :3])
    if not need_v:
        return _horizontal(s, px, 0, in_h, width, 3)
    out = np.empty((height, width, 3), np.uint8)
    if not need_h:
        return _vertical(out, px, 0, in_h, height)
    if not (in_h - height > 0 and in_h - height > (in_w - width) * 2):  # horizontal first
        bounds, _ = coefficients(in_h, height)
        first, last = int(bounds[0, 0]), int(bounds[-1, 0] + bounds[-1, 1])
        mid = _horizontal(s, px, first, last - first, width, 4)
        return _vertical(out, mid, first, in_h, height)
    mid = _vertical(s.take(s.MID, (height, in_w, 4), np.uint8), px, 0, in_h, height)
    return _horizontal(s, mid, 0, height, width, 3)


class _ArrowArray(ctypes.Structure):
    pass


_ArrowArray._fields_ = [
    ("length", ctypes.c_int64),
    ("null_count", ctypes.c_int64),
    ("offset", ctypes.c_int64),
    ("n_buffers", ctypes.c_int64),
    ("n_children", ctypes.c_int64),
    ("buffers", ctypes.POINTER(ctypes.c_void_p)),
    ("children", ctypes.POINTER(ctypes.POINTER(_ArrowArray))),
    ("dictionary", ctypes.c_void_p),
    ("release", ctypes.c_void_p),
    ("private_data", ctypes.c_void_p),
]
_capsule_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


def _rgbx_view(img: Image.Image) -> tuple[np.ndarray, object] | None:
    """A (H, W, 4) view of an RGB image's own pixel buffer (Pillow stores RGB as RGBX),
    and the capsule that keeps the buffer exported while the view is used; None when
    Pillow cannot export it in one piece (large images)."""
    try:
        _, capsule = img.__arrow_c_array__()
    except (AttributeError, ValueError):
        return None
    array = _ArrowArray.from_address(_capsule_pointer(capsule, b"arrow_array"))
    width, height = img.size
    if array.n_children != 1 or array.length != width * height:
        return None
    child = array.children[0].contents  # fixed-size list of 4 uint8 per pixel
    data = child.buffers[1] + child.offset
    buffer = (ctypes.c_uint8 * (width * height * 4)).from_address(data)
    return np.frombuffer(memoryview(buffer), np.uint8).reshape(height, width, 4), capsule


def resize_bicubic(img: Image.Image, size: int) -> np.ndarray:
    """RGB image -> (size, size, 3) uint8: ``np.asarray(img.resize((size, size),
    BICUBIC))``, the same bytes."""
    view = _rgbx_view(img) if img.mode == "RGB" and img.width and img.height else None
    if view is None:
        return np.asarray(img.resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)
    with _POOL.lend() as s:
        # One sequential copy into scratch first: the transposing pass reads a freshly
        # decoded Pillow buffer in place several times slower than a copy of it.
        px = s.take(s.COPY, view[0].shape, np.uint8)
        np.copyto(px, view[0])
        del view  # releases the export
        return _resize(s, px, size, size)


# EXIF orientation -> the view of (H, W, C) pixels that ``ImageOps.exif_transpose``
# makes of them (Pillow's ROTATE_270 turns clockwise, ROTATE_90 counter-clockwise).
_ORIENTED: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1],  # FLIP_LEFT_RIGHT
    3: lambda a: a[::-1, ::-1],  # ROTATE_180
    4: lambda a: a[::-1],  # FLIP_TOP_BOTTOM
    5: lambda a: a.transpose(1, 0, 2),  # TRANSPOSE
    6: lambda a: np.rot90(a, -1),  # ROTATE_270
    7: lambda a: a.transpose(1, 0, 2)[::-1, ::-1],  # TRANSVERSE
    8: lambda a: np.rot90(a, 1),  # ROTATE_90
}
ONE_BLOCK = 16 << 20  # Pillow's block size: larger images fall back in both paths


def decode_resize_jpeg(data: bytes, max_pixels: int, size: int) -> np.ndarray | None:
    """A plain JPEG (``shared.images.plain_jpeg``) decoded by libjpeg-turbo straight into
    a reused RGBX buffer, turned as its EXIF orientation says, then resized: (size,
    size, 3) uint8, the bytes of
    ``resize_bicubic(open_image(data, max_pixels), size)``. None for any other image,
    and for one libjpeg-turbo warns about: Pillow's path judges those."""
    jpeg = plain_jpeg(data, max_pixels)
    if jpeg is None or jpeg.height * jpeg.width * 4 > ONE_BLOCK:
        return None
    with _POOL.lend() as s:
        px = s.take(s.COPY, (jpeg.height, jpeg.width, 4), np.uint8)
        try:
            simplejpeg.decode_jpeg(data, "RGBX", buffer=px)  # strict: warnings raise
        except ValueError:
            return None
        if jpeg.orientation != 1:  # EXIF orientation: Pillow's transpose, a permutation
            turned = _ORIENTED[jpeg.orientation](px)
            px = s.take(s.TURNED, turned.shape, np.uint8)
            np.copyto(px, turned)
        return _resize(s, px, size, size)


def warm_up() -> None:
    """Compile (or load from numba's cache) the kernels before the first real image."""
    resize_bicubic(Image.new("RGB", (9, 7), (10, 20, 30)), 4)
    resize_bicubic(Image.new("RGB", (7, 30), (10, 20, 30)), 5)
