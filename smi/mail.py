"""Emails: jinja2 templates (HTML with a plain-text part), sent over SMTP."""

from __future__ import annotations

import asyncio
import smtplib
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, StrictUndefined, select_autoescape

from smi.settings import Settings

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"

_env = Environment(
    loader=FileSystemLoader(TEMPLATES),
    autoescape=select_autoescape(["html"]),
    undefined=StrictUndefined,
    keep_trailing_newline=True,
)


def render(kind: str, **context) -> tuple[str, str, str]:
    """(subject, plain text, html) of templates/email/<kind>.*"""
    subject = _env.get_template(f"email/{kind}.subject.txt").render(**context).strip()
    text = _env.get_template(f"email/{kind}.txt").render(**context)
    html = _env.get_template(f"email/{kind}.html").render(**context)
    return subject, text, html


def build_message(settings: Settings, *, to: str, kind: str, message_id: str, **context) -> EmailMessage:
    subject, text, html = render(kind, support_email=settings.support_email, **context)
    message = EmailMessage()
    message["From"] = settings.mail_from
    message["To"] = to
    message["Subject"] = subject
    message["Date"] = formatdate(usegmt=True)
    # A stable Message-ID: if a crash makes us send twice, mail clients fold the copies.
    message["Message-ID"] = message_id
    message.set_content(text)
    message.add_alternative(html, subtype="html")
    return message


def _send_blocking(settings: Settings, message: EmailMessage) -> None:
    with smtplib.SMTP(settings.smtp_host, settings.smtp_port, timeout=30) as smtp:
        if settings.smtp_starttls:
            smtp.starttls()
        if settings.smtp_username:
            password = settings.smtp_password.get_secret_value() if settings.smtp_password else ""
            smtp.login(settings.smtp_username, password)
        smtp.send_message(message)


async def send(settings: Settings, message: EmailMessage) -> None:
    await asyncio.to_thread(_send_blocking, settings, message)
