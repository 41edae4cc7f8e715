"""The Upsampler client against the running emulator, over real loopback HTTP.

Three loopback servers run for the whole session: the emulator, an image server (generated
PNGs, a non-image route) and a webhook receiver. Every test starts from a reset emulator and
uses its own webhook URL token, so late webhooks from an earlier test cannot leak in.
"""

from __future__ import annotations

import asyncio
import io
import time
import uuid
from functools import lru_cache
from urllib.parse import parse_qs, urlencode, urlsplit, urlunsplit

import httpx
import pytest
from fastapi import FastAPI, Request, Response
from PIL import Image

from emulator import Emulator, Faults, create_app
from smi.serve import ServerThread, free_port
from smi.upsampler import (
    UpsamplerClient,
    UpsamplerInvalidInput,
    UpsamplerJob,
    UpsamplerNotFound,
    UpsamplerRateLimited,
    UpsamplerUnauthorized,
    UpsamplerUnavailable,
)
from tests.helpers import eventually

KEY = "emulator-test-key"
W, H = 40, 30  # the small test image


@lru_cache(maxsize=None)
def make_png(width: int, height: int, mode: str = "RGB") -> bytes:
    if mode == "RGB" and width * height <= 1_000_000:
        im = Image.new("RGB", (width, height))
        im.putdata([((x * 7) % 256, (y * 11) % 256, (x * y) % 256) for y in range(height) for x in range(width)])
    else:  # big images: a flat fill is cheap to make, encode and decode
        im = Image.new(mode, (width, height), 128)
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def image_app() -> FastAPI:
    app = FastAPI()

    @app.get("/img/{width}x{height}.png")
    def img(width: int, height: int, mode: str = "RGB"):
        return Response(make_png(width, height, mode), media_type="image/png")

    @app.get("/not-an-image.png")
    def not_image():
        return Response(b"<html>definitely not a picture</html>", media_type="image/png")

    return app


class Hooks:
    def __init__(self):
        self.received: list[dict] = []
        self.app = FastAPI()

        @self.app.post("/hook")
        async def hook(request: Request):
            self.received.append(
                {"t": request.query_params.get("t"), "body": await request.json(), "at": time.monotonic()}
            )
            return {"ok": True}


@pytest.fixture(scope="session")
def servers():
    hooks = Hooks()
    started = [
        ServerThread(create_app(api_key=KEY)).start(),
        ServerThread(image_app()).start(),
        ServerThread(hooks.app).start(),
    ]
    yield {"emulator": started[0], "images": started[1], "hooks": started[2], "hooks_obj": hooks}
    for server in started:
        server.stop()


class Env:
    """What one test needs: URLs, fault control and the webhooks addressed to this test."""

    def __init__(self, servers):
        self.url = servers["emulator"].url
        self.images = servers["images"].url
        self._hooks = servers["hooks_obj"]
        self.token = uuid.uuid4().hex
        self.webhook_url = f"{servers['hooks'].url}/hook?t={self.token}"
        self.state: Emulator = servers["emulator"].server.config.app.state.emulator

    def image(self, width: int = W, height: int = H, mode: str = "RGB") -> str:
        return f"{self.images}/img/{width}x{height}.png?mode={mode}"

    def faults(self, **settings) -> dict:
        response = httpx.put(f"{self.url}/_emulator/faults", json=settings)
        response.raise_for_status()
        return response.json()

    def jobs(self) -> list[dict]:
        return httpx.get(f"{self.url}/_emulator/jobs").json()

    def requests(self) -> dict:
        return httpx.get(f"{self.url}/_emulator/requests").json()

    def hooks(self) -> list[dict]:
        return [h for h in self._hooks.received if h["t"] == self.token]

    async def wait_hooks(self, count: int, timeout: float = 5.0) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.hooks()) < count:
            assert time.monotonic() < deadline, f"expected {count} webhooks, got {self.hooks()}"
            await asyncio.sleep(0.02)
        return self.hooks()


@pytest.fixture
def env(servers) -> Env:
    httpx.post(f"{servers['emulator'].url}/_emulator/reset").raise_for_status()
    return Env(servers)


@pytest.fixture
async def client(env):
    c = UpsamplerClient(f"{env.url}/api/v1", KEY)
    yield c
    await c.aclose()


async def wait_for(
    client: UpsamplerClient, job_id: str, want: str, timeout: float = 5.0
) -> tuple[UpsamplerJob, list[str]]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while True:
        job = await client.status(job_id)
        if not seen or seen[-1] != job.status:
            seen.append(job.status)
        if job.status == want:
            return job, seen
        assert job.status not in ("completed", "failed"), f"ended {job.status} ({job.error}), wanted {want}"
        assert time.monotonic() < deadline, f"still {job.status}, wanted {want}"
        await asyncio.sleep(0.02)


async def download(url: str) -> httpx.Response:
    async with httpx.AsyncClient() as http:
        return await http.get(url)


def reference_png(factor: int) -> bytes:
    """What a correct emulator delivers: the test image resized with LANCZOS, saved as PNG."""
    big = Image.open(io.BytesIO(make_png(W, H))).resize((W * factor, H * factor), Image.LANCZOS)
    buf = io.BytesIO()
    big.save(buf, "PNG")
    return buf.getvalue()


def with_query(url: str, **changes) -> str:
    parts = urlsplit(url)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()} | changes
    return urlunsplit(parts._replace(query=urlencode(query)))


# --- UpsamplerJob.from_wire -----------------------------------------------------------------


@pytest.mark.parametrize(
    "wire, internal",
    [("IN_QUEUE", "queued"), ("IN_PROGRESS", "processing"), ("SUCCESS", "completed"), ("FAILED", "failed")],
)
def test_from_wire_maps_every_status(wire, internal):
    job = UpsamplerJob.from_wire({"id": "abc", "status": wire, "creditCost": 2})
    assert (job.id, job.status, job.credit_cost) == ("abc", internal, 2.0)


def test_from_wire_keeps_urls_and_error():
    job = UpsamplerJob.from_wire(
        {
            "id": "a",
            "status": "SUCCESS",
            "creditCost": 1.25,
            "imageUrl": "https://x/r.png",
            "compressedImageUrl": "https://x/r.jpg",
        }
    )
    assert (job.credit_cost, job.image_url, job.compressed_image_url, job.error) == (
        1.25,
        "https://x/r.png",
        "https://x/r.jpg",
        None,
    )
    failed = UpsamplerJob.from_wire({"id": "b", "status": "FAILED", "error": "nope"})
    assert (failed.status, failed.error, failed.credit_cost, failed.image_url) == ("failed", "nope", None, None)
    assert UpsamplerJob.from_wire({"id": "c", "status": "IN_QUEUE", "creditCost": "3"}).credit_cost is None


@pytest.mark.parametrize(
    "body",
    [
        {},
        [],
        "SUCCESS",
        None,
        {"id": "a"},
        {"status": "SUCCESS"},
        {"id": 5, "status": "SUCCESS"},
        {"id": "a", "status": "completed"},
        {"id": "a", "status": "success"},
    ],
)
def test_from_wire_rejects_non_jobs(body):
    with pytest.raises(ValueError):
        UpsamplerJob.from_wire(body)


# --- the happy path -------------------------------------------------------------------------


async def test_submit_progress_results_and_webhook(env, client):
    env.faults(delay_seconds=0.3)
    job = await client.submit(env.image(), 3, env.webhook_url)
    assert job.status == "queued" and job.credit_cost == 1.0 and len(job.id) == 32
    done, seen = await wait_for(client, job.id, "completed")
    assert seen == ["queued", "processing", "completed"]
    assert done.credit_cost == 1.0 and done.error is None

    png = await download(done.image_url)
    assert png.status_code == 200 and png.headers["content-type"] == "image/png"
    assert png.content == reference_png(3)  # really resized with LANCZOS
    with Image.open(io.BytesIO(png.content)) as im:
        assert (im.format, im.size) == ("PNG", (W * 3, H * 3))
    jpg = await download(done.compressed_image_url)
    assert jpg.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(jpg.content)) as im:
        assert (im.format, im.size) == ("JPEG", (W * 3, H * 3))

    (hook,) = await env.wait_hooks(1)
    body = hook["body"]
    assert set(body) == {"id", "status", "creditCost", "imageUrl", "compressedImageUrl"}
    assert (body["id"], body["status"], body["creditCost"]) == (job.id, "SUCCESS", 1.0)
    assert UpsamplerJob.from_wire(body).status == "completed"
    assert (await download(body["imageUrl"])).content == png.content

    (listed,) = env.jobs()
    assert listed["imageUrl"] == env.image() and listed["upscaleFactor"] == 3 and listed["webhook"] == env.webhook_url
    assert (listed["width"], listed["height"], listed["status"]) == (W * 3, H * 3, "SUCCESS")
    assert listed["webhooks_sent"] == [{"status": "SUCCESS", "code_or_error": 200}]
    assert listed["status_requests"] >= 3
    counts = env.requests()
    assert counts["submit"] == 1 and counts["status"] == listed["status_requests"] and counts["cdn"] == 3


async def test_submit_without_webhook_completes(env, client):
    env.faults(delay_seconds=0.1)
    job = await client.submit(env.image(), 1, None)
    done, _ = await wait_for(client, job.id, "completed")
    with Image.open(io.BytesIO((await download(done.image_url)).content)) as im:
        assert im.size == (W, H)
    assert env.jobs()[0]["webhooks_sent"] == []


async def test_credit_cost_and_the_50_megapixel_limit(env, client):
    env.faults(never_finish=True)  # the jobs are only priced, never upscaled
    job = await client.submit(env.image(2000, 1000, "L"), 3, None)  # 6000 x 3000 = 18 MP
    assert job.credit_cost == 4.5
    job = await client.submit(env.image(1001, 999, "L"), 2, None)  # 3,996,000 px -> 0.999 -> 1.0
    assert job.credit_cost == 1.0
    job = await client.submit(env.image(1001, 1001, "L"), 2, None)  # 4,008,004 px -> 1.002 -> 1.01
    assert job.credit_cost == 1.01
    job = await client.submit(env.image(5000, 2500, "L"), 2, None)  # exactly 50,000,000 px: allowed
    assert job.credit_cost == 12.5
    with pytest.raises(UpsamplerInvalidInput, match="50000000"):
        await client.submit(env.image(2000, 2000, "L"), 4, None)  # 64 MP
    assert len(env.jobs()) == 4


# --- webhook modes --------------------------------------------------------------------------


async def test_webhook_duplicate(env, client):
    env.faults(delay_seconds=0.1, webhook="duplicate")
    job = await client.submit(env.image(), 2, env.webhook_url)
    hooks = await env.wait_hooks(2)
    assert [h["body"]["status"] for h in hooks] == ["SUCCESS", "SUCCESS"]
    assert all(h["body"]["id"] == job.id for h in hooks)
    await eventually(lambda: not env.state._tasks, what="the emulator's deliveries done")  # no third can follow
    assert len(env.hooks()) == 2


async def test_webhook_drop(env, client):
    env.faults(delay_seconds=0.1, webhook="drop", webhook_on_progress=True)
    job = await client.submit(env.image(), 2, env.webhook_url)
    await wait_for(client, job.id, "completed")
    await eventually(lambda: not env.state._tasks, what="the emulator's work on the job done")  # a webhook sent by then
    assert env.hooks() == [] and env.jobs()[0]["webhooks_sent"] == []


async def test_webhook_reorder(env, client):
    env.faults(delay_seconds=0.1, webhook="reorder")
    job = await client.submit(env.image(), 2, env.webhook_url)
    hooks = await env.wait_hooks(2)
    assert [h["body"]["status"] for h in hooks] == ["SUCCESS", "IN_PROGRESS"]
    assert "imageUrl" not in hooks[1]["body"] and hooks[1]["body"]["id"] == job.id


async def test_webhook_late(env, client):
    env.faults(delay_seconds=0.1, webhook="late", webhook_late_seconds=0.5)
    job = await client.submit(env.image(), 2, env.webhook_url)
    await wait_for(client, job.id, "completed")
    completed_at = time.monotonic()
    assert env.hooks() == []
    (hook,) = await env.wait_hooks(1)
    assert hook["body"]["status"] == "SUCCESS"
    assert hook["at"] - completed_at > 0.3


async def test_webhook_on_progress(env, client):
    env.faults(delay_seconds=0.2, webhook_on_progress=True)
    await client.submit(env.image(), 2, env.webhook_url)
    hooks = await env.wait_hooks(2)
    assert [h["body"]["status"] for h in hooks] == ["IN_PROGRESS", "SUCCESS"]


async def test_webhook_failure_is_recorded_not_fatal(env, client):
    env.faults(delay_seconds=0.1)
    dead = f"http://127.0.0.1:{free_port()}/hook"
    job = await client.submit(env.image(), 2, dead)
    await wait_for(client, job.id, "completed")
    for _ in range(100):
        if env.jobs()[0]["webhooks_sent"]:
            break
        await asyncio.sleep(0.02)
    (sent,) = env.jobs()[0]["webhooks_sent"]
    assert sent["status"] == "SUCCESS" and "ConnectError" in sent["code_or_error"]


# --- HTTP errors as typed client errors -------------------------------------------------------


async def test_wrong_key_is_unauthorized(env):
    bad = UpsamplerClient(f"{env.url}/api/v1", "not-the-key")
    try:
        with pytest.raises(UpsamplerUnauthorized):
            await bad.submit(env.image(), 2, None)
        with pytest.raises(UpsamplerUnauthorized):
            await bad.status("whatever")
    finally:
        await bad.aclose()
    async with httpx.AsyncClient() as http:
        response = await http.get(f"{env.url}/api/v1/status/x")  # no header at all
    assert response.status_code == 401 and "error" in response.json()
    assert env.jobs() == []


@pytest.mark.parametrize("factor", [17, 0, -2])
async def test_bad_factor_is_invalid_input(env, client, factor):
    with pytest.raises(UpsamplerInvalidInput):
        await client.submit(env.image(), factor, None)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"input": {"upscaleFactor": 2, "inputImageType": "universal"}},
        {"input": {"imageUrl": "ftp://x/y.png", "upscaleFactor": 2, "inputImageType": "universal"}},
        {"input": {"imageUrl": "http://x/y.png", "upscaleFactor": 2.5, "inputImageType": "universal"}},
        {"input": {"imageUrl": "http://x/y.png", "upscaleFactor": True, "inputImageType": "universal"}},
        {"input": {"imageUrl": "http://x/y.png", "upscaleFactor": 2}},
        {"input": {"imageUrl": "http://x/y.png", "upscaleFactor": 2, "inputImageType": "universal"}, "webhook": 7},
        [],
    ],
)
async def test_malformed_bodies_are_400_with_error(env, body):
    async with httpx.AsyncClient() as http:
        response = await http.post(
            f"{env.url}/api/v1/precise-upscale", json=body, headers={"Authorization": f"Bearer {KEY}"}
        )
        assert response.status_code == 400 and isinstance(response.json()["error"], str)
        response = await http.post(
            f"{env.url}/api/v1/precise-upscale", content=b"{nope", headers={"Authorization": f"Bearer {KEY}"}
        )
        assert response.status_code == 400 and response.json() == {"error": "body is not valid JSON"}


async def test_rate_limited_with_retry_after_then_unavailable_then_ok(env, client):
    env.faults(submit_errors=[429, 503], retry_after_seconds=7, delay_seconds=0.1)
    with pytest.raises(UpsamplerRateLimited) as caught:
        await client.submit(env.image(), 2, None)
    assert caught.value.retry_after == 7.0 and caught.value.retryable
    with pytest.raises(UpsamplerUnavailable):
        await client.submit(env.image(), 2, None)
    job = await client.submit(env.image(), 2, None)  # both errors were consumed
    assert job.status == "queued"
    assert env.requests()["submit"] == 3 and env.faults()["submit_errors"] == []


async def test_rate_limited_without_retry_after(env, client):
    env.faults(submit_errors=[429])
    with pytest.raises(UpsamplerRateLimited) as caught:
        await client.submit(env.image(), 2, None)
    assert caught.value.retry_after is None


async def test_status_errors_are_consumed_in_order(env, client):
    env.faults(delay_seconds=0.1)
    job = await client.submit(env.image(), 2, None)
    env.faults(status_errors=[500, 429, 502], retry_after_seconds=3)
    with pytest.raises(UpsamplerUnavailable):
        await client.status(job.id)
    with pytest.raises(UpsamplerRateLimited) as caught:
        await client.status(job.id)
    assert caught.value.retry_after == 3.0
    with pytest.raises(UpsamplerUnavailable):
        await client.status(job.id)
    await wait_for(client, job.id, "completed")


async def test_connection_refused_is_unavailable():
    closed = UpsamplerClient(f"http://127.0.0.1:{free_port()}/api/v1", KEY, timeout=2)
    try:
        with pytest.raises(UpsamplerUnavailable, match="unreachable"):
            await closed.submit("http://127.0.0.1:1/x.png", 2, None)
        with pytest.raises(UpsamplerUnavailable):
            await closed.status("x")
    finally:
        await closed.aclose()


async def test_unknown_id_is_not_found(env, client):
    with pytest.raises(UpsamplerNotFound):
        await client.status(uuid.uuid4().hex)


# --- job outcomes ---------------------------------------------------------------------------


async def test_refuse_with_returns_a_failed_job_at_once(env, client):
    env.faults(refuse_with="content policy")
    job = await client.submit(env.image(), 2, env.webhook_url)
    assert (job.status, job.error) == ("failed", "content policy")
    again = await client.status(job.id)
    assert (again.status, again.error) == ("failed", "content policy")


async def test_fail_with_ends_failed(env, client):
    env.faults(delay_seconds=0.1, fail_with="upscale crashed")
    job = await client.submit(env.image(), 2, env.webhook_url)
    assert job.status == "queued"
    failed, _ = await wait_for(client, job.id, "failed")
    assert failed.error == "upscale crashed" and failed.image_url is None
    (hook,) = await env.wait_hooks(1)
    assert hook["body"]["status"] == "FAILED" and hook["body"]["error"] == "upscale crashed"


@pytest.mark.parametrize(
    "path, error", [("/not-an-image.png", "unsupported image format"), ("/nowhere.png", "could not fetch image")]
)
async def test_unusable_input_is_a_failed_job(env, client, path, error):
    job = await client.submit(f"{env.images}{path}", 2, None)
    assert (job.status, job.error, job.credit_cost) == ("failed", error, None)


async def test_unreachable_input_is_a_failed_job(env, client):
    job = await client.submit(f"http://127.0.0.1:{free_port()}/x.png", 2, None)
    assert (job.status, job.error) == ("failed", "could not fetch image")


async def test_polls_until_done(env, client):
    env.faults(polls_until_done=3, delay_seconds=60)  # time is ignored in this mode
    job = await client.submit(env.image(), 2, env.webhook_url)
    assert job.status == "queued"
    await eventually(lambda: not env.state._tasks, what="the result made")  # ready, yet only polls finish it
    assert (await client.status(job.id)).status == "processing"
    assert (await client.status(job.id)).status == "processing"
    done = await client.status(job.id)
    assert done.status == "completed" and done.image_url
    with Image.open(io.BytesIO((await download(done.image_url)).content)) as im:
        assert im.size == (W * 2, H * 2)
    (hook,) = await env.wait_hooks(1)
    assert hook["body"]["status"] == "SUCCESS"
    assert env.jobs()[0]["status_requests"] == 3


async def test_polls_until_done_one_poll(env, client):
    env.faults(polls_until_done=1)
    job = await client.submit(env.image(), 2, None)
    assert (await client.status(job.id)).status == "completed"  # waits for the upscale


async def test_never_finish(env, client):
    env.faults(delay_seconds=0.1, never_finish=True)
    job = await client.submit(env.image(), 2, None)
    await wait_for(client, job.id, "processing")
    await eventually(lambda: not env.state._tasks, what="the emulator's work on the job done")  # nothing will move it
    for _ in range(5):
        assert (await client.status(job.id)).status == "processing"


@pytest.mark.parametrize("result", ["wrong_size", "truncated", "corrupt"])
async def test_bad_results(env, client, result):
    env.faults(delay_seconds=0.1, result=result)
    job = await client.submit(env.image(), 2, None)
    done, _ = await wait_for(client, job.id, "completed")
    data = (await download(done.image_url)).content
    good = reference_png(2)
    if result == "wrong_size":
        with Image.open(io.BytesIO(data)) as im:
            assert im.size == (W * 2 - 1, H * 2)
    elif result == "truncated":
        assert len(data) == int(len(good) * 0.6) and good.startswith(data)
    else:
        assert len(data) == len(good) and data != good and data[:8] == good[:8]


# --- the CDN --------------------------------------------------------------------------------


async def test_cdn_links_head_bad_sig_and_unknown(env, client):
    env.faults(delay_seconds=0.1, cdn_errors=[503])
    job = await client.submit(env.image(), 2, None)
    done, _ = await wait_for(client, job.id, "completed")
    assert (await download(done.image_url)).status_code == 503  # the injected error, consumed
    async with httpx.AsyncClient() as http:
        head = await http.head(done.image_url)
        assert head.status_code == 200 and int(head.headers["content-length"]) == len(reference_png(2))
        assert head.content == b""
        sig = parse_qs(urlsplit(done.image_url).query)["sig"][0]
        bad_sig = with_query(done.image_url, sig=("0" if sig[0] != "0" else "1") + sig[1:])
        assert (await http.get(bad_sig)).status_code == 403
        assert (await http.get(with_query(done.image_url, sig=""))).status_code == 403
        later = int(parse_qs(urlsplit(done.image_url).query)["exp"][0]) + 3600
        assert (await http.get(with_query(done.image_url, exp=str(later)))).status_code == 403  # exp is signed
        other_file = done.image_url.replace("result.png", "result.jpg")  # png's sig on the jpg
        assert (await http.get(other_file)).status_code == 403
        unknown = done.image_url.replace(job.id, uuid.uuid4().hex)
        assert (await http.get(unknown)).status_code == 404
        assert (await http.get(f"{env.url}/cdn/{job.id}/secret.txt")).status_code == 404
        assert (await http.get(done.image_url)).status_code == 200
    assert env.requests()["cdn"] == 9


async def test_cdn_link_expires(env, client):
    env.faults(delay_seconds=0.1, result_url_ttl_seconds=0.001)
    job = await client.submit(env.image(), 2, None)
    done, _ = await wait_for(client, job.id, "completed")
    expires = int(parse_qs(urlsplit(done.image_url).query)["exp"][0])
    await eventually(lambda: time.time() > expires, what="the link's expiry")
    response = await download(done.image_url)
    assert response.status_code == 403 and "expired" in response.json()["error"]


async def test_cdn_throttled_with_ranges(env, client):
    """`cdn_bytes_per_second` paces the file; Range still gets 206 with Content-Range, as unthrottled."""
    env.faults(delay_seconds=0.1)
    job = await client.submit(env.image(400, 300), 2, None)
    done, _ = await wait_for(client, job.id, "completed")
    async with httpx.AsyncClient() as http:
        whole = (await http.get(done.image_url)).content  # unthrottled: FileResponse
        size = len(whole)
        assert size > 200_000
        unthrottled = await http.get(done.image_url, headers={"Range": "bytes=1000-"})
        assert unthrottled.status_code == 206 and unthrottled.content == whole[1000:]

        rate = size / 0.5  # the whole file in about half a second
        assert env.faults(cdn_bytes_per_second=rate)["cdn_bytes_per_second"] == rate
        began = time.monotonic()
        full = await http.get(done.image_url)
        took = time.monotonic() - began
        assert full.status_code == 200 and full.content == whole and took >= 0.4
        assert full.headers["accept-ranges"] == "bytes" and int(full.headers["content-length"]) == size
        assert "content-range" not in full.headers

        start = size * 3 // 4
        began = time.monotonic()
        tail = await http.get(done.image_url, headers={"Range": f"bytes={start}-"})
        took = time.monotonic() - began
        assert tail.status_code == 206 and tail.content == whole[start:]
        assert tail.headers["content-range"] == f"bytes {start}-{size - 1}/{size}"
        assert tail.headers["accept-ranges"] == "bytes" and int(tail.headers["content-length"]) == size - start
        assert 0.08 <= took < 0.4  # a quarter of the file at the same pace

        middle = await http.get(done.image_url, headers={"Range": "bytes=100-1099"})
        assert middle.status_code == 206 and middle.content == whole[100:1100]
        assert middle.headers["content-range"] == f"bytes 100-1099/{size}"
        past_end = await http.get(done.image_url, headers={"Range": f"bytes=100-{size + 50}"})
        assert past_end.status_code == 206 and past_end.content == whole[100:]
        suffix = await http.get(done.image_url, headers={"Range": "bytes=-500"})
        assert suffix.status_code == 206 and suffix.content == whole[-500:]

        unsatisfiable = await http.get(done.image_url, headers={"Range": f"bytes={size}-"})
        assert unsatisfiable.status_code == 416 and unsatisfiable.headers["content-range"] == f"bytes */{size}"
        head = await http.head(done.image_url, headers={"Range": "bytes=10-"})
        assert head.status_code == 206 and head.content == b"" and int(head.headers["content-length"]) == size - 10
        assert (await http.get(with_query(done.image_url, sig=""))).status_code == 403  # checks still first
    counts = env.requests()
    assert counts["cdn"] == 10 and counts["cdn_range"] == 7


async def test_cdn_bytes_served_counted_per_request(env, client):
    """`/_emulator/cdn` lists each CDN request with its Range and the body bytes that went out, throttled
    or not; a client that leaves early counts only what was sent before (the crash tests bound what
    the CDN served twice with it)."""
    env.faults(delay_seconds=0.1)
    job = await client.submit(env.image(400, 300), 2, None)
    done, _ = await wait_for(client, job.id, "completed")
    async with httpx.AsyncClient() as http:
        size = len((await http.get(done.image_url)).content)  # unthrottled: FileResponse
        assert size > 200_000
        await http.get(done.image_url, headers={"Range": "bytes=1000-"})
        await http.head(done.image_url)
        env.faults(cdn_bytes_per_second=size)  # the whole file in about 1 s
        await http.get(done.image_url, headers={"Range": "bytes=100-1099"})
        async with http.stream("GET", done.image_url) as left_early:  # read one chunk, then hang up
            await left_early.aiter_raw().__anext__()
        await asyncio.sleep(1.5)  # longer than the whole file takes: had the server gone on, all of it is counted
    assert (await http_get_json(f"{env.url}/_emulator/cdn"))[:4] == [
        {"job_id": job.id, "name": "result.png", "method": "GET", "range": None, "bytes": size},
        {"job_id": job.id, "name": "result.png", "method": "GET", "range": "bytes=1000-", "bytes": size - 1000},
        {"job_id": job.id, "name": "result.png", "method": "HEAD", "range": None, "bytes": 0},
        {"job_id": job.id, "name": "result.png", "method": "GET", "range": "bytes=100-1099", "bytes": 1000},
    ]
    served = await http_get_json(f"{env.url}/_emulator/cdn")
    assert len(served) == 5 and served[4]["range"] is None
    assert 0 < served[4]["bytes"] < size // 2  # left early: far from the whole file went out
    # A request refused by the checks serves nothing and is not listed; reset empties the list.
    assert (await download(with_query(done.image_url, sig="0" * 64))).status_code == 403
    assert len(await http_get_json(f"{env.url}/_emulator/cdn")) == 5
    httpx.post(f"{env.url}/_emulator/reset").raise_for_status()
    assert await http_get_json(f"{env.url}/_emulator/cdn") == []


async def http_get_json(url: str):
    async with httpx.AsyncClient() as http:
        return (await http.get(url)).json()


async def test_public_base_url_and_storage_dir(tmp_path):
    port = free_port()
    app = create_app(
        api_key=KEY,
        public_base_url=f"http://127.0.0.1:{port}/",
        faults=Faults(delay_seconds=0.05),
        storage_dir=tmp_path,
    )
    with ServerThread(image_app()) as images, ServerThread(app, port=port) as server:
        client = UpsamplerClient(f"{server.url}/api/v1", KEY)
        try:
            job = await client.submit(f"{images.url}/img/{W}x{H}.png", 2, None)
            done, _ = await wait_for(client, job.id, "completed")
        finally:
            await client.aclose()
        assert done.image_url.startswith(f"http://127.0.0.1:{port}/cdn/{job.id}/result.png?exp=")
        assert (tmp_path / job.id / "result.png").read_bytes() == (await download(done.image_url)).content
        assert (tmp_path / job.id / "result.jpg").is_file()
        assert app.state.emulator.jobs[job.id].status == "SUCCESS"


# --- control endpoints ----------------------------------------------------------------------


async def test_control_endpoints_and_reset(env, client):
    assert httpx.get(f"{env.url}/_emulator/faults").json() == Faults().model_dump()
    settings = env.faults(delay_seconds=0.1, webhook="late", submit_errors=[503])
    assert settings["webhook"] == "late" and settings["submit_errors"] == [503]
    assert httpx.get(f"{env.url}/_emulator/faults").json() == settings
    assert httpx.put(f"{env.url}/_emulator/faults", json={"webhook": "sometimes"}).status_code == 422
    assert httpx.put(f"{env.url}/_emulator/faults", json={"no_such_fault": 1}).status_code == 422
    with pytest.raises(UpsamplerUnavailable):
        await client.submit(env.image(), 2, None)
    await client.submit(env.image(), 2, None)
    assert len(env.jobs()) == 1 and env.requests() == {
        "submit": 2,
        "status": 0,
        "cdn": 0,
        "cdn_range": 0,
        "rate_limited": 0,
    }
    assert isinstance(env.state.jobs, dict) and isinstance(env.state.faults, Faults)
    assert httpx.post(f"{env.url}/_emulator/reset").json() == {"reset": True}
    assert env.jobs() == [] and env.requests() == {
        "submit": 0,
        "status": 0,
        "cdn": 0,
        "cdn_range": 0,
        "rate_limited": 0,
    }
    assert httpx.get(f"{env.url}/_emulator/faults").json() == Faults().model_dump()


# --- client edge cases without a server (httpx.MockTransport) ---------------------------------


def mock_client(status: int, content: bytes = b"{}", headers: dict | None = None) -> UpsamplerClient:
    transport = httpx.MockTransport(lambda request: httpx.Response(status, headers=headers or {}, content=content))
    return UpsamplerClient("http://upsampler.test/api/v1", KEY, transport=transport)


@pytest.mark.parametrize(
    "status, content, error",
    [
        (500, b'["boom"]', UpsamplerUnavailable),  # JSON that is not an object
        (502, b'"bad gateway"', UpsamplerUnavailable),
        (503, b"<html>down</html>", UpsamplerUnavailable),
        (302, b"", UpsamplerUnavailable),
        (200, b"not json", UpsamplerUnavailable),
        (200, b'{"id": "a", "status": "DONE"}', UpsamplerUnavailable),
        (403, b"", UpsamplerUnauthorized),
        (422, b'{"message": "bad"}', UpsamplerInvalidInput),
    ],
)
async def test_client_maps_odd_replies_to_typed_errors(status, content, error):
    client = mock_client(status, content)
    try:
        with pytest.raises(error):
            await client.status("x")
    finally:
        await client.aclose()


@pytest.mark.parametrize(
    "value, expected",
    [
        ("12", 12.0),
        ("0.5", 0.5),
        ("-3", 0.0),
        ("soon", None),
        ("Sun, 06 Nov 1994 08:49:37 GMT", 0.0),
        ("Sun, 06 Nov 1994 08:49:37 -0000", 0.0),
    ],
)
async def test_client_reads_retry_after(value, expected):
    client = mock_client(429, headers={"Retry-After": value})
    try:
        with pytest.raises(UpsamplerRateLimited) as caught:
            await client.submit("http://x/y.png", 2, None)
    finally:
        await client.aclose()
    assert caught.value.retry_after == expected


async def test_client_reads_retry_after_as_a_future_date():
    from datetime import datetime, timedelta, timezone
    from email.utils import format_datetime

    when = format_datetime(datetime.now(timezone.utc) + timedelta(seconds=120), usegmt=True)
    client = mock_client(429, headers={"Retry-After": when})
    try:
        with pytest.raises(UpsamplerRateLimited) as caught:
            await client.status("x")
    finally:
        await client.aclose()
    assert 100 < caught.value.retry_after <= 120
