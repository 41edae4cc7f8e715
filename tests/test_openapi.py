"""The OpenAPI document is the API's contract (issue 13): every route's replies described, the error shape
for every status it can answer, two Bearer schemes, readable operation ids, the upload body. Checked here
on the live document, and by Schemathesis' own loading (its validation against the OpenAPI 3.1 schema);
tests/test_schemathesis.py then holds the API to it."""

from __future__ import annotations

import httpx
import pytest
import schemathesis

from tests.conftest import ADMIN_KEY, STOREFRONT_KEY

ERROR_REF = "#/components/schemas/ErrorReply"


@pytest.fixture
def document(site) -> dict:
    reply = httpx.get(f"{site.url}/openapi.json")
    assert reply.status_code == 200
    return reply.json()


def operations(doc: dict):
    for path, methods in doc["paths"].items():
        for method, operation in methods.items():
            yield path, method, operation


def test_the_document_is_valid_openapi(site, document):
    schema = schemathesis.openapi.from_url(f"{site.url}/openapi.json")
    schema.validate()  # raises on a document that breaks the OpenAPI 3.1 schema
    assert document["openapi"].startswith("3.1")
    assert len(list(schema.get_all_operations())) == sum(1 for _ in operations(document))


def test_operation_ids_are_readable_and_unique(document):
    ids = [operation["operationId"] for _, _, operation in operations(document)]
    assert len(ids) == len(set(ids))
    for operation_id in ids:  # FastAPI's generated ids end in the path and method: create_job_v1_jobs_post
        assert operation_id.isidentifier() and "__" not in operation_id and "_v1_" not in operation_id, operation_id
        assert not operation_id.endswith(("_get", "_post", "_delete")), operation_id
    assert {"create_job", "read_job", "upload_image", "create_quote", "retry_job", "refund_job"} <= set(ids)


PAGE_ROUTES = ("/v1/funnel", "/v1/checkout", "/v1/checkout/quote")


def test_two_bearer_schemes_and_each_keyed_route_names_its_own(document):
    schemes = document["components"]["securitySchemes"]
    assert schemes["storefront"] == {
        "type": "http",
        "scheme": "bearer",
        "description": schemes["storefront"]["description"],
    }
    assert schemes["admin"]["scheme"] == "bearer"
    for path, method, operation in operations(document):
        if path.startswith("/v1/admin/") or path.startswith("/codec/"):
            assert operation["security"] == [{"admin": []}], (method, path)
        elif path == "/v1/funnel" and method == "options":
            assert "security" not in operation  # a CORS preflight carries no key
        elif path in PAGE_ROUTES:  # called from a web page with its publishable key
            assert operation["security"] == [{"publishable": []}], (method, path)
        elif path.startswith("/v1/"):
            assert operation["security"] == [{"storefront": []}], (method, path)
        elif path != "/metrics":
            assert "security" not in operation, (method, path)  # the customer's pages, the webhook, health


def test_every_reply_is_described_and_every_error_has_the_error_shape(document):
    schemas = document["components"]["schemas"]
    assert "HTTPValidationError" not in schemas and "ValidationError" not in schemas  # {"detail": [...]}: never sent
    for path, method, operation in operations(document):
        answers = operation["responses"]
        assert any(status.startswith("2") for status in answers), (method, path)
        for status, answer in answers.items():
            assert answer.get("description"), (method, path, status)
            content = answer.get("content", {})
            if status.startswith("2") and method != "head" and status != "204":  # a 204 has no body
                assert content and all(media.get("schema") for media in content.values()), (method, path, status)
            if int(status) >= 400 and status != "416":
                assert list(content) == ["application/json"], (method, path, status)
                assert content["application/json"]["schema"] == {"$ref": ERROR_REF}, (method, path, status)
                codes = list(content["application/json"]["examples"])
                assert codes and all(f"`{code}`" in answer["description"] for code in codes), (method, path, status)
        if path.startswith("/v1/") and method != "options":  # a CORS preflight carries no key
            example = answers["401"]["content"]["application/json"]["examples"]["unauthorized"]["value"]["error"]
            who = "admin" if path.startswith("/v1/admin/") else "publishable" if path in PAGE_ROUTES else "storefront"
            assert example["message"].startswith(f"a valid {who} API key"), (method, path)
    assert schemas["ErrorReply"]["properties"]["error"] == {"$ref": "#/components/schemas/ErrorInfo"}
    assert set(schemas["ErrorInfo"]["required"]) == {"code", "message", "details"}


def test_the_routes_codes_are_listed(document):
    def codes(path: str, method: str, status: str) -> set[str]:
        answer = document["paths"][path][method]["responses"][status]
        return set(answer["content"]["application/json"]["examples"])

    assert codes("/v1/jobs", "post", "409") == {"order_conflict"}
    assert {"invalid_request", "unsupported_format", "output_too_large"} <= codes("/v1/jobs", "post", "422")
    assert codes("/v1/jobs/{job_id}", "get", "404") == {"job_not_found"}
    assert codes("/downloads/{token}", "get", "410") == {"link_replaced", "link_expired", "file_gone", "download_limit"}
    assert codes("/v1/admin/jobs/{job_id}/retry", "post", "409") == {
        "already_refunded",
        "customer_erased",
        "job_in_progress",
    }
    assert codes("/readyz", "get", "503") == {"not_ready"}


def test_the_upload_body_is_binary_and_the_order_has_an_example(document):
    body = document["paths"]["/v1/uploads"]["post"]["requestBody"]
    assert body["required"] is True
    assert body["content"] == {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    assert "PNG, JPEG or WebP" in document["paths"]["/v1/uploads"]["post"]["description"]
    order = document["components"]["schemas"]["JobRequest"]
    assert order["examples"][0]["order_id"] == "wc-1042"


def test_a_body_that_is_not_utf8_is_a_422_in_the_error_shape(site):
    """Schemathesis found it: FastAPI answered such a body 400 `http_error` "There was an error parsing the
    body", a status the routes do not document, with a message saying nothing of what to fix."""
    for path in ("/v1/jobs", "/v1/quotes"):
        reply = httpx.post(
            f"{site.url}{path}",
            content=b'{"order_id": "\xff\xfe"}',
            headers={"Authorization": f"Bearer {STOREFRONT_KEY}", "Content-Type": "application/json"},
        )
        assert reply.status_code == 422, reply.text
        error = reply.json()["error"]
        assert error["code"] == "invalid_request"
        assert "UTF-8" in error["message"] and "JSON" in error["message"]


def test_a_405_names_every_method_the_path_answers(site):
    """Schemathesis found it: OPTIONS /downloads/{token} answered 405 with `Allow: HEAD`, though GET is the
    route's main method (Starlette names the last route of the path it tried)."""
    for method in ("OPTIONS", "PUT", "DELETE"):
        reply = httpx.request(method, f"{site.url}/downloads/{'0' * 64}")
        assert reply.status_code == 405
        assert reply.headers["allow"] == "GET, HEAD"
        assert reply.json()["error"]["code"] == "method_not_allowed"
    assert httpx.put(f"{site.url}/readyz").headers["allow"] == "GET"


def test_the_codec_refuses_a_body_that_is_not_an_object(site):
    """Schemathesis found it: /codec/decode and /codec/encode answered the JSON string "AAA", or null payloads,
    200 with no payloads, as if it were {"payloads": []} (protobuf's JSON parser takes them so)."""
    for operation in ("decode", "encode"):
        for body in (b'"AAA"', b"[]", b"12", b'{"payloads": null}', b'{"payloads": [{"metadata": null}]}'):
            reply = httpx.post(
                f"{site.url}/codec/{operation}",
                content=body,
                headers={"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"},
            )
            assert reply.status_code == 400, (operation, body, reply.text)
            assert reply.json()["error"]["code"] == "invalid_request"
        empty = httpx.post(
            f"{site.url}/codec/{operation}",
            json={"payloads": []},
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
        )
        assert empty.status_code == 200 and empty.json() == {"payloads": []}


def test_the_500s_the_issue_names_are_documented_4xx(site):
    """Issue 13 saw 500 from these with Schemathesis 4.32; earlier work had already made them 4xx: held here,
    each with a status its route documents."""
    document = httpx.get(f"{site.url}/openapi.json").json()
    cases = [
        ("get", "/status/{job_id}", "/status/abc", {}, 404),
        ("get", "/status/{job_id}/state", "/status/abc/state", {}, 404),
        ("get", "/status/{job_id}/events", "/status/abc/events", {}, 404),
        ("post", "/smi-webhook/upsampler/", "/smi-webhook/upsampler/?job=", {}, 401),
        ("post", "/v1/uploads", "/v1/uploads", {"Authorization": f"Bearer {STOREFRONT_KEY}"}, 400),
    ]
    for method, route, url, headers, status in cases:
        reply = httpx.request(method.upper(), f"{site.url}{url}", headers=headers)
        assert reply.status_code == status, (url, reply.text)
        assert str(status) in document["paths"][route][method]["responses"], (route, status)
        assert set(reply.json()) == {"error"}
