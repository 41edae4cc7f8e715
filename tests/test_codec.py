"""Payload encryption (smi/codec.py) and the codec endpoint the Temporal UI decodes through (api/codec.py)."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError
from temporalio.api.common.v1 import Payload
from temporalio.client import Client
from temporalio.converter import DataConverter

from api.app import create_app
from devstack import KEYS
from smi.codec import EncryptionCodec, PayloadDecryptionError, data_converter, parse_key
from smi.settings import Settings
from smi.vocabulary import UpscaleInput
from tests.conftest import ADMIN_KEY, STOREFRONT_KEY, png_bytes
from tests.helpers import order, wait_for_status
from worker import create_worker

KEY = secrets.token_urlsafe(32)
OLD_KEY = secrets.token_urlsafe(32)
ENCRYPTED = "binary/encrypted"


def plain_payloads(*values) -> list[Payload]:
    return DataConverter.default.payload_converter.to_payloads(list(values))


def codec_of(key: str = KEY, key_id: str = "k1", previous: dict[str, str] | None = None) -> EncryptionCodec:
    return EncryptionCodec(key_id, parse_key(key), {i: parse_key(k) for i, k in (previous or {}).items()})


def settings_for(tmp_path, **overrides) -> Settings:
    values = dict(
        env="test",
        database_url=f"sqlite:///{tmp_path}/smi.db",
        **KEYS,
        payload_key=KEY,
    )
    values.update(overrides)
    return Settings(**values)


# The codec itself


async def test_round_trip_hides_the_data_and_uses_a_fresh_nonce():
    codec = codec_of()
    value = UpscaleInput("job-0123", "https://shop.example/img/ana.png", 4, "png")
    plain = plain_payloads(value, value)
    sealed = await codec.encode(plain)
    for payload in sealed:
        assert payload.metadata["encoding"] == ENCRYPTED.encode()
        assert payload.metadata["encryption-key-id"] == b"k1"
        assert b"job-0123" not in payload.data and b"shop.example" not in payload.data
    assert sealed[0].data[:12] != sealed[1].data[:12] and sealed[0].data != sealed[1].data  # same value, new nonce
    assert await codec.decode(sealed) == plain
    assert DataConverter.default.payload_converter.from_payloads(await codec.decode(sealed), [UpscaleInput])[0] == value


async def test_rotation_old_key_id_still_decrypts_new_payloads_use_the_new_id():
    before = codec_of(OLD_KEY, "k1")
    old_payloads = await before.encode(plain_payloads({"job_id": "old"}))

    after = codec_of(KEY, "k2", previous={"k1": OLD_KEY})
    new_payloads = await after.encode(plain_payloads({"job_id": "new"}))
    assert [p.metadata["encryption-key-id"] for p in new_payloads] == [b"k2"]
    assert await after.decode(old_payloads + new_payloads) == plain_payloads({"job_id": "old"}, {"job_id": "new"})

    with pytest.raises(PayloadDecryptionError, match="k2"):  # a worker not yet given the new key says which one
        await before.decode(new_payloads)
    with pytest.raises(PayloadDecryptionError, match="k1"):  # the old key dropped too early
        await codec_of(KEY, "k2").decode(old_payloads)


async def test_tampered_ciphertext_or_key_id_fails():
    codec = codec_of(KEY, "k2", previous={"k1": OLD_KEY})
    sealed = (await codec.encode(plain_payloads({"job_id": "x"})))[0]
    for position in (0, 12, len(sealed.data) - 1):  # the nonce, the ciphertext, the tag
        data = bytearray(sealed.data)
        data[position] ^= 0x01
        with pytest.raises(PayloadDecryptionError, match="does not authenticate"):
            await codec.decode([Payload(metadata=sealed.metadata, data=bytes(data))])
    relabelled = Payload(metadata={**sealed.metadata, "encryption-key-id": b"k1"}, data=sealed.data)
    with pytest.raises(PayloadDecryptionError):
        await codec.decode([relabelled])
    with pytest.raises(PayloadDecryptionError):
        await codec.decode([Payload(metadata=sealed.metadata, data=b"short")])
    with pytest.raises(PayloadDecryptionError):  # the right id, another key
        await codec_of(OLD_KEY, "k2").decode([sealed])


async def test_plain_payloads_pass_through():
    """Histories recorded before encryption was switched on still replay."""
    plain = plain_payloads({"job_id": "before"}, None, b"raw")
    assert await codec_of().decode(plain) == plain


def test_settings_and_data_converter(tmp_path, monkeypatch):
    assert data_converter(settings_for(tmp_path, payload_key=None).payload_codec()) is DataConverter.default
    assert data_converter(settings_for(tmp_path, payload_key="").payload_codec()) is DataConverter.default  # empty: off
    converter = data_converter(
        settings_for(tmp_path, payload_key_id="2025-01", payload_keys_previous=f"k1:{OLD_KEY}").payload_codec()
    )
    assert isinstance(converter.payload_codec, EncryptionCodec)
    assert converter.payload_codec.key_ids == ["2025-01", "k1"]
    assert converter.payload_converter is not None

    padded = base64.urlsafe_b64encode(parse_key(KEY)).decode()  # with '=' padding, and standard base64 too
    assert parse_key(padded) == parse_key(base64.b64encode(parse_key(KEY)).decode()) == parse_key(KEY)
    for bad in (
        dict(payload_key="too-short"),
        dict(payload_key="!!!" * 15),
        dict(payload_key=secrets.token_urlsafe(16)),  # AES-128 size: refused, the codec is AES-256
        dict(payload_key_id="a:b"),
        dict(payload_keys_previous="k0"),
        dict(payload_keys_previous=f"k1:{OLD_KEY}"),  # the current key's id again
        dict(payload_key=None, payload_keys_previous=f"k0:{OLD_KEY}"),
    ):
        with pytest.raises(ValidationError) as error:
            settings_for(tmp_path, **bad)
        assert KEY not in str(error.value) and OLD_KEY not in str(error.value)

    monkeypatch.setenv("SMI_PAYLOAD_KEY", KEY)
    monkeypatch.setenv("SMI_PAYLOAD_KEY_ID", "k7")
    monkeypatch.setenv("SMI_PAYLOAD_KEYS_PREVIOUS", f"k6:{OLD_KEY}")
    from_env = Settings(env="dev")
    assert from_env.payload_key.get_secret_value() == KEY and from_env.payload_key_id == "k7"
    assert data_converter(from_env.payload_codec()).payload_codec.key_ids == ["k7", "k6"]


# The codec endpoint


@asynccontextmanager
async def api_from(app, host: str = "127.0.0.1"):
    """The app in process, as seen from a client at `host` (its lifespan run as uvicorn would)."""
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app, client=(host, 50000))
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8000") as client:
            yield client


def payloads_json(payloads: list[Payload]) -> dict:
    from google.protobuf import json_format

    return {"payloads": [json_format.MessageToDict(p) for p in payloads]}


def data_of(item: dict) -> bytes:
    return base64.b64decode(item.get("data", ""))


def encoding_of(item: dict) -> str:
    return base64.b64decode(item.get("metadata", {}).get("encoding", "")).decode()


async def test_codec_endpoint_protocol_auth_and_cors(tmp_path):
    settings = settings_for(tmp_path, codec_cors_origins="http://localhost:8233,http://127.0.0.1:8233")
    sealed = await codec_of().encode(plain_payloads({"job_id": "j-1", "image_url": "https://shop.example/a.png"}))
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with api_from(create_app(settings)) as api:
        decoded = await api.post(
            "/codec/decode", json=payloads_json(sealed), headers={**admin, "X-Namespace": "default"}
        )
        assert decoded.status_code == 200, decoded.text
        [item] = decoded.json()["payloads"]
        assert encoding_of(item) == "json/plain"
        assert json.loads(data_of(item)) == {"job_id": "j-1", "image_url": "https://shop.example/a.png"}

        encoded = (await api.post("/codec/encode", json=payloads_json(plain_payloads("hello")), headers=admin)).json()
        assert encoding_of(encoded["payloads"][0]) == ENCRYPTED and b"hello" not in data_of(encoded["payloads"][0])
        again = (await api.post("/codec/decode", json=encoded, headers=admin)).json()
        assert json.loads(data_of(again["payloads"][0])) == "hello"
        assert (await api.post("/codec/decode", json={"payloads": []}, headers=admin)).json() == {"payloads": []}

        # Outside dev the admin key is required, even from loopback.
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Bearer {STOREFRONT_KEY}"}):
            refused = await api.post("/codec/decode", json=payloads_json(sealed), headers=headers)
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthorized"

        # The UI's preflight from its origin, then the request with credentials.
        preflight = await api.options(
            "/codec/decode",
            headers={
                "Origin": "http://localhost:8233",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type,x-namespace,authorization",
            },
        )
        assert preflight.status_code == 204
        assert preflight.headers["access-control-allow-origin"] == "http://localhost:8233"
        assert preflight.headers["access-control-allow-credentials"] == "true"
        assert "POST" in preflight.headers["access-control-allow-methods"]
        allowed = {h.strip().lower() for h in preflight.headers["access-control-allow-headers"].split(",")}
        assert {"content-type", "x-namespace", "authorization"} <= allowed
        assert (
            await api.options(
                "/codec/encode", headers={"Origin": "http://127.0.0.1:8233", "Access-Control-Request-Method": "POST"}
            )
        ).status_code == 204
        from_ui = await api.post(
            "/codec/decode", json=payloads_json(sealed), headers={**admin, "Origin": "http://localhost:8233"}
        )
        assert from_ui.status_code == 200 and from_ui.headers["access-control-allow-origin"] == "http://localhost:8233"
        unauthorized = await api.post(
            "/codec/decode", json=payloads_json(sealed), headers={"Origin": "http://localhost:8233"}
        )
        assert unauthorized.status_code == 401  # with CORS headers, so the UI can tell why
        assert unauthorized.headers["access-control-allow-origin"] == "http://localhost:8233"

        # Another page's origin gets nothing, whatever it sends.
        evil = {"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"}
        assert (await api.options("/codec/decode", headers=evil)).status_code == 403
        stolen = await api.post("/codec/decode", json=payloads_json(sealed), headers={**admin, **evil})
        assert stolen.status_code == 403 and "access-control-allow-origin" not in stolen.headers

        # Bad bodies and bad payloads.
        as_text = await api.post(
            "/codec/decode", content=json.dumps(payloads_json(sealed)), headers={**admin, "Content-Type": "text/plain"}
        )  # would need no preflight
        assert as_text.status_code == 415
        not_json = await api.post(
            "/codec/decode", content=b"{not json", headers={**admin, "Content-Type": "application/json"}
        )
        assert not_json.status_code == 400
        tampered = payloads_json(sealed)
        tampered["payloads"][0]["data"] = base64.b64encode(data_of(tampered["payloads"][0])[:-1] + b"\0").decode()
        bad = await api.post("/codec/decode", json=tampered, headers=admin)
        assert bad.status_code == 400 and bad.json()["error"]["code"] == "undecodable_payload"
        assert KEY not in bad.text


async def test_codec_endpoint_in_dev_trusts_loopback_only(tmp_path):
    sealed = await codec_of().encode(plain_payloads("secret order"))
    body = payloads_json(sealed)
    app = create_app(settings_for(tmp_path, env="dev"))
    async with api_from(app) as local, api_from(app, "192.0.2.7") as remote, api_from(app, "::1") as local6:
        for client in (local, local6):
            answer = await client.post("/codec/decode", json=body, headers={"X-Namespace": "default"})
            assert answer.status_code == 200 and json.loads(data_of(answer.json()["payloads"][0])) == "secret order"
        assert (
            await local.post("/codec/decode", json=body, headers={"Authorization": "Bearer wrong"})
        ).status_code == 401
        assert (await remote.post("/codec/decode", json=body)).status_code == 401
        assert (
            await remote.post("/codec/decode", json=body, headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        ).status_code == 200


async def test_codec_endpoint_without_a_key(tmp_path):
    sealed = await codec_of().encode(plain_payloads("x"))
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with api_from(create_app(settings_for(tmp_path, payload_key=None))) as api:
        plain = payloads_json(plain_payloads("x"))
        assert (await api.post("/codec/encode", json=plain, headers=admin)).json() == plain  # encryption off: unchanged
        off = await api.post("/codec/decode", json=payloads_json(sealed), headers=admin)
        assert off.status_code == 409 and off.json()["error"]["code"] == "encryption_off"


# End to end on the dev server


# What the Temporal SDK writes in clear beside a local activity's (encrypted) result.
LOCAL_ACTIVITY_META = {
    "seq",
    "attempt",
    "activity_id",
    "activity_type",
    "complete_time",
    "backoff",
    "original_schedule_time",
    "activation_index",
}


# The workflow.patched() ids of our workflows, whose markers the SDK writes in clear (nothing of a job).
PATCHES = {
    name
    for path in (Path(__file__).parent.parent / "workflows").glob("*.py")
    for name in re.findall(r'workflow\.patched\("([^"]+)"\)', path.read_text())
}


def payloads_in(node, path: tuple = ()):
    """Every Payload (protobuf JSON) in a history, with where it is; search attributes are not
    payloads of ours (the server must read them) and are left out."""
    if isinstance(node, dict):
        if isinstance(node.get("metadata"), dict) and "encoding" in node["metadata"]:
            yield path, node
            return
        for key, value in node.items():
            if key != "searchAttributes":
                yield from payloads_in(value, path + (key,))
    elif isinstance(node, list):
        for value in node:
            yield from payloads_in(value, path)


async def test_job_payloads_are_encrypted_in_temporal_and_decoded_by_the_endpoint(dev_env, stack_factory, faults):
    faults(delay_seconds=0.2)
    stack = stack_factory(dev_env, payload_key=KEY, payload_key_id="e2e-1")
    target = dev_env.client.service_client.config.target_host
    with pytest.raises(ValueError, match="SMI_PAYLOAD_KEY"):  # a worker that would write clear payloads refuses
        create_worker(dev_env.client, stack.settings)
    worker_client = await Client.connect(
        target, namespace=dev_env.client.namespace, data_converter=data_converter(stack.settings.payload_codec())
    )
    image_url = stack.shop.publish(png_bytes(60, 40))
    client = stack.client()
    admin = stack.client(ADMIN_KEY)

    async with create_worker(worker_client, stack.settings):
        created = await asyncio.to_thread(client.post, "/v1/jobs", json=order(image_url, "enc-1042", scale_factor=2))
        assert created.status_code == 202, created.text
        job_id = created.json()["job_id"]
        job = await wait_for_status(client, job_id, {"completed", "failed", "manual_review"}, timeout=90)
        assert job["status"] == "completed", job
        await worker_client.get_workflow_handle(f"upscale-{job_id}").result()
        # An admin endpoint through the API's client: it starts a workflow and reads its result.
        resent = await asyncio.to_thread(admin.post, f"/v1/admin/jobs/{job_id}/resend-email")
        assert resent.status_code == 200 and "link generation 2 sent" in resent.json()["how"], resent.text
        await asyncio.to_thread(stack.mailbox.wait_for, 2)

    workflow_ids = [w.id async for w in dev_env.client.list_workflows(f'TaskQueue="{stack.settings.task_queue}"')]
    assert f"upscale-{job_id}" in workflow_ids and any(w.startswith(f"resend-{job_id}") for w in workflow_ids)
    # (Long or with characters base64 never has: a chance match in ciphertext or base64 text is impossible.)
    secrets_of_the_job = [
        job_id,
        image_url,
        stack.shop.url.split("//")[1],
        "enc-1042",
        "ana@example.com",
        "upscaled_120x80",
        "poll_initial_delay_seconds",
    ]
    found: list[dict] = []
    for workflow_id in workflow_ids:
        raw = (await dev_env.client.get_workflow_handle(workflow_id).fetch_history()).to_json()  # a plain client
        payloads = list(payloads_in(json.loads(raw)))
        assert payloads, workflow_id
        for where, payload in payloads:
            data = data_of(payload)
            if where[-3:] == ("details", "data", "payloads") and "markerRecordedEventAttributes" in where:
                # The SDK's own record of a local activity (type, seq, times); its result is beside it, encrypted.
                assert encoding_of(payload) == "json/plain"
                assert set(json.loads(data)) <= LOCAL_ACTIVITY_META, json.loads(data)
            elif where[-3:] == ("details", "patch-data", "payloads") and "markerRecordedEventAttributes" in where:
                # The SDK's own record of a workflow.patched() call: the patch's name, nothing of the job.
                assert encoding_of(payload) == "json/plain"
                assert set(json.loads(data)) == {"id", "deprecated"} and json.loads(data)["id"] in PATCHES, data
            else:
                assert encoding_of(payload) == ENCRYPTED, (workflow_id, where, payload)
                assert base64.b64decode(payload["metadata"]["encryption-key-id"]) == b"e2e-1"
                found.append(payload)
            for value in secrets_of_the_job:
                assert value.encode() not in data, (workflow_id, where, value)
        # Nor anywhere else in the history but the workflow's own ID (which names the job).
        rest = raw.replace(workflow_id, "")
        for value in secrets_of_the_job:
            assert value not in rest, (workflow_id, value)
    upscale_history = json.loads(
        (await dev_env.client.get_workflow_handle(f"upscale-{job_id}").fetch_history()).to_json()
    )
    where_found = {key for where, _ in payloads_in(upscale_history) for key in where}
    assert {
        "workflowExecutionStartedEventAttributes",
        "activityTaskScheduledEventAttributes",
        "activityTaskCompletedEventAttributes",
        "workflowExecutionSignaledEventAttributes",
        "workflowExecutionCompletedEventAttributes",
    } <= where_found, where_found

    # The codec endpoint gives them back to an admin, and to no one else.
    body = {"payloads": found}
    assert (await asyncio.to_thread(client.post, "/codec/decode", json=body)).status_code == 401
    decoded = await asyncio.to_thread(admin.post, "/codec/decode", json=body, headers={"X-Namespace": "default"})
    assert decoded.status_code == 200, decoded.text
    items = decoded.json()["payloads"]
    assert len(items) == len(found) and all(encoding_of(item) != ENCRYPTED for item in items)
    clear = b"\n".join(data_of(item) for item in items)
    for value in (job_id, image_url, "upscaled_120x80", "poll_initial_delay_seconds"):
        assert value.encode() in clear, value
