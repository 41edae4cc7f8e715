"""An emulator of Upsampler's Precise Upscale API, with switchable faults.

It speaks the real wire format (as smi/upsampler.py does) under `/api/v1`, really upscales with
Pillow, serves the results from signed, expiring `/cdn/...` links and POSTs webhooks.
`/_emulator/*` (no auth) reads and changes the fault settings, lists jobs and request counts, and
resets everything.

Request-level faults (`submit_errors`, `status_errors`, `cdn_errors`) are read live and each
entry is consumed once; `cdn_bytes_per_second` is read live too, when a CDN request starts
(the file is then streamed at that pace, `Range` still honoured). Job-level faults (delays,
webhooks, results, failures, link lifetime) are copied into the job when it is submitted, so
changing them later does not affect it. `/_emulator/requests` counts `cdn_range`: CDN
requests that carried a `Range` header. `/_emulator/cdn` lists the CDN requests that passed the
checks, each with its `Range` header and the body bytes handed out (`bytes`, counted as they go:
a request the client leaves early counts what went out before). `/_emulator/timeline` gives each
job's wall-clock moments (`time.time()`: submitted, finished, webhook_sent just before the first webhook POST,
webhook_answered, cdn_first just as the first CDN request for its files arrives), for the
benchmarks (bench/webhook_latency.py).

Two submit faults cut the reply of a job Upsampler accepted (the job exists, runs, sends its
webhook and is charged like any other), each counted down once per accepted submit (a refused one
does not consume it): `drop_submit_replies` N sends the reply's status line and headers (with its
Content-Length) and part of the body, then closes the connection, so the client gets a transport
error (httpx: RemoteProtocolError); `hold_submit_replies` N sends nothing until the client closes
the connection (a test can SIGKILL the worker with the POST in flight), or until a reset, which
lets the reply go. Drop is consumed first when both are set.

The webhook mode `held` (job-level, so `faulty_jobs` limits it as any other) keeps each of the job's webhook
POSTs (the final one, and IN_PROGRESS with `webhook_on_progress`) instead of sending it, until
`POST /_emulator/webhooks/release`: that sends every webhook held so far, one after another in the order they
were held, and answers at once with how many went, `{"released": n}` (each job's `webhooks_sent` records the
deliveries as they happen). A test thereby orders a webhook after something it waits for, with no timing
involved. A reset drops the held webhooks unsent.

`/_emulator/charges` is the emulator's own record of credits charged, as Upsampler bills: a
job's `creditCost` is charged once, when it ends SUCCESS; a job refused at submit or ending
FAILED costs nothing (so does one never finishing). `{"jobs": {id: credits}, "total_credits": x}`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import io
import logging
import re
import secrets
import shutil
import tempfile
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import httpx
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationError

log = logging.getLogger("emulator")

MAX_OUTPUT_PIXELS = 50_000_000
CREDITS_PER_MEGAPIXEL_CENTS = 25  # 0.25 credits per output megapixel
RESULT_FILES = {"result.png": "image/png", "result.jpg": "image/jpeg"}
ErrorCode = Annotated[int, Field(ge=400, le=599)]


class Faults(BaseModel):
    model_config = ConfigDict(extra="forbid")

    delay_seconds: float = Field(0.2, ge=0)
    polls_until_done: int | None = Field(None, ge=1)
    never_finish: bool = False
    webhook: Literal["deliver", "drop", "duplicate", "late", "reorder", "held"] = "deliver"
    webhook_late_seconds: float = Field(1.0, ge=0)
    webhook_on_progress: bool = False
    submit_errors: list[ErrorCode] = []
    status_errors: list[ErrorCode] = []
    cdn_errors: list[ErrorCode] = []
    cdn_bytes_per_second: float | None = Field(None, gt=0)  # throttle result files to this rate (Range still works)
    retry_after_seconds: int | None = Field(None, ge=0)
    refuse_with: str | None = None
    fail_with: str | None = None
    result: Literal["ok", "wrong_size", "truncated", "corrupt"] = "ok"
    result_url_ttl_seconds: float = 10800
    max_input_bytes: int | None = Field(None, ge=1)  # larger inputs are refused at once, as "too large"
    faulty_jobs: int | None = Field(None, ge=0)  # job-level faults hit only the next N submissions
    rate_limit_per_minute: int | None = Field(None, ge=1)  # API requests over this in any 60 s answer 429
    submit_reply_delay_seconds: float = Field(0, ge=0)  # the job runs (and its webhook goes) before the reply
    drop_submit_replies: int = Field(0, ge=0)  # the next N accepted submits: connection closed mid-reply
    hold_submit_replies: int = Field(0, ge=0)  # the next N accepted submits: no reply until the client hangs up


class _Input(BaseModel):
    model_config = ConfigDict(extra="ignore")

    imageUrl: Annotated[str, Field(pattern=r"^https?://\S+$", max_length=4096)]
    upscaleFactor: Annotated[StrictInt, Field(ge=1, le=16)]
    inputImageType: Annotated[str, Field(min_length=1)]
    globalCreativity: float | None = None
    detail: float | None = None
    shouldEnhanceFaces: StrictBool | None = None
    shouldPreserveBlur: StrictBool | None = None


class _SubmitBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    input: _Input
    webhook: Annotated[str, Field(pattern=r"^https?://\S+$", max_length=4096)] | None = None


@dataclass
class Job:
    id: str
    image_url: str
    upscale_factor: int
    webhook: str | None
    base_url: str
    faults: Faults
    credit_cost: float | None = None
    width: int = 0  # output size
    height: int = 0
    status: str = "IN_QUEUE"
    error: str | None = None
    status_requests: int = 0
    webhooks_sent: list[dict] = field(default_factory=list)
    source: bytes | None = None
    outcome_error: str | None = None  # set by the upscale when it fails
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    timeline: dict[str, float] = field(default_factory=dict)  # moment -> time.time(), first occurrence only


def credit_cost(out_pixels: int) -> float:
    cents = -(-out_pixels * CREDITS_PER_MEGAPIXEL_CENTS // 1_000_000)  # ceil, in integers
    return max(1.0, cents / 100)


def _error(code: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=code, headers=headers)


def _first_error(exc: ValidationError) -> str:
    err = exc.errors()[0]
    where = ".".join(str(p) for p in err["loc"]) or "body"
    return f"invalid {where}: {err['msg']}"


_RANGE = re.compile(r"^\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*$")
THROTTLE_CHUNK = 64 * 1024


def _byte_range(header: str | None, size: int) -> tuple[int, int] | None | Literal[False]:
    """One `Range: bytes=N-`, `bytes=N-M` or `bytes=-K` as (first, last) inclusive.

    None: no usable single range, serve the whole file (a server may ignore Range). False:
    not satisfiable (416).
    """
    match = _RANGE.match(header or "")
    if not match or match.groups() == ("", ""):
        return None
    first, last = match.groups()
    if first == "":  # a suffix: the last K bytes
        if int(last) == 0 or size == 0:
            return False
        return max(0, size - int(last)), size - 1
    start = int(first)
    end = size - 1 if last == "" else min(int(last), size - 1)
    if start >= size or (last != "" and int(last) < start):
        return False
    return start, end


async def _paced(path: Path, start: int, length: int, rate: float):
    """`length` bytes of `path` from `start`, no faster than `rate` bytes per second."""
    chunk = max(1024, min(THROTTLE_CHUNK, int(rate / 10)))
    began = time.monotonic()
    sent = 0
    with open(path, "rb") as handle:
        handle.seek(start)
        while sent < length:
            data = handle.read(min(chunk, length - sent))
            if not data:
                break
            yield data
            sent += len(data)
            ahead = sent / rate - (time.monotonic() - began)
            if ahead > 0:
                await asyncio.sleep(ahead)


class _Counted(Response):
    """A response adding the body bytes it hands to the server to `served["bytes"]`."""

    served: dict

    async def __call__(self, scope, receive, send) -> None:
        async def counting(message) -> None:
            if message["type"] == "http.response.body":
                self.served["bytes"] += len(message.get("body", b""))
            await send(message)

        await super().__call__(scope, receive, counting)


class _CountedFile(_Counted, FileResponse):
    pass


class _CountedStream(_Counted, StreamingResponse):
    pass


class _CutReply(Response):
    """A reply cut short: its head (with the whole body's Content-Length) and half its body, then the
    app returns without finishing, and the server closes the connection (uvicorn logs one line about it)."""

    def __init__(self, whole: Response):
        super().__init__(bytes(whole.body), status_code=whole.status_code, media_type="application/json")

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        await send({"type": "http.response.body", "body": self.body[: len(self.body) // 2], "more_body": True})


def _throttled_file(
    path: Path, media_type: str, rate: float, range_header: str | None, head: bool, served: dict
) -> Response:
    """What FileResponse does for one range, but streamed at `rate` bytes per second (counted in `served`)."""
    size = path.stat().st_size
    headers = {"Accept-Ranges": "bytes"}
    span = _byte_range(range_header, size)
    if span is False:
        return Response(status_code=416, headers=headers | {"Content-Range": f"bytes */{size}"})
    status, (first, last) = (200, (0, size - 1)) if span is None else (206, span)
    length = last - first + 1 if size else 0
    headers["Content-Length"] = str(length)
    if status == 206:
        headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    if head:
        return Response(status_code=status, headers=headers, media_type=media_type)
    response = _CountedStream(
        _paced(path, first, length, rate), status_code=status, headers=headers, media_type=media_type
    )
    response.served = served
    return response


def _render(source: bytes, size: tuple[int, int], result: str, out_dir: Path) -> None:
    """CPU work (run in a thread): upscale, write result.png and result.jpg, apply result faults."""
    with Image.open(io.BytesIO(source)) as opened:
        im: Image.Image = opened
        if im.mode in ("P", "1"):
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        elif im.mode not in ("L", "LA", "RGB", "RGBA", "I", "I;16"):
            im = im.convert("RGB")
        big = im.resize(size, Image.Resampling.LANCZOS)
    out_dir.mkdir(parents=True, exist_ok=True)
    png, jpg = io.BytesIO(), io.BytesIO()
    big.save(png, "PNG")
    big.convert("L" if big.mode in ("L", "I", "I;16") else "RGB").save(jpg, "JPEG", quality=85)
    for name, data in (("result.png", png.getvalue()), ("result.jpg", jpg.getvalue())):
        if result == "truncated":
            data = data[: int(len(data) * 0.6)]
        elif result == "corrupt":
            n, mid = max(1, min(64, len(data) // 4)), len(data) // 2
            data = data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + n]) + data[mid + n :]
        (out_dir / name).write_bytes(data)


class Emulator:
    def __init__(self, api_key: str, public_base_url: str | None, faults: Faults | None, storage_dir: Path):
        self._api_key = api_key
        self.public_base_url = public_base_url.rstrip("/") if public_base_url else None
        self.faults = faults or Faults()
        self.storage_dir = storage_dir
        self.jobs: dict[str, Job] = {}
        self.requests = {"submit": 0, "status": 0, "cdn": 0, "cdn_range": 0, "rate_limited": 0}
        self.cdn_served: list[dict] = []  # each CDN request that passed the checks: its Range, the bytes sent
        self.recent: deque[float] = deque()
        self.charges: dict[str, float] = {}  # Upsampler id -> credits charged (at SUCCESS)
        self.release_held = asyncio.Event()  # set by reset: held submit replies go out
        self.held_webhooks: list[tuple[Job, dict]] = []  # webhook "held": each POST, until a release
        self._sign_key = secrets.token_bytes(32)
        self._tasks: set[asyncio.Task] = set()
        self._http: httpx.AsyncClient | None = None

    def http(self) -> httpx.AsyncClient:
        """One client for the webhooks and image fetches (a new client per request costs an SSL context).

        No keep-alive: each request opens its own connection, as a fresh client did, so a
        connection the other side closed while idle is never reused.
        """
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=30.0, limits=httpx.Limits(max_keepalive_connections=0))
        return self._http

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._http is not None:
            await self._http.aclose()

    # --- helpers -------------------------------------------------------------------------
    def authorized(self, request: Request) -> bool:
        given = request.headers.get("authorization", "")
        return hmac.compare_digest(given.encode(), f"Bearer {self._api_key}".encode())

    def refusal(self, request: Request, errors: list[int]) -> JSONResponse | None:
        """What an API request is answered instead, if anything: a wrong key, the rate limit, an injected error."""
        if not self.authorized(request):
            return _error(401, "invalid or missing API key")
        return self.over_rate_limit() or self.injected_error(errors)

    def injected_error(self, queue: list[int]) -> JSONResponse | None:
        if not queue:
            return None
        code = queue.pop(0)
        headers = None
        if code == 429 and self.faults.retry_after_seconds is not None:
            headers = {"Retry-After": str(self.faults.retry_after_seconds)}
        log.info("emulator: injected HTTP %s", code)
        return _error(code, f"emulated error {code}", headers)

    def over_rate_limit(self) -> JSONResponse | None:
        """Upsampler's per-key quota: a sliding minute of accepted API requests."""
        limit = self.faults.rate_limit_per_minute
        if limit is None:
            return None
        now = time.monotonic()
        while self.recent and self.recent[0] <= now - 60:
            self.recent.popleft()
        if len(self.recent) >= limit:
            self.requests["rate_limited"] += 1
            wait = max(1, int(self.recent[0] + 60 - now) + 1)
            return _error(429, "rate limit exceeded", {"Retry-After": str(wait)})
        self.recent.append(now)
        return None

    def sign(self, job_id: str, name: str, exp: int) -> str:
        return hmac.new(self._sign_key, f"{job_id}/{name}:{exp}".encode(), hashlib.sha256).hexdigest()

    def link(self, job: Job, name: str) -> str:
        exp = int(time.time() + job.faults.result_url_ttl_seconds)
        return f"{job.base_url}/cdn/{job.id}/{name}?exp={exp}&sig={self.sign(job.id, name, exp)}"

    def wire(self, job: Job, status: str | None = None) -> dict:
        status = status or job.status
        body: dict[str, Any] = {"id": job.id, "status": status}
        if job.credit_cost is not None:
            body["creditCost"] = job.credit_cost
        if status == "SUCCESS":
            body["imageUrl"] = self.link(job, "result.png")
            body["compressedImageUrl"] = self.link(job, "result.jpg")
        if status == "FAILED" and job.error:
            body["error"] = job.error
        return body

    def spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def reset(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for job_id in self.jobs:
            shutil.rmtree(self.storage_dir / job_id, ignore_errors=True)
        self.jobs.clear()
        self.requests = {"submit": 0, "status": 0, "cdn": 0, "cdn_range": 0, "rate_limited": 0}
        self.cdn_served = []
        self.recent = deque()
        self.charges = {}
        self.faults = Faults()
        self.held_webhooks = []
        self.release_held.set()
        self.release_held = asyncio.Event()

    async def hold_reply(self, request: Request) -> None:
        """Until the client closes the connection (or a reset): a submit reply held back."""

        async def hung_up() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        waits = [asyncio.ensure_future(hung_up()), asyncio.ensure_future(self.release_held.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiting in waits:
                waiting.cancel()

    # --- job life ------------------------------------------------------------------------
    def next_job_faults(self) -> Faults:
        """The job-level faults a new job takes: the current ones, or none once `faulty_jobs` ran out."""
        faults = self.faults.model_copy(deep=True)
        remaining = self.faults.faulty_jobs
        if remaining is not None:
            if remaining == 0:
                faults = Faults()
            self.faults.faulty_jobs = max(0, remaining - 1)
        return faults

    async def take(self, job: Job) -> JSONResponse:
        """Fetch and check a submitted job's image, then start it; or refuse it as Upsampler does (a FAILED
        job, or 400 for an output over the pixel limit)."""
        if job.faults.refuse_with:
            return self.refuse(job, job.faults.refuse_with)
        data, fetch_error = await _fetch_image(self.http(), job.image_url)
        if data is None:
            return self.refuse(job, fetch_error or "could not fetch image")
        if job.faults.max_input_bytes is not None and len(data) > job.faults.max_input_bytes:
            return self.refuse(
                job, f"input image too large: {len(data)} bytes, the limit is {job.faults.max_input_bytes}"
            )
        size = await asyncio.to_thread(_image_size, data)
        if size is None:
            return self.refuse(job, "unsupported image format")
        job.width, job.height = size[0] * job.upscale_factor, size[1] * job.upscale_factor
        if job.width * job.height > MAX_OUTPUT_PIXELS:
            return _error(400, f"output would exceed {MAX_OUTPUT_PIXELS} pixels")
        if not await asyncio.to_thread(_decodes, data):
            return self.refuse(job, "unsupported image format")
        return await self.start(job, data)

    def refuse(self, job: Job, error: str) -> JSONResponse:
        job.status, job.error = "FAILED", error
        job.ready.set()
        self.jobs[job.id] = job
        return JSONResponse(self.wire(job))

    async def start(self, job: Job, source: bytes) -> JSONResponse:
        job.source = source
        job.credit_cost = credit_cost(job.width * job.height)
        self.jobs[job.id] = job
        if job.faults.polls_until_done is None:
            self.spawn(self.run_timed(job))
        else:
            self.spawn(self.produce(job))
        reply = self.wire(job)
        await asyncio.sleep(job.faults.submit_reply_delay_seconds)  # the reply travels slowly; the job goes on
        return JSONResponse(reply)

    async def produce(self, job: Job) -> None:
        """Make the result files (unless the job is meant to fail) and set `job.ready`."""
        try:
            if not job.faults.fail_with and job.source is not None:
                width = job.width - 1 if job.faults.result == "wrong_size" else job.width
                await asyncio.to_thread(
                    _render, job.source, (width, job.height), job.faults.result, self.storage_dir / job.id
                )
        except Exception as exc:  # noqa: BLE001 - an emulated processing failure
            log.warning("emulator: job %s: upscale failed: %s", job.id, exc)
            job.outcome_error = "processing error"
        finally:
            job.source = None
            job.ready.set()

    def enter_progress(self, job: Job) -> None:
        job.status = "IN_PROGRESS"
        log.info("emulator: job %s IN_PROGRESS", job.id)
        if job.faults.webhook_on_progress and job.faults.webhook not in ("drop", "reorder"):
            self.send_webhooks(job, [self.wire(job)])

    def finish(self, job: Job) -> None:
        error = job.faults.fail_with or job.outcome_error
        job.status, job.error = ("FAILED", error) if error else ("SUCCESS", None)
        if job.status == "SUCCESS" and job.credit_cost is not None:
            self.charges.setdefault(job.id, job.credit_cost)  # charged once, whatever comes after
        job.timeline.setdefault("finished", time.time())
        log.info("emulator: job %s %s", job.id, job.status)
        mode = job.faults.webhook
        if mode == "drop":
            return
        final = self.wire(job)
        bodies = {"duplicate": [final, final], "reorder": [final, self.wire(job, "IN_PROGRESS")]}.get(mode, [final])
        delay = job.faults.webhook_late_seconds if mode == "late" else 0.0
        self.send_webhooks(job, bodies, delay)

    async def run_timed(self, job: Job) -> None:
        half = job.faults.delay_seconds / 2
        await asyncio.sleep(half)
        self.enter_progress(job)
        if job.faults.never_finish:
            return
        await asyncio.gather(self.produce(job), asyncio.sleep(half))
        self.finish(job)

    def send_webhooks(self, job: Job, bodies: list[dict], delay: float = 0.0) -> None:
        """POST the job's webhooks (in a task), or keep them for a release if its webhook mode is `held`."""
        if job.faults.webhook != "held":
            self.spawn(self.post_webhooks(job, bodies, delay))
        elif job.webhook:
            self.held_webhooks.extend((job, body) for body in bodies)
            log.info("emulator: job %s: %d webhook(s) held", job.id, len(bodies))

    def release_webhooks(self) -> int:
        """Send every held webhook, in the order they were held (in a task); how many there were."""
        held, self.held_webhooks = self.held_webhooks, []
        if held:
            self.spawn(self.post_released(held))
        log.info("emulator: %d held webhook(s) released", len(held))
        return len(held)

    async def post_released(self, held: list[tuple[Job, dict]]) -> None:
        for job, body in held:
            await self.post_webhooks(job, [body])

    async def post_webhooks(self, job: Job, bodies: list[dict], delay: float = 0.0) -> None:
        if not job.webhook:
            return
        if delay:
            await asyncio.sleep(delay)
        http = self.http()
        for body in bodies:
            try:
                job.timeline.setdefault("webhook_sent", time.time())
                response = await http.post(job.webhook, json=body, timeout=10.0)
                job.timeline.setdefault("webhook_answered", time.time())
                outcome: int | str = response.status_code
            except httpx.HTTPError as exc:
                outcome = f"{type(exc).__name__}: {exc}"[:200]
                log.warning("emulator: webhook for job %s failed: %s", job.id, outcome)
            job.webhooks_sent.append({"status": body["status"], "code_or_error": outcome})


async def _fetch_image(http: httpx.AsyncClient, url: str) -> tuple[bytes | None, str | None]:
    try:
        response = await http.get(url, follow_redirects=True)
        response.raise_for_status()
        return response.content, None
    except httpx.HTTPError as exc:
        log.info("emulator: could not fetch %s: %s", url, type(exc).__name__)
        return None, "could not fetch image"


def _image_size(data: bytes) -> tuple[int, int] | None:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.size
    except Exception:  # noqa: BLE001 - anything Pillow cannot open
        return None


def _decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
        return True
    except Exception:  # noqa: BLE001
        return False


def create_app(
    api_key: str, public_base_url: str | None = None, faults: Faults | None = None, storage_dir: Path | None = None
) -> FastAPI:
    storage = Path(storage_dir) if storage_dir else Path(tempfile.mkdtemp(prefix="upsampler-emulator-"))
    storage.mkdir(parents=True, exist_ok=True)
    emu = Emulator(api_key, public_base_url, faults, storage)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await emu.close()

    app = FastAPI(title="Upsampler emulator", lifespan=lifespan)
    app.state.emulator = emu
    app.include_router(router)
    return app


def _emulator(request: Request) -> Emulator:
    return request.app.state.emulator


Emu = Annotated[Emulator, Depends(_emulator)]
router = APIRouter()


@router.post("/api/v1/precise-upscale")
async def submit(request: Request, emu: Emu) -> Response:
    emu.requests["submit"] += 1
    if refused := emu.refusal(request, emu.faults.submit_errors):
        return refused
    try:
        body = _SubmitBody.model_validate(await request.json())
    except ValueError as exc:  # bad JSON or a ValidationError
        return _error(400, _first_error(exc) if isinstance(exc, ValidationError) else "body is not valid JSON")
    inp = body.input
    job = Job(
        id=uuid.uuid4().hex,
        image_url=inp.imageUrl,
        upscale_factor=inp.upscaleFactor,
        webhook=body.webhook,
        base_url=emu.public_base_url or str(request.base_url).rstrip("/"),
        faults=emu.next_job_faults(),
    )
    job.timeline["submitted"] = time.time()
    log.info("emulator: submit %s x%s -> job %s", inp.imageUrl, inp.upscaleFactor, job.id)
    reply = await emu.take(job)
    if job.credit_cost is None:  # refused: only an accepted job's reply is cut or held
        return reply
    if emu.faults.drop_submit_replies:
        emu.faults.drop_submit_replies -= 1
        log.info("emulator: job %s accepted, its reply dropped mid-way", job.id)
        return _CutReply(reply)
    if emu.faults.hold_submit_replies:
        emu.faults.hold_submit_replies -= 1
        log.info("emulator: job %s accepted, its reply held until the client hangs up", job.id)
        await emu.hold_reply(request)
    return reply


@router.get("/api/v1/status/{job_id}")
async def status(job_id: str, request: Request, emu: Emu) -> Response:
    emu.requests["status"] += 1
    if refused := emu.refusal(request, emu.faults.status_errors):
        return refused
    job = emu.jobs.get(job_id)
    if job is None:
        return _error(404, "job not found")
    job.status_requests += 1
    polls = job.faults.polls_until_done
    if polls is not None and job.status in ("IN_QUEUE", "IN_PROGRESS"):
        if job.status == "IN_QUEUE":
            emu.enter_progress(job)
        if not job.faults.never_finish and job.status_requests >= polls:
            await job.ready.wait()
            if job.status == "IN_PROGRESS":  # a concurrent poll may have finished it
                emu.finish(job)
    return JSONResponse(emu.wire(job))


@router.api_route("/cdn/{job_id}/{name}", methods=["GET", "HEAD"])
async def cdn(request: Request, job_id: str, name: str, emu: Emu, exp: str = "", sig: str = "") -> Response:
    emu.requests["cdn"] += 1
    if job_id in emu.jobs:
        emu.jobs[job_id].timeline.setdefault("cdn_first", time.time())
    if "range" in request.headers:  # a resumed download asks for the rest with `Range: bytes=N-`
        emu.requests["cdn_range"] += 1
    if injected := emu.injected_error(emu.faults.cdn_errors):
        return injected
    path = emu.storage_dir / job_id / name
    if job_id not in emu.jobs or name not in RESULT_FILES or not path.is_file():
        return _error(404, "no such file")
    if not exp.isdigit() or not hmac.compare_digest(sig.encode(), emu.sign(job_id, name, int(exp)).encode()):
        return _error(403, "bad signature")
    if time.time() > int(exp):
        return _error(403, "link expired")
    served: dict[str, Any] = {
        "job_id": job_id,
        "name": name,
        "method": request.method,
        "range": request.headers.get("range"),
        "bytes": 0,
    }
    emu.cdn_served.append(served)
    rate = emu.faults.cdn_bytes_per_second
    if rate is not None:
        head = request.method == "HEAD"
        return _throttled_file(path, RESULT_FILES[name], rate, request.headers.get("range"), head, served)
    response = _CountedFile(path, media_type=RESULT_FILES[name])
    response.served = served
    return response


@router.get("/_emulator/faults")
async def get_faults(emu: Emu) -> Faults:
    return emu.faults


@router.put("/_emulator/faults")
async def put_faults(new: Faults, emu: Emu) -> Faults:
    emu.faults = new
    log.info("emulator: faults now %s", new.model_dump(exclude_defaults=True))
    return emu.faults


@router.get("/_emulator/jobs")
async def list_jobs(emu: Emu) -> list[dict]:
    return [
        {
            "id": j.id,
            "status": j.status,
            "imageUrl": j.image_url,
            "upscaleFactor": j.upscale_factor,
            "webhook": j.webhook,
            "creditCost": j.credit_cost,
            "status_requests": j.status_requests,
            "webhooks_sent": list(j.webhooks_sent),
            "width": j.width,
            "height": j.height,
            "error": j.error,
        }
        for j in emu.jobs.values()
    ]


@router.get("/_emulator/timeline")
async def timeline(emu: Emu) -> dict[str, dict[str, float]]:
    return {j.id: dict(j.timeline) for j in emu.jobs.values()}


@router.get("/_emulator/cdn")
async def cdn_served(emu: Emu) -> list[dict]:
    return [dict(served) for served in emu.cdn_served]


@router.get("/_emulator/charges")
async def charges(emu: Emu) -> dict:
    """What Upsampler would bill: each job that ended SUCCESS, its creditCost once."""
    return {"jobs": dict(emu.charges), "total_credits": round(sum(emu.charges.values()), 6)}


@router.get("/_emulator/requests")
async def request_counts(emu: Emu) -> dict:
    return dict(emu.requests)


@router.post("/_emulator/webhooks/release")
async def release_webhooks(emu: Emu) -> dict:
    """Send the webhooks held by the `held` webhook mode, in order: `{"released": n}`, answered at once."""
    return {"released": emu.release_webhooks()}


@router.post("/_emulator/reset")
async def reset(emu: Emu) -> dict:
    emu.reset()
    return {"reset": True}
