"""db writes BatchGet's id list itself (docs/decisions/0010): exactly what psycopg would send; and
a prepared read's parameters (docs/decisions/0011)."""

from __future__ import annotations

import uuid

import pytest
from adaccounts_server import models
from adaccounts_server.db import _compiled, _literal, _text
from psycopg.adapt import PyFormat, Transformer


@pytest.mark.parametrize("count", [1, 2, 100, 1000])
def test_a_list_of_uuids_is_written_byte_for_byte_as_psycopg_writes_it(count: int) -> None:
    ids = [uuid.uuid4() for _ in range(count)]
    ids[0] = uuid.UUID(int=0)  # leading zeros kept
    transformer = Transformer()
    assert _literal(transformer, ids) == transformer.as_literal(ids)


@pytest.mark.parametrize(
    "value",
    [
        [],  # an empty list: psycopg's own
        ["META", "GOOGLE"],  # strings: quoted by psycopg
        [models.Platform.META, models.Status.ACTIVE],  # enums: their stored values
        "O'Brien",
        None,
        7,
    ],
)
def test_other_values_are_psycopgs_own_literals(value: object) -> None:
    transformer = Transformer()
    expected = transformer.as_literal(
        [item.value for item in value] if isinstance(value, list) and value and hasattr(value[0], "value") else value
    )
    assert _literal(transformer, value) == expected


# --- prepared reads (docs/decisions/0011): parameters in PostgreSQL's text format -----------------


@pytest.mark.parametrize("count", [1, 2, 100])
def test_a_list_of_uuids_as_a_text_parameter_is_psycopgs_own(count: int) -> None:
    ids = [uuid.uuid4() for _ in range(count)]
    ids[0] = uuid.UUID(int=0)
    transformer = Transformer()
    assert _text(transformer, ids) == bytes(transformer.get_dumper(ids, PyFormat.TEXT).dump(ids))


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (uuid.UUID(int=1), b"00000000-0000-0000-0000-000000000001"),
        (None, None),
        ("O'Brien", b"O'Brien"),  # no quoting: a parameter is not SQL
        (models.Platform.META, b"META"),
        ([models.Status.ACTIVE, models.Status.PAUSED], b"{ACTIVE,PAUSED}"),
        (7, b"7"),
    ],
)
def test_text_parameters(value: object, text: bytes | None) -> None:
    assert _text(Transformer(), value) == text


def test_a_statement_prepared_numbers_each_parameter_once_and_is_named_after_its_sql() -> None:
    sql = "SELECT a FROM t WHERE a = %(x)s::UUID AND b > %(y)s OR (a = %(x)s::UUID AND c LIKE '%%')"
    compiled = _compiled(sql, None)
    assert compiled.prepared.sql == b"SELECT a FROM t WHERE a = $1::UUID AND b > $2 OR (a = $1::UUID AND c LIKE '%')"
    assert compiled.prepared.parameters == ("x", "y")
    assert compiled.values(Transformer(), {"x": uuid.UUID(int=2), "y": 5}) == [
        b"00000000-0000-0000-0000-000000000002",
        b"5",
    ]
    assert _compiled(sql, None).prepared.name == compiled.prepared.name
    assert _compiled(sql.replace("b >", "b >="), None).prepared.name != compiled.prepared.name
