import datetime

from google.protobuf import empty_pb2 as _empty_pb2
from google.protobuf import field_mask_pb2 as _field_mask_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Platform(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLATFORM_UNSPECIFIED: _ClassVar[Platform]
    PLATFORM_META: _ClassVar[Platform]
    PLATFORM_GOOGLE: _ClassVar[Platform]
    PLATFORM_TIKTOK: _ClassVar[Platform]
    PLATFORM_LINKEDIN: _ClassVar[Platform]
    PLATFORM_MICROSOFT: _ClassVar[Platform]
    PLATFORM_SNAPCHAT: _ClassVar[Platform]
    PLATFORM_PINTEREST: _ClassVar[Platform]
    PLATFORM_X: _ClassVar[Platform]
    PLATFORM_AMAZON: _ClassVar[Platform]

class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATUS_UNSPECIFIED: _ClassVar[Status]
    STATUS_ACTIVE: _ClassVar[Status]
    STATUS_PAUSED: _ClassVar[Status]
    STATUS_DISABLED: _ClassVar[Status]
    STATUS_ARCHIVED: _ClassVar[Status]
PLATFORM_UNSPECIFIED: Platform
PLATFORM_META: Platform
PLATFORM_GOOGLE: Platform
PLATFORM_TIKTOK: Platform
PLATFORM_LINKEDIN: Platform
PLATFORM_MICROSOFT: Platform
PLATFORM_SNAPCHAT: Platform
PLATFORM_PINTEREST: Platform
PLATFORM_X: Platform
PLATFORM_AMAZON: Platform
STATUS_UNSPECIFIED: Status
STATUS_ACTIVE: Status
STATUS_PAUSED: Status
STATUS_DISABLED: Status
STATUS_ARCHIVED: Status

class AdAccount(_message.Message):
    __slots__ = ("id", "owner_id", "platform", "external_id", "name", "currency_code", "time_zone", "status", "create_time", "update_time", "etag")
    ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_ID_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_CODE_FIELD_NUMBER: _ClassVar[int]
    TIME_ZONE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    id: str
    owner_id: str
    platform: Platform
    external_id: str
    name: str
    currency_code: str
    time_zone: str
    status: Status
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    etag: str
    def __init__(self, id: _Optional[str] = ..., owner_id: _Optional[str] = ..., platform: _Optional[_Union[Platform, str]] = ..., external_id: _Optional[str] = ..., name: _Optional[str] = ..., currency_code: _Optional[str] = ..., time_zone: _Optional[str] = ..., status: _Optional[_Union[Status, str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., etag: _Optional[str] = ...) -> None: ...

class GetAdAccountRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class BatchGetAdAccountsRequest(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ids: _Optional[_Iterable[str]] = ...) -> None: ...

class BatchGetAdAccountsResponse(_message.Message):
    __slots__ = ("ad_accounts",)
    AD_ACCOUNTS_FIELD_NUMBER: _ClassVar[int]
    ad_accounts: _containers.RepeatedCompositeFieldContainer[AdAccount]
    def __init__(self, ad_accounts: _Optional[_Iterable[_Union[AdAccount, _Mapping]]] = ...) -> None: ...

class ListAdAccountsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "owner_id", "platforms", "statuses", "order_by")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    OWNER_ID_FIELD_NUMBER: _ClassVar[int]
    PLATFORMS_FIELD_NUMBER: _ClassVar[int]
    STATUSES_FIELD_NUMBER: _ClassVar[int]
    ORDER_BY_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    owner_id: str
    platforms: _containers.RepeatedScalarFieldContainer[Platform]
    statuses: _containers.RepeatedScalarFieldContainer[Status]
    order_by: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., owner_id: _Optional[str] = ..., platforms: _Optional[_Iterable[_Union[Platform, str]]] = ..., statuses: _Optional[_Iterable[_Union[Status, str]]] = ..., order_by: _Optional[str] = ...) -> None: ...

class ListAdAccountsResponse(_message.Message):
    __slots__ = ("ad_accounts", "next_page_token")
    AD_ACCOUNTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    ad_accounts: _containers.RepeatedCompositeFieldContainer[AdAccount]
    next_page_token: str
    def __init__(self, ad_accounts: _Optional[_Iterable[_Union[AdAccount, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CreateAdAccountRequest(_message.Message):
    __slots__ = ("ad_account", "request_id")
    AD_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ad_account: AdAccount
    request_id: str
    def __init__(self, ad_account: _Optional[_Union[AdAccount, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class UpdateAdAccountRequest(_message.Message):
    __slots__ = ("ad_account", "update_mask")
    AD_ACCOUNT_FIELD_NUMBER: _ClassVar[int]
    UPDATE_MASK_FIELD_NUMBER: _ClassVar[int]
    ad_account: AdAccount
    update_mask: _field_mask_pb2.FieldMask
    def __init__(self, ad_account: _Optional[_Union[AdAccount, _Mapping]] = ..., update_mask: _Optional[_Union[_field_mask_pb2.FieldMask, _Mapping]] = ...) -> None: ...

class DeleteAdAccountRequest(_message.Message):
    __slots__ = ("id", "etag")
    ID_FIELD_NUMBER: _ClassVar[int]
    ETAG_FIELD_NUMBER: _ClassVar[int]
    id: str
    etag: str
    def __init__(self, id: _Optional[str] = ..., etag: _Optional[str] = ...) -> None: ...
