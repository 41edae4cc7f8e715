"""The FastAPI app: storefront, Upsampler webhook, downloads, health."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from sqlalchemy import text
from temporalio.client import Client

from api import (
    admin,
    admin_pages,
    analytics,
    checkout,
    codec,
    deps,
    embed,
    errors,
    files,
    guard,
    jobs,
    metrics,
    openapi,
    redact,
    status,
    webhook,
)
from api.models import Liveness, Readiness
from smi.db import make_engine
from smi.logs import JobIdFromRequest
from smi.migrations import migrate
from smi.settings import Settings, get_settings


def create_app(settings: Settings | None = None, temporal: Client | None = None) -> FastAPI:
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine = make_engine(settings.database_url)
        migrate(engine)  # the process's start: bring the schema to head (a cheap query when it is there)
        svc = app.state.services = deps.Services(settings, engine, temporal)
        svc.status_hub = status.StatusHub(svc)
        yield
        if svc.status_hub.task is not None:
            svc.status_hub.task.cancel()
        await app.state.services.http.aclose()
        app.state.services.engine.dispose()

    app = FastAPI(
        title="Upscale fulfillment service",
        version="0.1.0",
        description="Turns a paid order for a high-resolution image into that image in the customer's hands.",
        lifespan=lifespan,
        generate_unique_id_function=openapi.operation_id,  # readable operationIds: create_job, not create_job_v1_...
        # Named, not left to FastAPI's default: a reply is then checked against its response_model and
        # written by json.dumps, as before the models existed, not by pydantic's JSON writer (which
        # writes some numbers differently, 1e-6 for 1e-06).
        default_response_class=JSONResponse,
    )
    errors.install(app)
    openapi.install(app)
    redact.install()
    app.include_router(jobs.router)
    app.include_router(webhook.router)
    app.include_router(files.router)
    app.include_router(admin.router)
    app.include_router(metrics.router)
    app.include_router(codec.router)  # the Temporal UI's remote codec: encrypted payloads shown to admins
    app.include_router(status.router)  # the customer's status page
    app.include_router(admin_pages.router)  # the admin dashboard (browser)
    app.include_router(analytics.router)  # the sales funnel: POST /v1/funnel, GET /v1/admin/analytics
    app.include_router(checkout.router)  # a page's Buy button: quote, Stripe Checkout, Stripe's webhook
    app.include_router(embed.router)  # GET /embed.js: the "Buy hi-res" button for any web page

    @app.get("/healthz", response_model=Liveness, tags=["operators"], summary="Liveness")
    async def healthz() -> Liveness:
        return Liveness(status="ok")

    @app.get(
        "/readyz",
        response_model=Readiness,
        tags=["operators"],
        summary="Readiness: Temporal, the database and the storage reachable",
        responses=openapi.errors({503: ["not_ready"]}),
    )
    async def readyz(svc: deps.Services = Depends(deps.services)) -> Readiness | JSONResponse:
        checks = {}

        def ping_database() -> None:
            with svc.engine.connect() as connection:
                connection.execute(text("SELECT 1"))

        try:
            await run_in_threadpool(ping_database)  # not on the event loop: a slow database stalls no request
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"unreachable: {type(exc).__name__}"
        try:
            await run_in_threadpool(svc.storage.check)
            checks["storage"] = "ok"
        except Exception as exc:
            checks["storage"] = f"unreachable: {type(exc).__name__}"
        try:
            client = await svc.temporal_client()
            await client.service_client.check_health()
            checks["temporal"] = "ok"
        except Exception as exc:
            checks["temporal"] = f"unreachable: {type(exc).__name__}"
        ready = all(v == "ok" for v in checks.values())
        if not ready:
            return errors.error_response(503, "not_ready", "a dependency is unreachable", checks)
        return Readiness(status="ready", checks=checks)

    app.add_middleware(guard.RequestGuard, settings=settings)
    app.add_middleware(checkout.CheckoutCors, settings=settings)  # outside the guard: its refusals get CORS too
    app.add_middleware(JobIdFromRequest)  # outermost: a request naming a job has its job_id on every log line
    return app
