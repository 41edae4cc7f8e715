"""Keeps credentials and addresses out of the access log: download tokens, signatures, and the
address in the erasure endpoint's path are masked in every record uvicorn writes."""

from __future__ import annotations

import logging
import re

from smi.logs import RewriteRecord

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


class RedactSensitive(RewriteRecord):
    def __init__(self):
        super().__init__(redact)


def install() -> None:
    access_log = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactSensitive) for f in access_log.filters):
        access_log.addFilter(RedactSensitive())
