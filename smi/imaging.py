"""Reading, checking and converting images with libvips.

libvips decodes in streaming fashion (`access="sequential"`), so checking that a
50-megapixel result decodes whole costs a few megabytes, not the 150+ MB a full
in-memory decode would.

Every image here is untrusted (the storefront's original, Upsampler's result), and the
libvips build has loaders for much more than we take (SVG, TIFF, HEIF, GIF, CSV, ...). So
the format is told by the file's first bytes, and only that format's loader is called;
anything else is refused before libvips reads a byte. On import, every loader but PNG, JPEG
and WebP is blocked for the whole process, and libvips' untrusted operations too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pyvips

from smi.pricing import MAX_OUTPUT_PIXELS
from smi.vocabulary import ErrorCode

# Our format name -> the only libvips loader that format's files are handed to.
LOADERS = {"png": "pngload", "jpg": "jpegload", "webp": "webpload"}
MAGIC_BYTES = 12  # enough of a file's start to tell the three apart
EXTENSIONS = {"png": "png", "jpg": "jpg", "webp": "webp"}
SAVERS = {"png": ("pngsave", {"compression": 6}), "jpg": ("jpegsave", {"Q": 92}), "webp": ("webpsave", {"Q": 92})}
MAX_INPUT_PIXELS = MAX_OUTPUT_PIXELS // 4  # the smallest scale is 2: anything larger can never be made


pyvips.block_untrusted_set(True)
pyvips.operation_block_set("VipsForeignLoad", True)  # every loader, then back the three we use
for _loader in ("VipsForeignLoadPng", "VipsForeignLoadJpeg", "VipsForeignLoadWebp"):
    pyvips.operation_block_set(_loader, False)


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


def sniff(head: bytes) -> str | None:
    """The format ("png", "jpg" or "webp") by a file's first MAGIC_BYTES bytes; None for anything else."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


def _open(path: str | Path, code: str, **options) -> tuple[pyvips.Image, str]:
    """The image (streaming) through its format's own loader, and the format; ImageError(code) before
    libvips sees the file when it is not a PNG, JPEG or WebP."""
    with open(path, "rb") as handle:
        fmt = sniff(handle.read(MAGIC_BYTES))
    if fmt is None:
        raise ImageError(code, "only PNG, JPEG and WebP images are accepted")
    try:
        return getattr(pyvips.Image, LOADERS[fmt])(str(path), access="sequential", **options), fmt
    except pyvips.Error:
        raise ImageError(code, f"the file is not a {fmt.upper()} image we can read") from None


def probe(path: str | Path) -> ImageInfo:
    """Read the header only: the real format by content, and the size."""
    image, fmt = _open(path, ErrorCode.UNSUPPORTED_FORMAT)
    return ImageInfo(image.width, image.height, fmt)


def decode_fully(path: str | Path, code: str = ErrorCode.INVALID_RESULT) -> None:
    """Decode every pixel, streaming; truncation and corruption raise ImageError(code)."""
    image, _ = _open(path, code, fail_on="warning")
    try:
        image.avg()
    except pyvips.Error:
        raise ImageError(code, "the image is truncated or corrupt") from None


def validate(path: str | Path, width: int, height: int, fmt: str | None = None) -> ImageInfo:
    info = probe(path)
    if info.width * info.height > MAX_OUTPUT_PIXELS:
        raise ImageError(ErrorCode.INVALID_RESULT, f"the image has {info.width}x{info.height} pixels, over the limit")
    if (info.width, info.height) != (width, height):
        raise ImageError(ErrorCode.INVALID_RESULT, f"expected {width}x{height}, got {info.width}x{info.height}")
    if fmt is not None and info.format != fmt:
        raise ImageError(ErrorCode.INVALID_RESULT, f"expected {fmt}, got {info.format}")
    decode_fully(path)
    return info


def convert(src: str | Path, dst: str | Path, fmt: str, quality: int | None = None) -> None:
    """Re-encode, same pixel size; `quality` overrides the lossy formats' default."""
    image, _ = _open(src, ErrorCode.UNSUPPORTED_FORMAT)
    if fmt == "jpg" and image.hasalpha():
        image = image.flatten(background=[255, 255, 255])
    saver, options = SAVERS[fmt]  # by name: `dst` is a temporary name without the extension
    if quality is not None and "Q" in options:
        options = {**options, "Q": quality}
    getattr(image, saver)(str(dst), **options)
