#!/usr/bin/env python3
"""Soak llmux: mixed traffic over three models, random disconnects, random hook failures.

    python3 bench/soak.py [--seconds 300] [--clients 16] [--seed 1]

Starts three demo backends and llmux (child processes; traffic on 127.0.0.1 only), then
runs client tasks until the time is up: each picks a model (skewed, so switches happen
in bursts and in interleavings), streams or not, and now and then hangs up mid-answer.
Wake hooks fail at random (about 1 in 10).  Beside them run hostile clients: oversized
bodies (413), bodies trickled below the minimum rate (408), bodies in a storm of 1-byte
chunks (400), pathological multipart part heads (answered at once), and floods of idle
connections past llmux's connection table while llmux runs with a low fd limit (ulimit
-n 256), so every honest client depends on idle eviction and no hook may fail for lack
of fds.  At the end it checks and prints:

  * every request got a complete answer or an error status (none hung, none was cut
    without cause);
  * every slot count and queue is back to zero;
  * llmux's RSS and open file descriptors are back near their baseline (both read with
    every model put to sleep, so that keep-alive connections to backends are closed).

Exit status 0 when every check passes.  test_llmux.py runs a 20-second version.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import llmux  # noqa: E402
from overhead import stop  # noqa: E402  (bench/ is on the path when run as a script)

LLMUX = str(ROOT / "llmux.py")
MODELS = ("llama", "qwen", "mistral")
REQUEST_DEADLINE = 60.0  # a request taking longer than this counts as hung


async def quiesce(port: int, pid: int, baseline_fds: int = 0) -> Tuple[int, int]:
    """Put every model to sleep (which also closes llmux's keep-alive connections to its
    backend), give closed client connections a moment, then read RSS and fds."""
    deadline = time.monotonic() + 10

    def put_to_sleep() -> bool:
        """Ask every active model to sleep; whether any was still active.  A request may
        be refused while a last switch runs (the clients have just stopped): asked again."""
        active = [name for name, model in get_json(port, "/health")["models"].items()
                  if model["state"] == "active"]
        for name in active:
            answer = get_json(port, f"/llmux/models/{name}/sleep", "POST")
            code = answer.get("error", {}).get("code")
            if code not in (None, "conflict"):  # busy (409): asked again next look
                raise RuntimeError(f"sleep of {name} refused: {answer}")
        return bool(active)

    awake = put_to_sleep()
    stats = proc_stats(pid)
    while (awake or (baseline_fds and stats[1] > baseline_fds)) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        awake = put_to_sleep()
        stats = proc_stats(pid)
    if awake:  # the checks below would be read off a node that never went quiet
        raise RuntimeError("a model was still active 10 s after being asked to sleep")
    return stats


def proc_stats(pid: int) -> Tuple[int, int]:
    """(RSS in KiB, open file descriptors) of a process."""
    with open(f"/proc/{pid}/status") as f:
        rss = int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


async def one_request(port: int, rng: random.Random, conn: Dict[str, Any]) -> str:
    """One request on the client's connection; returns its outcome."""
    model = rng.choices(MODELS, weights=(6, 3, 1))[0]
    stream = rng.random() < 0.5
    hang_up = rng.random() < 0.1
    body = json.dumps({"model": model, "stream": stream, "max_tokens": rng.randint(1, 12),
                       "messages": [{"role": "user", "content": "soak"}]}).encode()
    if conn.get("writer") is None:
        conn["reader"], conn["writer"] = await asyncio.open_connection("127.0.0.1", port)
    reader, writer = conn["reader"], conn["writer"]
    writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: soak\r\ncontent-type: application/json\r\n"
                 b"content-length: %d\r\n\r\n%s" % (len(body), body))
    parser = llmux.ResponseParser("POST")
    status, pieces = 0, []
    while True:
        event = parser.next_event()
        if event is llmux.NEED_DATA:
            data = await reader.read(65536)
            if not data:
                parser.feed_eof()
            else:
                parser.feed(data)
            if hang_up and status:
                writer.transport.abort()
                conn["writer"] = None
                return "client hung up"
            continue
        if isinstance(event, llmux.ResponseHead):
            status = event.status
            keep = event.keep_alive
        elif isinstance(event, llmux.Body):
            pieces.append(event.data)
        else:
            break
    text = b"".join(pieces)
    if not keep:
        writer.close()
        conn["writer"] = None
    if status == 200:
        if stream and text.endswith(b"\n\n") and text.rsplit(b"\n\n", 2)[-2].startswith(b'data: {"error"'):
            # A held stream whose wait failed: its error ends it as an SSE event.
            error = json.loads(text.rsplit(b"\n\n", 2)[-2][6:])["error"]
            return f"error (in stream) {error.get('code')}" if error.get("message") else "BROKEN: 200 error"
        complete = text.endswith(b"data: [DONE]\n\n") if stream else b'"choices"' in text
        return "ok" if complete else "BROKEN: incomplete 200"
    error = json.loads(text).get("error", {})
    return f"error {status} {error.get('code')}" if error.get("message") else f"BROKEN: {status}"


async def client(port: int, rng: random.Random, until: float, outcomes: Dict[str, int]) -> None:
    conn: Dict[str, Any] = {}
    while time.monotonic() < until:
        try:
            outcome = await asyncio.wait_for(one_request(port, rng, conn), REQUEST_DEADLINE)
        except asyncio.TimeoutError:
            outcome = "BROKEN: hung"
            conn["writer"] = None
        except (llmux.HTTPError, ConnectionError, ValueError) as e:
            outcome = f"BROKEN: {type(e).__name__}: {e}"
            conn["writer"] = None
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    if conn.get("writer") is not None:
        conn["writer"].close()


HOSTILE = ("oversized", "trickle", "chunk-storm", "multipart", "flood")
EXPECTED = {"oversized": {413}, "trickle": {408}, "chunk-storm": {400}, "multipart": {200, 404, 503, 504}}  # 404: the demo has no audio route


async def hostile_request(port: int, kind: str, rng: random.Random) -> str:
    """One hostile request of ``kind``; returns its outcome (BROKEN: ... if unexpected)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: soak\r\nconnection: close\r\n"
        if kind == "oversized":  # over max_body_bytes: refused on its length, unread
            writer.write(head + b"content-type: application/json\r\ncontent-length: %d\r\n\r\n"
                         % (8 * 1024 * 1024) + b"{" * 65536)
        elif kind == "trickle":  # far below min_body_rate_bytes_per_sec
            writer.write(head + b"content-length: 100000\r\n\r\n{")
            for _ in range(200):
                await asyncio.sleep(0.05)
                writer.write(b" ")
                if reader.at_eof() or reader._buffer:  # type: ignore[attr-defined]
                    break
        elif kind == "chunk-storm":  # one byte per chunk: bounded pieces per body
            writer.write(head + b"transfer-encoding: chunked\r\n\r\n"
                         + b"1\r\n \r\n" * 200_000 + b"0\r\n\r\n")
        else:  # multipart whose part head repeats content-disposition:; (regex bait)
            bad = b"content-disposition:;" * 20_000
            body = (b"--b\r\n" + bad + b"\r\n\r\nx\r\n--b\r\ncontent-disposition: form-data; "
                    b'name="model"\r\n\r\n' + rng.choice(MODELS).encode() + b"\r\n--b--\r\n")
            writer.write(b"POST /v1/audio/transcriptions HTTP/1.1\r\nhost: soak\r\nconnection: close\r\ncontent-type: "
                         b"multipart/form-data; boundary=b\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
        try:
            await writer.drain()
        except ConnectionError:
            pass  # refused early; the answer is still readable
        # What arrived already: a write that failed after llmux closed (a client that
        # trickled on past its 408) sets an exception that read() raises before the data.
        data = bytes(reader._buffer)  # type: ignore[attr-defined]
        reader._buffer.clear()  # type: ignore[attr-defined]
        while True:
            try:
                piece = await reader.read(65536)
            except ConnectionError:
                break
            if not piece:
                break
            data += piece
            if b"\r\n\r\n" in data and kind != "multipart":
                break
    finally:
        writer.transport.abort()
    match = re.match(rb"HTTP/1\.1 (\d{3}) ", data)
    status = int(match.group(1)) if match else 0
    if status in EXPECTED[kind]:
        return f"{kind}: {status}"
    return f"BROKEN: {kind} got {status or 'no answer'}: {data[:120]!r}"


async def flood(port: int, count: int) -> str:
    """Open ``count`` idle connections (past llmux's table), hold them, let them go."""
    conns = []
    for _ in range(count):
        try:
            conns.append(await asyncio.open_connection("127.0.0.1", port))
        except OSError:
            break
    await asyncio.sleep(1.0)
    evicted = sum(1 for reader, _ in conns if reader.at_eof() or reader._buffer)  # type: ignore[attr-defined]
    for _, writer in conns:
        writer.transport.abort()
    return f"flood: {len(conns)} idle connections, {evicted} evicted"


async def hostile(port: int, rng: random.Random, until: float, outcomes: Dict[str, int]) -> None:
    while time.monotonic() < until:
        kind = rng.choice(HOSTILE)
        try:
            if kind == "flood":
                outcome = await asyncio.wait_for(flood(port, 160), REQUEST_DEADLINE)
                outcome = outcome.split(",")[0].rsplit(" ", 3)[0]  # one line per kind
            else:
                outcome = await asyncio.wait_for(hostile_request(port, kind, rng), REQUEST_DEADLINE)
        except asyncio.TimeoutError:
            outcome = f"BROKEN: {kind} hung"
        except OSError as e:
            outcome = f"BROKEN: {kind}: {e}"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1


def get_json(port: int, path: str, method: str = "GET") -> Any:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
        s.sendall(f"{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n"
                  f"content-length: 0\r\n\r\n".encode())
        data = b""
        while True:
            piece = s.recv(65536)
            if not piece:
                break
            data += piece
    return json.loads(data.partition(b"\r\n\r\n")[2])


async def soak(seconds: float, clients: int, seed: int) -> int:
    tmp = tempfile.mkdtemp(prefix="llmux-soak-")
    procs: List[subprocess.Popen] = []
    models: Dict[str, Any] = {}
    fail = ("n=$(od -An -N1 -tu1 /dev/urandom); "
            "if [ $n -lt 26 ]; then echo 'random wake failure' >&2; exit 1; fi")
    for name in MODELS:
        sock = socket.create_server(("127.0.0.1", 0), backlog=1024)
        procs.append(subprocess.Popen(
            [sys.executable, LLMUX, "demo-backend", "--model", name, "--fd", str(sock.fileno()),
             "--token-delay", "0.002"], pass_fds=(sock.fileno(),)))
        models[name] = {"port": sock.getsockname()[1], "wake": fail, "sleep": "true"}
        sock.close()
    config = os.path.join(tmp, "soak.json")
    with open(config, "w") as f:
        json.dump({"models": models, "policy": {"request_timeout_secs": 30, "wake_backoff_secs": 0.1},
                   "http": {"max_body_bytes": 1024 * 1024, "body_timeout_secs": 1,
                            "min_body_rate_bytes_per_sec": 1024}}, f)
    log_path = os.path.join(tmp, "llmux.log")
    log = open(log_path, "w")

    def low_fd_limit() -> None:  # as on many hosts: 256 fds, soft and hard
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    failed = False
    lx = subprocess.Popen([sys.executable, LLMUX, "-c", config, "-p", "0", "--host", "127.0.0.1"],
                          stdout=log, stderr=log, preexec_fn=low_fd_limit)
    procs.append(lx)
    try:
        port = 0
        deadline = time.monotonic() + 10
        while not port and time.monotonic() < deadline:
            match = re.search(r"listening url=http://127\.0\.0\.1:(\d+)", open(log_path).read())
            port = int(match.group(1)) if match else 0
            time.sleep(0.02)
        rng = random.Random(seed)
        warm: Dict[str, int] = {}
        await client(port, random.Random(seed - 1), time.monotonic() + 1.0, warm)  # warm up
        baseline = await quiesce(port, lx.pid)
        outcomes: Dict[str, int] = {}
        started = time.monotonic()
        until = started + seconds
        await asyncio.gather(*(client(port, random.Random(rng.random()), until, outcomes)
                               for _ in range(clients)),
                             *(hostile(port, random.Random(rng.random()), until, outcomes)
                               for _ in range(max(1, clients // 4))))
        elapsed = time.monotonic() - started
        settle = time.monotonic() + 10
        health = get_json(port, "/health")
        while (health["queued"] or any(m["in_flight"] for m in health["models"].values())) \
                and time.monotonic() < settle:
            await asyncio.sleep(0.05)
            health = get_json(port, "/health")
        end = await quiesce(port, lx.pid, baseline[1])
    except BaseException:
        failed = True
        raise
    finally:
        stop(*procs)
        log.close()
        with open(log_path) as f:
            log_text = f.read()
        shutil.rmtree(tmp, ignore_errors=True)  # the config and the log: nothing is left
        if failed:  # what llmux said, now that its folder is gone
            sys.stderr.write("llmux's log, last lines:\n" + "".join(log_text.splitlines(True)[-40:]))
    switches = len(re.findall(r"switch\.end .*result=ok", log_text))
    failed_wakes = len(re.findall(r"error hook\.exit model=\S+ hook=wake", log_text))
    fd_failures = len(re.findall(r"could not start", log_text))
    unclean = re.findall(r"^Traceback|never retrieved|Task was destroyed| internal\.error ",
                         log_text, flags=re.M)

    total = sum(outcomes.values())
    broken = {k: v for k, v in outcomes.items() if k.startswith("BROKEN")}
    slots_zero = health["queued"] == 0 and all(m["in_flight"] == 0 for m in health["models"].values())
    rss_growth = end[0] - baseline[0]
    fd_growth = end[1] - baseline[1]
    checks = {
        "every request answered or failed with a status": not broken,
        "all slot counts and queues back to zero": slots_zero,
        "open fds back to baseline (±4)": abs(fd_growth) <= 4,
        "RSS growth under 16 MiB": rss_growth < 16 * 1024,
        "no hook failed for lack of fds": fd_failures == 0,
        "no traceback, lost task or internal error in the log": not unclean,
    }
    print(f"soak: {elapsed:.0f}s, {clients} clients, seed {seed}, Python {sys.version.split()[0]}")
    print("| outcome | requests |\n|---|---:|")
    for outcome, count in sorted(outcomes.items(), key=lambda kv: -kv[1]):
        print(f"| {outcome} | {count} |")
    print(f"| **total** | **{total}** ({total / elapsed:.0f}/s) |")
    print(f"\nswitches: {switches}, failed wakes: {failed_wakes}")
    print(f"llmux RSS: {baseline[0] / 1024:.1f} MiB -> {end[0] / 1024:.1f} MiB; "
          f"open fds: {baseline[1]} -> {end[1]}")
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}: {name}")
    return 0 if all(checks.values()) else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    return asyncio.run(soak(args.seconds, args.clients, args.seed))


if __name__ == "__main__":
    sys.exit(main())
