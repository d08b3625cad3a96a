"""PostgreSQL's cancel request, sent without holding the GIL."""

from __future__ import annotations

import ctypes
import logging
from typing import Any

log = logging.getLogger(__name__)


class CancelRequest:
    """libpq's cancel request, sent without holding the GIL.

    psycopg2's connection.cancel() holds the GIL through libpq's PQcancel, which
    does not return while the server is stalled (SIGSTOP, a hung host): every
    thread of the process, the event loop and health checks included, would stop
    with it. The same libpq calls through ctypes release the GIL, so only the
    thread sending the cancel waits. Falls back to psycopg2's cancel() when the
    libpq that psycopg2 loaded cannot be found (not Linux, say).
    """

    _libpq: Any = None
    _looked = False

    def __init__(self, handle: int) -> None:
        self._handle = handle

    @classmethod
    def of(cls, connection: Any) -> CancelRequest | None:
        libpq = cls._load()
        pgconn = getattr(connection, "pgconn_ptr", None)
        if libpq is None or not pgconn or getattr(connection, "closed", True):
            return None
        handle = libpq.PQgetCancel(pgconn)
        return cls(handle) if handle else None

    def send(self) -> None:
        error = ctypes.create_string_buffer(256)
        try:
            if not self._libpq.PQcancel(self._handle, error, len(error)):
                log.debug("cancelling a statement failed: %s", error.value.decode(errors="replace").strip())
        finally:
            self._libpq.PQfreeCancel(self._handle)

    @classmethod
    def _load(cls) -> Any:
        if not cls._looked:
            cls._looked = True
            try:
                with open("/proc/self/maps") as maps:  # the very libpq psycopg2 uses, bundled or not
                    path = next((line.split()[-1] for line in maps if "/libpq" in line), None)
                if path is not None:
                    libpq = ctypes.CDLL(path)  # CDLL: calls release the GIL
                    libpq.PQgetCancel.argtypes, libpq.PQgetCancel.restype = [ctypes.c_void_p], ctypes.c_void_p
                    libpq.PQcancel.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int]
                    libpq.PQcancel.restype = ctypes.c_int
                    libpq.PQfreeCancel.argtypes, libpq.PQfreeCancel.restype = [ctypes.c_void_p], None
                    cls._libpq = libpq
            except (OSError, AttributeError) as error:
                log.debug("libpq not found for cancel requests: %s", error)
        return cls._libpq
