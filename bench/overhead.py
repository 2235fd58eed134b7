#!/usr/bin/env python3
"""What llmux costs: the same load straight to a backend and through llmux, side by side.

    python3 bench/overhead.py [--quick]

Starts, as child processes, a minimal asyncio backend (this file, `backend` mode) and
llmux in front of it, then measures from this process:

  1. small non-streaming requests at 1 and 64 concurrent connections: req/s, p50/p99;
  2. 100 concurrent SSE streams: time to first byte, per-chunk latency (the backend
     stamps each event with its send time; latency = arrival - stamp);
  3. switch overhead: wake hook exit -> the first queued request at the backend;
  4. llmux's own CPU time (utime+stime from /proc) per proxied request and per chunk.

On a 2-core machine the client, llmux and the backend share the cores, so throughput
is bounded by the client; CPU time per request is the honest figure.  Traffic stays on
127.0.0.1.  Nothing here is asserted: it prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
LLMUX = str(ROOT / "llmux.py")


# ───────────────────────────── the backend (child process) ──────────────────────────────


async def _backend_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                        name: str, log: Optional[str]) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
            body = json.loads(await reader.readexactly(length)) if length else {}
            if log:
                with open(log, "a") as f:
                    f.write(f"{time.time():.6f} {name}\n")
            if not body.get("stream"):
                data = json.dumps({"backend": name, "ok": True}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                             b"content-length: %d\r\n\r\n%s" % (len(data), data))
                await writer.drain()
                continue
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                         b"transfer-encoding: chunked\r\n\r\n")
            for i in range(body["n"]):
                event = b"data: " + json.dumps({"i": i, "t": time.time()}).encode() + b"\n\n"
                writer.write(b"%x\r\n%s\r\n" % (len(event), event))
                await writer.drain()
                await asyncio.sleep(body["gap"])
            writer.write(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def backend_main(fd: int, name: str, log: Optional[str]) -> None:
    async def run() -> None:
        sock = socket.socket(fileno=fd)
        server = await asyncio.start_server(lambda r, w: _backend_conn(r, w, name, log), sock=sock)
        await server.serve_forever()

    asyncio.run(run())


# ─────────────────────────────────────── clients ────────────────────────────────────────


class Client:
    """One keep-alive HTTP/1.1 connection with just enough parsing for these replies."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: Optional[asyncio.StreamReader] = None
        self.writer: Optional[asyncio.StreamWriter] = None

    async def request(self, body: Dict[str, Any]) -> Tuple[float, List[Tuple[float, bytes]]]:
        """Send one POST; return (time to first byte, [(arrival, event)...] for streams)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        assert self.reader is not None
        data = json.dumps(body).encode()
        start = time.perf_counter()
        self.writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: "
                          b"application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(data), data))
        head = await self.reader.readuntil(b"\r\n\r\n")
        ttfb = time.perf_counter() - start
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.decode(errors="replace"))
        match = re.search(rb"(?i)content-length: *(\d+)", head)
        if match:
            await self.reader.readexactly(int(match.group(1)))
            return ttfb, []
        events = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                return ttfb, events
            chunk = await self.reader.readexactly(size + 2)
            events.append((time.time(), chunk[:-2]))

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def pct(values: List[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


async def small_requests(port: int, conns: int, total: int) -> Dict[str, float]:
    latencies: List[float] = []
    clients = [Client(port) for _ in range(conns)]
    per = total // conns

    async def worker(c: Client) -> None:
        for _ in range(per):
            t0 = time.perf_counter()
            await c.request({"model": "a"})
            latencies.append(time.perf_counter() - t0)

    await asyncio.gather(*(c.request({"model": "a"}) for c in clients))  # connect, warm
    start = time.perf_counter()
    await asyncio.gather(*(worker(c) for c in clients))
    elapsed = time.perf_counter() - start
    for c in clients:
        c.close()
    return {"rps": len(latencies) / elapsed, "p50": pct(latencies, 50), "p99": pct(latencies, 99),
            "n": len(latencies)}


async def streams(port: int, count: int, chunks: int, gap: float) -> Dict[str, float]:
    clients = [Client(port) for _ in range(count)]
    results = await asyncio.gather(*(c.request({"model": "a", "stream": True, "n": chunks, "gap": gap})
                                     for c in clients))
    for c in clients:
        c.close()
    lat = [arrival - json.loads(ev[6:])["t"] for _, events in results for arrival, ev in events
           if ev.startswith(b"data: {")]
    ttfb = [r[0] for r in results]
    return {"ttfb50": pct(ttfb, 50), "ttfb99": pct(ttfb, 99), "lat50": pct(lat, 50),
            "lat99": pct(lat, 99), "chunks": len(lat)}


async def streams_under_uploads(port: int, count: int, chunks: int, gap: float,
                                body_mb: int, every: float) -> Dict[str, float]:
    """Paced streams while a client uploads a body_mb MB chat request (an image as base64,
    "model" last, as clients write it) every ``every`` seconds through the same port."""
    blob = json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + "A" * (body_mb * 1024 * 1024)}}]}], "model": "a"}).encode()
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n" % len(blob))
    done = asyncio.Event()
    uploads = 0

    async def uploader() -> None:
        nonlocal uploads
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while not done.is_set():
                started = time.perf_counter()
                writer.write(head + blob)
                await writer.drain()
                answer = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: *(\d+)", answer).group(1))
                await reader.readexactly(length)
                uploads += 1
                await asyncio.sleep(max(0.0, every - (time.perf_counter() - started)))
        finally:
            writer.close()

    task = asyncio.get_running_loop().create_task(uploader())
    try:
        result = await streams(port, count, chunks, gap)
    finally:
        done.set()
        await task
    result["uploads"] = uploads
    return result


# ─────────────────────────────────────── processes ──────────────────────────────────────


def start_backend(name: str, log: Optional[str] = None) -> Tuple[subprocess.Popen, int]:
    sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
    args = [sys.executable, __file__, "backend", str(sock.fileno()), name] + ([log] if log else [])
    proc = subprocess.Popen(args, pass_fds=(sock.fileno(),))
    port = sock.getsockname()[1]
    sock.close()
    return proc, port


def start_llmux(config: Dict[str, Any], tmp: str) -> Tuple[subprocess.Popen, int]:
    path = os.path.join(tmp, f"config-{len(os.listdir(tmp))}.json")
    with open(path, "w") as f:
        json.dump(config, f)
    logpath = path + ".log"
    log = open(logpath, "w")
    proc = subprocess.Popen([sys.executable, LLMUX, "-c", path, "-p", "0", "--host", "127.0.0.1"],
                            stderr=log, stdout=log)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        match = re.search(r"listening url=http://127\.0\.0\.1:(\d+)", open(logpath).read())
        if match:
            return proc, int(match.group(1))
        time.sleep(0.01)
    raise RuntimeError("llmux did not start: " + open(logpath).read())


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def stop(*procs: subprocess.Popen) -> None:
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()


async def switch_overhead(tmp: str, switches: int) -> List[float]:
    """Wake hook's last act -> the first queued request's arrival at the backend."""
    arrivals = os.path.join(tmp, "arrivals.log")
    stamps = os.path.join(tmp, "stamps.log")
    backends = {n: start_backend(n, arrivals) for n in ("a", "b")}
    stamp = f"date +%s.%N >> {stamps}"
    config = {"models": {n: {"port": port, "wake": stamp} for n, (_, port) in backends.items()},
              "policy": {"request_timeout_secs": 30}}
    proc, port = start_llmux(config, tmp)
    try:
        c = Client(port)
        for i in range(switches):
            await c.request({"model": "ab"[i % 2]})
        c.close()
    finally:
        stop(proc, *(p for p, _ in backends.values()))
    woke = [float(x) for x in open(stamps).read().split()]
    got = [float(line.split()[0]) for line in open(arrivals).read().splitlines()]
    return [g - w for w, g in zip(woke, got)]


# ───────────────────────────────────────── main ─────────────────────────────────────────


def row(name: str, direct: float, via: float, unit: str, scale: float = 1.0) -> str:
    ratio = via / direct if direct else float("nan")
    return f"| {name:<38} | {direct * scale:>10.2f} | {via * scale:>10.2f} | {ratio:>6.2f} | {unit:<5} |"


async def run(quick: bool) -> None:
    n1, n64, nstreams, nchunks = (500, 3000, 100, 20) if quick else (2000, 12800, 100, 50)
    with tempfile.TemporaryDirectory() as tmp:
        backend, bport = start_backend("a")
        lx, lport = start_llmux({"models": {"a": {"port": bport}}}, tmp)
        try:
            await Client(lport).request({"model": "a"})  # wake (no hook): now active
            results: Dict[str, Dict[str, Dict[str, float]]] = {}
            cpu: Dict[str, float] = {}
            for label, conns, total in (("c1", 1, n1), ("c64", 64, n64)):
                results[label] = {"direct": await small_requests(bport, conns, total)}
                before = cpu_seconds(lx.pid)
                results[label]["llmux"] = await small_requests(lport, conns, total)
                cpu[label] = (cpu_seconds(lx.pid) - before) / (results[label]["llmux"]["n"] + conns)
            results["sse"] = {"direct": await streams(bport, nstreams, nchunks, 0.02)}
            before = cpu_seconds(lx.pid)
            results["sse"]["llmux"] = await streams(lport, nstreams, nchunks, 0.02)
            sse_cpu = cpu_seconds(lx.pid) - before
            # Issue 11's big-body case: 100 streams at 10 ms a chunk, alone and while a
            # 20 MB body arrives once a second, both through llmux.
            paced = 200 if quick else 500
            results["paced"] = {"direct": await streams(lport, nstreams, paced, 0.01),
                                "llmux": await streams_under_uploads(lport, nstreams, paced, 0.01, 20, 1.0)}
        finally:
            stop(lx, backend)
        switch = await switch_overhead(tmp, 10 if quick else 40)

    print(f"llmux.py overhead, Python {sys.version.split()[0]}, {os.cpu_count()} cores"
          f"{' (quick)' if quick else ''}\n")
    print("| measure                                |     direct |  via llmux |  ratio | unit  |")
    print("|----------------------------------------|-----------:|-----------:|-------:|-------|")
    for label, title in (("c1", "1 connection"), ("c64", "64 connections")):
        d, v = results[label]["direct"], results[label]["llmux"]
        print(row(f"small requests, {title}: throughput", d["rps"], v["rps"], "req/s"))
        print(row(f"small requests, {title}: p50", d["p50"], v["p50"], "ms", 1e3))
        print(row(f"small requests, {title}: p99", d["p99"], v["p99"], "ms", 1e3))
    d, v = results["sse"]["direct"], results["sse"]["llmux"]
    print(row(f"{nstreams} SSE streams: time to first byte p50", d["ttfb50"], v["ttfb50"], "ms", 1e3))
    print(row(f"{nstreams} SSE streams: time to first byte p99", d["ttfb99"], v["ttfb99"], "ms", 1e3))
    print(row(f"{nstreams} SSE streams: chunk latency p50", d["lat50"], v["lat50"], "ms", 1e3))
    print(row(f"{nstreams} SSE streams: chunk latency p99", d["lat99"], v["lat99"], "ms", 1e3))
    print()
    alone, loaded = results["paced"]["direct"], results["paced"]["llmux"]
    print(f"| via llmux, {nstreams} streams at 10 ms a chunk       | alone | 20 MB bodies 1/s | rise |")
    print("|-----------------------------------------------|------:|-----------------:|-----:|")
    for key, title in (("lat50", "chunk latency p50 (ms)"), ("lat99", "chunk latency p99 (ms)")):
        print(f"| {title:<45} | {alone[key] * 1e3:>5.2f} | {loaded[key] * 1e3:>16.2f} | "
              f"{(loaded[key] - alone[key]) * 1e3:>4.2f} |")
    print(f"| {'uploads while they ran':<45} |       | {int(loaded['uploads']):>16} |      |")
    print()
    chunks = results["sse"]["llmux"]["chunks"]
    per_chunk = (sse_cpu - nstreams * cpu["c1"]) / chunks
    print("| llmux alone                                          |      value |")
    print("|------------------------------------------------------|-----------:|")
    print(f"| CPU per proxied request, 1 connection (µs)           | {cpu['c1'] * 1e6:>10.1f} |")
    print(f"| CPU per proxied request, 64 connections (µs)         | {cpu['c64'] * 1e6:>10.1f} |")
    print(f"| CPU per relayed SSE chunk (µs, request cost removed) | {per_chunk * 1e6:>10.1f} |")
    print(f"| added chunk latency p50 (ms)                         | {(v['lat50'] - d['lat50']) * 1e3:>10.3f} |")
    print(f"| added chunk latency p99 (ms)                         | {(v['lat99'] - d['lat99']) * 1e3:>10.3f} |")
    print(f"| switch overhead p50, wake exit -> backend (ms)       | {statistics.median(switch) * 1e3:>10.2f} |")
    print(f"| switch overhead max (ms)                             | {max(switch) * 1e3:>10.2f} |")


def main() -> None:
    if sys.argv[1:2] == ["backend"]:
        backend_main(int(sys.argv[2]), sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests (about 15 s)")
    args = ap.parse_args()
    asyncio.run(run(args.quick))


if __name__ == "__main__":
    main()
