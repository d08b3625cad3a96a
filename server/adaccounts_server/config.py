"""Settings: environment variables (and an optional `.env`), validated once at start-up."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from collections.abc import Callable
from functools import cached_property
from pathlib import Path
from typing import Annotated, Literal, NamedTuple

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import URL, make_url

# The zero-setup default: a SQLite file in the working directory.
EMBEDDED_DATABASE_URL = "sqlite:///adaccounts.db"

# Only for the embedded SQLite default, so `adaccounts serve` works with no
# configuration. Anything else must set PAGE_TOKEN_SECRET, shared by every
# replica so that a page token minted by one is accepted by all.
DEVELOPMENT_PAGE_TOKEN_SECRET = "adaccounts-development-only-page-token-secret"

POSTGRES_DRIVER = "postgresql+psycopg"
POSTGRES_URL_FORMS = ("postgresql", "postgres", "postgresql+psycopg", "postgresql+psycopg2")
SQLITE_URL_FORMS = ("sqlite", "sqlite+pysqlite", "sqlite+aiosqlite")

Positive = Annotated[int, Field(gt=0)]
Seconds = Annotated[float, Field(gt=0)]


class SettingsError(Exception):
    """A setting is missing or invalid; the message names it in one line."""


class TokenGrant(NamedTuple):
    """What one bearer token (known by its SHA-256) lets its calling service do."""

    name: str
    scope: str  # "read" | "read-write"


TOKEN_SCOPES = ("read", "read-write")
_CALLER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    DATABASE_URL: SecretStr | None = Field(
        None,
        description="The database URL, e.g. `postgresql://app:secret@db:5432/app`. `postgresql://`, `postgres://`,"
        " `postgresql+psycopg://` and `postgresql+psycopg2://` all select psycopg 3, the one PostgreSQL driver the"
        " service ships (Secrets written for the psycopg2 releases keep working); `sqlite:///path` for a SQLite file."
        " Unset: the `POSTGRES_*` parts when `POSTGRES_SERVER` is set, else the embedded SQLite file"
        " `sqlite:///adaccounts.db`. A secret: logged with its password masked.",
    )
    POSTGRES_SERVER: str | None = Field(
        None,
        description="PostgreSQL's host. Used, with the other `POSTGRES_*` settings, only when `DATABASE_URL` is unset.",
    )
    POSTGRES_PORT: Annotated[int, Field(gt=0, lt=65536)] = Field(
        5432, description="PostgreSQL's port; only with `POSTGRES_SERVER` and no `DATABASE_URL`."
    )
    POSTGRES_USER: str = Field("postgres", description="The role to connect as; only with `POSTGRES_SERVER`.")
    POSTGRES_PASSWORD: SecretStr = Field(
        SecretStr(""), description="The role's password (a secret, never logged); only with `POSTGRES_SERVER`."
    )
    POSTGRES_DB: str = Field("app", description="The database's name; only with `POSTGRES_SERVER`.")

    MIGRATION_DATABASE_URL: SecretStr | None = Field(
        None,
        description="`adaccounts migrate` only: the URL of a role allowed to run DDL (the server's own role needs"
        " only DML). Unset: migrate uses the server's database URL. A secret, like `DATABASE_URL`.",
    )
    MIGRATION_LOCK_TIMEOUT_S: Seconds = Field(
        5.0,
        description="Each migration statement waits at most this long for a lock on a table in use, then the"
        " migration fails (exit 3) instead of queueing the traffic behind it.",
    )
    MIGRATION_STATEMENT_TIMEOUT_S: Seconds = Field(
        60.0,
        description="Each migration statement may run at most this long, then the migration fails (exit 3); index"
        " builds that use `CONCURRENTLY`, which block no reads or writes, are exempt.",
    )
    MIGRATION_WAIT_S: Seconds = Field(
        600.0,
        description="How long a migrate waits for another one already running on the same database (a PostgreSQL"
        " advisory lock serialises them); exit 3 after.",
    )

    GRPC_HOST: str = Field(
        "0.0.0.0", description="The interface to listen on (`serve --host`), for gRPC and the metrics endpoint."
    )
    GRPC_PORT: Annotated[int, Field(ge=0, lt=65536)] = Field(
        50051, description="The port to listen on (`serve --port`); 0 picks a free one."
    )

    DB_POOL_SIZE: Positive = Field(
        8,
        description="PostgreSQL connections each worker process keeps (`psycopg_pool`, opened at start, reopened on"
        " demand after an outage). Every call's database work is awaited on the event loop, a call holding one"
        " connection while its statements run: this bounds the statements in progress at once, not the calls. A"
        " worker opens `DB_POOL_SIZE` + 1 connections: its health monitor has one of its own, so busy calls never"
        " read as a database that is down. The embedded SQLite default uses one.",
    )
    DB_POOL_TIMEOUT: Seconds = Field(
        2.0, description="How long a call waits for a pooled connection before it fails UNAVAILABLE."
    )
    DB_POOL_RECYCLE: Seconds = Field(1800.0, description="Pooled connections older than this are replaced.")
    DB_POOL_PRE_PING: bool = Field(
        True,
        description="Test a pooled connection with a round trip before lending it, when it has been idle longer"
        " than `DB_POOL_PRE_PING_IDLE_S`. Busy connections are not pinged: a dead one is found by its first"
        " statement, which discards every older connection and, for reads, is retried once, so a restarted"
        " database causes no failed calls once it is back. `false` only to measure the cost (bench/).",
    )
    DB_POOL_PRE_PING_IDLE_S: Annotated[float, Field(ge=0)] = Field(
        1.0, description="With `DB_POOL_PRE_PING`: how long a connection must have been idle to be pinged first."
    )
    DB_PREPARED_STATEMENTS: bool = Field(
        True,
        description="Reads (Get, BatchGet, List) as server-side prepared statements, pipelined behind their"
        " `statement_timeout` in one round trip: PostgreSQL plans each once per connection, about a third less"
        " of its CPU per point read ([decision 0011](decisions/0011-prepared-reads.md)). `false` behind a pooler"
        " in transaction mode that does not carry prepared statements (PgBouncer before 1.21, or without"
        " `max_prepared_statements`). Left on there, a worker turns them off at the first statement missing,"
        " with a warning, and sends that read again: no call fails. Writes never use them.",
    )
    DB_CONNECT_TIMEOUT: Positive = Field(3, description="TCP connect timeout to PostgreSQL, in whole seconds.")
    DB_STATEMENT_TIMEOUT_MAX_S: Seconds = Field(
        30.0,
        description="No statement runs longer than this, nor longer than its caller's deadline: each gets"
        " `statement_timeout` = min(this, the caller's remaining deadline), and a caller that cancels or runs out"
        " of time gets its statement cancelled in PostgreSQL.",
    )

    DATABASE_REPLICA_URLS: SecretStr | None = Field(
        None,
        description="Read replicas: PostgreSQL streaming standbys, comma-separated, in the same URL forms as"
        " `DATABASE_URL`. GetAdAccount, BatchGetAdAccounts and ListAdAccounts are served by one whose replay is"
        " within `REPLICA_MAX_LAG_S` (and, for a read that sends a consistency token, that has replayed at least"
        " that far); writes, and reads no replica qualifies for, go to the primary (`DATABASE_URL`). Unset: none.",
    )
    REPLICA_MAX_LAG_S: Seconds = Field(
        5.0,
        description="How stale a replica may be and still serve reads that send no consistency token; must be"
        " longer than `HEALTH_CHECK_INTERVAL_S`, which is how often the lag is measured.",
    )
    REPLICA_READ_TIMEOUT_S: Seconds = Field(
        1.0,
        description="The longest a read waits for a replica (and at most half the call's remaining deadline)"
        " before it is asked of the primary instead: a replica that is down or stalled delays reads, never"
        " fails them.",
    )

    MAX_CONCURRENT_RPCS: Positive = Field(
        128,
        description="Calls in progress at once (health and reflection aside); past it, calls are refused with"
        " RESOURCE_EXHAUSTED at once instead of queueing.",
    )
    GRPC_MAX_REQUEST_BYTES: Positive = Field(
        256 * 1024,
        description="The largest request; a bigger one is refused with RESOURCE_EXHAUSTED before it is read,"
        " whoever sends it (authentication comes after). The largest real request, BatchGet of 1,000 ids, is"
        " ~40 KB; 100 streams per connection at this limit hold at most 25 MiB.",
    )
    GRPC_MAX_MESSAGE_BYTES: Positive = Field(
        4 * 1024 * 1024, description="The largest response (a List page of 1,000 accounts is ~300 KB)."
    )
    GRPC_MAX_CONNECTION_AGE_S: Seconds = Field(
        300.0,
        description="Connections are closed gracefully (30 s grace) after this long, so clients rebalance over"
        " workers and pods.",
    )
    GRPC_WORKERS: Positive = Field(
        1,
        description="Server processes sharing the port (`serve --workers`), each with its own event loop, pool and"
        " health monitor. A supervisor forwards SIGTERM, replaces a worker that dies and exits 0 once all have"
        " stopped. One worker keeps about one CPU busy: on a VM, one per CPU; in Kubernetes, scale pods.",
    )
    GRPC_MAX_CONCURRENT_STREAMS: Positive = Field(
        100,
        description="Calls one client connection (one HTTP/2 connection) may have open at once; the client queues"
        " the rest, so one connection cannot take every slot of `MAX_CONCURRENT_RPCS`.",
    )

    GRPC_TLS: Literal["off", "tls", "mtls"] = Field(
        "off",
        description="Transport security. `off`: plaintext, the default for now, so that `adaccounts serve` works"
        " with no setup; `tls`: serve `GRPC_TLS_CERT_FILE` and `GRPC_TLS_KEY_FILE`; `mtls`: also require every"
        " client to present a certificate signed by `GRPC_TLS_CLIENT_CA_FILE`. The files are read again when they"
        " change (certificate rotation without a restart).",
    )
    GRPC_TLS_CERT_FILE: Path | None = Field(
        None,
        description="PEM certificate chain; required by `tls` and `mtls`, an error with `off` (a forgotten"
        " `GRPC_TLS` never means plaintext silently).",
    )
    GRPC_TLS_KEY_FILE: Path | None = Field(
        None, description="PEM private key of `GRPC_TLS_CERT_FILE`; required by `tls` and `mtls`, an error with `off`."
    )
    GRPC_TLS_CLIENT_CA_FILE: Path | None = Field(
        None,
        description="PEM CA bundle that client certificates must chain to; required by `mtls`, an error otherwise.",
    )

    REQUEST_ID_RETENTION_S: Seconds = Field(
        7 * 24 * 3600.0,
        description="How long a CreateAdAccount `request_id` is remembered (AIP-155), 7 days: within it, a retry"
        " gets the account it created as it is now (NOT_FOUND once deleted), the id with another request"
        " INVALID_ARGUMENT; after it, the id is forgotten and creates a new account. Every worker forgets older"
        " ones once a minute, in batches.",
    )

    HEALTH_CHECK_INTERVAL_S: Seconds = Field(
        1.0, description="How often the health monitor pings the database (`SELECT 1`, on a connection of its own)."
    )
    HEALTH_CHECK_TIMEOUT_S: Seconds = Field(
        2.0, description="A ping slower than this counts as a failure: readiness goes NOT_SERVING."
    )
    SHUTDOWN_GRACE_S: Annotated[float, Field(ge=0)] = Field(
        10.0,
        description="After SIGTERM, how long calls in progress may take to finish; those still running then are"
        " answered UNAVAILABLE.",
    )

    PAGE_TOKEN_SECRET: SecretStr | None = Field(
        None,
        description="HMAC key for page tokens, at least 16 characters, the same on every replica. Required by"
        " `serve` with a configured database (a development value serves the SQLite default; `migrate` and"
        " `alembic` never read it). Several keys, separated by commas (`new,old`; a key cannot hold a comma):"
        " tokens are signed with the first and accepted under any, so the key rotates without breaking walks in"
        " progress. A secret: a bad key is named by its position, never its value.",
    )
    LOG_LEVEL: str = Field(
        "INFO",
        description="DEBUG, INFO, WARNING or ERROR. WARNING keeps only the calls that failed on the server's side.",
    )
    LOG_FORMAT: Literal["auto", "json", "text"] = Field(
        "auto",
        description="`auto`: one JSON object per line when stderr is not a terminal, text when it is; or `json`,"
        " `text`.",
    )

    AUTH_TOKENS: SecretStr | None = Field(
        None,
        description='Bearer tokens of the calling services, as JSON: `{"<sha256 hex of the token>": {"name":'
        ' "billing", "scope": "read"}, ...}`, scope `read` or `read-write`. Unset: no authentication.'
        " A secret: a bad entry is named by its position, never its value.",
    )
    GRPC_REFLECTION: bool = Field(
        True,
        description="gRPC server reflection (what grpcurl lists and describes); like health, it needs no token."
        " `false` hides the schema.",
    )
    GRPC_HEALTH_PORT: Annotated[int, Field(ge=0, lt=65536)] | None = Field(
        None,
        description="A second, plaintext port that serves only grpc.health.v1 (unset: none). Kubernetes' native gRPC"
        " probes cannot speak TLS, so with `GRPC_TLS` `tls` or `mtls` point them here; with `--workers`, use a"
        " fixed port.",
    )
    METRICS_PORT: Annotated[int, Field(ge=0, lt=65536)] | None = Field(
        None,
        description="Prometheus metrics over HTTP at `http://GRPC_HOST:METRICS_PORT/metrics` (9464 is the usual"
        " choice); unset: off; 0: any free port. With `--workers N`, worker i serves on `METRICS_PORT` + i.",
    )
    TRACING: Literal["off", "otlp"] = Field(
        "off",
        description="`otlp`: OpenTelemetry traces, each call's span with its SQL statements' spans inside,"
        " continuing the caller's `traceparent`, sent over OTLP/gRPC as the standard"
        " `OTEL_EXPORTER_OTLP_ENDPOINT`, `OTEL_EXPORTER_OTLP_HEADERS` and `OTEL_SERVICE_NAME` (default"
        " `adaccounts`) say; a call's log lines carry its `trace_id`. Needs the `tracing` extra.",
    )

    @model_validator(mode="after")
    def _check(self) -> Settings:
        # What every command needs: `adaccounts migrate` and plain `alembic` need only these
        # (the database URL); the serving settings are checked by `check_serving`.
        if logging.getLevelName(self.LOG_LEVEL.upper()) not in range(0, 51):
            raise ValueError(f"LOG_LEVEL: unknown level {self.LOG_LEVEL!r} (use DEBUG, INFO, WARNING, ERROR)")
        _check_url("DATABASE_URL", lambda: self.database_url)
        if self.MIGRATION_DATABASE_URL is not None:
            _check_url("MIGRATION_DATABASE_URL", lambda: self.migration_database_url)
        if self.DATABASE_REPLICA_URLS is not None:
            _check_replicas(self)
        return self

    def check_serving(self) -> None:
        """What only `serve` needs: TLS files, tokens, tracing, the page-token key; ValueError
        naming the setting. `load_settings()` calls it; `load_settings(serving=False)` does not."""
        _check_tls(self)
        _ = self.auth_tokens  # parse now: a bad entry stops the program at start, in one line
        if self.TRACING != "off":
            missing = _tracing_missing()
            if missing:
                raise ValueError(f"TRACING: {missing}")
        secret = self.PAGE_TOKEN_SECRET
        if secret is None and not self.uses_embedded_database:
            raise ValueError("PAGE_TOKEN_SECRET: required when a database is configured (same value on every replica)")
        if secret is not None:
            _split_page_token_keys(secret.get_secret_value())  # raises, naming the key by its position only

    @property
    def uses_embedded_database(self) -> bool:
        return self.DATABASE_URL is None and self.POSTGRES_SERVER is None

    @cached_property
    def database_url(self) -> URL:
        """DATABASE_URL, else the POSTGRES_* parts, else the embedded SQLite file."""
        if self.DATABASE_URL is not None:
            return _one_driver(make_url(self.DATABASE_URL.get_secret_value()))
        if self.POSTGRES_SERVER is not None:
            return URL.create(
                POSTGRES_DRIVER,
                username=self.POSTGRES_USER,
                password=self.POSTGRES_PASSWORD.get_secret_value() or None,
                host=self.POSTGRES_SERVER,
                port=self.POSTGRES_PORT,
                database=self.POSTGRES_DB,
            )
        return make_url(EMBEDDED_DATABASE_URL)

    @cached_property
    def replica_urls(self) -> tuple[URL, ...]:
        """DATABASE_REPLICA_URLS, each in the one driver's form; () when unset."""
        if self.DATABASE_REPLICA_URLS is None:
            return ()
        return tuple(_one_driver(make_url(text)) for text in _replica_texts(self.DATABASE_REPLICA_URLS))

    @cached_property
    def migration_database_url(self) -> URL:
        """Where `adaccounts migrate` connects: MIGRATION_DATABASE_URL, else the server's own URL."""
        if self.MIGRATION_DATABASE_URL is not None:
            return _one_driver(make_url(self.MIGRATION_DATABASE_URL.get_secret_value()))
        return self.database_url

    @cached_property
    def auth_tokens(self) -> dict[str, TokenGrant] | None:
        """AUTH_TOKENS parsed: lowercase SHA-256 hex → grant; None when authentication is off."""
        if self.AUTH_TOKENS is None:
            return None
        return _parse_tokens(self.AUTH_TOKENS.get_secret_value())

    @property
    def page_token_keys(self) -> tuple[bytes, ...]:
        """PAGE_TOKEN_SECRET's keys, in order: the first signs new page tokens, any of them
        verifies one (so the key rotates without breaking walks in progress)."""
        secret = self.PAGE_TOKEN_SECRET
        return _split_page_token_keys(secret.get_secret_value() if secret else DEVELOPMENT_PAGE_TOKEN_SECRET)

    @property
    def page_token_key(self) -> bytes:
        """The key new page tokens are signed with: PAGE_TOKEN_SECRET's first."""
        return self.page_token_keys[0]


PAGE_TOKEN_KEY_MIN_LENGTH = 16


def _split_page_token_keys(secret: str) -> tuple[bytes, ...]:
    """`new,old`: the keys of PAGE_TOKEN_SECRET, each at least 16 characters, taken as written
    (one key keeps meaning exactly what it meant before keys could be several). The messages
    name a key by its position, never by any part of its value."""
    keys = secret.split(",")
    several = len(keys) > 1
    for number, key in enumerate(keys, start=1):
        which = f"key {number} of {len(keys)}" if several else "the key"
        if several and not key:
            raise ValueError(f"PAGE_TOKEN_SECRET: {which} is empty (keys are separated by single commas)")
        if several and key != key.strip():
            raise ValueError(
                f"PAGE_TOKEN_SECRET: {which} begins or ends with whitespace: separate keys with a comma alone"
            )
        if len(key) < PAGE_TOKEN_KEY_MIN_LENGTH:
            if several:
                raise ValueError(
                    f"PAGE_TOKEN_SECRET: {which} is shorter than {PAGE_TOKEN_KEY_MIN_LENGTH} characters"
                    " (several keys are separated by commas, so a key cannot contain one)"
                )
            raise ValueError(f"PAGE_TOKEN_SECRET: must be at least {PAGE_TOKEN_KEY_MIN_LENGTH} characters")
    return tuple(key.encode() for key in keys)


def _one_driver(url: URL) -> URL:
    """Every PostgreSQL URL form deployed Secrets may hold selects psycopg 3, the one
    driver the service ships: postgresql://, postgres://, postgresql+psycopg2://."""
    if url.drivername in POSTGRES_URL_FORMS:
        return url.set(drivername=POSTGRES_DRIVER)
    return url


def _check_url(name: str, get_url: Callable[[], URL]) -> None:
    try:
        url = get_url()
    except Exception as exc:  # make_url's errors are ArgumentError/ValueError
        raise ValueError(f"{name}: not a database URL ({type(exc).__name__})") from None
    if url.get_backend_name() not in ("postgresql", "sqlite"):
        raise ValueError(f"{name}: unsupported database {url.get_backend_name()!r} (postgresql or sqlite)")
    if url.host and "@" in url.host:
        # `user:pa@ss@host` reads as host `ss@host`: refuse it rather than log part of a password.
        raise ValueError(f"{name}: more than one '@' in the URL: percent-encode '@' in the user or password as %40")
    if url.drivername not in (POSTGRES_DRIVER, *SQLITE_URL_FORMS):
        raise ValueError(
            f"{name}: driver {url.drivername!r} is not supported: use postgresql:// (psycopg 3) or sqlite://"
        )


def _tracing_missing() -> str | None:
    """None when the tracing packages (the `tracing` extra) are importable; else what to install."""
    modules = ("opentelemetry.exporter.otlp.proto.grpc.trace_exporter", "opentelemetry.instrumentation.grpc")
    try:
        found = all(importlib.util.find_spec(module) is not None for module in (*modules, "opentelemetry.sdk.trace"))
    except ModuleNotFoundError:  # a parent package is missing
        found = False
    if not found:
        return "the OpenTelemetry packages are not installed: pip install 'adaccounts-server[tracing]'"
    return None


def _replica_texts(urls: SecretStr) -> list[str]:
    return [text.strip() for text in urls.get_secret_value().split(",") if text.strip()]


def _check_replicas(settings: Settings) -> None:
    """Each replica URL a PostgreSQL one, beside a PostgreSQL primary; a URL is named by its
    position only (the value may hold a password)."""
    assert settings.DATABASE_REPLICA_URLS is not None
    texts = _replica_texts(settings.DATABASE_REPLICA_URLS)
    for number, text in enumerate(texts, start=1):
        name = f"DATABASE_REPLICA_URLS (URL {number} of {len(texts)})"
        _check_url(name, lambda text=text: _one_driver(make_url(text)))  # type: ignore[misc]
        if _one_driver(make_url(text)).get_backend_name() != "postgresql":
            raise ValueError(f"{name}: a read replica must be PostgreSQL")
    if texts and settings.database_url.get_backend_name() != "postgresql":
        raise ValueError("DATABASE_REPLICA_URLS: read replicas need a PostgreSQL DATABASE_URL (the primary)")
    if settings.REPLICA_MAX_LAG_S <= settings.HEALTH_CHECK_INTERVAL_S:
        raise ValueError(
            "REPLICA_MAX_LAG_S: must be longer than HEALTH_CHECK_INTERVAL_S (the lag is measured once per health check)"
        )


def _check_tls(settings: Settings) -> None:
    files = {
        "GRPC_TLS_CERT_FILE": (settings.GRPC_TLS_CERT_FILE, b"-----BEGIN CERTIFICATE-----"),
        "GRPC_TLS_KEY_FILE": (settings.GRPC_TLS_KEY_FILE, b"PRIVATE KEY-----"),
        "GRPC_TLS_CLIENT_CA_FILE": (settings.GRPC_TLS_CLIENT_CA_FILE, b"-----BEGIN CERTIFICATE-----"),
    }
    wanted = {
        "off": (),
        "tls": ("GRPC_TLS_CERT_FILE", "GRPC_TLS_KEY_FILE"),
        "mtls": ("GRPC_TLS_CERT_FILE", "GRPC_TLS_KEY_FILE", "GRPC_TLS_CLIENT_CA_FILE"),
    }[settings.GRPC_TLS]
    for name, (path, marker) in files.items():
        if path is None:
            if name in wanted:
                raise ValueError(f"{name}: required with GRPC_TLS={settings.GRPC_TLS}")
            continue
        if name not in wanted:
            # Never fall back to plaintext (or to no client check) because one setting was forgotten.
            raise ValueError(f"{name}: set, but GRPC_TLS={settings.GRPC_TLS} does not use it")
        try:
            content = path.read_bytes()
        except OSError as error:
            raise ValueError(f"{name}: cannot read {path} ({error.strerror or type(error).__name__})") from None
        if marker not in content:
            raise ValueError(f"{name}: {path} is not a PEM file with {marker.decode().strip('-')}")


def _parse_tokens(text: str) -> dict[str, TokenGrant]:
    # The messages never quote the value: it is a secret setting.
    try:
        entries = json.loads(text)
    except ValueError:
        raise ValueError("AUTH_TOKENS: not valid JSON") from None
    if not isinstance(entries, dict) or not entries:
        raise ValueError('AUTH_TOKENS: want a non-empty JSON object {"<sha256 hex>": {"name": ..., "scope": ...}}')
    grants: dict[str, TokenGrant] = {}
    for number, (digest, grant) in enumerate(entries.items(), start=1):
        where = f"AUTH_TOKENS: entry {number}"
        if not _SHA256_HEX.fullmatch(digest):
            raise ValueError(f"{where}: the key must be the token's SHA-256 as 64 hex digits")
        if not isinstance(grant, dict) or set(grant) != {"name", "scope"}:
            raise ValueError(f'{where}: want {{"name": ..., "scope": ...}}')
        name, scope = grant["name"], grant["scope"]
        if not isinstance(name, str) or not _CALLER_NAME.fullmatch(name):
            raise ValueError(f"{where}: name must be 1-64 letters, digits, '.', '_' or '-'")
        if scope not in TOKEN_SCOPES:
            raise ValueError(f"{where}: scope must be 'read' or 'read-write'")
        grants[digest.lower()] = TokenGrant(name, scope)
    return grants


def load_settings(*, serving: bool = True, **overrides: object) -> Settings:
    """Read the settings; raise SettingsError with one line naming the bad one.

    `serving=False` (`adaccounts migrate`, `adaccounts check`, plain `alembic`): only what every
    command needs is checked (the database URLs, LOG_LEVEL, each value's type), not the serving
    settings (PAGE_TOKEN_SECRET, TLS files, AUTH_TOKENS, TRACING), which they never use.
    """
    try:
        settings = Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        message = first["msg"].removeprefix("Value error, ")
        raise SettingsError(f"{where}: {message}" if where else message) from None
    if serving:
        try:
            settings.check_serving()
        except ValueError as exc:
            raise SettingsError(str(exc)) from None
    return settings
