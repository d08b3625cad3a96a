"""The seed's REST stack, at its best: FastAPI + SQLModel `Session.get`, served by uvicorn.

The point read GetAdAccount is compared with. It runs as FastAPI's docs deploy it:
uvicorn[standard], with uvloop as the event loop and httptools as the HTTP parser (run.py
names both, so a missing one fails the run instead of slowing it; /healthz says which ones
the process really runs, and the table prints that). The driver is psycopg 3
(postgresql+psycopg), whatever driver DATABASE_URL names.

The seed's own shape (a sync endpoint with a `yield` session dependency and a pool of 10)
deadlocks at 64 concurrent requests: the dependency's setup, the endpoint and its teardown
each take a thread-pool token, so 40 requests can hold every token while waiting for
connections held by others. Here the session is opened and closed inside the endpoint (one
thread holds one connection for the whole read), the thread pool is as large as the
connection pool, and the pool has the same size, overflow and pre-ping as the gRPC server's,
so the comparison is with its best:

    DATABASE_URL=... REST_THREADS=8 REST_MAX_OVERFLOW=0 \\
        uvicorn rest_baseline:app --app-dir bench --workers N --loop uvloop --http httptools
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from contextlib import asynccontextmanager

import anyio.to_thread
from adaccounts_server.models import AdAccount
from fastapi import FastAPI, HTTPException
from sqlalchemy.engine import make_url
from sqlmodel import Session, create_engine

THREADS = int(os.environ.get("REST_THREADS", "8"))

url = make_url(os.environ["DATABASE_URL"])
if url.get_backend_name() != "postgresql":
    raise SystemExit(f"rest_baseline: DATABASE_URL must be a PostgreSQL URL, not {url.drivername}")

engine = create_engine(
    url.set(drivername="postgresql+psycopg"),  # psycopg 3, whatever the URL named
    pool_pre_ping=True,  # the same protection against a restarted database as the gRPC server's
    pool_size=THREADS,
    max_overflow=int(os.environ.get("REST_MAX_OVERFLOW", "0")),
)


@asynccontextmanager
async def lifespan(_app: FastAPI):  # type: ignore[no-untyped-def]
    # Sync endpoints run on anyio's thread pool (40 threads by default): no more threads
    # than pooled connections, so none waits on the pool while holding a thread.
    anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS
    yield
    engine.dispose()


app = FastAPI(lifespan=lifespan)


def _http_parser() -> str:
    """Which of uvicorn's HTTP/1.1 implementations this process loaded (it loads only the one it runs)."""
    loaded = [name for name in ("httptools", "h11") if f"uvicorn.protocols.http.{name}_impl" in sys.modules]
    return "+".join(loaded) or "unknown"


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    loop = type(asyncio.get_running_loop())
    return {"status": "ok", "loop": f"{loop.__module__}.{loop.__qualname__}", "http": _http_parser()}


@app.get("/ad_accounts/{account_id}")
def get_ad_account(account_id: uuid.UUID) -> AdAccount:
    with Session(engine) as session:
        account = session.get(AdAccount, account_id)
        if account is None:
            raise HTTPException(status_code=404, detail="not found")
        return account
