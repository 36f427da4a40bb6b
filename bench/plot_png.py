"""A PNG writer and two tiny charts, in pure Python (zlib only): no matplotlib on the hosts.

Primer (PNG, ISO/IEC 15948). A file is the 8-byte signature and chunks;
a chunk is ``u32 length | 4-byte type | data | u32 CRC-32(type + data)``,
big-endian. We write IHDR (width, height, bit depth 8, colour type 2 =
truecolour RGB, compression 0, filter 0, interlace 0), one IDAT with the
zlib-compressed scanlines — each a filter-type byte (0: None) followed by
3 bytes per pixel — and IEND.

`Canvas` draws filled rectangles, lines and text in a 3x5 pixel font scaled
up; `load_plot` lays out the load harness's figure: the Acquire latency
histogram above, launches/s over time below.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

__all__ = ["PNG_SIGNATURE", "Canvas", "encode_png", "histogram", "load_plot", "nice_ticks"]

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# PNG §11.2.2 IHDR: bit depth 8, colour type 2 (RGB).
_BIT_DEPTH = 8
_COLOUR_RGB = 2

Color = tuple[int, int, int]
WHITE: Color = (255, 255, 255)
BLACK: Color = (0, 0, 0)
GREY: Color = (200, 200, 200)
BLUE: Color = (52, 101, 164)
ORANGE: Color = (230, 120, 20)
RED: Color = (200, 30, 30)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def encode_png(width: int, height: int, rgb: bytes | bytearray) -> bytes:
    """A PNG file of `width` x `height` RGB pixels (`rgb`: rows top to bottom, 3 bytes a pixel)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    stride = width * 3
    if len(rgb) != stride * height:
        raise ValueError(f"{len(rgb)} bytes of pixels for {width}x{height} RGB (want {stride * height})")
    raw = bytearray()
    for y in range(height):
        raw.append(0)  # filter type None
        raw += rgb[y * stride:(y + 1) * stride]
    ihdr = struct.pack(">IIBBBBB", width, height, _BIT_DEPTH, _COLOUR_RGB, 0, 0, 0)
    return PNG_SIGNATURE + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(bytes(raw), 9)) \
        + _chunk(b"IEND", b"")


# A 3x5 font: five rows of three pixels per glyph, '#' set.
_FONT_ROWS = {
    "0": "### #.# #.# #.# ###", "1": ".#. ##. .#. .#. ###", "2": "### ..# ### #.. ###",
    "3": "### ..# ### ..# ###", "4": "#.# #.# ### ..# ..#", "5": "### #.. ### ..# ###",
    "6": "### #.. ### #.# ###", "7": "### ..# .#. .#. .#.", "8": "### #.# ### #.# ###",
    "9": "### #.# ### ..# ###", "A": ".#. #.# ### #.# #.#", "B": "##. #.# ##. #.# ##.",
    "C": "### #.. #.. #.. ###", "D": "##. #.# #.# #.# ##.", "E": "### #.. ##. #.. ###",
    "F": "### #.. ##. #.. #..", "G": "### #.. #.# #.# ###", "H": "#.# #.# ### #.# #.#",
    "I": "### .#. .#. .#. ###", "J": "..# ..# ..# #.# ###", "K": "#.# #.# ##. #.# #.#",
    "L": "#.. #.. #.. #.. ###", "M": "#.# ### ### #.# #.#", "N": "##. #.# #.# #.# #.#",
    "O": "### #.# #.# #.# ###", "P": "### #.# ### #.. #..", "Q": "### #.# #.# ### ..#",
    "R": "##. #.# ##. #.# #.#", "S": "### #.. ### ..# ###", "T": "### .#. .#. .#. .#.",
    "U": "#.# #.# #.# #.# ###", "V": "#.# #.# #.# #.# .#.", "W": "#.# #.# ### ### #.#",
    "X": "#.# #.# .#. #.# #.#", "Y": "#.# #.# .#. .#. .#.", "Z": "### ..# .#. #.. ###",
    ".": "... ... ... ... .#.", "/": "..# ..# .#. #.. #..", "%": "#.# ..# .#. #.. #.#",
    ":": "... .#. ... .#. ...", "-": "... ... ### ... ...", "=": "... ### ... ### ...",
    "(": ".#. #.. #.. #.. .#.", ")": ".#. ..# ..# ..# .#.", " ": "... ... ... ... ...",
    "_": "... ... ... ... ###", ",": "... ... ... .#. #..",
}
_FONT = {ch: [row == "#" for line in rows.split() for row in line] for ch, rows in _FONT_ROWS.items()}
_GLYPH_W, _GLYPH_H = 3, 5


class Canvas:
    """An RGB raster with (0, 0) at the top left; drawing is clipped to it."""

    def __init__(self, width: int, height: int, background: Color = WHITE) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(background) * (width * height))

    def __repr__(self) -> str:
        return f"<Canvas {self.width}x{self.height}>"

    def pixel(self, x: int, y: int) -> Color:
        i = (y * self.width + x) * 3
        return self.pixels[i], self.pixels[i + 1], self.pixels[i + 2]

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: Color) -> None:
        """Fill [x0, x1) x [y0, y1)."""
        x0, x1 = max(0, min(x0, x1)), min(self.width, max(x0, x1))
        y0, y1 = max(0, min(y0, y1)), min(self.height, max(y0, y1))
        if x0 >= x1:
            return
        row = bytes(color) * (x1 - x0)
        for y in range(y0, y1):
            i = (y * self.width + x0) * 3
            self.pixels[i:i + len(row)] = row

    def line(self, x0: int, y0: int, x1: int, y1: int, color: Color, width: int = 1) -> None:
        """Bresenham's line, `width` pixels thick."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            self.rect(x0, y0, x0 + width, y0 + width, color)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def text(self, x: int, y: int, s: str, color: Color = BLACK, scale: int = 2) -> int:
        """Draw `s` (unknown characters as blanks) with its top left at (x, y); returns its width."""
        for n, ch in enumerate(s.upper()):
            glyph = _FONT.get(ch, _FONT[" "])
            gx = x + n * (_GLYPH_W + 1) * scale
            for i, on in enumerate(glyph):
                if on:
                    px, py = gx + (i % _GLYPH_W) * scale, y + (i // _GLYPH_W) * scale
                    self.rect(px, py, px + scale, py + scale, color)
        return text_width(s, scale)

    def png(self) -> bytes:
        return encode_png(self.width, self.height, self.pixels)


def text_width(s: str, scale: int = 2) -> int:
    return max(0, len(s) * (_GLYPH_W + 1) * scale - scale)


def nice_ticks(lo: float, hi: float, max_ticks: int = 6) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo] if math.isfinite(lo) else []
    mag = 10 ** math.floor(math.log10((hi - lo) / max(1, max_ticks)))
    # The smallest step 1, 2 or 5 times a power of ten that gives at most max_ticks ticks.
    step = next(m * mag for m in (1, 2, 5, 10, 20, 50, 100)
                if math.floor(hi / (m * mag) + 1e-9) - math.ceil(lo / (m * mag) - 1e-9) + 1 <= max_ticks)
    first = math.ceil(lo / step - 1e-9) * step
    ticks, v = [], first
    while v <= hi + step * 1e-9:
        ticks.append(round(v, 12))
        v += step
    return ticks


def _label(v: float) -> str:
    return f"{v:.0f}" if abs(v - round(v)) < 1e-9 else f"{v:g}"


def histogram(values: Sequence[float], bins: int, lo: float, hi: float) -> list[int]:
    """Counts of `values` in `bins` equal bins over [lo, hi]; values past the ends go in the end bins."""
    counts = [0] * bins
    if not values or bins <= 0:
        return counts
    span = hi - lo
    for v in values:
        i = 0 if span <= 0 else int((v - lo) / span * bins)
        counts[min(bins - 1, max(0, i))] += 1
    return counts


class _Panel:
    """A plot area inside a canvas, with data-to-pixel mapping and labelled axes."""

    def __init__(self, c: Canvas, x0: int, y0: int, x1: int, y1: int,
                 xr: tuple[float, float], yr: tuple[float, float]) -> None:
        self.c, self.x0, self.y0, self.x1, self.y1 = c, x0, y0, x1, y1
        self.xr = xr if xr[1] > xr[0] else (xr[0], xr[0] + 1.0)
        self.yr = yr if yr[1] > yr[0] else (yr[0], yr[0] + 1.0)

    def px(self, x: float) -> int:
        return self.x0 + round((x - self.xr[0]) / (self.xr[1] - self.xr[0]) * (self.x1 - self.x0))

    def py(self, y: float) -> int:
        return self.y1 - round((y - self.yr[0]) / (self.yr[1] - self.yr[0]) * (self.y1 - self.y0))

    def axes(self, title: str, xlabel: str) -> None:
        c = self.c
        for t in nice_ticks(*self.yr):
            y = self.py(t)
            c.rect(self.x0, y, self.x1, y + 1, GREY)
            s = _label(t)
            c.text(self.x0 - 6 - text_width(s), y - 5, s)
        for t in nice_ticks(*self.xr, max_ticks=8):
            x = self.px(t)
            c.rect(x, self.y1, x + 1, self.y1 + 5, BLACK)
            s = _label(t)
            c.text(x - text_width(s) // 2, self.y1 + 8, s)
        c.rect(self.x0, self.y0, self.x0 + 1, self.y1 + 1, BLACK)
        c.rect(self.x0, self.y1, self.x1 + 1, self.y1 + 1, BLACK)
        c.text(self.x0, self.y0 - 22, title, scale=3)
        c.text(self.x1 - text_width(xlabel), self.y1 + 24, xlabel)


def load_plot(latencies_ms: Sequence[float], rate_series: Sequence[tuple[float, float]],
              title: str = "", width: int = 900, height: int = 720,
              markers: Sequence[tuple[str, float]] = ()) -> bytes:
    """The load harness's figure as PNG bytes.

    Top: histogram of `latencies_ms` (Acquire latency), clipped at 1.2 x the
    largest of `markers` (e.g. p99) so one outlier does not flatten it, with
    the markers drawn as vertical lines. Bottom: `rate_series`, (seconds since
    the start, launches/s) points, as a line.
    """
    c = Canvas(width, height)
    if title:
        c.text(20, 10, title, scale=2)
    left, right = 90, width - 30
    # --- histogram
    vals = [v for v in latencies_ms if math.isfinite(v)]
    hi = max([m for _, m in markers if math.isfinite(m)] + [0.0]) * 1.2 or (max(vals) if vals else 1.0)
    hi = max(hi, 1e-3)
    bins = 60
    counts = histogram(vals, bins, 0.0, hi)
    top = _Panel(c, left, 70, right, height // 2 - 40, (0.0, hi), (0.0, max(counts + [1]) * 1.05))
    top.axes(f"ACQUIRE LATENCY (N={len(vals)})", "MS")
    for i, n in enumerate(counts):
        if n:
            c.rect(top.px(hi * i / bins) + 1, top.py(n), top.px(hi * (i + 1) / bins), top.y1, BLUE)
    for k, (name, m) in enumerate(markers):
        if math.isfinite(m) and 0 <= m <= hi:
            x = top.px(m)
            c.rect(x, top.y0, x + 2, top.y1, RED)
            c.text(x + 5, top.y0 + 4 + 14 * k, f"{name} {m:.2f}", RED)
    # --- rate over time
    xs = [t for t, _ in rate_series] or [0.0]
    ys = [r for _, r in rate_series] or [0.0]
    bottom = _Panel(c, left, height // 2 + 60, right, height - 60,
                    (min(0.0, min(xs)), max(xs) if max(xs) > 0 else 1.0), (0.0, max(ys) * 1.1 or 1.0))
    bottom.axes("LAUNCHES/S", "SECONDS")
    pts = [(bottom.px(t), bottom.py(r)) for t, r in rate_series]
    for (xa, ya), (xb, yb) in zip(pts, pts[1:]):
        c.line(xa, ya, xb, yb, ORANGE, width=2)
    if len(pts) == 1:
        c.rect(pts[0][0] - 2, pts[0][1] - 2, pts[0][0] + 3, pts[0][1] + 3, ORANGE)
    return c.png()


def write_load_plot(path: str | Path, *args: object, **kwargs: object) -> Path:
    """`load_plot` written to `path`."""
    p = Path(path)
    p.write_bytes(load_plot(*args, **kwargs))  # type: ignore[arg-type]
    return p
