"""A local SMTP server (aiosmtpd) that keeps what it receives: `dev`'s outbox and the tests' inbox."""

from __future__ import annotations

import email
import email.policy
import logging
import re
import threading
from email.message import EmailMessage
from pathlib import Path

from aiosmtpd.controller import Controller

log = logging.getLogger("smi.mailsink")
LINK = re.compile(r"https?://\S+/downloads/\S+")


class _Handler:
    def __init__(self, sink: "MailSink"):
        self.sink = sink

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if address in self.sink.reject:  # tests: a mailbox that refuses mail
            return "550 mailbox unavailable"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):
        message = email.message_from_bytes(envelope.original_content or envelope.content, policy=email.policy.default)
        self.sink._keep(message, envelope.original_content or envelope.content)
        return "250 Message accepted"


class MailSink:
    def __init__(
        self, host: str = "127.0.0.1", port: int = 8025, outbox: Path | None = None, reject: set[str] | None = None
    ):
        self.outbox = outbox
        self.reject = reject or set()
        self.messages: list[EmailMessage] = []
        self._arrived = threading.Condition()
        self.controller = Controller(_Handler(self), hostname=host, port=port)

    @property
    def port(self) -> int:
        return self.controller.port

    def _keep(self, message: EmailMessage, raw: bytes) -> None:
        with self._arrived:
            self.messages.append(message)
            self._arrived.notify_all()
        if self.outbox is not None:
            self.outbox.mkdir(parents=True, exist_ok=True)
            (self.outbox / f"{len(self.messages):04d}.eml").write_bytes(raw)
        links = LINK.findall(text_of(message))
        log.info("mail received: %s %s", message["Subject"], links[0] if links else "")

    def wait_for(self, count: int, timeout: float = 30.0) -> list[EmailMessage]:
        with self._arrived:
            self._arrived.wait_for(lambda: len(self.messages) >= count, timeout=timeout)
            return list(self.messages)

    def start(self) -> "MailSink":
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()


def text_of(message: EmailMessage) -> str:
    part = message.get_body(preferencelist=("plain",))
    return part.get_content() if part is not None else ""
