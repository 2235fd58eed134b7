#!/usr/bin/env python3
"""The aiohttp + uvloop reverse proxy that bench/overhead.py sets beside llmux.py.

    PYTHON bench/aiohttp_peer.py --port-fd FD --upstream PORT

It does what llmux does on its fast path and nothing more: it reads the request body,
takes "model" from it (json.loads, as a router must), sends the request to the one
backend over a pooled keep-alive connection, and streams the answer back piece by piece
as it arrives (StreamResponse + iter_any).  It serves on the listening socket it is
given (web.SockSite), so the bench never reserves a port for it.
"""

import argparse
import asyncio
import json
import socket
from typing import Any

import uvloop
from aiohttp import ClientSession, ClientTimeout, TCPConnector, web

# Hop-by-hop headers (RFC 9110 7.6.1) and the framing aiohttp sets itself.
HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
       "upgrade", "host", "content-length"}
MAX_BODY = 64 * 1024 * 1024  # llmux's default max_body_bytes


async def serve(fd: int, upstream: str) -> None:
    # limit=0: no cap on upstream connections (llmux and nginx have none either).
    session = ClientSession(connector=TCPConnector(limit=0), auto_decompress=False,
                            timeout=ClientTimeout(total=None))

    async def proxy(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        if not isinstance(json.loads(body or b"{}").get("model"), str):
            return web.json_response({"error": "no model"}, status=400)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP}
        async with session.request(request.method, upstream + request.path_qs,
                                   data=body, headers=headers) as up:
            answer = web.StreamResponse(status=up.status, headers={
                k: v for k, v in up.headers.items() if k.lower() not in HOP - {"content-length"}})
            await answer.prepare(request)
            async for piece in up.content.iter_any():
                await answer.write(piece)
            await answer.write_eof()
            return answer

    app = web.Application(client_max_size=MAX_BODY)
    app.router.add_route("*", "/{tail:.*}", proxy)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.SockSite(runner, socket.socket(fileno=fd)).start()
    try:
        await asyncio.Event().wait()
    finally:
        await session.close()
        await runner.cleanup()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--port-fd", type=int, required=True, help="inherited listening socket")
    ap.add_argument("--upstream", type=int, required=True, help="backend port on 127.0.0.1")
    args: Any = ap.parse_args()
    uvloop.install()
    asyncio.run(serve(args.port_fd, f"http://127.0.0.1:{args.upstream}"))


if __name__ == "__main__":
    main()
