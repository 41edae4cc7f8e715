"""GET /embed.js: the "Buy hi-res" button a site adds with one script tag (api/static/embed.js).

Static and public: no key (the publishable key is in the page, and the script's own calls carry it), no
database, no rate limit (the bytes are in memory and a revalidation is a 304 of no body; a rate-limit check
would cost more than the answer). Cacheable by browsers and CDNs for an hour, then revalidated by its ETag,
so a fix reaches every site within the hour without a versioned URL.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from fastapi import APIRouter, Header, Response

SCRIPT = (Path(__file__).resolve().parent / "static" / "embed.js").read_bytes()
ETAG = '"' + hashlib.sha256(SCRIPT).hexdigest()[:32] + '"'
MEDIA_TYPE = "text/javascript; charset=utf-8"  # RFC 9239
HEADERS = {
    "ETag": ETAG,
    "Cache-Control": "public, max-age=3600",
    "X-Content-Type-Options": "nosniff",
    # Any site may load it, also with crossorigin="anonymous" (Subresource Integrity) or under COEP.
    "Access-Control-Allow-Origin": "*",
    "Cross-Origin-Resource-Policy": "cross-origin",
}

router = APIRouter(tags=["embed"])


def _matches(if_none_match: str | None) -> bool:
    if not if_none_match:
        return False
    tags = [t.strip().removeprefix("W/") for t in if_none_match.split(",")]
    return "*" in tags or ETAG in tags


@router.get(
    "/embed.js",
    summary='The "Buy hi-res" button script for any web page',
    description='`<script src="https://<this API>/embed.js" data-key="pk_..." defer></script>`; see the README.',
    response_class=Response,
    responses={
        200: {"description": "The script", "content": {"text/javascript": {"schema": {"type": "string"}}}},
        304: {"description": "Not modified: the copy whose ETag was sent in If-None-Match is current"},
    },
)
def embed_script(if_none_match: str | None = Header(None, description="an ETag of this script")) -> Response:
    if _matches(if_none_match):
        return Response(status_code=304, headers=HEADERS)
    return Response(SCRIPT, media_type=MEDIA_TYPE, headers=HEADERS)
