"""uvicorn's h11 protocol with a deadline for each request's headers.

uvicorn times out idle keep-alive connections but not a request whose headers never finish: a client that
opens connections and sends nothing, or a header line now and then, keeps each one open for ever (measured
on uvicorn 0.54: still open after 20 s), until the process runs out of file descriptors. Here a connection
waiting for a request's headers (a new one, or one whose last response is complete) is closed once
``header_timeout_s`` pass without them; bodies have their own deadline in the app (``body_timeout_s``).
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol


class HeaderDeadlineH11(H11Protocol):
    """:class:`H11Protocol` that closes a connection whose next request's headers are ``header_timeout_s`` late."""

    def __init__(self, *args: Any, header_timeout_s: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.header_timeout_s = header_timeout_s
        self._header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._expect_headers()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._expect_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_deadline()
        super().connection_lost(exc)

    def _expect_headers(self) -> None:
        # one pending deadline per connection, not one per response of a busy keep-alive connection
        self._cancel_deadline()
        if not self.transport.is_closing():
            self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_due, self.cycle)

    def _cancel_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_due(self, waiting_since: object) -> None:
        # a new request replaces self.cycle as soon as its headers are complete
        if self.cycle is waiting_since and not self.transport.is_closing():
            self.logger.debug("Closing a connection whose request headers took over %g s", self.header_timeout_s)
            self.transport.close()
