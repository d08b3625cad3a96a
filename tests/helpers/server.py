"""A real server, in this process, on its own event loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

from adaccounts_server.app import App
from adaccounts_server.config import Settings


class RunningServer:
    """An App serving on its own event loop in a background thread."""

    def __init__(self, settings: Settings) -> None:
        self.app = App(settings)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="test-server", daemon=True)
        self._thread.start()
        self.port = self._call(self.app.start())
        self.target = f"127.0.0.1:{self.port}"
        self._stopping: concurrent.futures.Future[None] | None = None

    def _call(self, coroutine, timeout: float = 30):  # type: ignore[no-untyped-def]
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout)

    def begin_stop(self) -> concurrent.futures.Future[None]:
        """Start the App's graceful stop (as SIGTERM does) and return at once; stop() finishes it."""
        self._stopping = asyncio.run_coroutine_threadsafe(self.app.stop(), self._loop)
        return self._stopping

    def stop(self) -> None:
        try:
            if self._stopping is None:
                self._call(self.app.stop())
            else:
                self._stopping.result(timeout=30)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
