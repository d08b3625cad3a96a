"""Client for the adaccounts.v1 service: typed calls instead of database credentials.

    from adaccounts import AdAccountsClient, AdAccount, PLATFORM_META

The generated messages and stubs live in adaccounts.v1; what is re-exported
here is what a calling service needs day to day: the clients, the messages and
enums it passes and gets back, and every exception they raise.
"""

# The client's version follows the contract it was generated from: the major
# version is the proto package's (adaccounts.v1 -> 1.x.y), the minor goes up with
# every additive change to that package, the patch with client-only fixes.
__version__ = "1.2.0"

from ._common import RetryPolicy
from .aio import AsyncAdAccountsClient
from .client import AdAccountsClient, tls_credentials
from .errors import (
    CONSISTENCY_TOKEN_KEY,
    Aborted,
    AdAccountsError,
    AlreadyExists,
    ClientClosed,
    Conflict,
    ConnectionFailed,
    DeadlineExceeded,
    FieldViolation,
    Internal,
    InvalidArgument,
    InvalidConsistencyToken,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    RpcStatus,
    Unauthenticated,
    Unavailable,
)
from .v1.ad_accounts_pb2 import (
    PLATFORM_AMAZON,
    PLATFORM_GOOGLE,
    PLATFORM_LINKEDIN,
    PLATFORM_META,
    PLATFORM_MICROSOFT,
    PLATFORM_PINTEREST,
    PLATFORM_SNAPCHAT,
    PLATFORM_TIKTOK,
    PLATFORM_UNSPECIFIED,
    PLATFORM_X,
    STATUS_ACTIVE,
    STATUS_ARCHIVED,
    STATUS_DISABLED,
    STATUS_PAUSED,
    STATUS_UNSPECIFIED,
    AdAccount,
    ListAdAccountsResponse,
    Platform,
    Status,
)

__all__ = [
    "CONSISTENCY_TOKEN_KEY",
    "PLATFORM_AMAZON",
    "PLATFORM_GOOGLE",
    "PLATFORM_LINKEDIN",
    "PLATFORM_META",
    "PLATFORM_MICROSOFT",
    "PLATFORM_PINTEREST",
    "PLATFORM_SNAPCHAT",
    "PLATFORM_TIKTOK",
    "PLATFORM_UNSPECIFIED",
    "PLATFORM_X",
    "STATUS_ACTIVE",
    "STATUS_ARCHIVED",
    "STATUS_DISABLED",
    "STATUS_PAUSED",
    "STATUS_UNSPECIFIED",
    "Aborted",
    "AdAccount",
    "AdAccountsClient",
    "AdAccountsError",
    "AlreadyExists",
    "AsyncAdAccountsClient",
    "ClientClosed",
    "Conflict",
    "ConnectionFailed",
    "DeadlineExceeded",
    "FieldViolation",
    "Internal",
    "InvalidArgument",
    "InvalidConsistencyToken",
    "ListAdAccountsResponse",
    "NotFound",
    "PermissionDenied",
    "Platform",
    "ResourceExhausted",
    "RetryPolicy",
    "RpcStatus",
    "Status",
    "Unauthenticated",
    "Unavailable",
    "tls_credentials",
]
