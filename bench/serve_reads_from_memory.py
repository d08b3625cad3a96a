"""`adaccounts serve` whose reads are answered from memory after the first: each read's rows
are fetched from PostgreSQL once and handed back from then on, with no round trip.

For bench/get_anatomy.py only: GetAdAccount through this server is the whole call (gRPC, the
guard, the service, the repository, the row to its message) except the database's part, so
set against the echo server it is the ceiling of bench/run.py's ratio 2 with a database that
cost nothing.

    python bench/serve_reads_from_memory.py [adaccounts serve's options]
"""

from __future__ import annotations

import sys
from typing import Any

from adaccounts_server import cli, db


def answer_from_memory() -> None:
    fetch = db.PostgresDatabase.fetch
    answers: dict[tuple[int, str], list[Any]] = {}

    async def remembered(self: db.PostgresDatabase, statement: Any, parameters: Any, scope: db.CallScope) -> Any:
        key = (id(statement), repr(parameters))
        if key not in answers:
            answers[key] = await fetch(self, statement, parameters, scope)
        return answers[key]

    db.PostgresDatabase.fetch = remembered  # type: ignore[method-assign]


if __name__ == "__main__":
    answer_from_memory()
    cli.main(["serve", *sys.argv[1:]])
