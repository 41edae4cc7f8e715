"""Keeps credentials and addresses out of the access log: download tokens, signatures, and the
address in the erasure endpoint's path are masked in every record uvicorn writes."""

from __future__ import annotations

import logging
import re

SENSITIVE = [
    (re.compile(r"(/v1/admin/customers/)[^\s?\"]*"), r"\1<redacted>"),  # a customer's e-mail address
    (re.compile(r"(/downloads/)[^\s?\"]*"), r"\1<redacted>"),  # a download token is a bearer credential
    (re.compile(r"([?&]sig=)[^&\s\"]*"), r"\1<redacted>"),  # signatures of webhook and file URLs
    (re.compile(r"([?&]v=)[^&\s\"]*"), r"\1<redacted>"),  # a status page's view token leads to the download
]


def redact(text: str) -> str:
    for pattern, replacement in SENSITIVE:
        text = pattern.sub(replacement, text)
    return text


class RedactSensitive(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(redact(a) if isinstance(a, str) else a for a in record.args)
        return True


def install() -> None:
    access_log = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactSensitive) for f in access_log.filters):
        access_log.addFilter(RedactSensitive())
