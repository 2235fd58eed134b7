#!/usr/bin/env python3
"""Where a proxied request's Python goes, function by function: bytecodes counted, not sampled.

    python3 bench/opcodes.py [--requests N] [--top K] [--llmux PATH]

A sampling profiler (py-spy) or callgrind sees a flat profile: no function of llmux's
takes more than a few percent, and callgrind cannot tell one Python function from
another.  This runs llmux.py under a trace function that counts the bytecodes each
function executes (sys.settrace with opcode events), sends --requests small requests
over bench/overhead.py's 64 keep-alive connections (after a warm-up), and prints the
count per request, by function and by part of the work.  The same code gives the same
counts within about 1% (what moves is how many requests wait their turn).  A bytecode
is not a unit of time (one calls a regex, another adds two ints), and C code (the
parsers' regexes, json, the kernel) is not counted: read it beside bench/instructions.py
and overhead.py's CPU rows.  Under the tracer llmux runs about 30 times slower.
Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import tempfile
import time
from typing import Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import overhead as o  # noqa: E402  (the fake backend, the client)

# Runs llmux.py (argv[1:]) with a trace function that counts bytecodes per function while
# counting is on: SIGUSR1 starts (from zero), SIGUSR2 stops and writes the counts as JSON.
COUNTER = r'''
import collections, json, os, runpy, signal, sys
counts, on = collections.Counter(), [False]
def local(frame, event, arg):
    if event == "opcode" and on[0]:
        co = frame.f_code
        counts[(co.co_filename.rsplit("/", 1)[-1], co.co_firstlineno, co.co_name)] += 1
    return local
def tracer(frame, event, arg):
    frame.f_trace_opcodes, frame.f_trace_lines = True, False
    return local
def start(*_):
    counts.clear(); on[0] = True
def dump(*_):
    on[0] = False
    with open(os.environ["OPCODES_OUT"] + ".part", "w") as f:
        json.dump([[*k, v] for k, v in counts.most_common()], f)
    os.rename(os.environ["OPCODES_OUT"] + ".part", os.environ["OPCODES_OUT"])
signal.signal(signal.SIGUSR1, start)
signal.signal(signal.SIGUSR2, dump)
sys.argv = sys.argv[1:]
sys.settrace(tracer)
runpy.run_path(sys.argv[0], run_name="__main__")
'''

# The parts of the work, by llmux.py function name (the rest of llmux.py is "other").
PARTS: List[Tuple[str, "re.Pattern[str]"]] = [
    ("heads: parse, check, frame, write", re.compile(
        r"_whole_head|_head|_response|_content_length|request_framing|response_framing|"
        r"client_response_head|upstream_request|_skipped|_field_lines|_read_start|next_event|"
        r"whole_body|_start_body|_cut|^get$|_header_tokens|_field_block|feed|__init__@Parser")),
    ("the log line and metrics", re.compile(r"^request$|_now|_write|^flush$|emit|observe|^inc$|_text_fields")),
    ("routing and model", re.compile(r"_route_now|_json_model_quick|route_path|cors_headers|_is_control|resolve")),
    ("switcher: slot, queue, turn", re.compile(r"enqueue|_new_slot|_release|release|^start$|_turn")),
    ("the request's way: connection, relay, pool, timers", re.compile(
        r"_respond|read_request|_serve_connection|^relay$|_pump|begin|_send|data_received|^idle$|"
        r"^put$|_answer_head|_done|_settle|_end|_touch|_unsent|pending|_attach|^check$|grow_to|"
        r"claim|^at$|arm|_keeps|_Answer|RelayResult")),
]


def part(name: str) -> str:
    for label, rx in PARTS:
        if rx.search(name):
            return label
    return "other llmux.py"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=2560, help="requests counted (default 2560)")
    ap.add_argument("--top", type=int, default=30, help="functions listed (default 30)")
    ap.add_argument("--llmux", default=str(o.ROOT / "llmux.py"), help="the llmux.py to count")
    args = ap.parse_args()
    args.requests -= args.requests % o.SMALL_CONNS
    procs = o.Procs()
    with tempfile.TemporaryDirectory(prefix="llmux-opcodes-") as tmp:
        b = o.Bench(tmp, procs, False, args)
        try:
            backend = o.start_backend(b, "a")
            config, log, out = (os.path.join(tmp, n) for n in ("llmux.json", "llmux.log", "counts.json"))
            with open(config, "w") as f:
                json.dump(o.llmux_config(backend.port), f)
            proc = procs.start([sys.executable, "-c", COUNTER, args.llmux, "-c", config, "-p", "0",
                                "--host", "127.0.0.1"], log,
                               env={**os.environ, "LLMUX_REEXEC": "0", "OPCODES_OUT": out})
            port = o._wait_for("llmux.py", proc, log, lambda: _port(log))
            meter = o.Meter(proc.pid)
            asyncio.run(o.small_requests(port, 3 * o.SMALL_CONNS, meter))  # warm-up
            os.kill(proc.pid, signal.SIGUSR1)
            time.sleep(0.5)  # (the handler runs between bytecodes: at once, on an idle loop)
            asyncio.run(o.small_requests(port, args.requests, meter))
            os.kill(proc.pid, signal.SIGUSR2)
            deadline = time.monotonic() + 60
            while not os.path.exists(out) and time.monotonic() < deadline:
                time.sleep(0.1)
            with open(out) as f:
                rows = json.load(f)
        finally:
            procs.stop_all()
    report(rows, args.requests, args.top)


def _port(log: str) -> "int | None":
    with open(log, errors="replace") as f:
        match = re.search(r"listening url=http://127\.0\.0\.1:(\d+)", f.read())
    return int(match.group(1)) if match else None


def report(rows: List[list], requests: int, top: int) -> None:
    total = sum(r[3] for r in rows)
    files: Dict[str, int] = {}
    parts: Dict[str, int] = {}
    # A comprehension counts for the function around it: the nearest one above it.
    defs = sorted((line, name) for filename, line, name, _ in rows
                  if filename == "llmux.py" and not name.startswith("<"))
    for filename, line, name, n in rows:
        files[filename] = files.get(filename, 0) + n
        if filename == "llmux.py":
            if name.startswith("<"):
                above = [d for d in defs if d[0] <= line]
                name = above[-1][1] if above else name
            parts[part(name)] = parts.get(part(name), 0) + n
    print(f"\n{requests} small requests over {o.SMALL_CONNS} keep-alive connections: "
          f"{total / requests:,.0f} bytecodes a request\n")
    print("| file | bytecodes a request | share |\n|---|---:|---:|")
    for filename, n in sorted(files.items(), key=lambda kv: -kv[1])[:8]:
        print(f"| {filename} | {n / requests:,.0f} | {100 * n / total:.1f}% |")
    print("\n| llmux.py, by part of the work | bytecodes a request | share |\n|---|---:|---:|")
    for label, n in sorted(parts.items(), key=lambda kv: -kv[1]):
        print(f"| {label} | {n / requests:,.0f} | {100 * n / total:.1f}% |")
    print(f"\n| function (the {top} that run most) | bytecodes a request | share |\n|---|---:|---:|")
    for filename, line, name, n in rows[:top]:
        print(f"| {filename}:{line} {name} | {n / requests:,.1f} | {100 * n / total:.1f}% |")


if __name__ == "__main__":
    main()
