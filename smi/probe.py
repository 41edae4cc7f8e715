"""An image's size from the first bytes of its URL, without downloading the whole file."""

from __future__ import annotations

import io
from dataclasses import dataclass

import httpx
from PIL import Image, UnidentifiedImageError

from smi.fetch import FetchPolicy, FetchRefused, guarded_stream
from smi.vocabulary import ErrorCode

FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp"}
STEPS = (64 * 1024, 1024 * 1024)  # most headers fit in the first; JPEGs with big EXIF need more


@dataclass(frozen=True)
class Probe:
    """`width`/`height` when read; `problem` (an error code) when the URL gives no usable image."""

    width: int | None = None
    height: int | None = None
    format: str | None = None
    problem: str | None = None
    detail: str | None = None


def read_header(data: bytes) -> Probe | None:
    """None when `data` is too short to tell."""
    try:  # only the plugins of the formats we take parse the header: other formats are unidentified
        with Image.open(io.BytesIO(data), formats=list(FORMATS)) as image:
            return Probe(image.width, image.height, FORMATS.get(image.format or ""))
    except Image.DecompressionBombError:
        return Probe(problem=ErrorCode.OUTPUT_TOO_LARGE, detail="the image's dimensions are absurdly large")
    except UnidentifiedImageError:
        return (
            None
            if len(data) < STEPS[-1]
            else Probe(problem=ErrorCode.UNSUPPORTED_FORMAT, detail="the file is not a PNG, JPEG or WebP image")
        )
    except (OSError, SyntaxError, ValueError):
        return None


async def probe_url(http: httpx.AsyncClient, url: str, policy: FetchPolicy) -> Probe:
    """Read just enough of `url` for the header. Transient trouble gives an empty Probe: not a verdict."""
    data = b""
    try:
        async with guarded_stream(http, url, policy) as response:
            if 400 <= response.status_code < 500:
                return Probe(problem="image_unreachable", detail=f"the image_url answered {response.status_code}")
            if response.status_code != 200:
                return Probe()
            async for chunk in response.aiter_bytes():
                data += chunk
                if len(data) >= STEPS[0]:
                    found = read_header(data)
                    if found is not None or len(data) >= STEPS[-1]:
                        return found or Probe()
    except FetchRefused as exc:
        return Probe(problem="url_refused", detail=f"this URL is not fetched: {exc}")
    except httpx.DecodingError:
        return Probe(
            problem="image_unreachable",
            detail="the image_url's response could not be decoded (its Content-Encoding does not match its body)",
        )
    except httpx.HTTPError:
        return Probe()
    if not data:
        return Probe(problem=ErrorCode.UNSUPPORTED_FORMAT, detail="the image_url gave an empty file")
    found = read_header(data)
    if found is None:  # the whole file was read and it is not an image
        return Probe(problem=ErrorCode.UNSUPPORTED_FORMAT, detail="the file is not a PNG, JPEG or WebP image")
    return found
