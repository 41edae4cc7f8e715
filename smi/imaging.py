"""Reading, checking and converting images with libvips.

libvips decodes in streaming fashion (`access="sequential"`), so checking that a
50-megapixel result decodes whole costs a few megabytes, not the 150+ MB a full
in-memory decode would.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyvips

from smi.pricing import MAX_OUTPUT_PIXELS

# libvips loader -> our format name; anything else is refused.
LOADERS = {"pngload": "png", "jpegload": "jpg", "webpload": "webp"}
EXTENSIONS = {"png": "png", "jpg": "jpg", "webp": "webp"}
SAVERS = {"png": ("pngsave", {"compression": 6}), "jpg": ("jpegsave", {"Q": 92}), "webp": ("webpsave", {"Q": 92})}
MAX_INPUT_PIXELS = MAX_OUTPUT_PIXELS // 4  # the smallest scale is 2: anything larger can never be made


class ImageError(Exception):
    """An image we will not take; `code` is the error kind the workflow acts on."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ImageInfo:
    width: int
    height: int
    format: str


def probe(path: str | Path) -> ImageInfo:
    """Read the header only: the real format by content, and the size."""
    try:
        image = pyvips.Image.new_from_file(str(path), access="sequential")
    except pyvips.Error:
        raise ImageError("unsupported_format", "the file is not an image we can read (PNG, JPEG or WebP)") from None
    fmt = LOADERS.get(image.get("vips-loader"))
    if fmt is None:
        raise ImageError("unsupported_format", "only PNG, JPEG and WebP images are accepted")
    return ImageInfo(image.width, image.height, fmt)


def decode_fully(path: str | Path, code: str = "invalid_result") -> None:
    """Decode every pixel, streaming; truncation and corruption raise ImageError(code)."""
    try:
        image = pyvips.Image.new_from_file(str(path), access="sequential", fail_on="warning")
        image.avg()
    except pyvips.Error:
        raise ImageError(code, "the image is truncated or corrupt") from None


def validate(path: str | Path, width: int, height: int, fmt: str | None = None) -> ImageInfo:
    info = probe(path)
    if info.width * info.height > MAX_OUTPUT_PIXELS:
        raise ImageError("invalid_result", f"the image has {info.width}x{info.height} pixels, over the limit")
    if (info.width, info.height) != (width, height):
        raise ImageError("invalid_result", f"expected {width}x{height}, got {info.width}x{info.height}")
    if fmt is not None and info.format != fmt:
        raise ImageError("invalid_result", f"expected {fmt}, got {info.format}")
    decode_fully(path)
    return info


def convert(src: str | Path, dst: str | Path, fmt: str, quality: int | None = None) -> None:
    """Re-encode, same pixel size; `quality` overrides the lossy formats' default."""
    image = pyvips.Image.new_from_file(str(src), access="sequential")
    if fmt == "jpg" and image.hasalpha():
        image = image.flatten(background=[255, 255, 255])
    saver, options = SAVERS[fmt]  # by name: `dst` is a temporary name without the extension
    if quality is not None and "Q" in options:
        options = {**options, "Q": quality}
    getattr(image, saver)(str(dst), **options)
