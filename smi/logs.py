"""Logging for every process: one JSON object per line when stderr is not a terminal, readable
text when it is.

A line about a job carries its `job_id`, taken from (first found):
- `extra={"job_id": ...}` on the call;
- Temporal's context: `activity.logger` and `workflow.logger` put `temporal_activity` /
  `temporal_workflow` on the record, whose workflow_id is `upscale-<job_id>`, `refund-<job_id>`
  or `resend-<job_id>-<request>`;
- the API request naming the job (`JobIdFromRequest` sets `current_job_id`).
Lines about no job (start-up, the retention schedule) simply have none.

No customer address is written: `MaskEmails` rewrites anything that looks like one, whatever
logger wrote it. It is a safety net; the code should not log addresses in the first place.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from datetime import datetime, timezone
from urllib.parse import parse_qs

current_job_id: ContextVar[str | None] = ContextVar("smi_job_id", default=None)

JOB_ID = r"[0-9a-f]{32}"  # what api/jobs.py issues; nothing else is taken for a job id
JOB_WORKFLOW = re.compile(rf"^(?:upscale|refund|resend)-({JOB_ID})(?:-|$)")
JOB_PATH = re.compile(rf"/(?:jobs|status)/({JOB_ID})(?:/|$)")
# Loose on purpose (also "%40", as in a URL): masking a non-address costs nothing, missing one leaks it.
EMAIL = re.compile(r"[A-Za-z0-9._%+-]+(?:@|%40)[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
MASK = "<email>"
CHATTY = ("mail.log", "httpx", "httpcore", "pyvips")


def mask(text: str) -> str:
    return EMAIL.sub(MASK, text)


def job_id_of(workflow_id: str | None) -> str | None:
    match = JOB_WORKFLOW.match(workflow_id or "")
    return match.group(1) if match else None


def context(record: logging.LogRecord) -> dict:
    """job_id, workflow_id, activity and attempt of the record, those that apply."""
    found: dict = {}
    temporal = getattr(record, "temporal_activity", None) or getattr(record, "temporal_workflow", None)
    if isinstance(temporal, Mapping):
        found["workflow_id"] = temporal.get("workflow_id")
        if temporal.get("activity_type"):
            found["activity"] = temporal["activity_type"]
            found["attempt"] = temporal.get("attempt")
    job_id = getattr(record, "job_id", None) or job_id_of(found.get("workflow_id")) or current_job_id.get()
    if job_id:
        found = {"job_id": str(job_id), **found}
    return {k: v for k, v in found.items() if v is not None}


class RewriteRecord(logging.Filter):
    """Rewrites the text of a record (message, arguments, traceback) with `rewrite`.

    Arguments keep their place and type unless their text changed, so other handlers (and
    formatters that unpack `args`, like uvicorn's access formatter) still work."""

    def __init__(self, rewrite: Callable[[str], str]):
        super().__init__()
        self.rewrite = rewrite

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = self._rewritten(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(self._rewritten(arg) for arg in record.args)
        elif isinstance(record.args, dict):
            record.args = {key: self._rewritten(arg) for key, arg in record.args.items()}
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.rewrite(record.exc_text)
        if record.stack_info:
            record.stack_info = self.rewrite(record.stack_info)
        return True

    def _rewritten(self, value):
        if value is None or isinstance(value, (int, float)):
            return value
        try:
            text = value if isinstance(value, str) else str(value)
        except Exception:  # a broken __str__: the formatter reports it as it would have
            return value
        rewritten = self.rewrite(text)
        return rewritten if rewritten != text or isinstance(value, str) else value


class MaskEmails(RewriteRecord):
    """Replaces e-mail addresses by `<email>`, whatever logger wrote them."""

    def __init__(self):
        super().__init__(mask)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": datetime.fromtimestamp(record.created, timezone.utc)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **context(record),
            "pid": record.process,
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            entry["exc"] = record.exc_text
        if record.stack_info:
            entry["stack"] = record.stack_info
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s%(tags)s")

    def format(self, record: logging.LogRecord) -> str:
        tags = " ".join(f"{k}={v}" for k, v in context(record).items() if k in ("job_id", "activity"))
        record.tags = f" [{tags}]" if tags else ""
        return super().format(record)


class SmiHandler(logging.StreamHandler):
    """Ours: what setup_logging replaces when it runs again."""


def make_handler(stream=None) -> logging.Handler:
    """A handler writing to `stream` (stderr): text on a terminal, JSON lines otherwise."""
    stream = stream or sys.stderr
    handler = SmiHandler(stream)
    isatty = getattr(stream, "isatty", None)
    handler.setFormatter(TextFormatter() if isatty and isatty() else JsonFormatter())
    handler.addFilter(MaskEmails())  # on the handler: it sees the records of every logger
    return handler


def setup_logging(level: int | str = logging.INFO, stream=None) -> None:
    """The process's logging: our handler on the root logger (replacing one set up before)."""
    import temporalio.activity
    import temporalio.workflow

    root = logging.getLogger()
    root.handlers = [h for h in root.handlers if not isinstance(h, SmiHandler)] + [make_handler(stream)]
    root.setLevel(level)
    for name in CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
    # Temporal appends its context as a dict to each message; our lines carry it as fields instead.
    temporalio.activity.logger.activity_info_on_message = False
    temporalio.workflow.logger.workflow_info_on_message = False


class JobIdFromRequest:
    """ASGI middleware: a request naming a job (`/v1/jobs/<id>`, `/v1/admin/jobs/<id>/...`,
    `/status/<id>`, the webhook's `?job=<id>`) has that job_id on its log lines, the access log's too."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        job_id = _job_in_request(scope) if scope["type"] == "http" else None
        if job_id is None:
            return await self.app(scope, receive, send)
        token = current_job_id.set(job_id)
        try:
            await self.app(scope, receive, send)
        finally:
            current_job_id.reset(token)


def _job_in_request(scope) -> str | None:
    match = JOB_PATH.search(scope.get("path", ""))
    if match:
        return match.group(1)
    job = parse_qs(scope.get("query_string", b"").decode("latin-1")).get("job", [""])[0]
    return job if re.fullmatch(JOB_ID, job) else None
