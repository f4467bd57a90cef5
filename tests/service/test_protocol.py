"""One socket write per response: the transport that joins a response's headers to its body."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from fastapi import FastAPI
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from service.protocol import CoalescingTransport, OneWriteHttpToolsProtocol
from tests.uvicorn_thread import uvicorn_in_thread

HEADERS = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"


class RecordingTransport:
    """What reached the socket, write by write."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.writes.append(bytes(data))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 1234)}.get(name, default)


def run(scenario: Any) -> RecordingTransport:
    async def main() -> RecordingTransport:
        real = RecordingTransport()
        await scenario(CoalescingTransport(real, asyncio.get_running_loop()))  # type: ignore[arg-type]
        return real

    return asyncio.run(main())


def test_headers_and_body_sent_in_the_same_turn_go_out_in_one_write() -> None:
    async def scenario(t: CoalescingTransport) -> None:
        t.write(HEADERS)
        t.write(b"{}")
        await asyncio.sleep(0)

    assert run(scenario).writes == [HEADERS + b"{}"]


def test_headers_with_no_body_behind_them_go_out_at_the_end_of_the_turn() -> None:
    async def scenario(t: CoalescingTransport) -> None:
        t.write(HEADERS)
        await asyncio.sleep(0)  # a streamed answer: the body comes later
        assert real_writes(t) == [HEADERS]
        t.write(b"{}")

    assert run(scenario).writes == [HEADERS, b"{}"]


def test_other_writes_pass_straight_through() -> None:
    async def scenario(t: CoalescingTransport) -> None:
        t.write(b"HTTP/1.1 100 Continue")  # not a whole head: passes
        t.write(b"chunk")
        assert real_writes(t) == [b"HTTP/1.1 100 Continue", b"chunk"]

    assert run(scenario).writes == [b"HTTP/1.1 100 Continue", b"chunk"]


def test_close_writes_what_is_held_first() -> None:
    async def scenario(t: CoalescingTransport) -> None:
        t.write(HEADERS)
        t.close()
        await asyncio.sleep(0)  # the end-of-turn flush finds nothing left, writes nothing

    real = run(scenario)
    assert real.writes == [HEADERS] and real.closed


def test_everything_else_is_the_real_transports() -> None:
    async def scenario(t: CoalescingTransport) -> None:
        assert t.get_extra_info("peername") == ("127.0.0.1", 1234)
        assert t.is_closing() is False

    run(scenario)


def real_writes(t: CoalescingTransport) -> list[bytes]:
    return t._transport.writes  # type: ignore[attr-defined,no-any-return]


class Recorder:
    """Between uvicorn and the socket: notes each write, then makes it."""

    def __init__(self, transport: asyncio.Transport, writes: list[bytes]) -> None:
        self._transport, self.writes = transport, writes

    def write(self, data: bytes) -> None:
        self.writes.append(bytes(data))
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


def socket_writes(protocol: type[HttpToolsProtocol], requests: int) -> list[bytes]:
    """What a real uvicorn server wrote to its sockets answering `requests` POSTs over TCP."""
    writes: list[bytes] = []

    class Recorded(protocol):  # type: ignore[misc,valid-type]
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(Recorder(transport, writes))  # type: ignore[arg-type]

    app = FastAPI()

    @app.post("/echo")
    async def echo(body: dict[str, str]) -> dict[str, str]:
        return body

    with uvicorn_in_thread(app, http=Recorded) as url, httpx.Client(base_url=url) as client:
        for i in range(requests):
            assert client.post("/echo", json={"n": str(i)}).json() == {"n": str(i)}
    return writes


def test_a_real_server_answers_each_request_in_one_socket_write() -> None:
    plain = socket_writes(HttpToolsProtocol, 5)
    ours = socket_writes(OneWriteHttpToolsProtocol, 5)
    assert len(plain) == 10  # uvicorn alone: the head, then the body
    assert len(ours) == 5
    assert all(w.startswith(b"HTTP/1.1 200 OK\r\n") and w.endswith(b'"}') for w in ours)
    assert [w.split(b"\r\n\r\n")[1] for w in ours] == [b'{"n":"%d"}' % i for i in range(5)]
