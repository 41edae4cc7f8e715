"""Encryption of everything the service hands to Temporal: a payload codec (AES-256-GCM).

Workflow and activity inputs and results, signals, queries and failure details pass through
it, so the Temporal server (and its database and backups) holds only ciphertext. The key is
`SMI_PAYLOAD_KEY`: the base64url form of 32 random bytes (padding optional), e.g. from
`python -c "import secrets; print(secrets.token_urlsafe(32))"`. Its id, `SMI_PAYLOAD_KEY_ID`,
is written in clear into each payload's metadata (`encryption-key-id`), so after a rotation
the old keys, listed as `id:key` in `SMI_PAYLOAD_KEYS_PREVIOUS`, still decrypt what they
encrypted; only the current key encrypts.

An encrypted payload is the original `Payload` message, serialized, sealed with a fresh
random 12-byte nonce: `data = nonce || ciphertext || tag`, the key id bound in as associated
data; its metadata is `encoding: binary/encrypted` and `encryption-key-id: <id>`. A payload
without that encoding (recorded before encryption was switched on) decodes to itself.

Without a key nothing is encrypted (`data_converter` returns Temporal's default converter).
The Temporal UI reads encrypted payloads through the API's codec endpoint (api/codec.py).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from temporalio.api.common.v1 import Payload
from temporalio.converter import DataConverter, PayloadCodec

ENCODING = b"binary/encrypted"
KEY_ID = "encryption-key-id"
NONCE_BYTES = 12


class PayloadKeyError(ValueError):
    """A payload key setting that cannot be used."""


class PayloadDecryptionError(ValueError):
    """An encrypted payload that none of our keys opens: unknown key id, or altered data."""


def parse_key(text: str, what: str = "SMI_PAYLOAD_KEY") -> bytes:
    """32 bytes from their base64url form (standard base64 and missing padding are accepted too)."""
    cleaned = text.strip().rstrip("=").replace("+", "-").replace("/", "_")
    try:
        key = base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError):
        raise PayloadKeyError(f"{what} is not base64url") from None
    if len(key) != 32:
        raise PayloadKeyError(f"{what} must be the base64url form of 32 bytes (AES-256), not {len(key)} bytes")
    return key


def _check_id(key_id: str, what: str) -> str:
    key_id = key_id.strip()
    if not key_id or any(c in key_id for c in ",: \t") or not key_id.isprintable():
        raise PayloadKeyError(f"{what} must be a non-empty id without ',', ':' or spaces")
    return key_id


def parse_previous(text: str) -> dict[str, bytes]:
    """`id:key,id:key` -> {id: key}."""
    keys: dict[str, bytes] = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        key_id, sep, key = entry.partition(":")
        if not sep:
            raise PayloadKeyError("SMI_PAYLOAD_KEYS_PREVIOUS entries are 'id:key'")
        key_id = _check_id(key_id, "a key id in SMI_PAYLOAD_KEYS_PREVIOUS")
        if key_id in keys:
            raise PayloadKeyError(f"key id {key_id!r} appears twice in SMI_PAYLOAD_KEYS_PREVIOUS")
        keys[key_id] = parse_key(key, f"the key {key_id!r} in SMI_PAYLOAD_KEYS_PREVIOUS")
    return keys


class EncryptionCodec(PayloadCodec):
    """Encrypts with the current key; decrypts with whichever key the payload's id names."""

    def __init__(self, key_id: str, key: bytes, previous: dict[str, bytes] | None = None):
        super().__init__()
        self.key_id = _check_id(key_id, "SMI_PAYLOAD_KEY_ID")
        previous = dict(previous or {})
        if self.key_id in previous:
            raise PayloadKeyError(f"key id {self.key_id!r} is both the current key's and a previous key's")
        self._ciphers = {self.key_id: AESGCM(key), **{i: AESGCM(k) for i, k in previous.items()}}

    @classmethod
    def from_keys(cls, key: str | None, key_id: str, previous: str | None) -> "EncryptionCodec | None":
        """From SMI_PAYLOAD_KEY, _KEY_ID and _KEYS_PREVIOUS as text; None when no key is set (encryption off)."""
        if key is None:
            if previous is not None:
                raise PayloadKeyError("SMI_PAYLOAD_KEYS_PREVIOUS is set but SMI_PAYLOAD_KEY is not")
            return None
        return cls(key_id, parse_key(key), parse_previous(previous) if previous else {})

    @property
    def key_ids(self) -> list[str]:
        return list(self._ciphers)

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.encrypt(p) for p in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.decrypt(p) for p in payloads]

    def encrypt(self, payload: Payload) -> Payload:
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[self.key_id].encrypt(nonce, payload.SerializeToString(), self.key_id.encode())
        return Payload(metadata={"encoding": ENCODING, KEY_ID: self.key_id.encode()}, data=nonce + sealed)

    def decrypt(self, payload: Payload) -> Payload:
        if payload.metadata.get("encoding") != ENCODING:
            return payload  # stored before encryption was switched on: passes through
        key_id = payload.metadata.get(KEY_ID, b"").decode(errors="replace")
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise PayloadDecryptionError(
                f"payload encrypted with key id {key_id!r}, which is neither SMI_PAYLOAD_KEY_ID nor in "
                "SMI_PAYLOAD_KEYS_PREVIOUS"
            )
        data = payload.data
        try:
            plain = cipher.decrypt(data[:NONCE_BYTES], data[NONCE_BYTES:], key_id.encode())
        except (InvalidTag, ValueError):  # ValueError: too short to hold a nonce
            raise PayloadDecryptionError(
                f"payload under key id {key_id!r} does not authenticate: "
                "altered, or the key is not the one it was encrypted with"
            ) from None
        return Payload.FromString(plain)


def data_converter(codec: EncryptionCodec | None) -> DataConverter:
    """Temporal's default converter, with the encryption codec when there is one (a payload key is
    set). Every Client the service connects (worker, API) must use it."""
    if codec is None:
        return DataConverter.default
    return dataclasses.replace(DataConverter.default, payload_codec=codec)
