"""The seed's REST stack, at its best: FastAPI + SQLModel `Session.get`, served by uvicorn.

The point read GetAdAccount is compared with. The seed's own shape (a sync endpoint with a
`yield` session dependency and a pool of 10) deadlocks at 64 concurrent requests: the
dependency's setup, the endpoint and its teardown each take a thread-pool token, so 40
requests can hold every token while waiting for connections held by others. Here the
session is opened and closed inside the endpoint (one thread holds one connection for the
whole read), the thread pool is as large as the connection pool, and the pool has the same
size, overflow and pre-ping as the gRPC server's, so the comparison is with its best:

    DATABASE_URL=... REST_THREADS=8 uvicorn rest_baseline:app --app-dir bench --workers N
"""

from __future__ import annotations

import os
import uuid
from contextlib import asynccontextmanager

import anyio.to_thread
from adaccounts_server.models import AdAccount
from fastapi import FastAPI, HTTPException
from sqlmodel import Session, create_engine

THREADS = int(os.environ.get("REST_THREADS", "8"))

engine = create_engine(
    os.environ["DATABASE_URL"],
    pool_pre_ping=True,  # the same protection against a restarted database as the gRPC server's
    pool_size=THREADS,
    max_overflow=2,
)


@asynccontextmanager
async def lifespan(_app: FastAPI):  # type: ignore[no-untyped-def]
    # Sync endpoints run on anyio's thread pool (40 threads by default): no more threads
    # than pooled connections, so none waits on the pool while holding a thread.
    anyio.to_thread.current_default_thread_limiter().total_tokens = THREADS
    yield
    engine.dispose()


app = FastAPI(lifespan=lifespan)


@app.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@app.get("/ad_accounts/{account_id}")
def get_ad_account(account_id: uuid.UUID) -> AdAccount:
    with Session(engine) as session:
        account = session.get(AdAccount, account_id)
        if account is None:
            raise HTTPException(status_code=404, detail="not found")
        return account
