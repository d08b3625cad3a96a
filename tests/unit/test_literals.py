"""db writes BatchGet's id list itself (docs/decisions/0010): exactly what psycopg would send."""

from __future__ import annotations

import uuid

import pytest
from adaccounts_server import models
from adaccounts_server.db import _literal
from psycopg.adapt import Transformer


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
