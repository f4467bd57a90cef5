"""One socket write per response: uvicorn's httptools protocol, with its transport holding a
response's status line and headers until the body follows them.

uvicorn writes the headers when the app sends `http.response.start` and the body when it sends
`http.response.body`: two `send` system calls and, on the client's side, often two wake-ups and
two reads for one small answer. Every response of this service is built whole before it is
sent, so the two writes come in the same turn of the event loop; joining them saves a system
call per request on the server and a wake-up on the client, both on the same cores as the
model under load. Headers with no body behind them in the same turn (a streamed answer, a
response with nothing more to send) still go out at the end of that turn.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol  # uvicorn[standard]


class CoalescingTransport:
    """A transport whose write of a status line and headers waits for the next write (the body)
    or the end of the loop's turn, whichever comes first; anything else passes straight on."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            self._transport.write(held + data)
        elif bytes(data[:5]) == b"HTTP/" and bytes(data[-4:]) == b"\r\n\r\n":
            self._held = bytes(data)
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        """Write what is held, if anything."""
        if self._held is not None:
            held, self._held = self._held, None
            if not self._transport.is_closing():
                self._transport.write(held)

    def writelines(self, chunks: Any) -> None:
        self.write(b"".join(chunks))

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def __getattr__(self, name: str) -> Any:
        # is_closing, get_extra_info, pause_reading, resume_reading, ...: the real transport's
        return getattr(self._transport, name)


class OneWriteHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol over a `CoalescingTransport`: pass it as uvicorn's `http`."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(CoalescingTransport(transport, self.loop))  # type: ignore[arg-type]
