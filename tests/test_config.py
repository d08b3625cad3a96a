"""Settings: where the database URL comes from, what is required, what is
rejected (one line naming the setting) and that passwords never leak."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from adaccounts_server.config import (
    DEVELOPMENT_PAGE_TOKEN_SECRET,
    EMBEDDED_DATABASE_URL,
    Settings,
    SettingsError,
    load_settings,
)
from helpers.settings import without_settings
from pydantic import ValidationError

SECRET = "page-token-secret-0123456789"
PASSWORD = "Sup3rS3cretPassw0rd"


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No setting from the machine running the tests, and no .env in the cwd."""
    for name in set(os.environ) - set(without_settings(dict(os.environ))):
        monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def load(**overrides: object) -> Settings:
    return load_settings(_env_file=None, **overrides)


def error_for(**overrides: object) -> str:
    with pytest.raises(SettingsError) as raised:
        load(**overrides)
    message = str(raised.value)
    assert "\n" not in message, f"not one line: {message!r}"
    return message


def test_database_url_wins_over_postgres_parts(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg2://app:pw@db.example:6543/accounts")
    monkeypatch.setenv("POSTGRES_SERVER", "other.example")
    monkeypatch.setenv("POSTGRES_DB", "other")
    monkeypatch.setenv("PAGE_TOKEN_SECRET", SECRET)
    url = load().database_url
    assert (url.host, url.port, url.database, url.username) == ("db.example", 6543, "accounts", "app")
    assert url.password == "pw"


def test_postgres_parts_build_a_psycopg_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTGRES_SERVER", "db.example")
    monkeypatch.setenv("POSTGRES_PORT", "6543")
    monkeypatch.setenv("POSTGRES_USER", "app")
    monkeypatch.setenv("POSTGRES_PASSWORD", PASSWORD)
    monkeypatch.setenv("POSTGRES_DB", "accounts")
    monkeypatch.setenv("PAGE_TOKEN_SECRET", SECRET)
    settings = load()
    url = settings.database_url
    assert url.drivername == "postgresql+psycopg"
    assert (url.host, url.port, url.database, url.username, url.password) == (
        "db.example",
        6543,
        "accounts",
        "app",
        PASSWORD,
    )
    assert not settings.uses_embedded_database


def test_postgres_parts_defaults_and_no_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTGRES_SERVER", "db.example")
    monkeypatch.setenv("PAGE_TOKEN_SECRET", SECRET)
    url = load().database_url
    assert (url.drivername, url.host, url.port, url.username, url.password, url.database) == (
        "postgresql+psycopg",
        "db.example",
        5432,
        "postgres",
        None,
        "app",
    )


def test_bare_postgresql_url_uses_the_installed_psycopg_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    # The driver is named explicitly: psycopg 3, the one the service ships.
    monkeypatch.setenv("DATABASE_URL", "postgresql://app@db.example/accounts")
    monkeypatch.setenv("PAGE_TOKEN_SECRET", SECRET)
    assert load().database_url.drivername == "postgresql+psycopg"


def test_nothing_configured_means_the_embedded_sqlite_file() -> None:
    settings = load()
    assert settings.uses_embedded_database
    assert settings.database_url.render_as_string() == EMBEDDED_DATABASE_URL
    assert settings.database_url.get_backend_name() == "sqlite"
    # Zero setup: no secret needed, a development-only one is used.
    assert settings.PAGE_TOKEN_SECRET is None
    assert settings.page_token_key == DEVELOPMENT_PAGE_TOKEN_SECRET.encode()


def test_defaults() -> None:
    settings = load()
    assert (settings.GRPC_HOST, settings.GRPC_PORT) == ("0.0.0.0", 50051)
    # One worker process unless asked (as gunicorn and uvicorn), whatever the host's CPU count.
    assert settings.GRPC_WORKERS == 1
    assert (settings.DB_POOL_SIZE, settings.MAX_CONCURRENT_RPCS) == (8, 128)
    assert load(DB_POOL_SIZE=5).DB_POOL_SIZE == 5


@pytest.mark.parametrize(
    "form",
    ["postgresql", "postgres", "postgresql+psycopg", "postgresql+psycopg2"],
)
def test_every_deployed_postgresql_url_form_selects_psycopg_3(monkeypatch: pytest.MonkeyPatch, form: str) -> None:
    # Deployed Secrets hold each of these; the service ships one driver.
    monkeypatch.setenv("DATABASE_URL", f"{form}://app:pw@db.example:6543/accounts")
    monkeypatch.setenv("PAGE_TOKEN_SECRET", SECRET)
    url = load().database_url
    assert url.drivername == "postgresql+psycopg"
    assert (url.host, url.port, url.database, url.username, url.password) == (
        "db.example",
        6543,
        "accounts",
        "app",
        "pw",
    )


def test_settings_that_no_longer_exist_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    # A Deployment written for an older release still starts.
    for name in ("GRPC_THREADS", "DB_READ_POOL_SIZE", "DB_MAX_OVERFLOW"):
        monkeypatch.setenv(name, "4")
    assert load().DB_POOL_SIZE == 8


def test_overrides_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # What `adaccounts serve --port` relies on.
    monkeypatch.setenv("GRPC_PORT", "7000")
    assert load().GRPC_PORT == 7000
    assert load(GRPC_PORT=7001).GRPC_PORT == 7001


def test_dotenv_file_is_read_and_environment_wins_over_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("GRPC_PORT=7100\nDB_POOL_SIZE=4\n")
    settings = load_settings()
    assert (settings.GRPC_PORT, settings.DB_POOL_SIZE) == (7100, 4)
    monkeypatch.setenv("GRPC_PORT", "7200")
    assert load_settings().GRPC_PORT == 7200


@pytest.mark.parametrize(
    "configured",
    [
        {"DATABASE_URL": "postgresql+psycopg2://app@db.example/accounts"},
        {"DATABASE_URL": "sqlite:///elsewhere.db"},
        {"POSTGRES_SERVER": "db.example"},
    ],
    ids=["database_url", "sqlite_url", "postgres_parts"],
)
def test_page_token_secret_is_required_when_a_database_is_configured(
    monkeypatch: pytest.MonkeyPatch, configured: dict[str, str]
) -> None:
    for name, value in configured.items():
        monkeypatch.setenv(name, value)
    assert error_for().startswith("PAGE_TOKEN_SECRET:")
    monkeypatch.setenv("PAGE_TOKEN_SECRET", SECRET)
    assert load().page_token_key == SECRET.encode()


def test_page_token_secret_shorter_than_16_characters_is_rejected(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql+psycopg2://app@db.example/accounts")
    monkeypatch.setenv("PAGE_TOKEN_SECRET", "x" * 15)
    message = error_for()
    assert message.startswith("PAGE_TOKEN_SECRET:")
    assert "x" * 15 not in message
    monkeypatch.setenv("PAGE_TOKEN_SECRET", "x" * 16)
    assert load().page_token_key == b"x" * 16
    # Also when it is set without a database: a short secret is never accepted.
    monkeypatch.delenv("DATABASE_URL")
    monkeypatch.setenv("PAGE_TOKEN_SECRET", "short")
    assert error_for().startswith("PAGE_TOKEN_SECRET:")


def test_page_token_secret_holds_several_keys_the_first_signs(monkeypatch: pytest.MonkeyPatch) -> None:
    new, old = "new-page-token-key-0123456789", "old-page-token-key-0123456789"
    monkeypatch.setenv("DATABASE_URL", "postgresql://app@db.example/accounts")
    monkeypatch.setenv("PAGE_TOKEN_SECRET", f"{new},{old}")
    settings = load()
    assert settings.page_token_keys == (new.encode(), old.encode())
    assert settings.page_token_key == new.encode()
    for text in (repr(settings), str(settings), str(settings.model_dump()), settings.model_dump_json()):
        assert new not in text
        assert old not in text
    # One key, as before keys could be several: taken exactly as written.
    monkeypatch.setenv("PAGE_TOKEN_SECRET", f" {old}\n")
    assert load().page_token_keys == (f" {old}\n".encode(),)


@pytest.mark.parametrize(
    ("secret", "complaint"),
    [
        ("new-page-token-key-0123456789,short-key", "key 2 of 2 is shorter than 16"),
        ("new-page-token-key-0123456789,", "key 2 of 2 is empty"),
        (",old-page-token-key-0123456789", "key 1 of 2 is empty"),
        ("new-page-token-key-0123456789, old-page-token-key-0123456789", "key 2 of 2 begins or ends with whitespace"),
        ("abcdefghijklmn,opqrstuvwxyz", "key 1 of 2 is shorter than 16"),  # a one-key secret with a comma
    ],
)
def test_a_bad_page_token_key_is_named_by_its_position_only(
    monkeypatch: pytest.MonkeyPatch, secret: str, complaint: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://app@db.example/accounts")
    monkeypatch.setenv("PAGE_TOKEN_SECRET", secret)
    message = error_for()
    assert message.startswith(f"PAGE_TOKEN_SECRET: {complaint}"), message
    for key in secret.split(","):
        if key.strip():
            assert key.strip()[:6] not in message


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GRPC_PORT", "abc"),
        ("GRPC_PORT", "-1"),
        ("GRPC_PORT", "65536"),
        ("GRPC_WORKERS", "0"),
        ("DB_POOL_SIZE", "many"),
        ("DB_POOL_SIZE", "0"),
        ("MAX_CONCURRENT_RPCS", "0"),
        ("DB_POOL_TIMEOUT", "0"),
        ("DB_CONNECT_TIMEOUT", "0"),
        ("HEALTH_CHECK_INTERVAL_S", "0"),
        ("HEALTH_CHECK_TIMEOUT_S", "-2"),
        ("SHUTDOWN_GRACE_S", "-1"),
        ("POSTGRES_PORT", "0"),
        ("LOG_LEVEL", "LOUD"),
        ("DATABASE_URL", "mysql://x"),
        ("DATABASE_URL", "not a url"),
        ("DATABASE_URL", "postgresql+asyncpg://app@db.example/accounts"),
        ("DATABASE_URL", "postgresql+nosuchdriver://app@db.example/accounts"),
    ],
)
def test_invalid_value_names_the_setting(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    monkeypatch.setenv("PAGE_TOKEN_SECRET", SECRET)  # so that only `name` is wrong
    assert error_for().startswith(f"{name}:")


def test_valid_log_levels_in_any_case() -> None:
    for level in ("debug", "INFO", "Warning", "ERROR"):
        configured = load(LOG_LEVEL=level).LOG_LEVEL
        assert configured == level


def test_settings_are_frozen() -> None:
    settings = load()
    with pytest.raises(ValidationError):
        settings.GRPC_PORT = 1  # type: ignore[misc]


def test_password_never_in_repr_or_str(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", f"postgresql://app:{PASSWORD}@db.example/accounts")
    monkeypatch.setenv("PAGE_TOKEN_SECRET", SECRET)
    settings = load()
    settings.database_url  # noqa: B018 (cached: make sure it is not shown once computed)
    for text in (repr(settings), str(settings), str(settings.model_dump()), str(settings.database_url)):
        assert PASSWORD not in text
        assert SECRET not in text
    assert settings.database_url.password == PASSWORD  # still usable to connect


def test_postgres_password_never_in_repr_or_str(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("POSTGRES_SERVER", "db.example")
    monkeypatch.setenv("POSTGRES_PASSWORD", PASSWORD)
    monkeypatch.setenv("PAGE_TOKEN_SECRET", SECRET)
    settings = load()
    for text in (repr(settings), str(settings), str(settings.database_url)):
        assert PASSWORD not in text


@pytest.mark.parametrize(
    "bad",
    [
        {"GRPC_PORT": "abc"},
        {"PAGE_TOKEN_SECRET": None},
        {"PAGE_TOKEN_SECRET": "short"},
        {"LOG_LEVEL": "LOUD"},
    ],
    ids=["bad_port", "no_secret", "short_secret", "bad_log_level"],
)
def test_password_never_in_settings_error(monkeypatch: pytest.MonkeyPatch, bad: dict[str, str | None]) -> None:
    monkeypatch.setenv("DATABASE_URL", f"postgresql://app:{PASSWORD}@db.example/accounts")
    monkeypatch.setenv("POSTGRES_PASSWORD", PASSWORD)
    monkeypatch.setenv("PAGE_TOKEN_SECRET", SECRET)
    for name, value in bad.items():
        if value is None:
            monkeypatch.delenv(name)
        else:
            monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as raised:
        load()
    assert PASSWORD not in str(raised.value)
    assert PASSWORD not in repr(raised.value)
    assert raised.value.__cause__ is None  # `from None`: no chained ValidationError showing the input


@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://app:{PASSWORD}@db.example:notaport/accounts",
        f"mysql://app:{PASSWORD}@db.example/accounts",
        f"postgresql+nosuchdriver://app:{PASSWORD}@db.example/accounts",
    ],
)
def test_password_never_in_an_invalid_database_url_error(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("DATABASE_URL", url)
    monkeypatch.setenv("PAGE_TOKEN_SECRET", SECRET)
    message = error_for()
    assert message.startswith("DATABASE_URL:")
    assert PASSWORD not in message
