#!/usr/bin/env python3
"""What a task step costs beside a callback: the price of an await in llmux's request path.

    python3 bench/task_step.py [--iterations N]

A request to llmux resumes its connection's task twice: when the request has arrived
(the read), and when the answer has been relayed (the relay's end).  Each resume is a
future made and resolved, a task step, and the coroutines between the task and the
await (three in llmux: the connection, the request, the relay) sent into and returned
from.  This counts that beside the same work done by plain callbacks, with the same
number of event-loop turns (two each), as user-space instructions under valgrind's
callgrind (when installed; the same code gives the same count within about 1%) and as
time.  Nothing is asserted; it prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time


async def _leaf(loop: asyncio.AbstractEventLoop) -> None:
    f = loop.create_future()
    loop.call_soon(f.set_result, None)  # turn 1 resolves it, turn 2 runs the task's step
    await f


async def _middle(loop: asyncio.AbstractEventLoop) -> None:
    await _leaf(loop)


async def _top(loop: asyncio.AbstractEventLoop) -> None:
    await _middle(loop)


async def run(shape: str, n: int) -> None:
    loop = asyncio.get_running_loop()
    if shape == "task":
        for _ in range(n):
            await _top(loop)
    elif shape == "callbacks":
        done = loop.create_future()
        left = [n]

        def second() -> None:
            left[0] -= 1
            if left[0]:
                loop.call_soon(first)
            else:
                done.set_result(None)

        def first() -> None:
            loop.call_soon(second)  # two turns of the loop, as the task's resume takes

        loop.call_soon(first)
        await done


def count(shape: str, n: int) -> int:
    """User-space instructions of this script doing ``n`` iterations of ``shape``."""
    with tempfile.TemporaryDirectory(prefix="llmux-task-step-") as tmp:
        out = os.path.join(tmp, "callgrind.out")
        subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                        sys.executable, __file__, "--shape", shape, "--iterations", str(n)],
                       check=True, capture_output=True, timeout=600)
        with open(out) as f:
            for line in f:
                if line.startswith(("summary:", "totals:")):
                    return int(line.split()[1])
    raise RuntimeError("callgrind wrote no totals")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--iterations", type=int, default=20000)
    ap.add_argument("--shape", choices=("none", "task", "callbacks"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.shape:  # one measured run, under valgrind
        asyncio.run(run(args.shape, args.iterations))
        return
    n = args.iterations
    secs = {}
    for shape in ("task", "callbacks"):
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            asyncio.run(run(shape, n))
            best = min(best, time.perf_counter() - started)
        secs[shape] = best / n * 1e6
    print(f"Python {sys.version.split()[0]}, {n} iterations, two event-loop turns each\n")
    print("| | a task resumed through 3 coroutines | callbacks | the resume's own cost |")
    print("|---|---:|---:|---:|")
    print(f"| µs an iteration (best of 5) | {secs['task']:.2f} | {secs['callbacks']:.2f} | "
          f"{secs['task'] - secs['callbacks']:.2f} |")
    if shutil.which("valgrind"):
        base = count("none", n)
        ins = {shape: (count(shape, n) - base) / n for shape in ("task", "callbacks")}
        print(f"| instructions an iteration (callgrind) | {ins['task']:,.0f} | {ins['callbacks']:,.0f} | "
              f"{ins['task'] - ins['callbacks']:,.0f} |")
    else:
        print("- instructions: – (valgrind is not installed)")


if __name__ == "__main__":
    main()
