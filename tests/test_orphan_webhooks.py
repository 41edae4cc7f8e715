"""Orphaned Upsampler submissions (issue 16), from the webhook's side: the signed webhook URL with a submit
intent's nonce, and what a webhook naming an Upsampler job that is no submission of its job does."""

from __future__ import annotations

import secrets
from urllib.parse import parse_qs, urlsplit

import pytest

from smi import signing
from tests.helpers import WEBHOOK_SECRET

JOB = "a" * 32


def _query(url: str) -> dict[str, str]:
    return {key: values[0] for key, values in parse_qs(urlsplit(url).query).items()}


def test_a_webhook_url_with_a_nonce_signs_the_nonce():
    nonce = secrets.token_hex(16)
    query = _query(signing.webhook_url("https://smi.example/", WEBHOOK_SECRET, JOB, nonce))
    assert list(query) == ["job", "n", "sig"] and query["job"] == JOB and query["n"] == nonce
    assert query["sig"] == signing.sign(WEBHOOK_SECRET, f"webhook:{JOB}:{nonce}")
    assert signing.verify_webhook(WEBHOOK_SECRET, JOB, query["sig"], nonce)
    assert signing.verify_webhook(["new-secret", WEBHOOK_SECRET], JOB, query["sig"], nonce)  # during a rotation
    assert not signing.verify_webhook(WEBHOOK_SECRET, JOB, query["sig"], secrets.token_hex(16))  # another nonce
    assert not signing.verify_webhook(WEBHOOK_SECRET, JOB, query["sig"])  # the nonce left out
    assert not signing.verify_webhook(WEBHOOK_SECRET, "b" * 32, query["sig"], nonce)  # another job


def test_webhook_urls_without_a_nonce_still_verify():
    url = signing.webhook_url("https://smi.example", WEBHOOK_SECRET, JOB)
    query = _query(url)
    assert url.startswith("https://smi.example/smi-webhook/upsampler/?") and list(query) == ["job", "sig"]
    assert query["sig"] == signing.sign(WEBHOOK_SECRET, f"webhook:{JOB}")  # what URLs handed out so far carry
    assert signing.verify_webhook(WEBHOOK_SECRET, JOB, query["sig"])
    assert signing.verify_webhook(WEBHOOK_SECRET, JOB, query["sig"], "")
    assert not signing.verify_webhook(WEBHOOK_SECRET, JOB, query["sig"], secrets.token_hex(16))  # a nonce added


@pytest.mark.parametrize("nonce", ["A" * 32, "a" * 31, "a" * 33, "g" * 32, " " + "a" * 31, "é" * 32, "0x" + "a" * 30])
def test_a_nonce_that_is_not_32_lowercase_hex_digits_is_refused(nonce):
    signature = signing.sign(WEBHOOK_SECRET, f"webhook:{JOB}:{nonce}")  # even signed by us
    assert not signing.verify_webhook(WEBHOOK_SECRET, JOB, signature, nonce)
    with pytest.raises(ValueError):
        signing.webhook_url("https://smi.example", WEBHOOK_SECRET, JOB, nonce)
