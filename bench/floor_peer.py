#!/usr/bin/env python3
"""The floor: what stdlib asyncio costs to move a proxy's bytes, with nothing else done.

    python3 bench/floor_peer.py --port-fd FD --upstream PORT

A TCP relay, not an HTTP proxy: each client connection gets its own backend connection
and bytes are copied both ways from protocol callbacks (no parsing, no pool, no task per
request, no log).  bench/overhead.py runs it as the "asyncio floor" column: no Python
proxy on asyncio can spend less per request or per chunk than this.
"""

import argparse
import asyncio
import gc
import socket
from typing import Awaitable, Callable, Optional


class _Up(asyncio.Protocol):
    def __init__(self, client: "_Client") -> None:
        self.client = client
        self.transport: Optional[asyncio.Transport] = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.client.transport is not None:
            self.client.transport.write(data)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self.client.transport is not None:
            self.client.transport.close()


class _Client(asyncio.Protocol):
    upstream_port = 0

    def __init__(self) -> None:
        self.transport: Optional[asyncio.Transport] = None
        self.up: Optional[_Up] = None
        self.early = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            _, up = await loop.create_connection(lambda: _Up(self), "127.0.0.1", self.upstream_port)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        self.up = up
        if self.early and up.transport is not None:
            up.transport.write(self.early)
            self.early = b""

    def data_received(self, data: bytes) -> None:
        if self.up is not None and self.up.transport is not None:
            self.up.transport.write(data)
        else:
            self.early += data

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.transport = None
        if self.up is not None and self.up.transport is not None:
            self.up.transport.close()


def run_peer(client: type, tasks: Optional[Callable[..., Awaitable[None]]] = None) -> None:
    """`--port-fd FD --upstream PORT [--tasks]`: serve ``client`` protocols on the socket
    FD, with ``client.upstream_port`` set (the HTTP floor, bench/http_floor_peer.py, too);
    with --tasks, ``tasks(reader, writer)`` serves each connection instead (streams)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--port-fd", type=int, required=True)
    ap.add_argument("--upstream", type=int, required=True)
    ap.add_argument("--tasks", action="store_true", help="a task per connection, on streams")
    args = ap.parse_args()
    client.upstream_port = args.upstream  # type: ignore[attr-defined]
    gc.disable()  # as the bench's own processes: no collector pauses in a floor

    async def run() -> None:
        sock = socket.socket(fileno=args.port_fd)
        if args.tasks and tasks is not None:
            server = await asyncio.start_server(tasks, sock=sock, backlog=1024)
        else:
            server = await asyncio.get_running_loop().create_server(client, sock=sock, backlog=1024)
        await server.serve_forever()

    asyncio.run(run())


def main() -> None:
    run_peer(_Client)


if __name__ == "__main__":
    main()
