"""Server credentials for GRPC_TLS=tls|mtls, re-read when the files change.

gRPC asks the fetcher before every new connection's handshake; it answers with
a new configuration only when one of the files changed since the last read, so
a certificate rotated in place (cert-manager, a re-mounted Secret) is served to
the next connection without a restart. A rotation caught half-written (a file
that does not load) keeps the configuration already in use.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import grpc

from .config import Settings

log = logging.getLogger(__name__)


class _RotatingFiles:
    def __init__(self, cert: Path, key: Path, client_ca: Path | None) -> None:
        self._paths = (cert, key, client_ca)
        self._lock = threading.Lock()
        self._stamps = self._stat()
        self.initial = self._load()

    def _stat(self) -> tuple[tuple[int, int, int], ...]:
        stamps = []
        for path in self._paths:
            if path is None:
                stamps.append((0, 0, 0))
                continue
            st = path.stat()
            stamps.append((st.st_mtime_ns, st.st_size, st.st_ino))
        return tuple(stamps)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        cert, key, client_ca = self._paths
        return grpc.ssl_server_certificate_configuration(
            [(key.read_bytes(), cert.read_bytes())],
            root_certificates=client_ca.read_bytes() if client_ca is not None else None,
        )

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """Called by gRPC before each handshake: a new configuration, or None to keep the current one."""
        with self._lock:
            try:
                stamps = self._stat()
                if stamps == self._stamps:
                    return None
                configuration = self._load()
            except OSError as error:
                log.warning("tls: cannot read the certificate files, keeping the current ones: %s", error.strerror)
                return None
            self._stamps = stamps
            log.info("tls: certificate files changed, serving the new ones to new connections")
            return configuration


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """None for GRPC_TLS=off (plaintext); otherwise credentials that follow the files."""
    if settings.GRPC_TLS == "off":
        return None
    assert settings.GRPC_TLS_CERT_FILE is not None  # checked by config
    assert settings.GRPC_TLS_KEY_FILE is not None
    mutual = settings.GRPC_TLS == "mtls"
    files = _RotatingFiles(
        settings.GRPC_TLS_CERT_FILE,
        settings.GRPC_TLS_KEY_FILE,
        settings.GRPC_TLS_CLIENT_CA_FILE if mutual else None,
    )
    return grpc.dynamic_ssl_server_credentials(
        files.initial,
        files.fetch,  # type: ignore[arg-type]  # gRPC documents None as "no change"; grpc-stubs leaves it out
        require_client_authentication=mutual,
    )
