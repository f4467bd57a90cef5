"""Graceful drain on SIGTERM, what keeps rolling updates invisible to clients:

1. `/ready` answers 503 at once, so load balancers stop sending work here;
2. after `drain_delay_s` (time for them to notice), it stops listening, and new work on open
   connections (any API request but a GET) is refused with 503, `Retry-After` and
   `Connection: close`, so a client or proxy retries it on another replica; while draining,
   every response closes its connection;
3. the batch-jobs worker stops claiming and hands its lines back at once, so another replica
   takes them;
4. requests in flight finish, for at most `drain_grace_s`;
5. then the server stops: connections close, the lifespan stops the worker and the batcher.

A second SIGTERM or SIGINT stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from collections.abc import Callable
from types import FrameType

import uvicorn
from fastapi import FastAPI
from starlette.datastructures import MutableHeaders
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.auth import ALWAYS_OPEN
from service.errors import error_body
from service.protocol import OneWriteHttpToolsProtocol
from service.settings import Settings
from service.state import ServiceState, get_state

log = logging.getLogger(__name__)

READS = frozenset({"GET", "HEAD"})


class InflightMiddleware:
    """Counts requests in flight (probes and scrapes aside) and, once draining, refuses new work."""

    def __init__(self, app: ASGIApp, state: ServiceState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in ALWAYS_OPEN:
            await self.app(scope, receive, send)
            return
        state = self.state
        if state.refusing and scope["method"] not in READS:
            state.metrics.rejections.labels("shutting_down").inc()
            body = error_body(
                "the server is shutting down; retry, another replica will answer",
                "service_unavailable",
                "shutting_down",
            )
            headers = {"Retry-After": "1", "Connection": "close"}
            await JSONResponse(body, status_code=503, headers=headers)(scope, receive, send)
            return
        state.inflight += 1
        state.idle.clear()

        async def closing(message: Message) -> None:
            # While draining, no connection is kept alive: a client's next request on it could
            # meet the server closing it. Each goes to a fresh connection, elsewhere.
            if message["type"] == "http.response.start" and state.draining:
                MutableHeaders(scope=message)["connection"] = "close"
            await send(message)

        try:
            await self.app(scope, receive, closing)
        finally:
            state.inflight -= 1
            if state.inflight == 0:
                state.idle.set()


async def drain(state: ServiceState, stop_listening: Callable[[], None] = lambda: None) -> None:
    """Steps 1 to 4 above; returns when in-flight requests are done or the grace period ends.
    `stop_listening` closes the listening sockets when new work is refused: a new connection
    is then refused by the kernel (clearly never accepted) rather than taken and dropped."""
    s = state.settings
    began = time.monotonic()
    state.draining = True
    log.info("draining", extra={"grace_s": s.drain_grace_s, "in_flight": state.inflight})
    if s.drain_delay_s > 0:
        await asyncio.sleep(s.drain_delay_s)
    state.refusing = True
    stop_listening()
    if state.jobs is not None:
        await state.jobs.drain()
    left = max(0.0, s.drain_grace_s - (time.monotonic() - began))
    try:
        async with asyncio.timeout(left):
            await state.idle.wait()
    except TimeoutError:
        log.warning(
            "drain grace period ended with requests in flight", extra={"in_flight": state.inflight}
        )
    log.info("drained", extra={"seconds": round(time.monotonic() - began, 3)})


class DrainingServer(uvicorn.Server):
    """uvicorn whose first SIGTERM/SIGINT drains before it stops, and exits 0 after it."""

    def __init__(self, config: uvicorn.Config, state: ServiceState) -> None:
        super().__init__(config)
        self.state = state
        self._draining: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reloads: set[asyncio.Task[dict[str, object]]] = set()

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        # SIGHUP reloads the models: new or replaced artifact folders are swapped in.
        self._loop.add_signal_handler(signal.SIGHUP, self._reload)
        await super().serve(sockets)

    def _reload(self) -> None:
        models = self.state.models
        if models is None or self.state.stopping:
            return
        log.info("signal received", extra={"signal": "SIGHUP"})
        task = asyncio.create_task(models.reload(), name="linmod-reload")
        self._reloads.add(task)
        task.add_done_callback(self._reloads.discard)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._draining is not None or self._loop is None or self.should_exit:
            self.should_exit = self.force_exit = True  # a second signal: stop now
            return
        log.info("signal received", extra={"signal": signal.Signals(sig).name})
        self._loop.call_soon_threadsafe(self._begin_drain)

    def _stop_listening(self) -> None:
        for server in self.servers:
            server.close()  # open connections stay; they close after their next response

    def _begin_drain(self) -> None:
        if self._draining is None:
            self._draining = asyncio.create_task(self._drain_then_exit(), name="linmod-drain")

    async def _drain_then_exit(self) -> None:
        try:
            await drain(self.state, self._stop_listening)
        finally:
            self.should_exit = True


def serve(app: FastAPI, settings: Settings) -> None:
    """Run the app under uvicorn until SIGTERM/SIGINT, draining first."""
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,  # uvicorn logs through ours
        access_log=False,  # the request middleware writes one structured line per request
        http=OneWriteHttpToolsProtocol,  # one socket write per response (service/protocol.py)
        # What the drain left running (it waited drain_grace_s already) gets this long.
        timeout_graceful_shutdown=max(1, int(settings.shutdown_timeout_s)),
    )
    DrainingServer(config, get_state(app)).run()
