"""The database password, the page-token key and the callers' tokens never show: not in logs (at
DEBUG), not in any status a caller gets, not in the metrics, not in the settings' repr."""

from __future__ import annotations

import hashlib
import io
import json
import logging
import urllib.request
import uuid

import grpc
import pytest
from adaccounts.v1 import ad_accounts_pb2 as pb
from adaccounts.v1 import ad_accounts_pb2_grpc as pb_grpc
from adaccounts_server import logs
from helpers.databases import create_database, drop_database
from helpers.rpc import new_account
from helpers.server import RunningServer
from helpers.settings import ADMIN_URL, server_settings

PASSWORD = "Pw-n3ver-shown-7d1f"  # trust auth: any password is accepted
PAGE_KEY = "page-key-never-shown-0123456789"
OLD_PAGE_KEY = "old-page-key-never-shown-987654"  # PAGE_TOKEN_SECRET holds both while rotating
TOKEN = "token-never-shown-abcdefghijklmnop"
TOKEN_HASH = hashlib.sha256(TOKEN.encode()).hexdigest()
SECRETS = (PASSWORD, PAGE_KEY, OLD_PAGE_KEY, TOKEN, TOKEN_HASH)


@pytest.mark.parametrize("schema", [True, False], ids=["migrated", "no-schema (INTERNAL errors)"])
def test_no_secret_anywhere(database_url, clean_db, schema):
    name = None
    url = database_url
    if not schema:
        name = f"adaccounts_test_noschema_{uuid.uuid4().hex[:8]}"
        url = create_database(ADMIN_URL, name)
    settings = server_settings(
        url.set(password=PASSWORD),
        PAGE_TOKEN_SECRET=f"{PAGE_KEY},{OLD_PAGE_KEY}",
        AUTH_TOKENS=json.dumps({TOKEN_HASH: {"name": "billing", "scope": "read-write"}}),
        METRICS_PORT=0,
        LOG_LEVEL="DEBUG",
    )
    stream = io.StringIO()
    handler = logs.handler(stream, "json")
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    seen: list[str] = [repr(settings), str(settings), str(settings.model_dump()), settings.model_dump_json()]
    running = RunningServer(settings)
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.AdAccountServiceStub(channel)
            good, bad = [("authorization", f"Bearer {TOKEN}")], [("authorization", f"Bearer {TOKEN}x")]
            calls = [
                (stub.CreateAdAccount, pb.CreateAdAccountRequest(ad_account=new_account()), good),
                (stub.ListAdAccounts, pb.ListAdAccountsRequest(page_size=1), good),
                (stub.ListAdAccounts, pb.ListAdAccountsRequest(page_token="forged"), good),
                (stub.GetAdAccount, pb.GetAdAccountRequest(id=str(uuid.uuid4())), good),
                (stub.GetAdAccount, pb.GetAdAccountRequest(id=str(uuid.uuid4())), bad),
                (stub.DeleteAdAccount, pb.DeleteAdAccountRequest(id="x"), []),
            ]
            for call, request, metadata in calls:
                try:
                    _, outcome = call.with_call(request, metadata=metadata, timeout=5)
                    seen.append(str(outcome.trailing_metadata()))
                except grpc.RpcError as error:
                    seen += [error.details() or "", str(error.trailing_metadata()), error.debug_error_string()]
        with urllib.request.urlopen(f"http://127.0.0.1:{running.app.metrics_port}/metrics", timeout=5) as response:
            seen.append(response.read().decode())
        seen += [repr(running.app.settings), repr(running.app.service._page_tokens)]
    finally:
        running.stop()
        root.removeHandler(handler)
        root.setLevel(level)
        if name:
            drop_database(ADMIN_URL, name)
    seen.append(stream.getvalue())
    assert '"level": "DEBUG"' in stream.getvalue(), "DEBUG logging was not on, so this proves little"
    if not schema:
        assert "internal error (error id" in "".join(seen), "no INTERNAL error was provoked"
    for text in seen:
        for secret in SECRETS:
            assert secret not in text, f"a secret leaked into: {text[:300]}"


@pytest.mark.parametrize(
    "form",
    [
        "postgresql://app@127.0.0.1:{port}/{db}?password={pw}",
        "postgresql://app:{pw}@127.0.0.1:{port}/{db}",
        "postgresql://app@127.0.0.1:{port}/{db}?sslmode=disable&password={pw}",
    ],
    ids=["query-password", "userinfo-password", "query-password-among-others"],
)
def test_no_part_of_a_password_is_logged_whatever_the_url_form(database_url, form, caplog):
    # Issue 12, row 5: a password given as a query parameter was logged verbatim by `serve`.
    url = form.format(port=database_url.port, db=database_url.database, pw=PASSWORD)
    caplog.set_level(logging.DEBUG)
    running = RunningServer(server_settings(url, LOG_LEVEL="DEBUG"))
    running.stop()
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "database: postgresql" in logged, "the start-up line names the database"
    assert PASSWORD not in logged
    assert PASSWORD[:8] not in logged


def test_a_password_with_an_unencoded_at_sign_is_refused_without_echoing_it():
    # Issue 12, row 5: `u:pa@ss@host` was read as host `ss@host` and logged so.
    from adaccounts_server.config import SettingsError, load_settings

    with pytest.raises(SettingsError) as refused:
        load_settings(DATABASE_URL="postgresql://app:pa@ss-part@db.example/app", PAGE_TOKEN_SECRET=PAGE_KEY)
    message = str(refused.value)
    assert message.startswith("DATABASE_URL:")
    assert "%40" in message
    assert "ss-part" not in message
    assert "pa@" not in message
