"""The sales funnel: per page URL and per image, how many buttons were shown, modals opened, checkouts
started, paid, delivered and refunded, and the revenue.

Two sources, joined when the funnel is asked for:

- `shown` and `opened` are counted by the pages themselves (POST /v1/funnel, batched; `shown` sampled by the
  script, which says how many it stands for in `count`) into funnel_counts, one row per UTC day, stage and
  (page, image) pair, added to by an upsert. No cookie, no address, no identifier of a visitor: a row is a
  number per URL pair.
- `checkout_started`, `paid`, `delivered`, `refunded` and the revenue are read by SQL from what the sale itself
  wrote: the checkout sessions (created, paid, with their page, image and job), the job each paid session
  started (status completed) and its refund row (status refunded). Nothing in the workflow counts; the
  funnel cannot drift from the record of the sales. A session's stages count on the UTC day it was created
  (a cohort: a payment the next morning still converts that day's click).

URLs are kept without query and fragment (they may carry a visitor's token, e-mail or search) and without
user info; the host is lower-cased.
"""

from __future__ import annotations

import csv
import hashlib
import io
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta, timezone
from typing import Any, Callable, Literal
from urllib.parse import urlsplit

from sqlalchemy import Select, Table, and_, case, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Engine
from sqlmodel import col

from smi.db import CheckoutSession, FunnelCount, Job, Refund
from smi.vocabulary import JobStatus

STAGES = ("shown", "opened", "checkout_started", "paid", "delivered", "refunded")
PAGE_STAGES = ("shown", "opened")  # what a page may post; the rest is read from the sales
PageStage = Literal["shown", "opened"]
MAX_EVENTS = 50  # per batch
MAX_COUNT = 100  # what one sampled `shown` event may stand for
MAX_URL = 2048


class FunnelRefused(ValueError):
    """An event the key may not count: status, code and a message saying what to fix."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


def stripped(url: str, what: str) -> str:
    """`url` as kept: http(s), host lower-cased, no user info, no query, no fragment; or FunnelRefused 422."""
    try:
        parts = urlsplit(url.strip())
        host, port = parts.hostname, parts.port  # port: ValueError when it is not a number
    except ValueError:
        host = port = None
        parts = None
    if parts is None or parts.scheme not in ("http", "https") or not host:
        raise FunnelRefused(422, "invalid_request", f"{what} must be an absolute http(s) URL")
    netloc = f"[{host}]" if ":" in host else host
    if port is not None and port != {"http": 80, "https": 443}[parts.scheme]:
        netloc += f":{port}"
    kept = f"{parts.scheme}://{netloc}{parts.path or '/'}"
    if len(kept) > MAX_URL:
        raise FunnelRefused(422, "invalid_request", f"{what} is longer than {MAX_URL} characters")
    return kept


def origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def netloc_of(url: str) -> str:
    """host[:port] of a stripped URL, as SMI_PUBLISHABLE_KEYS names image hosts."""
    return urlsplit(url).netloc


@dataclass(frozen=True)
class Event:
    stage: str
    page_url: str  # stripped
    image_url: str  # stripped
    count: int


def pair_sha256(page_url: str, image_url: str) -> str:
    return hashlib.sha256(f"{page_url}\n{image_url}".encode()).hexdigest()


def record(engine: Engine, day: date, events: list[Event]) -> int:
    """Adds the events to their day's counts in one transaction; how many events (not rows) were added."""
    table: Table = FunnelCount.__table__  # type: ignore[attr-defined]
    insert: Callable[[Table], postgresql.Insert | sqlite.Insert]
    insert = postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert
    merged: dict[tuple[str, str], dict[str, Any]] = {}
    for event in events:  # one row per key in the statement: an upsert may not touch a row twice
        key = (event.stage, pair_sha256(event.page_url, event.image_url))
        row = merged.setdefault(
            key,
            {
                "day": day,
                "stage": event.stage,
                "pair_sha256": key[1],
                "site": origin_of(event.page_url)[:255],
                "page_url": event.page_url,
                "image_url": event.image_url,
                "count": 0,
            },
        )
        row["count"] += event.count
    if not merged:
        return 0
    statement = insert(table)
    statement = statement.on_conflict_do_update(
        index_elements=[table.c.day, table.c.stage, table.c.pair_sha256],
        set_={"count": table.c["count"] + statement.excluded["count"]},
    )
    with engine.begin() as connection:
        connection.execute(statement, sorted(merged.values(), key=lambda r: (r["stage"], r["pair_sha256"])))
    return len(events)


@dataclass
class Row:
    """One page or one image over the period."""

    url: str
    shown: int = 0
    opened: int = 0
    checkout_started: int = 0
    paid: int = 0
    delivered: int = 0
    refunded: int = 0
    revenue_cents: int = 0
    conversion: float | None = None  # paid / opened; None when nothing was opened

    def add(self, counts: dict[str, int]) -> None:
        for name, number in counts.items():
            setattr(self, name, getattr(self, name) + number)

    def finish(self) -> Row:
        self.conversion = round(self.paid / self.opened, 4) if self.opened else None
        return self


@dataclass
class Report:
    first: date
    last: date  # inclusive
    pages: list[Row] = field(default_factory=list)
    images: list[Row] = field(default_factory=list)


def _bounds(first: date, last: date) -> tuple[datetime, datetime]:
    start = datetime(first.year, first.month, first.day, tzinfo=timezone.utc)
    end = datetime(last.year, last.month, last.day, tzinfo=timezone.utc) + timedelta(days=1)
    return start, end


def _page_counts(engine: Engine, first: date, last: date) -> list[tuple[str, str, dict[str, int]]]:
    table = FunnelCount.__table__  # type: ignore[attr-defined]
    query = (
        select(table.c.page_url, table.c.image_url, table.c.stage, func.sum(table.c["count"]))
        .where(and_(table.c.day >= first, table.c.day <= last))
        .group_by(table.c.page_url, table.c.image_url, table.c.stage)
    )
    with engine.connect() as connection:
        return [(page, image, {stage: int(total)}) for page, image, stage, total in connection.execute(query)]


def _sale_stages() -> tuple[Select, list[str]]:
    """The sale's stages from the checkout sessions (created when "Pay" is pressed, paid_at when Stripe said
    so, job_id the job it started), the job's status and its refund row; sessions made with the storefront
    key (no page) are no page's."""
    session, job, refund = CheckoutSession, Job, Refund
    paid = col(session.paid_at).is_not(None)
    columns = [
        func.count().label("checkout_started"),
        func.sum(case((paid, 1), else_=0)).label("paid"),
        func.sum(case((col(job.status) == JobStatus.COMPLETED, 1), else_=0)).label("delivered"),
        func.sum(case((col(refund.status) == "refunded", 1), else_=0)).label("refunded"),
        func.sum(case((paid, col(session.price_cents)), else_=0)).label("revenue_cents"),
    ]
    query = (
        select(col(session.page_url), col(session.image_url), *columns)
        .select_from(session)
        .outerjoin(job, col(job.job_id) == col(session.job_id))
        .outerjoin(refund, col(refund.job_id) == col(session.job_id))
        .where(col(session.page_url).is_not(None))
    )
    return query, [c.name for c in columns]


def _sales(engine: Engine, first: date, last: date) -> list[tuple[str, str, dict[str, int]]]:
    start, end = _bounds(first, last)
    query, names = _sale_stages()
    created = col(CheckoutSession.created_at)
    query = query.where(created >= start, created < end).group_by(
        col(CheckoutSession.page_url), col(CheckoutSession.image_url)
    )
    with engine.connect() as connection:
        rows = connection.execute(query).mappings().all()
    return [(_kept(row["page_url"]), _kept(row["image_url"]), {n: int(row[n] or 0) for n in names}) for row in rows]


def _kept(url: str) -> str:
    """A URL the sale recorded, as the funnel keeps it (so a session's page and image meet their counts)."""
    try:
        return stripped(url, "url")
    except FunnelRefused:
        return url[:MAX_URL]


def report(engine: Engine, first: date, last: date) -> Report:
    """The funnel of the UTC days first..last (inclusive): per page and per image, by revenue, then opened."""
    pages: dict[str, Row] = {}
    images: dict[str, Row] = {}
    for page, image, counts in _page_counts(engine, first, last) + _sales(engine, first, last):
        pages.setdefault(page, Row(page)).add(counts)
        images.setdefault(image, Row(image)).add(counts)

    def ranked(rows: dict[str, Row]) -> list[Row]:
        return sorted((r.finish() for r in rows.values()), key=lambda r: (-r.revenue_cents, -r.opened, r.url))

    return Report(first, last, ranked(pages), ranked(images))


COLUMNS = ["kind", "url", *STAGES, "revenue_cents", "conversion"]


def to_csv(result: Report) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for kind, rows in (("page", result.pages), ("image", result.images)):
        for row in rows:
            values = asdict(row)
            values["conversion"] = "" if row.conversion is None else row.conversion
            writer.writerow({"kind": kind, **values})
    return out.getvalue()


def totals_by_stage(engine: Engine) -> dict[str, int]:
    """Every stage's total over all time (the metrics): two aggregates, no row per URL."""
    table = FunnelCount.__table__  # type: ignore[attr-defined]
    totals = {stage: 0 for stage in STAGES}
    query, names = _sale_stages()
    with engine.connect() as connection:
        for stage, total in connection.execute(
            select(table.c.stage, func.sum(table.c["count"])).group_by(table.c.stage)
        ):
            totals[stage] = int(total or 0)
        sales = connection.execute(query.with_only_columns(*query.selected_columns[2:])).mappings().one()
    for name in names:
        if name in totals:
            totals[name] += int(sales[name] or 0)
    return totals
