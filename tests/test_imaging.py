"""Untrusted images meet libvips only through the PNG, JPEG and WebP loaders: the format is told by the
file's first bytes, anything else is refused before libvips reads a byte, and every other loader is
blocked in the process (SVG, TIFF, HEIF, GIF and the rest are in the libvips build)."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import pyvips
from PIL import Image

from smi import imaging
from smi.probe import read_header
from tests.conftest import png_bytes

SVG = (
    b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="64" height="64">'
    b'<rect width="64" height="64" fill="red"/></svg>'
)


def pillow_bytes(fmt: str, size=(64, 48), mode="RGB") -> bytes:
    out = io.BytesIO()
    Image.new(mode, size, (200, 30, 90)).save(out, fmt)
    return out.getvalue()


HOSTILE = {  # name: the bytes; none is a PNG, JPEG or WebP
    "image.svg": SVG,
    "svg-named.png": SVG,
    "image.tif": pillow_bytes("TIFF"),
    "tiff-named.png": pillow_bytes("TIFF"),
    "tiff-named.jpg": pillow_bytes("TIFF"),
    "gif-named.webp": pillow_bytes("GIF"),
    "bmp-named.png": pillow_bytes("BMP"),
    "heif-like.png": b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64,
    "riff-not-webp.webp": b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 64,
    "vips-named.png": b"\x08\xf2\xa6\xb6" + b"\x00" * 64,  # libvips' own format's magic
    "csv-named.png": b"1,2,3\n4,5,6\n",
    "empty.png": b"",
}


@pytest.mark.parametrize(
    "data, fmt",
    [
        pytest.param(png_bytes(8, 8), "png", id="png"),
        pytest.param(pillow_bytes("JPEG"), "jpg", id="jpeg"),
        pytest.param(pillow_bytes("WEBP"), "webp", id="webp"),
        *[pytest.param(data, None, id=name) for name, data in HOSTILE.items()],
        pytest.param(b"\x89PNG", None, id="too-short-to-tell"),
    ],
)
def test_the_format_is_told_by_the_first_bytes(data, fmt):
    assert imaging.sniff(data[: imaging.MAGIC_BYTES]) == fmt


@pytest.fixture
def libvips_untouchable(monkeypatch):
    """Any libvips operation (a loader included) or its format sniffing fails the test."""

    def touched(*args, **kwargs):
        raise AssertionError(f"libvips was handed the file: {args[:1]}")

    monkeypatch.setattr(pyvips.Operation, "call", touched)
    for name in ("new_from_file", "new_from_buffer", "new_from_source"):
        monkeypatch.setattr(pyvips.Image, name, touched)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_other_formats_are_refused_before_libvips_reads_them(tmp_path, libvips_untouchable, name):
    path = tmp_path / name
    path.write_bytes(HOSTILE[name])
    with pytest.raises(imaging.ImageError) as caught:
        imaging.probe(path)
    assert caught.value.code == "unsupported_format"
    with pytest.raises(imaging.ImageError) as caught:
        imaging.decode_fully(path, "invalid_result")
    assert caught.value.code == "invalid_result"
    with pytest.raises(imaging.ImageError) as caught:
        imaging.validate(path, 64, 48)
    assert caught.value.code == "unsupported_format"


def test_a_tiff_libvips_would_decode_is_refused(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(pillow_bytes("TIFF", (64, 48)))
    # libvips as built, without smi.imaging's blocks, reads it (and would pick its TIFF loader by content) ...
    read = (
        "import sys, pyvips; i = pyvips.Image.new_from_file(sys.argv[1]); "
        "print(i.width, i.height, i.get('vips-loader'))"
    )
    plain = subprocess.run([sys.executable, "-c", read, str(path)], capture_output=True, text=True, check=True)
    assert plain.stdout.split() == ["64", "48", "tiffload"]
    # ... the service does not.
    with pytest.raises(imaging.ImageError) as caught:
        imaging.probe(path)
    assert caught.value.code == "unsupported_format"


@pytest.mark.parametrize(
    "load",
    [
        lambda path: pyvips.Image.new_from_file(str(path)),
        lambda path: pyvips.Image.tiffload(str(path)),
        lambda path: pyvips.Image.new_from_buffer(path.read_bytes(), ""),
        lambda path: pyvips.Image.svgload_buffer(SVG),
        lambda path: pyvips.Image.gifload_buffer(pillow_bytes("GIF")),
        lambda path: pyvips.Image.matrixload(str(path)),
    ],
    ids=["new_from_file", "tiffload", "new_from_buffer", "svgload_buffer", "gifload_buffer", "matrixload"],
)
def test_other_loaders_are_blocked_in_the_process(tmp_path, load):
    path = tmp_path / "photo.tif"
    path.write_bytes(pillow_bytes("TIFF"))
    with pytest.raises(pyvips.Error, match="blocked|not in a known format"):  # find_load skips blocked ones
        load(path)


@pytest.mark.parametrize("fmt, ext", [("PNG", "png"), ("JPEG", "jpg"), ("WEBP", "webp")])
def test_png_jpeg_and_webp_still_read_check_and_convert(tmp_path, fmt, ext):
    path = tmp_path / "image.bin"  # the name says nothing: the content does
    path.write_bytes(pillow_bytes(fmt, (64, 48), "RGBA" if fmt != "JPEG" else "RGB"))
    assert imaging.probe(path) == imaging.ImageInfo(64, 48, ext)
    assert imaging.validate(path, 64, 48, ext) == imaging.ImageInfo(64, 48, ext)
    for target in ("png", "jpg", "webp"):
        out = tmp_path / f"out-{target}"
        imaging.convert(path, out, target)
        assert imaging.probe(out) == imaging.ImageInfo(64, 48, target)


def test_a_truncated_png_is_still_caught_by_the_full_decode(tmp_path):
    path = tmp_path / "cut.png"
    path.write_bytes(png_bytes(80, 60)[:-300])
    assert imaging.probe(path).format == "png"
    with pytest.raises(imaging.ImageError) as caught:
        imaging.decode_fully(path, "unsupported_format")
    assert caught.value.code == "unsupported_format"


def test_the_api_probe_opens_headers_with_the_png_jpeg_and_webp_plugins_only(monkeypatch):
    from PIL import TiffImagePlugin

    def opened(self):
        raise AssertionError("Pillow's TIFF plugin parsed the header")

    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "_open", opened)
    tiff = pillow_bytes("TIFF", (300, 300))
    found = read_header(tiff)
    assert found is None or found.problem == "unsupported_format"
    assert read_header(tiff + b"\x00" * (1024 * 1024)).problem == "unsupported_format"
    assert read_header(pillow_bytes("WEBP")).format == "webp"
