#!/usr/bin/env python3
"""What llmux costs, beside nginx and aiohttp: the same load straight to a backend and
through each proxy, side by side, as ratios to direct (issue 11: tail latency).

    python3 bench/overhead.py [--quick] [--runs 2] [--no-pin] [--json FILE]
                              [--peer-python PY] [--llmux-python PY] [--llmux PATH]
                              [--baseline PATH] [--only LABELS]

Columns (a peer that is not there prints "–" and is named below the table):

  direct             the client talks to the fake backend itself
  nginx              `nginx` from PATH (or /usr/sbin), 1 worker, config generated below
  aiohttp + uvloop   bench/aiohttp_peer.py run by --peer-python (default
                     /tmp/bench-venv/bin/python), when it imports aiohttp and uvloop
  llmux.py           this interpreter, stdlib asyncio
  llmux.py + uvloop  --llmux-python (same default) with LLMUX_LOOP=uvloop, when it imports
                     uvloop and llmux.py really loaded it (checked in /proc/PID/maps)

Rows, each measured from this process with its own asyncio client (a Protocol per
connection that parses the framing in data_received, below):

  1. time to first byte p50/p99: 100 new connections, then all 100 POSTs (SSE streams)
     written in one instant; a warm-up burst first, so the measured burst finds the
     proxy's upstream pool warm;
  2. chunk latency p50/p99: 100 streams at 10 ms a chunk (the backend stamps each SSE
     event with its send time; latency = arrival - stamp), 30,000 chunks (--quick 10,000);
     the streams take turns on one fixed schedule, a tenth of them each millisecond;
  3. small non-streaming requests over 64 keep-alive connections: latency, throughput,
     and the proxy's CPU per request (utime+stime of its process tree from /proc, so
     nginx's master and worker together);
  4. CPU per relayed chunk: the proxy's CPU over row 2, less 100 requests' cost (row 3);
  5. the chunk latency p99 of row 2 again while a 20 MB chat body (a base64 image,
     "model" as the last key) arrives once a second on another connection, and its rise;
     and again while a burst of 100 new connections, each with a small request, arrives
     every half second (what opening streams costs those already flowing);
  6. RSS of the proxy (its process tree): idle (after start and one request), and with
     1,000 slow streams open (a chunk a second; read once all have their first chunk);
  7. llmux only: switch overhead, wake hook exit -> the first queued request at a backend.

Pinning (when taskset exists and there are 2+ CPUs; --no-pin turns it off): the proxy
runs alone on CPU 0, this process and the fake backend share CPU 1.  Throughput is then
bounded by the client, so CPU time per request is the honest cost figure; and direct is
no lower bound: its client and backend contend for CPU 1, which a proxy on CPU 0 can
smooth.  So both are kept light: the backend paces every stream of one gap from one
timer (no task or sleep per stream), and the client has no await per chunk, one clock
read per socket read, and writes a 20 MB body a slice per loop iteration.  This process
and the backend run with the garbage collector off (a collection over the recorded
events would show up as latency in every column).  --runs N
repeats everything N times with fresh processes; a cell is the median over runs and
(min–max).  Traffic stays on 127.0.0.1, every file in one temporary directory, every
process started is stopped at the end (its whole process group).  Nothing here is
asserted: it prints a markdown table (and --json writes every raw number).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import gc
import json
import math
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import (Any, Awaitable, Callable, Dict, List, NamedTuple, Optional, Tuple, TypeVar,
                    cast)

ROOT = Path(__file__).resolve().parent.parent
PEER_SCRIPT = str(Path(__file__).resolve().parent / "aiohttp_peer.py")
FLOOR_SCRIPT = str(Path(__file__).resolve().parent / "floor_peer.py")
HTTP_FLOOR_SCRIPT = str(Path(__file__).resolve().parent / "http_floor_peer.py")
VENV_PYTHON = "/tmp/bench-venv/bin/python"  # has aiohttp and uvloop, when it is there

STREAMS = 100  # rows 1, 2, 4, 5
BURSTS = 5  # row 1: warm bursts measured, the median of their p50s (and p99s) kept
PACED_GAP = 0.01  # seconds between a paced stream's chunks
SMALL_CONNS = 64  # row 3
BODY_MB, BODY_EVERY = 20, 1.0  # row 5: a 20 MB body each second
BURST_EVERY = 0.5  # row 5b: a burst of STREAMS new connections and small requests this often
HELD_GAP, HELD_CHUNKS = 1.0, 120  # row 6: a chunk a second; cut once measured
HELD_OPENING = 100  # row 6: streams being opened at once
PHASE_TIMEOUT = 300.0  # seconds: a peer that hangs fails its column, not the bench


@dataclasses.dataclass(frozen=True)
class Sizes:
    small: int  # row 3: requests
    burst_chunks: int  # row 1: chunks per stream (short streams)
    paced_chunks: int  # rows 2, 4, 5: chunks per stream
    held: int  # row 6: streams open at once
    switches: int  # row 7


FULL = Sizes(small=12800, burst_chunks=5, paced_chunks=300, held=1000, switches=40)
QUICK = Sizes(small=2000, burst_chunks=5, paced_chunks=100, held=1000, switches=10)


# ───────────────────────────── the backend (child process) ──────────────────────────────

CONTENT_LENGTH = re.compile(rb"(?i)content-length: *(\d+)")
BIG_BODY = 65536  # bytes: a body this long is an upload (row 5), counted and not parsed
TICK_PHASES = 10  # a gap's ticks: 100 streams at 10 ms, 10 events a millisecond


class _Ticker:
    """The open streams of one gap, on one fixed schedule of TICK_PHASES ticks a gap.  The
    k-th stream to come is in phase k % TICK_PHASES, and each tick writes the next piece of
    every stream in its phase, each event stamped with time.time() as it is written.

    One timer instead of a task and a sleep per stream: the backend shares CPU 1 with the
    client, and 100 task wake-ups every 10 ms there were latency in every column.  The
    phases keep the streams spread over the gap as independent streams are: all of them on
    one tick would make each tick a burst of 100 events, so that the p99 became a proxy's
    time for a whole burst, and one stall of CPU 1 a whole percent of the events."""

    def __init__(self, loop: asyncio.AbstractEventLoop, gap: float,
                 tickers: Dict[float, "_Ticker"]) -> None:
        self.loop, self.gap, self.tickers = loop, gap, tickers
        self.phases: List[List[_BackendConn]] = [[] for _ in range(TICK_PHASES)]
        self.joined = self.open = self.tick = 0
        self.at = loop.time() + gap / TICK_PHASES
        loop.call_at(self.at, self._tick)

    def add(self, stream: "_BackendConn") -> None:
        self.phases[self.joined % TICK_PHASES].append(stream)
        self.joined += 1
        self.open += 1

    def _tick(self) -> None:
        phase = self.tick % TICK_PHASES
        self.tick += 1
        due = self.phases[phase]
        if due:
            self.phases[phase] = [s for s in due if s.next_piece()]
            self.open -= len(due) - len(self.phases[phase])
        if not self.open:
            del self.tickers[self.gap]  # the next stream of this gap starts a new schedule
            return
        # The next tick from the schedule, not from now, so lateness does not accumulate: a
        # late tick is caught up at once (its events stamped as they go), unless the loop is
        # a whole gap behind, when the schedule starts afresh.
        self.at += self.gap / TICK_PHASES
        now = self.loop.time()
        if now - self.at > self.gap:
            self.at = now
        self.loop.call_at(self.at, self._tick)


class _BackendConn(asyncio.Protocol):
    """One connection to the fake backend, one request at a time: a JSON answer at once, or
    an SSE stream whose first event goes with its head and the rest on its gap's ticks.

    No flow control: an event is some 60 bytes and a stream asks for at most a few hundred,
    so what a slow reader leaves in the transport's buffer stays small."""

    def __init__(self, name: str, log: Optional[str], tickers: Dict[float, _Ticker]) -> None:
        self.name, self.log, self.tickers = name, log, tickers
        self.transport: Optional[asyncio.Transport] = None
        self.buf = b""
        self.skip = 0  # bytes of a big body still to come, dropped as they arrive
        self.streaming = False  # requests that come meanwhile wait in buf
        self.i = self.n = 0  # a stream's events written, and how many it asked for

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self.skip:
            if len(data) <= self.skip:
                self.skip -= len(data)
                if self.skip:
                    return
                data = b""
            else:
                data, self.skip = data[self.skip:], 0
            self._answer({})
        self.buf += data
        self._serve()

    def _serve(self) -> None:
        while not self.streaming and not self.skip:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            match = CONTENT_LENGTH.search(self.buf, 0, end)
            length = int(match.group(1)) if match else 0
            start = end + 4
            if length >= BIG_BODY:
                # An upload (row 5): only its size matters, and parsing (or even keeping)
                # 20 MB here would steal CPU 1 from the client measuring the streams.
                self.skip = max(0, start + length - len(self.buf))
                self.buf = self.buf[start + length:]
                if not self.skip:
                    self._answer({})
                continue
            if len(self.buf) < start + length:
                return
            data, self.buf = self.buf[start:start + length], self.buf[start + length:]
            self._answer(json.loads(data) if length else {})

    def _answer(self, body: Dict[str, Any]) -> None:
        assert self.transport is not None
        if self.log:
            with open(self.log, "a") as f:
                f.write(f"{time.time():.6f} {self.name}\n")
        if not body.get("stream"):
            answer = json.dumps({"backend": self.name, "ok": True}).encode()
            self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                                 b"content-length: %d\r\n\r\n%s" % (len(answer), answer))
            return
        self.transport.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n")
        self.i, self.n, self.streaming = 0, body["n"], True
        if self.next_piece():
            gap = body["gap"]
            ticker = self.tickers.get(gap)
            if ticker is None:
                ticker = self.tickers[gap] = _Ticker(asyncio.get_running_loop(), gap, self.tickers)
            ticker.add(self)

    def next_piece(self) -> bool:
        """Write the stream's next event (or its end); False once it has ended."""
        assert self.transport is not None
        if self.transport.is_closing():
            return False
        if self.i < self.n:
            # The bytes json.dumps({"i": i, "t": time.time()}) would give, for less CPU.
            event = b'data: {"i": %d, "t": %a}\n\n' % (self.i, time.time())
            self.transport.write(b"%x\r\n%s\r\n" % (len(event), event))
            self.i += 1
            return True
        self.transport.write(b"e\r\ndata: [DONE]\n\n\r\n0\r\n\r\n")
        self.streaming = False
        if self.buf:  # a request sent meanwhile: served after this tick, not inside it
            asyncio.get_running_loop().call_soon(self._serve)
        return False


def backend_main(fd: int, name: str, log: Optional[str]) -> None:
    gc.disable()  # as in the bench: no collector pauses in the baseline (it lives seconds)

    async def run() -> None:
        tickers: Dict[float, _Ticker] = {}
        server = await asyncio.get_running_loop().create_server(
            lambda: _BackendConn(name, log, tickers), sock=socket.socket(fileno=fd))
        await server.serve_forever()

    asyncio.run(run())


# ─────────────────────────────────────── clients ────────────────────────────────────────


def post(body: Dict[str, Any]) -> bytes:
    data = json.dumps(body).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(data), data))


SMALL = post({"model": "a"})


def stream_post(chunks: int, gap: float) -> bytes:
    return post({"model": "a", "stream": True, "n": chunks, "gap": gap})


@functools.lru_cache(maxsize=1)
def big_post() -> bytes:
    """Row 5's upload: a chat request with a BODY_MB MB base64 image, "model" last."""
    return post({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "data:image/png;base64," + "A" * (BODY_MB * 1024 * 1024)}}]}], "model": "a"})


Events = List[Tuple[float, bytes]]  # (arrival time.time(), one SSE event)
Answer = Tuple[float, Events]  # (time to first byte, a stream's events)
CHUNKED = -1  # Client.framing: a chunked body (else its Content-Length)
# Row 5's 20 MB go out a slice per loop iteration, as the socket takes them: one write of
# all of it copies 20 MB into the kernel and the transport's buffer in one go, a stall of
# CPU 1 (5-20 ms) that showed up as chunk latency in every column.
UPLOAD_SLICE = 256 * 1024


class Client(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection with just enough parsing for these answers.

    The client shares CPU 1 with the backend, so what it spends per chunk is latency in
    every column: data_received parses the framing itself (bytes.find, no await per
    chunk) and stamps every event completed in one call with one time.time().  A big
    request is written UPLOAD_SLICE bytes at a time, as pause/resume_writing allow."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.transport: Optional[asyncio.Transport] = None
        self.answer: Optional["asyncio.Future[Answer]"] = None
        self.sent = 0.0
        self.max_events = sys.maxsize
        self.unsent = memoryview(b"")  # the rest of a big request
        self.paused = False  # the transport's buffer is full: pause_writing came
        self.more: Optional[asyncio.Handle] = None  # the next slice's turn
        self._reset()

    def _reset(self) -> None:
        self.ttfb: Optional[float] = None
        self.framing: Optional[int] = None  # None while in the head
        self.buf = b""  # what came and is not parsed yet
        self.pending = b""  # the start of an event whose end has not come
        self.events: Events = []

    async def connect(self) -> None:
        if self.transport is None:
            await asyncio.get_running_loop().create_connection(lambda: self, "127.0.0.1", self.port)

    def send(self, request: bytes, max_events: Optional[int] = None) -> "asyncio.Future[Answer]":
        """Write one request; the future is its answer.  With max_events, a stream's answer
        is complete once that many events came, and the rest of it is dropped."""
        assert self.transport is not None
        self._reset()
        self.max_events = max_events or sys.maxsize
        self.answer = asyncio.get_running_loop().create_future()
        self.sent = time.perf_counter()
        if len(request) <= UPLOAD_SLICE:
            self.transport.write(request)
        else:
            self.unsent = memoryview(request)
            self._write_more()
        return self.answer

    def _write_more(self) -> None:
        self.more = None
        if self.transport is None or self.transport.is_closing() or self.paused:
            return
        piece, self.unsent = self.unsent[:UPLOAD_SLICE], self.unsent[UPLOAD_SLICE:]
        self.transport.write(piece)  # may call pause_writing
        if self.unsent and not self.paused:
            self.more = asyncio.get_running_loop().call_soon(self._write_more)

    async def request(self, request: bytes) -> Answer:
        await self.connect()
        return await self.send(request)

    def close(self) -> None:
        if self.transport is not None:
            self.answer = None  # nobody waits for it any more
            self.transport.abort()  # the bench is done with it: no FIN handshake

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.unsent and self.more is None:
            self._write_more()

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(ConnectionError(f"closed before the answer's end ({exc})"))

    def data_received(self, data: bytes) -> None:
        answer = self.answer
        if answer is None or answer.done():
            return  # a stream cut at max_events
        arrival = time.time()
        if self.ttfb is None:  # the first byte of the head
            self.ttfb = time.perf_counter() - self.sent
        try:
            if self._feed(self.buf + data if self.buf else data, arrival):
                answer.set_result((self.ttfb, self.events))
        except Exception as e:  # a bad answer fails the column, not the loop
            answer.set_exception(e)

    def _feed(self, buf: bytes, arrival: float) -> bool:
        """Parse what came (with what was left over); True once the answer is complete."""
        pos = 0
        if self.framing is None:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return False
            if not buf.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(buf[:end].decode(errors="replace"))
            match = CONTENT_LENGTH.search(buf, 0, end)
            self.framing = int(match.group(1)) if match else CHUNKED
            pos = end + 4
        if self.framing != CHUNKED:
            self.buf = buf[pos:]
            return len(self.buf) >= self.framing
        # A proxy re-chunks as it likes: an event may span chunks, a chunk hold several.
        events, pending = self.events, self.pending
        while True:
            line = buf.find(b"\r\n", pos)
            if line < 0:
                break
            size = int(buf[pos:line].split(b";", 1)[0], 16)
            if size == 0:  # the last chunk; done once the (empty) trailer section is in
                if buf.find(b"\r\n\r\n", line) < 0:
                    break
                return True
            start = line + 2
            if len(buf) < start + size + 2:
                break
            pending += buf[start:start + size]
            pos = start + size + 2
            cut = pending.find(b"\n\n")
            while cut >= 0:
                events.append((arrival, pending[:cut]))
                pending = pending[cut + 2:]
                cut = pending.find(b"\n\n")
            if len(events) >= self.max_events:
                return True
        self.buf, self.pending = buf[pos:], pending
        return False


def pct(values: List[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(p / 100 * len(values)))]


def latencies(answers: List[Answer]) -> List[float]:
    """Arrival minus the backend's send stamp, for every stamped event."""
    return [arrival - json.loads(event[6:])["t"] for _, events in answers
            for arrival, event in events if event.startswith(b"data: {")]


async def one_request(port: int, request: bytes) -> Answer:
    c = Client(port)
    try:
        return await c.request(request)
    finally:
        c.close()


async def burst(port: int, count: int, chunks: int, request: Optional[bytes] = None) -> List[float]:
    """`count` new connections, then all their POSTs (streams of `chunks` events, or
    `request`) in one instant: each one's TTFB."""
    clients = [Client(port) for _ in range(count)]
    try:
        await asyncio.gather(*(c.connect() for c in clients))
        request = request or stream_post(chunks, PACED_GAP)
        sent = [c.send(request) for c in clients]  # no await in between: the POSTs leave together
        return [ttfb for ttfb, _ in await asyncio.gather(*sent)]
    finally:
        for c in clients:
            c.close()


async def streams(port: int, count: int, chunks: int, gap: float) -> List[Answer]:
    clients = [Client(port) for _ in range(count)]
    try:
        return await asyncio.gather(*(c.request(stream_post(chunks, gap)) for c in clients))
    finally:
        for c in clients:
            c.close()


async def small_requests(port: int, total: int, meter: "Meter") -> Dict[str, float]:
    """Row 3: `total` small requests over SMALL_CONNS keep-alive connections."""
    took: List[float] = []
    clients = [Client(port) for _ in range(SMALL_CONNS)]

    async def worker(c: Client) -> None:
        for _ in range(total // SMALL_CONNS):
            t0 = time.perf_counter()
            await c.send(SMALL)
            took.append(time.perf_counter() - t0)

    try:
        await asyncio.gather(*(c.request(SMALL) for c in clients))  # connect, warm the pool
        cpu, start = meter.cpu(), time.perf_counter()
        await asyncio.gather(*(worker(c) for c in clients))
        elapsed, cpu = time.perf_counter() - start, meter.cpu() - cpu
    finally:
        for c in clients:
            c.close()
    return {"small_p50": pct(took, 50), "small_p99": pct(took, 99),
            "small_rps": len(took) / elapsed, "cpu_req": cpu / len(took)}


async def streams_while(port: int, chunks: int, every: float,
                        load: Callable[[], Awaitable[Any]]) -> Tuple[List[float], int]:
    """STREAMS paced streams while ``load`` runs again every ``every`` seconds; (their
    chunk latencies, the loads done meanwhile)."""
    done = asyncio.Event()
    count = 0

    async def repeat() -> None:
        nonlocal count
        while not done.is_set():
            started = time.perf_counter()
            await load()
            count += 1
            await asyncio.sleep(max(0.0, every - (time.perf_counter() - started)))

    task = asyncio.get_running_loop().create_task(repeat())
    try:
        answers = await streams(port, STREAMS, chunks, PACED_GAP)
    finally:
        done.set()
        await task
    return latencies(answers), count


async def streams_under_uploads(port: int, chunks: int) -> Tuple[List[float], int]:
    """Row 5: the paced streams while big_post() arrives each BODY_EVERY seconds on
    another connection; (their chunk latencies, uploads answered meanwhile)."""
    blob = big_post()
    c = Client(port)
    try:
        return await streams_while(port, chunks, BODY_EVERY, lambda: c.request(blob))
    finally:
        c.close()


async def streams_under_bursts(port: int, chunks: int) -> Tuple[List[float], int]:
    """Row 5b: the paced streams while a burst of STREAMS new connections, each with a
    small request, arrives every BURST_EVERY seconds: what others opening theirs costs
    the streams already flowing (the tail a chat user sees)."""
    return await streams_while(port, chunks, BURST_EVERY, lambda: burst(port, STREAMS, 0, SMALL))


async def held_streams(port: int, count: int, meter: "Meter") -> float:
    """Row 6: the proxy's RSS once `count` slow streams all have their first chunk."""
    clients = [Client(port) for _ in range(count)]
    opening = asyncio.Semaphore(HELD_OPENING)
    request = stream_post(HELD_CHUNKS, HELD_GAP)

    async def open_one(c: Client) -> None:
        async with opening:
            await c.connect()
            await c.send(request, max_events=1)

    try:
        await asyncio.gather(*(open_one(c) for c in clients))
        return meter.rss()
    finally:
        for c in clients:
            c.close()


# ─────────────────────────────────────── processes ──────────────────────────────────────


class Procs:
    """Every child this bench starts, each in its own process group, so that stopping one
    stops what it started too (nginx's worker, llmux's hooks)."""

    def __init__(self) -> None:
        self.running: List["subprocess.Popen[bytes]"] = []

    def start(self, argv: List[str], log: str, **kw: Any) -> "subprocess.Popen[bytes]":
        with open(log, "ab") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=out, stdin=subprocess.DEVNULL,
                                    start_new_session=True, **kw)
        self.running.append(proc)
        return proc

    def stop(self, *procs: "Optional[subprocess.Popen[bytes]]") -> None:
        live = [p for p in procs if p is not None and p in self.running]
        for p in live:
            self._signal(p, signal.SIGTERM)
        for p in live:
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
            self._signal(p, signal.SIGKILL)  # whatever is left of its group
            p.wait()
            self.running.remove(p)

    def stop_all(self) -> None:
        self.stop(*reversed(self.running))

    @staticmethod
    def _signal(p: "subprocess.Popen[bytes]", sig: int) -> None:
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def stop(*procs: "subprocess.Popen[bytes]") -> None:
    """Terminate children that are not in a Procs (bench/soak.py's), then kill what is left."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _proc_tree(root: int) -> List[int]:
    """root and all its descendants, from the ppid field of /proc/*/stat."""
    children: Dict[int, List[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rpartition(")")[2].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def steal_seconds() -> float:
    """CPU time the hypervisor took from this machine's CPUs so far (/proc/stat's steal):
    while it takes some, every latency row has its stalls (NaN where it is not told)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return math.nan


class Meter:
    """CPU seconds and RSS bytes of a process tree (NaN for the direct column's None)."""

    def __init__(self, pid: Optional[int]) -> None:
        self.pid = pid

    def _summed(self, name: str, read: Callable[[str], int]) -> float:
        """``read`` of /proc/PID/``name``, summed over the tree (processes gone meanwhile skipped)."""
        if self.pid is None:
            return math.nan
        total = 0
        for pid in _proc_tree(self.pid):
            try:
                with open(f"/proc/{pid}/{name}") as f:
                    total += read(f.read())
            except (OSError, StopIteration):
                continue
        return float(total)

    def cpu(self) -> float:
        ticks = self._summed("stat", lambda text: sum(int(x) for x in text.rpartition(")")[2].split()[11:13]))
        return ticks / os.sysconf("SC_CLK_TCK")  # utime + stime

    def rss(self) -> float:
        """Summed over the tree: pages a master and its worker share count twice."""
        return self._summed("status", lambda text: next(int(line.split()[1]) * 1024 for line in
                                                        text.splitlines() if line.startswith("VmRSS:")))

    def has_mapped(self, name: str) -> bool:
        """Whether the process has a file whose path contains `name` mapped (a .so)."""
        with open(f"/proc/{self.pid}/maps") as f:
            return name in f.read()


class Unavailable(Exception):
    """A peer that cannot run here: its column prints "–" and this reason."""


@dataclasses.dataclass
class Bench:
    tmp: str
    procs: Procs
    pin: bool
    args: argparse.Namespace

    def pinned(self, cpu: int, argv: List[str]) -> List[str]:
        return ["taskset", "-c", str(cpu), *argv] if self.pin else argv

    def path(self, name: str) -> str:
        """A fresh path in the temporary directory (runs repeat: names must not clash)."""
        return os.path.join(tempfile.mkdtemp(prefix=name + "-", dir=self.tmp), name)


class Proxy(NamedTuple):
    proc: "subprocess.Popen[bytes]"
    port: int


def _listener() -> socket.socket:
    return socket.create_server(("127.0.0.1", 0), backlog=1024)


def start_backend(b: Bench, name: str, log: Optional[str] = None) -> Proxy:
    """The fake backend, on CPU 1 with this process, serving a socket bound here."""
    sock = _listener()
    try:
        argv = [sys.executable, __file__, "backend", str(sock.fileno()), name] + ([log] if log else [])
        proc = b.procs.start(b.pinned(1, argv), b.path("backend.log"), pass_fds=(sock.fileno(),))
        return Proxy(proc, sock.getsockname()[1])
    finally:
        sock.close()


def _wait_for(what: str, proc: "subprocess.Popen[bytes]", log: str,
              ready: Callable[[], Optional[int]]) -> int:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        port = ready()
        if port is not None:
            return port
        if proc.poll() is not None:
            break
        time.sleep(0.02)
    with open(log, errors="replace") as f:
        raise RuntimeError(f"{what} did not start: {f.read()[-2000:]}")


def llmux_config(backend: int) -> Dict[str, Any]:
    # Row 6 holds 1,000 streams (plus the bench's spare connections): llmux's default
    # http.max_connections (1024) is raised, and the per-peer cap is lifted (loopback is
    # exempt from it today anyway).  policy.max_queue (4096 waiting requests) and a
    # model's max_in_flight (unset: no cap) already allow 1,000 streams.
    return {"models": {"a": {"port": backend}},
            "http": {"max_connections": 4096, "max_connections_per_peer": None}}


class LLMux(NamedTuple):
    """How a llmux column runs llmux.py: which interpreter, with which environment, and
    which llmux.py (--llmux, or --baseline for a before/after column)."""
    python: Callable[[argparse.Namespace], str]
    env: Dict[str, str]
    script: Callable[[argparse.Namespace], str] = lambda a: a.llmux


LLMUX_STDLIB = LLMux(lambda a: sys.executable, {})
LLMUX_UVLOOP = LLMux(lambda a: a.llmux_python, {"LLMUX_LOOP": "uvloop"})
LLMUX_BASELINE = LLMux(lambda a: sys.executable, {}, lambda a: a.baseline)


def launch_llmux(b: Bench, config: Dict[str, Any], how: LLMux) -> Proxy:
    """`python llmux.py -c config -p 0`, on CPU 0; its port from its `listening` line."""
    path = b.path("llmux.json")
    with open(path, "w") as f:
        json.dump(config, f)
    log = path + ".log"
    argv = [how.python(b.args), how.script(b.args), "-c", path, "-p", "0", "--host", "127.0.0.1"]
    proc = b.procs.start(b.pinned(0, argv), log, env={**os.environ, **how.env})

    def ready() -> Optional[int]:
        with open(log, errors="replace") as f:
            match = re.search(r"listening url=http://127\.0\.0\.1:(\d+)", f.read())
        return int(match.group(1)) if match else None

    proxy = Proxy(proc, _wait_for("llmux.py", proc, log, ready))
    # A llmux.py without LLMUX_LOOP would run stdlib asyncio under the uvloop label.
    if how.env.get("LLMUX_LOOP") == "uvloop" and not Meter(proc.pid).has_mapped("uvloop"):
        b.procs.stop(proc)
        raise Unavailable("llmux.py ignored LLMUX_LOOP=uvloop (uvloop not loaded)")
    return proxy


def _start_script(b: Bench, python: str, script: str, backend: int, log: str,
                  *extra: str) -> Proxy:
    """`python script --port-fd FD --upstream PORT` on CPU 0, on a socket bound here."""
    sock = _listener()
    try:
        argv = [python, script, "--port-fd", str(sock.fileno()), "--upstream", str(backend), *extra]
        proc = b.procs.start(b.pinned(0, argv), b.path(log), pass_fds=(sock.fileno(),))
        return Proxy(proc, sock.getsockname()[1])  # connections wait in the backlog
    finally:
        sock.close()


def start_aiohttp(b: Bench, backend: int) -> Proxy:
    return _start_script(b, b.args.peer_python, PEER_SCRIPT, backend, "aiohttp.log")


def start_floor(b: Bench, backend: int) -> Proxy:
    return _start_script(b, sys.executable, FLOOR_SCRIPT, backend, "floor.log")


def start_http_floor(b: Bench, backend: int) -> Proxy:
    return _start_script(b, sys.executable, HTTP_FLOOR_SCRIPT, backend, "http-floor.log")


def start_http_floor_tasks(b: Bench, backend: int) -> Proxy:
    return _start_script(b, sys.executable, HTTP_FLOOR_SCRIPT, backend, "http-floor.log", "--tasks")


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
{user}pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    client_max_body_size 64m;   # llmux's default max_body_bytes
    keepalive_requests 1000000; # llmux closes no keep-alive connection after N requests
    upstream backend {{
        server 127.0.0.1:{backend};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=1024;  # llmux's LISTEN_BACKLOG
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;          # SSE: each piece is sent on as it comes
            proxy_request_buffering off;  # a body is streamed on as it comes, not spooled
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


def nginx_path() -> Optional[str]:
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def start_nginx(b: Bench, backend: int) -> Proxy:
    nginx = nginx_path()
    assert nginx is not None
    for _ in range(5):
        # nginx cannot take a passed socket: here alone a port is reserved, released and
        # handed over, which can race, so EADDRINUSE means another try on another port.
        with _listener() as s:
            port = s.getsockname()[1]
        conf = b.path("nginx.conf")
        where = os.path.dirname(conf)
        with open(conf, "w") as f:
            f.write(NGINX_CONF.format(dir=where, backend=backend, port=port,
                                      user="user root;\n" if os.geteuid() == 0 else ""))
        log = os.path.join(where, "error.log")
        proc = b.procs.start(b.pinned(0, [nginx, "-p", where, "-c", conf, "-e", log]),
                             os.path.join(where, "stderr.log"))
        pidfile = os.path.join(where, "nginx.pid")
        # nginx writes its pid file once its listening sockets are bound.
        try:
            return Proxy(proc, _wait_for("nginx", proc, log,
                                         lambda: port if os.path.exists(pidfile) else None))
        except RuntimeError as e:
            b.procs.stop(proc)
            if "Address already in use" not in str(e):
                raise
    raise RuntimeError("nginx: the reserved port was taken 5 times")


def _imports(python: str, modules: str) -> Optional[str]:
    """None when `python` imports the modules, else why not."""
    if not os.path.exists(python):
        return f"{python} not found"
    done = subprocess.run([python, "-c", f"import {modules}"], capture_output=True)
    return None if done.returncode == 0 else f"{python} cannot import {modules}"


def _output(argv: List[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True)
    return (done.stdout + done.stderr).strip()


def about_nginx(a: argparse.Namespace) -> str:
    return _output([nginx_path() or "nginx", "-v"]).replace("nginx version: ", "")


def about_aiohttp(a: argparse.Namespace) -> str:
    return _output([a.peer_python, "-c", "import aiohttp, uvloop, sys; print('aiohttp', "
                    "aiohttp.__version__, '+ uvloop', uvloop.__version__, 'on Python', "
                    "sys.version.split()[0])"])


def about_llmux(how: LLMux) -> Callable[[argparse.Namespace], str]:
    def about(a: argparse.Namespace) -> str:
        python = _output([how.python(a), "-c", "import sys; print(sys.version.split()[0])"])
        return f"Python {python}, {how.env.get('LLMUX_LOOP', 'stdlib asyncio')}, {how.script(a)}"
    return about


class Peer(NamedTuple):
    label: str
    missing: Callable[[argparse.Namespace], Optional[str]]  # None, or why it cannot run
    start: Optional[Callable[[Bench, int], Proxy]]  # None: the client talks to the backend
    about: Callable[[argparse.Namespace], str]  # versions, for the table's heading
    llmux: Optional[LLMux] = None  # llmux columns also get the switch-overhead row


def llmux_peer(label: str, how: LLMux, missing: Callable[[argparse.Namespace], Optional[str]]) -> Peer:
    return Peer(label, missing, lambda b, port: launch_llmux(b, llmux_config(port), how),
                about_llmux(how), how)


# The columns, in order.  Each peer is started the same way: (bench, backend port) -> Proxy.
PEERS = [
    Peer("direct", lambda a: None, None, lambda a: "client -> fake backend"),
    Peer("nginx", lambda a: None if nginx_path() else "nginx not on PATH", start_nginx, about_nginx),
    Peer("aiohttp + uvloop", lambda a: _imports(a.peer_python, "aiohttp, uvloop"), start_aiohttp,
         about_aiohttp),
    Peer("asyncio floor", lambda a: None, start_floor,
         lambda a: f"bench/floor_peer.py: a TCP relay on stdlib asyncio, Python {sys.version.split()[0]}"),
    Peer("asyncio HTTP floor", lambda a: None, start_http_floor,
         lambda a: "bench/http_floor_peer.py: routes by model from protocol callbacks, "
                   "checks nothing"),
    Peer("HTTP floor + tasks", lambda a: None, start_http_floor_tasks,
         lambda a: "bench/http_floor_peer.py --tasks: the same, a task per connection on "
                   "asyncio streams (llmux.py's shape)"),
    llmux_peer("llmux.py", LLMUX_STDLIB, lambda a: None),
    llmux_peer("llmux.py + uvloop", LLMUX_UVLOOP, lambda a: _imports(a.llmux_python, "uvloop")),
    llmux_peer("baseline llmux.py", LLMUX_BASELINE,
               lambda a: None if a.baseline else "no --baseline given"),
]


# ─────────────────────────────────── one column, one run ────────────────────────────────

T = TypeVar("T")


async def phase(coro: Awaitable[T]) -> T:
    return await asyncio.wait_for(coro, PHASE_TIMEOUT)


async def measure(b: Bench, peer: Peer, sizes: Sizes) -> Dict[str, float]:
    """Every row for one column, on a fresh backend and a fresh proxy."""
    backend = start_backend(b, "a")
    proxy = None
    try:
        proxy = peer.start(b, backend.port) if peer.start else None
        port, meter = (proxy.port, Meter(proxy.proc.pid)) if proxy else (backend.port, Meter(None))
        out: Dict[str, float] = {}
        began, stolen = time.monotonic(), steal_seconds()
        await phase(one_request(port, SMALL))
        out["rss_idle"] = meter.rss()
        cold = await phase(burst(port, STREAMS, sizes.burst_chunks))  # warms the upstream pool
        out["ttfb_cold50"] = pct(cold, 50)
        p50s, p99s = [], []
        for _ in range(BURSTS):  # one burst is at the mercy of one hiccup of the host
            await asyncio.sleep(0.2)  # its connections back in the pool
            ttfb = await phase(burst(port, STREAMS, sizes.burst_chunks))
            p50s.append(pct(ttfb, 50))
            p99s.append(pct(ttfb, 99))
        out["ttfb50"], out["ttfb99"] = statistics.median(p50s), statistics.median(p99s)
        out.update(await phase(small_requests(port, sizes.small, meter)))
        cpu = meter.cpu()
        lat = latencies(await phase(streams(port, STREAMS, sizes.paced_chunks, PACED_GAP)))
        cpu = meter.cpu() - cpu
        out["lat50"], out["lat99"], out["chunks"] = pct(lat, 50), pct(lat, 99), len(lat)
        out["cpu_chunk"] = (cpu - STREAMS * out["cpu_req"]) / len(lat)
        loaded, out["uploads"] = await phase(streams_under_uploads(port, sizes.paced_chunks))
        out["loaded_lat99"] = pct(loaded, 99)
        out["rise"] = out["loaded_lat99"] - out["lat99"]
        bursty, out["bursts"] = await phase(streams_under_bursts(port, sizes.paced_chunks))
        out["burst_lat99"] = pct(bursty, 99)
        out["burst_rise"] = out["burst_lat99"] - out["lat99"]
        # Before the held streams: the rows above are the ones a stall distorts.
        out["steal"] = (steal_seconds() - stolen) / (time.monotonic() - began) / (os.cpu_count() or 1)
        if proxy:
            out["rss_held"] = await phase(held_streams(port, sizes.held, meter))
        return {k: v for k, v in out.items() if not math.isnan(v)}
    finally:
        b.procs.stop(proxy.proc if proxy else None, backend.proc)


async def switch_overhead(b: Bench, how: LLMux, switches: int) -> List[float]:
    """Row 7: wake hook's last act -> the first queued request's arrival at the backend."""
    arrivals, stamps = b.path("arrivals.log"), b.path("stamps.log")
    backends = {n: start_backend(b, n, arrivals) for n in ("a", "b")}
    config = {"models": {n: {"port": p.port, "wake": f"date +%s.%N >> {stamps}"}
                         for n, p in backends.items()},
              "policy": {"request_timeout_secs": 30}}
    proxy = None
    try:
        proxy = launch_llmux(b, config, how)
        c = Client(proxy.port)
        for i in range(switches):
            await phase(c.request(post({"model": "ab"[i % 2]})))
        c.close()
    finally:
        b.procs.stop(proxy.proc if proxy else None, *(p.proc for p in backends.values()))
    with open(stamps) as f:
        woke = [float(x) for x in f.read().split()]
    with open(arrivals) as f:
        got = [float(line.split()[0]) for line in f.read().splitlines()]
    return [g - w for w, g in zip(woke, got)]


async def column(b: Bench, peer: Peer, sizes: Sizes) -> Dict[str, float]:
    out = await measure(b, peer, sizes)
    if peer.llmux:
        switch = await switch_overhead(b, peer.llmux, sizes.switches)
        out["switch50"], out["switchmax"] = statistics.median(switch), max(switch)
    return out


# ─────────────────────────────────────── the table ──────────────────────────────────────


class Row(NamedTuple):
    key: str
    title: str
    scale: float
    ratio: bool = True  # median / direct median (rows direct has)
    whole: bool = False  # a count: no decimals


def rows(sizes: Sizes) -> List[Row]:
    ms, us, mb = 1e3, 1e6, 1 / 2 ** 20
    paced = f"{STREAMS} streams at 10 ms a chunk"
    return [
        Row("ttfb50", f"time to first byte p50, {STREAMS} new streams at once (ms)", ms),
        Row("ttfb99", f"time to first byte p99, {STREAMS} new streams at once (ms)", ms),
        Row("ttfb_cold50", "time to first byte p50, the first such burst: a backend connection "
            "for each (ms)", ms),
        Row("lat50", f"chunk latency p50, {paced} (ms)", ms),
        Row("lat99", f"chunk latency p99, {paced} (ms)", ms),
        Row("small_p50", f"small requests, {SMALL_CONNS} keep-alive conns: latency p50 (ms)", ms),
        Row("small_p99", f"small requests, {SMALL_CONNS} keep-alive conns: latency p99 (ms)", ms),
        Row("small_rps", f"small requests, {SMALL_CONNS} keep-alive conns: throughput (req/s)", 1),
        Row("cpu_req", "CPU per proxied request (µs)", us),
        Row("cpu_chunk", "CPU per relayed chunk (µs, request cost removed)", us),
        Row("loaded_lat99", f"chunk latency p99, {paced}, {BODY_MB} MB body 1/s (ms)", ms),
        Row("rise", "rise of that p99 over the streams alone (ms)", ms, ratio=False),
        Row("uploads", f"{BODY_MB} MB bodies answered meanwhile", 1, ratio=False, whole=True),
        Row("burst_lat99", f"chunk latency p99, {paced}, a burst of {STREAMS} new requests "
            f"each {BURST_EVERY:g} s (ms)", ms),
        Row("burst_rise", "rise of that p99 over the streams alone (ms)", ms, ratio=False),
        Row("bursts", f"bursts of {STREAMS} answered meanwhile", 1, ratio=False, whole=True),
        Row("rss_idle", "RSS idle, after start and one request (MiB)", mb),
        Row("rss_held", f"RSS with {sizes.held:,} slow streams open (MiB)", mb),
        Row("switch50", "switch overhead p50, wake exit -> backend (ms)", ms),
        Row("switchmax", "switch overhead max, wake exit -> backend (ms)", ms),
        Row("steal", "CPU time the host took meanwhile (steal, % of both CPUs)", 100, ratio=False),
    ]


def num(x: float) -> str:
    a = abs(x)
    return f"{x:.0f}" if a >= 100 else f"{x:.1f}" if a >= 10 else f"{x:.2f}"


def summarize(runs: List[Dict[str, Dict[str, float]]], labels: List[str],
              sizes: Sizes) -> Dict[str, Dict[str, Dict[str, float]]]:
    """{row key: {column: {median, min, max[, ratio]}}}, in the rows' units."""
    summary: Dict[str, Dict[str, Dict[str, float]]] = {}
    for row in rows(sizes):
        cells: Dict[str, Dict[str, float]] = {}
        for label in labels:
            values = [r[label][row.key] * row.scale for r in runs if row.key in r.get(label, {})]
            if values:
                cells[label] = {"median": statistics.median(values), "min": min(values),
                                "max": max(values), "n": len(values)}
        direct = cells.get("direct", {}).get("median")
        for label, cell in cells.items():
            if row.ratio and direct and label != "direct":
                cell["ratio"] = cell["median"] / direct
        summary[row.key] = cells
    return summary


def cell(c: Optional[Dict[str, float]], whole: bool) -> str:
    if not c:
        return "–"
    show = (lambda x: f"{x:.0f}") if whole else num
    text = show(c["median"])
    if c["n"] > 1:
        text += f" ({show(c['min'])}–{show(c['max'])})"
    if "ratio" in c:
        text += f" ×{c['ratio']:.2f}"
    return text


def table(summary: Dict[str, Dict[str, Dict[str, float]]], labels: List[str], sizes: Sizes) -> str:
    lines = ["| measure | " + " | ".join(labels) + " |",
             "|---|" + "---:|" * len(labels)]
    for row in rows(sizes):
        cells = summary[row.key]
        if cells:
            lines.append(f"| {row.title} | " + " | ".join(cell(cells.get(l), row.whole) for l in labels) + " |")
    return "\n".join(lines)


# ───────────────────────────────────────── main ─────────────────────────────────────────


def raise_fd_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit; the children inherit it (row 6)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return hard
    except (OSError, ValueError):
        return soft


async def run(b: Bench, sizes: Sizes) -> Dict[str, Any]:
    skipped = {p.label: why for p in PEERS for why in [p.missing(b.args)] if why}
    if b.args.only:
        wanted = [w.strip() for w in b.args.only.split(",")]
        skipped.update({p.label: "not in --only" for p in PEERS
                        if p.label not in wanted and p.label not in skipped})
    failed: Dict[str, str] = {}
    runs: List[Dict[str, Dict[str, float]]] = []
    for n in range(b.args.runs):
        runs.append({})
        for peer in PEERS:
            if peer.label in skipped or peer.label in failed:
                continue
            started = time.monotonic()
            try:
                runs[-1][peer.label] = await column(b, peer, sizes)
            except Unavailable as e:
                skipped[peer.label] = str(e)
                continue
            except Exception as e:  # a peer that breaks fails alone
                failed[peer.label] = f"run {n + 1}: {type(e).__name__}: {e}"[:500]
                continue
            print(f"run {n + 1}/{b.args.runs}: {peer.label}: {time.monotonic() - started:.1f} s",
                  file=sys.stderr, flush=True)
    return {"runs": runs, "skipped": skipped, "failed": failed}


NOTES = """
- Time to first byte: {streams} new connections, then all their POSTs in one instant.
  The bursts measured ({bursts}; the median of their p50s and of their p99s) come after a
  first, so the proxy's upstream pool is warm (nginx keeps 64 idle connections of the
  {streams}, aiohttp and llmux.py all of them).  The first, cold, is a row of its own: each
  of its requests opens a backend connection, as after a switch.
- Chunk latency: arrival at the client less the backend's stamp at write.  A stream's
  first event goes with its head; after that the {streams} streams take turns on one
  schedule, {per} of them every {tick:g} ms.  Under bursts: this client opens the bursts'
  connections too (on the backend's CPU), so direct's rise is the client's own share.
- CPU: utime+stime of the proxy's process tree from /proc (10 ms ticks); per chunk, the
  streams' CPU less {streams} requests at the cost measured over {conns} keep-alive connections.
- Steal: CPU time the hypervisor took from both CPUs during the column's latency rows.  It
  comes in slices of milliseconds, and every stream waiting meanwhile sees one: a column
  with steal above a few tenths of a percent has a p99 that measures the host.
- direct: client and backend share CPU 1, and that contention is in every column; a proxy
  alone on CPU 0 can smooth it, so a ratio under 1 is possible (it is no lower bound).
- nginx: proxy_request_buffering off (a body is streamed on, not spooled), proxy_buffering
  off; it reads no "model" from a body.  llmux.py writes its log line per request (to a
  file; it has no switch for that), nginx and aiohttp log none."""


def report(b: Bench, sizes: Sizes, result: Dict[str, Any], secs: float) -> Dict[str, Any]:
    labels = [p.label for p in PEERS]
    summary = summarize(result["runs"], labels, sizes)
    pinning = ("pinned: the proxy alone on CPU 0, bench and backend on CPU 1" if b.pin
               else "not pinned")
    print(f"llmux.py overhead (issue 11), {os.cpu_count()} cores, {pinning}, "
          f"{b.args.runs} run(s){', quick' if b.args.quick else ''}, {secs:.0f} s\n")
    described = {}
    for p in PEERS:
        if p.label not in result["skipped"]:
            described[p.label] = p.about(b.args)
            print(f"- {p.label}: {described[p.label]}")
    for label, why in {**result["skipped"], **result["failed"]}.items():
        print(f"- {label}: – ({why})")
    print("\nA cell is the median over runs (min–max); ×: median / direct median.\n")
    print(table(summary, labels, sizes))
    print(NOTES.format(streams=STREAMS, bursts=BURSTS, conns=SMALL_CONNS, per=STREAMS // TICK_PHASES,
                       tick=PACED_GAP / TICK_PHASES * 1e3))
    return {"meta": {"python": sys.version.split()[0], "cpus": os.cpu_count(), "pinned": b.pin,
                     "runs": b.args.runs, "quick": b.args.quick, "seconds": secs,
                     "sizes": dataclasses.asdict(sizes), "columns": described},
            "skipped": result["skipped"], "failed": result["failed"],
            "runs": result["runs"], "summary": summary}


def main() -> None:
    if sys.argv[1:2] == ["backend"]:
        backend_main(int(sys.argv[2]), sys.argv[3], sys.argv[4] if len(sys.argv) > 4 else None)
        return
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs (about a minute in all)")
    ap.add_argument("--runs", type=int, default=2, help="repeat everything N times (default 2)")
    ap.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    ap.add_argument("--json", metavar="FILE", help="write every raw number here")
    ap.add_argument("--peer-python", default=VENV_PYTHON,
                    help=f"runs the aiohttp + uvloop peer (default {VENV_PYTHON})")
    ap.add_argument("--llmux-python", default=VENV_PYTHON,
                    help=f"runs llmux.py with LLMUX_LOOP=uvloop (default {VENV_PYTHON})")
    ap.add_argument("--llmux", default=str(ROOT / "llmux.py"), help="the llmux.py to measure")
    ap.add_argument("--baseline", metavar="PATH",
                    help="another llmux.py (an earlier version, say) as one more column")
    ap.add_argument("--only", metavar="LABELS",
                    help="comma-separated column labels to run, e.g. 'direct,llmux.py'")
    args = ap.parse_args()
    pin = not args.no_pin and shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    if pin:
        os.sched_setaffinity(0, {1})
    raise_fd_limit()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the finally below runs
    sizes = QUICK if args.quick else FULL
    # A full collection over the client's 30,000 recorded events takes milliseconds: it
    # would show up as chunk latency in every column.  The bench lives minutes.
    gc.disable()
    procs = Procs()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="llmux-overhead-") as tmp:
        bench = Bench(tmp, procs, pin, args)
        try:
            result = asyncio.run(run(bench, sizes))
        finally:  # also on Ctrl-C and errors, and before the directory goes
            procs.stop_all()
        raw = report(bench, sizes, result, time.monotonic() - started)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(raw, f, indent=1)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:  # every child is stopped by now
        sys.exit(130)
