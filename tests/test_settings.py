"""Settings: secrets from files, Upsampler keys per mode, what production refuses to start without."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from smi.settings import Settings

PRODUCTION = dict(env="production", storefront_api_key="s", admin_api_key="a", webhook_secret="w")


def test_secrets_come_from_files(tmp_path, monkeypatch):
    (tmp_path / "admin").write_text("from-a-file\n")
    monkeypatch.setenv("SMI_ADMIN_API_KEY_FILE", str(tmp_path / "admin"))
    monkeypatch.setenv("SMI_UPSAMPLER_API_KEY_LIVE_FILE", str(tmp_path / "admin"))
    settings = Settings(env="dev")
    assert settings.secret("admin_api_key") == "from-a-file"
    assert "from-a-file" not in repr(settings) and "from-a-file" not in str(settings.model_dump())


def test_database_url_comes_from_a_file(tmp_path, monkeypatch):
    """The URL carries the database password: a Docker secret like the keys."""
    (tmp_path / "db").write_text("postgresql+psycopg://smi:pw@db/smi\n")
    monkeypatch.setenv("SMI_DATABASE_URL_FILE", str(tmp_path / "db"))
    assert Settings(env="dev").database_url == "postgresql+psycopg://smi:pw@db/smi"


def test_upsampler_key_follows_the_mode(monkeypatch):
    monkeypatch.setenv("SMI_UPSAMPLER_API_KEY_TEST", "test-key")
    monkeypatch.setenv("SMI_UPSAMPLER_API_KEY_LIVE", "live-key")
    assert Settings(env="dev", upsampler_mode="test").secret("upsampler_api_key") == "test-key"
    assert Settings(env="dev", upsampler_mode="live").secret("upsampler_api_key") == "live-key"
    assert (
        Settings(env="dev", upsampler_mode="live", upsampler_api_key="explicit").secret("upsampler_api_key")
        == "explicit"
    )
    with pytest.raises(ValidationError):
        Settings(env="dev", upsampler_mode="staging")


def test_production_refuses_to_start_without_its_keys():
    Settings(**PRODUCTION, upsampler_mode="live", upsampler_api_key_live="k")
    with pytest.raises(ValidationError, match="SMI_UPSAMPLER_API_KEY"):
        Settings(**PRODUCTION)
    with pytest.raises(ValidationError, match="SMI_REFUND_WEBHOOK_URL"):
        Settings(**PRODUCTION, upsampler_api_key="k", refund_adapter="webhook")
    only_list = {**PRODUCTION, "storefront_api_key": None, "storefront_api_keys": "k1,k2", "upsampler_api_key": "k"}
    assert Settings(**only_list).storefront_keys() == ["k1", "k2"]


def test_a_forgotten_smi_env_is_production(monkeypatch):
    """Dev (no keys required, the codec open to loopback) is an explicit opt-in, never the default."""
    monkeypatch.delenv("SMI_ENV", raising=False)
    with pytest.raises(ValidationError, match="must be set when SMI_ENV is not 'dev'"):
        Settings()
    assert Settings(**PRODUCTION, upsampler_api_key="k").env == "production"
