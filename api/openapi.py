"""The OpenAPI document as exact as the API: the error replies each route can answer (status, the codes it
carries, an example of each), the security schemes, readable operation ids.

Routes declare their own errors with `errors({status: [codes]})`; what every request of an audience can
meet (a missing key, a body over its cap, a field out of range) is declared once on its router.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer

from api.models import ErrorReply

# The Authorize button of /docs: one Bearer scheme per audience. api/guard.py checks the keys before a
# body is read; these only describe them (auto_error off: the check and its 401 are the guard's).
STOREFRONT = HTTPBearer(
    scheme_name="storefront", description="SMI_STOREFRONT_API_KEY (or a previous key)", auto_error=False
)
ADMIN = HTTPBearer(scheme_name="admin", description="SMI_ADMIN_API_KEY", auto_error=False)
METRICS = HTTPBearer(scheme_name="metrics", description="SMI_METRICS_TOKEN", auto_error=False)
PUBLISHABLE = HTTPBearer(
    scheme_name="publishable",
    description="a publishable key of SMI_PUBLISHABLE_KEYS (pk_...), from a page of one of its origins",
    auto_error=False,
)

# An example message for the codes whose message is not a restatement of the code.
MESSAGES = {
    "unauthorized": "a valid storefront API key is required as 'Authorization: Bearer <key>'",
    "invalid_request": "the request is not valid: scale_factor: Input should be greater than or equal to 2",
    "too_large": "the request body is limited to 65536 bytes here",
    "rate_limited": "too many requests from this address; try again later",
    "too_many_connections": "too many open downloads right now; close one or try again in a minute",
    "temporal_unavailable": "the workflow service is not reachable; try again",
    "job_not_found": "no job has this job_id",
    "not_found": "no such file",
    "method_not_allowed": "Method Not Allowed",
}
# What a status means, said once for every route.
MEANINGS = {
    400: "The request is malformed",
    401: "The key (or signature) is missing or wrong",
    403: "Refused",
    404: "Not found",
    405: "The method is not allowed here",
    409: "The request conflicts with the job's state",
    410: "Gone",
    413: "The body is over its cap",
    415: "The body's media type is not accepted",
    416: "The requested range is not satisfiable",
    422: "A field is invalid: the message says which and how to fix it",
    429: "Too many requests or connections: see Retry-After",
    502: "An upstream could not be read",
    503: "A dependency is unreachable; try again",
}


def errors(by_status: dict[int, list[str]]) -> dict[int | str, dict[str, Any]]:
    """`responses=` for FastAPI: each status answered with the error shape, its codes listed and exemplified."""
    documented: dict[int | str, dict[str, Any]] = {}
    for status, codes in by_status.items():
        examples = {
            code: {
                "summary": code,
                "value": {
                    "error": {
                        "code": code,
                        "message": MESSAGES.get(code, code.replace("_", " ")),
                        "details": None,
                    }
                },
            }
            for code in codes
        }
        documented[status] = {
            "model": ErrorReply,
            "description": f"{MEANINGS.get(status, 'Error')}. `error.code`: " + ", ".join(f"`{c}`" for c in codes),
            "content": {"application/json": {"examples": examples}},
        }
    return documented


def merged(*parts: dict[int, list[str]]) -> dict[int, list[str]]:
    """Several routes' or audiences' errors as one table (codes of one status joined, in order)."""
    table: dict[int, list[str]] = {}
    for part in parts:
        for status, codes in part.items():
            table.setdefault(status, [])
            table[status] += [c for c in codes if c not in table[status]]
    return dict(sorted(table.items()))


# What every request of an audience can meet, before or beside its route's own answers.
# A route whose parameters can fail validation adds INVALID.
KEYED_ERRORS = {401: ["unauthorized"], 413: ["too_large"]}  # the storefront's and the admin's (api/guard.py)
PUBLIC_ERRORS = {429: ["rate_limited"]}  # deps.public_rate_limit
INVALID = {422: ["invalid_request"]}  # api/errors.py: a parameter or body field out of its schema

# operationIds: the route's function name, unless it says too little on its own.
RENAMED = {
    "upload": "upload_image",
    "retry": "retry_job",
    "refund": "refund_job",
    "decode": "codec_decode",
    "encode": "codec_encode",
    "metrics": "read_metrics",
    "healthz": "liveness",
    "readyz": "readiness",
}


def operation_id(route: APIRoute) -> str:
    return RENAMED.get(route.name, route.name)


def errors_as_json(answer: dict[str, Any]) -> None:
    """An error of a route answering HTML or a stream is still JSON: FastAPI files the error model under the
    route's own media type."""
    content = answer.get("content", {})
    for media in [m for m in content if m != "application/json"]:
        if content[media].get("schema", {}).get("$ref", "").endswith("/ErrorReply"):
            content.setdefault("application/json", {})["schema"] = content.pop(media)["schema"]


def name_the_key(operation: dict[str, Any]) -> None:
    """The example of a 401 `unauthorized` names the key the route's scheme asks for, as the answer does."""
    schemes = [name for requirement in operation.get("security", []) for name in requirement]
    examples = operation["responses"].get("401", {}).get("content", {}).get("application/json", {}).get("examples", {})
    if schemes and "unauthorized" in examples:
        message = f"a valid {schemes[0]} API key is required as 'Authorization: Bearer <key>'"
        examples["unauthorized"] = {
            "summary": "unauthorized",
            "value": {"error": {**ERROR_EXAMPLE, "message": message}},
        }


ERROR_EXAMPLE = {"code": "unauthorized", "message": "", "details": None}


def install(app: FastAPI) -> None:
    """The document without FastAPI's default 422 ({"detail": [...]}, which the API never sends: api/errors.py
    answers every validation error in the error shape, and routes that can meet one declare it)."""

    def document() -> dict[str, Any]:
        if app.openapi_schema is None:
            doc = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
                servers=app.servers,
            )
            for operations in doc["paths"].values():
                for operation in operations.values():
                    answers = operation["responses"]
                    default = answers.get("422", {}).get("content", {}).get("application/json", {})
                    if default.get("schema", {}).get("$ref", "").endswith("/HTTPValidationError"):
                        del answers["422"]
                    for answer in answers.values():
                        errors_as_json(answer)
                    name_the_key(operation)
            schemas = doc.get("components", {}).get("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                schemas.pop(name, None)
            app.openapi_schema = doc
        return app.openapi_schema

    app.openapi = document  # type: ignore[method-assign]
