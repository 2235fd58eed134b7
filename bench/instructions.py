#!/usr/bin/env python3
"""Instructions per proxied request, counted by valgrind (callgrind): the CPU work of
bench/overhead.py's row 3 without the host's noise, side by side, as ratios.

    python3 bench/instructions.py [--requests N] [--only LABELS] [--baseline PATH]
                                  [--llmux PATH] [--peer-python PY]

On a shared VM the CPU time of the same run moves by 10-30% from one minute to the
next (other tenants, not steal alone).  The user-space instructions a proxy runs hardly
do: two runs of the same code agree within about 1% (what moves is how many requests of
llmux's wait their turn, which depends on timing).  So a change's CPU cost shows here at once,
where bench/overhead.py needs several runs.  What it does not count: the kernel's share
(the send and recv system calls, about a fifth of a request's CPU for every proxy
here, the same for all of them), and time (an instruction of C code in a cache miss costs
more than one of the interpreter's): read it beside overhead.py's CPU row, not instead.

Each column runs alone on CPU 0 under `valgrind --tool=callgrind --instr-atstart=no`
(about 50 times slower, so a few thousand requests, not overhead.py's 12,800): a warm-up
of 3 requests a connection first, then counting is switched on (callgrind_control) for
the measured requests (--requests, default 1,280, over 64 keep-alive connections),
off, and dumped.  A second proxy, the same way, counts 20 streams of 200 SSE events
(the chunk row: their count less 20 requests at the first count, per event), and a
third, 6 bursts of 100 new connections with a small request each (the new-connection
row: what a stream start costs in overhead.py's time-to-first-byte bursts, the accept,
the connection's setup and its close included).  Columns: llmux.py, --baseline (an earlier llmux.py), the aiohttp +
uvloop peer (when --peer-python imports them), and the two asyncio HTTP floors (see
bench/overhead.py).  llmux.py runs with LLMUX_REEXEC=0: valgrind follows no exec.
Nothing here is asserted; it prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List, NamedTuple, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import overhead as o  # noqa: E402  (the fake backend, the client, the peers' scripts)

STARTUP_SECS = 120  # llmux.py's start under valgrind: seconds, not milliseconds


class Column(NamedTuple):
    label: str
    argv: Callable[[argparse.Namespace, int, str], List[str]]  # (args, backend port, config dir)
    missing: Callable[[argparse.Namespace], Optional[str]]
    llmux: bool = False  # reads a config and prints its port; else given a listening fd


def _llmux(path: Callable[[argparse.Namespace], Optional[str]]) -> Callable[[argparse.Namespace, int, str], List[str]]:
    def argv(a: argparse.Namespace, backend: int, tmp: str) -> List[str]:
        config = os.path.join(tmp, "llmux.json")
        with open(config, "w") as f:
            json.dump(o.llmux_config(backend), f)
        return [sys.executable, str(path(a)), "-c", config, "-p", "0", "--host", "127.0.0.1"]
    return argv


def _script(python: Callable[[argparse.Namespace], str], script: str, *extra: str
            ) -> Callable[[argparse.Namespace, int, str], List[str]]:
    return lambda a, backend, tmp: [python(a), script, "--upstream", str(backend), *extra]


COLUMNS = [
    Column("llmux.py", _llmux(lambda a: a.llmux), lambda a: None, llmux=True),
    Column("baseline llmux.py", _llmux(lambda a: a.baseline),
           lambda a: None if a.baseline else "no --baseline given", llmux=True),
    Column("aiohttp + uvloop", _script(lambda a: a.peer_python, o.PEER_SCRIPT),
           lambda a: o._imports(a.peer_python, "aiohttp, uvloop")),
    Column("asyncio HTTP floor", _script(lambda a: sys.executable, o.HTTP_FLOOR_SCRIPT), lambda a: None),
    Column("HTTP floor + tasks", _script(lambda a: sys.executable, o.HTTP_FLOOR_SCRIPT, "--tasks"),
           lambda a: None),
]


def _control(*argv: str) -> None:
    subprocess.run(["callgrind_control", *argv], check=True, capture_output=True, timeout=60)


STREAMS, CHUNKS, GAP = 20, 200, 0.002  # the chunk row: 20 streams of 200 events, 2 ms apart
BURST, BURSTS = 100, 6  # the new-connection row: 6 bursts of 100 new connections, a request each


def count(b: o.Bench, column: Column, requests: int, load: str = "requests") -> float:
    """Instructions per request of one column, on a fresh backend and proxy: ``load``
    "requests" (over keep-alive connections), "bursts" (each on a new connection), or
    "chunks" (in all, for STREAMS streams of CHUNKS events)."""
    backend = o.start_backend(b, "a")
    out = b.path("callgrind.out")
    tmp = os.path.dirname(out)
    argv = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}",
            *column.argv(b.args, backend.port, tmp)]
    log = os.path.join(tmp, "proxy.log")
    if column.llmux:
        proc = b.procs.start(b.pinned(0, argv), log, env={**os.environ, "LLMUX_REEXEC": "0"})
        deadline = time.monotonic() + STARTUP_SECS
        while True:
            with open(log, errors="replace") as f:
                match = re.search(r"listening url=http://127\.0\.0\.1:(\d+)", f.read())
            if match:
                port = int(match.group(1))
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                with open(log, errors="replace") as f:
                    raise RuntimeError(f"{column.label} did not start: {f.read()[-2000:]}")
            time.sleep(0.2)
    else:
        sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
        try:
            argv[argv.index("--upstream"):argv.index("--upstream")] = ["--port-fd", str(sock.fileno())]
            proc = b.procs.start(b.pinned(0, argv), log, pass_fds=(sock.fileno(),))
            port = sock.getsockname()[1]  # connections wait in the backlog while it starts
        finally:
            sock.close()
    try:
        meter = o.Meter(proc.pid)
        asyncio.run(asyncio.wait_for(o.small_requests(port, 3 * o.SMALL_CONNS, meter), STARTUP_SECS))
        _control("-i", "on", str(proc.pid))
        asyncio.run(asyncio.wait_for(_load(load, port, requests, meter), 20 * STARTUP_SECS))
        _control("-i", "off", str(proc.pid))
        _control("-d", str(proc.pid))
        total = None
        for path in glob.glob(out + "*"):
            with open(path) as f:
                for line in f:
                    if line.startswith(("summary:", "totals:")):
                        total = int(line.split()[1])
        if total is None:
            raise RuntimeError(f"{column.label}: callgrind wrote no totals")
        return total if load == "chunks" else total / (BURST * BURSTS if load == "bursts" else requests)
    finally:
        b.procs.stop(proc, backend.proc)


async def _load(load: str, port: int, requests: int, meter: o.Meter) -> None:
    if load == "chunks":
        await o.streams(port, STREAMS, CHUNKS, GAP)
    elif load == "bursts":
        for _ in range(BURSTS):
            await o.burst(port, BURST, 0, request=o.SMALL)
    else:
        await o.small_requests(port, requests, meter)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=20 * o.SMALL_CONNS,
                    help=f"requests counted (default {20 * o.SMALL_CONNS}, over {o.SMALL_CONNS} connections)")
    ap.add_argument("--llmux", default=str(o.ROOT / "llmux.py"), help="the llmux.py to measure")
    ap.add_argument("--baseline", metavar="PATH", help="another llmux.py as one more column")
    ap.add_argument("--peer-python", default=o.VENV_PYTHON,
                    help=f"runs the aiohttp + uvloop peer (default {o.VENV_PYTHON})")
    ap.add_argument("--only", metavar="LABELS", help="comma-separated column labels to run")
    args = ap.parse_args()
    if not shutil.which("valgrind") or not shutil.which("callgrind_control"):
        sys.exit("valgrind (with callgrind_control) is not installed: apt-get install valgrind")
    args.requests -= args.requests % o.SMALL_CONNS  # whole rounds of the connections
    pin = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    if pin:
        os.sched_setaffinity(0, {1})
    wanted = set(args.only.split(",")) if args.only else None
    results: Dict[str, float] = {}
    per_chunk: Dict[str, float] = {}
    per_connection: Dict[str, float] = {}
    skipped: Dict[str, str] = {}
    procs = o.Procs()
    with tempfile.TemporaryDirectory(prefix="llmux-instructions-") as tmp:
        b = o.Bench(tmp, procs, pin, args)
        try:
            for column in COLUMNS:
                why = column.missing(args) or (None if wanted is None or column.label in wanted
                                               else "not in --only")
                if why:
                    skipped[column.label] = why
                    continue
                started = time.monotonic()
                results[column.label] = count(b, column, args.requests)
                streamed = count(b, column, args.requests, "chunks")
                per_connection[column.label] = count(b, column, args.requests, "bursts")
                # Less the streams' own requests, at the cost just counted.
                per_chunk[column.label] = (streamed - STREAMS * results[column.label]) / (STREAMS * CHUNKS)
                print(f"{column.label}: {results[column.label]:,.0f} instructions a request, "
                      f"{per_chunk[column.label]:,.0f} a relayed chunk, "
                      f"{per_connection[column.label]:,.0f} a request on a new connection "
                      f"({time.monotonic() - started:.0f} s)", file=sys.stderr, flush=True)
        finally:
            procs.stop_all()
    labels = list(results)
    print(f"\n{args.requests} small requests over {o.SMALL_CONNS} keep-alive connections, "
          f"user-space instructions per request (callgrind); × is the ratio to aiohttp + uvloop\n")
    print("| | " + " | ".join(labels) + " |")
    print("|---|" + "---:|" * len(labels))
    for title, row in (("instructions per request", results),
                       (f"instructions per relayed chunk ({STREAMS} streams of {CHUNKS} events; "
                        "their requests' cost removed)", per_chunk),
                       (f"instructions per request on a new connection ({BURSTS} bursts of {BURST}: "
                        "connect all, then a small request on each at once)", per_connection)):
        ref = row.get("aiohttp + uvloop")
        print(f"| {title} | " + " | ".join(
            f"{row[k]:,.0f}" + (f" ×{row[k] / ref:.2f}" if ref and k != "aiohttp + uvloop" else "")
            for k in labels) + " |")
    for label, why in skipped.items():
        print(f"- {label}: – ({why})")


if __name__ == "__main__":
    main()
