"""Every setting of the service, read from the environment here and nowhere else."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, SettingsConfigDict

from smi.codec import EncryptionCodec
from smi.fetch import FetchPolicy, FetchRefused, host_of, parse

REAL_UPSAMPLER_URL = "https://upsampler.com/api/v1"
# Written by `smi dev` with the generated development keys; the environment wins over it.
DEV_ENV_FILE = Path("var/dev.env")


def parse_storage_url(url: str) -> tuple[str, str, str]:
    """SMI_STORAGE_URL: `local`, `s3://bucket/prefix` -> (scheme, bucket, prefix); a clear error for anything else."""
    if url in ("", "local"):
        return "local", "", ""
    parts = urlsplit(url)
    if parts.scheme != "s3" or not parts.netloc or parts.query or parts.fragment:
        raise ValueError("SMI_STORAGE_URL must be `local` or s3://bucket/prefix (the prefix is optional)")
    return "s3", parts.netloc, parts.path.strip("/")


@dataclass(frozen=True)
class PublishableKey:
    """A key of SMI_PUBLISHABLE_KEYS: the browser origins that may use it and the image hosts it may sell."""

    key: str
    origins: frozenset[str]
    image_hosts: tuple[str, ...]

    def sells_from(self, netloc: str) -> bool:
        netloc = netloc.lower()
        return any(netloc == h or (h.startswith(".") and netloc.endswith(h)) for h in self.image_hosts)


def parse_publishable_keys(value: str) -> dict[str, PublishableKey]:
    """`pk_a=https://a.example|https://b.example;img.example|.cdn.example,pk_b=...` -> {key: PublishableKey};
    a ValueError naming what is wrong with an entry."""
    keys: dict[str, PublishableKey] = {}
    for entry in filter(None, (item.strip() for item in value.split(","))):
        key, _, rest = entry.partition("=")
        origins, _, hosts = rest.partition(";")
        key = key.strip()
        if not re.fullmatch(r"pk_[A-Za-z0-9_]{8,200}", key):
            raise ValueError("SMI_PUBLISHABLE_KEYS: each key is pk_ and 8 or more of [A-Za-z0-9_]")
        origin_list = [o.strip().rstrip("/").lower() for o in origins.split("|") if o.strip()]
        host_list = [h.strip().lower() for h in hosts.split("|") if h.strip()]
        for origin in origin_list:
            if not re.fullmatch(r"https?://[a-z0-9.-]+(:[0-9]{1,5})?", origin):
                raise ValueError(f"SMI_PUBLISHABLE_KEYS: {origin!r} is not an origin like https://shop.example")
        for host in host_list:
            if not re.fullmatch(r"\.?[a-z0-9.-]+(:[0-9]{1,5})?", host):
                raise ValueError(f"SMI_PUBLISHABLE_KEYS: {host!r} is not an image host like img.example or .example")
        if not origin_list or not host_list:
            raise ValueError(f"SMI_PUBLISHABLE_KEYS: {key[:12]}... needs at least one origin and one image host")
        keys[key] = PublishableKey(key, frozenset(origin_list), tuple(host_list))
    return keys


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SMI_", extra="ignore")

    # "dev" (an explicit opt-in: `smi dev` writes it to var/dev.env) lets keys be missing and opens the
    # codec endpoint to loopback clients; anything else requires the keys. A forgotten SMI_ENV is production.
    env: str = "production"

    temporal_address: str = "127.0.0.1:7233"
    temporal_namespace: str = "default"
    temporal_ui_url: str = "http://127.0.0.1:8233"  # the admin dashboard links each job's workflow there
    task_queue: str = "upscale"
    # host:port of the worker's Prometheus endpoint (SDK and job metrics); empty: none. One per
    # process, so `smi dev` and the compose file set it; several workers on one host need one each.
    worker_metrics_address: str = ""
    # On SIGTERM/SIGINT a worker polls no more and gives running activities this long to finish;
    # then they are cancelled and, heartbeating, resumed by another worker (worker.py).
    worker_shutdown_seconds: float = Field(30.0, ge=0)

    database_url: str = "sqlite:///var/smi.db"
    storage_dir: Path = Path("var/storage")  # the files (local), or this process's scratch copies (s3)
    # Where the files live (smi/storage.py): `local` (SMI_STORAGE_DIR) or s3://bucket/prefix, an S3-compatible
    # store reached with the four SMI_S3_* settings (the endpoint empty: AWS's own for the region).
    storage_url: str = "local"
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None
    # s3: a download answers 303 to a presigned GET URL living this long (never past the link's expiry), signed
    # for SMI_DOWNLOAD_BASE_URL when set: the store's public address (or a proxy or CDN keeping the Host header).
    presigned_ttl_seconds: int = Field(300, gt=0, le=7 * 24 * 3600)
    download_base_url: str | None = None
    # local behind nginx: a download answers X-Accel-Redirect: <prefix>/<file under SMI_STORAGE_DIR>, and
    # nginx sends the file (an `internal` location aliased to the folder); empty: the API streams it.
    accel_redirect_prefix: str = ""
    public_base_url: str = "http://127.0.0.1:8000"
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    # Peers whose X-Forwarded-For uvicorn believes (addresses or CIDRs, comma-separated): the client address
    # (rate limits, connection caps, logs) is the forwarded one only when the immediate peer is one of
    # them. Empty, the default: no proxy is trusted, the peer is the client.
    trusted_proxies: str = ""

    upsampler_base_url: str = REAL_UPSAMPLER_URL
    upsampler_api_key: SecretStr | None = None  # wins over the per-mode keys below when set
    upsampler_mode: Literal["test", "live"] | None = None  # picks SMI_UPSAMPLER_API_KEY_TEST or _LIVE
    upsampler_api_key_test: SecretStr | None = None
    upsampler_api_key_live: SecretStr | None = None

    storefront_api_key: SecretStr | None = None
    storefront_api_keys: SecretStr | None = None  # comma-separated, valid beside the single key: rotation
    admin_api_key: SecretStr | None = None
    metrics_token: SecretStr | None = None  # Bearer for GET /metrics (revenue, cost); unset, only SMI_ENV=dev answers
    webhook_secret: SecretStr | None = None
    webhook_secret_previous: SecretStr | None = None  # still accepted while webhooks and links signed with it live

    # Encryption of Temporal payloads (smi/codec.py), off while no key is set; `smi dev` sets one.
    payload_key: SecretStr | None = None  # base64url of 32 random bytes (AES-256-GCM); the only key that encrypts
    payload_key_id: str = "k1"  # stored in clear in each payload, so the right key is found after a rotation
    payload_keys_previous: SecretStr | None = None  # "id:key,id:key": decrypt only, kept while their histories live
    # Browser origins of the Temporal UI allowed to call the API's codec endpoint (/codec, CORS).
    codec_cors_origins: str = "http://127.0.0.1:8233,http://localhost:8233"

    download_max_count: int | None = Field(None, gt=0)  # downloads per link (a Range request counts from byte 0)
    public_rate_limit_per_minute: int = Field(600, gt=0)  # per client address, on the public endpoints
    # Open long-lived connections per API process: per client address (an IPv6 client is its /64), and in all.
    downloads_per_client: int = Field(8, gt=0)  # download managers open a few ranges at once
    downloads_total: int = Field(256, gt=0)
    status_streams_per_client: int = Field(10, gt=0)  # the status page's event stream; over it, the page polls
    status_streams_total: int = Field(1000, gt=0)

    smtp_host: str = "127.0.0.1"
    smtp_port: int = 8025
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_starttls: bool = False
    mail_from: str = "Upscale <no-reply@localhost>"
    admin_email: str = "admin@localhost"
    support_email: str = "support@localhost"

    # Policy: read when a job starts and carried in its workflow input.
    download_ttl_hours: float = Field(24.0, gt=0)
    poll_initial_delay_seconds: float = Field(30.0, gt=0)
    poll_max_interval_seconds: float = Field(120.0, gt=0)
    processing_timeout_seconds: float = Field(900.0, gt=0)
    credit_price_usd: float = Field(0.04, ge=0)
    credits_per_megapixel: float = Field(0.25, ge=0)
    markup_percent: float = Field(500.0, ge=0)  # suggested price = cost x (1 + markup/100) ...
    min_price_usd: float = Field(0.50, ge=0)  # ... never below this (Stripe's minimum charge)

    # The fetch guard (smi/fetch.py): loopback and private hosts that may be fetched anyway,
    # the only hosts a result may come from, and the ports a fetched URL may use.
    fetch_allow_hosts: str = ""
    upsampler_result_hosts: str = "upsampler.com,.upsampler.com"
    fetch_allowed_ports: str = "80,443"

    refund_adapter: Literal["none", "webhook", "stripe"] = "none"
    refund_webhook_url: str | None = None
    stripe_api_key: SecretStr | None = None  # wins over the per-mode keys below when set
    stripe_api_base: str = "https://api.stripe.com"  # tests point it at a local server
    stripe_mode: Literal["test", "live"] | None = None  # picks SMI_STRIPE_SECRET_KEY_TEST or _LIVE
    stripe_secret_key_test: SecretStr | None = None
    stripe_secret_key_live: SecretStr | None = None

    # Selling from any web page (api/checkout.py): publishable keys, Stripe Checkout and its webhook.
    # SMI_PUBLISHABLE_KEYS: comma-separated entries `pk_...=<origins>;<image hosts>`, each list `|`-separated:
    #   pk_site1=https://blog.example|https://www.blog.example;blog.example|.cdn.example
    # An origin is scheme://host[:port] exactly as the browser sends it; an image host is host[:port], or
    # `.example.com` for every host under it. Not secret: the key is in the page, bound to where it may sell.
    publishable_keys: str = ""
    checkout_currency: str = Field("usd", pattern=r"^[a-zA-Z]{3}$")  # the quoted price's number, in this currency
    stripe_webhook_secret: SecretStr | None = None  # whsec_...: POST /stripe/webhook verifies Stripe-Signature
    stripe_webhook_secret_previous: SecretStr | None = None  # also accepted during a rotation
    checkout_rate_limit_per_minute: int = Field(20, gt=0)  # checkouts and quotes per client address
    checkout_key_rate_limit_per_minute: int = Field(600, gt=0)  # checkouts and quotes per publishable key
    # POST /v1/funnel (api/analytics.py): batches of at most 50 events per minute, per client address and per
    # publishable key over all clients (the cap on how far anyone can inflate a site's figures).
    funnel_batches_per_minute: int = Field(30, gt=0)
    funnel_key_batches_per_minute: int = Field(600, gt=0)

    # Signed job events POSTed to the shop (activities/shop_events.py, verified with smi/shop_webhooks.py). Unset
    # URL: no events. The URL passes the fetch guard's rules when sent (SMI_FETCH_ALLOW_HOSTS for private hosts).
    storefront_webhook_url: str | None = None
    storefront_webhook_secret: SecretStr | None = None  # required with the URL
    storefront_webhook_secret_previous: SecretStr | None = None  # also signs (a second v1=) during a rotation
    storefront_webhook_first_retry_seconds: float = Field(30.0, gt=0)  # then doubling, at most an hour apart

    upsampler_requests_per_minute: int = Field(60, gt=0)  # Upsampler's quota per key, all workers together
    upsampler_requests_per_hour: int = Field(1800, gt=0)
    daily_budget_usd: float | None = Field(None, gt=0)  # the admin is emailed at 80% and 100% of each
    monthly_budget_usd: float | None = Field(None, gt=0)
    budget_hard_stop: bool = False  # new jobs over a crossed budget wait in `queued` instead of spending

    upsampler_max_input_bytes: int = Field(20 * 1024 * 1024, gt=0)  # larger originals are compressed first
    max_input_bytes: int = 50 * 1024 * 1024
    max_result_bytes: int = 400 * 1024 * 1024
    original_url_ttl_seconds: int = 6 * 3600
    # Retention (workflows/retention.py): results and download tokens are deleted this long after the link expired.
    retention_grace_hours: float = Field(72.0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _secrets_from_files(cls, values: dict) -> dict:
        """`SMI_<SECRET>_FILE` (Docker secrets): the file's content, stripped, stands for `SMI_<SECRET>`;
        `SMI_DATABASE_URL_FILE` too."""
        for name in FILE_FIELDS:
            path = values.pop(f"{name}_file", None)
            if path and not values.get(name):
                values[name] = Path(path).read_text().strip()
        return values

    @field_validator("storage_url")
    @classmethod
    def _storage_url_known(cls, value: str) -> str:
        parse_storage_url(value)
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _proxies_are_addresses(cls, value: str) -> str:
        """uvicorn takes anything it cannot parse as a literal host name that no client address ever
        matches, so a typo (10.0.0.1/8, a name) would silently trust nothing: refused here, at start."""
        for entry in filter(None, (item.strip() for item in value.split(","))):
            try:
                ipaddress.ip_network(entry) if "/" in entry else ipaddress.ip_address(entry)
            except ValueError:
                raise ValueError(f"SMI_TRUSTED_PROXIES: {entry!r} is not an IP address or a network (CIDR)") from None
        return value

    def trusted_proxy_list(self) -> list[str]:
        """For uvicorn's forwarded_allow_ips (with proxy_headers=True); [] trusts no peer."""
        return [item.strip() for item in self.trusted_proxies.split(",") if item.strip()]

    @model_validator(mode="after")
    def _upsampler_key_for_mode(self) -> "Settings":
        if self.upsampler_api_key is None and self.upsampler_mode is not None:
            self.upsampler_api_key = getattr(self, f"upsampler_api_key_{self.upsampler_mode}")
        return self

    @model_validator(mode="after")
    def _stripe_key_for_mode(self) -> "Settings":
        if self.stripe_api_key is None and self.stripe_mode is not None:
            self.stripe_api_key = getattr(self, f"stripe_secret_key_{self.stripe_mode}")
        return self

    @field_validator("publishable_keys")
    @classmethod
    def _publishable_keys_parse(cls, value: str) -> str:
        parse_publishable_keys(value)
        return value

    def publishable_key_map(self) -> dict[str, PublishableKey]:
        return parse_publishable_keys(self.publishable_keys)

    def stripe_webhook_secrets(self) -> list[str]:
        """Stripe's signing secrets: the current one, then the previous one during a rotation."""
        return [s.get_secret_value() for s in (self.stripe_webhook_secret, self.stripe_webhook_secret_previous) if s]

    @model_validator(mode="after")
    def _payload_keys_usable(self) -> "Settings":
        """An empty key is no key (encryption off); a malformed one stops the process at start."""
        for name in ("payload_key", "payload_keys_previous"):
            value = getattr(self, name)
            if value is not None and not value.get_secret_value().strip():
                setattr(self, name, None)
        self.payload_codec()  # raises PayloadKeyError (a ValueError) naming the bad setting
        return self

    @model_validator(mode="after")
    def _keys_required_outside_dev(self) -> "Settings":
        if self.env != "dev":
            missing = [
                name for name in ("admin_api_key", "webhook_secret", "upsampler_api_key") if getattr(self, name) is None
            ]
            if not self.storefront_keys():
                missing.append("storefront_api_key")
            if self.refund_adapter == "webhook" and not self.refund_webhook_url:
                missing.append("refund_webhook_url")
            if self.refund_adapter == "stripe" and self.stripe_api_key is None:
                missing.append("stripe_api_key")
            if self.publishable_keys.strip() and self.stripe_api_key is None:
                missing.append("stripe_api_key")  # pages sell through Stripe Checkout (or SMI_STRIPE_MODE's key)
            if self.publishable_keys.strip() and self.stripe_webhook_secret is None:
                missing.append("stripe_webhook_secret")
            if missing:
                names = ", ".join("SMI_" + m.upper() for m in missing)
                raise ValueError(f"{names} must be set when SMI_ENV is not 'dev'")
        return self

    @model_validator(mode="after")
    def _storefront_webhook_usable(self) -> "Settings":
        """A shop URL needs its secret and must be an http(s) URL the fetch guard can read; whether its host
        is public is checked when an event is sent (DNS can change)."""
        if not self.storefront_webhook_url:
            self.storefront_webhook_url = None
            return self
        if self.storefront_webhook_secret is None or not self.storefront_webhook_secret.get_secret_value():
            raise ValueError("SMI_STOREFRONT_WEBHOOK_SECRET must be set when SMI_STOREFRONT_WEBHOOK_URL is")
        try:
            parsed = parse(self.storefront_webhook_url)
            if parsed.scheme not in ("http", "https"):
                raise FetchRefused("only http and https URLs are allowed")
            host_of(parsed)
        except FetchRefused as refused:
            raise ValueError(f"SMI_STOREFRONT_WEBHOOK_URL: {refused}") from None
        return self

    def storefront_webhook_secrets(self) -> list[str]:
        """The shop events' signing secrets: the current one, then the previous one during a rotation."""
        return [self.secret("storefront_webhook_secret")] + (
            [self.storefront_webhook_secret_previous.get_secret_value()]
            if self.storefront_webhook_secret_previous
            else []
        )

    def secret(self, name: str) -> str:
        value = getattr(self, name)
        if value is None:
            raise RuntimeError(f"SMI_{name.upper()} is not set; `smi dev` generates it in development")
        return value.get_secret_value()

    def payload_codec(self) -> EncryptionCodec | None:
        """The payload encryption these settings describe (smi/codec.py); None: off."""

        def text(value: SecretStr | None) -> str | None:
            return value.get_secret_value() if value is not None else None

        return EncryptionCodec.from_keys(text(self.payload_key), self.payload_key_id, text(self.payload_keys_previous))

    def storefront_keys(self) -> list[str]:
        keys = [self.storefront_api_key.get_secret_value()] if self.storefront_api_key else []
        if self.storefront_api_keys:
            keys += [k.strip() for k in self.storefront_api_keys.get_secret_value().split(",") if k.strip()]
        return keys

    def webhook_secrets(self) -> list[str]:
        """The signing secret first, then the previous one: both verify, only the first signs."""
        return [self.secret("webhook_secret")] + (
            [self.webhook_secret_previous.get_secret_value()] if self.webhook_secret_previous else []
        )

    @property
    def image_fetch_policy(self) -> FetchPolicy:
        """For the storefront's image_url (and uploads, on our own host when allow-listed)."""
        return FetchPolicy.parse(self.fetch_allow_hosts, None, self.fetch_allowed_ports)

    @property
    def result_fetch_policy(self) -> FetchPolicy:
        """For Upsampler's result URLs: only its hosts, and still no private addresses."""
        return FetchPolicy.parse(self.fetch_allow_hosts, self.upsampler_result_hosts, self.fetch_allowed_ports)

    @property
    def public_host(self) -> str:
        return urlsplit(self.public_base_url).netloc


SECRET_FIELDS = [
    name for name, info in Settings.model_fields.items() if info.annotation in (SecretStr | None, SecretStr)
]
# The database URL carries its password; the store's coordinates come with its keys.
FILE_FIELDS = SECRET_FIELDS + ["database_url", "storage_url", "s3_endpoint_url", "s3_region"]
for _name in FILE_FIELDS:  # declare SMI_<SECRET>_FILE beside each secret, so the environment source reads it
    Settings.model_fields[f"{_name}_file"] = FieldInfo(annotation=str | None, default=None)
Settings.model_rebuild(force=True)


@lru_cache
def get_settings() -> Settings:
    return Settings(_env_file=DEV_ENV_FILE if DEV_ENV_FILE.exists() else None)
