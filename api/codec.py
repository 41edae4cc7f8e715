"""The remote codec endpoint, so the Temporal UI (and `temporal ... --codec-endpoint`) shows the
encrypted payloads of smi/codec.py in clear to admins.

Temporal's remote codec protocol: `POST /codec/decode` and `POST /codec/encode` take
`{"payloads": [...]}` (payloads in protobuf JSON: base64 `metadata` values and `data`) and
answer the same shape. The UI calls them from the admin's browser, so they answer CORS
preflights from the origins in `SMI_CODEC_CORS_ORIGINS` (the UI sends `Content-Type`,
`X-Namespace` and, when told to pass the user's access token, `Authorization`).

Who may call: `Authorization: Bearer $SMI_ADMIN_API_KEY`. With `SMI_ENV=dev`, and only
there, a request without any Authorization header is also accepted from a loopback client
(the dev UI cannot send a key: it passes tokens only to https endpoints). Requests naming
an Origin outside the list are refused, and only `application/json` is taken, so another web
page open in the admin's browser can neither read the answers nor send a request without
a preflight it fails.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Literal
from urllib.parse import urlsplit

from fastapi import APIRouter, Depends, Request, Response, Security
from google.protobuf import json_format
from pydantic import ValidationError
from temporalio.api.common.v1 import Payload, Payloads

from api import deps
from api.errors import ApiError
from api.models import CodecPayloads, CodecRequest
from api.openapi import ADMIN, errors
from smi.codec import ENCODING, PayloadDecryptionError
from smi.settings import Settings

router = APIRouter(prefix="/codec", tags=["admin"])

ALLOW_HEADERS = "Authorization, Content-Type, X-Namespace"


def _origins(cfg: Settings) -> set[str]:
    """The Temporal UI's origins, and our own public one (the /docs page)."""
    own = urlsplit(cfg.public_base_url)
    return {o.strip().rstrip("/") for o in cfg.codec_cors_origins.split(",") if o.strip()} | {
        f"{own.scheme}://{own.netloc}"
    }


def cors_headers(request: Request, cfg: Settings) -> dict[str, str]:
    """CORS headers for this request's Origin; refuses an Origin that is not allowed."""
    origin = request.headers.get("Origin")
    if origin is None:  # not from a browser page (the CLI, a script): CORS does not apply
        return {}
    if origin not in _origins(cfg):
        raise ApiError(
            403,
            "origin_not_allowed",
            "this origin may not use the codec endpoint; see SMI_CODEC_CORS_ORIGINS",
            headers={"Vary": "Origin"},
        )
    return {"Access-Control-Allow-Origin": origin, "Access-Control-Allow-Credentials": "true", "Vary": "Origin"}


def _is_loopback(host: str | None) -> bool:
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def _authorize(request: Request, cfg: Settings, cors: dict[str, str]) -> None:
    header = request.headers.get("Authorization")
    admin_key = cfg.admin_api_key.get_secret_value() if cfg.admin_api_key else ""
    if header is not None:
        if admin_key and deps.key_matches(header, [admin_key]):
            return
    elif cfg.env == "dev" and _is_loopback(request.client.host if request.client else None):
        return  # development only: the dev UI on this machine, which cannot send a key
    raise ApiError(
        401,
        "unauthorized",
        "a valid admin API key is required as 'Authorization: Bearer <key>'",
        headers={**cors, "WWW-Authenticate": "Bearer"},
    )


async def _payloads(request: Request, cors: dict[str, str]) -> list[Payload]:
    if request.headers.get("Content-Type", "").split(";")[0].strip().lower() != "application/json":
        raise ApiError(
            415, "unsupported_media_type", "the body must be JSON (Content-Type: application/json)", headers=cors
        )
    body = await request.body()  # capped while it streams (api/guard.py)
    try:  # the shape first: json_format takes a bare JSON string, or null payloads, as no payloads
        CodecRequest.model_validate_json(body or b"{}")
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(p) for p in problem["loc"]) or "body"
        raise ApiError(
            400, "invalid_request", f'the body is not {{"payloads": [...]}}: {where}: {problem["msg"]}', headers=cors
        ) from None
    try:
        return list(json_format.Parse(body or b"{}", Payloads(), ignore_unknown_fields=True).payloads)
    except (json_format.ParseError, UnicodeDecodeError) as exc:
        raise ApiError(
            400, "invalid_request", f'the body is not {{"payloads": [...]}} in protobuf JSON: {exc}', headers=cors
        ) from None


def _reply(payloads: list[Payload], cors: dict[str, str]) -> Response:
    body = {"payloads": [json_format.MessageToDict(p) for p in payloads]}
    return Response(json.dumps(body), media_type="application/json", headers=cors)


@router.options("/{operation}", include_in_schema=False)
def preflight(
    operation: Literal["encode", "decode"], request: Request, cfg: Settings = Depends(deps.settings)
) -> Response:
    headers = cors_headers(request, cfg)
    headers.update(
        {
            "Access-Control-Allow-Methods": "POST",
            "Access-Control-Allow-Headers": ALLOW_HEADERS,
            "Access-Control-Max-Age": "600",
        }
    )
    if request.headers.get("Access-Control-Request-Private-Network") == "true":
        headers["Access-Control-Allow-Private-Network"] = "true"
    return Response(status_code=204, headers=headers)


# The body, read by protobuf's json_format, described for OpenAPI; the errors either route answers; the admin
# key (checked by _authorize: in dev, the loopback needs none).
COMPONENT = "#/components/schemas/{model}"
CODEC_BODY: dict = {
    "requestBody": {
        "required": False,  # none: no payloads
        "content": {"application/json": {"schema": CodecRequest.model_json_schema(ref_template=COMPONENT)}},
    }
}
CODEC_BODY["requestBody"]["content"]["application/json"]["schema"].pop("$defs", None)  # CodecPayload: a component
CODEC_ERRORS = errors(
    {
        400: ["invalid_request", "undecodable_payload"],
        401: ["unauthorized"],
        403: ["origin_not_allowed"],
        409: ["encryption_off"],
        413: ["too_large"],
        415: ["unsupported_media_type"],
    }
)


# The replies are written by protobuf's json_format (Temporal's remote codec format): response_model
# documents them, FastAPI does not rewrite them.
@router.post(
    "/decode",
    response_model=CodecPayloads,
    summary="Temporal remote codec: decrypt payloads (for the Temporal UI)",
    dependencies=[Security(ADMIN)],
    openapi_extra=CODEC_BODY,
    responses=CODEC_ERRORS,
)
async def decode(request: Request, cfg: Settings = Depends(deps.settings)) -> Response:
    cors = cors_headers(request, cfg)
    _authorize(request, cfg, cors)
    payloads = await _payloads(request, cors)
    codec = cfg.payload_codec()
    if codec is None:
        if any(p.metadata.get("encoding") == ENCODING for p in payloads):
            raise ApiError(
                409, "encryption_off", "these payloads are encrypted but SMI_PAYLOAD_KEY is not set here", headers=cors
            )
        return _reply(payloads, cors)
    try:
        return _reply(await codec.decode(payloads), cors)
    except PayloadDecryptionError as exc:
        raise ApiError(400, "undecodable_payload", str(exc), headers=cors) from None


@router.post(
    "/encode",
    response_model=CodecPayloads,
    summary="Temporal remote codec: encrypt payloads (input the UI sends)",
    dependencies=[Security(ADMIN)],
    openapi_extra=CODEC_BODY,
    responses=CODEC_ERRORS,
)
async def encode(request: Request, cfg: Settings = Depends(deps.settings)) -> Response:
    cors = cors_headers(request, cfg)
    _authorize(request, cfg, cors)
    payloads = await _payloads(request, cors)
    codec = cfg.payload_codec()
    return _reply(await codec.encode(payloads) if codec else payloads, cors)
