#!/usr/bin/env python3
"""The HTTP floor: the least an HTTP proxy on stdlib asyncio can do to route by "model".

    python3 bench/http_floor_peer.py --port-fd FD --upstream PORT

Everything is done from protocol callbacks (no task, no StreamReader, no await), and only
what routing by model needs: find the head's end, read Content-Length, wait for the body,
read "model" with json.loads, take a pooled backend connection, send the head with a new
Host, read the answer's framing (Content-Length or chunked) from its head, relay the body
as it comes and pool the connection at its end.  Nothing is checked (no grammar, limits,
timeouts, auth, CORS, log, metrics, queue, back-pressure), so it is not a proxy anyone
should run; bench/overhead.py runs it as the "asyncio HTTP floor" column, the cost of
being an HTTP proxy on asyncio at all, which llmux.py's own work comes on top of.
"""

import asyncio
import json
import re
from typing import Dict, List, Optional, cast

from floor_peer import run_peer

_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]+)", re.IGNORECASE)
_HOST = re.compile(rb"\r\nhost:[^\r]*", re.IGNORECASE)
_CHUNKED = re.compile(rb"\r\ntransfer-encoding:[ \t]*chunked", re.IGNORECASE)


class _Up(asyncio.Protocol):
    """A pooled backend connection, relaying one answer at a time to ``client``."""

    def __init__(self, pool: List["_Up"]) -> None:
        self.pool = pool
        self.transport: Optional[asyncio.Transport] = None
        self.client: Optional["_Client"] = None
        self.buf = b""
        self.left = -1  # body bytes still due (-1: the head is still due; -2: chunked)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, client: "_Client", data: bytes) -> None:
        self.client, self.buf, self.left = client, b"", -1
        assert self.transport is not None
        self.transport.write(data)

    def send_for(self, transport: asyncio.WriteTransport, data: bytes) -> "asyncio.Future[None]":
        """--tasks: relay the answer to ``transport``; the future resolves at its end."""
        done = asyncio.get_running_loop().create_future()
        self.send(cast(_Client, _Ended(transport, done)), data)
        return done

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is None or client.transport is None:
            return
        if self.left == -1:
            data = self.buf + data
            end = data.find(b"\r\n\r\n")
            if end < 0:
                self.buf = data
                return
            head = data[:end]
            length = _LENGTH.search(head)
            self.left = int(length.group(1)) - (len(data) - end - 4) if length else -2
        elif self.left >= 0:
            self.left -= len(data)
        client.transport.write(data)
        if self.left == 0 or (self.left == -2 and data.endswith(b"0\r\n\r\n")):
            self.client = None
            self.pool.append(self)
            client.answered()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self in self.pool:
            self.pool.remove(self)
        if self.client is not None and self.client.transport is not None:
            self.client.transport.close()


class _Ended:
    """--tasks: stands in for a _Client, resolving a future when the answer has ended."""

    def __init__(self, transport: asyncio.WriteTransport, done: "asyncio.Future[None]") -> None:
        self.transport = transport
        self.done = done

    def answered(self) -> None:
        self.done.set_result(None)


class _Client(asyncio.Protocol):
    upstream_port = 0
    pools: Dict[str, List[_Up]] = {}

    def __init__(self) -> None:
        self.transport: Optional[asyncio.Transport] = None
        self.buf = bytearray()
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf += data
        self._next()

    def answered(self) -> None:
        self.busy = False
        if self.buf:
            self._next()

    def _next(self) -> None:
        if self.busy:
            return
        buf = self.buf
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            return
        length = _LENGTH.search(buf, 0, end)
        size = int(length.group(1)) if length else 0
        if len(buf) < end + 4 + size:
            return  # the body is not all here yet
        head, body = bytes(buf[:end]), bytes(buf[end + 4:end + 4 + size])
        del buf[:end + 4 + size]
        model = json.loads(body).get("model", "") if body else ""
        self.busy = True
        head = _HOST.sub(b"\r\nhost: 127.0.0.1:%d" % self.upstream_port, head, 1)
        pool = self.pools.setdefault(model, [])
        if pool:
            pool.pop().send(self, head + b"\r\n\r\n" + body)
        else:
            asyncio.get_running_loop().create_task(self._connect(pool, head + b"\r\n\r\n" + body))

    async def _connect(self, pool: List[_Up], request: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, up = await loop.create_connection(lambda: _Up(pool), "127.0.0.1", self.upstream_port)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        up.send(self, request)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.transport = None


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """--tasks: the same, shaped as llmux.py is (and aiohttp, and most asyncio servers): a
    task per connection awaits each request on a StreamReader, and the answer's end."""
    buf = bytearray()
    port = _Client.upstream_port
    while True:
        end = buf.find(b"\r\n\r\n")
        length = _LENGTH.search(buf, 0, end) if end >= 0 else None
        while end < 0 or len(buf) < end + 4 + (int(length.group(1)) if length else 0):
            data = await reader.read(65536)
            if not data:
                writer.close()
                return
            buf += data
            end = buf.find(b"\r\n\r\n")
            length = _LENGTH.search(buf, 0, end) if end >= 0 else None
        size = int(length.group(1)) if length else 0
        head, body = bytes(buf[:end]), bytes(buf[end + 4:end + 4 + size])
        del buf[:end + 4 + size]
        model = json.loads(body).get("model", "") if body else ""
        head = _HOST.sub(b"\r\nhost: 127.0.0.1:%d" % port, head, 1)
        pool = _Client.pools.setdefault(model, [])
        if pool:
            up = pool.pop()
        else:
            loop = asyncio.get_running_loop()
            _, up = await loop.create_connection(lambda: _Up(pool), "127.0.0.1", port)
        await up.send_for(cast(asyncio.WriteTransport, writer.transport), head + b"\r\n\r\n" + body)


def main() -> None:
    run_peer(_Client, _serve)


if __name__ == "__main__":
    main()
