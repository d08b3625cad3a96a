"""The server settings the tests use, and the environment their subprocesses get."""

from __future__ import annotations

import os

from adaccounts_server.config import Settings, load_settings
from sqlalchemy.engine import URL

# The PostgreSQL this machine runs (trust auth); override to use another.
ADMIN_URL = os.environ.get("ADACCOUNTS_TEST_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
PAGE_TOKEN_SECRET = "tests-page-token-secret-0123456789"
# Every variable the server reads as a setting: a test's subprocess or Settings must not
# pick up one the machine running the tests happens to have.
SETTING_NAMES = frozenset(name.upper() for name in Settings.model_fields)


def without_settings(environ: dict[str, str]) -> dict[str, str]:
    """`environ` minus every variable that is a server setting."""
    return {name: value for name, value in environ.items() if name.upper() not in SETTING_NAMES}


def server_settings(database_url: URL | str, **overrides: object) -> Settings:
    """Settings for a server on a free loopback port, ignoring any .env file."""
    values: dict[str, object] = {
        "DATABASE_URL": str(database_url) if isinstance(database_url, str) else database_url.render_as_string(False),
        "GRPC_HOST": "127.0.0.1",
        "GRPC_PORT": 0,
        "PAGE_TOKEN_SECRET": PAGE_TOKEN_SECRET,
        "HEALTH_CHECK_INTERVAL_S": 0.2,
        "HEALTH_CHECK_TIMEOUT_S": 1.0,
        "SHUTDOWN_GRACE_S": 5.0,
        "_env_file": None,
    }
    values.update(overrides)
    return load_settings(**values)
