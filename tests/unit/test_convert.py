"""adaccounts_server.convert as pure logic, no server: each request kind parsed and validated,
rows back to protobuf, the etag, and the canonical hash a request_id is bound to.

(Names, time zones and mask indexes in depth: tests/unit/test_validation.py.)
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from types import SimpleNamespace

import pytest
from adaccounts.v1 import ad_accounts_pb2 as pb
from adaccounts_server import convert, models
from adaccounts_server.errors import InvalidArgument
from google.protobuf import field_mask_pb2
from helpers.rpc import new_account

OWNER = "123e4567-e89b-12d3-a456-426614174000"
ACCOUNT_ID = "3f2504e0-4f89-41d3-9a0c-0305e82c3301"


def account(**fields: object) -> pb.AdAccount:
    """helpers.rpc's valid account, with a fixed owner and external id."""
    return new_account(**{"owner_id": OWNER, "external_id": "act_1", **fields})


def violations(parse, request) -> dict[str, str]:  # type: ignore[no-untyped-def]
    """field -> description of the INVALID_ARGUMENT `parse(request)` raises."""
    with pytest.raises(InvalidArgument) as caught:
        parse(request)
    return {v.field: v.description for v in caught.value.violations}


def update(changes: pb.AdAccount, *paths: str) -> pb.UpdateAdAccountRequest:
    return pb.UpdateAdAccountRequest(ad_account=changes, update_mask=field_mask_pb2.FieldMask(paths=list(paths)))


# --- ids -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [ACCOUNT_ID, ACCOUNT_ID.upper()])
def test_an_id_in_canonical_form_of_any_case_is_parsed(text):
    assert convert.parse_id(text, "id") == uuid.UUID(ACCOUNT_ID)


@pytest.mark.parametrize(
    ("text", "description"),
    [
        ("", "required"),
        ("42", "must be a UUID"),
        (ACCOUNT_ID.replace("-", ""), "must be a UUID"),
        ("{" + ACCOUNT_ID + "}", "must be a UUID"),
        ("urn:uuid:" + ACCOUNT_ID, "must be a UUID"),
        (ACCOUNT_ID[:-1] + "g", "must be a UUID"),
        (ACCOUNT_ID + "0", "must be a UUID"),
        ("' OR 1=1 --", "must be a UUID"),
    ],
)
def test_an_id_in_any_other_form_is_refused_naming_the_field(text, description):
    found = violations(lambda request: convert.parse_id(request, "ids[3]"), text)
    assert list(found) == ["ids[3]"]
    assert found["ids[3]"].startswith(description)


# --- CreateAdAccount -----------------------------------------------------------------------------


def test_create_gives_the_account_normalised_and_defaults_the_status():
    new, request_id = convert.parse_create(
        pb.CreateAdAccountRequest(ad_account=account(owner_id=OWNER.upper(), currency_code="eur"))
    )
    assert new == convert.NewAccount(
        owner_id=uuid.UUID(OWNER),
        platform=models.Platform.META,
        external_id="act_1",
        name="Acme EU",
        currency_code="EUR",
        time_zone="Europe/Paris",
        status=models.Status.ACTIVE,
    )
    assert request_id is None


def test_create_takes_the_status_and_the_request_id_and_ignores_output_only_fields():
    request_id = str(uuid.uuid4())
    forged = account(id=ACCOUNT_ID, etag="forged", status=pb.STATUS_PAUSED, platform=pb.PLATFORM_TIKTOK)
    forged.create_time.FromDatetime(datetime(2000, 1, 1))
    new, parsed_id = convert.parse_create(pb.CreateAdAccountRequest(ad_account=forged, request_id=request_id))
    assert (new.status, new.platform) == (models.Status.PAUSED, models.Platform.TIKTOK)
    assert parsed_id == uuid.UUID(request_id)
    assert not hasattr(new, "id")
    assert not hasattr(new, "etag")


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"owner_id": ""}, "ad_account.owner_id"),
        ({"owner_id": "not-a-uuid"}, "ad_account.owner_id"),
        ({"platform": pb.PLATFORM_UNSPECIFIED}, "ad_account.platform"),
        ({"platform": 42}, "ad_account.platform"),
        ({"status": 42}, "ad_account.status"),
        ({"external_id": ""}, "ad_account.external_id"),
        ({"external_id": "act 1"}, "ad_account.external_id"),
        ({"external_id": "x" * 65}, "ad_account.external_id"),
        ({"name": ""}, "ad_account.name"),
        ({"name": "x" * 201}, "ad_account.name"),
        ({"currency_code": "EURO"}, "ad_account.currency_code"),
        ({"currency_code": "ÉUR"}, "ad_account.currency_code"),
        ({"time_zone": "Mars/Olympus_Mons"}, "ad_account.time_zone"),
    ],
)
def test_create_with_one_bad_field_names_that_field_alone(fields, field):
    assert list(violations(convert.parse_create, pb.CreateAdAccountRequest(ad_account=account(**fields)))) == [field]


def test_create_limits_are_inclusive():
    new, _ = convert.parse_create(pb.CreateAdAccountRequest(ad_account=account(name="n" * 200, external_id="e" * 64)))
    assert (len(new.name), len(new.external_id)) == (200, 64)


def test_create_reports_every_violation_at_once():
    assert set(violations(convert.parse_create, pb.CreateAdAccountRequest(request_id="retry-1"))) == {
        "ad_account",
        "ad_account.owner_id",
        "ad_account.platform",
        "ad_account.external_id",
        "ad_account.name",
        "ad_account.currency_code",
        "ad_account.time_zone",
        "request_id",
    }


# --- UpdateAdAccount -----------------------------------------------------------------------------


def test_an_empty_mask_means_every_mutable_field_that_is_set():
    parsed = convert.parse_update(
        update(pb.AdAccount(id=ACCOUNT_ID.upper(), name="N", status=pb.STATUS_PAUSED, etag="7"))
    )
    assert parsed == convert.Update(
        id=uuid.UUID(ACCOUNT_ID), etag="7", changes={"name": "N", "status": models.Status.PAUSED}
    )


def test_a_mask_changes_only_its_paths_and_star_replaces_every_mutable_field():
    changes = pb.AdAccount(id=ACCOUNT_ID, name="N", currency_code="usd", time_zone="UTC", status=pb.STATUS_ARCHIVED)
    assert convert.parse_update(update(changes, "currency_code")).changes == {"currency_code": "USD"}
    assert convert.parse_update(update(changes, "*")).changes == {
        "name": "N",
        "currency_code": "USD",
        "time_zone": "UTC",
        "status": models.Status.ARCHIVED,
    }
    assert convert.parse_update(update(changes, "name", "name")).changes == {"name": "N"}


def test_star_is_a_full_replacement_so_a_field_left_out_is_refused():
    assert set(violations(convert.parse_update, update(pb.AdAccount(id=ACCOUNT_ID, name="only"), "*"))) == {
        "ad_account.currency_code",
        "ad_account.time_zone",
        "ad_account.status",
    }


@pytest.mark.parametrize(
    ("paths", "field", "description"),
    [
        (["owner_id"], "update_mask.paths[0]", "owner_id cannot be changed after creation"),
        (["name", "external_id"], "update_mask.paths[1]", "external_id cannot be changed after creation"),
        (["etag"], "update_mask.paths[0]", "etag is output only"),
        (["create_time"], "update_mask.paths[0]", "create_time is output only"),
        (["nmae"], "update_mask.paths[0]", "unknown field 'nmae'"),
        (["name", "*"], "update_mask.paths", '"*" must be the only path'),
    ],
)
def test_a_bad_mask_path_is_refused_naming_where_it_is(paths, field, description):
    found = violations(convert.parse_update, update(pb.AdAccount(id=ACCOUNT_ID, name="N"), *paths))
    assert found[field].startswith(description)


def test_an_update_of_nothing_or_of_no_account_is_refused():
    assert list(violations(convert.parse_update, update(pb.AdAccount(id=ACCOUNT_ID)))) == ["update_mask"]
    assert set(violations(convert.parse_update, pb.UpdateAdAccountRequest())) == {"ad_account", "ad_account.id"}


# --- BatchGetAdAccounts --------------------------------------------------------------------------


def test_batch_ids_keep_their_order_and_repeats_up_to_1000():
    ids = [str(uuid.uuid4()) for _ in range(3)]
    wanted = [ids[2], ids[0].upper(), ids[2]]
    assert convert.parse_batch_ids(wanted) == [uuid.UUID(i) for i in wanted]
    assert len(convert.parse_batch_ids([ACCOUNT_ID] * 1000)) == 1000
    assert list(violations(convert.parse_batch_ids, [ACCOUNT_ID] * 1001)) == ["ids"]
    assert convert.parse_batch_ids([]) == []


def test_violations_are_capped_and_the_rest_counted():
    # The status travels in trailing metadata, which clients refuse past a few KiB.
    with pytest.raises(InvalidArgument) as caught:
        convert.parse_batch_ids(["bad"] * 25)
    fields = [v.field for v in caught.value.violations]
    assert fields == [f"ids[{i}]" for i in range(10)] + [""]  # ten, then how many more
    assert caught.value.violations[-1].description == "and 15 more problems like these"


# --- ListAdAccounts ------------------------------------------------------------------------------


def test_list_defaults_to_50_by_create_time_and_caps_the_page_size():
    filters, page_size = convert.parse_list(pb.ListAdAccountsRequest())
    assert (filters, page_size) == (convert.ListFilters(None, (), (), "create_time"), 50)
    assert convert.parse_list(pb.ListAdAccountsRequest(page_size=5000))[1] == 1000
    assert convert.parse_list(pb.ListAdAccountsRequest(page_size=7))[1] == 7


def test_list_filters_are_parsed_and_repeats_collapsed():
    filters, _ = convert.parse_list(
        pb.ListAdAccountsRequest(
            owner_id=OWNER.upper(),
            platforms=[pb.PLATFORM_X, pb.PLATFORM_META, pb.PLATFORM_X],
            statuses=[pb.STATUS_ACTIVE, pb.STATUS_ACTIVE],
            order_by="  NAME   Desc ",
        )
    )
    assert filters == convert.ListFilters(
        uuid.UUID(OWNER), (models.Platform.X, models.Platform.META), (models.Status.ACTIVE,), "name desc"
    )
    assert filters.sorts_by_name


def test_bad_list_requests_name_each_problem():
    request = pb.ListAdAccountsRequest(
        page_size=-1,
        owner_id="nope",
        platforms=[pb.PLATFORM_META, 99],
        statuses=[pb.STATUS_UNSPECIFIED],
        order_by="id",
    )
    assert set(violations(convert.parse_list, request)) == {
        "page_size",
        "owner_id",
        "platforms[1]",
        "statuses[0]",
        "order_by",
    }


@pytest.mark.parametrize("order_by", ["update_time", "id", "name asc", "name; DROP TABLE ad_accounts", "create_time,"])
def test_only_the_supported_orders_are_accepted(order_by):
    assert list(violations(convert.parse_list, pb.ListAdAccountsRequest(order_by=order_by))) == ["order_by"]


def test_the_filters_fingerprint_ignores_the_order_of_the_filter_lists_only():
    def fingerprint(**fields: object) -> str:
        return convert.parse_list(pb.ListAdAccountsRequest(**fields))[0].fingerprint()

    both = fingerprint(platforms=[pb.PLATFORM_META, pb.PLATFORM_X], statuses=[pb.STATUS_PAUSED, pb.STATUS_ACTIVE])
    assert both == fingerprint(
        platforms=[pb.PLATFORM_X, pb.PLATFORM_META], statuses=[pb.STATUS_ACTIVE, pb.STATUS_PAUSED]
    )
    others = [
        fingerprint(),
        fingerprint(owner_id=OWNER),
        fingerprint(platforms=[pb.PLATFORM_META]),
        fingerprint(statuses=[pb.STATUS_PAUSED]),
        fingerprint(order_by="name"),
        both,
    ]
    assert len(set(others)) == len(others)


# --- rows to messages ----------------------------------------------------------------------------


def row(**fields: object) -> SimpleNamespace:
    values: dict[str, object] = {
        "id": uuid.UUID(ACCOUNT_ID),
        "owner_id": uuid.UUID(OWNER),
        "platform": models.Platform.GOOGLE,
        "external_id": "123-456-7890",
        "name": "Acme",
        "currency_code": "JPY",
        "time_zone": "Asia/Tokyo",
        "status": models.Status.DISABLED,
        "create_time": datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
        "update_time": datetime(2026, 2, 3, 4, 5, 6, 7, tzinfo=UTC),
        "version": 3,
    }
    values.update(fields)
    return SimpleNamespace(**values)


def test_a_row_becomes_the_message_with_its_etag():
    message = convert.to_proto(row())
    assert message == pb.AdAccount(
        id=ACCOUNT_ID,
        owner_id=OWNER,
        platform=pb.PLATFORM_GOOGLE,
        external_id="123-456-7890",
        name="Acme",
        currency_code="JPY",
        time_zone="Asia/Tokyo",
        status=pb.STATUS_DISABLED,
        create_time=message.create_time,
        update_time=message.update_time,
        etag="3",
    )
    assert message.create_time.ToDatetime(UTC) == datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    assert message.update_time.ToDatetime(UTC) == datetime(2026, 2, 3, 4, 5, 6, 7, tzinfo=UTC)
    assert convert.etag_of(row(version=4)) == "4" != message.etag


def test_times_from_sqlite_are_naive_and_read_as_utc():
    naive = convert.to_proto(row(create_time=datetime(2026, 1, 2, 3, 4, 5), update_time=datetime(1969, 12, 31, 23, 59)))
    assert naive.create_time.ToDatetime(UTC) == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert naive.update_time.ToDatetime(UTC) == datetime(1969, 12, 31, 23, 59, tzinfo=UTC)  # before the epoch too


def test_every_platform_and_status_maps_both_ways():
    for platform in models.Platform:
        for status in models.Status:
            message = convert.to_proto(row(platform=platform, status=status))
            new, _ = convert.parse_create(
                pb.CreateAdAccountRequest(ad_account=account(platform=message.platform, status=message.status))
            )
            assert (new.platform, new.status) == (platform, status)


# --- what a request_id is bound to -------------------------------------------------------------


def new_account_of(**fields: object) -> convert.NewAccount:
    return convert.parse_create(pb.CreateAdAccountRequest(ad_account=account(**fields)))[0]


def test_the_request_hash_is_the_same_however_the_same_account_is_written():
    first = new_account_of()
    assert len(first.request_hash()) == 32
    for same in (
        new_account_of(owner_id=OWNER.upper()),
        new_account_of(currency_code="eur"),
        new_account_of(status=pb.STATUS_ACTIVE),  # the default, spelled out
    ):
        assert same.request_hash() == first.request_hash()


@pytest.mark.parametrize(
    "change",
    [
        {"owner_id": str(uuid.UUID(int=1))},
        {"platform": pb.PLATFORM_X},
        {"external_id": "act_2"},
        {"name": "Acme EU "},
        {"currency_code": "USD"},
        {"time_zone": "UTC"},
        {"status": pb.STATUS_PAUSED},
    ],
    ids=lambda change: next(iter(change)),
)
def test_any_difference_in_the_account_changes_the_request_hash(change):
    assert new_account_of(**change).request_hash() != new_account_of().request_hash()
