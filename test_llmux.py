"""Tests for llmux.py, in the order of its sections.

Real sockets on 127.0.0.1, real `sh -c` hooks, real child processes as fake model
servers (this file, compiled once, run as `python3 FILE.pyc backend --fd N ...`).  Nothing waits on
wall-clock sleeps: tests synchronise on log lines, event files and sockets.  Every
blocking step has a timeout scaled by LLMUX_TEST_TIMEOUT_FACTOR, and a watchdog kills a
hung test (and its child processes) outright.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import collections
import contextlib
import dataclasses
import faulthandler
import fcntl
import http.client
import http.server
import gc
import json
import math
import os
import py_compile
import random
import re
import resource
import select
import shutil
import signal
import socket
import socketserver
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, Iterable, Iterator, List, Optional, Set, Tuple, cast


HERE = Path(__file__).resolve().parent
LLMUX = str(HERE / "llmux.py")
FACTOR = float(os.environ.get("LLMUX_TEST_TIMEOUT_FACTOR", "1"))
T = 15.0 * FACTOR  # one blocking step
HARD = 60.0 * FACTOR  # one whole test

_children: List[subprocess.Popen] = []
# What llmux must never print: a raw traceback, a lost task, or (even logged once with its
# traceback, as llmux does) an internal error: each is a bug in llmux.
UNCLEAN = re.compile(r"^Traceback \(most recent call last\)|never retrieved|Task was destroyed"
                     r"|^\w+Error: |Exception in callback"
                     r"| internal\.error ")  # logged as it should be, but still a bug in llmux


# ─────────────────────────────── fake backend (child process) ───────────────────────────


class _FakeHandler(http.server.BaseHTTPRequestHandler):
    """Behaviour by JSON body: stream/n, hold (a file to wait for), die_after, reset, echo."""

    protocol_version = "HTTP/1.1"
    server_version = "fake"

    def log_message(self, *args: Any) -> None:
        pass

    def _event(self, text: str) -> None:
        if self.server.events:  # type: ignore[attr-defined]
            with open(self.server.events, "a") as f:  # type: ignore[attr-defined]
                f.write(text + "\n")

    def do_GET(self) -> None:
        self._reply(200, {"backend": self.server.name, "path": self.path})  # type: ignore[attr-defined]

    def do_POST(self) -> None:
        name = self.server.name  # type: ignore[attr-defined]
        if self.path.startswith("/fault/"):
            self._fault(self.path[len("/fault/"):])
            return
        length = int(self.headers.get("content-length") or 0)
        body = self.rfile.read(length)
        try:
            doc = json.loads(body) if body.startswith(b"{") else {}
        except ValueError:
            doc = {}
        self._event(f"req {name}")
        if doc.get("reset"):
            self._abort()
            return
        if doc.get("echo"):
            self._reply(200, {"backend": name, "method": self.command, "path": self.path,
                              "headers": [[k.lower(), v] for k, v in self.headers.items()],
                              "body": body.decode("latin-1"),
                              "peer": self.client_address[1]})
            return
        if not doc.get("stream"):
            self._reply(200, {"backend": name, "model": doc.get("model"),
                              "peer": self.client_address[1]})
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        n = int(doc.get("n", 3))
        for i in range(n):
            if doc.get("die_after") == i:
                self._abort()
                return
            self._chunk(f"data: {json.dumps({'backend': name, 'i': i})}\n\n".encode())
            if i == 0 and doc.get("hold"):
                deadline = time.monotonic() + 60
                while not os.path.exists(doc["hold"]) and time.monotonic() < deadline:
                    time.sleep(0.005)
        self._event(f"stream-end {name}")  # before the last bytes: llmux cannot release first
        self._chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")
        self.wfile.flush()

    def _fault(self, kind: str) -> None:
        """Misbehave without reading the request body."""
        self._event(f"req {self.server.name}")  # type: ignore[attr-defined]
        raw = {"bad-status": b"HTTP/1.1 OK fine\r\n\r\n",
               "bad-header": b"HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n",
               "not-http": b"SSH-2.0-OpenSSH_9.0\r\n",
               "no-read": b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nno-read!"}.get(kind)
        if raw is not None:
            self.wfile.write(raw)
            self.wfile.flush()
            self.close_connection = True
        elif kind == "raw":  # the body's "raw" string, sent as is (latin-1); stays open
            doc = json.loads(self.rfile.read(int(self.headers.get("content-length") or 0)))
            self._event(f"raw-peer {self.client_address[1]}")  # first: llmux may answer at once
            self.wfile.write(doc["raw"].encode("latin-1"))
            self.wfile.flush()
        elif kind.startswith("stall:"):  # say nothing until a file exists
            deadline = time.monotonic() + 60
            while not os.path.exists(kind[6:]) and time.monotonic() < deadline:
                time.sleep(0.005)
            self.close_connection = True

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def _reply(self, status: int, obj: Any) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _abort(self) -> None:
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        self.connection.close()
        self.close_connection = True


CHILD_TERM_SECS = 0.3  # a fake backend's --child slow-term takes this long to exit on SIGTERM
_HOP = """import os, signal, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
events, name = sys.argv[1:3]
tag = "child-up"
if sys.argv[3:]:  # hold-port: it holds the fd it was given, and never hops
    with open(events, "a") as f:
        f.write(f"{tag} {os.getpid()} {name}\\n")
    time.sleep(3600)
while True:
    with open(events, "a") as f:
        f.write(f"{tag} {os.getpid()} {name}\\n")
    tag = "hop"
    time.sleep(0.005)
    if os.fork():
        os._exit(0)
"""


def fake_backend_main(argv: List[str]) -> None:
    """``--fd N``: serve on an inherited socket.  ``--port P``: bind P with SO_REUSEPORT
    (as a managed server, started by llmux, must bind its port itself: the test holds
    the port with a bound, not listening, SO_REUSEPORT socket, so no other process can
    take it).  ``--ignore-term``: SIGTERM does nothing.  ``--pidfile F``: write the pid.
    ``--child slow-term|ignore-term|hop``: start a child in its process group (as vLLM's
    engine core is) that, on SIGTERM, takes CHILD_TERM_SECS to exit, or ignores it; it
    notes ``child-up PID NAME`` and ``child-done PID NAME`` in --events.  ``hop`` ignores
    SIGTERM and every 5 ms forks and exits, noting ``hop PID NAME`` for each new one.
    ``hold-port`` ignores SIGTERM and holds the listening socket (as a server's workers do);
    ``plain`` dies of SIGTERM at once."""
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _FakeHandler, bind_and_activate=False)
    server.socket.close()
    if "--port" in argv:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(("127.0.0.1", int(argv[argv.index("--port") + 1])))
        sock.listen(64)
        server.socket = sock
    else:
        server.socket = socket.socket(fileno=int(argv[argv.index("--fd") + 1]))
    if "--ignore-term" in argv:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if "--pidfile" in argv:
        Path(argv[argv.index("--pidfile") + 1]).write_text(f"{os.getpid()}\n")
    if "--child" in argv:
        events, name = argv[argv.index("--events") + 1], argv[argv.index("--name") + 1]
        term = {"slow-term": f'sleep {CHILD_TERM_SECS}; echo "child-done $$ {name}" >> {events}; exit 0',
                "ignore-term": "", "hop": "", "hold-port": "", "plain": "-"}[argv[argv.index("--child") + 1]]
        def ups() -> int:
            return sum(line.startswith("child-up ") and line.endswith(f" {name}")
                       for line in Path(events).read_text().splitlines())
        up = ups()
        mode = argv[argv.index("--child") + 1]
        child = [sys.executable, "-c", _HOP, events, name] if mode in ("hop", "hold-port") else \
            ["sh", "-c", f"trap '{term}' TERM; echo \"child-up $$ {name}\" >> {events}; "
             "while :; do sleep 0.05; done"]
        if mode == "hold-port":
            child.append(str(server.socket.fileno()))  # _HOP's third argument: hold it, do not hop
        subprocess.Popen(child, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         pass_fds=(server.socket.fileno(),) if mode == "hold-port" else ())
        while ups() == up:  # up (its trap set) before the server is
            time.sleep(0.005)
    if "--port" in argv:
        print(f"fake backend listening on {sock.getsockname()[1]}", flush=True)
    server.daemon_threads = True
    server.name = argv[argv.index("--name") + 1]  # type: ignore[attr-defined]
    server.events = argv[argv.index("--events") + 1] if "--events" in argv else None  # type: ignore[attr-defined]
    server.serve_forever()


if __name__ == "__main__" and sys.argv[1:2] == ["backend"]:
    fake_backend_main(sys.argv[2:])  # before importing pytest: backends start fast
    sys.exit(0)

import pytest  # noqa: E402

import llmux  # noqa: E402

# The fake backend is this file, compiled once per session and run as its .pyc: over 250
# backends start in a run, and compiling these 8,000 lines took each of them ~0.1 s of CPU.
_BACKEND_DIR = tempfile.mkdtemp(prefix="llmux-test-backend-")
FAKE_BACKEND = os.path.join(_BACKEND_DIR, "fake_backend.pyc")
py_compile.compile(__file__, cfile=FAKE_BACKEND, doraise=True)
atexit.register(shutil.rmtree, _BACKEND_DIR, True)


# ───────────────────────────────────────── harness ──────────────────────────────────────


@pytest.fixture(autouse=True, scope="session")
def no_stray_processes() -> Any:
    """Whatever a test started and did not stop is killed when the session ends."""
    yield
    for p in _children:
        _kill(p)


@pytest.fixture(autouse=True)
def watchdog() -> Any:
    """Kill a hung test outright, with every child process, and show where it hung."""

    def hang() -> None:
        sys.stderr.write(f"\n*** test exceeded {HARD:g}s; tracebacks follow ***\n")
        faulthandler.dump_traceback(file=sys.__stderr__, all_threads=True)  # not pytest's capture
        for p in _children:
            _kill(p)
        os._exit(1)

    timer = threading.Timer(HARD, hang)
    timer.daemon = True
    timer.start()
    yield
    timer.cancel()


def _kill(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.kill()
    try:
        p.wait(T)
    except subprocess.TimeoutExpired:
        pass


def spawn(args: List[str], **kw: Any) -> subprocess.Popen:
    p = subprocess.Popen(args, **kw)
    _children.append(p)
    return p


class Backend:
    """A fake model server in a child process, on a socket bound here to port 0."""

    def __init__(self, name: str, events: Optional[Path]) -> None:
        sock = socket.create_server(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        args = [sys.executable, FAKE_BACKEND, "backend", "--fd", str(sock.fileno()), "--name", name]
        if events:
            args += ["--events", str(events)]
        self.proc = spawn(args, pass_fds=(sock.fileno(),))
        sock.close()

    def stop(self) -> None:
        _kill(self.proc)


class RawBackend:
    """A model server speaking raw bytes from threads of the test process, to misbehave
    in ways http.server cannot.  Every request head it reads is recorded in ``events`` as
    ``raw CONN METHOD TARGET``; ``answer(conn, n, method, target, body)`` returns the bytes
    to send (``conn`` is the connection's number, ``n`` the request's on it), or None
    to close without a word.  With ``read_body=False`` it answers right after the head
    and reads on as if the body were the next request, as a careless server would."""

    def __init__(self, events: Path, answer: Any, read_body: bool = True) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # inherited
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.events, self.answer, self.read_body = events, answer, read_body
        self.lock = threading.Lock()
        self.conns: List[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.conns.append(c)
                t = threading.Thread(target=self._serve, args=(c, len(self.conns) - 1), daemon=True)
                self.threads.append(t)
            t.start()

    def _serve(self, c: socket.socket, index: int) -> None:
        buf = bytearray()
        try:
            for n in range(1000):
                while b"\r\n\r\n" not in buf:
                    data = c.recv(1 << 20)
                    if not data:
                        return
                    buf += data
                end = buf.index(b"\r\n\r\n")
                lines = bytes(buf[:end]).split(b"\r\n")
                del buf[:end + 4]
                method, target = (lines[0].split(b" ") + [b"", b""])[:2]
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                body = b""
                if self.read_body:
                    while len(buf) < length:
                        data = c.recv(1 << 20)
                        if not data:
                            return
                        buf += data
                    body = bytes(buf[:length])
                    del buf[:length]
                with self.lock, open(self.events, "a") as f:
                    f.write(f"raw {index} {method.decode('latin-1')[:40]} {target.decode('latin-1')[:60]}\n")
                out = self.answer(index, n, method.decode("latin-1"), target.decode("latin-1"), body)
                if out is None:
                    return
                c.sendall(out)
        except OSError:
            return
        finally:
            c.close()

    def requests(self) -> List[str]:
        return [line for line in self.events.read_text().splitlines() if line.startswith("raw ")]

    def stop(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        except OSError:
            pass
        self.sock.close()
        with self.lock:
            for c in self.conns:
                try:
                    c.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
        for t in list(self.threads):
            t.join(T)


def http_reply(obj: Any, status: str = "200 OK", head_only: bool = False) -> bytes:
    data = json.dumps(obj).encode()
    return b"HTTP/1.1 %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (
        status.encode(), len(data), b"" if head_only else data)


class Llmux:
    """`python3 llmux.py` as a child process; its log lines are collected as they come."""

    def __init__(self, config: Dict[str, Any], tmp: Path, args: Tuple[str, ...] = (),
                 start_timeout: float = T, wrapper: Tuple[str, ...] = (), script: str = LLMUX,
                 python: Tuple[str, ...] = (sys.executable,), **popen: Any) -> None:
        """``popen``: more arguments for Popen (cwd, env, preexec_fn, ...)."""
        self.config_path = tmp / "config.json"
        self.config_path.write_text(json.dumps(config))
        self.proc = spawn([*wrapper, *python, script, "-c", str(self.config_path), "-p", "0",
                           "--host", "127.0.0.1", *args],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)
        self.lines: List[str] = []
        self.cond = threading.Condition()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        try:
            self.port = int(self.wait_log(r"listening.*url\W+http://127\.0\.0\.1:(\d+)",
                                          timeout=start_timeout).group(1))
        except BaseException:
            self.stop()  # a start that failed must not leave llmux running
            raise

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self.cond:
                self.lines.append(line.rstrip("\n"))
                self.cond.notify_all()
        with self.cond:
            self.lines.append("<exit>")
            self.cond.notify_all()

    def wait_log(self, pattern: str, count: int = 1, timeout: float = T) -> "re.Match[str]":
        """Wait until ``count`` log lines match ``pattern``; return the last match."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                found = [m for m in map(rx.search, self.lines) if m]
                if len(found) >= count:
                    return found[count - 1]
                left = deadline - time.monotonic()
                if left <= 0 or (self.lines and self.lines[-1] == "<exit>"):
                    raise AssertionError(f"no log line matching {pattern!r} (x{count});\n"
                                         + "\n".join(self.lines[-40:]))
                self.cond.wait(left)

    def log_count(self, pattern: str) -> int:
        with self.cond:
            return sum(1 for line in self.lines if re.search(pattern, line))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(T)
            except subprocess.TimeoutExpired:
                _kill(self.proc)
        self.reader.join(T)

    def assert_clean(self) -> None:
        """Fail when llmux printed what it must never print: a traceback, an unretrieved
        task exception, a destroyed task, an internal error."""
        with self.cond:
            lines = list(self.lines)
        bad = [i for i, line in enumerate(lines) if UNCLEAN.search(line)]
        assert not bad, "llmux printed a traceback or a lost task:\n" + "\n".join(
            lines[max(0, bad[0] - 5):bad[0] + 30])

    # -- client helpers --

    def conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=T)

    def request(self, method: str, path: str, body: Any = None,
                headers: Optional[Dict[str, str]] = None) -> Tuple[int, Dict[str, str], Any]:
        conn = self.conn()
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            conn.request(method, path, body=data, headers=headers or {})
            resp = conn.getresponse()
            raw = resp.read()
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = raw
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, payload
        finally:
            conn.close()

    def chat(self, model: str, **extra: Any) -> Tuple[int, Any]:
        status, _, payload = self.request("POST", "/v1/chat/completions",
                                          {"model": model, "messages": [], **extra},
                                          {"content-type": "application/json"})
        return status, payload

    def health(self) -> Dict[str, Any]:
        return self.request("GET", "/health")[2]


class Env:
    """A test's world: an events file, fake backends, hook text that logs, llmux."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.events = tmp / "events.log"
        self.events.touch()
        self.backends: Dict[str, Backend] = {}
        self.procs: List[Llmux] = []
        self.reserved: List[socket.socket] = []
        self.claims: List[Any] = []  # reserve_port's file locks

    def hook(self, kind: str, extra: str = "") -> str:
        """Hook text that records its start and end in the events file."""
        ev = self.events
        return (f'echo "{kind}-start $LLMUX_MODEL" >> {ev}\n{extra}\n'
                f'echo "{kind}-end $LLMUX_MODEL" >> {ev}')

    def model(self, name: str, *, wake_extra: str = "", sleep_extra: str = "",
              **more: Any) -> Dict[str, Any]:
        if name not in self.backends:
            self.backends[name] = Backend(name, self.events)
        return {"port": self.backends[name].port, "wake": self.hook("wake", wake_extra),
                "sleep": self.hook("sleep", sleep_extra), **more}

    def reserve_port(self) -> int:
        """A port for a server that binds it itself: held by a bound, not listening,
        SO_REUSEPORT socket (connections to it are refused; only a server binding with
        SO_REUSEPORT, as the fake backend's --port does, can share it).  Another test
        session of this user (CI runs three Pythons at once) may be given the same port
        for its own SO_REUSEPORT socket, so a port is also claimed by a lock on a file
        named after it, held for the test: a port another live session holds is skipped."""
        claims = Path(tempfile.gettempdir()) / f"llmux-test-ports-{os.getuid()}"
        claims.mkdir(exist_ok=True)
        for _ in range(100):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            claim = open(claims / str(port), "w")
            try:
                fcntl.flock(claim, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when it is closed
            except OSError:
                claim.close()
                self.reserved.append(sock)  # held until the end, so bind(0) moves on
                continue
            self.reserved.append(sock)
            self.claims.append(claim)
            return port
        raise AssertionError("no port free of other test sessions in 100 tries")

    def managed(self, name: str, *extra: str, **more: Any) -> Dict[str, Any]:
        """A managed model: llmux runs the fake backend itself (cmd), on a reserved port."""
        return {"port": self.reserve_port(), "cmd": [sys.executable, FAKE_BACKEND, "backend", "--port",
                "${PORT}", "--name", "${MODEL}", "--events", str(self.events), *extra], **more}

    def start(self, models: Dict[str, Dict[str, Any]], policy: Optional[Dict[str, Any]] = None,
              args: Tuple[str, ...] = (), **top: Any) -> Llmux:
        cfg: Dict[str, Any] = {"models": models, "policy": {"wake_backoff_secs": 0, **(policy or {})}, **top}
        proc = Llmux(cfg, self.tmp, args)
        self.procs.append(proc)
        return proc

    def lines(self) -> List[str]:
        return self.events.read_text().splitlines()

    def gate(self, name: str) -> Path:
        return self.tmp / f"gate-{name}"

    def stop(self) -> None:
        for p in self.procs:
            p.stop()
        for b in self.backends.values():
            b.stop()
        for sock in self.reserved:
            sock.close()
        for claim in self.claims:
            os.unlink(claim.name)  # still locked: no one else holds the name meanwhile
            claim.close()
        for p in self.procs:
            p.assert_clean()


@pytest.fixture
def env(tmp_path: Path) -> Any:
    e = Env(tmp_path)
    yield e
    e.stop()


def check_residency(lines: List[str]) -> None:
    """Invariants 1 and 2 from the event log: one model awake at a time, and requests
    only reach a model between the end of its wake and the start of its sleep."""
    awake: set = set()
    ready: set = set()
    for i, line in enumerate(lines):
        kind, _, model = line.partition(" ")
        if kind == "wake-start":
            assert not awake - {model}, f"line {i}: wake of {model} while {awake} awake: {lines}"
            awake.add(model)
        elif kind == "wake-end":
            ready.add(model)
        elif kind == "sleep-start":
            ready.discard(model)
        elif kind == "sleep-end":
            awake.discard(model)
        elif kind == "req":
            assert model in ready, f"line {i}: request reached {model} while not active: {lines}"


def raw_exchange(port: int, data: bytes, *, until_close: bool = True) -> bytes:
    """Send raw bytes, return everything received until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=T) as s:
        s.sendall(data)
        out = b""
        while True:
            piece = s.recv(65536)
            if not piece:
                return out
            out += piece
            if not until_close and b"\r\n\r\n" in out:
                return out


def sse_stream(port: int, body: Dict[str, Any]) -> Tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=T)
    conn.request("POST", "/v1/chat/completions", body=json.dumps(body),
                 headers={"content-type": "application/json"})
    return conn, conn.getresponse()


def data_line(resp: http.client.HTTPResponse) -> bytes:
    """The next SSE data line, past llmux's loading-status comments (a stream that waited
    for its model gets them first) and blank lines: what an SSE client sees."""
    while True:
        line = resp.readline()
        if not line or line.startswith(b"data:"):
            return line


def hang_up(conn: http.client.HTTPConnection, resp: http.client.HTTPResponse) -> None:
    """Close a client connection for real (the response object holds the socket too)."""
    conn.sock.shutdown(socket.SHUT_RDWR)
    resp.close()
    conn.close()


def run_bg(fn: Any, *args: Any) -> Tuple[threading.Thread, Dict[str, Any]]:
    """Run ``fn(*args)`` in a thread; its result or exception lands in the dict."""
    box: Dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn(*args)
        except BaseException as e:  # noqa: B902 - reported by the test
            box["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, box


def join(t: threading.Thread, box: Dict[str, Any]) -> Any:
    t.join(T)
    assert not t.is_alive(), "background request did not finish"
    if "error" in box:
        raise box["error"]
    return box["result"]


def run_checked(coro: Any, loop: Optional[asyncio.AbstractEventLoop] = None) -> Any:
    """asyncio.run, failing the test if the loop's exception handler fired (an exception
    nobody retrieved, a callback that raised) or a task was left running."""
    loop = loop or asyncio.new_event_loop()
    problems: List[Dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: problems.append(context))
    async def leftovers() -> List[Any]:
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in left:
            t.cancel()
        await asyncio.gather(*left, return_exceptions=True)
        return left

    try:
        result = loop.run_until_complete(coro)
        left = loop.run_until_complete(leftovers())
        loop.run_until_complete(loop.shutdown_asyncgens())
    finally:
        loop.close()
    assert problems == [], problems
    assert left == [], f"tasks left running: {left}"
    return result


async def steps_until(pred: Any, what: str, limit: int = 10_000) -> None:
    """Run the event loop one step at a time until ``pred()`` holds: for in-process tests
    whose condition is reached by loop steps alone (sockets on loopback, no clock)."""
    for _ in range(limit):
        if pred():
            return
        await asyncio.sleep(0)
    raise AssertionError(f"not within {limit} loop steps: {what}")


def wait_for(pred: Any, what: str) -> None:
    """Poll a cheap condition on state the test cannot subscribe to (a file, /health)."""
    deadline = time.monotonic() + T
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)



# ───────────────────────────────────────── config ───────────────────────────────────────

GOOD = {"models": {"a": {"port": 8001, "wake": "true", "sleep": "true", "alive": "true"}}}


def test_llmux_imports_only_the_standard_library() -> None:
    """One file, stdlib only: an import of anything else must sit under try/except
    ImportError (PyYAML, say), so llmux.py runs on a bare Python."""
    import ast
    tree = ast.parse((HERE / "llmux.py").read_text())
    guarded = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(isinstance(h.type, ast.Name) and h.type.id == "ImportError"
                                             for h in node.handlers):
            guarded.update(id(sub) for sub in ast.walk(node))
    stdlib = getattr(sys, "stdlib_module_names", None) or {
        "argparse", "asyncio", "bisect", "collections", "ctypes", "dataclasses", "enum", "errno",
        "hmac", "http", "ipaddress", "json", "os", "re", "resource", "select", "selectors",
        "shlex", "signal", "socket", "subprocess", "sys", "time", "traceback", "typing",
        "urllib", "codecs", "__future__", "math", "random", "struct", "threading", "functools",
        "itertools", "string", "textwrap", "base64", "hashlib", "io", "pathlib", "tempfile",
        "shutil", "platform", "contextlib", "weakref", "heapq", "copy", "locale", "datetime", "gc",
        "_operator", "marshal", "warnings"}
    bad = []
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
        for name in names:
            if name.split(".")[0] not in stdlib and id(node) not in guarded:
                bad.append(f"line {node.lineno}: {name}")
    assert not bad, bad


def test_rust_llmux_schema_is_valid_as_is() -> None:
    cfg = llmux.parse_config({
        "models": {"llama": {"port": 8001, "wake": "w", "sleep": "s", "alive": "a"},
                   "qwen": {"port": 8002, "wake": "w2", "sleep": "s2", "alive": "a2"}},
        "policy": {"request_timeout_secs": 30, "drain_before_switch": False, "min_active_secs": 5},
        "port": 4000})
    assert cfg.port == 4000
    assert cfg.models["qwen"] == llmux.ModelConfig("qwen", 8002, "w2", "s2", "a2")
    assert cfg.policy.request_timeout_secs == 30
    assert cfg.policy.drain_before_switch is False
    assert cfg.policy.min_active_secs == 5


def test_managed_server_config_split_and_defaults() -> None:
    cfg = llmux.parse_config({"models": {
        "a": {"port": 8001, "cmd": "vllm serve 'my model' --port ${PORT}"},
        "b": {"port": 8002, "cmd": ["srv", "--name", "${MODEL}"], "ready_path": "/v1/models",
              "stop_grace_secs": 0, "wake": "curl -X POST .../wake_up", "sleep": "curl -X POST .../sleep"}}})
    a, b = cfg.models["a"], cfg.models["b"]
    assert a.cmd == ("vllm", "serve", "my model", "--port", "${PORT}")
    assert (a.ready_path, a.stop_grace_secs) == ("/health", 10.0)
    assert b.cmd == ("srv", "--name", "${MODEL}") and b.ready_path == "/v1/models"
    assert b.stop_grace_secs == 0.0 and b.wake and b.sleep
    assert llmux._expand("--port=${PORT}", a) == "--port=8001" and llmux._expand("${MODEL}", b) == "b"


def test_defaults() -> None:
    cfg = llmux.parse_config(GOOD)
    assert cfg.port == 3000
    assert cfg.http.max_buffered_bytes == 1024 ** 3 and cfg.http.min_body_rate_bytes_per_sec == 1024
    assert cfg.http.max_connections_per_peer == 256
    assert llmux.parse_config({**GOOD, "http": {"max_connections_per_peer": None}}).http.max_connections_per_peer is None
    assert cfg.policy == llmux.Policy()
    assert cfg.policy.drain_before_switch is True and cfg.policy.min_active_secs == 0
    assert cfg.cors_origins == ("*",)
    assert [(m.upstream_model, m.max_in_flight) for m in cfg.models.values()] == [(None, None)] * len(cfg.models)
    assert llmux.parse_config({**GOOD, "policy": {"request_timeout_secs": None}}).policy.request_timeout_secs is None


def _aliases_bomb(depth: int) -> Any:
    """What YAML's ``&a [1, ...]`` / ``&b [*a, *a, ...]`` aliases load as: shared lists."""
    value: Any = [1] * 10
    for _ in range(depth):
        value = [value] * 10
    return value


@pytest.mark.parametrize("raw, problems", [
    ({}, ["models: expected an object naming at least one model; got null"]),
    ({"models": {}}, ["models: expected an object naming at least one model; got {}"]),
    ([1], ["(top level): expected an object with a 'models' key; got [1]"]),
    ({**GOOD, "extra": 1}, ["extra: unknown key; expected one of models, policy, http, port, host, api_keys, "
                            "allow_remote_control, blocked_paths, preload, cors_origins"]),
    ({"models": {"a": {"port": 8001, "wakeup": "x"}}},
     ["models.a.wakeup: unknown key; expected one of port, wake, sleep, alive, aliases, idle_sleep_secs, size, "
      "cmd, ready_path, stop_grace_secs, upstream_model, max_in_flight, stream_progress"]),
    ({"models": {"a": {"wake": "x"}}}, ["models.a.port: missing; expected a port number from 1 to 65535"]),
    ({"models": {"a": {"port": 8001, "max_in_flight": 0, "upstream_model": ""}}},
     ["models.a.upstream_model: expected a non-empty string or null; got \"\" (a string)",
      "models.a.max_in_flight: expected a whole number > 0 or null; got 0 (a number)"]),
    ({**GOOD, "cors_origins": "*"},
     ['cors_origins: expected a list of "*" or an origin like "http://localhost:5173" '
      '(scheme://host[:port]); got "*" (a string)']),
    ({**GOOD, "cors_origins": ["http://ok:1", "http://x/path", 3]},
     ['cors_origins[1]: expected "*" or an origin like "http://localhost:5173" (scheme://host[:port]); '
      'got "http://x/path" (a string)',
      'cors_origins[2]: expected "*" or an origin like "http://localhost:5173" (scheme://host[:port]); '
      'got 3 (a number)']),
    ({"models": {"a": {"port": 70000}}}, ["models.a.port: expected a port number from 1 to 65535; got 70000 (a number)"]),
    ({"models": {"a": {"port": "8001"}}}, ['models.a.port: expected a port number from 1 to 65535; got "8001" (a string)']),
    ({"models": {"a": {"port": True}}}, ["models.a.port: expected a port number from 1 to 65535; got true (a boolean)"]),
    ({"models": {"a": {"port": 8001}, "b": {"port": 8001}}},
     ["models.b.port: 8001 is already used by model 'a'; expected a port of its own"]),
    ({"models": {"a": {"port": 3000}}},
     ["models.a.port: 3000 is llmux's own port; expected the port the model's server listens on"]),
    ({"models": {"a": {"port": 8001, "wake": 5}}}, ["models.a.wake: expected a non-empty string or null; got 5 (a number)"]),
    ({"models": {"a": {"port": 8001, "sleep": ""}}}, ['models.a.sleep: expected a non-empty string or null; got "" (a string)']),
    ({**GOOD, "policy": {"min_active_secs": -1}}, ["policy.min_active_secs: expected a number >= 0; got -1 (a number)"]),
    ({**GOOD, "policy": {"request_timeout_secs": "30"}},
     ['policy.request_timeout_secs: expected a number > 0 or null; got "30" (a string)']),
    ({**GOOD, "policy": {"drain_before_switch": "yes"}},
     ['policy.drain_before_switch: expected true or false; got "yes" (a string)']),
    ({**GOOD, "policy": {"name": "lifo"}}, ['policy.name: expected one of cost, fifo; got "lifo" (a string)']),
    ({**GOOD, "policy": {"max_queue": 1.5}}, ["policy.max_queue: expected a whole number > 0; got 1.5 (a number)"]),
    ({**GOOD, "policy": {"speed": 1}}, ["policy.speed: unknown key; expected one of name, drain_before_switch, max_queue, "
                                        "sleep_on_exit, stream_progress, request_timeout_secs, min_active_secs, "
                                        "hook_timeout_secs, drain_timeout_secs, upstream_timeout_secs, "
                                        "wake_backoff_secs, alive_interval_secs, idle_sleep_secs, "
                                        "shutdown_grace_secs, capacity, max_wait_secs, cost_factor, "
                                        "progress_interval_secs"]),
    ({**GOOD, "policy": {"stream_progress": "loud", "progress_interval_secs": 0}},
     ['policy.stream_progress: expected one of "comments", "reasoning", "off"; got "loud" (a string)',
      "policy.progress_interval_secs: expected a number > 0; got 0 (a number)"]),
    ({"models": {"a": {"port": 8001, "stream_progress": True}}},
     ['models.a.stream_progress: expected one of "comments", "reasoning", "off" or null; got true (a boolean)']),
    ({"models": {"a": {"port": 8001, "size": 3}}, "policy": {"capacity": 2}},
     ["models.a.size: 3 is more than policy.capacity 2; expected a size that fits"]),
    ({**GOOD, "preload": "zz"}, ['preload: expected null or the name of a model in \'models\'; got "zz" (a string)']),
    ({**GOOD, "http": {"max_body_bytes": 0}}, ["http.max_body_bytes: expected a whole number > 0; got 0 (a number)"]),
    ({**GOOD, "http": {"max_buffered_bytes": 1000}},
     ["http.max_buffered_bytes: 1000 is less than http.max_body_bytes 67108864; expected at least one whole body"]),
    ({**GOOD, "http": {"min_body_rate_bytes_per_sec": -1}},
     ["http.min_body_rate_bytes_per_sec: expected a number >= 0; got -1 (a number)"]),
    ({**GOOD, "http": {"max_connections_per_peer": 0}},
     ["http.max_connections_per_peer: expected a whole number > 0 or null; got 0 (a number)"]),
    ({**GOOD, "port": -1}, ["port: expected a port number from 0 to 65535; got -1 (a number)"]),
    ({"models": {"a": {"port": 8001, "aliases": ["b"]}, "b": {"port": 8002}}},
     ["models.b: name or alias 'b' is already used by model 'a'; expected names unique across models"]),
    # Managed servers (cmd).
    ({"models": {"a": {"port": 8001, "cmd": ""}}},
     ['models.a.cmd: expected a command line (a string, split as a shell would but run without one) '
      'or a non-empty list of strings; got "" (a string)']),
    ({"models": {"a": {"port": 8001, "cmd": []}}},
     ["models.a.cmd: expected a command line (a string, split as a shell would but run without one) "
      "or a non-empty list of strings; got []"]),
    ({"models": {"a": {"port": 8001, "cmd": ["vllm", 5]}}},
     ['models.a.cmd: expected a command line (a string, split as a shell would but run without one) '
      'or a non-empty list of strings; got ["vllm", 5]']),
    ({"models": {"a": {"port": 8001, "cmd": "vllm serve 'x"}}},
     ["models.a.cmd: no closing quotation; expected a command line (a string, split as a shell would "
      "but run without one) or a non-empty list of strings"]),
    ({"models": {"a": {"port": 8001, "cmd": "vllm serve", "wake": "curl x"}}},
     ["models.a.sleep: missing; with cmd, expected both wake and sleep hooks (sleep mode) or neither; "
      "got only wake"]),
    ({"models": {"a": {"port": 8001, "cmd": "vllm serve", "sleep": "curl x"}}},
     ["models.a.wake: missing; with cmd, expected both wake and sleep hooks (sleep mode) or neither; "
      "got only sleep"]),
    ({"models": {"a": {"port": 8001, "cmd": "x", "ready_path": "health"}}},
     ['models.a.ready_path: expected a path starting with \'/\' (visible ASCII); got "health" (a string)']),
    ({"models": {"a": {"port": 8001, "cmd": "x", "stop_grace_secs": -1}}},
     ["models.a.stop_grace_secs: expected a number >= 0; got -1 (a number)"]),
    ({"models": {"a": {"port": 8001, "wake": "x", "stop_grace_secs": 1}}},
     ["models.a.stop_grace_secs: applies to a managed server only; expected a 'cmd' beside it"]),
    # Regression (attack): values that cannot be hashed crashed the check with a TypeError.
    ({"models": {"a": {"port": 8001}}, "preload": []},
     ["preload: expected null or the name of a model in 'models'; got []"]),
    ({"models": {"a": {"port": 8001}}, "policy": {"name": {}}},
     ["policy.name: expected one of cost, fifo; got {}"]),
    # Regression (attack): an int of 400 digits overflowed float(): a traceback.
    ({"models": {"a": {"port": 8001}}, "policy": {"request_timeout_secs": 10 ** 400}},
     ["policy.request_timeout_secs: expected a number > 0 or null; got " + "1" + "0" * 56 + "... (a number)"]),
    # Regression (attack): keys were written whole (2 MB, or with a newline that forged a
    # line of its own), and 200,000 of them made 200,000 lines.
    ({"models": {"a": {"port": 8001}}, "x" * 5000: 1, "a\nllmux: forged": 2},
     ['"' + "x" * 56 + "...: unknown key; expected one of " + ", ".join(llmux._TOP_KEYS),
      '"a\\nllmux: forged": unknown key; expected one of ' + ", ".join(llmux._TOP_KEYS)]),
    ({"models": {"a": {"port": 8001}}, **{f"k{i}": 1 for i in range(1000)}},
     [f"k{i}: unknown key; expected one of " + ", ".join(llmux._TOP_KEYS) for i in range(20)]
     + ["... and 980 more problems"]),
    # Regression (attack): YAML aliases nested 9 deep are 10^10 items written out: the
    # error message wrote the value whole before cutting it to 60 characters.
    ({"models": {"a": {"port": 8001, "aliases": _aliases_bomb(9)}}},
     ["models.a.aliases: expected a list of non-empty strings; got "
      "[[[[[[[[[[1, 1, 1, 1, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, ..."]),
    # Regression (attack): a NUL passed the check, then could not be run: the start died
    # with a traceback (alive), a switch failed without naming its hook (wake, sleep,
    # cmd), and an alive hook added by a reload leaked its pipes every interval.
    ({"models": {"a": {"port": 8001, "alive": "true\x00"}}},
     ['models.a.alive: expected a non-empty string without NUL characters or null; got "true\\u0000" (a string)']),
    ({"models": {"a": {"port": 8001, "cmd": "srv\x00 x"}}},
     ["models.a.cmd: expected a command line (a string, split as a shell would but run without one) or a "
      'non-empty list of strings, without NUL characters; got "srv\\u0000 x" (a string)']),
    ({"models": {"a": {"port": 8001, "cmd": ["srv", "a\x00"]}}},
     ["models.a.cmd: expected a command line (a string, split as a shell would but run without one) or a "
      "non-empty list of strings, without NUL characters; got [\"srv\", \"a\\u0000\"]"]),
    # Regression (attack): so did a lone surrogate (JSON's "\ud800"), and in a model name
    # (LLMUX_MODEL) it wedged every switch after its own.
    ({"models": {"a": {"port": 8001, "wake": "true \ud800"}}},
     ['models.a.wake: expected a non-empty string without lone surrogates or null; got "true \\ud800" (a string)']),
    ({"models": {"a": {"port": 8001, "cmd": ["srv", "\ud800"]}}},
     ["models.a.cmd: expected a command line (a string, split as a shell would but run without one) or a "
      'non-empty list of strings, without lone surrogates; got ["srv", "\\ud800"]']),
    ({"models": {"a\ud800": {"port": 8001}}},
     ['models."a\\ud800": expected a model name without spaces, control characters or lone surrogates; '
      'got "a\\ud800" (a string)']),
    # Several problems: every one is reported, in document order.
    ({"models": {"a": {"port": 0, "wake": 1}}, "policy": {"min_active_secs": "x"}},
     ['policy.min_active_secs: expected a number >= 0; got "x" (a string)',
      "models.a.port: expected a port number from 1 to 65535; got 0 (a number)",
      "models.a.wake: expected a non-empty string or null; got 1 (a number)"]),
])
def test_config_errors_name_the_key_and_what_was_expected(raw: Any, problems: List[str]) -> None:
    with pytest.raises(llmux.ConfigError) as info:
        llmux.parse_config(raw)
    assert info.value.problems == problems


@pytest.mark.parametrize("text, name", [("null", "c.json"), ("42", "c.json"), ('"x"', "c.json"),
                                        ("", "c.yaml"), ("# nothing\n", "c.yaml"), ("7\n", "c.yaml")])
def test_a_config_that_is_no_object_is_a_config_error(tmp_path: Path, text: str, name: str) -> None:
    # Regression (attack): an empty YAML file (an editor mid-save), null or a number
    # raised a TypeError: a traceback at start, an internal error on reload.
    if name.endswith(".yaml"):
        pytest.importorskip("yaml")
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(llmux.ConfigError) as e:
        llmux.load_config(str(path))
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith(
        "(top level): expected an object with a 'models' key; got"), e.value.problems


def test_bad_config_exits_2_with_one_line_per_problem(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"models": {"a": {"port": 8001}, "b": {"port": 8001, "x": 1}}}))
    p = subprocess.run([sys.executable, LLMUX, "-c", str(path)], capture_output=True, text=True, timeout=T)
    assert p.returncode == 2
    assert p.stderr.splitlines() == [
        "llmux: config error: models.b: x: unknown key; expected one of port, wake, sleep, alive, aliases, idle_sleep_secs, size, "
        "cmd, ready_path, stop_grace_secs, upstream_model, max_in_flight, stream_progress"
        .replace("models.b: x", "models.b.x"),
        "llmux: config error: models.b.port: 8001 is already used by model 'a'; expected a port of its own"]


def test_unreadable_and_invalid_json_configs(tmp_path: Path) -> None:
    with pytest.raises(llmux.ConfigError, match="cannot read"):
        llmux.load_config(str(tmp_path / "missing.json"))
    bad = tmp_path / "bad.json"
    bad.write_text("{nope")
    with pytest.raises(llmux.ConfigError, match=r"bad\.json: not valid JSON"):
        llmux.load_config(str(bad))


def test_a_key_given_twice_is_a_config_error_naming_its_path(tmp_path: Path) -> None:
    """Regression: a key given twice was taken silently, the last value winning (a model
    pasted twice under one name, or a port given twice, ran on what the reader did not
    see)."""
    path = tmp_path / "c.json"
    path.write_text('{"models": {"a": {"port": 8001, "port": 8002}, "b": {"port": 8003},'
                    ' "b": {"port": 8004}}, "policy": {"min_active_secs": 1, "min_active_secs": 2}}')
    with pytest.raises(llmux.ConfigError) as e:
        llmux.load_config(str(path))
    assert sorted(e.value.problems) == [
        "models.a: the key 'port' is given 2 times; expected each key once",
        "models: the key 'b' is given 2 times; expected each key once",
        "policy: the key 'min_active_secs' is given 2 times; expected each key once"]
    # With other problems, all are named; the same key in two objects is no repeat.
    path.write_text('{"models": {"a": {"port": "x"}, "b": {"port": 8003}}, "models": {}}')
    with pytest.raises(llmux.ConfigError) as e:
        llmux.load_config(str(path))
    assert e.value.problems[0] == "(top level): the key 'models' is given 2 times; expected each key once"
    path.write_text('{"models": {"a": {"port": 8001}, "b": {"port": 8002}}}')
    assert list(llmux.load_config(str(path)).models) == ["a", "b"]


def test_a_yaml_key_given_twice_is_a_config_error_but_a_merge_key_is_not(tmp_path: Path) -> None:
    pytest.importorskip("yaml")
    path = tmp_path / "c.yaml"
    path.write_text("models:\n  a:\n    port: 8001\n    port: 8002\n")
    with pytest.raises(llmux.ConfigError, match=r"^models\.a: the key 'port' is given 2 times"):
        llmux.load_config(str(path))
    # A YAML merge key (<<) overridden by the mapping's own key is what merges are for.
    path.write_text("base: &base {port: 8001, wake: 'echo up'}\n"
                    "models:\n  a: {<<: *base, port: 8002}\n  b: {<<: *base, port: 8003}\n")
    path.write_text(path.read_text().replace("base: &base", "x-base: &base"))
    with pytest.raises(llmux.ConfigError, match="x-base") as e:  # an unknown top-level key, only
        llmux.load_config(str(path))
    assert len(e.value.problems) == 1
    path.write_text("models:\n  a: &a {port: 8001, wake: 'echo up'}\n  b: {<<: *a, port: 8003}\n")
    cfg = llmux.load_config(str(path))
    assert (cfg.models["b"].port, cfg.models["b"].wake) == (8003, "echo up")
    # Regression (attack): two merge keys in one mapping were taken, the later one winning.
    path.write_text("x: [&a {wake: 'echo a'}, &c {wake: 'echo c'}]\n"
                    "models:\n  b: {<<: *a, <<: *c, port: 8003}\n")
    with pytest.raises(llmux.ConfigError) as e:
        llmux.load_config(str(path))
    assert "models.b: the key '<<' is given 2 times; expected each key once" in e.value.problems
    path.write_text("x: [&a {wake: 'echo a'}, &c {sleep: 'echo c'}]\n"
                    "models:\n  b: {<<: [*a, *c], port: 8003}\n")
    with pytest.raises(llmux.ConfigError) as e:  # one merge key of two sources: only x is unknown
        llmux.load_config(str(path))
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith("x: unknown key"), e.value.problems
    # Regression (attack): YAML 1.1 read a port of 1:30 as 90 (base 60); as in YAML 1.2 it is text.
    path.write_text("models:\n  a: {port: 1:30, idle_sleep_secs: 1:30.5}\n  b: {port: 8002, size: 0x10, idle_sleep_secs: 1.5e+3}\n")
    with pytest.raises(llmux.ConfigError) as e:
        llmux.load_config(str(path))
    assert [p.split(";")[0] for p in e.value.problems] == [
        "models.a.port: expected a port number from 1 to 65535", "models.a.idle_sleep_secs: expected a number >= 0 or null"], \
        e.value.problems


def test_repeated_keys_in_a_yaml_alias_bomb_cost_one_visit_each(tmp_path: Path) -> None:
    """The walk that looks for repeated keys visits a shared node once: a billion-laughs
    document is as cheap to check as it is to load."""
    pytest.importorskip("yaml")
    lines = ["a0: &a0 {k: 1, k: 2}"] + [f"a{i}: &a{i} [{', '.join(['*a%d' % (i - 1)] * 9)}]"
                                          for i in range(1, 12)]
    path = tmp_path / "c.yaml"
    path.write_text("\n".join(lines) + "\nmodels: {a: {port: 8001}}\n")
    with pytest.raises(llmux.ConfigError) as e:
        llmux.load_config(str(path))
    assert "a0: the key 'k' is given 2 times; expected each key once" in e.value.problems


def test_the_repeated_key_walk_is_linear_in_a_deep_document(tmp_path: Path) -> None:
    """Regression (attack): the walk gave every child its whole key path as a string: a
    547 KB JSON file of long keys 900 deep took 11.6 s and 2.7 GB to check, and a YAML
    file of aliases as much per level.  Paths are written out for problems only: the
    walk's memory, measured here, is a link a container."""
    import tracemalloc
    key = "k" * 60
    doc: Dict[str, Any] = {f"v{i}": 0 for i in range(50000)}
    for _ in range(900):
        doc = {key: doc}
    raw = json.loads(json.dumps({"x": doc}), object_pairs_hook=llmux._json_object)
    tracemalloc.start()
    try:
        assert llmux._repeated_keys(raw) == []
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2_000_000, peak  # (a path string per key: 50,000 x 54 KB)
    leaf = raw["x"]
    for _ in range(899):
        leaf = leaf[key]
    leaf[key].repeated.append("v1")
    [problem] = llmux._repeated_keys(raw)
    assert problem.startswith("x." + ".".join([key] * 900) + ": the key 'v1' is given 2 times")


def test_yaml_repeats_are_keys_as_loaded_and_merge_sources_are_read_as_written(tmp_path: Path) -> None:
    """Regression (attack): a merge source flattened by a shallower mapping before its
    own turn counted the keys merged into it as repeats; keys were compared as written
    (1 and "1" one key, 0x2 and 2 two); a key of 4,000 hex digits crashed the check."""
    pytest.importorskip("yaml")
    path = tmp_path / "c.yaml"
    path.write_text("b: &b {port: 1}\nx:\n  y: &m {<<: *b, port: 2}\nz: {<<: *m}\nmodels: {a: {port: 8001}}\n")
    with pytest.raises(llmux.ConfigError) as e:
        llmux.load_config(str(path))
    assert not any("given" in p for p in e.value.problems), e.value.problems
    path.write_text("models: {a: {port: 8001}}\nx: {1: a, '1': b, 0x2: c, 2: d}\n")
    with pytest.raises(llmux.ConfigError) as e:
        llmux.load_config(str(path))
    assert [p for p in e.value.problems if "given" in p] == ["x: the key '2' is given 2 times; expected each key once"]
    path.write_text("models: {a: {port: 8001}}\nx:\n  ? 0x" + "f" * 4000 + "\n  : 1\n  ? 0x" + "f" * 4000 + "\n  : 2\n")
    with pytest.raises(llmux.ConfigError) as e:
        llmux.load_config(str(path))
    assert e.value.problems[0] == "x: the key '<an integer of 16000 bits>' is given 2 times; expected each key once"
    p = subprocess.run([sys.executable, LLMUX, "-c", str(path), "--check"], capture_output=True, text=True, timeout=T)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr


def test_check_flag_validates_and_exits_0() -> None:
    p = subprocess.run([sys.executable, LLMUX, "-c", str(HERE / "example-config.json"), "--check"],
                       capture_output=True, text=True, timeout=T)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("config ok: 2 models (llama, qwen)")


def test_yaml_config_with_pyyaml(tmp_path: Path) -> None:
    pytest.importorskip("yaml")
    path = tmp_path / "c.yaml"
    path.write_text("models:\n  a:\n    port: 8001\n    wake: |\n      echo one\n      echo two\n")
    cfg = llmux.load_config(str(path))
    assert cfg.models["a"].wake == "echo one\necho two\n"


def test_yaml_config_without_pyyaml_says_how_to_install(tmp_path: Path) -> None:
    path = tmp_path / "c.yml"
    path.write_text("models: {a: {port: 8001}}\n")
    code = ("import sys; sys.modules['yaml'] = None; sys.argv = ['llmux.py', '-c', %r, '--check'];"
            "import runpy; runpy.run_path(%r, run_name='__main__')" % (str(path), LLMUX))
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=T)
    assert p.returncode == 2
    assert "a YAML config needs PyYAML, which is not installed; install it (pip install pyyaml)" in p.stderr


def _vm_rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))  # type: ignore[union-attr]


def _cmdline(pid: int) -> List[bytes]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().split(b"\0")[:-1]


def _reexeced(pid: int) -> bool:
    return any(b"_LLMUX_REEXECED" in arg for arg in _cmdline(pid))


def _fds_of(pid: int) -> List[str]:
    fds = []
    for n in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):  # closed meanwhile
            fds.append(os.readlink(f"/proc/{pid}/fd/{n}"))
    return fds


REEXECS = hasattr(os, "memfd_create") and sys.version_info >= (3, 9)  # 3.8 keeps no tree


@pytest.mark.skipif(not REEXECS, reason="re-exec needs memfd_create (Linux) and 3.9+")
def test_the_script_serves_from_its_compiled_code_without_its_syntax_tree(tmp_path: Path) -> None:
    """Run as a script, CPython keeps the file's syntax tree while it runs: before serving,
    llmux execs a fresh interpreter on its compiled code.  Same pid and arguments, no memfd
    left open, and it idles in far less than with LLMUX_REEXEC=0."""
    config = {"models": {"a": {"port": 9}}}
    rss = {}
    for reexec in ("1", "0"):
        run = tmp_path / reexec
        run.mkdir()
        lx = Llmux(config, run, env={**os.environ, "LLMUX_REEXEC": reexec})
        try:
            assert get_json(lx.port, "/health")["models"]["a"]["state"] == "asleep"
            argv = _cmdline(lx.proc.pid)
            tail = [a.decode() for a in argv[-7:]]
            assert tail == [LLMUX, "-c", str(lx.config_path), "-p", "0", "--host", "127.0.0.1"], argv
            assert _reexeced(lx.proc.pid) == (reexec == "1"), argv
            assert not [fd for fd in _fds_of(lx.proc.pid) if "llmux-code" in fd]
            rss[reexec] = _vm_rss_kib(lx.proc.pid)
        finally:
            lx.stop()
        lx.assert_clean()
    assert rss["1"] < rss["0"] - 8 * 1024, rss  # the tree is ~16 MiB


SHADOW = "open(%r, 'w').close(); raise SystemExit(99)\n"  # a stdlib name, imported: says so


@pytest.mark.skipif(not REEXECS, reason="re-exec needs memfd_create (Linux) and 3.9+")
@pytest.mark.parametrize("case", ["cwd", "isolated", "symlink", "fsize", "argv0", "runpy", "profiler",
                                  "stdout_closed", "path_object"])
def test_the_scripts_exec_keeps_what_the_script_had(tmp_path: Path, case: str) -> None:
    """The exec on the compiled code changes nothing a plain run has: nothing is imported
    from the working directory (3.13's -c imported linecache from it before the loader
    ran), -I keeps the script's folder off sys.path, a symlinked script's path is its real
    folder, and where the exec cannot be done right (a file-size limit cuts the memfd short,
    argv[0] names another program) or would take away what runs it (a program running it
    with runpy, a profiler; a closed stdout, whose fd the memfd would take; a sys.path entry
    that is no string) llmux serves without it.  Each shadowing module here leaves a
    marker file and exits 99 if imported."""
    markers = []

    def shadow(folder: Path, *names: str) -> None:
        for name in names:
            markers.append(tmp_path / f"imported-{folder.name}-{name}")
            (folder / f"{name}.py").write_text(SHADOW % str(markers[-1]))

    cwd = tmp_path / "cwd"
    cwd.mkdir()
    if case not in ("runpy", "profiler"):  # -c and -m put the working directory on sys.path
        shadow(cwd, "linecache", "json", "asyncio")
    kw: Dict[str, Any] = {"cwd": str(cwd)}
    expected = True
    if case == "isolated":  # beside the script: on sys.path in a plain run, not under -I
        folder = tmp_path / "copy"
        folder.mkdir()
        shutil.copy(LLMUX, folder / "llmux.py")
        shadow(folder, "json")
        kw.update(script=str(folder / "llmux.py"), python=(sys.executable, "-I"))
    elif case == "symlink":  # the real folder is on sys.path, not the link's
        real, link = tmp_path / "real", tmp_path / "link"
        real.mkdir()
        link.mkdir()
        shutil.copy(LLMUX, real / "llmux.py")
        (link / "llmux.py").symlink_to(real / "llmux.py")
        shadow(link, "json")
        kw.update(script=str(link / "llmux.py"))
    elif case == "fsize":
        kw.update(preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000)))
        expected = False
    elif case == "argv0":  # sys.executable is worked out from argv[0]: here another program
        kw.update(python=("/bin/sh",), executable=sys.executable)
        expected = False
    elif case == "runpy":
        run = "import runpy, sys; sys.argv[:] = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
        kw.update(python=(sys.executable, "-c", run))
        expected = False
    elif case == "profiler":
        kw.update(python=(sys.executable, "-m", "cProfile", "-o", str(tmp_path / "prof.out")))
        expected = False
    elif case == "stdout_closed":  # the log is on stderr, still ours
        kw.update(preexec_fn=lambda: os.close(1))
        expected = False
    elif case == "path_object":  # a sitecustomize may put one there
        site = tmp_path / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text("import pathlib, sys; sys.path.append(pathlib.Path('/nonexistent'))\n")
        kw.update(env={**os.environ, "PYTHONPATH": str(site)})
        expected = False
    lx = Llmux({"models": {"a": {"port": 9}}}, tmp_path, **kw)
    try:
        assert get_json(lx.port, "/health")["models"]["a"]["state"] == "asleep"
        assert _reexeced(lx.proc.pid) == expected
        assert not [fd for fd in _fds_of(lx.proc.pid) if "llmux-code" in fd]
    finally:
        lx.stop()
    lx.assert_clean()
    assert not [m.name for m in markers if m.exists()]
    assert (tmp_path / "prof.out").exists() == (case == "profiler")  # written at exit


def test_cli_port_override_and_version() -> None:
    p = subprocess.run([sys.executable, LLMUX, "--version"], capture_output=True, text=True, timeout=T)
    assert p.stdout.strip() == f"llmux.py {llmux.__version__}"
    p = subprocess.run([sys.executable, LLMUX, "-c", str(HERE / "example-config.json"), "-p", "70000"],
                       capture_output=True, text=True, timeout=T)
    assert p.returncode == 2 and "-p/--port: expected a port number from 0 to 65535; got 70000" in p.stderr


# ─────────────────────────────── HTTP wire (sans-I/O) ───────────────────────────────────


def parse_all(parser: Any, pieces: List[bytes], eof: bool = True) -> List[Any]:
    """Feed pieces one by one; return normalised events, ending with ("error", status)."""
    events: List[Any] = []

    def drain() -> bool:
        while True:
            try:
                ev = parser.next_event()
            except llmux.HTTPError as e:
                events.append(("error", e.status))
                return False
            if ev is llmux.NEED_DATA:
                return True
            if ev is None:
                events.append("closed")
                return False
            if isinstance(ev, llmux.Body):
                if events and isinstance(events[-1], tuple) and events[-1][0] == "body":
                    events[-1] = ("body", events[-1][1] + ev.data)
                else:
                    events.append(("body", ev.data))
            elif ev is llmux.EndOfMessage:
                events.append("end")
                if isinstance(parser, llmux.ResponseParser):
                    return False  # one response per parser
            elif isinstance(ev, llmux.RequestHead):
                events.append(("head", ev.method, ev.target, ev.version, ev.keep_alive))
            else:
                events.append(("response", ev.status, ev.keep_alive))

    for piece in pieces:
        parser.feed(piece)
        if not drain():
            return events
    if eof and not (isinstance(parser, llmux.ResponseParser) and "end" in events):
        parser.feed_eof()  # a response parser is used for one response only
        drain()
    return events


H = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
HEAD_OK = ("head", "POST", "/v1/chat/completions", "HTTP/1.1", True)

REQUEST_CASES = [
    # (id, bytes, expected events)
    ("get", b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n", [("head", "GET", "/health", "HTTP/1.1", True), "end", "closed"]),
    ("content-length", H + b"Content-Length: 5\r\n\r\nhello", [HEAD_OK, ("body", b"hello"), "end", "closed"]),
    ("chunked", H + b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n1;ext=1\r\n!\r\n0\r\n\r\n",
     [HEAD_OK, ("body", b"hello!"), "end", "closed"]),
    ("chunked-trailers", H + b"Transfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\nX-T: 1\r\n\r\n",
     [HEAD_OK, ("body", b"hi"), "end", "closed"]),
    ("chunked-upper-hex", H + b"Transfer-Encoding: Chunked\r\n\r\nA\r\n0123456789\r\n0\r\n\r\n",
     [HEAD_OK, ("body", b"0123456789"), "end", "closed"]),
    ("pipelined", b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n",
     [("head", "GET", "/a", "HTTP/1.1", True), "end", ("head", "GET", "/b", "HTTP/1.1", True), "end", "closed"]),
    ("leading-crlf", b"\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n", [("head", "GET", "/", "HTTP/1.1", True), "end", "closed"]),
    ("http10", b"GET / HTTP/1.0\r\n\r\n", [("head", "GET", "/", "HTTP/1.0", False), "end", "closed"]),
    ("http10-keepalive", b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n",
     [("head", "GET", "/", "HTTP/1.0", True), "end", "closed"]),
    ("connection-close", b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
     [("head", "GET", "/", "HTTP/1.1", False), "end", "closed"]),
    ("repeated-equal-length", H + b"Content-Length: 2\r\nContent-Length: 2\r\n\r\nok",
     [HEAD_OK, ("body", b"ok"), "end", "closed"]),
    ("truncated-body", H + b"Content-Length: 5\r\n\r\nhel", [HEAD_OK, ("body", b"hel"), ("error", 400)]),
    ("truncated-head", b"GET / HTTP/1.1\r\nHost: x\r\n", [("error", 400)]),
    # Smuggling shapes and malformed input: 400.
    ("te-and-cl", H + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n", [("error", 400)]),
    ("differing-cl", H + b"Content-Length: 5\r\nContent-Length: 6\r\n\r\n", [("error", 400)]),
    ("cl-list", H + b"Content-Length: 5, 6\r\n\r\n", [("error", 400)]),
    ("cl-sign", H + b"Content-Length: +5\r\n\r\n", [("error", 400)]),
    ("cl-negative", H + b"Content-Length: -1\r\n\r\n", [("error", 400)]),
    ("cl-hex", H + b"Content-Length: 0x5\r\n\r\n", [("error", 400)]),
    ("cl-space-inside", H + b"Content-Length: 1 2\r\n\r\n", [("error", 400)]),
    ("cl-too-many-digits", H + b"Content-Length: 0000000000000000001\r\n\r\n", [("error", 400)]),
    ("obs-fold", H + b"X-A: 1\r\n folded\r\n\r\n", [("error", 400)]),
    ("space-in-name", H + b"X A: 1\r\n\r\n", [("error", 400)]),
    ("space-before-colon", H + b"Content-Length : 5\r\n\r\n", [("error", 400)]),
    ("control-in-name", H + b"X\x01A: 1\r\n\r\n", [("error", 400)]),
    ("bare-cr", b"GET / HTTP/1.1\rHost: x\r\n\r\n", [("error", 400)]),
    ("bare-lf", b"GET / HTTP/1.1\nHost: x\r\n\r\n", [("error", 400)]),
    ("nul-in-value", H + b"X-A: a\x00b\r\n\r\n", [("error", 400)]),
    ("no-host", b"GET / HTTP/1.1\r\n\r\n", [("error", 400)]),
    ("two-hosts", b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", [("error", 400)]),
    ("bad-request-line", b"GET /\r\nHost: x\r\n\r\n", [("error", 400)]),
    ("lowercase-version", b"GET / http/1.1\r\nHost: x\r\n\r\n", [("error", 400)]),
    ("bad-chunk-size", H + b"Transfer-Encoding: chunked\r\n\r\nzz\r\n", [HEAD_OK, ("error", 400)]),
    ("chunk-size-overflow", H + b"Transfer-Encoding: chunked\r\n\r\n" + b"f" * 17 + b"\r\n", [HEAD_OK, ("error", 400)]),
    ("chunk-size-sign", H + b"Transfer-Encoding: chunked\r\n\r\n-1\r\n", [HEAD_OK, ("error", 400)]),
    ("missing-crlf-after-chunk", H + b"Transfer-Encoding: chunked\r\n\r\n2\r\nhiXX0\r\n\r\n",
     [HEAD_OK, ("body", b"hi"), ("error", 400)]),
    ("chunked-twice", H + b"Transfer-Encoding: chunked, chunked\r\n\r\n", [("error", 400)]),
    ("te-in-http10", b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", [("error", 400)]),
    ("tls-client-hello", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03", [("error", 400)]),
    # Other statuses.
    ("gzip-coding", H + b"Transfer-Encoding: gzip\r\n\r\n", [("error", 501)]),
    ("gzip-chunked", H + b"Transfer-Encoding: gzip, chunked\r\n\r\n", [("error", 501)]),
    ("http2", b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", [("error", 505)]),
    ("long-request-line", b"GET /" + b"a" * llmux.MAX_REQUEST_LINE + b" HTTP/1.1\r\nHost: x\r\n\r\n", [("error", 414)]),
    ("too-many-headers", H + b"".join(b"X-%d: 1\r\n" % i for i in range(llmux.MAX_HEADER_COUNT + 1)) + b"\r\n",
     [("error", 431)]),
    ("huge-header", H + b"X-A: " + b"a" * llmux.MAX_HEADER_BYTES + b"\r\n\r\n", [("error", 431)]),
    ("body-too-large", H + b"Content-Length: 1001\r\n\r\n", [("error", 413)]),
    ("chunked-too-large", H + b"Transfer-Encoding: chunked\r\n\r\n3e9\r\n", [HEAD_OK, ("error", 413)]),
    ("expect-other", H + b"Expect: magic\r\nContent-Length: 0\r\n\r\n", [("error", 417)]),
]


@pytest.mark.parametrize("data, expected", [c[1:] for c in REQUEST_CASES], ids=[c[0] for c in REQUEST_CASES])
def test_request_parser_whole_and_byte_by_byte(data: bytes, expected: List[Any]) -> None:
    assert parse_all(llmux.RequestParser(max_body=1000), [data]) == expected
    assert parse_all(llmux.RequestParser(max_body=1000), [data[i:i + 1] for i in range(len(data))]) == expected


@pytest.mark.parametrize("data, expected", [c[1:] for c in REQUEST_CASES if "closed" in c[2]],
                         ids=[c[0] for c in REQUEST_CASES if "closed" in c[2]])
def test_request_parser_trailing_garbage_fails_only_the_next_message(data: bytes, expected: List[Any]) -> None:
    events = parse_all(llmux.RequestParser(max_body=1000), [data + b"\x00\xffgarbage\r\n\r\n"])
    assert events == expected[:-1] + [("error", 400)]


def test_request_parser_stays_broken_after_an_error() -> None:
    p = llmux.RequestParser()
    p.feed(b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: 1\r\n\r\n")
    with pytest.raises(llmux.HTTPError) as first:
        p.next_event()
    p.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    with pytest.raises(llmux.HTTPError) as again:
        p.next_event()
    assert again.value is first.value


def test_request_head_keeps_duplicate_headers_in_order() -> None:
    p = llmux.RequestParser()
    p.feed(b"GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\nx-a: 2\r\nExpect: 100-continue\r\n\r\n")
    head = p.next_event()
    assert [v for k, v in head.headers if k == "x-a"] == ["1", "2"]
    assert head.get("x-a") == "2" and head.expect_continue


RESPONSE_CASES = [
    ("length", "POST", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", [("response", 200, True), ("body", b"ok"), "end"]),
    ("chunked", "POST", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
     [("response", 200, True), ("body", b"ok"), "end"]),
    ("until-close", "POST", b"HTTP/1.1 200 OK\r\n\r\nabc", [("response", 200, False), ("body", b"abc"), "end"]),
    ("http10", "POST", b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\nx", [("response", 200, False), ("body", b"x"), "end"]),
    # A HEAD's or 304's length is the GET's: no body follows, but a server that sends one
    # anyway would answer the next request on the connection, so it is not kept.
    ("head-has-no-body", "HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n", [("response", 200, False), "end"]),
    ("204", "POST", b"HTTP/1.1 204 No Content\r\n\r\n", [("response", 204, True), "end"]),
    ("304", "GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n", [("response", 304, False), "end"]),
    ("304-no-length", "GET", b"HTTP/1.1 304 Not Modified\r\n\r\n", [("response", 304, True), "end"]),
    ("head-no-length", "HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", [("response", 200, True), "end"]),
    ("interim-100", "POST", b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n",
     [("response", 100, True), ("response", 200, True), "end"]),
    ("no-reason", "GET", b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n", [("response", 200, True), "end"]),
    ("truncated-length", "POST", b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab",
     [("response", 200, True), ("body", b"ab"), ("error", 502)]),
    ("truncated-chunked", "POST", b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n",
     [("response", 200, True), ("body", b"ok"), ("error", 502)]),
    ("garbage-status", "GET", b"HTTP/1.1 OK fine\r\n\r\n", [("error", 502)]),
    ("not-http", "GET", b"SSH-2.0-OpenSSH\r\n\r\n", [("error", 502)]),
    ("bad-cl", "GET", b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", [("error", 502)]),
    ("garbage-header", "GET", b"HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n", [("error", 502)]),
    ("eof-before-head", "GET", b"", [("error", 502)]),
]


@pytest.mark.parametrize("method, data, expected", [c[1:] for c in RESPONSE_CASES], ids=[c[0] for c in RESPONSE_CASES])
def test_response_parser_whole_and_byte_by_byte(method: str, data: bytes, expected: List[Any]) -> None:
    assert parse_all(llmux.ResponseParser(method), [data]) == expected
    assert parse_all(llmux.ResponseParser(method), [data[i:i + 1] for i in range(len(data))]) == expected


def chunked_request(body_part: bytes) -> bytes:
    return H + b"Transfer-Encoding: chunked\r\n\r\n" + body_part


def chunked_response(body_part: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + body_part


def test_thousands_of_trailer_lines_are_refused_without_recursion() -> None:
    # Used to recurse once per trailer line: ~1,000 lines (6 KB, inside every byte
    # limit) raised RecursionError past the HTTPError boundary.
    many = b"2\r\nhi\r\n0\r\n" + b"".join(b"t%d: 1\r\n" % i for i in range(1000)) + b"\r\n"
    assert len(many) < llmux.MAX_TRAILER_BYTES
    assert parse_all(llmux.RequestParser(), [chunked_request(many)]) == [HEAD_OK, ("body", b"hi"), ("error", 431)]
    assert parse_all(llmux.ResponseParser("POST"), [chunked_response(many)]) == [
        ("response", 200, True), ("body", b"hi"), ("error", 502)]
    few = b"2\r\nhi\r\n0\r\n" + b"".join(b"t%d: 1\r\n" % i for i in range(llmux.MAX_TRAILER_LINES)) + b"\r\n"
    assert parse_all(llmux.RequestParser(), [chunked_request(few)]) == [HEAD_OK, ("body", b"hi"), "end", "closed"]
    # A hundred thousand tiny chunks in one buffer: a loop, and bounded work per byte.
    tiny = b"1\r\nx\r\n" * 100_000 + b"0\r\n\r\n"
    p = llmux.RequestParser()
    assert parse_all(p, [chunked_request(tiny)]) == [HEAD_OK, ("body", b"x" * 100_000), "end", "closed"]
    assert p.steps <= 2 * len(tiny)


def test_response_parser_rejects_101_switching_protocols() -> None:
    # Used to be absorbed as an interim head, then EndOfMessage with no final head:
    # the relay called client_response_head(None).
    data = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n"
    p = llmux.ResponseParser("GET")
    p.feed(data)
    with pytest.raises(llmux.HTTPError) as e:
        p.next_event()
    assert e.value.status == 502
    assert e.value.message == ("backend switched protocols (101); expected a final http/1.1 "
                               "response (llmux does not support protocol upgrades)")


@pytest.mark.parametrize("data", [
    b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok",
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\n\nok",
    b"HTTP/1.1 200 OK\r\nX-A: 1\rContent-Length: 2\r\n\r\nok",
], ids=["bare-lf-status-line", "bare-lf-field", "bare-cr"])
def test_response_head_with_bare_lf_fails_at_once(data: bytes) -> None:
    # Used to wait for a CRLF CRLF that never comes: 504 after upstream_timeout_secs.
    for pieces in ([data], [data[i:i + 1] for i in range(len(data))]):
        assert parse_all(llmux.ResponseParser("POST"), pieces, eof=False) == [("error", 502)]
    p = llmux.ResponseParser("POST")
    p.feed(data)
    with pytest.raises(llmux.HTTPError, match=r"^bare (CR|LF) in message head; expected CRLF line endings"):
        p.next_event()


@pytest.mark.parametrize("te", [b"gzip, chunked", b"gzip", b"chunked, chunked", b"chunked,", b"identity"])
def test_response_transfer_coding_other_than_chunked_is_502(te: bytes) -> None:
    # "gzip, chunked" used to be de-chunked and sent on as gzip bytes with no coding header.
    data = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + te + b"\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    assert parse_all(llmux.ResponseParser("POST"), [data]) == [("error", 502)]


def test_every_status_llmux_answers_has_its_reason_phrase() -> None:
    """Regression (attack): llmux's own 403s went out as `HTTP/1.1 403 Unknown`."""
    for status in (200, 202, 204, 400, 401, 403, 404, 405, 408, 409, 413, 414, 415, 417, 429,
                   431, 500, 501, 502, 503, 504, 505):
        line = llmux.local_response(status, b"", None).split(b"\r\n", 1)[0]
        assert not line.endswith(b" Unknown"), line
    assert llmux.local_response(403, b"", None).startswith(b"HTTP/1.1 403 Forbidden\r\n")


@pytest.mark.parametrize("status", [204, 304])
def test_204_and_304_are_forwarded_without_body_or_length(status: int) -> None:
    # A 204 with Content-Length: 5 used to be forwarded with that header, its stray
    # bytes dropped and the connection reused.
    p = llmux.ResponseParser("GET")
    p.feed(b"HTTP/1.1 %d X\r\nContent-Length: 5\r\nX-A: 1\r\n\r\nhello" % status)
    head = p.next_event()
    assert p.next_event() is llmux.EndOfMessage
    assert p.buffered == 5  # the backend is out of sync: not to be reused
    # A 204 may not carry a length at all; a 304's is the GET's, but a server that sends
    # the body anyway would answer the next request on the connection: neither is reused.
    assert head.keep_alive is False
    data, chunked, keep = llmux.client_response_head(head, False, True)
    assert data == b"HTTP/1.1 %d X\r\nx-a: 1\r\n\r\n" % status and not chunked and keep
    p = llmux.ResponseParser("GET")
    p.feed(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
    assert p.next_event().keep_alive and p.next_event() is llmux.EndOfMessage and p.buffered == 0


def test_interim_heads_are_bounded_and_te_with_cl_is_not_reused() -> None:
    interim = b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
    final = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    n = llmux.MAX_INTERIM_RESPONSES
    assert parse_all(llmux.ResponseParser("GET"), [interim * n + final]) == [
        *[("response", 103, True)] * n, ("response", 200, True), ("body", b"ok"), "end"]
    assert parse_all(llmux.ResponseParser("GET"), [interim * (n + 1) + final]) == [
        *[("response", 103, True)] * n, ("error", 502)]
    # RFC 9112 section 6.1: chunked wins over a Content-Length, but the connection is
    # not trusted with another request.
    both = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n"
    assert parse_all(llmux.ResponseParser("GET"), [both]) == [("response", 200, False), ("body", b"ok"), "end"]


def test_complete_response_head_over_the_limit_is_502() -> None:
    # Used to be enforced only on a head still incomplete after a read.
    head = b"HTTP/1.1 200 OK\r\n" + b"X-Pad: " + b"a" * 120_000 + b"\r\nContent-Length: 2\r\n\r\nok"
    assert parse_all(llmux.ResponseParser("GET"), [head]) == [("error", 502)]
    fill = llmux.MAX_UPSTREAM_HEAD - len(b"HTTP/1.1 200 OK\r\nX-Pad: \r\nContent-Length: 2\r\n\r\n")
    for n, expected in ((fill, [("response", 200, True), ("body", b"ok"), "end"]), (fill + 1, [("error", 502)])):
        data = b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * n + b"\r\nContent-Length: 2\r\n\r\nok"
        assert parse_all(llmux.ResponseParser("GET"), [data]) == expected, n
        assert parse_all(llmux.ResponseParser("GET"), [data[:-3], data[-3:-1], data[-1:]]) == expected, n


def _request_line_of(n: int) -> bytes:
    return b"GET /" + b"a" * (n - len(b"GET / HTTP/1.1")) + b" HTTP/1.1"


def _fields_of(total: int) -> bytes:
    """Header lines totalling ``total`` bytes, Host first."""
    host = b"Host: x\r\n"
    return host + b"X-Pad: " + b"a" * (total - len(host) - len(b"X-Pad: \r\n")) + b"\r\n"


@pytest.mark.parametrize("data, status", [
    (_request_line_of(llmux.MAX_REQUEST_LINE) + b"\r\nHost: x\r\n\r\n", None),
    (_request_line_of(llmux.MAX_REQUEST_LINE + 1) + b"\r\nHost: x\r\n\r\n", 414),
    (b"GET / HTTP/1.1\r\n" + _fields_of(llmux.MAX_HEADER_BYTES) + b"\r\n", None),
    (b"GET / HTTP/1.1\r\n" + _fields_of(llmux.MAX_HEADER_BYTES + 1) + b"\r\n", 431),
    (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"a: 1\r\n" * (llmux.MAX_HEADER_COUNT - 1) + b"\r\n", None),
    (b"GET / HTTP/1.1\r\nHost: x\r\n" + b"a: 1\r\n" * llmux.MAX_HEADER_COUNT + b"\r\n", 431),
    # A bad byte past the request line limit: too long, whole or byte by byte.
    (_request_line_of(llmux.MAX_REQUEST_LINE + 100) + b"\x01\r\nHost: x\r\n\r\n", 414),
    (b"GET /" + b"a" * llmux.MAX_REQUEST_LINE + b"\r", 414),
], ids=["line-at-limit", "line-over", "fields-at-limit", "fields-over", "count-at-limit", "count-over",
        "bad-byte-past-line-limit", "cr-past-line-limit"])
def test_request_head_limits_are_exact_whole_or_byte_by_byte(data: bytes, status: Optional[int]) -> None:
    # The partial-head check used to count the CRLF CRLF still arriving: a head at the
    # limit passed whole and failed byte by byte.
    target = data.split(b" ")[1].decode()
    expected = [("error", status)] if status else [("head", "GET", target, "HTTP/1.1", True), "end", "closed"]
    for pieces in ([data], [data[i:i + 1] for i in range(len(data))]):
        events = parse_all(llmux.RequestParser(), pieces, eof=status is None)
        assert events == expected


def test_forward_headers_drops_hop_by_hop_and_connection_named() -> None:
    headers = [("connection", "keep-alive, x-secret"), ("x-secret", "1"), ("keep-alive", "5"),
               ("transfer-encoding", "chunked"), ("te", "trailers"), ("upgrade", "h2c"),
               ("authorization", "Bearer k"), ("x-a", "1"), ("x-a", "2")]
    assert llmux.forward_headers(headers) == [("authorization", "Bearer k"), ("x-a", "1"), ("x-a", "2")]


def test_encode_chunk() -> None:
    assert llmux.encode_chunk(b"hello") == b"5\r\nhello\r\n"
    assert llmux.encode_chunk(b"x" * 26) == b"1a\r\n" + b"x" * 26 + b"\r\n"


# ───────────────────────────────────────── hooks ────────────────────────────────────────


class ListStream:
    def __init__(self) -> None:
        self.lines: List[str] = []

    def write(self, text: str) -> None:
        self.lines.extend(text.splitlines())

    def flush(self) -> None:
        pass


def run_hook(script: str, *, timeout: float = T, cwd: Optional[str] = None,
             hook: str = "wake") -> Tuple[Optional[llmux.HookResult], Optional[llmux.HookError], List[str]]:
    stream = ListStream()

    async def go() -> Tuple[Optional[llmux.HookResult], Optional[llmux.HookError]]:
        runner = llmux.HookRunner(llmux.Log(stream), timeout=timeout, cwd=cwd)
        model = llmux.ModelConfig("m1", 8123, **{hook: script})
        try:
            return await runner.run(model, hook), None
        except llmux.HookError as e:
            return None, e
        finally:
            runner.close()

    result, error = run_checked(go())
    return result, error, stream.lines


def pid_gone(pid: int) -> bool:
    return not llmux._pid_running(pid)


def test_hook_env_and_output_go_to_the_log() -> None:
    result, error, lines = run_hook('echo "model=$LLMUX_MODEL port=$LLMUX_PORT hook=$LLMUX_HOOK"; echo oops >&2')
    assert error is None and result is not None and result.exit_code == 0
    assert any(line.endswith("hook.output model=m1 hook=wake stream=stdout | model=m1 port=8123 hook=wake")
               for line in lines), lines
    assert any(line.endswith("stream=stderr | oops") for line in lines), lines


def test_hook_failure_names_hook_model_exit_code_and_stderr_tail() -> None:
    _, error, lines = run_hook("echo loading; echo 'CUDA out of memory' >&2; exit 3")
    assert error is not None
    assert error.message == "hook 'wake' for model 'm1' exited 3: CUDA out of memory"
    assert error.status == 503 and error.to_json()["error"]["code"] == "hook_failed"
    assert any("hook.exit" in line and "code=3" in line for line in lines)


def test_hook_multiline_inline_script_and_script_path(tmp_path: Path) -> None:
    result, error, lines = run_hook("x=1\nif [ $x = 1 ]; then\n  echo multi\nfi\n")
    assert error is None and any(line.endswith("| multi") for line in lines)
    script = tmp_path / "wake.sh"
    script.write_text("#!/bin/sh\necho from-script $LLMUX_MODEL\n")
    script.chmod(0o755)
    result, error, lines = run_hook(str(script))
    assert error is None and any(line.endswith("| from-script m1") for line in lines)
    result, error, lines = run_hook("./wake.sh", cwd=str(tmp_path))  # relative to the config's folder
    assert error is None and any(line.endswith("| from-script m1") for line in lines)


def test_hook_script_path_that_does_not_exist() -> None:
    _, error, _ = run_hook("/no/such/wake.sh")
    assert error is not None
    assert error.message.startswith("hook 'wake' for model 'm1' exited 127: ")
    assert "/no/such/wake.sh" in error.message


def test_background_child_holding_the_pipes_does_not_hang_the_hook(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    # The child inherits stdout and stderr and outlives the hook, like `vllm serve &`.
    result, error, lines = run_hook(f"sleep 60 & echo $! > {pidfile}; echo started")
    pid = int(pidfile.read_text())
    try:
        assert error is None and result is not None and result.exit_code == 0
        assert not pid_gone(pid), "a background child of a successful hook must survive it"
    finally:
        os.kill(pid, signal.SIGKILL)


def test_hook_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    _, error, _ = run_hook(f"sleep 60 & echo $! > {pidfile}; echo waiting >&2; wait", timeout=0.5)
    assert error is not None and error.result.timed_out
    # Regression: it said the time the hook took in all ("after 8.1s" for a hook that
    # took long to die), not the timeout that was reached.
    assert error.message == ("hook 'wake' for model 'm1' timed out after 0.5s (hook_timeout_secs; "
                             "its process group was killed): waiting"), error.message
    wait_for(lambda: pid_gone(int(pidfile.read_text())), "the hook's background child to die")


def test_a_timed_out_hook_and_server_name_the_timeout_they_were_given() -> None:
    """Regression (attack): a reload that changed hook_timeout_secs while a hook or a
    server's start ran made its failure name the new timeout (after 100s, for a wake
    stopped after 0.3s)."""
    async def go() -> List[str]:
        runner = llmux.HookRunner(llmux.Log(ListStream()), timeout=0.3)
        listener = socket.create_server(("127.0.0.1", 0))  # a port nobody answers on
        port = listener.getsockname()[1]
        listener.close()
        messages = []
        try:
            for model in (llmux.ModelConfig("m1", 8123, wake="sleep 30"),
                          llmux.ModelConfig("m2", port, cmd=["sleep", "30"])):
                runner.timeout = 0.3
                task = asyncio.get_running_loop().create_task(runner.run(model, "wake"))
                await asyncio.sleep(0)  # started, then a reload changes the timeout
                runner.timeout = 100.0
                with pytest.raises(llmux.HookError) as error:
                    await asyncio.wait_for(task, T)
                messages.append(error.value.message)
        finally:
            await runner.stop_servers()
            runner.close()
        return messages

    hook, server = run_checked(go())
    assert hook.startswith("hook 'wake' for model 'm1' timed out after 0.3s (hook_timeout_secs;"), hook
    assert server.startswith("server for model 'm2' was not ready within 0.3s (hook_timeout_secs;"), server


def test_hook_killed_by_a_signal() -> None:
    _, error, _ = run_hook("echo dying >&2; kill -9 $$")
    assert error is not None
    assert error.message == "hook 'wake' for model 'm1' was killed by signal 9 (SIGKILL): dying"


def test_hook_megabytes_of_output_stay_bounded_in_memory() -> None:
    result, error, lines = run_hook("head -c 3000000 /dev/zero | tr '\\0' 'x'; echo; "
                                    "i=0; while [ $i -lt 2000 ]; do echo line $i >&2; i=$((i+1)); done; exit 1")
    assert error is not None
    assert len(error.result.stderr_tail) == llmux.HOOK_TAIL_LINES
    assert error.result.stderr_tail[-1] == "line 1999"
    outputs = [line for line in lines if "hook.output" in line]
    assert all(len(line) < llmux.HOOK_LINE_MAX + 200 for line in outputs)
    assert len(outputs) <= 2 * llmux.HOOK_LOG_LINES + 2
    assert any("more lines not logged" in line for line in outputs)


def test_missing_hook_is_a_success() -> None:
    async def go() -> llmux.HookResult:
        runner = llmux.HookRunner(llmux.Log(ListStream()))
        return await runner.run(llmux.ModelConfig("m1", 8123), "sleep")

    assert run_checked(go()).ok


class ExhaustedFds:
    """Fill this process's fd table until os.pipe() fails with EMFILE, as ~1,100 idle
    client connections do under the common 1024 limit; give them back on exit."""

    def __enter__(self) -> "ExhaustedFds":
        import resource
        self.limits = resource.getrlimit(resource.RLIMIT_NOFILE)
        used = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (used + 16, self.limits[1]))
        self.fds: List[int] = []
        try:
            while True:
                self.fds.append(os.open(os.devnull, os.O_RDONLY))
        except OSError as e:
            assert e.errno == 24, e
        return self

    def __exit__(self, *exc: Any) -> None:
        import resource
        for fd in self.fds:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, self.limits)


def test_hook_that_cannot_start_for_lack_of_fds_fails_the_switch_cleanly() -> None:
    """Regression (issue 8, defect 2): os.pipe() raising EMFILE escaped the hook runner;
    one model was left SLEEPING, the other WAKING, and the switcher spun for good."""
    stream = ListStream()

    async def go() -> None:
        cfg = llmux.parse_config({"models": {n: {"port": 1 + i, "wake": "true", "sleep": "true"}
                                             for i, n in enumerate("ab")},
                                  "policy": {"request_timeout_secs": T, "wake_backoff_secs": 0}})
        log = llmux.Log(stream)
        sw = llmux.Switcher(cfg, llmux.HookRunner(log, timeout=T), llmux.FifoPolicy(), log)
        (await sw.acquire("a")).release()
        with ExhaustedFds():
            with pytest.raises(llmux.LLMuxError) as info:
                await sw.acquire("b")  # a's sleep hook cannot start
        assert info.value.status == 503
        assert info.value.message == ("hook 'sleep' for model 'a' could not start: "
                                      "too many open files")
        assert sw.active() == ["a"] and sw.models["b"].state is llmux.ModelState.ASLEEP
        slot = await sw.acquire("b")  # fds are back: the next request switches
        assert sw.active() == ["b"]
        slot.release()
        await sw.close()

    run_checked(go())
    assert not [line for line in stream.lines if "internal.error" in line], stream.lines


def test_a_wake_hook_that_cannot_start_leaves_its_model_asleep(tmp_path: Path) -> None:
    """Regression (attack): a wake hook that could not start (out of fds) was cleaned up
    by a sleep hook that could not start either, and the model was counted as loaded:
    reported active, its requests sent to an engine never woken, and never woken after.
    A wake that never started loaded nothing: the model stays asleep; the next wakes it."""
    stream, woke = ListStream(), tmp_path / "woke"

    async def go() -> None:
        cfg = llmux.parse_config({"models": {"b": {"port": 1, "wake": f"touch {woke}", "sleep": "true"}},
                                  "policy": {"request_timeout_secs": T, "wake_backoff_secs": 0}})
        log = llmux.Log(stream)
        sw = llmux.Switcher(cfg, llmux.HookRunner(log, timeout=T), llmux.FifoPolicy(), log)
        with ExhaustedFds():
            with pytest.raises(llmux.LLMuxError) as info:
                await sw.acquire("b")
        assert info.value.message == "hook 'wake' for model 'b' could not start: too many open files"
        assert sw.active() == [] and sw.models["b"].state is llmux.ModelState.ASLEEP
        assert not woke.exists()
        slot = await sw.acquire("b")  # fds are back: the next request wakes it
        assert sw.active() == ["b"] and woke.exists()
        slot.release()
        await sw.close()

    run_checked(go())
    assert not [line for line in stream.lines if "internal.error" in line], stream.lines


# ─────────────────────────── hooks: managed model servers (cmd) ─────────────────────────
# Real child processes and real signals: the fake backend (this file, `backend --port`)
# as the server, started, probed, killed and reaped by llmux.


def group_running(pgid: int) -> List[int]:
    """The processes of group ``pgid`` that still run: not zombies, or a zombie main
    thread with threads left (which still hold the files, the port, the memory)."""
    running = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    state, _, group = f.read().rpartition(")")[2].split()[:3]
                if int(group) == pgid and (state != "Z" or len(os.listdir(f"/proc/{name}/task")) > 1):
                    running.append(int(name))
            except (OSError, ValueError):
                continue
    return running


def server_pids(lx: Llmux, name: str) -> List[int]:
    """Pids of every server llmux started for ``name``, oldest first (from its log)."""
    with lx.cond:
        lines = list(lx.lines)
    rx = re.compile(rf"server\.started model={re.escape(name)} pid=(\d+)")
    return [int(m.group(1)) for m in map(rx.search, lines) if m]


def subreaper() -> None:
    """preexec_fn: make the child (llmux) a child subreaper, as PID 1 of a container is."""
    llmux._PRCTL(llmux.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def test_managed_server_wakes_serves_and_sleeps_and_its_output_is_logged(env: Env) -> None:
    lx = env.start({"a": env.managed("a"), "b": env.managed("b")})
    status, payload = lx.chat("a")
    assert status == 200 and payload["backend"] == "a"
    lx.wait_log(r"hook\.output model=a hook=server stream=output \| fake backend listening on \d+")
    [pa] = server_pids(lx, "a")
    assert not pid_gone(pa)
    status, payload = lx.chat("b")  # the switch stops a's server (reaped) before b's starts
    assert status == 200 and payload["backend"] == "b"
    assert pid_gone(pa)
    lx.wait_log(r"server\.stopped model=a pid=%d code=-15 secs" % pa)  # SIGTERM, no SIGKILL
    [pb] = server_pids(lx, "b")
    assert lx.request("POST", "/llmux/models/b/sleep")[2]["state"] == "asleep"
    assert pid_gone(pb)
    assert lx.health()["active"] == []


def test_managed_server_exiting_before_ready_fails_the_wake_at_once_with_its_output(env: Env) -> None:
    a = {"port": env.reserve_port(), "cmd": ["sh", "-c", "echo starting; echo model=$LLMUX_MODEL "
                                             "port=$LLMUX_PORT >&2; exit 3"]}
    b = {"port": env.reserve_port(), "cmd": "/nonexistent/server --port ${PORT}"}
    # A 600 s hook timeout and a request that gives up after T: the failure must come
    # from the exit itself, not from a timeout.
    lx = env.start({"a": a, "b": b}, policy={"hook_timeout_secs": 600})
    status, payload = lx.chat("a")
    assert status == 503 and payload["error"]["code"] == "hook_failed"
    assert payload["error"]["message"] == (f"server for model 'a' exited 3 before it was ready: "
                                           f"starting | model=a port={a['port']}")
    status, payload = lx.chat("b")
    assert status == 503 and payload["error"]["message"] == (
        "server for model 'b' could not start: no such file or directory")
    assert lx.health()["active"] == []
    assert lx.chat("a")[0] == 503  # the next request tries again
    lx.wait_log(r"server\.started model=a ", count=2)  # the log may lag the answer
    assert len(server_pids(lx, "a")) == 2


def test_a_stale_server_on_the_port_is_not_taken_for_a_managed_one(env: Env) -> None:
    stale = Backend("stale", env.events)
    env.backends["stale"] = stale
    lx = env.start({"a": {"port": stale.port, "cmd": "sleep 600"}})
    status, payload = lx.chat("a")
    assert status == 503 and payload["error"]["message"] == (
        f"server for model 'a' cannot start: port {stale.port} is served by a process llmux did "
        "not start; expected a free port (stop that process)")
    assert server_pids(lx, "a") == []


def test_managed_server_killed_while_active_is_noticed_at_once_and_rewoken(env: Env) -> None:
    gate = env.gate("a")
    lx = env.start({"a": env.managed("a")}, policy={"alive_interval_secs": 0})
    conn, resp = sse_stream(lx.port, {"model": "a", "stream": True, "n": 3, "hold": str(gate)})
    assert b"data:" in data_line(resp)
    [pid] = server_pids(lx, "a")
    os.kill(pid, signal.SIGKILL)
    lx.wait_log(r"error server\.exit model=a pid=%d code=-9" % pid)
    lx.wait_log(r"error model\.died model=a reason=\"its server was killed by signal 9 \(SIGKILL\)")
    # The stream waited for the wake (it was held): llmux ends it with the error.
    # (Cut by the switcher, or torn by the dead server first: either is said.)
    assert json.loads(sse_events(resp.read())[-1][1])["error"]["code"] in ("request_cut", "upstream_error")
    conn.close()
    assert lx.health()["active"] == []
    status, payload = lx.chat("a")  # the next request starts a new server
    assert status == 200 and payload["backend"] == "a"
    assert len(server_pids(lx, "a")) == 2 and pid_gone(pid)
    metrics = parse_prometheus(lx.request("GET", "/metrics")[2].decode())
    assert metrics["llmux_model_crashes_total"]["samples"] == [
        ("llmux_model_crashes_total", {"model": "a"}, 1.0)]


def test_managed_server_ignoring_sigterm_is_killed_after_its_grace(env: Env) -> None:
    lx = env.start({"a": env.managed("a", "--ignore-term", stop_grace_secs=0.2)})
    assert lx.chat("a")[0] == 200
    [pid] = server_pids(lx, "a")
    assert lx.request("POST", "/llmux/models/a/sleep")[0] == 200
    lx.wait_log(r"warning server\.kill model=a pid=%d reason=\"still running 0.2s after SIGTERM" % pid)
    lx.wait_log(r"server\.stopped model=a pid=%d code=-9 killed=true" % pid)
    assert pid_gone(pid)


def test_a_managed_server_is_stopped_when_its_whole_process_group_has_gone(env: Env) -> None:
    """Regression: a server's child in its process group (vLLM's engine core, which holds
    the GPU memory) was SIGKILLed the moment the server's main process exited on SIGTERM,
    cutting its own shutdown short, and the sleep (and the next model's wake) did not wait
    for it to be gone.  Now the group has stop_grace_secs to exit, as the server has."""
    lx = env.start({"a": env.managed("a", "--child", "slow-term", stop_grace_secs=5),
                    "b": env.managed("b")})
    assert lx.chat("a")[0] == 200
    [pa] = server_pids(lx, "a")
    assert len(group_running(pa)) >= 2  # the server, its child (and the child's sleep)
    assert lx.chat("b")[0] == 200  # a's sleep, then b's wake
    assert group_running(pa) == []
    done = [line for line in env.lines() if line.startswith("child-done ")]
    assert done and done[0].endswith(" a"), "the child's own shutdown must not be cut short"
    lx.wait_log(r"server\.stopped model=a pid=%d code=-15 secs" % pa)  # nothing was killed
    assert lx.log_count(r"server\.kill") == 0


def test_a_managed_servers_child_ignoring_sigterm_is_killed_after_the_grace(env: Env) -> None:
    lx = env.start({"a": env.managed("a", "--child", "ignore-term", stop_grace_secs=0.3)})
    assert lx.chat("a")[0] == 200
    [pa] = server_pids(lx, "a")
    [child] = [int(line.split()[1]) for line in env.lines() if line.startswith("child-up ")]
    assert lx.request("POST", "/llmux/models/a/sleep")[0] == 200
    assert group_running(pa) == []
    lx.wait_log(r"warning server\.kill model=a pid=%d reason=\"its process group \(pids? (\d+, )*%d"
                r"(, \d+)*\) still ran 0\.3s after SIGTERM \(stop_grace_secs\)" % (pa, child))
    lx.wait_log(r"server\.stopped model=a pid=%d code=-15 killed=true" % pa)


def test_a_group_member_that_forks_past_every_scan_is_killed(env: Env) -> None:
    """Regression (attack): a worker that ignores SIGTERM and every 5 ms forks a child
    and exits was missed by the scan of /proc (forked after the listing, exited before
    its stat was read): the sleep took the group for gone, never sent SIGKILL, and the
    chain ran on after llmux had exited."""
    lx = env.start({"a": env.managed("a", "--child", "hop", stop_grace_secs=0.3)})
    assert lx.chat("a")[0] == 200
    [pa] = server_pids(lx, "a")
    assert lx.request("POST", "/llmux/models/a/sleep")[0] == 200
    for _ in range(3):
        hops = [int(line.split()[1]) for line in env.lines() if line.startswith(("hop ", "child-up "))]
        assert len(hops) > 2 and not group_running(pa) and pid_gone(hops[-1]), "the chain runs on"


@contextlib.contextmanager
def traced(pid: int) -> Iterator[None]:
    """A tracer holds ``pid`` (PTRACE_SEIZE) and never waits for it, as a debugger left
    suspended would: once it exits, nobody but the tracer can reap it.  Skips where
    ptrace is not allowed."""
    tracer = subprocess.Popen([sys.executable, "-c", (
        "import ctypes, sys, time\n"
        f"ok = ctypes.CDLL(None, use_errno=True).ptrace(0x4206, {pid}, None, None) == 0\n"  # PTRACE_SEIZE
        "print(ok, flush=True)\n"
        "time.sleep(600)\n")], stdout=subprocess.PIPE, text=True)
    try:
        if tracer.stdout.readline().strip() != "True":  # type: ignore[union-attr]
            pytest.skip("ptrace is not allowed here")
        yield
    finally:
        tracer.kill()
        tracer.wait()


def test_a_stopped_server_that_cannot_be_reaped_does_not_hang_the_switch(env: Env) -> None:
    """Regression (attack): a server traced by a process that never waits for it (a
    debugger left suspended) is killed but cannot be reaped by llmux; the switch awaited
    its exit for ever, and so did shutdown.  A zombie holds nothing: the switch goes on.
    On 3.12+ (regression): asyncio's pidfd child watcher reaped with a blocking
    waitpid(pid, 0) on the loop's thread, which waited for the tracer: the whole loop
    stopped, until llmux installed a watcher that asks again later."""
    lx = env.start({"a": env.managed("a", stop_grace_secs=0.3), "b": env.managed("b")},
                   policy={"shutdown_grace_secs": 1})
    assert lx.chat("a")[0] == 200
    [pa] = server_pids(lx, "a")
    with traced(pa):
        assert lx.chat("b")[0] == 200  # a: SIGTERM (held by the tracer), SIGKILL, a zombie
        lx.wait_log(r"server\.kill model=a pid=%d reason=\"still running 0\.3s" % pa)
        lx.wait_log(r"server\.stopped model=a pid=%d killed=true" % pa)
        lx.stop()
        assert lx.proc.returncode == 0


def test_a_timed_out_hook_that_cannot_be_reaped_does_not_hang_the_switch(env: Env, tmp_path: Path) -> None:
    """Regression (attack): after hook_timeout_secs a hook's group is SIGKILLed, and its
    exit was then awaited for ever: a hook held by a tracer (or stuck in the kernel)
    stayed a zombie, and its switch, and every switch after it, waited until the tracer
    let go.  Now the wait is GROUP_KILL_WAIT_SECS at most, and the hook times out."""
    pidfile = tmp_path / "hook.pid"
    lx = env.start({"a": env.model("a", wake_extra=f"echo $$ > {pidfile}; exec sleep 1000")},
                   policy={"hook_timeout_secs": 1})
    result: List[Any] = []
    asker = threading.Thread(target=lambda: result.append(lx.chat("a")), daemon=True)
    asker.start()
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), "the wake hook's pid")
    pid = int(pidfile.read_text())
    with traced(pid):
        asker.join(T + llmux.GROUP_KILL_WAIT_SECS)
        assert result, "the request never got an answer"
        status, payload = result[0]
        assert status == 503 and "timed out after" in payload["error"]["message"], payload
        lx.wait_log(r"hook\.unreaped model=a hook=wake pid=%d" % pid)
        lx.stop()
        assert lx.proc.returncode == 0


def test_a_crashed_servers_number_reused_by_a_stranger_is_not_waited_for(env: Env) -> None:
    """Regression (attack): a crashed server's group was waited for at its model's next
    start by number; once empty, that number may lead a stranger's group (pids wrap), and
    the start waited 5 s for it and logged it as stuck (or would have killed it)."""
    last_pid = Path("/proc/sys/kernel/ns_last_pid")
    if not os.access(last_pid, os.W_OK):
        pytest.skip("needs a writable /proc/sys/kernel/ns_last_pid (root)")
    lx = env.start({"a": env.managed("a")}, policy={"alive_interval_secs": 0})
    assert lx.chat("a")[0] == 200
    [pa] = server_pids(lx, "a")
    os.kill(pa, signal.SIGKILL)
    lx.wait_log(r"error model\.died model=a")
    wait_for(lambda: not llmux._group_has_members(pa), "the crashed server's group to be empty")
    stranger = None
    for _ in range(20):  # another process may take the pid first: try again
        last_pid.write_text(str(pa - 1))
        stranger = subprocess.Popen(["sleep", "600"], start_new_session=True)
        if stranger.pid == pa:
            break
        stranger.kill()
        stranger.wait()
        stranger = None
    if stranger is None:
        pytest.skip("could not give the crashed server's pid to another process")
    try:
        assert lx.chat("a")[0] == 200
        assert lx.log_count(r"server\.group_left") == 0
        assert stranger.poll() is None, "a stranger's process was killed"
    finally:
        stranger.kill()
        stranger.wait()


def test_sleep_on_exit_stops_a_managed_server_within_the_shutdown_grace(env: Env) -> None:
    """Regression (attack): with sleep_on_exit, shutdown slept each managed model with
    its full stop_grace_secs, past shutdown_grace_secs (and systemd's stop timeout)."""
    lx = env.start({"a": env.managed("a", "--ignore-term", stop_grace_secs=120)},
                   policy={"shutdown_grace_secs": 0.5, "sleep_on_exit": True})
    assert lx.chat("a")[0] == 200
    [pa] = server_pids(lx, "a")
    lx.stop()
    assert lx.proc.returncode == 0, lx.proc.returncode
    lx.wait_log(r"warning server\.kill model=a pid=%d reason=\"still running 0.5s after SIGTERM" % pa)
    assert pid_gone(pa)


def test_a_worker_stuck_in_the_kernel_is_named_and_the_switch_goes_on(env: Env) -> None:
    """A worker that survives SIGKILL (frozen by the cgroup v1 freezer, as one stuck in a
    GPU driver would be) and holds the server's port: the stop names it after
    GROUP_KILL_WAIT_SECS and goes on; the next wake says what holds the port (it said a
    process llmux did not start)."""
    freezer = Path("/sys/fs/cgroup/freezer")
    if not (freezer / "tasks").exists() or not os.access(freezer, os.W_OK):
        pytest.skip("needs the cgroup v1 freezer (root)")
    group = freezer / f"llmux-test-{os.getpid()}"
    group.mkdir()
    lx = env.start({"a": env.managed("a", "--child", "hold-port", stop_grace_secs=0.2)})
    try:
        assert lx.chat("a")[0] == 200
        [pa] = server_pids(lx, "a")
        [child] = [int(line.split()[1]) for line in env.lines() if line.startswith("child-up ")]
        (group / "tasks").write_text(str(child))
        (group / "freezer.state").write_text("FROZEN")
        wait_for(lambda: (group / "freezer.state").read_text().strip() == "FROZEN", "the freeze")
        assert lx.request("POST", "/llmux/models/a/sleep")[0] == 200
        lx.wait_log(r"warning server\.group_left model=a pid=%d left=%d reason=\"its process group "
                    r"still runs 5s after SIGKILL" % (pa, child))
        port = json.loads(lx.config_path.read_text())["models"]["a"]["port"]
        status, payload = lx.chat("a")
        assert status == 503 and payload["error"]["message"].startswith(
            f"server for model 'a' cannot start: port {port} is still held by what "
            f"its last server left running after SIGKILL (pid {child}: stuck in the kernel?)"), payload
    finally:
        (group / "freezer.state").write_text("THAWED")
        wait_for(lambda: not (group / "tasks").read_text().split(), "the frozen worker to die")
        group.rmdir()


def test_a_crashed_servers_group_is_gone_before_its_model_wakes_again(env: Env) -> None:
    """The server dies (kill -9); what it left in its group is killed, and the next wake
    starts a new server only once that group has gone."""
    lx = env.start({"a": env.managed("a", "--child", "ignore-term", stop_grace_secs=0.5)},
                   policy={"alive_interval_secs": 0})  # (its child ignores SIGTERM: a short stop)
    assert lx.chat("a")[0] == 200
    [pa] = server_pids(lx, "a")
    os.kill(pa, signal.SIGKILL)
    lx.wait_log(r"error model\.died model=a")
    assert lx.chat("a")[0] == 200
    assert group_running(pa) == []
    [_, pb] = server_pids(lx, "a")
    assert len(group_running(pb)) >= 2


def test_shutdown_kills_a_server_slow_to_die_within_its_own_grace(env: Env) -> None:
    """Regression (attack): a managed server that ignores SIGTERM, with a long
    stop_grace_secs, held llmux's shutdown past shutdown_grace_secs (and past systemd's
    stop timeout, which then SIGKILLs llmux)."""
    lx = env.start({"a": env.managed("a", "--ignore-term", stop_grace_secs=120)},
                   policy={"shutdown_grace_secs": 0.5})
    assert lx.chat("a")[0] == 200
    [pid] = server_pids(lx, "a")
    lx.stop()  # SIGTERM, then waits T for the exit (and kills llmux if it must)
    assert lx.proc.returncode == 0, lx.proc.returncode
    lx.wait_log(r"warning server\.kill model=a pid=%d reason=\"still running 0.5s after SIGTERM" % pid)
    assert pid_gone(pid)


def test_a_pidfile_naming_a_process_group_or_init_names_nothing(tmp_path: Path) -> None:
    """Regression (attack): `llmux.py stop --pidfile` with 0 in the file signalled its own
    process group (killing the sleep hook); -1 would have signalled every process."""
    for text in ("0", "-1", "1", "-4242"):
        path = tmp_path / "x.pid"
        path.write_text(text + "\n")
        assert llmux._read_pidfile(str(path)) is None, text
        p = subprocess.run([sys.executable, LLMUX, "stop", "--pidfile", str(path)], timeout=T)
        assert p.returncode == 0  # nothing to stop, and nothing was signalled


def test_a_stale_pidfile_naming_a_newer_process_names_nothing(tmp_path: Path) -> None:
    """Regression (attack): after a crash or a reboot a pidfile can name a pid that a
    stranger (or llmux itself) now has; `llmux.py stop` killed it.  A process that began
    after its pidfile was written is not the one the file names."""
    path = tmp_path / "x.pid"
    stranger = subprocess.Popen(["sleep", "60"])
    try:
        path.write_text(f"{stranger.pid}\n")  # written after it began: names it
        assert llmux._read_pidfile(str(path)) == stranger.pid
        old = time.time() - 3600
        os.utime(path, (old, old))  # written an hour ago: its process is gone, the pid reused
        assert llmux._read_pidfile(str(path)) is None
        p = subprocess.run([sys.executable, LLMUX, "stop", "--pidfile", str(path)], timeout=T)
        assert p.returncode == 0 and stranger.poll() is None  # not signalled
        p = subprocess.run([sys.executable, LLMUX, "probe", "--pidfile", str(path), "http://127.0.0.1:9/"],
                           capture_output=True, text=True, timeout=T)
        assert p.returncode == 1 and "no server process" in p.stderr, p.stderr
    finally:
        stranger.kill()
        stranger.wait()


def test_upstream_takes_no_body_naming_another_model(env: Env) -> None:
    """Regression (attack): POST /upstream/llama3/api/generate {"model": "mistral"} made
    an engine that serves several models load mistral behind llmux's back."""
    lx = env.start({"llama3": env.model("llama3"), "mistral": env.model("mistral")})
    status, _, payload = lx.request("POST", "/upstream/llama3/api/generate", {"model": "mistral"})
    assert status == 400 and payload["error"]["code"] == "model_mismatch", payload
    assert not [line for line in env.lines() if line.startswith("req")]
    # Regression (attack): Ollama (Go's encoding/json) reads a key in any case, the last
    # one winning: {"MODEL": "mistral"} passed the check, and {"model": "llama3", "MODEL":
    # "mistral"} was routed to llama3's engine, which would load mistral.
    for body in ({"MODEL": "mistral"}, {"model": "llama3", "Model": "mistral"}):
        for path in ("/upstream/llama3/api/generate", "/api/generate", "/v1/chat/completions"):
            status, _, payload = lx.request("POST", path, body)
            assert status == 400 and "is 'model' in another case" in payload["error"]["message"], (path, payload)
    big = {"model": "llama3", "prompt": "x" * 100_000, "MODEL": "mistral"}  # the streaming scanner's way
    status, _, payload = lx.request("POST", "/api/generate", big)
    assert status == 400 and "is 'model' in another case" in payload["error"]["message"], payload
    assert not [line for line in env.lines() if line.startswith("req")]
    status, _, payload = lx.request("POST", "/upstream/llama3/api/generate", {"model": "llama3"})
    assert status == 200 and payload["backend"] == "llama3"


@pytest.mark.parametrize("how", ["sigterm", "kill -9"])
def test_no_managed_server_outlives_llmux(env: Env, how: str) -> None:
    lx = env.start({"a": env.managed("a")})
    assert lx.chat("a")[0] == 200
    [pid] = server_pids(lx, "a")
    if how == "sigterm":
        lx.stop()
        lx.wait_log(r"server\.stopped model=a pid=%d" % pid)
    else:  # PR_SET_PDEATHSIG: the kernel kills the server with llmux
        lx.proc.kill()
        lx.proc.wait(T)
    wait_for(lambda: pid_gone(pid), f"server pid {pid} gone after llmux's {how}")


def test_reload_removing_a_model_asleep_in_sleep_mode_stops_its_server() -> None:
    """Regression (attack): a model asleep in sleep mode (cmd plus hooks: the process
    stays up) that a reload removed or changed kept its server running until llmux
    exited, holding its port, and a model added on that port could never wake."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    raw = {"port": port, "cmd": [sys.executable, FAKE_BACKEND, "backend", "--port", "${PORT}", "--name", "a"],
           "wake": "echo woke-up", "sleep": "echo slept"}
    stream = ListStream()

    async def go() -> None:
        log = llmux.Log(stream)
        runner = llmux.HookRunner(log, T)
        sw = llmux.Switcher(llmux.parse_config({"models": {"a": raw, "b": {"port": 1}}}),
                            runner, llmux.FifoPolicy(), log)
        try:
            (await sw.acquire("a")).release()
            pid = runner.servers["a"].proc.pid
            assert await sw.start_sleep("a", "test") == "ok"  # type: ignore[misc]
            assert runner.server_running("a")  # sleep mode: the process stays
            await sw.reconfigure(llmux.parse_config({"models": {"b": {"port": 1}}}))
            assert pid_gone(pid) and "a" not in runner.servers
            await sw.close()
        finally:
            await runner.stop_servers()
            runner.close()

    try:
        run_checked(go())
    finally:
        sock.close()


def test_managed_server_hooks_run_once_started_in_sleep_mode() -> None:
    """cmd with wake and sleep hooks (vLLM sleep mode): the first wake starts the server
    then runs the wake hook; sleep runs the sleep hook and leaves the process; a wake
    while it runs starts no second server; stop_servers ends it."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    cfg = llmux.parse_config({"models": {"a": {
        "port": port, "cmd": [sys.executable, FAKE_BACKEND, "backend", "--port", "${PORT}", "--name", "a"],
        "wake": "echo woke-up", "sleep": "echo slept"}}}).models["a"]
    stream = ListStream()

    async def go() -> None:
        runner = llmux.HookRunner(llmux.Log(stream), T)
        try:
            await runner.run(cfg, "wake")
            pid = runner.servers["a"].proc.pid
            await runner.run(cfg, "sleep")
            assert runner.server_running("a") and runner.servers["a"].proc.pid == pid
            await runner.run(cfg, "wake")
            assert runner.servers["a"].proc.pid == pid  # idempotent
            assert sum("server.started" in line for line in stream.lines) == 1
            assert [line.rpartition("| ")[2] for line in stream.lines
                    if "hook.output" in line and "hook=server" not in line] == \
                ["woke-up", "slept", "woke-up"]
            await runner.run(cfg, "sleep")
            # A reload changed the command of the (sleeping, still running) server: the
            # next wake replaces it instead of waking the old one.
            changed = dataclasses.replace(cfg, cmd=cfg.cmd + ("--events", os.devnull))
            await runner.run(changed, "wake")
            assert pid_gone(pid) and runner.servers["a"].proc.pid != pid
            pid = runner.servers["a"].proc.pid
            await runner.stop_servers()
            assert not runner.servers and pid_gone(pid)
        finally:
            runner.close()

    try:
        run_checked(go())
    finally:
        sock.close()


def test_llmux_as_subreaper_reaps_orphans_but_not_its_own_children(env: Env) -> None:
    """As PID 1 of a container, orphans are reparented to llmux.  Here llmux is a child
    subreaper (the same rule): a wake hook leaves a background child that outlives it;
    when it exits, llmux reaps it, while its own hooks and servers keep their real exit
    statuses (reaping one of them would make asyncio report 255)."""
    orphan_pid = env.tmp / "orphan.pid"
    gate = env.gate("orphan")
    backend = Backend("a", env.events)
    env.backends["a"] = backend
    wake = (f"(sh -c 'echo $$ > {orphan_pid}; while [ ! -e {gate} ]; do sleep 0.01; done' &)\n"
            "exit 0")
    cfg = {"models": {"a": {"port": backend.port, "wake": wake, "sleep": "exit 7"},
                      "b": env.managed("b")},
           "policy": {"wake_backoff_secs": 0}}
    lx = Llmux(cfg, env.tmp, preexec_fn=subreaper)
    env.procs.append(lx)
    lx.wait_log(r"reaper\.on")
    assert lx.chat("a")[0] == 200
    lx.wait_log(r"hook\.exit model=a hook=wake code=0")
    wait_for(lambda: orphan_pid.exists() and orphan_pid.read_text().strip(), "orphan pid file")
    pid = int(orphan_pid.read_text())
    with open(f"/proc/{pid}/stat") as f:
        assert int(f.read().rpartition(")")[2].split()[1]) == lx.proc.pid  # reparented to llmux
    gate.touch()
    lx.wait_log(r"reaper\.reaped pid=%d status=0" % pid)
    assert not os.path.exists(f"/proc/{pid}")  # reaped, not a zombie
    status, payload = lx.chat("b")  # a's sleep hook fails with its real code, not 255
    assert status == 503 and payload["error"]["message"] == "hook 'sleep' for model 'a' exited 7"
    lx.request("POST", "/llmux/models/a/sleep")  # once more, to see the code in the log
    lx.wait_log(r"hook\.exit model=a hook=sleep code=7", count=2)  # the log may lag the answer
    assert lx.log_count(r"Unknown child process") == 0


def _child_of(pid: int) -> int:
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    if int(f.read().rpartition(")")[2].split()[1]) == pid:
                        return int(name)
            except (OSError, ValueError, IndexError):
                continue
    raise AssertionError(f"no child of pid {pid}")


def test_llmux_as_pid_1_of_a_pid_namespace_reaps_orphans(env: Env) -> None:
    """llmux as PID 1 (`unshare --pid --fork --mount-proc`, a container without --init):
    an orphan left by a wake hook is reparented to it and reaped when it exits; hooks
    keep their real exit codes; llmux stops cleanly on SIGTERM."""
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"],
                           capture_output=True, timeout=T)
    if probe.returncode != 0:
        pytest.skip("unshare --pid needs root (CAP_SYS_ADMIN) here")
    orphan_pid = env.tmp / "orphan.pid"
    gate = env.gate("orphan")
    backend = Backend("a", env.events)
    env.backends["a"] = backend
    wake = (f"(sh -c 'echo $$ > {orphan_pid}; while [ ! -e {gate} ]; do sleep 0.01; done' &)\n"
            "exit 0")
    cfg = {"models": {"a": {"port": backend.port, "wake": wake, "sleep": "exit 7"}}}
    lx = Llmux(cfg, env.tmp, wrapper=("unshare", "--pid", "--fork", "--mount-proc",
                                      "--kill-child=SIGKILL"))
    env.procs.append(lx)
    lx.wait_log(r"reaper\.on pid=1 ")
    assert lx.chat("a")[0] == 200
    wait_for(lambda: orphan_pid.exists() and orphan_pid.read_text().strip(), "orphan pid file")
    pid = int(orphan_pid.read_text())  # as the namespace sees it
    gate.touch()
    lx.wait_log(r"reaper\.reaped pid=%d status=0" % pid)
    assert lx.request("POST", "/llmux/models/a/sleep")[0] == 503
    lx.wait_log(r"hook\.exit model=a hook=sleep code=7")
    os.kill(_child_of(lx.proc.pid), signal.SIGTERM)  # unshare itself ignores SIGTERM
    lx.proc.wait(T)
    lx.wait_log(r"shutdown\.drained")
    assert lx.log_count(r"Unknown child process") == 0


def _in_a_pid_namespace_without_proc(env: Env, model: Dict[str, Any]) -> Llmux:
    """llmux as PID 1 of a pid namespace entered without a /proc of its own, serving
    ``model`` as "a" (skips where unshare --pid is not allowed)."""
    probe = subprocess.run(["unshare", "--pid", "--fork", "true"], capture_output=True, timeout=T)
    if probe.returncode != 0:
        pytest.skip("unshare --pid needs root (CAP_SYS_ADMIN) here")
    cfg = {"models": {"a": model}, "policy": {"wake_backoff_secs": 0}}
    lx = Llmux(cfg, env.tmp, wrapper=("unshare", "--pid", "--fork", "--kill-child=SIGKILL"))
    env.procs.append(lx)
    lx.wait_log(r"reaper\.on pid=1 ")
    return lx


def test_in_a_pid_namespace_without_its_own_proc_a_stop_waits_for_the_group(env: Env) -> None:
    """Regression (attack): in a pid namespace entered without a /proc of its own
    (`unshare --pid --fork`, no --mount-proc), /proc/PID is another process: the group's
    scan looked at the host's processes, found nothing of it, and the stop cut its
    workers' shutdown short.  There llmux goes by the group's members alone."""
    lx = _in_a_pid_namespace_without_proc(env, env.managed("a", "--child", "slow-term", stop_grace_secs=5))
    assert lx.chat("a")[0] == 200
    assert lx.request("POST", "/llmux/models/a/sleep")[0] == 200
    done = [line for line in env.lines() if line.startswith("child-done ")]
    assert done, "the child's own shutdown must not be cut short"
    lx.wait_log(r"server\.stopped model=a pid=\d+ code=-15 secs")
    lx.wait_log(r"reaper\.reaped pid=\d+ status=0")  # the child, reparented to llmux
    assert lx.log_count(r"server\.kill") == 0
    os.kill(_child_of(lx.proc.pid), signal.SIGTERM)  # unshare itself ignores SIGTERM
    lx.proc.wait(T)


def test_in_a_pid_namespace_without_its_own_proc_orphans_behind_its_own_child_are_reaped(env: Env) -> None:
    """Regression (attack): there, a reaper pass that met llmux's own zombie server first
    stopped (it cannot look behind it in /proc), and no SIGCHLD came again for the
    worker that died with it: its zombie counted as a member, and every stop waited out
    the grace and 5 s more, saying it was stuck in the kernel."""
    lx = _in_a_pid_namespace_without_proc(env, env.managed("a", "--child", "plain", stop_grace_secs=2))
    for i in range(4):
        assert lx.chat("a")[0] == 200
        assert lx.request("POST", "/llmux/models/a/sleep")[0] == 200
        lx.wait_log(r"server\.stopped model=a", count=i + 1)
    assert lx.log_count(r"server\.kill|server\.group_left") == 0
    os.kill(_child_of(lx.proc.pid), signal.SIGTERM)
    lx.proc.wait(T)


def test_a_sighup_during_shutdown_is_not_applied(env: Env) -> None:
    """Regression (attack): reloads during shutdown were applied (logged reload.done, and
    swapped the config shutdown was reading)."""
    gate = env.gate("a")
    lx = env.start({"a": env.model("a")}, policy={"shutdown_grace_secs": 30})
    conn, resp = sse_stream(lx.port, {"model": "a", "stream": True, "hold": str(gate)})
    resp.readline()
    lx.proc.send_signal(signal.SIGTERM)
    lx.wait_log(r"info shutdown grace_secs=30")
    lx.proc.send_signal(signal.SIGHUP)
    lx.wait_log(r"info reload\.skipped reason=\"llmux is shutting down\"")
    gate.touch()
    resp.read()
    conn.close()
    assert lx.proc.wait(T) == 0
    assert lx.log_count(r"reload\.done") == 0


def test_work_in_a_thread_does_not_hold_the_loop_s_exit() -> None:
    """Regression (attack): a reload parsed its file in the default executor, which
    asyncio.run waits for at exit: SIGTERM during a 20 s parse took 20 s."""
    release = threading.Event()

    async def go() -> None:
        llmux._in_thread(release.wait)  # as a reload cut short by shutdown leaves it

    try:
        asyncio.run(go())
        assert any(t.name == "llmux-wait" and t.is_alive() for t in threading.enumerate())
    finally:
        release.set()


def test_hook_managed_backend_that_dies_is_rewoken_by_the_next_request(env: Env) -> None:
    """A backend killed while ACTIVE: the request that finds it gone gets a 502, and
    its refused connection marks the model down at once (no alive hook: died), so the
    next request runs the wake hook again instead of getting 502s until someone looks."""
    port = env.reserve_port()
    pidfile = env.tmp / "backend.pid"
    wake = (f"{sys.executable} {FAKE_BACKEND} backend --port {port} --name a --pidfile {pidfile} "
            f"</dev/null >/dev/null 2>&1 &\n"
            f"{sys.executable} {LLMUX} probe --wait {T} http://127.0.0.1:{port}/health")
    sleep = f"kill $(cat {pidfile}) 2>/dev/null; exit 0"
    lx = env.start({"a": {"port": port, "wake": env.hook("wake", wake), "sleep": sleep}},
                   policy={"sleep_on_exit": True, "alive_interval_secs": 0})
    try:
        assert lx.chat("a")[0] == 200
        pid = int(pidfile.read_text())
        os.kill(pid, signal.SIGKILL)
        wait_for(lambda: pid_gone(pid), "backend gone")
        status, payload = lx.chat("a")
        assert status == 502 and payload["error"]["code"] == "upstream_unavailable"
        lx.wait_log(r"error model\.died model=a reason=\"its backend refused or reset a connection")
        status, payload = lx.chat("a")
        assert status == 200 and payload["backend"] == "a"
        assert env.lines().count("wake-start a") == 2
        assert lx.log_count(r"model\.died") == 1
    finally:
        lx.stop()
        if pidfile.exists():
            try:
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass


@pytest.mark.parametrize("meanwhile", ["switched out and back in", "reloaded"])
def test_a_stale_backend_check_verdict_is_dropped(env: Env, meanwhile: str) -> None:
    """Regression (attack, twice): a reset request started a check with the alive hook;
    while it ran, the model was switched out and back in (a new incarnation), or a reload
    replaced its alive hook; the old hook's failure then put the healthy model to sleep.
    A verdict about the model as it was is dropped (as the periodic check's already was)."""
    block, gate = env.tmp / "block", env.gate("alive")
    alive = f"if [ -e {block} ]; then while [ ! -e {gate} ]; do sleep 0.01; done; exit 1; fi"
    lx = env.start({"a": env.model("a", alive=alive), "b": env.model("b")},
                   policy={"alive_interval_secs": 3600})
    assert lx.chat("a")[0] == 200
    block.touch()
    assert lx.chat("a", reset=True)[0] == 502
    lx.wait_log(r'model\.backend_failed model=a check="its alive hook"')
    if meanwhile == "reloaded":
        config = json.loads(lx.config_path.read_text())
        config["models"]["a"]["alive"] = "true"
        lx.config_path.write_text(json.dumps(config))
        lx.proc.send_signal(signal.SIGHUP)
        lx.wait_log(r"reload\.done")
    else:
        assert lx.chat("b")[0] == 200
        assert lx.chat("a")[0] == 200
    gate.touch()  # the old check's verdict: failed
    lx.wait_log(r"hook\.exit model=a hook=alive code=1")
    assert lx.chat("a")[0] == 200
    assert lx.log_count(r"model\.alive_failed") == 0
    assert lx.health()["models"]["a"]["state"] == "active"


def test_a_reload_that_shortens_the_alive_interval_applies_now(env: Env) -> None:
    """Regression (attack): the liveness loop slept out the old interval (600 s) before
    it read the new one."""
    down = env.tmp / "down"
    lx = env.start({"a": env.model("a", alive=f"test ! -e {down}")}, policy={"alive_interval_secs": 600})
    assert lx.chat("a")[0] == 200
    down.touch()
    config = json.loads(lx.config_path.read_text())
    config["policy"]["alive_interval_secs"] = 0.05
    lx.config_path.write_text(json.dumps(config))
    lx.proc.send_signal(signal.SIGHUP)
    lx.wait_log(r"warning model\.alive_failed model=a")


def test_backend_refusing_runs_the_alive_hook_at_once(env: Env) -> None:
    """With an alive hook, a refused connection runs it now (not after the 1 h interval):
    it fails, the model is slept, and the next request wakes it."""
    up = env.tmp / "up-a"
    lx = env.start({"a": env.model("a", alive=f"test -e {up}", wake_extra=f"touch {up}")},
                   policy={"alive_interval_secs": 3600})
    assert lx.chat("a")[0] == 200
    env.backends["a"].stop()
    up.unlink()
    assert lx.chat("a")[0] == 502
    lx.wait_log(r"warning model\.backend_failed model=a check=\"its alive hook\"")
    lx.wait_log(r"warning model\.alive_failed model=a")
    lx.wait_log(r"switch\.end from=a result=ok")
    assert lx.health()["active"] == []


def test_explore_managed_servers_random_wake_sleep_kill_and_requests(env: Env) -> None:
    """Seeded random wake / sleep / kill -9 / requests against two managed servers, each
    with a child in its process group (a's takes its time to exit on SIGTERM, b's
    ignores it); after each step the state is the truth: an active model's newest
    server runs, every other server llmux ever started is gone (reaped: no zombie, no
    orphan), and so is every process of its group."""
    seeds = [int(os.environ["LLMUX_EXPLORE_SEED"])] if "LLMUX_EXPLORE_SEED" in os.environ else [1, 2, 3]
    lx = env.start({"a": env.managed("a", "--child", "slow-term"),
                    "b": env.managed("b", "--child", "ignore-term", stop_grace_secs=0.2)},
                   policy={"alive_interval_secs": 0})
    kills = 0
    killed: Set[int] = set()
    for seed in seeds:
        rng = random.Random(seed)
        trace: List[str] = []
        for step in range(12):
            name = rng.choice(["a", "b"])
            what = rng.choice(["request", "request", "wake", "sleep", "kill"])
            state = lx.request("GET", "/llmux/status")[2]["models"]
            trace.append(f"{what} {name} ({state[name]['state']})")
            try:
                if what == "request":
                    status, payload = lx.chat(name)
                    assert status == 200 and payload["backend"] == name, (status, payload)
                elif what in ("wake", "sleep"):
                    status = lx.request("POST", f"/llmux/models/{name}/{what}")[0]
                    assert status == 200, status
                elif state[name]["state"] == "active":
                    died = lx.log_count(rf"model\.died model={name}")
                    pid = server_pids(lx, name)[-1]
                    os.kill(pid, signal.SIGKILL)
                    lx.wait_log(rf"model\.died model={name}", count=died + 1)
                    wait_for(lambda: not group_running(pid), "what the killed server left to be killed")
                    killed.add(pid)
                    kills += 1
                models = lx.request("GET", "/llmux/status")[2]["models"]
                for m in ("a", "b"):
                    pids = server_pids(lx, m)
                    active = models[m]["state"] == "active"
                    assert models[m]["state"] in ("active", "asleep"), models[m]
                    if active:
                        assert not pid_gone(pids[-1]), f"{m} active but its server is gone"
                    gone = pids[:-1] if active else pids
                    assert all(pid_gone(p) for p in gone), f"{m}: a stopped server lives on"
                    left = [(p, group_running(p)) for p in gone if group_running(p)]
                    assert not left, f"{m}: what a stopped server started lives on: {left}"
                    if active:
                        assert len(group_running(pids[-1])) >= 2, f"{m}: its server's child is gone"
                lines = env.lines()
                children = [line.split()[1] for line in lines if line.startswith("child-up ") and line.endswith(" a")]
                done = {line.split()[1] for line in lines if line.startswith("child-done ")}
                for server, child in zip(server_pids(lx, "a"), children):
                    if server not in killed and pid_gone(server):
                        assert child in done, f"a: server {server}'s child was stopped before it was done"
                assert sum(models[m]["state"] == "active" for m in models) <= 1
            except AssertionError as e:
                raise AssertionError(f"seed {seed} step {step}: {e}\ntrace: {trace}\n"
                                     f"replay: LLMUX_EXPLORE_SEED={seed}") from e
    assert kills or len(seeds) == 1, "the default seeds must kill a server while it serves"


# ──────────────────── switcher, in process: deterministic simulation ────────────────────
# The real Switcher and policies on a virtual clock (llmux.VirtualTimeLoop), driven by
# seeded random scenarios: arrivals, clients leaving at every phase, hook failures of
# every kind (exit codes, timeouts, could-not-start, raw exceptions), slow drains, control
# wake/sleep, liveness failures, reloads that add, change and remove models, capacity
# configs and both policies.  FaultHooks plays the GPU: it knows which models are really
# loaded, so "the state never lies" can be checked.  Every invariant of DESIGN.md that
# the switcher owns is checked after every step of the event loop, and the loop must make
# progress (virtual time advances; no busy loop).  A failure names its seed; replay it
# with LLMUX_EXPLORE_SEED=N (add LLMUX_EXPLORE_VERBOSE=1 for the trace).

def sim_switcher(cfg: llmux.Config, wake: Dict[str, float], sleep: Dict[str, float],
                 policy: Optional[llmux.SchedulingPolicy] = None) -> llmux.Switcher:
    """The real Switcher over SimHooks (hooks as virtual durations), logging to a list."""
    return llmux.Switcher(cfg, llmux.SimHooks(wake, sleep), policy or llmux.FifoPolicy(),  # type: ignore[arg-type]
                          llmux.Log(ListStream()))


EXPLORE_SCENARIOS = int(os.environ.get("LLMUX_EXPLORE_SCENARIOS", "2000"))
BUSY_STEPS = 5000  # loop steps at one virtual instant beyond which the loop is spinning


class FaultHooks:
    """Wake and sleep hooks that take virtual time and fail as the dice say; the ground
    truth of what is loaded.  Checks residency when a wake starts, as the GPU would."""

    def __init__(self, rng: random.Random, capacity: Optional[float], timeout: float,
                 fail: float) -> None:
        self.rng = rng
        self.capacity = capacity
        self.timeout = timeout
        self.fail = fail
        self.loaded: Dict[str, float] = {}  # model -> size, really in (fake) GPU memory
        self.switcher: Any = None  # for the capacity in force (a reload may change it)
        self.runs = 0
        self.running: Optional[str] = None
        self.violations: List[str] = []
        self.injected = 0  # raw exceptions raised: each must be logged as an internal error
        # Failed wakes not followed by a hook that worked: llmux cannot know whether they
        # loaded the model, and must count them as loaded (they may be ACTIVE, not loaded).
        self.uncertain: set = set()
        self.last: Dict[Tuple[str, str], llmux.HookResult] = {}
        self.timeline: List[str] = []

    async def run(self, model: llmux.ModelConfig, hook: str) -> llmux.HookResult:
        now = asyncio.get_running_loop().time()
        if self.running is not None:
            self.violations.append(f"t={now:.3f}: {hook} of {model.name} started while "
                                   f"{self.running} runs")
        others = {n: s for n, s in self.loaded.items() if n != model.name}
        if hook == "wake":
            capacity = self.switcher.policy_cfg.capacity if self.switcher else self.capacity
            fits = (not others) if capacity is None else \
                sum(others.values()) + model.size <= capacity + 1e-9
            if not fits:
                self.violations.append(f"t={now:.3f}: wake of {model.name} (size "
                                       f"{model.size}) while {others} loaded, capacity "
                                       f"{self.capacity}")
        rng = self.rng
        kind = "ok"
        if rng.random() < self.fail:
            kind = rng.choice(["exit", "exit", "timeout", "cannot-start", "raise"])
        self.timeline.append(f"t={now:.3f} {hook} {model.name} -> {kind}")
        self.running = f"{hook} of {model.name}"
        self.runs += 1
        if hook == "wake":  # until it succeeds, nobody can say it did not load the model
            self.uncertain.add(model.name)
        try:
            if kind == "raise":
                self.injected += 1
                raise rng.choice([RuntimeError("injected bug"),
                                  OSError(24, "Too many open files"), KeyError("injected")])
            if kind == "cannot-start":
                result = llmux.HookResult(model.name, hook, None, error="too many open files")
            else:
                secs = self.timeout if kind == "timeout" else rng.choice(
                    [0.0, 0.01, rng.uniform(0.1, 3.0), rng.uniform(3.0, 20.0)])
                await asyncio.sleep(secs)
                result = llmux.HookResult(model.name, hook, 0 if kind == "ok" else None if
                                          kind == "timeout" else rng.choice([1, 2, 137]),
                                          timed_out=kind == "timeout", duration=secs,
                                          stderr_tail=[] if kind == "ok" else ["injected"])
            self.last[(model.name, hook)] = result
            if not result.ok:
                if hook == "wake" and kind != "cannot-start" and rng.random() < 0.5:
                    self.loaded[model.name] = model.size  # it loaded, then failed
                raise llmux.HookError(result.describe(), result)
            self.uncertain.discard(model.name)
            if hook == "wake":
                self.loaded[model.name] = model.size
            elif hook == "sleep":
                self.loaded.pop(model.name, None)
            return result
        finally:
            self.running = None

    async def alive(self, model: llmux.ModelConfig) -> bool:
        return model.name in self.loaded

    async def stop_server(self, name: str) -> None:
        pass  # no managed servers here

    def close(self) -> None:
        pass


class CheckedLoop(llmux.VirtualTimeLoop):
    """The virtual-time loop, calling ``check`` after every step and failing a loop that
    spins at one instant."""

    def __init__(self) -> None:
        super().__init__()
        self.check: Any = None
        self.steps = 0
        self._instant = -1.0
        self._same = 0

    def _run_once(self) -> None:
        super()._run_once()  # type: ignore[misc]
        self.steps += 1
        now = self.time()
        if now == self._instant:
            self._same += 1
            if self._same > BUSY_STEPS:
                raise AssertionError(f"busy loop: {BUSY_STEPS} steps at t={now:.3f} "
                                     "without time moving")
        else:
            self._instant, self._same = now, 0
        if self.check is not None:
            self.check()


def random_config(rng: random.Random, names: List[str], capacity: Optional[float],
                  policy: Dict[str, Any], limits: Optional[random.Random] = None) -> llmux.Config:
    """``limits`` draws max_in_flight, apart from ``rng`` so that seeds found before it
    existed still replay their scenario."""
    models: Dict[str, Any] = {}
    for i, name in enumerate(names):
        m: Dict[str, Any] = {"port": 9000 + int(name[1:]), "wake": f"wake {rng.random():.3f}",
                             "sleep": "sleep"}
        if capacity is not None:
            m["size"] = rng.choice([0.5, 1.0, 1.0, 1.5, capacity])
        if rng.random() < 0.15:
            m["idle_sleep_secs"] = rng.choice([0, 2.0, 8.0])
        if limits is not None and limits.random() < 0.3:
            m["max_in_flight"] = limits.choice([1, 1, 2, 3])
        models[name] = m
    return llmux.parse_config({"models": models, "policy": policy})


def explore(seed: int, verbose: bool = False) -> Dict[str, int]:
    """One seeded scenario through the real Switcher; raises AssertionError on a broken
    invariant.  Returns counts of what happened."""
    rng = random.Random(seed)
    crash_dice = random.Random(seed + 1_000_003)
    capacity = rng.choice([None, None, 2.0, 3.0])
    policy: Dict[str, Any] = {
        "name": rng.choice(["fifo", "cost"]),
        "request_timeout_secs": rng.choice([None, 5.0, 20.0, 60.0, 60.0]),
        "drain_timeout_secs": rng.choice([None, 1.0, 10.0, 300.0]),
        "drain_before_switch": rng.random() < 0.85,
        "min_active_secs": rng.choice([0.0, 0.0, 2.0, 10.0]),
        "wake_backoff_secs": rng.choice([0.0, 1.0, 5.0]),
        "max_queue": rng.choice([4096, 4096, 3]),
        "hook_timeout_secs": rng.choice([5.0, 30.0]),
        "idle_sleep_secs": rng.choice([0.0, 0.0, 5.0]),
        "max_wait_secs": rng.choice([10.0, 60.0]),
    }
    if capacity is not None:
        policy["capacity"] = capacity
    names = [f"m{i}" for i in range(rng.randint(2, 4))]
    limits = random.Random(f"max_in_flight {seed}")
    config = random_config(rng, names, capacity, policy, limits)
    fail = rng.choice([0.0, 0.1, 0.3, 0.6])
    loop = CheckedLoop()
    problems: List[Dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: problems.append(context))
    stream = ListStream()
    hooks = FaultHooks(rng, capacity, policy["hook_timeout_secs"], fail)
    counts = {"requests": 0, "served": 0, "errors": 0, "left": 0, "cut": 0, "reloads": 0,
              "controls": 0, "died": 0, "limited": 0}
    trace: List[str] = []
    timeout = policy["request_timeout_secs"]

    async def scenario() -> None:
        sw = llmux.Switcher(config, hooks, llmux.POLICIES[policy["name"]](),  # type: ignore[arg-type]
                            llmux.Log(stream))
        hooks.switcher = sw
        holders: Dict[int, llmux.Slot] = {}
        clients: Dict[int, "asyncio.Task[None]"] = {}
        others: List["asyncio.Task[Any]"] = []
        current = [config]

        draining: Dict[Tuple[int, int], int] = {}  # (model, transitions) -> in flight

        def check() -> None:
            S = llmux.ModelState
            assert not hooks.violations, hooks.violations
            models = sw.models
            assert sw.queued == sum(len(m.queue) for m in models.values()), "queued count"
            # Requests for an ACTIVE model at its max_in_flight wait for a release.
            for_switch = sum(len(m.queue) for m in models.values() if not m.at_limit())
            if for_switch < sw.queued:
                counts["limited"] += 1  # steps with requests waiting for a max_in_flight slot
            limited = any(m.at_limit() and m.queue for m in models.values())
            if for_switch and not (sw.busy() or sw.held or sw.closed or limited):
                # Demand waits and nothing runs: a decision timer must be armed, or the
                # requests would wait for their timeout although a switch could start.
                # (Behind a model at its limit, fifo waits for a release instead.)
                timer = sw._timer
                assert timer is not None and not timer.cancelled(), \
                    f"progress: {for_switch} waiting, no switch running and no timer armed"
            seen = {(id(m), m.transitions): m.in_flight for m in models.values()
                    if m.state is S.DRAINING}
            for key, in_flight in seen.items():
                assert in_flight <= draining.get(key, in_flight), \
                    f"inv 3: a draining model took a new slot ({draining[key]} -> {in_flight})"
            draining.clear()
            draining.update(seen)
            # Invariant 1 is checked where it matters, at every wake start (FaultHooks):
            # what llmux counts as awake may exceed a capacity that a reload shrank, or
            # hold models whose sleep failed; that is the truth, not a violation.
            for m in models.values():
                assert m.in_flight == len(m.slots) >= 0, f"{m.name}: in_flight {m.in_flight}"
                limit = m.cfg.max_in_flight
                assert limit is None or m.in_flight <= limit, \
                    f"inv 4: {m.name} has {m.in_flight} in flight, max_in_flight {limit}"
                if m.state is S.ACTIVE and m.has_room():
                    assert not m.queue, \
                        f"inv 4: {m.name} ACTIVE below its limit with {len(m.queue)} waiting"
                if m.state in (S.ACTIVE, S.DRAINING):
                    assert m.name in hooks.loaded or m.name in hooks.uncertain, \
                        f"inv 9: {m.name} {m.state.value}, not loaded"
                if m.state is not S.ACTIVE and m.state is not S.DRAINING:
                    assert not m.slots, f"inv 2: slots on {m.name} {m.state.value}"
            for name in hooks.loaded:
                assert name in models and models[name].state is not S.ASLEEP, \
                    f"inv 9: {name} is loaded but the switcher says " \
                    f"{models[name].state.value if name in models else 'gone'}"
            for slot in holders.values():  # a dead model's slots were released (and cut)
                assert slot.model.name in hooks.loaded or slot.model.name in hooks.uncertain \
                    or slot._released, \
                    f"inv 2: slot on unloaded {slot.model.name}"
            # What clients and the dashboard are told is always computable and sane
            # (checked every few steps: it is the costliest check).
            for m in models.values() if loop.steps % 5 == 0 else ():
                eta = sw.eta(m.name)
                assert eta is None or 0 <= eta < math.inf, f"eta of {m.name}: {eta}"
                if m.queue:
                    info = sw.wait_info(m.queue[-1])
                    assert 1 <= info["position"] and info["queued"] == len(m.queue), info
            if loop.steps % 50 == 0:
                json.dumps(sw.detail())

        loop.check = check

        async def client(i: int, name: str, service: float) -> None:
            asked = loop.time()
            try:
                slot = await sw.acquire(name)
            except llmux.LLMuxError as e:
                waited = loop.time() - asked
                assert timeout is None or waited <= timeout + 1e-6, \
                    f"inv 6: request {i} answered {e.status} after {waited:.3f}s > {timeout}s"
                counts["errors"] += 1
                return
            except asyncio.CancelledError:
                counts["left"] += 1
                raise
            waited = loop.time() - asked
            assert timeout is None or waited <= timeout + 1e-6, \
                f"inv 6: request {i} served after {waited:.3f}s > {timeout}s"
            assert abs(slot.waited - waited) < 1e-6, f"request {i} waited {waited}, slot says {slot.waited}"
            assert (slot.waited_for is None) == (waited == 0 and slot.eta is None) or waited == 0, \
                f"request {i}: waited {waited}s, waited_for {slot.waited_for}"
            assert slot.model.name in hooks.loaded or slot.model.name in hooks.uncertain, \
                f"inv 2: {name} granted while not loaded"
            holders[i] = slot
            try:
                await asyncio.sleep(service)
                counts["served"] += 1
            except asyncio.CancelledError:
                counts["cut"] += 1
                raise
            finally:
                del holders[i]
                slot.release()

        if rng.random() < 0.2:  # llmux restarted while a model stayed loaded
            first = names[0]
            hooks.loaded[first] = config.models[first].size
            sw.adopt(first)
        horizon = rng.choice([20.0, 60.0])
        for _ in range(rng.randint(5, 40)):
            await asyncio.sleep(rng.choice([0.0, 0.0, rng.uniform(0, horizon / 10)]))
            live = list(current[-1].models)
            roll = rng.random()
            if roll < 0.70:
                i = counts["requests"]
                counts["requests"] += 1
                name = rng.choice(live if rng.random() < 0.95 else names + ["m9"])
                service = rng.choice([0.0, 0.05, rng.uniform(0.1, 4.0), rng.uniform(4, 30)])
                trace.append(f"t={loop.time():.3f} request {i} {name} {service:.3f}s")
                clients[i] = loop.create_task(client(i, name, service))
            elif roll < 0.82:
                pending = [i for i, t in clients.items() if not t.done()]
                if pending:
                    i = rng.choice(pending)
                    trace.append(f"t={loop.time():.3f} client {i} leaves")
                    clients[i].cancel()
            elif roll < 0.90:
                name = rng.choice(live)
                if name in sw.models:
                    counts["controls"] += 1
                    what = rng.choice(["wake", "sleep", "alive_failed"])
                    # Half the liveness failures are crashes instead, decided by dice of
                    # their own: rng draws as before, so older seeds replay as found.
                    if what == "alive_failed" and crash_dice.random() < 0.5:
                        what = "died"
                    trace.append(f"t={loop.time():.3f} control {what} {name}")
                    if what == "wake":
                        task = sw.start_wake(name, "control API")
                    elif what == "sleep":
                        task = sw.start_sleep(name, "control API")
                    elif what == "died":  # its server crashed: the GPU no longer holds it
                        task = None
                        if sw.models[name].state is llmux.ModelState.ACTIVE:
                            hooks.loaded.pop(name, None)
                            counts["died"] += 1
                        was = sw.models[name].state
                        assert sw.died(name, "killed") is (was is llmux.ModelState.ACTIVE)
                    elif sw.models[name].state is llmux.ModelState.ACTIVE:
                        task = sw.alive_failed(name)
                    else:
                        task = None
                    if task is not None:
                        others.append(task)
            elif roll < 0.95:
                counts["reloads"] += 1
                nxt = sorted(current[-1].models)
                if len(nxt) > 1 and rng.random() < 0.5:
                    nxt.remove(rng.choice(nxt))
                if rng.random() < 0.5:
                    nxt.append(f"m{rng.randint(0, 5)}")
                cap = capacity
                if capacity is not None and rng.random() < 0.3:  # grow or shrink it
                    cap = rng.choice([1.5, 2.0, 3.0])
                new_policy = {**policy, **({"capacity": cap} if cap is not None else {})}
                new = random_config(rng, sorted(set(nxt)), cap, new_policy, limits)
                # keep some models unchanged, so a reload also leaves models alone
                keep = {n: m for n, m in current[-1].models.items()
                        if n in new.models and rng.random() < 0.5 and (cap is None or m.size <= cap)}
                new = llmux.Config(models={**new.models, **keep}, policy=new.policy)
                current.append(new)
                trace.append(f"t={loop.time():.3f} reload {sorted(new.models)}")
                others.append(loop.create_task(sw.reconfigure(new)))
            else:
                trace.append(f"t={loop.time():.3f} quiet")
                await asyncio.sleep(rng.uniform(0, horizon))
        tasks = list(clients.values()) + others
        if tasks:
            # Every request is bounded by request_timeout_secs (or, if null, by the hooks
            # and services, which all end): a generous virtual bound catches a wedge.
            done, pending = await asyncio.wait(tasks, timeout=100_000)
            assert not pending, f"inv 6: {len(pending)} tasks never finished: wedged"
            for t in done:
                if not t.cancelled() and t.exception() is not None:
                    raise t.exception()  # type: ignore[misc]
        for m in sw.models.values():
            assert m.in_flight == 0 and not m.slots and not m.queue, f"inv 5: {m.name} leaked"
        assert sw.queued == 0
        await sw.close()
        loop.check = None
        # No retry storm: every hook run answers an event (a request, a control, a reload,
        # a liveness failure) or an idle period (2 s at the least here).
        events = counts["requests"] + counts["controls"] + counts["reloads"] + 1
        bound = 8 * events + 6 * (loop.time() / 2.0 + 2)
        assert hooks.runs <= bound, f"{hooks.runs} hook runs for {events} events in " \
                                    f"{loop.time():.0f}s: a retry storm"
        internal = [line for line in stream.lines if "internal.error" in line]
        assert len(internal) == hooks.injected, \
            f"inv 11: {len(internal)} internal errors logged for {hooks.injected} injected: " \
            + "\n".join(internal[:3])

    try:
        run_checked(scenario(), loop)
    except BaseException:
        if verbose:
            print("\n".join(["trace:", *trace, "hooks:", *hooks.timeline, "log:", *stream.lines]))
        raise
    if verbose:
        print("\n".join(["trace:", *trace, "hooks:", *hooks.timeline]))
    counts["steps"] = loop.steps
    return counts


def explore_many(seeds: Iterable[int]) -> Dict[str, int]:
    """Run ``explore`` over ``seeds``; the first failure names its seed and how to replay."""
    total: Dict[str, int] = {}
    for seed in seeds:
        try:
            counts = explore(seed)
        except BaseException as e:
            raise AssertionError(
                f"switcher explorer: seed {seed} failed: {type(e).__name__}: {e}\n"
                f"replay: LLMUX_EXPLORE_SEED={seed} LLMUX_EXPLORE_VERBOSE=1 python3 -m pytest "
                f"-q test_llmux.py -k explorer") from e
        for k, v in counts.items():
            total[k] = total.get(k, 0) + v
    return total


def test_switcher_explorer(capsys: Any) -> None:
    if "LLMUX_EXPLORE_SEED" in os.environ:
        seed = int(os.environ["LLMUX_EXPLORE_SEED"])
        with capsys.disabled():
            explore(seed, verbose=bool(os.environ.get("LLMUX_EXPLORE_VERBOSE")))
        return
    started = time.monotonic()
    total = explore_many(range(EXPLORE_SCENARIOS))
    secs = time.monotonic() - started
    with capsys.disabled():
        print(f"\n[explore] switcher: {EXPLORE_SCENARIOS} scenarios, {total['requests']} requests "
              f"({total['served']} served, {total['errors']} errors, {total['left']} left, "
              f"{total['cut']} cut), {total['reloads']} reloads, {total['controls']} controls, "
              f"{total['died']} died, {EXPLORE_SCENARIOS / secs:.0f} scenarios/s")
    assert total["served"] and total["errors"] and total["left"] and total["reloads"]
    assert total["died"]
    assert total["limited"], "no scenario had a request wait for a max_in_flight slot"



def test_switcher_explorer_regression_seeds() -> None:
    """Scenarios the explorer found, kept as they were found (the seeds replay the same
    scenario while the generator above is unchanged; the tests below pin them down):
    28: a decision timer for min_active_secs fired a hair before its deadline, found it
    not reached, and re-armed itself at zero delay: a busy loop;
    158: a reload removed the target of a running switch, which then woke it anyway:
    loaded, and unknown to the switcher."""
    explore_many([28, 158])


def test_min_active_deadline_does_not_spin() -> None:
    """Regression (explorer seed 28): asyncio runs a timer up to its clock resolution
    early; a pass that found min_active_secs not quite over re-armed a zero-delay timer."""
    loop = CheckedLoop()
    cfg = llmux.parse_config({"models": {"a": {"port": 1}, "b": {"port": 2}},
                              "policy": {"min_active_secs": 10, "request_timeout_secs": 60}})

    async def go() -> float:
        sw = sim_switcher(cfg, {"*": 0.01}, {"*": 0.2})
        await asyncio.sleep(30.016)  # an active_since whose sum with 10 is inexact
        (await sw.acquire("a")).release()
        (await sw.acquire("b")).release()
        await sw.close()
        return loop.time()

    assert run_checked(go(), loop) > 40.0


def test_reload_removing_the_target_of_a_running_switch_leaves_nothing_unknown() -> None:
    """Regression (explorer seed 158): the reload deleted a model that a running switch
    was about to wake; the switch woke it anyway, and the switcher no longer knew it."""
    loop = CheckedLoop()
    base = {"a": {"port": 1}, "b": {"port": 2}}
    cfg = llmux.parse_config({"models": base})
    hooks = llmux.SimHooks({"*": 1.0}, {"*": 5.0})

    async def go() -> None:
        sw = llmux.Switcher(cfg, hooks, llmux.FifoPolicy(), llmux.Log(ListStream()))  # type: ignore[arg-type]
        (await sw.acquire("a")).release()
        waiting = loop.create_task(sw.acquire("b"))  # a sleeps for 5 s, then b wakes
        await asyncio.sleep(1.0)
        assert sw.switching == (["a"], "b")
        reload = loop.create_task(sw.reconfigure(llmux.parse_config({"models": {"a": base["a"]}})))
        (await waiting).release()  # b woke: it served the request that waited for it ...
        assert (await reload)["removed"] == ["b"]
        assert list(sw.models) == ["a"] and sw.active() == []  # ... and was then put to sleep
        order = [(m, h) for (m, h) in hooks.last]
        assert order == [("a", "wake"), ("a", "sleep"), ("b", "wake"), ("b", "sleep")], order
        await sw.close()

    run_checked(go(), loop)


class ScriptedHooks(llmux.SimHooks):
    """SimHooks whose sleep hook fails while ``fail_sleep`` is set."""

    fail_sleep = False
    sleeps = 0

    async def run(self, model: llmux.ModelConfig, hook: str) -> llmux.HookResult:
        self.sleeps += hook == "sleep"
        if hook == "sleep" and self.fail_sleep:
            result = llmux.HookResult(model.name, hook, 2, stderr_tail=["stuck"])
            raise llmux.HookError(result.describe(), result)
        return await super().run(model, hook)


def test_reload_re_adding_a_removed_model_still_loaded_keeps_it() -> None:
    """Regression: a removed model whose sleep failed stays loaded (retired); a later
    reload that added its name again replaced it with a fresh, ASLEEP entry: the loaded
    model was forgotten and another could wake beside it."""
    loop = CheckedLoop()
    models = {"a": {"port": 1}, "b": {"port": 2}}
    hooks = ScriptedHooks({"*": 0.1}, {"*": 0.1})

    async def go() -> None:
        sw = llmux.Switcher(llmux.parse_config({"models": models}), hooks,  # type: ignore[arg-type]
                            llmux.FifoPolicy(), llmux.Log(ListStream()))
        (await sw.acquire("a")).release()
        hooks.fail_sleep = True
        await sw.reconfigure(llmux.parse_config({"models": {"b": models["b"]}}))
        assert sw.models["a"].retired and sw.active() == ["a"]
        await sw.reconfigure(llmux.parse_config({"models": models}))
        m = sw.models["a"]
        assert m.state is llmux.ModelState.ACTIVE and not m.retired, m.state
        with pytest.raises(llmux.HookError):
            await sw.acquire("b")  # a is still loaded, and its sleep still fails
        assert sw.active() == ["a"]
        await sw.close()

    run_checked(go(), loop)


def test_fifo_serves_older_requests_behind_a_limit_before_switching_away() -> None:
    """A request for b must not drain a (and make a's earlier waiters sit through two
    switches) while requests that came before it wait for a slot on a."""
    cfg = llmux.parse_config({"models": {"a": {"port": 1, "max_in_flight": 1}, "b": {"port": 2}}})
    loop = CheckedLoop()

    async def go() -> None:
        sw = sim_switcher(cfg, {"*": 1.0}, {"*": 1.0})
        first = await sw.acquire("a")
        second = loop.create_task(sw.acquire("a"))
        await asyncio.sleep(0.1)
        other = loop.create_task(sw.acquire("b"))
        await asyncio.sleep(5.0)
        assert sw.switching is None and sw.active() == ["a"]  # b waits its turn
        first.release()
        slot = await second  # the older request is served, on a ...
        assert sw.switching == (["a"], "b")  # ... and only then does a drain for b
        slot.release()
        (await other).release()
        assert sw.active() == ["b"]
        await sw.close()

    run_checked(go(), loop)


def test_failed_idle_sleep_is_retried_once_a_period_not_at_once() -> None:
    """Regression (attack): a failing sleep hook made the model ACTIVE again with its
    idle deadline already past, so the idle sleep was retried at once, in a tight loop
    (330 sleep hooks a second)."""
    loop = CheckedLoop()
    hooks = ScriptedHooks({"*": 0.0}, {"*": 0.0})
    cfg = llmux.parse_config({"models": {"a": {"port": 1}}, "policy": {"idle_sleep_secs": 1}})

    async def go() -> int:
        sw = llmux.Switcher(cfg, hooks, llmux.FifoPolicy(), llmux.Log(ListStream()))  # type: ignore[arg-type]
        hooks.fail_sleep = True
        (await sw.acquire("a")).release()
        await asyncio.sleep(10.5)
        attempts = hooks.sleeps
        await sw.close()
        return attempts

    attempts = run_checked(go(), loop)
    assert 9 <= attempts <= 11, attempts  # one a second


@pytest.mark.parametrize("change", ["policy 0 -> 1", "model 600 -> 1", "removed and re-added"])
def test_a_reload_applies_idle_sleep_to_an_idle_active_model_now(change: str) -> None:
    """Regression (attack): a reload that turned idle sleep on, or shortened it, did not
    reach an ACTIVE model with nothing in flight until its next request (or the old
    600 s timer); a model removed and re-added by name while its idle timer ran never
    slept again (the old timer, bound to the removed model, kept the new one's place)."""
    loop = CheckedLoop()
    hooks = ScriptedHooks({"*": 0.0}, {"*": 0.0})
    before = {"policy 0 -> 1": ({}, {"idle_sleep_secs": 0}),
              "model 600 -> 1": ({"idle_sleep_secs": 600}, {}),
              "removed and re-added": ({}, {"idle_sleep_secs": 3})}[change]
    cfg = llmux.parse_config({"models": {"a": {"port": 1, **before[0]}, "b": {"port": 2}}, "policy": before[1]})

    async def go() -> Tuple[float, str]:
        sw = llmux.Switcher(cfg, hooks, llmux.FifoPolicy(), llmux.Log(ListStream()))  # type: ignore[arg-type]
        (await sw.acquire("a")).release()
        await asyncio.sleep(0.5)
        if change == "removed and re-added":
            await sw.reconfigure(llmux.parse_config({"models": {"b": {"port": 2}}, "policy": before[1]}))
            await sw.reconfigure(cfg)
            (await sw.acquire("a")).release()
        else:
            after = {"policy 0 -> 1": ({}, {"idle_sleep_secs": 1}),
                     "model 600 -> 1": ({"idle_sleep_secs": 1}, {})}[change]
            await sw.reconfigure(llmux.parse_config(
                {"models": {"a": {"port": 1, **after[0]}, "b": {"port": 2}}, "policy": after[1]}))
        started = asyncio.get_running_loop().time()
        while sw.models["a"].state is not llmux.ModelState.ASLEEP and \
                asyncio.get_running_loop().time() - started < 60:
            await asyncio.sleep(0.1)
        took, state = asyncio.get_running_loop().time() - started, sw.models["a"].state.value
        await sw.close()
        return took, state

    took, state = run_checked(go(), loop)
    assert state == "asleep" and took < 5, (took, state)


def test_reload_to_a_smaller_capacity_sleeps_what_no_longer_fits(env: Env) -> None:
    """Regression (attack): a SIGHUP that shrank policy.capacity left more models awake
    than the new capacity holds, until some later switch."""
    lx = env.start({n: env.model(n, size=1) for n in "ab"}, policy={"capacity": 2})
    assert lx.chat("a")[0] == 200 and lx.chat("b")[0] == 200
    config = json.loads(lx.config_path.read_text())
    config["policy"]["capacity"] = 1
    lx.config_path.write_text(json.dumps(config))
    lx.proc.send_signal(signal.SIGHUP)
    lx.wait_log(r"reload\.done")
    health = lx.health()
    assert health["active"] == ["b"] and health["capacity"] == 1, health  # a: least recent
    assert env.lines()[-2:] == ["sleep-start a", "sleep-end a"]


def _c_on_as_port(lx: Llmux, edit: Callable[[Dict[str, Any]], Any]) -> Tuple[int, Tuple[int, Any]]:
    """Reload with ``edit`` applied to the models and a new model c on a's old port:
    that port, and the answer to a chat request for c."""
    config = json.loads(lx.config_path.read_text())
    port = config["models"]["a"]["port"]
    edit(config["models"])
    config["models"]["c"] = {"port": port, "wake": "true", "sleep": "true", "size": 1}
    lx.config_path.write_text(json.dumps(config))
    lx.proc.send_signal(signal.SIGHUP)
    lx.wait_log(r"reload\.done")
    return port, lx.chat("c")


def test_a_model_is_not_woken_on_a_port_a_retired_model_still_holds(env: Env) -> None:
    """Regression (attack): a reload removed a (whose sleep failed: still loaded, on its
    old port) and added c on that port; with room for both, c was woken beside it, and
    c's requests were answered by a's server."""
    flag = env.tmp / "stuck"
    flag.touch()
    lx = env.start({"a": env.model("a", size=1, sleep_extra=f"[ -e {flag} ] && exit 1")},
                   policy={"capacity": 2})
    assert lx.chat("a")[0] == 200
    port, (status, payload) = _c_on_as_port(lx, lambda models: models.pop("a"))
    assert status == 503 and f"its port {port} is still held by model 'a' (removed by a config reload" \
        in payload["error"]["message"], payload
    assert lx.health()["active"] == ["a"]


def test_a_port_held_by_a_changed_model_fails_the_switch_before_any_victim_sleeps(env: Env) -> None:
    """Regression (attack): the port check ran after the switch's victims had slept: a
    healthy b was slept for nothing before c was refused (a, changed by a reload to
    another port, still held c's port, its sleep failing)."""
    flag = env.tmp / "stuck"
    flag.touch()
    lx = env.start({"a": env.model("a", size=1, sleep_extra=f"[ -e {flag} ] && exit 1"),
                    "b": env.model("b", size=1)}, policy={"capacity": 2})
    assert lx.chat("b")[0] == 200 and lx.chat("a")[0] == 200
    # a moved (its sleep fails: it keeps its old port)
    port, (status, payload) = _c_on_as_port(lx, lambda models: models["a"].update(port=9))
    assert status == 503 and f"its port {port} is still held by model 'a' (changed by a config reload" \
        in payload["error"]["message"], payload
    assert sorted(lx.health()["active"]) == ["a", "b"]  # b was not slept for nothing


def test_a_hook_whose_working_directory_is_gone_says_so(tmp_path: Path) -> None:
    """Regression (attack): hooks run in the config file's folder; with the folder moved
    away while llmux ran, a hook failed as "could not start: no such file or directory",
    which reads as if sh were missing."""
    folder = tmp_path / "conf"
    folder.mkdir()
    lx = Llmux({"models": {"a": {"port": 9, "wake": "true"}}, "policy": {"wake_backoff_secs": 0}}, folder)
    try:
        lx.config_path.unlink()
        folder.rmdir()
        status, _, payload = lx.request("POST", "/v1/chat/completions", {"model": "a"})
        assert status == 503 and f"its working directory {folder} (the config file's) does not exist any more" \
            in payload["error"]["message"], payload
    finally:
        lx.stop()
    lx.assert_clean()


def test_failed_wake_whose_cleanup_sleep_fails_counts_as_loaded(env: Env) -> None:
    """Regression (attack): a wake that failed after loading part of the model, and whose
    cleanup sleep failed too, was taken as asleep; the next model woke beside it."""
    flag = env.tmp / "broken"
    flag.touch()
    lx = env.start({"b": env.model("b", wake_extra=f"[ -e {flag} ] && exit 1",
                                   sleep_extra=f"[ -e {flag} ] && exit 1"),
                    "c": env.model("c")})
    assert lx.chat("b")[0] == 503
    assert lx.health()["active"] == ["b"]  # it may be loaded: counted as loaded
    status, payload = lx.chat("c")
    assert status == 503 and payload["error"]["message"].startswith("hook 'sleep' for model 'b'")
    flag.unlink()
    assert lx.chat("c")[1]["backend"] == "c"
    check_residency(env.lines())


def test_reload_after_shutdown_cut_a_wake_does_nothing() -> None:
    """Regression: close() cutting a wake leaves the model SLEEPING (so sleep_on_exit
    cleans it up); a reload that came then tried to drain it: an illegal transition."""
    loop = CheckedLoop()
    cfg = llmux.parse_config({"models": {"a": {"port": 1}, "b": {"port": 2}}})

    async def go() -> None:
        sw = sim_switcher(cfg, {"*": 10.0}, {"*": 0.1})
        waiting = loop.create_task(sw.acquire("a"))
        await asyncio.sleep(1.0)
        await sw.close()
        with pytest.raises(llmux.LLMuxError):
            await waiting
        assert sw.models["a"].state is llmux.ModelState.SLEEPING
        changed = llmux.parse_config({"models": {"a": {"port": 1, "wake": "other"}}})
        assert await sw.reconfigure(changed) == {"added": [], "changed": [], "updated": [], "removed": []}

    run_checked(go(), loop)


# ─────────────────────────────── switcher, end to end ───────────────────────────────────


def test_switch_runs_old_sleep_before_new_wake_and_routes_to_the_right_backend(env: Env) -> None:
    lx = env.start({"a": env.model("a"), "b": env.model("b")})
    for model in ["a", "b", "b", "a"]:
        status, payload = lx.chat(model)
        assert status == 200 and payload["backend"] == model
    assert env.lines() == [
        "wake-start a", "wake-end a", "req a",
        "sleep-start a", "sleep-end a", "wake-start b", "wake-end b", "req b", "req b",
        "sleep-start b", "sleep-end b", "wake-start a", "wake-end a", "req a"]
    lx.wait_log(r"switch\.end from=a to=b result=ok secs=\d")
    assert lx.health()["active"] == ["a"]


def test_many_concurrent_requests_alternating_models(env: Env) -> None:
    lx = env.start({name: env.model(name) for name in "abc"})
    results: List[Tuple[str, int, Any]] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        for j in range(6):
            model = "abc"[(i + j) % 3]
            status, payload = lx.chat(model, stream=bool(j % 2))
            with lock:
                results.append((model, status, payload))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(T * 3)
    assert len(results) == 72
    for model, status, payload in results:
        assert status == 200
        if isinstance(payload, dict):
            assert payload["backend"] == model
        else:
            assert f'"backend": "{model}"'.encode() in payload
    check_residency(env.lines())
    health = lx.health()
    assert health["queued"] == 0 and all(m["in_flight"] == 0 for m in health["models"].values())


def test_drain_waits_for_a_long_stream_then_switches(env: Env) -> None:
    lx = env.start({"a": env.model("a"), "b": env.model("b")})
    gate = env.gate("a")
    conn, resp = sse_stream(lx.port, {"model": "a", "stream": True, "hold": str(gate)})
    assert resp.status == 200
    assert json.loads(data_line(resp)[len(b"data: "):])["i"] == 0  # the stream is in flight
    t, box = run_bg(lx.chat, "b")
    lx.wait_log(r"model\.state model=a from=active to=draining")
    # Strict drain: a new request for a queues instead of joining the draining model.
    t2, box2 = run_bg(lx.chat, "a")
    lx.wait_log(r"request\.queued model=a state=draining")
    assert "sleep-start a" not in env.lines()
    gate.touch()
    rest = resp.read()
    assert rest.endswith(b"data: [DONE]\n\n")
    conn.close()
    assert join(t, box)[1]["backend"] == "b"
    assert join(t2, box2)[1]["backend"] == "a"
    lines = env.lines()
    assert lines.index("stream-end a") < lines.index("sleep-start a") < lines.index("wake-start b")
    check_residency(lines)


def test_waiting_requests_are_served_before_the_next_switch(env: Env) -> None:
    """Invariant 4: b's waiters get slots when b wakes, even though c waits too."""
    lx = env.start({n: env.model(n, wake_extra=f"while [ ! -e {env.gate(n)} ]; do sleep 0.01; done"
                                  if n == "b" else "") for n in "abc"})
    assert lx.chat("a")[0] == 200
    bs = [run_bg(lx.chat, "b") for _ in range(3)]
    lx.wait_log(r"hook\.start model=b hook=wake")
    cs = [run_bg(lx.chat, "c") for _ in range(2)]
    lx.wait_log(r"request\.queued model=c", count=2)
    env.gate("b").touch()
    assert [join(*x)[1]["backend"] for x in bs] == ["b"] * 3
    assert [join(*x)[1]["backend"] for x in cs] == ["c"] * 2
    lines = env.lines()
    assert [line for line in lines if line.startswith("req")] == ["req a"] + ["req b"] * 3 + ["req c"] * 2
    check_residency(lines)


def _unread(port: int, peer: int) -> int:
    """Bytes the kernel holds for llmux (listening on ``port``) from the client at ``peer``
    that llmux has not read yet (/proc/net/tcp's rx_queue)."""
    local, remote = f"0100007F:{port:04X}", f"0100007F:{peer:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == local and fields[2] == remote:
            return int(fields[4].split(":")[1], 16)
    return 0


def test_a_client_that_pipelines_far_ahead_and_resets_is_noticed(env: Env) -> None:
    """Regression (attack): a client that sent more than 2 x STREAM_LIMIT ahead (its next
    request) and then reset while its answer was under way: reading from it had stopped
    (the bound on what a connection may buffer), so its reset went unseen until a write
    failed.  The engine generated on, the slot stayed held, the request was logged 200.
    While reading is paused, llmux polls the socket every PAUSED_CLIENT_CHECK_SECS."""
    lx = env.start({"a": env.model("a")})
    s = socket.create_connection(("127.0.0.1", lx.port), timeout=T)
    try:
        body = json.dumps({"model": "a", "stream": True, "hold": str(env.gate("a"))}).encode()
        head = b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n"
        s.sendall(head % len(body) + body)
        got = b""
        while b"data:" not in got:
            got += s.recv(65536)  # the first event: the answer is under way, then held
        ahead = json.dumps({"model": "a", "pad": "x" * (1 << 20)}).encode()
        s.sendall(head % len(ahead) + ahead)
        peer = s.getsockname()[1]
        wait_for(lambda: _unread(lx.port, peer) > 0, "llmux to stop reading the client")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        s.close()  # a reset
    lx.wait_log(r"request method=POST path=/v1/chat/completions model=a status=499")
    assert lx.health()["models"]["a"]["in_flight"] == 0
    env.gate("a").touch()


def test_client_disconnect_releases_the_slot(env: Env) -> None:
    lx = env.start({"a": env.model("a"), "b": env.model("b")})
    conn, resp = sse_stream(lx.port, {"model": "a", "stream": True, "hold": str(env.gate("a"))})
    data_line(resp)
    assert lx.health()["models"]["a"]["in_flight"] == 1
    hang_up(conn, resp)  # the client goes away mid-stream
    lx.wait_log(r"request method=POST path=/v1/chat/completions model=a status=499")
    assert lx.health()["models"]["a"]["in_flight"] == 0
    # Nothing left to drain: a switch happens at once although a's backend still holds.
    assert lx.chat("b")[1]["backend"] == "b"
    env.gate("a").touch()


def test_client_leaving_the_queue_no_longer_triggers_a_switch(env: Env) -> None:
    lx = env.start({"a": env.model("a"), "b": env.model("b")})
    conn, resp = sse_stream(lx.port, {"model": "a", "stream": True, "hold": str(env.gate("a"))})
    resp.readline()
    waiting = socket.create_connection(("127.0.0.1", lx.port), timeout=T)
    body = b'{"model": "b"}'
    waiting.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    lx.wait_log(r"model\.state model=a from=active to=draining")
    waiting.close()
    lx.wait_log(r"switch\.end from=a to=b result=abandoned")
    assert lx.health()["active"] == ["a"]
    assert lx.chat("a")[1]["backend"] == "a"  # a serves again, no wake
    env.gate("a").touch()
    resp.read()
    conn.close()
    assert "sleep-start a" not in env.lines() and "wake-start b" not in env.lines()


def test_request_timeout_gives_504(env: Env) -> None:
    lx = env.start({"a": env.model("a", wake_extra=f"while [ ! -e {env.gate('a')} ]; do sleep 0.01; done")},
                   policy={"request_timeout_secs": 0.3})
    status, payload = lx.chat("a")
    assert status == 504
    assert payload == {"error": {"message": "model 'a' did not become available within 0.3s "
                                            "(request_timeout_secs)",
                                 "type": "server_error", "code": "request_timeout"}}
    env.gate("a").touch()
    lx.wait_log(r"switch\.end to=a result=ok")
    assert lx.chat("a")[0] == 200


def test_failed_wake_gives_503_runs_sleep_and_the_next_request_recovers(env: Env) -> None:
    flag = env.tmp / "fail"
    flag.touch()
    lx = env.start({"a": env.model("a"),
                    "b": env.model("b", wake_extra=f"if [ -e {flag} ]; then echo 'no GPU memory' >&2; exit 7; fi")})
    assert lx.chat("a")[0] == 200
    status, payload = lx.chat("b")
    assert status == 503
    assert payload["error"] == {"message": "hook 'wake' for model 'b' exited 7: no GPU memory",
                                "type": "server_error", "code": "hook_failed"}
    assert env.lines()[-3:] == ["wake-start b", "sleep-start b", "sleep-end b"]
    flag.unlink()
    assert lx.chat("b")[1]["backend"] == "b"
    check_residency([x for x in env.lines()])


def test_failed_wake_backoff_delays_the_retry(env: Env) -> None:
    flag = env.tmp / "fail"
    flag.touch()
    lx = env.start({"a": env.model("a", wake_extra=f"if [ -e {flag} ]; then exit 1; fi")},
                   policy={"wake_backoff_secs": 0.5})
    assert lx.chat("a")[0] == 503
    flag.unlink()
    assert lx.chat("a")[0] == 200
    lx.wait_log(r"model\.state model=a from=asleep to=waking after_secs=(0\.[5-9]|[1-9])")


def test_min_active_secs_holds_the_model_before_switching(env: Env) -> None:
    lx = env.start({"a": env.model("a"), "b": env.model("b")}, policy={"min_active_secs": 0.5})
    assert lx.chat("a")[0] == 200
    assert lx.chat("b")[0] == 200
    match = lx.wait_log(r"model\.state model=a from=active to=draining after_secs=([0-9.]+)")
    assert float(match.group(1)) >= 0.5


def test_drain_before_switch_false_cuts_in_flight_requests(env: Env) -> None:
    lx = env.start({"a": env.model("a"), "b": env.model("b")}, policy={"drain_before_switch": False})
    assert lx.chat("a")[0] == 200  # up: the stream is the backend's own
    conn, resp = sse_stream(lx.port, {"model": "a", "stream": True, "hold": str(env.gate("a"))})
    data_line(resp)  # the backend's stream has begun: a cut now tears it
    assert lx.chat("b")[1]["backend"] == "b"
    with pytest.raises(http.client.IncompleteRead):
        resp.read()
    conn.close()
    env.gate("a").touch()


def test_a_held_stream_cut_while_relaying_ends_with_an_error_event(env: Env) -> None:
    """Regression (attack): llmux frames a held stream, yet a cut of its own (drain timeout,
    drain_before_switch false, shutdown) once the backend's stream had begun tore it."""
    lx = env.start({"a": env.model("a"), "b": env.model("b")}, policy={"drain_before_switch": False})
    assert lx.chat("b")[0] == 200
    conn, resp = sse_stream(lx.port, {"model": "a", "stream": True, "hold": str(env.gate("a"))})
    data_line(resp)  # held, and the backend's stream has begun
    assert lx.chat("b")[1]["backend"] == "b"
    events = sse_events(resp.read())  # no IncompleteRead: a clean end
    conn.close()
    env.gate("a").touch()
    assert json.loads(events[-1][1])["error"]["code"] == "request_cut"
    lx.wait_log(r"request method=POST path=/v1/chat/completions model=a status=502 .*held=true")


def test_drain_timeout_cuts_what_is_left(env: Env) -> None:
    lx = env.start({"a": env.model("a"), "b": env.model("b")}, policy={"drain_timeout_secs": 0.2})
    assert lx.chat("a")[0] == 200  # up: the stream is the backend's own
    conn, resp = sse_stream(lx.port, {"model": "a", "stream": True, "hold": str(env.gate("a"))})
    data_line(resp)
    assert lx.chat("b")[1]["backend"] == "b"
    lx.wait_log(r"request\.cut model=a reason=\"drain took longer than 0\.2s")
    with pytest.raises(http.client.IncompleteRead):
        resp.read()
    conn.close()
    env.gate("a").touch()


def test_a_request_cut_before_its_answer_began_gets_an_error_not_silence(env: Env) -> None:
    """Regression (attack): a request the switcher cut (a drain timeout, a server that
    died) before any byte of its answer got a bare close, and was logged as 499, as if
    its client had left."""
    lx = env.start({"a": env.model("a"), "b": env.model("b")}, policy={"drain_timeout_secs": 0.2})
    gate = env.gate("stall")
    t, box = run_bg(lx.request, "POST", f"/fault/stall:{gate}", {"model": "a"})
    lx.wait_log(r"hook\.exit model=a hook=wake code=0")
    wait_for(lambda: "req a" in env.lines(), "the request to reach a")
    assert lx.chat("b")[1]["backend"] == "b"
    status, headers, payload = join(t, box)
    assert status == 503 and payload["error"]["code"] == "request_cut", payload
    assert payload["error"]["message"] == ("the request to model 'a' was cut: drain took "
                                           "longer than 0.2s (drain_timeout_secs)")
    assert headers["retry-after"] == "1"
    lx.wait_log(r"info request method=POST path=/fault/stall:\S+ model=a status=503")
    gate.touch()


def test_failed_sleep_keeps_the_old_model_and_fails_the_waiters(env: Env) -> None:
    flag = env.tmp / "fail"
    flag.touch()
    lx = env.start({"a": env.model("a", sleep_extra=f"if [ -e {flag} ]; then echo stuck >&2; exit 2; fi"),
                    "b": env.model("b")})
    assert lx.chat("a")[0] == 200
    status, payload = lx.chat("b")
    assert status == 503 and payload["error"]["message"] == "hook 'sleep' for model 'a' exited 2: stuck"
    assert lx.health()["active"] == ["a"]
    assert lx.chat("a")[1]["backend"] == "a"
    flag.unlink()
    assert lx.chat("b")[1]["backend"] == "b"
    # The failed sleep never ended, so a stayed loaded and served; b woke only after a
    # second, successful sleep.
    assert env.lines() == ["wake-start a", "wake-end a", "req a", "sleep-start a", "req a",
                           "sleep-start a", "sleep-end a", "wake-start b", "wake-end b", "req b"]


def test_failed_sleep_of_one_of_two_victims_restores_both(env: Env) -> None:
    """Regression (issue 8, defect 1): a switch that evicts two models, whose first sleep
    fails, left the second DRAINING; the next switch to it was illegal, rescheduled in a
    busy loop, and its requests got 504 for good."""
    flag = env.tmp / "fail"
    flag.touch()
    sizes = {"a": 1.0, "b": 1.0, "c": 2.0}
    fail = f"if [ -e {flag} ]; then echo stuck >&2; exit 2; fi"
    lx = env.start({"a": env.model("a", size=1, sleep_extra=fail), "b": env.model("b", size=1),
                    "c": env.model("c", size=2)},
                   policy={"capacity": 2, "request_timeout_secs": T / 2})
    assert lx.chat("a")[0] == 200 and lx.chat("b")[0] == 200  # a is least recently used
    status, payload = lx.chat("c")
    assert status == 503 and payload["error"]["message"] == "hook 'sleep' for model 'a' exited 2: stuck"
    health = lx.health()
    assert sorted(health["active"]) == ["a", "b"] and health["state"] == "idle", health
    assert lx.chat("b")[1]["backend"] == "b"  # served at once: b is loaded and active
    flag.unlink()
    assert lx.chat("c")[1]["backend"] == "c"
    assert check_capacity(env.lines(), sizes, 2) == 2
    assert lx.log_count("internal.error") == 0


def test_sighup_removing_the_awake_model_whose_sleep_fails_keeps_it_counted(env: Env) -> None:
    """Regression (issue 8, defect 11): the removed model was dropped from the switcher
    although its sleep failed, and the next request woke another model beside it."""
    flag = env.tmp / "fail"
    flag.touch()
    models = {"a": env.model("a", sleep_extra=f"if [ -e {flag} ]; then echo stuck >&2; exit 2; fi"),
              "b": env.model("b")}
    lx = env.start(models)
    assert lx.chat("a")[0] == 200
    config = json.loads(lx.config_path.read_text())
    del config["models"]["a"]
    lx.config_path.write_text(json.dumps(config))
    lx.proc.send_signal(signal.SIGHUP)
    lx.wait_log(r"error reload\.sleep_failed model=a")
    lx.wait_log(r"reload\.done .*removed=a")
    health = lx.health()
    assert health["active"] == ["a"] and health["models"]["a"]["reload_pending"] == "removed"
    assert lx.chat("a")[0] == 404  # no longer routed
    status, payload = lx.chat("b")  # a is still loaded: it must sleep first, and fails again
    assert status == 503 and "hook 'sleep' for model 'a' exited 2" in payload["error"]["message"]
    assert lx.health()["active"] == ["a"]
    flag.unlink()
    assert lx.chat("b")[1]["backend"] == "b"
    lx.wait_log(r"reload\.applied model=a change=removed")
    assert lx.health()["active"] == ["b"] and "a" not in lx.health()["models"]
    check_residency(env.lines())


def test_queue_full_gives_503_with_retry_after(env: Env) -> None:
    lx = env.start({"a": env.model("a", wake_extra=f"while [ ! -e {env.gate('a')} ]; do sleep 0.01; done")},
                   policy={"max_queue": 2})
    waiters = [run_bg(lx.chat, "a") for _ in range(2)]
    lx.wait_log(r"request\.queued model=a", count=2)
    status, headers, payload = lx.request("POST", "/v1/chat/completions", {"model": "a"})
    assert status == 503 and headers["retry-after"] == "1"
    assert payload["error"]["code"] == "queue_full"
    env.gate("a").touch()
    assert [join(*w)[0] for w in waiters] == [200, 200]


def test_max_in_flight_queues_beyond_the_limit_in_arrival_order(env: Env) -> None:
    lx = env.start({"a": env.model("a", max_in_flight=1)})
    conn1, resp1 = sse_stream(lx.port, {"model": "a", "stream": True, "n": 2, "hold": str(env.gate("a"))})
    assert json.loads(data_line(resp1)[6:]) == {"backend": "a", "i": 0}  # holds the one slot
    results: Dict[int, Any] = {}

    def chat(i: int) -> None:
        results[i] = lx.chat("a")
    first = threading.Thread(target=chat, args=(1,))
    first.start()
    lx.wait_log(r"request\.queued model=a state=active waiting=1")
    second = threading.Thread(target=chat, args=(2,))
    second.start()
    lx.wait_log(r"request\.queued model=a state=active waiting=2")
    health = lx.health()["models"]["a"]
    assert health == {"state": "active", "in_flight": 1, "queued": 2, "max_in_flight": 1}
    assert lx.request("GET", "/llmux/status")[2]["models"]["a"]["max_in_flight"] == 1
    scrape = lx.request("GET", "/metrics")[2].decode()
    assert 'llmux_model_max_in_flight{model="a"} 1' in scrape
    assert 'llmux_request_queue_depth{model="a"} 2' in scrape
    env.gate("a").touch()
    resp1.read()
    conn1.close()
    first.join(T)
    second.join(T)
    assert results[1][0] == results[2][0] == 200
    assert [line for line in env.lines() if line == "req a"] == ["req a"] * 3
    lx.wait_log(r"request method=POST .* model=a status=200", count=3)
    assert lx.health()["models"]["a"] == {"state": "active", "in_flight": 0, "queued": 0,
                                          "max_in_flight": 1}


def test_max_in_flight_grants_in_arrival_order_and_counts_toward_max_queue() -> None:
    cfg = llmux.parse_config({"models": {"a": {"port": 1, "max_in_flight": 2}, "b": {"port": 2}},
                              "policy": {"max_queue": 3, "request_timeout_secs": 10}})
    loop = CheckedLoop()

    async def go() -> None:
        sw = sim_switcher(cfg, {"*": 0.5}, {"*": 0.5})
        held = [await sw.acquire("a"), await sw.acquire("a")]
        order: List[int] = []

        async def wait(i: int) -> llmux.Slot:
            slot = await sw.acquire("a")
            order.append(i)
            return slot
        waiting = [loop.create_task(wait(i)) for i in range(3)]
        await asyncio.sleep(0.1)
        assert sw.status()["models"]["a"] == {"state": "active", "in_flight": 2, "queued": 3,
                                              "max_in_flight": 2}
        with pytest.raises(llmux.LLMuxError) as full:  # the queue is full: 3 wait
            await sw.acquire("a")
        assert full.value.code == "queue_full" and full.value.headers == [("retry-after", "1")]
        held.pop().release()  # one release, one grant, in one pass
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert order == [0] and sw.models["a"].in_flight == 2
        held.pop().release()
        await asyncio.sleep(0.1)
        assert order == [0, 1]  # still two in flight: 2 waits
        (await waiting[0]).release()
        await asyncio.sleep(0.1)
        assert order == [0, 1, 2]
        held = [await t for t in waiting[1:]]
        # A late one waits its request_timeout_secs, then 504, with the model still ACTIVE.
        with pytest.raises(llmux.LLMuxError) as late:
            await sw.acquire("a")
        assert late.value.status == 504 and loop.time() >= 10
        for slot in held:
            slot.release()
        (await sw.acquire("a")).release()
        await sw.close()

    run_checked(go(), loop)


# ─────────────────────────────── proxy and relay, end to end ────────────────────────────


def test_sse_events_reach_the_client_before_the_stream_ends(env: Env) -> None:
    lx = env.start({"a": env.model("a")})
    conn, resp = sse_stream(lx.port, {"model": "a", "stream": True, "n": 3, "hold": str(env.gate("a"))})
    assert resp.status == 200
    assert resp.getheader("content-type") == "text/event-stream"
    assert resp.getheader("transfer-encoding") == "chunked"
    # The backend is blocked on the gate after its first event: that event is here anyway.
    assert json.loads(data_line(resp)[6:]) == {"backend": "a", "i": 0}
    assert "stream-end a" not in env.lines()
    env.gate("a").touch()
    assert resp.read() == (b'\ndata: {"backend": "a", "i": 1}\n\n'
                           b'data: {"backend": "a", "i": 2}\n\ndata: [DONE]\n\n')
    conn.close()


def test_keep_alive_client_and_pooled_backend_connections(env: Env) -> None:
    lx = env.start({"a": env.model("a")})
    conn = lx.conn()
    peers = []
    for _ in range(3):
        conn.request("POST", "/v1/chat/completions", body=json.dumps({"model": "a"}))
        resp = conn.getresponse()
        assert resp.status == 200
        peers.append(json.loads(resp.read())["peer"])
    assert len(set(peers)) == 1, "llmux should reuse its backend connection"
    conn.close()


def test_backend_over_sending_never_leaks_into_the_next_exchange(env: Env) -> None:
    """Regression: bytes past a Content-Length response, in the same read, were dropped
    and the connection pooled; the rest of what the backend sent then became the next
    client's response (here client 1's secret, shown to client 2 in a 502 message)."""
    owed: Dict[int, bytes] = {}

    def answer(conn: int, n: int, method: str, target: str, body: bytes) -> bytes:
        out = owed.pop(conn, b"") + http_reply({"got": target})
        if "oversend" in target:  # the start of an answer to a request nobody sent
            owed[conn] = b'"client-1-secret"}'
            out += b'HTTP/1.1 200 OK\r\ncontent-length: 29\r\n\r\n{"secret": '
        return out

    raw = RawBackend(env.events, answer)
    try:
        lx = env.start({"a": {"port": raw.port}})
        assert lx.request("POST", "/v1/chat/completions?oversend", {"model": "a"})[2] == {
            "got": "/v1/chat/completions?oversend"}
        status, _, payload = lx.request("POST", "/v1/chat/completions?client=2", {"model": "a"})
        assert (status, payload) == (200, {"got": "/v1/chat/completions?client=2"})
        # The second exchange went on a new connection.
        assert [r.split()[1] for r in raw.requests()] == ["0", "1"]
    finally:
        raw.stop()


def test_backend_answering_before_reading_the_body_is_not_reused(env: Env) -> None:
    """Regression: a backend that answers before it has read the request body, then
    reads the body as its next request, got the next client's request appended to it:
    client 2 received the answer to client 1's body."""

    def answer(conn: int, n: int, method: str, target: str, body: bytes) -> bytes:
        return http_reply({"got": f"{method} {target}"[:60]})

    raw = RawBackend(env.events, answer, read_body=False)
    try:
        lx = env.start({"a": {"port": raw.port}})
        # More than the kernel buffers hold while the backend does not read: the answer
        # comes while most of the request is still in llmux's write buffer.
        big = json.dumps({"model": "a", "pad": "x" * 16_000_000}).encode()
        assert lx.request("POST", "/v1/chat/completions?client=1", big)[2] == {
            "got": "POST /v1/chat/completions?client=1"}
        status, _, payload = lx.request("POST", "/v1/chat/completions?client=2", {"model": "a"})
        assert (status, payload) == (200, {"got": "POST /v1/chat/completions?client=2"})
        # (A body small enough to leave llmux's buffer at once cannot be told apart from
        # one the backend read: that backend stays out of step, and no proxy can see it.)
    finally:
        raw.stop()


@pytest.mark.parametrize("status", [b"099", b"000", b"600", b"999"])
def test_a_status_outside_100_to_599_is_an_invalid_answer(status: bytes) -> None:
    """Regression (attack): `HTTP/1.1 099 X` was taken for an interim (1xx) head, and the
    request waited for a final one until upstream_timeout_secs; 600 and 999 went on to
    clients.  RFC 9110 section 15: a status code is 100 to 599."""
    p = llmux.ResponseParser("GET")
    p.feed(b"HTTP/1.1 " + status + b" X\r\ncontent-length: 0\r\n\r\n")
    with pytest.raises(llmux.HTTPError, match="malformed status line") as e:
        p.next_event()
    assert e.value.status == 502


def test_a_head_or_304_answer_announcing_a_body_is_not_reused(env: Env) -> None:
    """Regression (attack, DESIGN invariant 12): a broken engine answers HEAD (or a 304)
    as it would GET, its body following the head.  The connection was pooled at the
    head's end, and the next request on it, any client's, read that stray body as its
    answer: a HEAD or 304 whose head announces a body is not reused."""
    owed: Dict[int, bytes] = {}
    stray = b"HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nSTRAY!"

    def answer(conn: int, n: int, method: str, target: str, body: bytes) -> bytes:
        out = owed.pop(conn, b"")  # the stray body, late: with the next answer
        if method == "HEAD" or "notmod" in target:
            status = b"200 OK" if method == "HEAD" else b"304 Not Modified"
            owed[conn] = stray
            return out + b"HTTP/1.1 %s\r\ncontent-length: %d\r\n\r\n" % (status, len(stray))
        return out + http_reply({"got": target})

    raw = RawBackend(env.events, answer)
    try:
        lx = env.start({"a": {"port": raw.port}})
        for first, method in (("/upstream/a/x?head", "HEAD"), ("/upstream/a/notmod", "GET")):
            status, _, _ = lx.request(method, first)
            assert status in (200, 304)
            status, _, payload = lx.request("POST", "/v1/chat/completions?after", {"model": "a"})
            assert (status, payload) == (200, {"got": "/v1/chat/completions?after"}), payload
        # After each bodyless answer, the next request goes on a new connection.
        assert [r.split(maxsplit=1)[1] for r in raw.requests()] == [
            "0 HEAD /x?head", "1 POST /v1/chat/completions?after", "1 GET /notmod",
            "2 POST /v1/chat/completions?after"]
    finally:
        raw.stop()


def test_a_keep_alive_race_does_not_take_the_model_as_down(env: Env) -> None:
    """Regression (attack): a backend closes a kept-alive connection as llmux reuses it
    (its keep-alive timeout; RFC 9112 9.3 allows it).  The POST on it fails with a 502
    (it is never re-sent), but the model was then taken as down (no alive hook): its
    requests in flight were cut and its wake hook run again.  A new connection is tried
    first: the backend accepts it, so the model stays up."""

    def answer(conn: int, n: int, method: str, target: str, body: bytes) -> Optional[bytes]:
        return http_reply({"got": target}) if n == 0 or conn > 0 else None  # conn 0: read, close

    raw = RawBackend(env.events, answer)
    woke = env.tmp / "woke"
    try:
        lx = env.start({"a": {"port": raw.port, "wake": f"echo x >> {woke}"}})
        conn = lx.conn()
        for target, want in (("/v1/chat/completions?first", 200), ("/v1/chat/completions?second", 502)):
            conn.request("POST", target, body=json.dumps({"model": "a"}))
            resp = conn.getresponse()
            resp.read()
            assert resp.status == want
        conn.close()
        lx.wait_log(r"request method=POST path=/v1/chat/completions model=a status=502")
        assert lx.request("POST", "/v1/chat/completions?third", {"model": "a"})[0] == 200
        lx.wait_log(r"request method=POST path=/v1/chat/completions model=a status=200", 2)
        assert woke.read_text() == "x\n", "the wake hook ran again: the model was taken as down"
        assert lx.log_count("model.died") == 0
    finally:
        raw.stop()


def test_post_is_never_resent_after_a_reused_connection_closed_without_answer(env: Env) -> None:
    """Regression (RFC 9110 9.2.2): a POST on a reused connection that the backend read
    and then closed without answering was sent again on a new connection."""

    def answer(conn: int, n: int, method: str, target: str, body: bytes) -> Optional[bytes]:
        return http_reply({"got": target}) if n == 0 else None  # the 2nd request: read, then close

    raw = RawBackend(env.events, answer)
    try:
        lx = env.start({"a": {"port": raw.port}})
        conn = lx.conn()
        for target, want in (("/v1/chat/completions?first", 200), ("/v1/chat/completions?second", 502)):
            conn.request("POST", target, body=json.dumps({"model": "a"}))
            resp = conn.getresponse()
            payload = json.loads(resp.read())
            assert resp.status == want, payload
        assert payload["error"]["message"].startswith("model 'a' backend failed before answering")
        conn.close()
        assert [r.split(maxsplit=1)[1] for r in raw.requests()] == [
            "0 POST /v1/chat/completions?first", "0 POST /v1/chat/completions?second"]
        # An idempotent request may still be retried once, on a new connection.
        conn = lx.conn()
        for target in ("/v1/x?get1", "/v1/x?get2"):
            conn.request("GET", target, body=json.dumps({"model": "a"}))
            resp = conn.getresponse()
            assert resp.status == 200 and json.loads(resp.read()) == {"got": target}
        conn.close()
        # (Connection 1 was llmux checking, after the 502, that the backend still accepts.)
        assert [r.split(maxsplit=1)[1] for r in raw.requests()][2:] == [
            "2 GET /v1/x?get1", "2 GET /v1/x?get2", "3 GET /v1/x?get2"]
    finally:
        raw.stop()


def _upstream_pair(loop: asyncio.AbstractEventLoop) -> Any:
    """An _Upstream on one end of a connected loopback pair; the other end is the backend."""
    lsock = socket.create_server(("127.0.0.1", 0))
    ours = socket.create_connection(lsock.getsockname())
    theirs, _ = lsock.accept()
    lsock.close()
    ours.setblocking(False)
    return ours, theirs


@pytest.mark.parametrize("meanwhile", ["fin", "reset", "bytes"])
def test_a_request_written_in_its_turn_checks_its_connection_first(meanwhile: str) -> None:
    """Regression (attack): a request waiting its turn holds an idle connection the pool
    checked when it was handed out.  Its turn runs first in a step of the loop, before
    the loop reads what came on that socket meanwhile: a FIN, a reset or stray bytes
    were found only after the request was written (a POST then got a 502, and bytes
    were taken as its answer).  Here the order is forced: the turn's call runs while
    what came is still unread in the kernel; it must not write, and it fails the
    request as never sent, for relay to send it on a new connection."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = _upstream_pair(loop)
        _, conn = await loop.create_connection(lambda: llmux._Upstream(loop, ours), sock=ours)
        conn.reused = True
        turns = llmux.TurnBudget(0, 10.0)  # no budget: the request waits its turn
        waiter = conn.begin("POST", (b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n", b""),
                            T, None, turns)
        assert len(turns.waiting) == 1 and not conn.sent
        if meanwhile == "bytes":
            theirs.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nSTALE")
        elif meanwhile == "reset":
            theirs.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        if meanwhile != "bytes":
            theirs.close()
        _, go = turns.waiting.popleft()
        assert go() is False, "written, though its connection had spoken or closed"  # its turn
        assert not conn.sent and conn.closed
        with pytest.raises(llmux._NotSent):
            await asyncio.wait_for(waiter, T)
        theirs.close()

    run_checked(main())


def test_a_request_waiting_its_turn_is_not_timed_by_the_last_exchange() -> None:
    """Regression (attack): a pooled connection keeps the silence timer of its last
    exchange (it moves, it is not remade).  A request waiting its turn on it was timed
    out at that old deadline, before it was written, and a healthy connection was
    closed (with upstream_timeout_secs under the 4 s of idle reuse, bursts opened new
    connections by the dozen).  A request's silence counts from its write."""
    async def main() -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = _upstream_pair(loop)
        _, conn = await loop.create_connection(lambda: llmux._Upstream(loop, ours), sock=ours)
        conn.timeout = 0.01
        conn._timer.at(loop.time() + 0.01)  # the last exchange's deadline, as it left it
        turns = llmux.TurnBudget(0, 10.0)  # no budget: the request waits its turn
        waiter = conn.begin("POST", (b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n", b""),
                            0.01, None, turns)
        after: "asyncio.Future[None]" = loop.create_future()
        loop.call_at(conn._timer._at + 0.001, after.set_result, None)  # (it fires first)
        await asyncio.wait_for(after, T)
        assert not conn.closed and not waiter.done(), "timed out before it was written"
        _, go = turns.waiting.popleft()
        assert go() is True and conn.sent  # its turn: written, and timed from now
        theirs.recv(65536)
        with pytest.raises(llmux._Timeout):  # the backend says nothing: its own timeout
            await asyncio.wait_for(waiter, T)
        theirs.close()

    run_checked(main())


def test_upstream_answer_before_a_reset_is_read_though_a_write_failed() -> None:
    """Regression: a backend that answered without reading the body and reset the
    connection: when llmux's next write of the body failed first, the transport closed
    without reading, and the answer waiting in the kernel was lost (502, "connection
    closed before a response head"; about half the runs of
    test_backend_that_never_reads_the_body_still_answers).  Here the order is forced:
    reading is paused, so only the failed write can end the connection."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = _upstream_pair(loop)
        _, conn = await loop.create_connection(lambda: llmux._Upstream(loop, ours), sock=ours)
        conn.transport.pause_reading()
        waiter = conn.begin("POST", (b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 8000000\r\n\r\n",
                                     b"x" * 8_000_000), T)
        theirs.recv(65536)
        theirs.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 8\r\n\r\nno-read!")
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        theirs.close()  # a reset: the body it never read is still coming
        resp = await asyncio.wait_for(waiter, T)
        assert resp.status == 200
        sink = llmux._Sink(100)
        await asyncio.wait_for(conn.pipe(sink, False, b""), T)
        assert b"".join(sink.parts) == b"no-read!" and conn.closed

    run_checked(main())


def test_uvloop_mode_may_load_ssl(env: Env, monkeypatch: Any) -> None:
    """Regression (attack): run as the program, llmux blocks the ssl module (it never
    speaks TLS); uvloop imports ssl, so LLMUX_LOOP=uvloop failed with "uvloop is not
    installed" though it was.  A stand-in uvloop that imports ssl as the real one does
    (its policy is asyncio's own, so this runs where uvloop is not installed)."""
    fake = env.tmp / "fake-uvloop" / "uvloop"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("import ssl  # as uvloop's loop module does\n"
                                      "import asyncio\nEventLoopPolicy = asyncio.DefaultEventLoopPolicy\n")
    monkeypatch.setenv("PYTHONPATH", str(fake.parent))
    monkeypatch.setenv("LLMUX_LOOP", "uvloop")
    lx = env.start({"a": env.model("a")})
    assert lx.chat("a")[0] == 200


class _PausingClient:
    """Stands in for the client side of relay() (the attributes of _ClientProtocol it
    uses, and a writer): its buffer fills past ``high`` bytes (pause_writing: the backend
    is paused, as _ClientProtocol does), and drain() empties it (resume_writing)."""

    def __init__(self, high: int) -> None:
        self.responding = self.relayed = self.write_paused = False
        self.upstream: Any = None
        self.high, self.buffered = high, 0
        self.transport = self

    def write(self, data: bytes) -> None:
        self.buffered += len(data)
        if self.buffered > self.high and not self.write_paused:
            self.write_paused = True
            if self.upstream is not None:
                self.upstream.pause()

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, *a: Any, **k: Any) -> None:
        return None

    async def drain(self) -> None:
        if self.write_paused:
            await asyncio.sleep(0.01)
            self.buffered, self.write_paused = 0, False
            if self.upstream is not None:
                self.upstream.resume()


def test_a_backend_connection_paused_by_a_slow_client_is_not_pooled_paused(tmp_path: Path) -> None:
    """Regression (attack): a client whose buffer filled with the answer's last bytes paused
    the backend connection after its exchange had ended, so nothing resumed it; it went
    back to the pool paused, and the next request on it read nothing and hung (its
    silence timeout was paused too)."""
    def answer(conn: int, n: int, method: str, target: str, body: bytes) -> bytes:
        data = b"x" * 100_000 if "/big" in target else b'{"small": 1}'
        return b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(data), data)

    raw = RawBackend(tmp_path / "events", answer)

    async def main() -> None:
        pool = llmux.UpstreamPool(llmux.Log(ListStream()))
        head = lambda target: llmux.RequestHead("GET", target, "HTTP/1.1", [("host", "x")], True, False)  # noqa: E731
        slow = _PausingClient(64 * 1024)
        first = await llmux.relay(pool, "a", raw.port, head("/big"), b"", slow, 2.0, slow)  # type: ignore[arg-type]
        assert first.status == 200
        fast = _PausingClient(1 << 30)
        second = await asyncio.wait_for(llmux.relay(pool, "a", raw.port, head("/small"), b"", fast, 2.0,  # type: ignore[arg-type]
                                                    fast), T)
        assert second.status == 200 and fast.buffered > 0
        pool.close_all()

    try:
        run_checked(main())
    finally:
        raw.stop()


def test_a_reset_client_connection_leaves_no_unretrieved_future() -> None:
    """Regression (seen once under load, test_a_connect_flood_is_refused_without_taking_every_fd):
    a client's reset lives on in StreamReaderProtocol's closed-future, which only the
    protocol's __del__ retrieved; when the collector finalized the future first, asyncio
    logged "Future exception was never retrieved" and llmux an internal.error.  Here
    the future outlives the protocol, as it may inside a collected cycle."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = llmux.Server(llmux.parse_config({"models": {"a": {"port": 9}}}), llmux.Log(ListStream()))
        proto = llmux._ClientProtocol(server)
        a, b = socket.socketpair()
        transport, _ = await loop.connect_accepted_socket(lambda: proto, a)
        proto.connection_lost(ConnectionResetError(104, "Connection reset by peer"))
        closed = proto._closed
        proto._closed = loop.create_future()  # its __del__ now looks at another future
        proto._closed.set_result(None)
        del proto, closed
        gc.collect()
        transport.abort()
        b.close()
        await asyncio.sleep(0)

    run_checked(main())


def test_upstream_silence_timeout_follows_a_lowered_timeout_on_a_reused_connection() -> None:
    """Regression (attack): the silence timer is left running between exchanges on a
    pooled connection; after a reload lowered upstream_timeout_secs from 10 to 1, the next
    exchange on that connection timed out at 10 s (saying "1s").  Virtual time."""
    loop = llmux.VirtualTimeLoop()

    async def main() -> None:
        ours, theirs = _upstream_pair(loop)
        _, conn = await loop.create_connection(lambda: llmux._Upstream(loop, ours), sock=ours)
        request = (b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", b"")
        waiter = conn.begin("GET", request, 10.0)
        conn.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        await waiter
        await conn.pipe(llmux._Sink(10), False, b"")
        assert conn.in_sync
        started = loop.time()
        with pytest.raises(llmux._Timeout):
            await conn.begin("GET", request, 1.0)  # the backend stays silent
        assert loop.time() - started == pytest.approx(1.0, abs=0.05)
        conn.close()
        theirs.close()

    run_checked(main(), loop)


def test_json_quick_path_leaves_many_model_strings_to_the_scanner() -> None:
    """Regression (attack): the json.loads path ignored the scanner's bound on "model" and
    "stream" strings, so a small body with 1,400 of them was routed when it named a plain
    model and refused (400) when its model had an upstream_model (the rewrite runs the
    scanner): one body, two answers.  Now both are the scanner's."""
    body = json.dumps({"model": "al", "x": ["model"] * 1400}).encode()
    assert len(body) <= llmux.JSON_QUICK_BYTES
    assert llmux._json_model_quick(body) is False
    with pytest.raises(ValueError, match='"model" or "stream" strings'):
        _run_steps(llmux._json_model_scan(body))


def test_upstream_body_waits_for_pipe_when_the_backend_closes_first() -> None:
    """Regression: head, body and EOF all arriving before relay() called pipe(): the EOF
    ran the parser on, dropped the body (no client yet), and pipe()'s future never
    resolved: the request hung."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = _upstream_pair(loop)
        _, conn = await loop.create_connection(lambda: llmux._Upstream(loop, ours), sock=ours)
        waiter = conn.begin("POST", (b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n", b""), T)
        conn.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
        conn.eof_received()
        conn.connection_lost(None)  # before relay() runs again
        assert (await asyncio.wait_for(waiter, T)).status == 200
        sink = llmux._Sink(100)
        await asyncio.wait_for(conn.pipe(sink, False, b"H"), T)
        assert b"".join(sink.parts) == b"Hhello"
        theirs.close()

    run_checked(main())


def test_backend_head_goes_to_the_client_as_it_comes() -> None:
    """Issue 11: with an _Answer, the backend's head (re-written for the client) and the
    body after it are written to the client from the backend connection's own callback,
    while the relaying task still waits: no task switch per request, and in a burst an
    answer does not wait for a turn of the loop.  The future resolves at the body's end.
    Without an _Answer (a held stream) the head still goes to the task first."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = _upstream_pair(loop)
        _, conn = await loop.create_connection(lambda: llmux._Upstream(loop, ours), sock=ours)
        request = (b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\n\r\n", b"")
        sink = llmux._Sink(1 << 16)
        waiter = conn.begin("POST", request, T, llmux._Answer(
            cast(asyncio.WriteTransport, sink), False, True, [("vary", "origin")], None))
        conn.data_received(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                           b"transfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        out = b"".join(sink.parts)
        assert out.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nvary: origin\r\n" in out
        assert b"\r\ntransfer-encoding: chunked\r\n" in out and out.endswith(b"\r\n\r\n5\r\nhello\r\n")
        assert conn.answering and conn.keep_client and not waiter.done()
        conn.data_received(b"0\r\n\r\n")
        assert waiter.done() and waiter.result() is None and conn.in_sync
        assert b"".join(sink.parts).endswith(b"5\r\nhello\r\n0\r\n\r\n")
        # An unexpected error while relaying (here a header that cannot be encoded) ends
        # the exchange with it at once: the relay raises it (a 500, logged), instead of
        # waiting for the silence timeout.
        waiter = conn.begin("POST", request, T, llmux._Answer(
            cast(asyncio.WriteTransport, llmux._Sink(100)), False, True, [("x-bad", "\u0436")], None))
        conn.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi")
        assert waiter.done() and isinstance(waiter.exception(), UnicodeEncodeError) and conn.closed
        ours, theirs = _upstream_pair(loop)
        _, conn = await loop.create_connection(lambda: llmux._Upstream(loop, ours), sock=ours)
        # Without one: the head resolves the future and nothing reaches a client yet.
        waiter = conn.begin("GET", request, T)
        conn.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi")
        assert waiter.done() and waiter.result().status == 200 and not conn.answering
        conn.close()
        theirs.close()

    run_checked(main())


def test_pool_hands_out_only_connections_in_sync_and_young() -> None:
    """An idle connection the backend closed, reset or wrote to, before the loop has
    seen it, is not reused; nor one idle longer than UPSTREAM_IDLE_REUSE_SECS, nor one
    whose exchange did not end in sync."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        lsock = socket.create_server(("127.0.0.1", 0))
        lsock.setblocking(False)
        port = lsock.getsockname()[1]
        pool = llmux.UpstreamPool(llmux.Log(ListStream()))
        accepted: List[socket.socket] = []

        async def get() -> Any:
            conn = await pool.get(port, "a")
            if not conn.reused:
                accepted.append((await asyncio.wait_for(loop.sock_accept(lsock), T))[0])
            return conn

        def put(conn: Any) -> None:
            conn.in_sync = True  # as after a response that ended exactly at its framing
            pool.put(port, conn)

        def readable(conn: Any) -> None:  # the kernel has it; the loop has not run since
            assert select.select([conn.transport.get_extra_info("socket").fileno()], [], [], T)[0]

        c1 = await get()
        put(c1)
        assert await get() is c1 and c1.reused
        put(c1)
        accepted[-1].close()  # EOF
        readable(c1)
        c2 = await get()
        assert c2 is not c1 and not c2.reused and c1.closed
        put(c2)
        accepted[-1].setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        accepted[-1].close()  # reset
        readable(c2)
        c3 = await get()
        assert c3 is not c2 and c2.closed
        put(c3)
        accepted[-1].sendall(b"H")  # a stray byte while idle
        readable(c3)
        c4 = await get()
        assert c4 is not c3 and c3.closed
        put(c4)
        c4.idle_since -= llmux.UPSTREAM_IDLE_REUSE_SECS + 0.5
        c5 = await get()
        assert c5 is not c4 and c4.closed
        c5.in_sync = False
        pool.put(port, c5)
        assert c5.closed
        pool.close_all()
        await asyncio.sleep(0)
        for s in accepted:
            s.close()
        lsock.close()

    run_checked(main())


def test_headers_are_forwarded_minus_hop_by_hop(env: Env) -> None:
    lx = env.start({"a": env.model("a")})
    status, _, payload = lx.request(
        "POST", "/v1/chat/completions?x=1", {"model": "a", "echo": True},
        {"Authorization": "Bearer sk-1", "X-Custom": "v", "Connection": "keep-alive, X-Drop",
         "X-Drop": "secret", "Keep-Alive": "timeout=5", "Content-Type": "application/json"})
    assert status == 200
    headers = dict(payload["headers"])
    assert payload["path"] == "/v1/chat/completions?x=1"
    assert headers["authorization"] == "Bearer sk-1" and headers["x-custom"] == "v"
    assert "x-drop" not in headers and "keep-alive" not in headers
    assert headers["host"] == f"127.0.0.1:{env.backends['a'].port}"
    assert json.loads(payload["body"]) == {"model": "a", "echo": True}


def test_chunked_request_body(env: Env) -> None:
    lx = env.start({"a": env.model("a")})
    body = b'{"model": "a", "echo": true, "pad": "' + b"x" * 5000 + b'"}'
    chunks = b"".join(llmux.encode_chunk(body[i:i + 1000]) for i in range(0, len(body), 1000))
    reply = raw_exchange(lx.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                  b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n")
    head, _, rest = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ")
    assert json.loads(rest)["body"].encode() == body


def test_expect_100_continue(env: Env) -> None:
    lx = env.start({"a": env.model("a")})
    body = b'{"model": "a"}'
    with socket.create_connection(("127.0.0.1", lx.port), timeout=T) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                  b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body))
        assert s.recv(1024) == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(body)
        reply = b""
        while True:
            piece = s.recv(65536)
            if not piece:
                break
            reply += piece
    assert reply.startswith(b"HTTP/1.1 200 ") and b'"backend": "a"' in reply


def test_http10_client_streaming_reads_until_close(env: Env) -> None:
    lx = env.start({"a": env.model("a")})
    assert lx.chat("a")[0] == 200  # awake: the stream is the backend's alone
    body = b'{"model": "a", "stream": true, "n": 2}'
    reply = raw_exchange(lx.port, b"POST /v1/chat/completions HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
    head, _, rest = reply.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower() and b"connection: close" in head.lower()
    assert rest == b'data: {"backend": "a", "i": 0}\n\ndata: {"backend": "a", "i": 1}\n\ndata: [DONE]\n\n'


def test_pipelined_requests_are_answered_in_order(env: Env) -> None:
    lx = env.start({"a": env.model("a")})
    one = b'{"model": "a", "echo": true, "n": 1}'
    two = b'{"model": "a", "echo": true, "n": 2}'
    req = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n%s\r\n%s"
    reply = raw_exchange(lx.port, req % (len(one), b"", one) + b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
                         + req % (len(two), b"Connection: close\r\n", two))
    bodies = [json.loads(part.split(b"\r\n\r\n", 1)[1].split(b"HTTP/1.1")[0])
              for part in reply.split(b"HTTP/1.1 200 OK\r\n")[1:]]
    assert json.loads(bodies[0]["body"])["n"] == 1
    assert bodies[1]["status"] == "ok"
    assert json.loads(bodies[2]["body"])["n"] == 2


def test_model_from_multipart_form_data(env: Env) -> None:
    lx = env.start({"whisper": env.model("whisper")})
    boundary = "XyZ123"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            f"Content-Type: audio/wav\r\n\r\nRIFF....\r\n--{boundary}\r\n"
            f"Content-Disposition: form-data; name=\"model\"\r\n\r\nwhisper\r\n--{boundary}--\r\n").encode()
    status, _, payload = lx.request("POST", "/v1/audio/transcriptions", body,
                                    {"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200 and payload["backend"] == "whisper"


def model_for(body: bytes, content_type: str = "application/json") -> str:
    """Server._model_for on a real Server, for a body: the name of the model it routes to."""
    cfg = llmux.parse_config({"models": {"a": {"port": 8001}, "b": {"port": 8002, "aliases": ["model-b"]}}})
    head = llmux.RequestHead("POST", "/v1/chat/completions", "HTTP/1.1",
                             [("host", "x"), ("content-type", content_type)], True, False)

    async def go() -> str:
        server = llmux.Server(cfg, llmux.Log(ListStream()))
        result = server._model_for(head, body)
        if asyncio.iscoroutine(result):
            result = await result
        return result.name

    return run_checked(go())


def run_child(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` with llmux imported in a child Python, killed after T seconds: work
    that is quadratic in its input never ends there, and cannot hang the session."""
    return subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                           "import llmux\n" + code, str(HERE)], capture_output=True, text=True, timeout=T)


@pytest.mark.parametrize("line", [
    "b'X: a' + b' ' * 200_000 + b'b\\x01'",  # an invalid character after a run of spaces
    "b'X:' + b' \\t' * 100_000 + b'a' + b' ' * 100_000 + b'\\x01'",  # and before it too
    "b'X: ' + b' a' * 100_000 + b'\\x7f'",
])
def test_a_bad_header_line_is_judged_in_linear_time(line: str) -> None:
    # Regression (attack): the line regex's lazy value and its optional whitespace around
    # it backtracked quadratically on a failing line: 60,000 spaces and one control byte
    # froze the event loop for 17 s, in a request head or (keep-alive) a chunked trailer
    # (at most 16 KiB: 1 s a request).
    p = run_child(f"line = {line}\n"
                  "for parse in (lambda: llmux._parse_fields([line]), "
                  "lambda: llmux._field_block(line + b'\\r\\n')):\n"
                  "    try:\n"
                  "        parse()\n"
                  "    except llmux.HTTPError as e:\n"
                  "        print(e)\n"
                  "parser = llmux.RequestParser()\n"
                  "parser.feed(b'POST / HTTP/1.1\\r\\nHost: x\\r\\nTransfer-Encoding: chunked\\r\\n\\r\\n'\n"
                  "            b'0\\r\\n' + line[:8000] + line[-1:] + b'\\r\\n\\r\\n')\n"
                  "try:\n"
                  "    while parser.next_event() is not llmux.EndOfMessage:\n"
                  "        pass\n"
                  "except llmux.HTTPError as e:\n"
                  "    print(e)\n")
    assert p.returncode == 0 and p.stdout == "invalid character in header 'X'\n" * 3, (p.stdout, p.stderr)


def test_a_multipart_delimiter_is_found_in_linear_time() -> None:
    # Regression (attack, Python 3.8/3.9): bytes.find is O(n*m) there on a needle of
    # dashes in a haystack of slightly longer runs of them: a boundary of 30,000 dashes
    # and a 4 MB body froze the loop for 8 s.  Boundaries are at most 70 characters (RFC
    # 2046), and the search itself is linear on every Python (16 MB here: minutes before).
    p = run_child("needle = b'-' * 30002\n"
                  "body = (b'-' * 30001 + b'x') * 530 + needle\n"
                  "print(llmux._find(body, needle, 0) == len(body) - len(needle), llmux._find(body, b'--x', 5))\n")
    assert p.returncode == 0 and p.stdout == "True 29999\n", (p.stdout, p.stderr)
    ok = "multipart/form-data; boundary=" + "b" * 70
    assert llmux._multipart_boundary(ok) == b"b" * 70
    with pytest.raises(llmux.HTTPError, match="boundary of 71 characters; expected at most 70"):
        llmux._multipart_boundary(ok + "b")


def test_multipart_model_field_is_found_in_linear_time() -> None:
    # Regression: a part head repeating `content-disposition:;` made the name= regex
    # backtrack quadratically on the event loop (400 KB: tens of seconds; this: days).
    p = run_child("head = b'content-disposition:;' * 400_000\n"
                  "body = b'--B\\r\\n' + head + b'\\r\\n\\r\\nx\\r\\n--B\\r\\n"
                  "content-disposition: form-data; name=\"model\"\\r\\n\\r\\nb\\r\\n--B--\\r\\n'\n"
                  "print(llmux._model_from_multipart('multipart/form-data; boundary=B', body))")
    assert p.returncode == 0 and p.stdout == "b\n", p.stderr


@pytest.mark.parametrize("content_type, body, expected", [
    ('multipart/form-data; boundary="a b:c=d"', b'--a b:c=d\r\nContent-Disposition: form-data; name="model"\r\n\r\nb\r\n--a b:c=d--', "b"),
    ("multipart/form-data; Boundary=B", b"--B\r\ncontent-disposition: form-data; name=model\r\n\r\nmodel-b\r\n--B--", "b"),
    # The last model field wins, as in the engines' form parsers (Starlette).
    ("multipart/form-data; boundary=B", b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\na\r\n'
     b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\nb\r\n--B--\r\n', "b"),
    # A field called "model_x", or "model" only in the filename, is not the model field.
    ("multipart/form-data; boundary=B", b'--B\r\nContent-Disposition: form-data; name="model_x"\r\n\r\nb\r\n'
     b'--B\r\nContent-Disposition: form-data; name="f"; filename="model"\r\n\r\nb\r\n'
     b'--B\r\nContent-Disposition: form-data; name="model"\r\n\r\na\r\n--B--\r\n', "a"),
])
def test_multipart_model_field_shapes(content_type: str, body: bytes, expected: str) -> None:
    assert model_for(body, content_type) == expected


def test_multipart_with_too_many_parts_or_no_boundary_is_a_400() -> None:
    body = b"--B\r\n\r\nx\r\n" * (llmux.MULTIPART_MAX_PARTS + 1) + b"--B--"
    with pytest.raises(llmux.HTTPError) as info:
        model_for(body, "multipart/form-data; boundary=B")
    assert info.value.message == "multipart/form-data body has more than 128 parts; expected at most 128"
    with pytest.raises(llmux.HTTPError, match="multipart/form-data without a boundary"):
        model_for(body, "multipart/form-data")


@pytest.mark.parametrize("body, expected", [
    (b'{"model": "a", "model": "b"}', "b"),  # the last one, as json.loads and the engines
    (b'{"\\u006dodel": "b"}', "b"),  # an escaped key is the same key
    (b'{"model": "a", "\\u006d\\u006f\\u0064\\u0065\\u006c": "model-b"}', "b"),
    (b'\xef\xbb\xbf {"model": "b"}', "b"),  # a UTF-8 BOM, as json.loads(bytes) allows
    ('{"model": "b"}'.encode("utf-16"), "b"),
    (b'{"x": {"model": "a"}, "y": ["model", "a"], "z": "\\"model\\": \\"a\\"", "model": "b"}', "b"),
    (b'{"x": "[{]", "model": "b", "w": [{"model": "a"}]}', "b"),  # brackets in strings are text
    (b'{"model":"\\u0062"}', "b"),
])
def test_json_model_is_the_last_top_level_member(body: bytes, expected: str) -> None:
    assert model_for(body) == expected


def test_json_model_is_found_across_the_scanner_window_edges() -> None:
    # The scanner's regex sees a window at a time: a "model" key cut by its edge, or far
    # from its colon, must still be found (and a long value still skipped).
    window = llmux.JSON_SCAN_WINDOW
    for gap in (" ", " " * (window + 10)):
        for shift in range(-40, 12):
            body = ('{"p": "' + "x" * (window - 12 + shift) + '", "\\u006dodel"' + gap + ': "b", '
                    '"q": "' + "y" * (window + shift) + '", "model": 1, "model"' + gap + ':"model-b"}').encode()
            assert llmux._json_model(body) == "model-b", (len(gap), shift)
            assert model_for(body) == "b"


def test_a_long_string_is_scanned_in_bounded_steps() -> None:
    """Regression (bench/overhead.py, issue 11): a 20 MB base64 image string was searched
    for its closing quote in one step of the scanner, which runs on the event loop: ~6 ms
    added to every stream's next chunk.  Now one step covers JSON_STRING_STEP bytes."""
    size = 8 * llmux.JSON_STRING_STEP
    body = json.dumps({"messages": [{"content": "A" * size}], "model": "a"}).encode()
    steps = llmux._json_model_steps(body)
    yields = 0
    while True:
        try:
            next(steps)
            yields += 1
        except StopIteration as done:
            assert done.value == "a"
            break
    assert yields >= size // llmux.JSON_STRING_STEP, yields


def test_json_model_scan_keeps_memory_bounded() -> None:
    # Regression: json.loads, run only to read `model`, built the whole document: a body
    # of many small objects peaked at ~27 times its size.
    import tracemalloc
    body = json.dumps({"data": [{"a": 1, "b": [2]} for _ in range(400_000)], "model": "b"}).encode()
    tracemalloc.start()
    try:
        assert model_for(body) == "b"
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < len(body), f"peak {peak} bytes for a {len(body)}-byte body"


def test_json_model_scan_is_linear_on_hostile_strings() -> None:
    # Long runs of backslashes and escaped quotes, brackets in strings, deep nesting:
    # linear work finishes in well under a second; quadratic work would not finish.
    p = run_child("body = (b'{\"a\": \"' + b'\\\\' * 2_000_000 + b'\\\\\\\"' * 2_000_000 + b'\", '\n"
                  "        b'\"b\": [' + b'\"[\",' * 500_000 + b'1], \"c\": ' + b'[' * 1_000_000 + b']' * 1_000_000 + b', '\n"
                  "        b'\"model\": \"x\"}')\n"
                  "import json; assert json.loads(body.replace(b'[' * 1_000_000 + b']' * 1_000_000, b'1'))['model'] == 'x'\n"
                  "print(llmux._json_model(body))")
    assert p.returncode == 0 and p.stdout == "x\n", p.stderr


@pytest.mark.parametrize("body, status, code, message", [
    (b"{nope", 400, "invalid_json", "request body is not valid JSON: "),
    (b'{"messages": []}', 400, "missing_model", "request has no 'model' field; expected the name of a model"),
    (b'["a"]', 400, "missing_model", "request body is an array; expected a JSON object with a 'model' field"),
    (b'"a"', 400, "missing_model", "request body is a string; expected a JSON object with a 'model' field"),
    (b'{"model": 5}', 400, "missing_model", "request's 'model' field is a number; expected the name of a model"),
    (b'{"model": {"a": 1}}', 400, "missing_model", "request's 'model' field is an object; expected the name of a model"),
    (b'{"model": "a"', 400, "invalid_json", "request body is not valid JSON: the top-level object is not closed"),
    (b'{"model": "a', 400, "invalid_json", "request body is not valid JSON: unterminated string"),
    # Regression: json.loads recursed once per level, and this raised RecursionError (a 500).
    (b'{"x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", 400, "missing_model",
     "request has no 'model' field; expected the name of a model"),
    (b"", 400, "missing_model", "POST /v1/chat/completions has no body; expected a JSON object with a 'model' field"),
    (b'{"model": "gpt-9"}', 404, "model_not_found", "model 'gpt-9' does not exist; available models: a, b"),
], ids=["not-json", "no-model", "array", "string", "model-number", "model-object", "unclosed",
        "unterminated", "deep-nesting", "empty", "unknown-model"])
def test_bad_requests_get_openai_style_errors(env: Env, body: bytes, status: int, code: str, message: str) -> None:
    lx = env.start({"a": env.model("a"), "b": env.model("b")})
    got, headers, payload = lx.request("POST", "/v1/chat/completions", body)
    assert got == status and headers["content-type"] == "application/json"
    assert payload["error"]["code"] == code and payload["error"]["message"].startswith(message)
    assert payload["error"]["type"] == "invalid_request_error"
    assert env.lines() == []  # nothing woke


@pytest.mark.parametrize("raw, status", [
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2000\r\n\r\n", 413),
    # The body keeps coming after the 413: without a lingering close the kernel resets the
    # connection over the unread bytes and the client never sees its answer.
    (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n" + b"x" * 200000, 413),
    (b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03", 400),
], ids=["te-and-cl", "gzip", "too-large", "too-large-body-sent", "tls"])
def test_bad_http_gets_a_json_error_and_close(env: Env, raw: bytes, status: int) -> None:
    lx = env.start({"a": env.model("a")}, http={"max_body_bytes": 1000})
    reply = raw_exchange(lx.port, raw)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status)
    assert b"connection: close" in head
    assert set(json.loads(body)["error"]) == {"message", "type", "code"}
    assert lx.chat("a")[0] == 200  # the server is fine


def test_an_enormous_unknown_model_name_is_not_echoed_back(env: Env) -> None:
    """Regression: the 404 quoted the requested name whole: a 60 MB "model" string made
    a 60 MB error answer and log line."""
    lx = env.start({"a": env.model("a")})
    status, headers, payload = lx.request("POST", "/v1/chat/completions",
                                          {"model": "x" * 1000, "messages": []})
    message = payload["error"]["message"]
    assert status == 404 and len(message) < 400, len(message)
    assert message == "model '" + "x" * 256 + "... (1000 characters)' does not exist; " \
                      "available models: a"  # longer names are not even read: a 400
    assert max(len(line) for line in lx.lines) < 4096


def test_models_and_health_routes(env: Env) -> None:
    lx = env.start({"a": env.model("a"), "b": env.model("b")})
    status, _, payload = lx.request("GET", "/v1/models")
    assert status == 200 and [m["id"] for m in payload["data"]] == ["a", "b"]
    assert payload["object"] == "list" and payload["data"][0]["object"] == "model"
    assert lx.request("GET", "/v1/models/b")[2]["id"] == "b"
    assert lx.request("GET", "/v1/models/zz")[0] == 404
    health = lx.health()
    assert health["status"] == "ok" and health["state"] == "idle" and health["active"] == []


def test_percent_encoded_paths_route_and_the_backend_gets_the_target_as_sent(env: Env) -> None:
    """Regression: paths were never percent-decoded, so a model named like a Hugging Face
    repo could not be retrieved (the openai client sends models/org%2Fname) or controlled."""
    name = "meta-llama/Llama-3-8B"
    lx = env.start({name: env.model("a")})
    for target in ("/v1/models/meta-llama%2FLlama-3-8B", "/v1/models/meta-llama%2fLlama-3-8B?x=1",
                   "/v1/models/meta-llama/Llama-3-8B", "/v1/models/%6Deta-llama%2FLlama-3-8B"):
        status, _, payload = lx.request("GET", target)
        assert (status, payload["id"]) == (200, name), target
    status, _, payload = lx.request("POST", "/llmux/models/meta-llama%2FLlama-3-8B/wake")
    assert (status, payload) == (200, {"model": name, "state": "active", "changed": True})
    assert lx.request("POST", "/llmux/models/meta-llama/Llama-3-8B/sleep")[2]["state"] == "asleep"
    status, _, payload = lx.request("POST", "/v1/chat/completions%3F?x=%2F%zz", {"model": name, "echo": True})
    assert (status, payload["path"]) == (200, "/v1/chat/completions%3F?x=%2F%zz")  # byte-identical
    for target, got in (("/v1/models/%zz", "'%zz'"), ("/v1/models/a%2", "'%2'"), ("/v1/x%", "'%'")):
        status, _, payload = lx.request("GET", target)
        assert (status, payload["error"]) == (400, {
            "message": f"invalid percent-escape in request path; expected '%' and two hex digits; got {got}",
            "type": "invalid_request_error", "code": "invalid_path"}), target
    status, _, payload = lx.request("GET", "/v1/models/%ff")
    assert status == 400 and payload["error"]["message"] == (
        "invalid request path; expected UTF-8 after percent-decoding; got '/v1/models/%ff'")
    status, _, payload = lx.request("GET", "/llmux/nothing")  # llmux's namespace: never proxied
    assert status == 404 and payload["error"]["code"] == "not_found"
    assert lx.request("POST", "/llmux/status")[0] == 405
    assert "req a" in env.lines() and env.lines().count("req a") == 1


def test_route_path() -> None:
    cases = {"/health": "/health", "/health?x=%zz": "/health", "/%68ealth": "/health",
             "http://h/health?x": "/health", "HTTPS://h:1/a%2Fb": "/a/b", "http://h": "/",
             "http://h?x": "/", "//health": "//health", "/HEALTH/": "/HEALTH/", "*": "*",
             "/caf%C3%A9": "/caf\u00e9", "/%2568": "/%68", "/a%3Fb": "/a?b"}
    assert {t: llmux.route_path(t) for t in cases} == cases
    for bad in ("/%", "/%g0", "/%0", "/%c3", "/a%%41"):
        with pytest.raises(llmux.HTTPError):
            llmux.route_path(bad)


def test_backend_refusing_gives_502(env: Env) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    try:
        lx = env.start({"a": {"port": closed.getsockname()[1]}})
        status, payload = lx.chat("a")
        assert status == 502
        assert payload["error"]["code"] == "upstream_unavailable"
        assert payload["error"]["message"].startswith(
            f"model 'a' backend at 127.0.0.1:{closed.getsockname()[1]} is not reachable: ")
    finally:
        closed.close()


def test_pool_connects_without_a_task_and_times_out_a_connect_that_hangs() -> None:
    """A new backend connection (the pool empty, as after a switch): no task of its own
    (asyncio.wait_for made one before 3.12); refused at once gives OSError's 502; a backend
    whose accept queue is full (its SYNs dropped: the connect never completes) gives the
    504 after UPSTREAM_CONNECT_TIMEOUT (virtual time), its writer callback and timer gone."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        pool = llmux.UpstreamPool(llmux.Log(stream=ListStream()))
        listener = socket.create_server(("127.0.0.1", 0))
        tasks: List[int] = []

        async def get() -> Any:
            got = loop.create_task(pool.get(listener.getsockname()[1], "a"))
            await asyncio.sleep(0)
            tasks.append(len(asyncio.all_tasks()))
            return await got

        conn = await get()  # (no wait_for here: a task of its own before 3.12)
        assert tasks == [2] and conn.transport is not None and not conn.reused  # main, got
        conn.close()
        listener.close()
        refused = socket.socket()
        refused.bind(("127.0.0.1", 0))  # bound, never listening
        with pytest.raises(llmux.UpstreamError, match="is not reachable: connection refused"):
            await pool.get(refused.getsockname()[1], "a")
        refused.close()
        full = socket.socket()
        full.bind(("127.0.0.1", 0))
        full.listen(0)  # one connection queued, never accepted: the next ones hang
        port = full.getsockname()[1]
        first = socket.socket()
        first.setblocking(False)
        first.connect_ex(("127.0.0.1", port))
        began = loop.time()
        with pytest.raises(llmux.UpstreamError, match="did not accept a connection within 10s"):
            await pool.get(port, "a")
        assert loop.time() - began == pytest.approx(llmux.UPSTREAM_CONNECT_TIMEOUT, abs=1.0)
        assert not [h for h in getattr(loop, "_scheduled", []) if not h.cancelled()]
        selector = getattr(loop, "_selector")
        assert all(key.fileobj is not first for key in selector.get_map().values())
        assert len(selector.get_map()) == 1  # the loop's own self-pipe: no writer is left
        first.close()
        full.close()

    run_checked(main(), llmux.VirtualTimeLoop())


def test_pool_out_of_fds_gives_up_its_idle_connections_and_sweeps_old_ones() -> None:
    """Regression (attack): idle pooled connections counted against no fd budget and were
    closed only when their own port was asked for again, so a burst to another model hit
    EMFILE at socket(), outside the pool's error handling (500s, internal.error).  Out of
    fds, the pool closes its idle connections and tries once more, then answers a 503
    naming the cause; idle connections too old to be reused are closed on a timer."""

    async def main() -> None:
        pool = llmux.UpstreamPool(llmux.Log(stream=ListStream()))
        a, b = socket.create_server(("127.0.0.1", 0)), socket.create_server(("127.0.0.1", 0))
        pa, pb = a.getsockname()[1], b.getsockname()[1]

        async def pooled(port: int) -> Any:
            conn = await pool.get(port, "m")
            waiter = conn.begin("GET", (b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", b""), T)
            conn.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            await waiter
            await conn.pipe(llmux._Sink(10), False, b"")
            assert conn.in_sync
            pool.put(port, conn)
            return conn

        idle = [await pooled(pa) for _ in range(3)]
        with ExhaustedFds():
            conn = await pool.get(pb, "b")  # the idle ones go: their fds are this one's
            assert conn.transport is not None and all(c.closed for c in idle)
            conn.close()
            await asyncio.sleep(0)  # its socket closes
        with ExhaustedFds():
            with pytest.raises(llmux.UpstreamError) as e:
                await pool.get(pb, "b")  # nothing idle left to give up
        assert (e.value.status, e.value.code) == (503, "too_many_open_files")
        assert "too many open files" in e.value.message
        idle = [await pooled(pa) for _ in range(2)]
        await asyncio.sleep(llmux.UPSTREAM_IDLE_REUSE_SECS / 2)
        idle.append(await pooled(pb))
        await asyncio.sleep(llmux.UPSTREAM_IDLE_REUSE_SECS / 2 + 0.01)
        assert [c.closed for c in idle] == [True, True, False]  # too old to reuse: closed
        await asyncio.sleep(llmux.UPSTREAM_IDLE_REUSE_SECS)
        assert idle[2].closed and pool._idle == {}
        a.close()
        b.close()

    run_checked(main(), llmux.VirtualTimeLoop())


async def _pooled(pool: Any, port: int, n: int) -> List[Any]:
    """``n`` connections to ``port`` through ``pool``, one exchange each done in step, then
    all put back idle."""
    conns = [await pool.get(port, "m") for _ in range(n)]
    for conn in conns:
        waiter = conn.begin("GET", (b"GET / HTTP/1.1\r\nhost: x\r\n\r\n", b""), T)
        conn.data_received(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        await waiter
        await conn.pipe(llmux._Sink(10), False, b"")
        assert conn.in_sync
    for conn in conns:
        pool.put(port, conn)
    return conns


def test_out_of_fds_every_request_of_a_burst_gets_the_fds_given_up() -> None:
    """Regression (attack): the first request out of fds closed the idle connections, but
    their fds are freed only in the loop's next turn: the burst's other requests, finding
    nothing idle, got 503 at once.  Each tries once more after that turn."""

    async def main() -> None:
        pool = llmux.UpstreamPool(llmux.Log(stream=ListStream()))
        a, b = socket.create_server(("127.0.0.1", 0)), socket.create_server(("127.0.0.1", 0))
        idle = await _pooled(pool, a.getsockname()[1], 4)
        with ExhaustedFds():
            got = await asyncio.gather(*(pool.get(b.getsockname()[1], "b") for _ in range(3)),
                                       return_exceptions=True)
            for c in got:
                if not isinstance(c, BaseException):
                    c.close()
            await asyncio.sleep(0)
        assert not [c for c in got if isinstance(c, BaseException)], got  # (fds back: pytest
        assert all(c.closed for c in idle)  # can read its files to report a failure)
        a.close()
        b.close()

    run_checked(main())


def test_out_of_fds_accepting_gives_up_idle_backend_connections() -> None:
    """Regression (attack): idle backend connections held the fds accept() needed, and a
    health check waited seconds (until they aged out).  Out of fds, accepting pauses and
    gives them up: the next accept has fds."""
    stream = ListStream()

    async def go() -> None:
        cfg = llmux.parse_config({"models": {"a": {"port": 1}}})
        server = llmux.Server(cfg, llmux.Log(stream))
        port = await server.start("127.0.0.1", 0, sock=socket.create_server(("127.0.0.1", 0)))
        backend = socket.create_server(("127.0.0.1", 0))
        loop = asyncio.get_running_loop()
        try:
            idle = await _pooled(server.pool, backend.getsockname()[1], 4)
            client = socket.create_connection(("127.0.0.1", port), timeout=T)
            client.setblocking(False)
            with ExhaustedFds():  # the client waits in the backlog; accept() fails at first
                await log_shows(stream, r"warning accept\.paused reason=\"too many open files\"")
                await loop.sock_sendall(client, b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
                try:
                    answer = await asyncio.wait_for(loop.sock_recv(client, 65536), T)
                except asyncio.TimeoutError:
                    answer = b"(none)"
            assert answer.startswith(b"HTTP/1.1 200 OK"), answer  # (fds back, as above)
            assert all(c.closed for c in idle)
            # Given up for the accept, not aged out (the sweep, 4 s on, says nothing).
            assert [line for line in stream.lines if "upstream.fds" in line and "closed_idle=4" in line]
            client.close()
        finally:
            await server.stop()
            backend.close()

    run_checked(go())


def test_backend_reset_before_answering_gives_502(env: Env) -> None:
    lx = env.start({"a": env.model("a")})
    status, payload = lx.chat("a", reset=True)
    assert status == 502 and payload["error"]["message"].startswith("model 'a' backend failed before answering")
    assert lx.chat("a")[0] == 200


def test_backend_dying_mid_stream_cuts_the_client_stream(env: Env) -> None:
    lx = env.start({"a": env.model("a")})
    assert lx.chat("a")[0] == 200  # up: the stream is the backend's own, and it is torn
    conn, resp = sse_stream(lx.port, {"model": "a", "stream": True, "n": 5, "die_after": 2})
    assert resp.status == 200
    with pytest.raises(http.client.IncompleteRead):
        resp.read()
    conn.close()
    lx.wait_log(r"request\.cut model=a")
    assert lx.health()["models"]["a"]["in_flight"] == 0
    assert lx.chat("a")[0] == 200


def test_backend_dying_mid_stream_ends_a_held_stream_with_an_error_event(env: Env) -> None:
    """Regression (attack): llmux frames a held stream, yet a backend that failed after its
    head (a reset, a stall past upstream_timeout_secs) left it torn with no error event."""
    lx = env.start({"a": env.model("a"), "b": env.model("b")})
    assert lx.chat("b")[0] == 200
    conn, resp = sse_stream(lx.port, {"model": "a", "stream": True, "n": 5, "die_after": 2})
    data = resp.read()  # a clean end of the chunked body: no IncompleteRead
    conn.close()
    events = sse_events(data)
    assert [t for k, t in events if k == "data"][:2] == ['{"backend": "a", "i": 0}', '{"backend": "a", "i": 1}']
    assert json.loads(events[-1][1])["error"]["message"].startswith("model 'a' backend failed mid-response")
    lx.wait_log(r"request method=POST path=/v1/chat/completions model=a status=502 .*held=true")


@pytest.fixture
def example_ports() -> Any:
    """The example config's fixed ports, held by this test run alone: CI runs two Pythons'
    suites at once, and their example tests would otherwise race for 8001 and 8002."""
    import fcntl
    with open(Path(tempfile.gettempdir()) / "llmux-test-example-ports.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for port in (8001, 8002):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    pytest.skip(f"port {port} is in use here")
        yield


def test_example_config_runs_a_real_switch_with_the_demo_backend(tmp_path: Path, example_ports: None) -> None:
    config = json.loads((HERE / "example-config.json").read_text())
    for m in config["models"].values():  # same hooks, with this test's pid files and llmux.py
        for hook in ("wake", "sleep", "alive"):
            m[hook] = m[hook].replace("/tmp/", f"{tmp_path}/").replace(
                "python3 llmux.py", f"{sys.executable} {LLMUX}")
    lx = Llmux(config, tmp_path)
    try:
        status, payload = lx.chat("llama", messages=[{"role": "user", "content": "hi"}])
        assert status == 200
        assert payload["choices"][0]["message"]["content"] == "Hello from llama! You said: hi"
        conn, resp = sse_stream(lx.port, {"model": "qwen", "stream": True,
                                          "messages": [{"role": "user", "content": "yo"}]})
        events = [line for line in resp.read().split(b"\n\n") if line.startswith(b"data:")]
        conn.close()
        assert events[-1] == b"data: [DONE]"
        text = "".join(json.loads(e[6:])["choices"][0]["delta"].get("content", "") for e in events[:-1])
        assert text == "Hello from qwen! You said: yo"
        lx.wait_log(r"hook\.exit model=llama hook=sleep code=0")
    finally:
        lx.stop()
        lx.assert_clean()
        for name in ("llama", "qwen"):
            subprocess.run([sys.executable, LLMUX, "demo-backend", "--stop", "--pidfile",
                            str(tmp_path / f"llmux-demo-{name}.pid")], timeout=T)


# -- README recipes, run as written against the engine stand-ins (llmux.py demo-backend) --

README = HERE / "README.md"
RECIPE = re.compile(r"<!-- recipe: ([\w-]+); test owns: ([^>]*?) -->\n```json\n(.*?)\n```", re.S)
PR_SET_CHILD_SUBREAPER = 36  # linux/prctl.h


def readme_recipe(name: str, subs: Dict[str, str]) -> Dict[str, Any]:
    """README recipe ``name``, with only the strings its marker declares replaced."""
    found = {m.group(1): (m.group(2).split(), m.group(3)) for m in RECIPE.finditer(README.read_text())}
    assert name in found, f"README has no recipe {name!r}; it has {sorted(found)}"
    owned, text = found[name]
    assert sorted(subs) == sorted(owned), f"recipe {name}: the test owns {sorted(subs)}; marker says {owned}"
    for old in sorted(subs, key=len, reverse=True):
        text = text.replace(old, subs[old])
    return json.loads(text)


def held_port() -> socket.socket:
    """A port this test owns: bound with SO_REUSEADDR but not listening, so a server the
    recipe starts can listen on it (a second one cannot), and nobody else can take it."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    return s


class StandIn(Backend):
    """An engine stand-in the recipe expects to be running already (vLLM, Ollama), on a
    port 0 socket; the env stops it with its backends."""

    def __init__(self, env: Env, engine: str, names: List[str]) -> None:  # noqa: super
        sock = socket.create_server(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.proc = spawn([sys.executable, LLMUX, "demo-backend", "--engine", engine,
                           "--model", names[0], "--served-model-name", *names,
                           "--token-delay", "0", "--fd", str(sock.fileno())],
                          pass_fds=(sock.fileno(),))
        sock.close()
        env.backends[f"{engine}-{self.port}"] = self


def stand_in(env: Env, engine: str, names: List[str]) -> Tuple[int, subprocess.Popen]:
    s = StandIn(env, engine, names)
    return s.port, s.proc


def get_json(port: int, path: str, method: str = "GET") -> Any:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=T)
    try:
        conn.request(method, path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def servers_of(marker: str) -> List[int]:
    """Live (not zombie) processes whose command line holds ``marker``."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if marker.encode() in f.read() and llmux._pid_running(int(entry)):
                    pids.append(int(entry))
        except (OSError, ValueError):
            pass
    return pids


def test_readme_lists_every_metric() -> None:
    """The README's table of metrics names each family llmux exports, and no other."""
    listed = set(re.findall(r"^\| `(llmux_[a-z_]+)` \|", README.read_text(), re.M))
    exported = set(llmux.llmux_metrics()._meta)
    assert listed == exported, listed ^ exported


def test_readme_every_recipe_block_is_tested() -> None:
    text = README.read_text()
    section = text[text.index("## Recipes\n"):text.index("\n## ", text.index("## Recipes\n") + 1)]
    blocks = section.count("```json")
    marked = [m.group(1) for m in RECIPE.finditer(section)]
    assert blocks == len(marked), "a ```json block in Recipes has no <!-- recipe: ... --> marker"
    assert sorted(marked) == ["llamacpp", "ollama", "vllm-sleep"], marked  # each has tests below


def _vllm(env: Env) -> Tuple[Dict[str, Any], Dict[str, int]]:
    names = {"llama": ["llama", "llama-3.1-8b"], "qwen": ["qwen"]}  # llmux name + aliases
    ports = {}
    for name, served in names.items():
        ports[name], _ = stand_in(env, "vllm", served)
    config = readme_recipe("vllm-sleep", {"8001": str(ports["llama"]), "8002": str(ports["qwen"])})
    return config, ports


def test_readme_recipe_vllm_switches_both_ways_and_aliases_reach_vllm(env: Env) -> None:
    config, ports = _vllm(env)
    assert config["models"]["llama"]["aliases"] == ["llama-3.1-8b"]
    lx = env.start(config["models"])
    lx.wait_log(r"startup\.extra_model_up model=qwen keeping=llama")
    assert get_json(ports["qwen"], "/is_sleeping") == {"is_sleeping": True}
    for model, asleep in (("qwen", "llama"), ("llama-3.1-8b", "qwen"), ("qwen", "llama")):
        status, payload = lx.chat(model)
        assert status == 200, payload
        # vLLM echoes the served name it was asked for (llmux may pass the alias or its name)
        assert payload["model"] in (["llama", "llama-3.1-8b"] if model != "qwen" else ["qwen"])
        assert get_json(ports[asleep], "/is_sleeping") == {"is_sleeping": True}
    status, _, payload = lx.request("POST", "/v1/chat/completions", {"model": "llama-3.1-8b"},
                                    {"content-type": "application/json"})
    assert status == 200, payload


def test_readme_recipe_vllm_restart_adopts_the_awake_server_not_a_sleeping_one(env: Env) -> None:
    """/health is 200 while vLLM sleeps: an alive hook on it kept a sleeping llama as
    active after a restart and put the awake qwen to sleep; every request then failed."""
    config, ports = _vllm(env)
    lx = env.start(config["models"])
    assert lx.chat("qwen")[0] == 200  # llama asleep, qwen awake
    lx.stop()
    lx = env.start(config["models"])
    lx.wait_log(r"model\.state model=qwen .*adopted")
    assert lx.log_count(r"hook\.start model=\w+ hook=(wake|sleep)") == 0
    assert get_json(ports["qwen"], "/is_sleeping") == {"is_sleeping": False}
    status, payload = lx.chat("qwen")
    assert status == 200, payload
    assert lx.log_count(r"hook\.start model=\w+ hook=wake") == 0
    assert lx.chat("llama")[0] == 200


def _llamacpp(env: Env, models_dir: Path, holds: List[socket.socket]) -> Dict[str, Any]:
    ports = [held_port() for _ in range(2)]
    holds.extend(ports)
    server = f"{sys.executable} {LLMUX} demo-backend --engine llamacpp --token-delay 0"
    return readme_recipe("llamacpp", {
        "8003": str(ports[0].getsockname()[1]), "8004": str(ports[1].getsockname()[1]),
        "/opt/llmux/llmux.py": LLMUX, "llama-server": server, "/models": str(models_dir),
        "/var/log": str(env.tmp), "/run": str(env.tmp)})


def _no_reaper() -> None:
    """llmux as a container's PID 1 without --init: the servers its hooks start in the
    background become its children when the hook's shell exits, and nothing reaps them."""
    import ctypes
    ctypes.CDLL(None).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _stop_recipe_servers(config: Dict[str, Any]) -> None:
    for m in config["models"].values():
        subprocess.run(["sh", "-c", m["sleep"]], timeout=T)


@contextlib.contextmanager
def llamacpp_recipe(env: Env, files: Iterable[str]) -> Any:
    """The llama.cpp recipe's config (model files ``files`` present), its servers stopped
    and its held ports let go afterwards, whatever the test did."""
    models = env.tmp / "models"
    models.mkdir()
    for name in files:
        (models / f"{name}.gguf").write_text("gguf")
    holds: List[socket.socket] = []
    config = _llamacpp(env, models, holds)
    try:
        yield config, models, holds
    finally:
        for lx in env.procs:
            lx.stop()
        _stop_recipe_servers(config)
        for s in holds:
            s.close()


def test_readme_recipe_llamacpp_switches_when_nothing_reaps_the_server(env: Env) -> None:
    """The recipe's `while kill -0 $pid` sleep hook waited for a zombie that nobody
    reaps until hook_timeout_secs (600 s): the switch failed."""
    with llamacpp_recipe(env, ["qwen", "gemma"]) as (config, models, _):
        lx = Llmux({**config, "policy": {"hook_timeout_secs": T}}, env.tmp, preexec_fn=_no_reaper)
        env.procs.append(lx)
        for model in ("qwen", "gemma", "qwen"):
            status, payload = lx.chat(model)
            assert status == 200, payload
            assert payload["model"] == model  # --alias
        lx.wait_log(r"hook\.exit model=qwen hook=sleep code=0")
        lx.wait_log(r"hook\.exit model=gemma hook=sleep code=0")
        assert len(servers_of(str(models / "gemma.gguf"))) == 0
        assert len(servers_of(str(models / "qwen.gguf"))) == 1


def test_readme_recipe_llamacpp_wrong_model_path_fails_the_wake_at_once(env: Env) -> None:
    """`probe --wait 600` kept polling a server that had exited in milliseconds."""
    with llamacpp_recipe(env, ["qwen"]) as (config, _, _):  # no gemma.gguf: a typo
        lx = env.start(config["models"])  # hook_timeout_secs stays at its default (600 s)
        status, payload = lx.chat("gemma")
        assert status >= 500 and "hook 'wake' for model 'gemma' exited 1" in payload["error"]["message"], payload
        assert "server process exited" in payload["error"]["message"]
        lx.wait_log(r"hook\.exit model=gemma hook=sleep code=0")  # a failed wake is cleaned up
        assert lx.chat("qwen")[0] == 200


def test_readme_recipe_llamacpp_server_that_dies_is_woken_again(env: Env) -> None:
    with llamacpp_recipe(env, ["qwen", "gemma"]) as (config, models, _):
        lx = env.start(config["models"], policy={"alive_interval_secs": 0.05})
        assert lx.chat("qwen")[0] == 200
        os.kill(int((env.tmp / "qwen.pid").read_text()), signal.SIGKILL)
        lx.wait_log(r"model\.alive_failed model=qwen")
        lx.wait_log(r"hook\.exit model=qwen hook=sleep code=0")
        status, payload = lx.chat("qwen")
        assert status == 200, payload
        assert len(servers_of(str(models / "qwen.gguf"))) == 1


def test_readme_recipe_llamacpp_wake_is_idempotent_fuzz(env: Env) -> None:
    """Exploring: seeded random runs of the recipe's own hooks (wake, a second wake, sleep,
    a crash, a missing model file).  After each step: at most one server, exactly one
    after a wake that succeeded (and it serves), none after a sleep, pidfile gone."""
    models = env.tmp / "models"
    models.mkdir()
    holds: List[socket.socket] = []
    config = _llamacpp(env, models, holds)
    m = config["models"]["qwen"]
    gguf, pidfile = models / "qwen.gguf", env.tmp / "qwen.pid"
    port = holds[0].getsockname()[1]
    seed = int(os.environ.get("LLMUX_FUZZ_SEED", "20261201"))
    rng = random.Random(seed)
    steps: List[str] = []
    try:
        for _ in range(8):
            step = rng.choice(["wake", "wake", "sleep", "crash", "lose-file"])
            steps.append(step)
            why = f"seed {seed}, steps {steps}"
            if step == "lose-file":
                if gguf.exists():
                    gguf.unlink()
                else:
                    gguf.write_text("gguf")
                continue
            if step == "crash":
                for pid in servers_of(str(gguf)):
                    os.kill(pid, signal.SIGKILL)
                wait_for(lambda: not servers_of(str(gguf)), "the crashed server to go")
                continue
            rc = subprocess.run(["sh", "-c", m[step]], timeout=T, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL).returncode
            live = servers_of(str(gguf))
            assert len(live) <= 1, f"{len(live)} servers: {why}"
            if step == "sleep":
                assert rc == 0 and not live and not pidfile.exists(), why
            elif rc == 0:
                assert len(live) == 1, why
                assert get_json(port, "/health") == {"status": "ok"}, why
            else:
                assert not gguf.exists() and not live, why  # only a missing file fails a wake
    finally:
        subprocess.run(["sh", "-c", m["sleep"]], timeout=T)
        for s in holds:
            s.close()


def test_a_process_group_is_gone_when_only_zombies_are_left() -> None:
    """_group_left: a member that has exited and not been reaped holds nothing, and is
    not waited for; one that runs is named; a group with no member is gone."""
    code = ("import os, subprocess, sys, time\n"
            "os.setsid()\n"
            "zombie = subprocess.Popen(['true'])\n"  # kept, never waited for: a zombie of this group
            "print(os.getpid(), flush=True)\n"
            "time.sleep(600)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        pgid = int(child.stdout.readline())  # type: ignore[union-attr]
        def zombies() -> int:
            found = 0
            for name in os.listdir("/proc"):
                try:
                    found += name.isdigit() and f") Z {pgid} {pgid} " in Path(f"/proc/{name}/stat").read_text()
                except OSError:
                    pass
            return found
        wait_for(lambda: zombies() == 1, "the zombie in the group")
        assert llmux._group_left(pgid) == [pgid] == group_running(pgid)
        assert llmux._group_left(pgid, [pgid]) == [pgid]
    finally:
        child.kill()
        child.wait()
    assert llmux._group_left(pgid) == []


def test_reap_orphans_reaps_a_flood_in_batches_and_never_one_of_its_own() -> None:
    """reap_orphans, in a process of its own: 300 zombie children are reaped REAP_BATCH
    a pass (by waitid, no read of /proc), the rest in the next; one that llmux waits for
    itself (``own``), first in line, is left to it, and those behind it are still reaped."""
    code = ("import os, sys\n"
            f"sys.path.insert(0, {str(HERE)!r})\n"
            "import llmux\n"
            "def zombies(n):\n"
            "    pids = []\n"
            "    for _ in range(n):\n"
            "        pid = os.fork()\n"
            "        if pid == 0:\n"
            "            os._exit(3)\n"
            "        pids.append(pid)\n"
            "    for pid in pids:\n"  # each one exited (a zombie) before the pass
            "        os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)\n"
            "    return pids\n"
            "pids = zombies(300)\n"
            "first = llmux.reap_orphans(set())\n"
            "second = llmux.reap_orphans(set())\n"
            "assert len(first) == llmux.REAP_BATCH, len(first)\n"
            "assert sorted(p for p, _ in first + second) == sorted(pids)\n"
            "assert all(os.WEXITSTATUS(st) == 3 for _, st in first + second)\n"
            "assert llmux.reap_orphans(set()) == []\n"
            "pids = zombies(5)\n"
            "mine = min(pids)\n"
            "reaped = llmux.reap_orphans({mine})\n"
            "assert sorted(p for p, _ in reaped) == sorted(set(pids) - {mine}), (reaped, pids)\n"
            "assert os.waitpid(mine, 0)[0] == mine\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=T)
    assert r.returncode == 0 and r.stdout == "ok\n", r.stderr


def test_stop_treats_a_zombie_as_gone(tmp_path: Path) -> None:
    """When nothing reaps an exited server, `kill -0` says it runs forever."""
    child = subprocess.Popen(["sleep", "60"])  # this test is its parent and does not reap it
    try:
        (tmp_path / "s.pid").write_text(f"{child.pid}\n")
        r = subprocess.run([sys.executable, LLMUX, "stop", "--pidfile", str(tmp_path / "s.pid")],
                           timeout=T, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert not (tmp_path / "s.pid").exists()
        assert subprocess.run(["sh", "-c", f"kill -0 {child.pid}"]).returncode == 0  # a zombie
    finally:
        child.kill()
        child.wait()


def test_stop_waits_for_a_server_whose_main_thread_exited_first(tmp_path: Path) -> None:
    """Regression (a CI flake, traced): when a threaded server's main thread exits
    before its other threads (as under SIGKILL, or a pthread_exit), /proc shows the
    process as a zombie while those threads still run and hold its port (and, on a GPU,
    its memory).  `stop` took that zombie for gone and returned while the server still
    answered on its port; it must wait until the last thread has gone."""
    code = ("import ctypes, signal, socket, threading\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "s = socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(8)\n"
            "def serve():\n"
            "    while True:\n"
            "        c, _ = s.accept(); c.sendall(b'up'); c.close()\n"
            "threading.Thread(target=serve).start()\n"
            "print(s.getsockname()[1], flush=True)\n"
            "ctypes.CDLL(None).pthread_exit(None)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        port = int(child.stdout.readline())  # type: ignore[union-attr]
        wait_for(lambda: Path(f"/proc/{child.pid}/stat").read_text().rpartition(")")[2].split()[0] == "Z",
                 "the main thread to exit")
        with socket.create_connection(("127.0.0.1", port), timeout=T) as c:
            assert c.recv(2) == b"up"  # a zombie leader, and its server still serving
        assert llmux._pid_running(child.pid)
        (tmp_path / "s.pid").write_text(f"{child.pid}\n")
        r = subprocess.run([sys.executable, LLMUX, "stop", "--grace", "0.2", "--pidfile",
                            str(tmp_path / "s.pid")], timeout=T, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert not llmux._pid_running(child.pid)
        assert os.listdir(f"/proc/{child.pid}/task") == [str(child.pid)]  # no thread is left
    finally:
        child.kill()
        child.wait()


def test_probe_gives_up_at_once_when_the_server_has_exited(tmp_path: Path) -> None:
    hold = held_port()  # nothing listens: every attempt is refused
    dead = subprocess.Popen(["true"])
    dead.wait()
    (tmp_path / "s.pid").write_text(f"{dead.pid}\n")
    url = f"http://127.0.0.1:{hold.getsockname()[1]}/health"
    try:
        for flags in (["--pid", str(dead.pid)], ["--pidfile", str(tmp_path / "s.pid")],
                      ["--pidfile", str(tmp_path / "missing.pid")]):
            r = subprocess.run([sys.executable, LLMUX, "probe", "--wait", "600", *flags, url],
                               timeout=T, capture_output=True, text=True)
            assert r.returncode == 1, (flags, r.stderr)
            expected = ("no server process; expected a pid in" if "missing" in flags[-1] else
                        f"server process exited; expected pid {dead.pid}")
            assert expected in r.stderr, r.stderr
    finally:
        hold.close()


def test_probe_asks_at_a_fixed_short_period() -> None:
    """probe's backoff grew to 1 s, so a wake returned up to a second after the server
    was ready.  Counted: attempts in a 2 s wait (40 at 50 ms; 6 with the old backoff)."""
    hits = []

    def answer(conn: int, n: int, method: str, target: str, body: bytes) -> bytes:
        hits.append(target)
        return http_reply({"loading": True}, "503 Service Unavailable")

    events = Path(os.environ.get("TMPDIR", "/tmp")) / f"probe-{os.getpid()}.log"
    backend = RawBackend(events, answer)
    try:
        r = subprocess.run([sys.executable, LLMUX, "probe", "--wait", "2",
                            f"http://127.0.0.1:{backend.port}/health"], timeout=T)
        assert r.returncode == 1
        assert len(hits) >= 12, len(hits)  # a very generous factor below 40
    finally:
        backend.stop()
        events.unlink()


def test_readme_recipe_ollama_one_server_per_model_switches_and_adopts(env: Env) -> None:
    ports = {}
    for name in ("llama3", "mistral"):
        ports[name], _ = stand_in(env, "ollama", [name])
    config = readme_recipe("ollama", {"11435": str(ports["llama3"]), "11436": str(ports["mistral"])})
    lx = env.start(config["models"])
    for model, other in (("llama3", "mistral"), ("mistral", "llama3"), ("llama3", "mistral")):
        status, payload = lx.chat(model)
        assert status == 200, payload
        assert get_json(ports[model], "/api/ps")["models"] == [{"name": model, "model": model}]
        assert get_json(ports[other], "/api/ps")["models"] == []
    lx.stop()
    lx = env.start(config["models"])  # llama3 stayed loaded: adopted, nothing woken
    lx.wait_log(r"model\.state model=llama3 .*adopted")
    assert lx.chat("llama3")[0] == 200
    assert lx.log_count(r"hook\.start model=\w+ hook=wake") == 0


def test_demo_engine_stand_ins_answer_as_documented(env: Env) -> None:
    """The control routes of each stand-in (DEMO_ENGINES cites where each is documented)."""
    port, _ = stand_in(env, "vllm", ["a", "a-alias"])
    wait_for(lambda: subprocess.run([sys.executable, LLMUX, "probe", f"http://127.0.0.1:{port}/health"]).returncode == 0, "vllm")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=T)

    def call(method: str, path: str, body: Any = None) -> Tuple[int, Any]:
        conn.request(method, path, body=None if body is None else json.dumps(body))
        resp = conn.getresponse()
        raw = resp.read()
        return resp.status, json.loads(raw) if raw else None

    assert call("POST", "/v1/chat/completions", {"model": "b"}) == (404, {"error": {
        "message": "The model `b` does not exist.", "type": "NotFoundError", "param": "model", "code": 404}})
    assert call("POST", "/sleep?level=1") == (200, None)
    assert call("GET", "/health")[0] == 200  # vLLM's /health says nothing of sleep
    assert call("GET", "/is_sleeping") == (200, {"is_sleeping": True})
    assert call("POST", "/v1/chat/completions", {"model": "a"})[0] == 503
    assert call("POST", "/wake_up?tags=weights") == (200, None)
    assert call("POST", "/v1/chat/completions", {"model": "a-alias"})[0] == 200
    conn.close()
    port, _ = stand_in(env, "sglang", ["s"])
    wait_for(lambda: subprocess.run([sys.executable, LLMUX, "probe", f"http://127.0.0.1:{port}/health"]).returncode == 0, "sglang")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=T)
    assert call("GET", "/get_model_info")[1]["model_path"] == "s"
    assert call("POST", "/release_memory_occupation", {}) == (200, None)
    assert call("POST", "/v1/chat/completions", {"model": "s"})[0] == 503
    assert call("POST", "/resume_memory_occupation", {}) == (200, None)
    assert call("POST", "/v1/chat/completions", {"model": "s"})[0] == 200
    conn.close()
    port, _ = stand_in(env, "llamacpp-router", ["x", "y"])
    wait_for(lambda: subprocess.run([sys.executable, LLMUX, "probe", f"http://127.0.0.1:{port}/health"]).returncode == 0, "router")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=T)
    assert [m["status"]["value"] for m in call("GET", "/models")[1]["data"]] == ["unloaded", "unloaded"]
    assert call("POST", "/models/load", {"model": "x"}) == (200, {"success": True})
    assert call("POST", "/v1/chat/completions", {"model": "y"})[1]["model"] == "y"  # autoload
    assert [m["status"]["value"] for m in call("GET", "/models")[1]["data"]] == ["loaded", "loaded"]
    assert call("POST", "/models/unload", {"model": "x"}) == (200, {"success": True})
    assert call("GET", "/models")[1]["data"][0]["status"] == {"value": "unloaded"}
    conn.close()
    port, _ = stand_in(env, "ollama", ["o"])
    wait_for(lambda: subprocess.run([sys.executable, LLMUX, "probe", f"http://127.0.0.1:{port}/health"]).returncode == 0, "ollama")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=T)
    assert call("POST", "/api/generate", {"model": "z"}) == (404, {"error": 'model "z" not found, try pulling it first'})
    assert call("GET", "/api/tags")[1] == {"models": [{"name": "o", "model": "o"}]}
    assert call("POST", "/api/chat", {"model": "o", "keep_alive": -1})[1]["done_reason"] == "load"
    assert call("GET", "/api/ps")[1] == {"models": [{"name": "o", "model": "o"}]}
    assert call("POST", "/api/generate", {"model": "o", "keep_alive": 0})[1]["done_reason"] == "unload"
    assert call("GET", "/api/ps")[1] == {"models": []}
    conn.close()


def test_switch_cost_is_measured_per_pair(env: Env) -> None:
    lx = env.start({"a": env.model("a"), "b": env.model("b")})
    for model in "abab":
        assert lx.chat(model)[0] == 200
    costs = lx.health()["switch_cost_secs"]
    assert set(costs) == {"-->a", "a->b", "b->a"}
    assert all(isinstance(v, float) and v > 0 for v in costs.values())


def test_verbose_adds_detail_but_never_secrets(env: Env) -> None:
    lx = env.start({"a": env.model("a")}, args=("-v",))
    status, _, _ = lx.request("POST", "/v1/chat/completions",
                              {"model": "a", "messages": [{"role": "user", "content": "SECRET-PROMPT"}]},
                              {"Authorization": "Bearer SECRET-KEY"})
    assert status == 200
    lx.wait_log(r"debug request\.head method=POST target=/v1/chat/completions .*authorization")
    lx.wait_log(r"debug hook\.script model=a hook=wake")
    lx.stop()
    lx.assert_clean()
    assert not [line for line in lx.lines if "SECRET" in line]


# -- routes for browsers and native engine clients --


def test_cors_preflight_is_answered_by_llmux_without_a_key(env: Env) -> None:
    """Regression: a browser's CORS preflight got 400 missing_model (llama-server answers
    it), so browser clients that work against an engine broke behind llmux."""
    lx = env.start({"a": env.model("a")}, api_keys=["k1"])
    status, headers, payload = lx.request("OPTIONS", "/v1/chat/completions", headers={
        "Origin": "http://localhost:5173", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert (status, payload) == (204, b"")
    assert headers["access-control-allow-origin"] == "*"
    assert "POST" in headers["access-control-allow-methods"]
    assert headers["access-control-allow-headers"] == "authorization, content-type"
    assert "content-length" not in headers
    assert not [line for line in env.lines() if line.startswith(("req ", "wake-start"))]
    # The real request after it carries the header too, as every answer does.
    status, headers, _ = lx.request("POST", "/v1/chat/completions", {"model": "a"},
                                    {"Origin": "http://localhost:5173", "Authorization": "Bearer k1"})
    assert status == 200 and headers["access-control-allow-origin"] == "*"
    status, headers, _ = lx.request("POST", "/v1/chat/completions", {"model": "a"},
                                    {"Origin": "http://localhost:5173"})
    assert status == 401 and headers["access-control-allow-origin"] == "*"


def test_body_less_native_routes_are_reachable(env: Env) -> None:
    """Regression: GET /props, /slots (llama.cpp) had no body to name a model in, and
    /completion and /tokenize clients never send one: all got 400 missing_model."""
    lx = env.start({"a": env.model("a"), "b": env.model("b")})
    status, _, payload = lx.request("GET", "/props?model=b")
    assert (status, payload) == (200, {"backend": "b", "path": "/props?model=b"})
    status, _, payload = lx.request("GET", "/slots", headers={"x-llmux-model": "a"})
    assert (status, payload) == (200, {"backend": "a", "path": "/slots"})
    status, _, payload = lx.request("POST", "/completion", {"prompt": "hi"}, {"x-llmux-model": "b"})
    assert (status, payload["backend"]) == (200, "b")
    status, _, payload = lx.request("GET", "/upstream/a/props?fields=x")
    assert (status, payload) == (200, {"backend": "a", "path": "/props?fields=x"})


def test_upstream_passthrough_splits_names_with_slashes_by_the_longest_match(env: Env) -> None:
    lx = env.start({"org": env.model("org"), "org/m": env.model("org/m", aliases=["meta/x"])})
    for path, backend, forwarded in [
            ("/upstream/org/m/v1/models", "org/m", "/v1/models"),  # longest name wins
            ("/upstream/org%2Fm/props?a=1&b", "org/m", "/props?a=1&b"),  # %2F as /
            ("/upstream/org/props", "org", "/props"),
            ("/upstream/meta/x/slots", "org/m", "/slots"),  # an alias
            ("/upstream/org", "org", "/")]:
        status, _, payload = lx.request("GET", path)
        assert (status, payload) == (200, {"backend": backend, "path": forwarded}), path
    status, _, payload = lx.request("GET", "/upstream/nope/props")
    assert status == 404 and payload["error"]["code"] == "model_not_found"
    assert payload["error"]["message"].startswith("model 'nope' does not exist")


def test_upstream_passthrough_split_fuzz() -> None:
    """Seeded: names and aliases with '/', paths with any character percent-encoded (a
    '/' as %2F too).  The route must pick the longest label the decoded path starts
    with (followed by '/' or the end), forward the rest with the query, and the decoded
    label and rest must give back the decoded path."""
    seed = int(os.environ.get("LLMUX_FUZZ_SEED", "20261201"))
    rng = random.Random(seed)
    parts = ["a", "b", "ab", "é", "x%y"]

    def label() -> str:
        return "/".join(rng.choice(parts) for _ in range(rng.randint(1, 3)))

    def encode(text: str) -> str:
        out = []
        for ch in text:
            if rng.random() < 0.3 or ch in "%é":
                out.append(urllib.parse.quote(ch, safe=""))
            else:
                out.append(ch)
        return "".join(out)

    async def go() -> None:
        for case in range(300):
            labels = sorted({label() for _ in range(rng.randint(1, 4))})
            models = {}
            for i, name in enumerate(labels):
                if i and rng.random() < 0.3:
                    models[labels[0]].setdefault("aliases", []).append(name)
                else:
                    models[name] = {"port": 9000 + i}
            cfg = llmux.parse_config({"models": models})
            server = llmux.Server(cfg, llmux.Log(ListStream()))
            chosen = rng.choice(labels)
            rest = "".join("/" + rng.choice(parts + ["props", ""]) for _ in range(rng.randint(0, 3)))
            query = rng.choice(["", "?", "?a=1&model=b"])
            target = "/upstream/" + encode(chosen) + encode(rest).replace("%2F", "/") + query
            head = llmux.RequestHead("GET", target, "HTTP/1.1", [("host", "x")], True, False)
            path = llmux.route_path(target)
            where = f"seed {seed} case {case}: {labels} {target!r}"
            fwd = await server._route(head, b"", path, ("127.0.0.1", 1))
            decoded = path[len("/upstream/"):]
            longest = max((n for n in labels if decoded == n or decoded.startswith(n + "/")), key=len)
            assert fwd.model is cfg.resolve(longest), where
            got_path, _, got_query = fwd.head.target.partition("?")
            assert fwd.head.target.endswith(query) and got_path.startswith("/"), where
            assert longest + urllib.parse.unquote(got_path) == decoded \
                or (got_path == "/" and decoded == longest), where

    run_checked(go())


def test_upstream_passthrough_needs_a_key_like_any_proxied_route(env: Env) -> None:
    lx = env.start({"a": env.model("a")}, api_keys=["k1"])
    assert lx.request("GET", "/upstream/a/props")[0] == 401
    status, _, payload = lx.request("GET", "/upstream/a/props", headers={"x-api-key": "k1"})
    assert (status, payload) == (200, {"backend": "a", "path": "/props"})


def test_body_model_wins_over_header_and_query(env: Env) -> None:
    lx = env.start({"a": env.model("a"), "b": env.model("b")})
    status, _, payload = lx.request("POST", "/v1/chat/completions?model=b", {"model": "a"},
                                    {"x-llmux-model": "b"})
    assert (status, payload["backend"]) == (200, "a")
    # The header, then the query, when the body names none (or is not JSON).
    status, _, payload = lx.request("POST", "/tokenize?model=a", {"content": "x"},
                                    {"x-llmux-model": "b"})
    assert (status, payload["backend"]) == (200, "b")
    status, _, payload = lx.request("POST", "/tokenize?model=a", b"not json")
    assert (status, payload["backend"]) == (200, "a")
    # Forwarded as sent: header and query stay.
    status, _, payload = lx.request("POST", "/completion?model=a", {"echo": True},
                                    {"x-llmux-model": "a"})
    assert payload["path"] == "/completion?model=a"
    assert ["x-llmux-model", "a"] in payload["headers"]
    status, _, payload = lx.request("GET", "/props")
    assert status == 400 and payload["error"]["message"] == (
        "GET /props has no body; expected a JSON object with a 'model' field (or an "
        "x-llmux-model header, or ?model=NAME)")


def test_cors_with_an_origin_list_varies_by_origin(env: Env) -> None:
    lx = env.start({"a": env.model("a")}, cors_origins=["http://localhost:5173"])
    ok = {"Origin": "http://localhost:5173"}
    status, headers, _ = lx.request("GET", "/v1/models", headers=ok)
    assert headers["access-control-allow-origin"] == "http://localhost:5173"
    assert headers["vary"] == "origin"
    status, headers, _ = lx.request("GET", "/v1/models", headers={"Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in headers and headers["vary"] == "origin"
    status, headers, payload = lx.request("OPTIONS", "/v1/chat/completions", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert status == 204 and not [k for k in headers if k.startswith("access-control-")]
    status, headers, payload = lx.request("OPTIONS", "/v1/chat/completions", headers={
        **ok, "Access-Control-Request-Method": "POST"})
    assert status == 204 and headers["access-control-allow-headers"] == llmux.CORS_DEFAULT_HEADERS
    assert headers["access-control-max-age"] == str(llmux.CORS_MAX_AGE)
    status, headers, _ = lx.request("POST", "/v1/chat/completions", {"model": "a"}, ok)
    assert status == 200 and headers["access-control-allow-origin"] == "http://localhost:5173"
    status, headers, _ = lx.request("GET", "/health", headers=ok)
    assert headers["access-control-allow-origin"] == "http://localhost:5173"


def test_cors_headers_of_the_backend_give_way_to_llmuxs(env: Env) -> None:
    """Regression (attack): a backend that echoes any Origin (as llama-server does) got
    its header through, so a page from an origin cors_origins refused could read the
    answer of a CORS simple request (no preflight)."""
    def answer(conn: int, n: int, method: str, target: str, body: bytes) -> bytes:
        return (b"HTTP/1.1 200 OK\r\naccess-control-allow-origin: http://evil\r\n"
                b"access-control-allow-credentials: true\r\ncontent-length: 2\r\n\r\n{}")

    raw = RawBackend(env.events, answer)
    try:
        for origins, origin, expected in ((None, "http://x", ["*"]),
                                          (["http://good"], "http://evil", []),
                                          (["http://good"], "http://good", ["http://good"])):
            lx = env.start({"a": {"port": raw.port}}, **({"cors_origins": origins} if origins else {}))
            conn = lx.conn()
            conn.request("POST", "/v1/chat/completions", body=b'{"model": "a"}',
                         headers={"Origin": origin, "content-type": "text/plain"})
            resp = conn.getresponse()
            resp.read()
            assert (resp.headers.get_all("access-control-allow-origin") or []) == expected, origin
            assert resp.getheader("access-control-allow-credentials") is None
            conn.close()
            lx.stop()
    finally:
        raw.stop()


def test_streams_say_x_accel_buffering_no(env: Env) -> None:
    lx = env.start({"a": env.model("a")})
    conn, resp = sse_stream(lx.port, {"model": "a", "stream": True, "n": 1})
    assert resp.getheader("x-accel-buffering") == "no"
    resp.read()
    conn.close()
    status, headers, _ = lx.request("POST", "/v1/chat/completions", {"model": "a"})
    assert status == 200 and "x-accel-buffering" not in headers  # a sized body is not a stream


def test_failed_wake_503_says_when_to_retry(env: Env) -> None:
    lx = env.start({"a": env.model("a", wake_extra="exit 3")}, policy={"wake_backoff_secs": 2.5})
    status, headers, payload = lx.request("POST", "/v1/chat/completions", {"model": "a"})
    assert status == 503 and payload["error"]["code"] == "hook_failed"
    assert headers["retry-after"] == "3"  # 2.5 s of backoff, rounded up
    status, headers, payload = lx.request("POST", "/llmux/models/a/wake")
    assert status == 503 and payload["error"]["code"] == "hook_failed"
    assert headers["retry-after"] == "3"


def test_every_503_the_switcher_makes_has_retry_after() -> None:
    """Regression: shutting_down, model_removed and switch_failed 503s had no Retry-After."""
    assert llmux._shutting_down().headers == [("retry-after", str(llmux.RETRY_AFTER_SHUTDOWN))]
    assert llmux._model_removed("a").headers == [("retry-after", str(llmux.RETRY_AFTER_REMOVED))]
    assert llmux._retry_after(10.2, 10.0) == [("retry-after", "1")]
    assert llmux._retry_after(10.0, 10.0) == [("retry-after", "1")]
    cfg = llmux.parse_config({"models": {"a": {"port": 1}, "b": {"port": 2}}})
    loop = CheckedLoop()

    async def go() -> List[llmux.LLMuxError]:
        def switcher() -> llmux.Switcher:
            return sim_switcher(cfg, {"*": 5.0}, {"*": 0.1})
        sw = switcher()
        waiting = loop.create_task(sw.acquire("a"))
        await asyncio.sleep(1.0)
        await sw.close()
        errors = []
        for coro in (waiting, sw.acquire("a")):
            try:
                await coro
            except llmux.LLMuxError as e:
                errors.append(e)
        sw = switcher()
        await sw.reconfigure(llmux.parse_config({"models": {"b": {"port": 2}}}))
        try:
            await sw.acquire("a")
        except llmux.LLMuxError as e:
            errors.append(e)
        await sw.close()
        return errors

    errors = run_checked(go(), loop)
    assert [(e.status, e.code, e.headers) for e in errors] == [
        (503, "shutting_down", [("retry-after", "5")]),
        (503, "shutting_down", [("retry-after", "5")]),
        (503, "model_removed", [("retry-after", "5")])]


# -- upstream_model: the name written into forwarded bodies --


def forward_for(body: bytes, content_type: str = "application/json",
                models: Optional[Dict[str, Any]] = None) -> Tuple[str, bytes]:
    """Server._route_model on a real Server: the model a body goes to, and the body sent."""
    cfg = llmux.parse_config({"models": models or {
        "a": {"port": 8001, "upstream_model": "org/Model-A", "aliases": ["alias-a"]},
        "b": {"port": 8002, "aliases": ["alias-b"]}}})
    head = llmux.RequestHead("POST", "/v1/chat/completions", "HTTP/1.1",
                             [("host", "x"), ("content-type", content_type)], True, False)

    async def go() -> Tuple[str, bytes]:
        server = llmux.Server(cfg, llmux.Log(ListStream()))
        fwd = await server._route_model(head, body)
        return fwd.model.name, fwd.body

    return run_checked(go())  # type: ignore[no-any-return]


@pytest.mark.parametrize("body, sent", [
    (b'{"model": "a", "x": 1}', b'{"model": "org/Model-A", "x": 1}'),
    (b'{"model": "alias-a"}', b'{"model": "org/Model-A"}'),
    (b'{"model":"\\u0061"}', b'{"model":"org/Model-A"}'),  # an escaped name
    (b'{"model": "b", "model": "a"}', b'{"model": "b", "model": "org/Model-A"}'),  # last wins
    (b'\xef\xbb\xbf{"model": "a"}', b'\xef\xbb\xbf{"model": "org/Model-A"}'),  # BOM kept
    (b'{"m\\u006fdel": "a", "t": "\xc3\xa9\\"model\\": \\"b\\""}',
     b'{"m\\u006fdel": "org/Model-A", "t": "\xc3\xa9\\"model\\": \\"b\\""}'),
])
def test_upstream_model_is_spliced_into_the_json_body(body: bytes, sent: bytes) -> None:
    assert forward_for(body) == ("a", sent)


def test_bodies_are_byte_identical_without_upstream_model() -> None:
    for body in [b'{"model": "alias-b",  "x" : [1, {"model": "a"}]}', b'{"model":"b"}']:
        name, sent = forward_for(body)
        assert name == "b" and sent is body  # not even copied


def test_upstream_model_is_spliced_into_a_multipart_field() -> None:
    form = (b"--B\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n\r\n"
            b"RIFF\x00\xff--\r\n--B\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\n"
            b"alias-a\r\n--B--\r\n")
    name, sent = forward_for(form, "multipart/form-data; boundary=B")
    assert name == "a" and sent == form.replace(b"\r\n\r\nalias-a\r\n", b"\r\n\r\norg/Model-A\r\n")


def test_upstream_model_rewrite_of_a_20_mb_body() -> None:
    pad = "é\\\"{[" * 700_000
    body = json.dumps({"messages": [{"content": pad}], "model": "alias-a", "n": 1},
                      ensure_ascii=False).encode()
    assert len(body) > 5_000_000
    body = body * 1 + b" " * (20_000_000 - len(body))
    name, sent = forward_for(body)
    assert name == "a" and len(sent) == len(body) + len("org/Model-A") - len("alias-a")
    assert json.loads(sent) == {**json.loads(body), "model": "org/Model-A"}


def test_upstream_model_rewrite_fuzz() -> None:
    """Seeded: random JSON objects (nested "model" keys, escapes, unicode, duplicate
    top-level keys, odd whitespace), rewritten; json.loads of the result must equal the
    original's with only the top-level model changed, and with no rewrite due, the body
    must be the very same bytes."""
    seed = int(os.environ.get("LLMUX_FUZZ_SEED", "20261201"))
    rng = random.Random(seed)
    names = ["a", "alias-a", "b", "alias-b"]

    def text() -> str:
        return "".join(rng.choice(['"', "\\", "é", "\u2028", "\U0001f600", "{", "]", "model",
                                   ":", ",", "x", "\x01"]) for _ in range(rng.randint(0, 6)))

    def value(depth: int) -> Any:
        roll = rng.random()
        if depth > 2 or roll < 0.4:
            return rng.choice([text(), 1, -2.5e3, True, None])
        if roll < 0.7:
            return [value(depth + 1) for _ in range(rng.randint(0, 3))]
        return {rng.choice(["model", text()]): value(depth + 1) for _ in range(rng.randint(0, 3))}

    def ws() -> str:
        return rng.choice(["", " ", "\n\t ", "\r\n"])

    for case in range(400):
        members = [(k, value(0)) for k in (text() for _ in range(rng.randint(0, 4)))
                   if k != "model"]
        for _ in range(rng.randint(1, 2)):
            members.insert(rng.randint(0, len(members)), ("model", rng.choice(names)))
        ascii_only = rng.random() < 0.5
        parts = [ws() + json.dumps(k, ensure_ascii=ascii_only) + ws() + ":" + ws()
                 + json.dumps(v, ensure_ascii=ascii_only) + ws() for k, v in members]
        body = ("{" + ",".join(parts) + "}").encode()
        original = json.loads(body)
        name, sent = forward_for(body)
        target = "a" if original["model"] in ("a", "alias-a") else "b"
        assert name == target, f"seed {seed} case {case}: routed to {name}: {body!r}"
        if target == "b":
            assert sent is body, f"seed {seed} case {case}: body changed: {body!r}"
        else:
            assert json.loads(sent) == {**original, "model": "org/Model-A"}, \
                f"seed {seed} case {case}: {body!r} -> {sent!r}"


# ─────────────────────────────── hostile input, faults, load ─────────────────────────────


def test_api_keys_are_required_except_on_health(env: Env, monkeypatch: Any) -> None:
    monkeypatch.setenv("LLMUX_API_KEYS", "sk-env-1, sk-env-2")
    lx = env.start({"a": env.model("a")}, api_keys=["sk-config"])
    status, headers, payload = lx.request("POST", "/v1/chat/completions", {"model": "a"})
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    assert payload == {"error": {"message": "missing or invalid API key; send 'Authorization: Bearer <key>'",
                                 "type": "authentication_error", "code": "invalid_api_key"}}
    assert lx.request("GET", "/v1/models", headers={"Authorization": "Bearer sk-wrong"})[0] == 401
    assert lx.request("GET", "/health")[0] == 200
    for headers in ({"Authorization": "Bearer sk-config"}, {"authorization": "bearer sk-env-2"},
                    {"x-api-key": "sk-env-1"}):
        assert lx.request("POST", "/v1/chat/completions", {"model": "a"}, headers)[0] == 200
    assert env.lines().count("req a") == 3  # nothing unauthenticated reached the backend


def test_post_to_health_is_not_a_way_around_the_api_key(env: Env) -> None:
    """Regression: the key check skipped every method on /health, so an unauthenticated
    POST /health with a model in its body was proxied (and could switch models)."""
    lx = env.start({"a": env.model("a"), "b": env.model("b")}, api_keys=["sk-1"])
    for method in ("POST", "PUT", "DELETE"):
        assert lx.request(method, "/health", {"model": "b"})[0] == 401
    for target in ("/health?x", "http://h/health", "/%68ealth"):
        assert lx.request("GET", target)[0] == 200
        assert lx.request("POST", target, {"model": "b"})[0] == 401
    assert lx.request("GET", "/HEALTH")[0] == 401
    assert env.lines() == []  # nothing proxied, nothing woken


# (target, whether it means /health).  Only GET and HEAD of /health may skip the key.
AUTH_TARGETS = [
    ("/health", True), ("/health?", True), ("/health?x=1&y=%zz", True), ("/%68ealth", True),
    ("/%68%65%61%6C%74%68", True), ("http://h/health", True), ("HTTP://H:3000/health?x", True),
    ("https://h/%68ealth", True), ("/health/", False), ("//health", False), ("/HEALTH", False),
    ("/Health", False), ("/health%3F", False), ("/health%2F", False), ("/./health", False),
    ("/%2568ealth", False), ("/health%", False), ("/h%zzealth", False), ("/health%00", False),
    ("/health%ff", False), ("/health;x", False), ("/health#x", False), ("http://h", False),
    ("http://h//health", False), ("h/health", False), ("*", False), ("/", False),
    ("/v1/models", False), ("/v1/models/a", False), ("/models", False), ("/metrics", False),
    ("/llmux/status", False), ("/llmux/models/a/wake", False), ("/llmux/models/a/sleep", False),
    ("/v1/chat/completions", False), ("http://h/v1/chat/completions", False),
    ("/v1/chat/completions?/health", False), ("/%761/chat/completions", False),
]
AUTH_METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE", "get", "head"]
AUTH_KEYS = [  # (header line, valid)
    ("", False), ("Authorization: Bearer sk-fuzz\r\n", True), ("authorization: bearer sk-fuzz\r\n", True),
    ("x-api-key: sk-fuzz\r\n", True), ("Authorization: Bearer sk-fuz\r\n", False),
    ("Authorization: Bearer sk-fuzzz\r\n", False), ("Authorization: Basic sk-fuzz\r\n", False),
    ("x-api-key: SK-FUZZ\r\n", False), ("Authorization: Bearer\r\n", False), ("x-api-key: \r\n", False),
    ("Authorization: Bearer sk-fuzz\xe9\r\n", False), ("x-api-key: sk-fuzz sk-fuzz\r\n", False),
]


def test_fuzz_no_request_without_a_valid_key_is_proxied_or_answered(tmp_path: Path) -> None:
    """Seeded exploration of method x target spelling x key: without a valid key nothing
    reaches the backend (it records every request it reads) and nothing but GET or HEAD
    of /health answers anything but 401; with one, nothing answers 401."""
    seed = 20261201
    rng = random.Random(seed)
    tmp = tmp_path
    events = tmp / "events.log"
    events.write_text("")

    def answer(conn: int, n: int, method: str, target: str, body: bytes) -> bytes:
        return http_reply({"got": target}, head_only=method == "HEAD")

    raw = RawBackend(events, answer)
    lx = None
    try:
        lx = Llmux({"models": {"a": {"port": raw.port}}, "api_keys": ["sk-fuzz"]}, tmp)
        proxied = 0
        for step in range(400):
            method = rng.choice(AUTH_METHODS)
            target, is_health = rng.choice(AUTH_TARGETS)
            key, valid = rng.choice(AUTH_KEYS)
            body = rng.choice([b"", b'{"model": "a"}'])
            data = (f"{method} {target} HTTP/1.1\r\nHost: h\r\n{key}Connection: close\r\n".encode("latin-1")
                    + (b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body) if body else b"")
                    + b"\r\n" + body)
            reply = raw_exchange(lx.port, data)
            status = int(reply[9:12])
            seen = len(raw.requests())
            why = f"seed {seed} step {step}: {data!r} -> {reply[:300]!r}"
            if "#" in target:  # no valid request (a fragment): refused before anything else
                assert status == 400 and seen == proxied, why
            elif not valid:
                public = is_health and method in ("GET", "HEAD")
                assert status == (200 if public else 401), why
                assert seen == proxied, "proxied without a valid key: " + why
            else:
                assert status != 401, why
                if is_health and method in ("GET", "HEAD"):
                    assert status == 200 and seen == proxied, why
                proxied = seen
        assert proxied > 10  # the key really lets requests through
    finally:
        if lx is not None:
            lx.stop()
            lx.assert_clean()
        raw.stop()


def test_api_keys_config_must_be_strings() -> None:
    with pytest.raises(llmux.ConfigError) as info:
        llmux.parse_config({**GOOD, "api_keys": "sk-1"})
    assert info.value.problems == [
        'api_keys: expected a list of non-empty strings without surrounding spaces; got "sk-1" (a string)']


def test_non_ascii_api_keys_are_refused_not_silently_unmatchable(monkeypatch: Any) -> None:
    """Regression: a key with non-ASCII characters was accepted, and could never match:
    the header was read as latin-1 and the key compared as UTF-8."""
    expected = "expected a non-empty string of printable ASCII without surrounding spaces"
    with pytest.raises(llmux.ConfigError) as info:
        llmux.parse_config({**GOOD, "api_keys": ["sk-ok", "sk-cl\u00e9", " sk", "", 5, "a\tb"]})
    assert info.value.problems == [
        f'api_keys[1]: {expected}; got "sk-cl\\u00e9" (a string)',
        f'api_keys[2]: {expected}; got " sk" (a string)',
        f'api_keys[3]: {expected}; got "" (a string)',
        f"api_keys[4]: {expected}; got 5 (a number)",
        f'api_keys[5]: {expected}; got "a\\tb" (a string)']
    monkeypatch.setenv("LLMUX_API_KEYS", "sk-env, sk-\u043a\u043b\u044e\u0447")
    with pytest.raises(llmux.ConfigError) as info:
        llmux.parse_config(GOOD)
    assert info.value.problems == [
        f'LLMUX_API_KEYS[1]: {expected}; got "sk-\\u043a\\u043b\\u044e\\u0447" (a string)']
    monkeypatch.setenv("LLMUX_API_KEYS", "sk-env")
    assert llmux.parse_config({**GOOD, "api_keys": ["sk 1~"]}).api_keys == ("sk 1~", "sk-env")


def test_api_key_is_compared_as_the_bytes_the_client_sent() -> None:
    def head(**headers: str) -> llmux.RequestHead:
        return llmux.RequestHead("GET", "/v1/models", "HTTP/1.1", list(headers.items()), True, False)

    async def main() -> None:
        server = llmux.Server(llmux.parse_config({**GOOD, "api_keys": ["sk-1"]}), llmux.Log(ListStream()))
        server._authorize(head(authorization="Bearer sk-1"))
        server._authorize(head(**{"x-api-key": "sk-1"}))
        for bad in ("Bearer sk-1\xe9", "Bearer sk-", "Bearer sk-12", "Basic sk-1", "Bearer \xe9"):
            with pytest.raises(llmux.LLMuxError) as info:
                server._authorize(head(authorization=bad))
            assert info.value.status == 401
        await server.stop()

    run_checked(main())


def test_allow_remote_control_config() -> None:
    assert llmux.parse_config(GOOD).allow_remote_control is False
    assert llmux.parse_config({**GOOD, "allow_remote_control": True}).allow_remote_control is True
    with pytest.raises(llmux.ConfigError) as info:
        llmux.parse_config({**GOOD, "allow_remote_control": "yes"})
    assert info.value.problems == ['allow_remote_control: expected true or false; got "yes" (a string)']


def test_slow_client_head_timeout_gives_408(env: Env) -> None:
    lx = env.start({"a": env.model("a")}, http={"header_timeout_secs": 0.3})
    reply = raw_exchange(lx.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
    assert reply.startswith(b"HTTP/1.1 408 ")
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["code"] == "request_timeout"


def test_slow_client_body_timeout_gives_408(env: Env) -> None:
    lx = env.start({"a": env.model("a")}, http={"body_timeout_secs": 0.3})
    reply = raw_exchange(lx.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{\"mo")
    assert reply.startswith(b"HTTP/1.1 408 ")


def test_idle_keep_alive_connection_is_closed_quietly(env: Env) -> None:
    lx = env.start({"a": env.model("a")}, http={"idle_timeout_secs": 0.3})
    with socket.create_connection(("127.0.0.1", lx.port), timeout=T) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = s.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 ")
        assert s.recv(65536) == b""  # closed by llmux, with nothing more said


def test_empty_lines_do_not_keep_an_idle_connection_open() -> None:
    """Regression: a client sending a bare CRLF (skipped, RFC 9112 2.2) every few
    seconds kept its connection open for ever: each restarted the idle timeout."""
    loop = CheckedLoop()

    async def go() -> float:
        ours, theirs = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=ours)
        _, client = await asyncio.open_connection(sock=theirs)

        async def trickle() -> None:
            while True:
                client.write(b"\r\n")
                await asyncio.sleep(1.0)

        pest = loop.create_task(trickle())
        http = llmux.HttpConfig(idle_timeout_secs=5.0)
        try:
            with pytest.raises(llmux._Idle):
                await asyncio.wait_for(llmux.read_request(reader, writer, llmux.RequestParser(),
                                                          http), 60.0)
            return loop.time()
        finally:
            pest.cancel()
            writer.close()
            client.close()

    assert run_checked(go(), loop) < 6.0


def test_heads_that_declare_bodies_they_never_send_hold_no_budget(env: Env) -> None:
    """Regression (attack): the budget was reserved on a head's Content-Length; a few
    sockets declaring 64 MiB and sending nothing got every other body a 503."""
    lx = env.start({"a": env.model("a")},
                   http={"max_body_bytes": 1 << 20, "max_buffered_bytes": 1 << 20})
    squatters = [socket.create_connection(("127.0.0.1", lx.port), timeout=T) for _ in range(4)]
    try:
        for s in squatters:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-length: 1048576\r\n\r\n{")
        assert lx.chat("a")[0] == 200
    finally:
        for s in squatters:
            s.close()


def test_a_connect_flood_is_refused_without_taking_every_fd(env: Env) -> None:
    """Regression (attack): each refused connection lingered 2 s holding an fd no table
    counted; a flood took llmux to thousands of fds and starved hooks of theirs."""
    lx = env.start({"a": env.model("a")}, http={"max_connections": 4})
    held = [socket.create_connection(("127.0.0.1", lx.port), timeout=T) for _ in range(4)]
    for s in held:
        s.sendall(b"GET /health HTTP/1.1\r\n")  # mid-request: not idle, not evicted
    flood: List[socket.socket] = []
    most = 0
    try:
        for _ in range(300):
            c = socket.socket()
            c.setblocking(False)
            c.connect_ex(("127.0.0.1", lx.port))
            flood.append(c)
            most = max(most, len(os.listdir(f"/proc/{lx.proc.pid}/fd")))
        for _ in range(50):
            most = max(most, len(os.listdir(f"/proc/{lx.proc.pid}/fd")))
        assert most <= 2 * 4 + llmux.FD_RESERVE, most
        assert lx.chat("a")[0] in (200, 503)
    finally:
        for c in flood + held:
            c.close()


def test_a_backends_repeated_content_length_reaches_the_client_once(env: Env) -> None:
    """Regression (attack): `content-length: 3, 3` from a backend was forwarded as it
    came; strict clients reject a list."""
    def answer(conn: int, n: int, method: str, target: str, body: bytes) -> bytes:
        return b"HTTP/1.1 200 OK\r\ncontent-length: 3, 3\r\ncontent-length: 3\r\n\r\nabc"

    raw = RawBackend(env.events, answer)
    try:
        lx = env.start({"a": {"port": raw.port}})
        reply = raw_exchange(lx.port, b'POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n'
                                      b'connection: close\r\ncontent-length: 13\r\n\r\n{"model":"a"}')
        head, _, rest = reply.partition(b"\r\n\r\n")
        assert [line for line in head.lower().split(b"\r\n") if line.startswith(b"content-length")] \
            == [b"content-length: 3"] and rest == b"abc", reply
    finally:
        raw.stop()


@pytest.mark.parametrize("content_type, body", [
    ("application/json", b'{"model": "' + b"x" * 2_000_000 + b'"}'),
    ("multipart/form-data; boundary=B",
     b'--B\r\ncontent-disposition: form-data; name="model"\r\n\r\n' + b"\xff" * 2_000_000 + b"\r\n--B--\r\n"),
], ids=["json", "multipart"])
def test_a_model_name_megabytes_long_is_not_read(env: Env, content_type: str, body: bytes) -> None:
    """Regression (attack): a 60 MB multipart `model` of invalid UTF-8 was decoded whole
    (each byte a U+FFFD), quoted in the 404 and escaped by json.dumps: 1.4 GB of RSS, a
    377 MB answer, the loop frozen for seconds."""
    lx = env.start({"a": env.model("a")})
    status, _, payload = lx.request("POST", "/v1/chat/completions", body, {"content-type": content_type})
    assert status == 400 and payload["error"]["code"] == "missing_model", payload
    assert "expected the name of a model" in payload["error"]["message"]
    assert len(payload["error"]["message"]) < 200


def test_a_body_of_model_strings_is_refused_after_a_bounded_number() -> None:
    """Regression (attack): the scanner stopped in Python at every "model" string at any
    depth: a 16 MB body of them cost 15 s of loop time."""
    body = b"{" + b'"model":"a",' * 5000 + b'"x":1}'
    with pytest.raises(ValueError, match=r'more than 1961 "model" or "stream" strings \(1024 and one per 64 bytes\)'):
        llmux._json_model(body)
    assert llmux._json_model(b'{"a":[' + b'{"model":"x"},' * 1000 + b'1],"model":"b"}') == "b"
    # Regression (attack): a real request, 1100 tools each with a "stream" parameter, was
    # refused as "not valid JSON".
    tools = [{"type": "function", "function": {"name": f"t{i}", "parameters": {
        "type": "object", "properties": {"stream": {"type": "boolean"}}}}} for i in range(1100)]
    assert llmux._json_model(json.dumps({"model": "b", "tools": tools}).encode()) == "b"


def test_engine_control_routes_are_not_proxied(env: Env) -> None:
    """Regression (attack): POST /sleep through llmux put the backend to sleep while
    llmux still called it active; a client kept out of /llmux/ could still do it."""
    lx = env.start({"a": env.model("a")}, api_keys=["k"])
    auth = {"authorization": "Bearer k", "content-type": "application/json"}
    for path in ("/sleep?level=1", "/wake_up", "/models/unload", "/release_memory_occupation"):
        status, _, payload = lx.request("POST", path, {"model": "a"}, auth)
        assert status == 403 and payload["error"]["code"] == "blocked_path", (path, payload)
    # Regression (attack): a fragment is not part of the path to llmux, but uvicorn drops
    # it and routes /sleep#x to /sleep.  A client sends no fragment: a 400 (RFC 9112 3.2).
    for path in ("/sleep#x", "/wake_up#", "/sleep?level=1#", "http://h/sleep#x", "/upstream/a/sleep#x",
                 "/v1/chat/completions#"):
        status, _, payload = lx.request("POST", path, {"model": "a"}, auth)
        assert status == 400 and "fragment" in payload["error"]["message"], (path, payload)
    assert [line for line in env.lines() if line.startswith("req")] == []
    lx.stop()
    lx2 = env.start({"a": env.model("a")}, blocked_paths=[])
    status, _, payload = lx2.request("POST", "/sleep", {"model": "a"}, {"content-type": "application/json"})
    assert status == 200 and payload["backend"] == "a"  # opted out: proxied


def _replies(data: bytes) -> List[Tuple[bytes, bytes]]:
    """Pipelined answers, each (head, body) by its content-length (none: no body)."""
    out = []
    while data:
        end = data.index(b"\r\n\r\n") + 4
        head = data[:end]
        length = re.search(rb"(?im)^content-length: *(\d+)\r$", head)
        n = int(length.group(1)) if length else 0
        out.append((head, data[end:end + n]))
        data = data[end + n:]
    return out


def test_llmux_own_answers_to_head_have_no_body_and_say_http10_keep_alive(env: Env) -> None:
    """Regression (attack): llmux's own error answers to HEAD (404, 401, 405) carried
    their JSON body, which a pipelining client read as the start of the next answer;
    and an HTTP/1.0 client that asked for keep-alive was kept but never told so."""
    lx = env.start({"a": env.model("a")}, api_keys=["k"])
    reply = raw_exchange(lx.port, b"HEAD /v1/models/nope HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n\r\n"
                                  b"HEAD /v1/models HTTP/1.1\r\nHost: x\r\n\r\n"
                                  b"HEAD /llmux/models/a/wake HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer k\r\n\r\n"
                                  b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    # HEAD answers have no body: the next answer's status line follows each head at once.
    parts = reply.split(b"\r\n\r\n")
    assert [p[:12] for p in parts[:3]] == [b"HTTP/1.1 404", b"HTTP/1.1 401", b"HTTP/1.1 405"], reply
    assert parts[3].startswith(b"HTTP/1.1 200") and b'"status"' in parts[4], reply
    reply = raw_exchange(lx.port, b"GET /health HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
                                  b"GET /v1/models/nope HTTP/1.0\r\nConnection: keep-alive\r\nAuthorization: Bearer k\r\n\r\n"
                                  b"GET /health HTTP/1.0\r\n\r\n")
    answers = _replies(reply)
    assert [h[:12] for h, _ in answers] == [b"HTTP/1.1 200", b"HTTP/1.1 404", b"HTTP/1.1 200"], reply
    assert [b"connection: keep-alive" in h.lower() for h, _ in answers] == [True, True, False], reply
    assert b"connection: close" in answers[2][0]


def test_llmux_refusals_of_a_head_request_have_no_body(env: Env) -> None:
    """Regression: a HEAD the parser refused (a fragment, a 431, a 413, a bad field)
    was answered with its JSON body, as if it were a GET."""
    lx = env.start({"a": env.model("a")}, http={"max_body_bytes": 1000})
    heads = [b"HEAD /v1/models#x HTTP/1.1\r\nHost: x\r\n\r\n",
             b"HEAD /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"y" * 70_000 + b"\r\n\r\n",
             b"HEAD /v1/models HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n",
             b"HEAD /v1/models HTTP/1.1\r\nHost: x\r\nBad Name: 1\r\n\r\n",
             b"HEAD /v1/models HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
             b"800\r\n" + b"z" * 2048 + b"\r\n0\r\n\r\n"]
    many = b"".join(b"X-%d: v\r\n" % i for i in range(llmux.MAX_HEADER_COUNT + 30))
    heads.append(b"HEAD / HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")  # (attack: read from what followed)
    for wire, status in zip(heads, [b"400", b"431", b"413", b"400", b"413", b"431"]):
        reply = raw_exchange(lx.port, wire)
        head, sep, rest = reply.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 " + status) and sep and rest == b"", reply[:300]
        assert b"content-length: " in head and b"connection: close" in head, head
    # Pipelined behind a GET: the GET's answer keeps its body, the refused HEAD's has none.
    reply = raw_exchange(lx.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n" + heads[0])
    answers = _replies(reply)
    assert [h[:12] for h, _ in answers] == [b"HTTP/1.1 200", b"HTTP/1.1 400"], reply
    assert b'"status"' in answers[0][1] and reply.endswith(b"\r\n\r\n"), reply
    # A GET refused the same way still says why in its body, whatever follows it.
    reply = raw_exchange(lx.port, heads[0].replace(b"HEAD", b"GET", 1))
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["code"] == "bad_request"
    reply = raw_exchange(lx.port, heads[-1].replace(b"HEAD", b"GET", 1) + heads[-1])
    assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["code"] == "headers_too_large", reply


def test_connection_cap_answers_503_and_keeps_serving(env: Env) -> None:
    lx = env.start({"a": env.model("a")}, http={"max_connections": 2})
    held = [socket.create_connection(("127.0.0.1", lx.port), timeout=T) for _ in range(2)]
    for s in held:  # both in the middle of a request: not idle, so not evicted
        s.sendall(b"GET /health HTTP/1.1\r\n")
    reply = raw_exchange(lx.port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in reply
    for s in held:
        s.close()
    wait_for(lambda: raw_exchange(lx.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
             .startswith(b"HTTP/1.1 200 "), "llmux to accept connections again")


def test_body_in_tiny_chunks_is_refused_after_a_bounded_number_of_pieces(env: Env) -> None:
    # Regression: every 2-byte chunk was kept as its own bytes object and cost a parser
    # step; an 8 MB body was half a gigabyte and 25 s of CPU.
    lx = env.start({"a": env.model("a")})
    body = b'{"model": "a", "pad": "' + b"x" * 80_000 + b'"}'
    chunks = b"".join(llmux.encode_chunk(body[i:i + 2]) for i in range(0, len(body), 2))
    reply = raw_exchange(lx.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                                  b"Transfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:80]
    error = json.loads(reply.partition(b"\r\n\r\n")[2])["error"]
    assert error["code"] == "body_too_fragmented"
    assert error["message"].startswith("request body arrives in too many small pieces; expected at most "
                                       "4096 pieces plus one per 256 bytes; got 4129 for 8258 bytes")
    assert lx.chat("a")[0] == 200
    assert env.lines() == ["wake-start a", "wake-end a", "req a"]  # the chunked one never reached it


def test_chunked_body_is_held_in_one_buffer() -> None:
    # Regression: read_request kept every chunk as its own bytes object, then joined them:
    # the body was held twice, plus 30-odd bytes per chunk.
    import tracemalloc
    body = b"x" * 4_000_000
    wire = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"".join(llmux.encode_chunk(body[i:i + 1000]) for i in range(0, len(body), 1000)) + b"0\r\n\r\n")

    async def go() -> Tuple[int, int]:
        ours, theirs = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=ours)
        loop = asyncio.get_running_loop()
        theirs.setblocking(False)
        sending = loop.create_task(loop.sock_sendall(theirs, wire))
        tracemalloc.start()
        try:
            head, got = await llmux.read_request(reader, writer, llmux.RequestParser(), llmux.HttpConfig())
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        await sending
        writer.close()
        theirs.close()
        assert bytes(got) == body
        return len(got), peak

    size, peak = run_checked(go())
    assert peak < 1.5 * size, f"peak {peak} bytes for a {size}-byte body"  # was 2.1 times


def test_body_budget_gives_503_then_returns_the_bytes(env: Env) -> None:
    # Regression: nothing bounded the bodies held together (50 clients x 60 MB queued for
    # a waking model pushed RSS past 3 GiB).
    gate = env.gate("a")
    lx = env.start({"a": env.model("a", wake_extra=f"while [ ! -e {gate} ]; do sleep 0.01; done")},
                   http={"max_body_bytes": 100_000, "max_buffered_bytes": 250_000})
    body = json.dumps({"model": "a", "pad": "x" * 90_000}).encode()
    held = [run_bg(lx.request, "POST", "/v1/chat/completions", body) for _ in range(2)]
    wait_for(lambda: lx.health()["models"]["a"]["queued"] == 2, "two requests queued")
    # A third by length is refused before its body is read; a chunked one as it grows.
    status, headers, payload = lx.request("POST", "/v1/chat/completions", body)
    assert status == 503 and headers["retry-after"] == "1"
    assert payload["error"]["code"] == "server_busy" and payload["error"]["type"] == "server_error"
    assert payload["error"]["message"] == ("too many request bodies held now (180050 of 250000 bytes "
                                           "buffered); retry later")
    reply = raw_exchange(lx.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                         + llmux.encode_chunk(body) + b"0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1\r\n" in reply
    gate.touch()
    assert [join(*h)[0] for h in held] == [200, 200]  # nothing already accepted was lost
    for _ in range(3):  # the bytes came back: one at a time fits again and again
        assert lx.request("POST", "/v1/chat/completions", body)[0] == 200


def test_trickled_body_is_cut_at_the_minimum_rate(env: Env) -> None:
    # Regression: body_timeout_secs bounded each pause only; one byte a second held the
    # connection for ever.
    lx = env.start({"a": env.model("a")}, http={"body_timeout_secs": 0.5, "min_body_rate_bytes_per_sec": 1000})
    with socket.create_connection(("127.0.0.1", lx.port), timeout=T) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{")
        deadline = time.monotonic() + T
        reply = b""
        while not reply and time.monotonic() < deadline:
            if select.select([s], [], [], 0.2)[0]:  # the trickle's pace, under body_timeout_secs
                reply = s.recv(65536)
            else:
                s.sendall(b" ")
    assert reply.startswith(b"HTTP/1.1 408 "), reply[:80]
    message = json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["message"]
    assert re.fullmatch(r"request body arrives too slowly; expected at least 1000 bytes/s after the "
                        r"first 0.5s; got \d+ bytes in \ds", message), message
    assert lx.chat("a")[0] == 200


def _trickle(port: int) -> bytes:
    """A body one byte at a time, each pause under body_timeout_secs; what llmux answers."""
    with socket.create_connection(("127.0.0.1", port), timeout=T) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{")
        deadline = time.monotonic() + T
        while time.monotonic() < deadline:
            if select.select([s], [], [], 0.1)[0]:
                return s.recv(65536)
            s.sendall(b" ")
    return b""


def test_memory_hostile_clients_all_get_a_status_and_the_server_keeps_serving(env: Env) -> None:
    """Live: tiny chunks, more bodies at once than the budget holds, and trickles, all
    together against a real llmux: every client gets a status, memory stays bounded, and
    llmux serves normally afterwards."""
    gate = env.gate("a")
    lx = env.start({"a": env.model("a", wake_extra=f"while [ ! -e {gate} ]; do sleep 0.01; done")},
                   http={"max_body_bytes": 700_000, "max_buffered_bytes": 1_500_000,
                         "body_timeout_secs": 0.3, "min_body_rate_bytes_per_sec": 10_000})
    big = json.dumps({"model": "a", "pad": "x" * 600_000}).encode()
    tiny = b"".join(llmux.encode_chunk(big[i:i + 1]) for i in range(20_000))
    post = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
    jobs = [run_bg(raw_exchange, lx.port, post + b"Content-Length: %d\r\n\r\n" % len(big) + big) for _ in range(6)]
    jobs += [run_bg(raw_exchange, lx.port, post + b"Transfer-Encoding: chunked\r\n\r\n" + tiny) for _ in range(4)]
    jobs += [run_bg(_trickle, lx.port) for _ in range(2)]
    wait_for(lambda: lx.log_count(r"request\.rejected status=(503|400|408)") == 10, "the refusals")
    assert lx.health()["models"]["a"]["queued"] == 2  # what the budget took is still held
    gate.touch()
    statuses = sorted(join(*job)[9:12].decode() for job in jobs)
    assert statuses == ["200"] * 2 + ["400"] * 4 + ["408"] * 2 + ["503"] * 4, statuses
    assert lx.chat("a")[0] == 200 and lx.health()["models"]["a"]["in_flight"] == 0
    with open(f"/proc/{lx.proc.pid}/status") as f:
        peak_kb = int(next(line for line in f if line.startswith("VmHWM:")).split()[1])
    assert peak_kb < 200_000, f"llmux peaked at {peak_kb} kB"


def test_full_connection_table_evicts_the_longest_idle_connection(env: Env) -> None:
    # Regression: idle connections filled the table and every later client, health checks
    # included, got 503 until they timed out.
    gate = env.gate("a")
    lx = env.start({"a": env.model("a", wake_extra=f"while [ ! -e {gate} ]; do sleep 0.01; done")},
                   http={"max_connections": 3})
    conns = [socket.create_connection(("127.0.0.1", lx.port), timeout=T)]
    try:
        # The oldest connection has a request in progress (queued for a waking model):
        # it is never evicted, however long it waits.
        busy = conns[0]
        busy.sendall(b'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 14\r\n\r\n{"model": "a"}')
        wait_for(lambda: lx.health()["models"]["a"]["queued"] == 1, "the request queued")
        idle = [socket.create_connection(("127.0.0.1", lx.port), timeout=T) for _ in range(2)]
        conns += idle
        for s in idle:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
        # A newcomer closes the connection idle longest, and is served.
        assert raw_exchange(lx.port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n") \
            .startswith(b"HTTP/1.1 200 ")
        assert idle[0].recv(65536) == b""
        idle[1].sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert idle[1].recv(65536).startswith(b"HTTP/1.1 200 ")
        lx.wait_log(r"connection\.evicted reason=max_connections")  # the log may lag
        assert lx.log_count(r"connection\.evicted reason=max_connections") == 1
        gate.touch()
        assert busy.recv(65536).startswith(b"HTTP/1.1 200 ")
    finally:
        for s in conns:
            s.close()


_GATED_REQUEST = b'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 14\r\n\r\n{"model": "a"}'


def _gated_llmux(env: Env, **http: Any) -> Tuple[Llmux, Path, Callable[[str], socket.socket]]:
    """llmux whose model's wake waits for the gate (a request to it stays in progress),
    and a connect from a given source address."""
    gate = env.gate("a")
    lx = env.start({"a": env.model("a", wake_extra=f"while [ ! -e {gate} ]; do sleep 0.01; done")}, http=http)

    def connect(source: str) -> socket.socket:
        return socket.create_connection(("127.0.0.1", lx.port), timeout=T, source_address=(source, 0))

    return lx, gate, connect


def test_connections_per_peer_are_capped_and_loopback_is_not(env: Env) -> None:
    lx, gate, connect = _gated_llmux(env, max_connections_per_peer=2)
    request = _GATED_REQUEST
    held = [connect("127.0.0.2") for _ in range(2)]
    try:
        for s in held:  # requests in progress: not evictable
            s.sendall(request)
        wait_for(lambda: lx.health()["models"]["a"]["queued"] == 2, "both requests queued")
        with connect("127.0.0.2") as third:
            third.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = third.recv(65536)
        assert reply.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in reply
        assert json.loads(reply.partition(b"\r\n\r\n")[2])["error"]["message"] == \
            "too many connections from 127.0.0.2; expected at most 2 per client address; retry later"
        # Other addresses, and 127.0.0.1 (a reverse proxy on this host) however many, go on.
        for s in [connect("127.0.0.1") for _ in range(3)] + [connect("127.0.0.3")]:
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
            s.close()
        gate.touch()
        for s in held:
            assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
    finally:
        for s in held:
            s.close()


def test_a_connect_flood_from_one_address_does_not_pause_accepting_for_others(env: Env) -> None:
    # Regression: refusals by the per-peer cap counted against ACCEPT_BATCH, so one address
    # opening connections faster than they were refused paused accepting for every client.
    lx, gate, connect = _gated_llmux(env, max_connections_per_peer=1)
    request = _GATED_REQUEST
    held = connect("127.0.0.2")
    flood: List[socket.socket] = []
    try:
        held.sendall(request)  # in progress: not evictable
        wait_for(lambda: lx.health()["models"]["a"]["queued"] == 1, "the held request queued")
        flood = [connect("127.0.0.2") for _ in range(300)]
        with connect("127.0.0.3") as other:  # while the flood is being refused
            other.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert other.recv(65536).startswith(b"HTTP/1.1 200 ")
        answered = unanswered = 0
        for s in flood:  # each is answered 503 or closed: none hangs
            try:
                reply = s.recv(65536)
            except ConnectionResetError:
                reply = b""
            if reply:
                assert reply.startswith(b"HTTP/1.1 503 "), reply[:200]
                answered += 1
            else:
                unanswered += 1
        assert answered >= 1 and unanswered >= 1, (answered, unanswered)
        samples = {(name, tuple(sorted(labels.items()))): value
                   for f in parse_prometheus(lx.request("GET", "/metrics")[2].decode()).values()
                   for name, labels, value in f["samples"]}
        assert samples.get(("llmux_accept_paused_total", ()), 0) == 0
        refused = {k[1]: v for k, v in samples.items() if k[0] == "llmux_connections_refused_total"}
        assert refused == {(("reason", "max_connections_per_peer"),): answered,
                           (("reason", "peer_flood"),): unanswered}, refused
        assert lx.log_count(r"accept\.paused") == 0
        gate.touch()
        assert held.recv(65536).startswith(b"HTTP/1.1 200 ")
    finally:
        for s in flood + [held]:
            s.close()


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux", reason="RLIMIT_NOFILE as on Linux")
@pytest.mark.parametrize("soft, hard, fd_limit, max_connections", [
    (200, 200, 200, 52),  # cannot raise: max_connections is clamped under it
    (256, 4096, 2144, 1024),  # raised as far as 1024 connections need, not to the hard limit
])
def test_fd_limit_is_raised_and_max_connections_kept_under_it(tmp_path: Path, soft: int, hard: int,
                                                              fd_limit: int, max_connections: int) -> None:
    import resource

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))

    backend = Backend("a", None)
    lx = Llmux({"models": {"a": {"port": backend.port}}}, tmp_path, preexec_fn=limit)
    try:
        line = lx.wait_log(r".*limits\.connections .*").group(0)
        assert f"max_connections={max_connections} configured=1024 fd_limit={fd_limit} " in line
        assert (" warning " in f" {line} ") == (max_connections < 1024)
        with open(f"/proc/{lx.proc.pid}/limits") as f:
            row = next(r for r in f if r.startswith("Max open files"))
        assert row.split()[3:5] == [str(fd_limit), str(hard)]
        assert lx.request("GET", "/health")[0] == 200
    finally:
        lx.stop()
        backend.stop()
        lx.assert_clean()


@pytest.mark.parametrize("data", [
    bytes(range(256)),
    b"\x00" * 100,
    random.Random(7).randbytes(4000) if hasattr(random.Random, "randbytes") else os.urandom(4000),
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    b"A" + bytes(range(128, 256)),  # starts like a method, then binary
], ids=["all-bytes", "nuls", "random", "http2-preface", "method-then-binary"])
def test_non_http_bytes_get_400_and_close(env: Env, data: bytes) -> None:
    lx = env.start({"a": env.model("a")})
    reply = raw_exchange(lx.port, data)
    assert reply.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 505 ")), reply[:60]
    assert lx.chat("a")[0] == 200


@pytest.mark.parametrize("fault, status, message", [
    ("bad-status", 502, "model 'a' backend sent an invalid response: malformed status line"),
    ("bad-header", 502, "model 'a' backend sent an invalid response: invalid header line"),
    ("not-http", 502, "model 'a' backend sent an invalid response: "),
])
def test_backend_sending_broken_http_gives_502(env: Env, fault: str, status: int, message: str) -> None:
    lx = env.start({"a": env.model("a")})
    got, _, payload = lx.request("POST", f"/fault/{fault}", {"model": "a"})
    assert got == status and payload["error"]["message"].startswith(message)
    assert lx.chat("a")[0] == 200
    assert lx.health()["models"]["a"]["in_flight"] == 0


@pytest.mark.parametrize("raw, message", [
    ("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
     "backend switched protocols (101); expected a final http/1.1 response"),
    ("HTTP/1.1 200 OK\nContent-Length: 2\n\nok", "bare LF in message head; expected CRLF line endings"),
    ("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
     "unsupported transfer coding 'gzip' in response; expected chunked"),
    ("HTTP/1.1 200 OK\r\nX-Pad: " + "a" * 120_000 + "\r\nContent-Length: 2\r\n\r\nok",
     "response head too large; expected at most 65536 bytes"),
], ids=["101", "bare-lf", "gzip-chunked", "huge-head"])
def test_backend_protocol_faults_give_a_prompt_502(env: Env, raw: str, message: str) -> None:
    # The backend keeps its connection open: the 502 must not wait for a close or a
    # timeout (upstream_timeout_secs is long), and the connection is not reused.
    lx = env.start({"a": env.model("a")}, policy={"upstream_timeout_secs": 20})
    status, _, payload = lx.request("POST", "/fault/raw", {"model": "a", "raw": raw})
    assert status == 502, payload
    assert payload["error"]["message"].startswith(f"model 'a' backend sent an invalid response: {message}")
    assert payload["error"]["type"] == "server_error"
    raw_peer = int(env.lines()[-1].split()[1])
    status, _, payload = lx.request("POST", "/v1/chat/completions", {"model": "a", "echo": True})
    assert status == 200 and payload["peer"] != raw_peer
    assert lx.health()["models"]["a"]["in_flight"] == 0


def test_backend_204_with_a_length_is_forwarded_bare_and_not_reused(env: Env) -> None:
    # Used to forward "content-length: 5", drop the stray bytes and reuse the connection.
    lx = env.start({"a": env.model("a")})
    status, headers, payload = lx.request(
        "POST", "/fault/raw", {"model": "a", "raw": "HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello"})
    assert (status, payload) == (204, b"") and "content-length" not in headers
    raw_peer = int(env.lines()[-1].split()[1])
    status, _, payload = lx.request("POST", "/v1/chat/completions", {"model": "a", "echo": True})
    assert status == 200 and payload["peer"] != raw_peer


def test_thousands_of_trailers_are_refused_cleanly_both_ways(env: Env) -> None:
    # Used to raise RecursionError: no answer to the client, a traceback on stderr.
    lx = env.start({"a": env.model("a")})
    trailers = "".join(f"t{i}: 1\r\n" for i in range(1000))
    body = json.dumps({"model": "a"}).encode()
    reply = raw_exchange(lx.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n%s\r\n"
                         % (len(body), body, trailers.encode()))
    assert reply.startswith(b"HTTP/1.1 431 ") and b"too many trailer fields" in reply, reply[:300]
    assert b'"code":"headers_too_large"' in reply, reply  # regression (attack): as the head's 431s
    reply = raw_exchange(lx.port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\nt: %s\r\n\r\n"
                         % (len(body), body, b"x" * llmux.MAX_TRAILER_BYTES))
    assert reply.startswith(b"HTTP/1.1 431 ") and b'"code":"headers_too_large"' in reply, reply
    raw = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n" + trailers + "\r\n"
    conn = lx.conn()
    conn.request("POST", "/fault/raw", body=json.dumps({"model": "a", "raw": raw}))
    resp = conn.getresponse()
    assert resp.status == 200  # the head had gone out before the trailers came
    with pytest.raises(http.client.IncompleteRead):
        resp.read()  # cut, never completed as if it succeeded
    conn.close()
    lx.wait_log(r"request\.cut .*too many trailer fields")
    assert lx.chat("a")[0] == 200


def test_backend_that_never_reads_the_body_still_answers(env: Env) -> None:
    lx = env.start({"a": env.model("a")})
    body = json.dumps({"model": "a", "pad": "x" * 8_000_000}).encode()  # more than socket buffers hold
    status, _, payload = lx.request("POST", "/fault/no-read", body)
    assert status == 200 and payload == b"no-read!"


def test_backend_stalling_before_headers_gives_504(env: Env) -> None:
    lx = env.start({"a": env.model("a")}, policy={"upstream_timeout_secs": 0.3})
    status, _, payload = lx.request("POST", f"/fault/stall:{env.gate('a')}", {"model": "a"})
    assert status == 504
    assert payload["error"] == {"message": "model 'a' backend sent nothing for 0.3s",
                                "type": "server_error", "code": "upstream_timeout"}
    assert lx.health()["models"]["a"]["in_flight"] == 0  # the timeout released the slot
    env.gate("a").touch()
    assert lx.chat("a")[0] == 200


@pytest.mark.parametrize("wake, message", [
    ("echo 'no weights' >&2; exit 4", "hook 'wake' for model 'b' exited 4: no weights"),
    ("echo dying >&2; kill -9 $$", "hook 'wake' for model 'b' was killed by signal 9 (SIGKILL): dying"),
    ("echo stuck >&2; sleep 60", "hook 'wake' for model 'b' timed out after "),
    ("/no/such/script.sh", "hook 'wake' for model 'b' exited 127: "),
    ("head -c 2000000 /dev/zero | tr '\\0' 'y'; echo; echo last words >&2; exit 1",
     "hook 'wake' for model 'b' exited 1: last words"),
])
def test_hook_faults_give_503_one_log_line_and_recovery(env: Env, wake: str, message: str) -> None:
    ok = env.tmp / "ok"
    lx = env.start({"a": env.model("a"), "b": env.model("b", wake_extra=f"[ -e {ok} ] || {{ {wake}; }} || exit $?")},
                   policy={"hook_timeout_secs": 1})
    assert lx.chat("a")[0] == 200
    status, payload = lx.chat("b")
    assert status == 503 and payload["error"]["message"].startswith(message)
    lx.wait_log(r"error hook\.exit model=b hook=wake")  # the log may lag the answer
    assert lx.log_count(r"error hook\.exit model=b hook=wake") == 1
    ok.touch()
    assert lx.chat("b")[1]["backend"] == "b"


FUZZ_SEEDS = [
    b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 14\r\n\r\n{\"model\": \"a\"}",
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"7\r\n{\"model\r\n7;x=y\r\n\": \"a\"}\r\n0\r\nTrailer: 1\r\n\r\n",
    b"GET /health HTTP/1.1\r\nHost: x\r\n\r\nGET /v1/models HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"POST /v1/chat/completions HTTP/1.0\r\nContent-Length: 14\r\nConnection: keep-alive\r\n\r\n{\"model\": \"a\"}",
    b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
    b"Content-Type: multipart/form-data; boundary=B\r\nContent-Length: 58\r\n\r\n"
    b"--B\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\na\r\n--B--",
]
FUZZ_BYTES = [b"\r", b"\n", b"\r\n", b"\x00", b" ", b"\t", b":", b";", b",", b"0", b"f", b"-", b"+",
              b"\xff", b"Transfer-Encoding: chunked\r\n", b"Content-Length: 5\r\n", b"Content-Length: 99999999\r\n",
              b"\r\n\r\n", b"HTTP/1.1", b"ffffffffffffffffff\r\n", b" chunked"]


def fuzz_input(rng: random.Random) -> bytes:
    """A seed request mutated a few times, or random bytes."""
    if rng.random() < 0.1:
        return bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 300)))
    data = bytearray(rng.choice(FUZZ_SEEDS))
    for _ in range(rng.randint(0, 4)):
        at = rng.randrange(len(data) + 1)
        op = rng.random()
        if op < 0.3 and data:
            data[min(at, len(data) - 1)] = rng.getrandbits(8)
        elif op < 0.6:
            data[at:at] = rng.choice(FUZZ_BYTES)
        elif op < 0.8:
            del data[at:at + rng.randint(1, 8)]
        else:
            end = min(len(data), at + rng.randint(1, 40))
            data[at:at] = data[at:end]
    return bytes(data)


def random_split(rng: random.Random, data: bytes) -> List[bytes]:
    cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(0, 10)))) if len(data) > 1 else []
    return [data[i:j] for i, j in zip([0] + cuts, cuts + [len(data)])]


def test_fuzz_parser_gives_the_same_events_however_the_bytes_are_split(capsys: Any) -> None:
    rng = random.Random(20261122)
    count, started = 0, time.monotonic()
    while count < 4000:
        data = fuzz_input(rng)
        whole = parse_all(llmux.RequestParser(max_body=10_000), [data])
        assert parse_all(llmux.RequestParser(max_body=10_000), random_split(rng, data)) == whole, data
        assert _collect(llmux.RequestParser(max_body=10_000), [data], whole_bodies=True) == \
            _collect(llmux.RequestParser(max_body=10_000), [data]), data  # whole_body, as read_request
        count += 1
    rate = count / (time.monotonic() - started)
    with capsys.disabled():
        print(f"\n[fuzz] parser: {count} inputs, {rate:.0f} inputs/s (each parsed whole and split)")


def _grammar_fields(rng: random.Random, n: int) -> List[bytes]:
    """``n`` header or trailer lines, now and then a broken one."""
    if n > 200:  # many: cheap to make, one of them maybe broken
        out = [b"x-%d: v" % i for i in range(n)]
        if rng.random() < 0.2:
            out[rng.randrange(n)] = b" folded"
        return out
    out = []
    for i in range(n):
        r = rng.random()
        if r < 0.01:
            out.append(rng.choice([b" folded", b"\tfolded", b"X A: 1", b"X-A : 1", b"X-A", b": v",
                                   b"X-A: a\x00b", b"X-A: a\x7fb", b"X\x01A: 1"]))
        elif r < 0.5:
            out.append(b"x-%d: %s" % (i, b"v" * rng.randint(0, 3)))
        else:
            out.append(b"%s:%s%s%s" % (rng.choice([b"a", b"X-Pad", b"Accept"]), rng.choice([b"", b" ", b"\t "]),
                                       b"v" * rng.randint(0, 20), rng.choice([b"", b" ", b"\t"])))
    return out


def _grammar_count(rng: random.Random, limit: int) -> int:
    """A count near zero, near ``limit``, or far past it."""
    r = rng.random()
    if r < 0.6:
        return rng.randint(0, 3)
    if r < 0.9:
        return limit + rng.randint(-2, 2)
    return rng.randint(limit, 3000)


def _grammar_body(rng: random.Random, framing: str) -> bytes:
    if framing == "length":
        return b"b" * rng.randint(0, 40)
    if framing != "chunked":
        return b""
    many = rng.random() < 0.1
    chunks = rng.randint(1000, 30_000) if many else rng.randint(0, 4)
    exts = [b";a=1", b";a", b" ;x=\"q\"", b";\x01"] + ([] if many else [b";" + b"e" * rng.randint(4000, 4100)])
    sizes = rng.choices(range(1, 4) if many else range(1, 41), k=chunks)
    marks = set(rng.sample(range(chunks), min(chunks, rng.randint(0, 3))))  # extensions
    out = [b"%x%s\r\n%s\r\n" % (size, rng.choice(exts) if i in marks else b"", b"c" * size)
           for i, size in enumerate(sizes)]
    out.append(b"0" + (b";last" if rng.random() < 0.1 else b"") + b"\r\n")
    out.extend(line + b"\r\n" for line in _grammar_fields(rng, _grammar_count(rng, llmux.MAX_TRAILER_LINES)))
    out.append(b"\r\n")
    return b"".join(out)


def _grammar_framing(rng: random.Random) -> Tuple[List[bytes], str]:
    """Framing headers and what the body should look like (maybe contradicting them)."""
    return rng.choice([
        ([], "none"), ([b"Content-Length: %d"], "length"), ([b"Transfer-Encoding: chunked"], "chunked"),
        ([b"Transfer-Encoding: Chunked"], "chunked"), ([b"Content-Length: %d", b"Content-Length: %d"], "length"),
        ([b"Content-Length: %d", b"Transfer-Encoding: chunked"], "chunked"),
        ([b"Transfer-Encoding: gzip, chunked"], "chunked"), ([b"Transfer-Encoding: chunked, chunked"], "chunked"),
        ([b"Transfer-Encoding: gzip"], "length"), ([b"Content-Length: 1, 2"], "length"),
        ([b"Content-Length: +3"], "length"), ([b"Transfer-Encoding: chunked", b"Transfer-Encoding: gzip"], "chunked"),
    ])


def grammar_message(rng: random.Random, response: bool) -> bytes:
    """One structured request or response: its start line, fields, framing and body."""
    framing_fields, framing = _grammar_framing(rng)
    body = _grammar_body(rng, framing)
    fields = [f % len(body) if b"%d" in f else f for f in framing_fields]
    fields += _grammar_fields(rng, _grammar_count(rng, llmux.MAX_HEADER_COUNT))
    rng.shuffle(fields)
    if response:
        interim = b"HTTP/1.1 100 Continue\r\n\r\n" * (rng.randint(0, 20) if rng.random() < 0.2 else 0)
        start = interim + rng.choice([b"HTTP/1.1 200 OK", b"HTTP/1.0 200 OK", b"HTTP/1.1 204 No Content",
                                      b"HTTP/1.1 304 Not Modified", b"HTTP/1.1 101 Switching Protocols",
                                      b"HTTP/1.1 103 Early Hints", b"HTTP/1.1 500", b"HTTP/2 200 OK"])
    else:
        fields.insert(rng.randint(0, len(fields)), b"Host: x")
        start = b"%s /%s %s" % (rng.choice([b"POST", b"GET", b"HEAD", b"P\xffST"]),
                                b"t" * (rng.randint(0, 30) if rng.random() < 0.9 else
                                        llmux.MAX_REQUEST_LINE + rng.randint(-20, 2)),
                                rng.choice([b"HTTP/1.1", b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.1 "]))
    data = bytearray(start + b"\r\n" + b"".join(f + b"\r\n" for f in fields) + b"\r\n" + body)
    r = rng.random()
    if r < 0.15:  # a bare CR or LF, or a CRLF cut in half, anywhere
        at = rng.randrange(len(data) + 1)
        data[at:at] = rng.choice([b"\r", b"\n", b"\x00"])
    elif r < 0.25:
        crlfs = [m.start() for m in re.finditer(rb"\r\n", bytes(data[:2000]))]
        if crlfs:
            del data[rng.choice(crlfs) + rng.randint(0, 1)]
    return bytes(data)


def _collect(parser: Any, pieces: List[bytes], whole_bodies: bool = False) -> List[Any]:
    """parse_all's events, with body pieces joined once (parse_all's += is quadratic).
    With ``whole_bodies``, after each head the body is asked for at once, as read_request
    and the relay do (whole_body: it must give the events' body and end, or None)."""
    events: List[Any] = []
    body: List[bytes] = []
    one_response = isinstance(parser, llmux.ResponseParser)

    def drain() -> bool:
        while True:
            try:
                ev = parser.next_event()
            except llmux.HTTPError as e:
                ev = ("error", e.status)
            if type(ev) is llmux.Body:
                body.append(ev.data)
                continue
            if ev is llmux.NEED_DATA:
                return True
            if body:
                events.append(("body", b"".join(body)))
                body.clear()
            if isinstance(ev, tuple) and not hasattr(ev, "_fields"):  # ("error", status)
                events.append(ev)
                return False
            if ev is None:
                events.append("closed")
                return False
            if ev is llmux.EndOfMessage:
                events.append("end")
                if one_response:
                    return False
            elif isinstance(ev, llmux.RequestHead):
                events.append(("head", ev.method, ev.target, ev.version, ev.keep_alive))
            else:
                events.append(("response", ev.status, ev.keep_alive))
            if whole_bodies and (isinstance(ev, llmux.RequestHead) or (
                    isinstance(ev, llmux.ResponseHead) and ev.status >= 200)):
                whole = parser.whole_body()
                if whole is not None:
                    if whole:
                        events.append(("body", whole))
                    events.append("end")
                    if one_response:
                        return False

    for piece in pieces:
        parser.feed(piece)
        if not drain():
            return events
    if not (one_response and "end" in events):
        parser.feed_eof()
        drain()
    if body:
        events.append(("body", b"".join(body)))
    return events


def _drive(parser: Any, pieces: List[bytes], seed: int, whole_bodies: bool = False) -> List[Any]:
    """parse_all, failing with the seed on anything but HTTPError, then the invariants:
    a broken parser stays broken, and the loop did bounded work per byte."""
    try:
        events = _collect(parser, pieces, whole_bodies)
    except Exception as e:  # noqa: B902 - reported with the seed
        raise AssertionError(f"seed {seed}: {type(parser).__name__} raised {e!r}") from e
    fed = sum(map(len, pieces))
    assert parser.steps <= 2 * fed + 3 * len(pieces) + 8, f"seed {seed}: {parser.steps} steps for {fed} bytes"
    if events and events[-1][0] == "error":
        with pytest.raises(llmux.HTTPError) as first:
            parser.next_event()
        parser.feed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        with pytest.raises(llmux.HTTPError) as again:
            parser.next_event()
        assert again.value is first.value, f"seed {seed}: parser recovered after an error"
    return events


def test_pipelined_messages_give_the_same_events_with_bodies_taken_whole() -> None:
    """Exploring whole_body (a length-framed body taken with its end in one step, as
    read_request and the relay do): valid requests pipelined in random splits, and a
    response with bytes after it, give the events the generator made them from."""
    for seed in range(300):
        rng = random.Random(seed)
        data, expected = b"", []  # type: Tuple[bytes, List[Any]]
        for _ in range(rng.randint(1, 6)):
            body = bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 1, 5, 300])))
            kind = rng.choice(["length", "length", "none", "chunked"])
            method = "GET" if kind == "none" else "POST"
            data += b"%s /t HTTP/1.1\r\nHost: x\r\n" % method.encode()
            if kind == "length":
                data += b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            elif kind == "chunked":
                data += b"Transfer-Encoding: chunked\r\n\r\n" + (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
            else:
                data += b"\r\n"
                body = b""
            expected += [("head", method, "/t", "HTTP/1.1", True)] + ([("body", body)] if body else []) + ["end"]
        expected.append("closed")
        for whole_bodies in (False, True):
            got = _drive(llmux.RequestParser(max_body=10_000), random_split(rng, data), seed, whole_bodies)
            assert got == expected, f"seed {seed} (whole_bodies={whole_bodies}): {got} != {expected}"
        body = bytes(rng.getrandbits(8) for _ in range(rng.choice([0, 3, 200])))
        after = rng.choice([b"", b"HTTP/1.1 200 OK\r\n\r\n", b"x"])
        answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body) + after
        for whole_bodies, pieces in ((False, random_split(rng, answer)), (True, random_split(rng, answer)),
                                     (True, [answer])):
            parser = llmux.ResponseParser("POST")
            got = _drive(parser, pieces, seed, whole_bodies)
            assert got == [("response", 200, True)] + ([("body", body)] if body else []) + ["end"], \
                f"seed {seed} (whole_bodies={whole_bodies}): {got}"
            if len(pieces) == 1:  # (a split's later pieces are not fed after the end)
                assert parser.buffered == len(after), f"seed {seed}: the bytes after the answer are not left"


def test_fuzz_grammar_parser_invariants_whole_split_and_byte_by_byte(capsys: Any) -> None:
    """Structured requests (pipelined too) and responses: deep header counts, thousands
    of trailers, tens of thousands of tiny chunks, chunk extensions, obs-fold, bare CR
    and LF anywhere, CL/TE combinations.  The events must not depend on how the bytes
    are split, nor on a body being taken whole after its head; only HTTPError may be raised; a broken parser stays broken; the parser's
    loop iterations stay within a constant times the bytes fed."""
    master = random.Random(20261201)
    count, total, started = 0, 0, time.monotonic()
    while count < 450:
        seed = master.getrandbits(32)
        rng = random.Random(seed)
        response = rng.random() < 0.4
        if response:
            data = grammar_message(rng, True)
            method = rng.choice(["GET", "POST", "HEAD"])
            make: Any = lambda: llmux.ResponseParser(method)
        else:
            data = b"".join(grammar_message(rng, False) for _ in range(rng.choice([1, 1, 2, 3])))
            make = lambda: llmux.RequestParser(max_body=100_000)
        whole = _drive(make(), [data], seed)
        assert _drive(make(), random_split(rng, data), seed) == whole, f"seed {seed}: random split differs"
        # A body taken whole after its head (read_request, the relay) is the events' body.
        assert _drive(make(), [data], seed, True) == whole, f"seed {seed}: whole_body differs"
        assert _drive(make(), random_split(rng, data), seed, True) == whole, \
            f"seed {seed}: whole_body of a random split differs"
        if len(data) <= 2000:
            pieces = [data[i:i + 1] for i in range(len(data))]
        else:  # byte by byte for the large ones is slow in the test, not in the parser
            step = rng.randint(1, 7)
            pieces = [data[i:i + step] for i in range(0, len(data), step)]
        assert _drive(make(), pieces, seed) == whole, f"seed {seed}: byte by byte differs"
        count += 1
        total += len(data)
    # Bare CR, bare LF and NUL at every position of a request and a response.
    for make, data in ((lambda: llmux.RequestParser(), chunked_request(b"2;e=1\r\nhi\r\n0\r\nT: 1\r\n\r\n")),
                       (lambda: llmux.ResponseParser("POST"), chunked_response(b"2\r\nhi\r\n0\r\nT: 1\r\n\r\n"))):
        for at in range(len(data) + 1):
            for byte in (b"\r", b"\n", b"\x00"):
                bad = data[:at] + byte + data[at:]
                whole = _drive(make(), [bad], at)
                assert _drive(make(), [bad[i:i + 1] for i in range(len(bad))], at) == whole, (at, byte)
                assert whole[-1][0] == "error" or bad.startswith(data), (at, byte, whole)  # or stray
    rate = total / (time.monotonic() - started) / 1e6
    with capsys.disabled():
        print(f"\n[fuzz] grammar: {count} messages, {total / 1e6:.1f} MB, {rate:.1f} MB/s (3 splits each)")


def _fuzz_json_text(rng: random.Random, depth: int = 0) -> str:
    """A random JSON value as text: nesting, escapes, whitespace, unicode, duplicate keys."""
    ws = lambda: rng.choice(["", "", " ", "\n  ", "\t", " \r\n "])  # noqa: E731
    kind = rng.random() if depth < 6 else rng.random() * 0.5
    if kind < 0.2:
        return json.dumps(rng.choice([0, -1.5e3, 12, True, False, None]))
    if kind < 0.5:
        chars = rng.choice(["abc", "model", '"\\/[]{}:,', "\u00e9\u4e2d\U0001f600", "\n\t\x01", "x" * 3000])
        text = "".join(rng.choice(chars) for _ in range(rng.randint(0, 12)))
        return json.dumps(text, ensure_ascii=rng.random() < 0.5)
    if kind < 0.7:
        return "[" + ws() + ("," + ws()).join(_fuzz_json_text(rng, depth + 1) for _ in range(rng.randint(0, 4))) + ws() + "]"
    members = []
    for _ in range(rng.randint(0, 5)):
        key = rng.choice(["model", "model", "messages", "a", "mod", "models", "\u00e9", "[", "\\"])
        text = json.dumps(key, ensure_ascii=rng.random() < 0.5)
        if key == "model" and rng.random() < 0.5:  # the same key, escaped
            text = '"' + "".join(f"\\u{ord(c):04x}" if rng.random() < 0.5 else c for c in key) + '"'
        members.append(text + ws() + ":" + ws() + _fuzz_json_text(rng, depth + 1))
    return "{" + ws() + ("," + ws()).join(members) + ws() + "}"


def _expected_model(doc: Any) -> Any:
    if not isinstance(doc, dict):
        return "not an object"
    if "model" not in doc:
        return None
    value = doc["model"]
    return value if isinstance(value, str) else "not a string"


def _scanned_model(body: bytes) -> Tuple[Any, int]:
    """What the scanner says, in _expected_model's terms, and the steps it took (counted
    as yields, JSON_SCAN_SLICE steps each)."""
    steps = llmux._json_model_steps(body)
    yields = 0
    try:
        while True:
            next(steps)
            yields += 1
    except StopIteration as done:
        value = done.value
    except llmux._NotAnObject:
        return "not an object", yields
    return ("not a string" if isinstance(value, llmux._NotString) else value), yields


def test_fuzz_json_model_scanner_agrees_with_json_loads(capsys: Any) -> None:
    """Exploring: random documents (and mutations of them) through the scanner.  Where
    json.loads succeeds the scanner names the same model; elsewhere it may only raise
    ValueError; and its steps are bounded by the body's strings, not its size squared."""
    seed = int(os.environ.get("LLMUX_FUZZ_SEED", "20261201"))
    rng = random.Random(seed)
    checked = invalid = 0
    for i in range(3000):
        top = _fuzz_json_text(rng)
        if top.startswith("{") and rng.random() < 0.7:  # a model member first; maybe others later
            top = '{"model": ' + _fuzz_json_text(rng, 5) + ("" if top.rstrip().endswith("{}") else ", ") + top[1:]
        body = (top if rng.random() < 0.9 else " \n" + top + "\t").encode("utf-8", "surrogatepass")
        if rng.random() < 0.2:  # mutate: flip, cut or duplicate bytes
            b = bytearray(body)
            at = rng.randrange(len(b) + 1)
            b[at:at + rng.randint(0, 3)] = rng.choice([b"", b'"', b"\\", b"[", b"}", b",", bytes(b[at:at + 20])])
            body = bytes(b)
        where = f"seed {seed} case {i}: {body[:200]!r}"
        try:
            expected = _expected_model(json.loads(body))
        except (ValueError, RecursionError):
            expected = ValueError
        try:
            got, yields = _scanned_model(body)
        except ValueError:
            assert expected is ValueError, where + f": scanner raised, json.loads gave {expected!r}"
            invalid += 1
            continue
        if expected is not ValueError:
            assert got == expected, where
            checked += 1
        windows = len(body) // llmux.JSON_SCAN_WINDOW
        steps = body.count(b'"') + windows + 2  # a step per string it looks at, or window
        assert yields <= steps / llmux.JSON_SCAN_SLICE + 1 + windows, where
    assert checked > 1500
    with capsys.disabled():
        print(f"\n[fuzz] json scanner: seed {seed}, {checked} agreed with json.loads, {invalid} invalid")


def test_fuzz_json_quick_path_agrees_with_the_scanner(capsys: Any) -> None:
    """Exploring: a small body's model is read by json.loads (_json_model_quick) instead
    of the scanner.  Wherever the quick path answers, the scanner gives the same member
    (value and stream flag); it declines (False) for everything else, so errors keep
    the scanner's words.  Random documents, "stream" members, mutations, deep nesting."""
    seed = int(os.environ.get("LLMUX_FUZZ_SEED", "20261201"))
    rng = random.Random(seed)
    answered = declined = 0
    for i in range(3000):
        top = _fuzz_json_text(rng)
        if rng.random() < 0.3:
            top = "{" + top + "}" if top.startswith('"') and rng.random() < 0.5 else '{"x": ' + top + "}"
        if top.startswith("{") and rng.random() < 0.8:
            extra = rng.choice(['"model": ' + _fuzz_json_text(rng, 5), '"model": "m"', '"stream": true', '"stream": false',
                                '"stream": "true"', '"stream": 1', '"model": "m", "stream": true'])
            top = "{" + extra + ("" if top.rstrip().endswith("{}") else ", ") + top[1:]
        body = top.encode("utf-8", "surrogatepass")
        r = rng.random()
        if r < 0.1:
            body = b"\xef\xbb\xbf" + body  # a BOM
        elif r < 0.15:
            body = top.encode("utf-16")
        elif r < 0.2:
            body = b'{"a": ' + b"[" * rng.choice([10, 999, 5000]) + b"]" * 3 + b', "model": "x"}'
        elif r < 0.3:
            b = bytearray(body)
            at = rng.randrange(len(b) + 1)
            b[at:at + rng.randint(0, 3)] = rng.choice([b"", b'"', b"\\", b"[", b"}", b","])
            body = bytes(b)
        where = f"seed {seed} case {i}: {body[:200]!r}"
        quick = llmux._json_model_quick(body)
        if quick is False:
            declined += 1
            continue
        answered += 1
        scanned = _run_steps(llmux._json_model_scan(body))
        if quick is None:
            assert scanned is None, where
        else:
            assert scanned is not None and (scanned.value, scanned.stream) == (quick.value, quick.stream), where
    assert answered > 600 and declined > 300, (answered, declined)
    with capsys.disabled():
        print(f"\n[fuzz] json quick path: seed {seed}, {answered} agreed with the scanner, {declined} declined")


def _run_steps(steps: Any) -> Any:
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value


def test_read_deadline_fires_at_the_latest_deadline_set_never_before_and_never_disarmed() -> None:
    """A connection's read timeout (_ReadDeadline) keeps one timer: a later deadline moves
    it, an earlier one replaces it, a disarmed one never poisons the reader.  Random
    arm/disarm sequences in virtual time, checked against the plain rule: the reader is
    poisoned exactly when an armed deadline passes, at that deadline."""
    for seed in range(200):
        rng = random.Random(seed)
        loop = llmux.VirtualTimeLoop()

        async def go() -> None:
            reader = asyncio.StreamReader()
            d = llmux._ReadDeadline(asyncio.get_running_loop(), reader)
            armed: Optional[float] = None
            for _ in range(rng.randint(1, 12)):
                step = rng.choice(["arm", "arm", "disarm", "wait"])
                now = loop.time()
                if step == "arm":
                    timeout = rng.choice([0.5, 1.0, 5.0, 30.0])
                    d.arm(timeout, TimeoutError(f"t{timeout}"))
                    armed = now + timeout
                elif step == "disarm":
                    d.disarm()
                    armed = None
                else:
                    await asyncio.sleep(rng.choice([0.2, 1.0, 6.0]))
                    if armed is not None and loop.time() >= armed:
                        assert reader.exception() is not None, f"seed {seed}: not poisoned at {armed}"
                        return
                assert reader.exception() is None, f"seed {seed}: poisoned early"
            if armed is not None:
                await asyncio.sleep(armed - loop.time() - 0.01)
                assert reader.exception() is None, f"seed {seed}: poisoned before {armed}"
                await asyncio.sleep(0.02)
                assert reader.exception() is not None, f"seed {seed}: not poisoned at {armed}"
            d.close()

        run_checked(go(), loop)


def test_lazy_timer_expires_exactly_at_its_deadline_while_armed() -> None:
    """The one timer behind both read deadlines and the backend's silence timeout
    (_LazyTimer): at() sets a deadline (earlier or later), the owner moves it forward
    through ``when`` with no timer call, and ``armed`` may turn false.  Random sequences in
    virtual time against the plain rule: expired() runs once, exactly at the deadline in
    force, and only while armed."""
    for seed in range(300):
        rng = random.Random(seed)
        loop = llmux.VirtualTimeLoop()

        async def go() -> None:
            state = {"armed": False}
            fired: List[float] = []

            def expired() -> None:
                fired.append(loop.time())
                state["armed"] = False  # as its owners do: an expiry ends what it timed

            t = llmux._LazyTimer(loop, lambda: state["armed"], expired)
            deadline: Optional[float] = None
            for _ in range(rng.randint(1, 14)):
                step = rng.choice(["at", "at", "forward", "disarm", "wait", "wait"])
                now = loop.time()
                if step == "at":
                    state["armed"] = True
                    deadline = now + rng.choice([0.5, 1.0, 5.0, 30.0])
                    t.at(deadline)
                elif step == "forward" and deadline is not None:
                    deadline = max(deadline, now + rng.choice([0.5, 2.0, 10.0]))
                    t.when = deadline
                elif step == "disarm":
                    state["armed"] = False
                    deadline = None
                else:
                    before = len(fired)
                    await asyncio.sleep(rng.choice([0.2, 1.0, 6.0, 40.0]))
                    if deadline is not None and loop.time() >= deadline:
                        assert fired[before:] == [pytest.approx(deadline)], \
                            f"seed {seed}: fired {fired[before:]}, deadline {deadline}"
                        deadline = None
                    else:
                        assert fired[before:] == [], f"seed {seed}: fired early or disarmed"
            t.cancel()

        run_checked(go(), loop)


def test_turn_budget_random_arrivals_cancellations_and_slow_turns() -> None:
    """Exploring TurnBudget: random requests take a turn at random loop steps, some are
    cancelled while waiting or just after their turn came, and some steps are slow (other
    work takes virtual time in them).  After every step: a step grants at most two budgets
    (what the last turn left, and its own) and any w steps at most w + 1, besides those
    that waited max_wait; no request still waits after a step that began max_wait after it
    asked; requests go on in the order they asked; a waiter is never kept while a step
    had budget left for it.  At the end, every request still wanted got its turn within
    its rank's share of steps, and the budget schedules nothing once idle (the virtual-time
    loop fails a loop that spins)."""
    for seed in range(400):
        rng = random.Random(seed)
        loop = CheckedLoop()
        n = rng.randint(1, 6)
        max_wait = rng.choice([0.01, 0.025, 1.0])
        budget = llmux.TurnBudget(n, max_wait)
        asked: List[int] = []  # request ids in the order they asked
        granted: Dict[int, int] = {}  # id -> the step its turn came in
        pending: Dict[int, "asyncio.Future[int]"] = {}
        cancelled: Set[int] = set()
        per_step: Dict[int, int] = collections.Counter()  # turns granted within the budget
        every_step: Dict[int, int] = collections.Counter()  # and those past max_wait
        waited_at: Dict[int, int] = {}
        asked_at: Dict[int, float] = {}
        started: Dict[int, int] = {}  # id -> the step it went on in (a waiter resumes later)
        began = [0.0]  # the virtual time the current step began at

        def check() -> None:
            step, now = loop.steps - 1, loop.time()  # the step that just ended
            for rid, f in list(pending.items()):
                if f.done():
                    del pending[rid]
                    if not f.cancelled():
                        granted[rid] = step
                        every_step[step] += 1
                        if now - asked_at[rid] < max_wait:  # else it may have been overdue
                            per_step[step] += 1
                elif began[0] - asked_at[rid] >= max_wait:
                    raise AssertionError(f"seed {seed}: {rid} waits {began[0] - asked_at[rid]:.3f}s "
                                         f"at step {step}, max_wait {max_wait}")
            assert per_step[step] <= 2 * n, f"seed {seed}: {per_step[step]} turns in step {step}, n={n}"
            for w in (2, 3, 5):
                window = sum(per_step[s] for s in range(step - w + 1, step + 1))
                assert window <= (w + 1) * n, f"seed {seed}: {window} turns in {w} steps, n={n}"
            if every_step[step] + every_step[step - 1] < n:
                stuck = [r for r, at in waited_at.items() if r in pending and at < step - 1]
                assert not stuck, f"seed {seed}: {stuck} kept waiting at step {step} with budget left"
            began[0] = now  # with waiters, the next step's select does not move the clock

        async def request(rid: int, delay: int) -> None:
            for _ in range(delay):
                await asyncio.sleep(0)
            asked.append(rid)
            asked_at[rid] = loop.time()
            turn: "asyncio.Future[int]" = loop.create_future()

            def go() -> bool:  # as _Upstream._send: False once the request gave up
                if turn.done():
                    return False
                turn.set_result(loop.steps)  # the step it starts in
                return True

            budget.start(go)
            if turn.done():  # at once, within this turn's budget
                granted[rid] = started[rid] = loop.steps
                per_step[loop.steps] += 1
                every_step[loop.steps] += 1
                return
            pending[rid] = turn
            waited_at[rid] = loop.steps
            try:
                started[rid] = await turn
            except asyncio.CancelledError:
                cancelled.add(rid)

        async def busy(steps: int) -> None:  # other work: a slow step now and then
            for _ in range(steps):
                if rng.random() < 0.3:
                    loop._vclock.now += rng.choice([0.002, 0.01, 0.03])
                await asyncio.sleep(0)

        async def go() -> None:
            loop.check = check
            tasks = [loop.create_task(request(i, rng.choice([0, 0, 0, 1, 2, rng.randint(0, 30)])))
                     for i in range(rng.randint(1, 80))]
            other = loop.create_task(busy(rng.choice([0, 10, 40])))
            for _ in range(rng.randint(0, 12)):
                victim = rng.choice(tasks)
                for _ in range(rng.randint(0, 6)):
                    await asyncio.sleep(0)
                victim.cancel()
            await asyncio.gather(*tasks, other, return_exceptions=True)
            await asyncio.sleep(1.0)  # an armed budget would spin at this instant
            wanted = [r for r in asked if r not in cancelled and r in started]
            steps = [started[r] for r in wanted]  # regression (attack): a newcomer went on
            # in the turn that granted an earlier waiter, which then resumed only in the next
            assert steps == sorted(steps), f"seed {seed}: started out of order {list(zip(wanted, steps))}"
            for rank, rid in enumerate(r for r in asked if r in waited_at and r in granted):
                assert granted[rid] - waited_at[rid] <= rank // n + 2, f"seed {seed}: {rid} waited too long"
            assert not pending or all(f.cancelled() for f in pending.values())

        run_checked(go(), loop)


def test_turn_budget_does_not_hold_a_burst_to_the_pace_of_long_turns() -> None:
    """Regression (attack): 600 connections dripping heads a byte at a time made every
    turn of the loop long, and at 8 starts a turn a burst of 800 took 5-13 times as long
    as without the budget.  Whoever has waited TURN_WAIT_MAX_SECS starts in the next turn."""
    loop = llmux.VirtualTimeLoop()
    metrics = llmux.llmux_metrics()
    budget = llmux.TurnBudget(2, 0.025, metrics)
    started: List[int] = []
    turns = [0]

    async def request(rid: int) -> None:
        turn: "asyncio.Future[None]" = loop.create_future()

        def go() -> bool:
            turn.set_result(None)
            return True

        budget.start(go)
        await turn
        started.append(turns[0])

    async def slow_loop() -> None:  # every turn of the loop takes 30 ms of other work
        while len(started) < 20:
            loop._vclock.now += 0.03
            turns[0] += 1
            await asyncio.sleep(0)

    async def go() -> None:
        other = loop.create_task(slow_loop())
        await asyncio.gather(*(request(i) for i in range(20)))
        await other

    run_checked(go(), loop)
    assert max(started) <= 3, f"the burst took {max(started)} turns of 30 ms"
    text = metrics.render()
    assert "llmux_request_turn_waits_total 18" in text
    assert "llmux_request_turn_overdue_total 16" in text


async def stop_with_backend(server: "llmux.Server", be: asyncio.AbstractServer, handlers: List[Any]) -> None:
    """Stop an in-process llmux (it closes its backend connections, so the backend's
    connection handlers end: awaited, whatever they ended with), then its backend."""
    await server.stop()
    await asyncio.wait_for(asyncio.gather(*handlers, return_exceptions=True), T)
    be.close()
    await asyncio.wait_for(be.wait_closed(), T)


def answering_backend(handlers: List[Any], on_request: Any = lambda: None,
                      writers: Optional[List[asyncio.StreamWriter]] = None,
                      answer: Optional[Callable[[asyncio.StreamWriter], Awaitable[None]]] = None) -> Any:
    """An in-process backend (an asyncio.start_server callback) that answers each whole
    request {"ok": true} (or as ``answer`` writes it), calling ``on_request`` first; its
    tasks go into ``handlers``, and its connections' writers into ``writers``."""
    async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handlers.append(asyncio.current_task())
        if writers is not None:
            writers.append(writer)
        parser = llmux.RequestParser(1 << 20)
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                parser.feed(data)
                while True:
                    event = parser.next_event()
                    if event is llmux.NEED_DATA or event is None:
                        break
                    if event is llmux.EndOfMessage:
                        on_request()
                        if answer is not None:
                            await answer(writer)
                        else:
                            writer.write(http_reply({"ok": True}))
        finally:
            writer.close()

    return backend


def burst_through_llmux(count: int, slow_turn: float = 0.0) -> List[int]:
    """``count`` requests sent at once through an in-process llmux to an in-process
    backend; for each request the backend saw, in order, how many answers clients had
    by then.  With ``slow_turn``, the loop is held that long while requests wait their
    turn, and each of those must have it in its logged secs."""
    async def go() -> List[int]:
        answered = 0
        seen_answered: List[int] = []

        handlers: List[Any] = []
        backend = answering_backend(handlers, lambda: seen_answered.append(answered))
        be = await asyncio.start_server(backend, sock=socket.create_server(("127.0.0.1", 0)))
        cfg = llmux.parse_config({"models": {"a": {"port": be.sockets[0].getsockname()[1]}}})
        stream = ListStream()
        server = llmux.Server(cfg, llmux.Log(stream))
        # The order of work is what is checked, not the cap: on a loaded host a turn of 64
        # requests can take TURN_WAIT_MAX_SECS, and then everyone waiting goes at once.
        server.turns = llmux.TurnBudget(llmux.STARTS_PER_TURN, T, server.metrics)
        port = await server.start("127.0.0.1", 0, sock=socket.create_server(("127.0.0.1", 0)))
        clients = [await asyncio.open_connection("127.0.0.1", port) for _ in range(count)]
        try:
            body = json.dumps({"model": "a"}).encode()
            request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                       b"content-length: %d\r\n\r\n" % len(body) + body)

            async def one(reader: asyncio.StreamReader) -> None:
                nonlocal answered
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), T)
                assert head.startswith(b"HTTP/1.1 200"), head
                answered += 1

            for _, writer in clients:  # no await between: the requests arrive together
                writer.write(request)
            if slow_turn:
                await steps_until(lambda: server.turns.waiting, "the burst's later requests wait their turn")
                waiting = len(server.turns.waiting)
                time.sleep(slow_turn)  # a slow turn of the loop while they wait
            await asyncio.gather(*(one(reader) for reader, _ in clients))
            if slow_turn:
                # Their logged time counts their wait (regression, attack: it began after it).
                secs = [float(m.group(1)) for m in (re.search(r" secs=([0-9.]+)", line) for line in stream.lines
                                                    if "info request method=POST" in line) if m]
                assert len(secs) == count and sum(1 for x in secs if x >= slow_turn) >= waiting > 0, \
                    (waiting, secs)
            return seen_answered
        finally:
            for _, writer in clients:
                writer.close()
            await server.stop()  # closes its backend connections: the handlers end
            await asyncio.wait_for(asyncio.gather(*handlers), T)
            be.close()
            await asyncio.wait_for(be.wait_closed(), T)

    return cast(List[int], run_checked(go()))


def test_a_burst_is_answered_while_it_is_still_being_routed() -> None:
    """Regression (issue 11): 64 requests that arrive together were all parsed, routed
    and sent to their backend in one turn of the loop, before any answer moved.  With a
    budget of STARTS_PER_TURN a turn, the backend sees the burst's last requests only
    after clients have their first answers."""
    seen_answered = burst_through_llmux(64)
    assert len(seen_answered) == 64
    assert seen_answered[-1] > 0, "every request reached the backend before any answer left"
    assert seen_answered[llmux.STARTS_PER_TURN - 1] == 0  # the first turn's own


def test_the_wait_for_a_turn_is_in_a_requests_logged_time() -> None:
    burst_through_llmux(24, slow_turn=0.02)


@pytest.mark.parametrize("meanwhile", ["closes", "answers", "408_and_closes"])
def test_a_post_whose_backend_connection_went_stale_while_it_waited_its_turn_is_sent_on_a_new_one(
        meanwhile: str) -> None:
    """A request waiting its turn holds the idle backend connection it was given, not
    yet written to.  If the backend closes that connection meanwhile, the request never
    reached it: even a POST (never re-sent once it may have) goes on a new connection,
    and the client gets its answer, not a 502.  Regression (attack): bytes the backend
    sent meanwhile (a buggy engine's second answer, a 408 on an idle connection) were
    taken as the request's answer, which was then never written, and the connection went
    back to the pool as in step."""
    async def go() -> None:
        writers: List[asyncio.StreamWriter] = []
        handlers: List[Any] = []
        requests = [0]
        backend = answering_backend(handlers, lambda: requests.__setitem__(0, requests[0] + 1), writers)
        be = await asyncio.start_server(backend, sock=socket.create_server(("127.0.0.1", 0)))
        cfg = llmux.parse_config({"models": {"a": {"port": be.sockets[0].getsockname()[1]}}})
        stream = ListStream()
        server = llmux.Server(cfg, llmux.Log(stream))
        port = await server.start("127.0.0.1", 0, sock=socket.create_server(("127.0.0.1", 0)))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            body = json.dumps({"model": "a"}).encode()
            request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                       b"content-length: %d\r\n\r\n" % len(body) + body)
            writer.write(request)
            first = await asyncio.wait_for(reader.readuntil(b'{"ok": true}'), T)
            assert first.startswith(b"HTTP/1.1 200"), first
            await log_shows(stream, r"info request method=POST .*status=200")
            assert len(writers) == 1  # and its connection is in the pool now
            server.turns = llmux.TurnBudget(0, 0.05, server.metrics)  # every start waits 50 ms
            writer.write(request)
            await steps_until(lambda: server.turns.waiting, "the POST waits its turn")
            # The backend, on the idle connection the POST holds:
            if meanwhile == "answers":
                writers[0].write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nSTALE")
            elif meanwhile == "408_and_closes":
                writers[0].write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\n"
                                 b"connection: close\r\n\r\n")
            if meanwhile != "answers":
                writers[0].close()
            second = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), T)
            assert second.startswith(b"HTTP/1.1 200"), second + await asyncio.wait_for(reader.read(300), T)
            answer = await asyncio.wait_for(reader.readexactly(len(b'{"ok": true}')), T)
            assert answer == b'{"ok": true}', answer
            assert len(writers) == 2 and requests[0] == 2, (len(writers), requests)
            assert server.pool._idle.get(cfg.models["a"].port, []) and \
                all(not c.closed for c in server.pool._idle[cfg.models["a"].port]), "the stale one pooled"
        finally:
            writer.close()
            await stop_with_backend(server, be, handlers)

    run_checked(go())


@pytest.mark.parametrize("case", ["answer_after_shutdown_began", "pipelined_behind_a_stream",
                                  "local_answers_pipelined_behind_a_stream"])
def test_shutdown_says_it_closes_and_serves_what_it_already_has(case: str) -> None:
    """Regression (attack): an answer written after shutdown began still said keep-alive,
    and the connection was then closed: the client's next request met a reset.  Now the
    answer says ``connection: close``.  And a request pipelined behind one whose answer
    was under way (its head said keep-alive) when shutdown began was dropped without a
    word; it is in flight, so it is served within the grace, and its answer closes.
    Regression (attack): llmux's own answers (/health) said close and were still followed
    by the requests pipelined behind them: nothing is served after an answer that closes."""
    async def go() -> None:
        gate = asyncio.Event()
        got: List[int] = []
        handlers: List[Any] = []

        async def answer(writer: asyncio.StreamWriter) -> None:
            got.append(len(got))
            if case != "answer_after_shutdown_began" and len(got) == 1:
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                             b"transfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
                await gate.wait()
                writer.write(b"0\r\n\r\n")
            else:
                if len(got) == 1:
                    await gate.wait()
                writer.write(http_reply({"ok": len(got)}))

        backend = answering_backend(handlers, answer=answer)
        be = await asyncio.start_server(backend, sock=socket.create_server(("127.0.0.1", 0)))
        cfg = llmux.parse_config({"models": {"a": {"port": be.sockets[0].getsockname()[1]}},
                                  "policy": {"shutdown_grace_secs": T}})
        server = llmux.Server(cfg, llmux.Log(ListStream()))
        port = await server.start("127.0.0.1", 0, sock=socket.create_server(("127.0.0.1", 0)))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        shutdown: Optional["asyncio.Task[None]"] = None
        try:
            body = json.dumps({"model": "a"}).encode()
            request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                       b"content-length: %d\r\n\r\n" % len(body) + body)
            health = b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n"
            writer.write({"answer_after_shutdown_began": request, "pipelined_behind_a_stream": request * 2,
                          "local_answers_pipelined_behind_a_stream": request + health * 2}[case])
            if case != "answer_after_shutdown_began":
                head = await asyncio.wait_for(reader.readuntil(b"first\r\n"), T)
                assert b"connection: close" not in head  # it went out before shutdown began
            else:
                await steps_until(lambda: got, "the backend has the request")
            shutdown = asyncio.ensure_future(server.shutdown())
            await steps_until(lambda: server.closing, "shutdown began")
            gate.set()
            rest = await asyncio.wait_for(reader.read(), T)  # all of it, to the close
            answers = rest.split(b"HTTP/1.1 ")[1:]
            assert len(answers) == 1 and answers[0].startswith(b"200"), rest
            assert b"connection: close" in answers[0].split(b"\r\n\r\n")[0], rest
            assert len(got) == (2 if case == "pipelined_behind_a_stream" else 1)
            if case == "local_answers_pipelined_behind_a_stream":
                assert b'"status"' in answers[0], rest  # the first /health, and not the second
            await asyncio.wait_for(shutdown, T)
        finally:
            writer.close()
            if shutdown is not None and not shutdown.done():
                shutdown.cancel()
            await stop_with_backend(server, be, handlers)

    run_checked(go())


def test_a_held_stream_begun_during_shutdown_says_it_closes() -> None:
    """Regression (attack): a streaming request for a sleeping model, pipelined behind an
    answer under way at SIGTERM, is served within the grace and held while its model
    wakes; its 200 event-stream head said keep-alive, and llmux then closed."""
    async def go() -> None:
        gate = asyncio.Event()
        handlers: List[Any] = []

        async def answer(writer: asyncio.StreamWriter) -> None:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                         b"transfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n")
            await gate.wait()
            writer.write(b"0\r\n\r\n")

        be = await asyncio.start_server(answering_backend(handlers, answer=answer),
                                        sock=socket.create_server(("127.0.0.1", 0)))
        cfg = llmux.parse_config({"models": {"a": {"port": be.sockets[0].getsockname()[1]},
                                             "b": {"port": 9, "wake": "sleep 30"}},
                                  "policy": {"shutdown_grace_secs": 0.5}})
        server = llmux.Server(cfg, llmux.Log(ListStream()))
        port = await server.start("127.0.0.1", 0, sock=socket.create_server(("127.0.0.1", 0)))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            def post(model: str) -> bytes:
                body = json.dumps({"model": model, "stream": True}).encode()
                return (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                        b"content-length: %d\r\n\r\n" % len(body) + body)

            writer.write(post("a") + post("b"))
            head = await asyncio.wait_for(reader.readuntil(b"first\r\n"), T)
            assert head.startswith(b"HTTP/1.1 200") and b"connection: close" not in head, head
            shutdown = asyncio.ensure_future(server.shutdown())
            await steps_until(lambda: server.closing, "shutdown began")
            gate.set()
            rest = await asyncio.wait_for(reader.read(), T)  # b's held stream, to the close
            held = rest.split(b"HTTP/1.1 ")[1:]
            assert len(held) == 1 and held[0].startswith(b"200"), rest
            assert b"connection: close" in held[0].split(b"\r\n\r\n")[0], rest
            await asyncio.wait_for(shutdown, T)
        finally:
            writer.close()
            await stop_with_backend(server, be, handlers)

    run_checked(go())


def test_shutdown_waits_for_an_answers_last_bytes_to_leave() -> None:
    """Regression (attack): an answer larger than the socket buffers, to a client reading
    slowly, was handed to the transport whole; at SIGTERM the connection counted as done,
    shutdown ended at once, and the process's exit dropped what the transport still held
    (the client saw a clean EOF, 63 KB short).  Shutdown now waits, within its grace, for
    a closed connection's bytes to leave."""
    async def go() -> None:
        handlers: List[Any] = []
        big = b"x" * 40_000  # more than the sockets below hold, less than a transport's high water

        async def answer(writer: asyncio.StreamWriter) -> None:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(big), big))

        be = await asyncio.start_server(answering_backend(handlers, answer=answer),
                                        sock=socket.create_server(("127.0.0.1", 0)))
        cfg = llmux.parse_config({"models": {"a": {"port": be.sockets[0].getsockname()[1]}},
                                  "policy": {"shutdown_grace_secs": T}})
        stream = ListStream()
        server = llmux.Server(cfg, llmux.Log(stream))
        port = await server.start("127.0.0.1", 0, sock=socket.create_server(("127.0.0.1", 0)))
        client = socket.socket()
        client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # small kernel buffers: the
        client.setblocking(False)  # answer's tail stays in llmux's transport
        await asyncio.get_running_loop().sock_connect(client, ("127.0.0.1", port))
        reader, writer = await asyncio.open_connection(sock=client, limit=4096)
        try:
            await steps_until(lambda: server._busy, "llmux has the connection")
            ours = next(iter(server._busy))._llmux_writer
            assert ours is not None
            ours.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            reader._transport.pause_reading()  # type: ignore[attr-defined]  # a client slow to read
            body = json.dumps({"model": "a"}).encode()
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         b"content-length: %d\r\n\r\n" % len(body) + body)
            await log_shows(stream, r"info request method=POST .*status=200")  # all of it handed on
            conn = next(iter(server._busy))
            assert conn._llmux_writer is not None
            transport = conn._llmux_writer.transport
            assert transport.get_write_buffer_size() > 0, "the test needs bytes left in the transport"
            shutdown = asyncio.ensure_future(server.shutdown())
            await steps_until(lambda: server.closing, "shutdown began")
            reader._transport.resume_reading()  # type: ignore[attr-defined]  # it reads at last
            received = asyncio.ensure_future(reader.read())
            await asyncio.wait_for(shutdown, T)
            assert transport.get_write_buffer_size() == 0, "shutdown ended with bytes unsent"
            data = await asyncio.wait_for(received, T)
            assert data.endswith(big), len(data)
        finally:
            writer.close()
            await stop_with_backend(server, be, handlers)

    run_checked(go())


@pytest.mark.parametrize("meanwhile", ["client_leaves", "shutdown"])
def test_requests_waiting_their_turn_are_answered_logged_and_counted(meanwhile: str) -> None:
    """Regression (attack): a request waiting its turn (TurnBudget) was not yet in
    _respond.  A client leaving then left no log line and no count, and shutdown closed
    the connections of a burst's later requests without a byte.  Now the wait is inside
    _respond, after routing: a leaver is a 499 of its model; at shutdown, a 503."""
    async def go() -> None:
        held: List[asyncio.StreamWriter] = []

        async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            held.append(writer)  # reads the request and never answers: requests stay in flight
            try:
                await reader.read()
            finally:
                writer.close()  # (3.12+: the server's wait_closed waits for every connection)

        be = await asyncio.start_server(backend, sock=socket.create_server(("127.0.0.1", 0)))
        cfg = llmux.parse_config({"models": {"a": {"port": be.sockets[0].getsockname()[1]}},
                                  "policy": {"shutdown_grace_secs": 0}})
        stream = ListStream()
        server = llmux.Server(cfg, llmux.Log(stream))
        port = await server.start("127.0.0.1", 0, sock=socket.create_server(("127.0.0.1", 0)))
        clients = [await asyncio.open_connection("127.0.0.1", port) for _ in range(96)]
        try:
            body = json.dumps({"model": "a"}).encode()
            request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                       b"content-length: %d\r\n\r\n" % len(body) + body)
            for _, writer in clients:
                writer.write(request)
            await steps_until(lambda: server.turns.waiting, "the burst's later requests wait their turn")
            assert server.turns.waiting, "nothing waited its turn"
            if meanwhile == "client_leaves":  # all of them, those in flight and those waiting
                for _, writer in clients:
                    writer.transport.abort()
                after = 0
                for _ in range(96):
                    after = await log_shows(stream, r"info request method=POST .*model=a status=499", after)
                assert 'llmux_requests_total{model="a",status="499"} 96' in server.metrics.render()
            else:
                await server.shutdown()
                answers = await asyncio.gather(*(asyncio.wait_for(r.read(), T) for r, _ in clients))
                assert all(a.startswith(b"HTTP/1.1 503") and b'"shutting_down"' in a for a in answers), \
                    [a[:40] for a in answers if not a.startswith(b"HTTP/1.1 503")]
                assert len([line for line in stream.lines if "info request method=POST" in line]) == 96
        finally:
            for _, writer in clients:
                writer.close()
            await server.stop()
            for writer in held:
                writer.close()
            be.close()
            await asyncio.wait_for(be.wait_closed(), T)

    run_checked(go())


def test_a_request_parser_says_body_bytes_are_due_until_its_end_at_every_cut() -> None:
    """Regression (attack): a chunked body cut inside a chunk's data, before its CRLF
    or inside the trailer was taken for no body due (expecting_body False), and a
    shutdown closed such a connection without its 503.  Every cut of a chunked and of a
    length-framed request, fed in one go and byte by byte: between the head and the
    end, body bytes are due."""
    chunked = (b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"5\r\nabcde\r\n3;ext=1\r\nfgh\r\n0\r\nTrailer-A: 1\r\n\r\n")
    framed = b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nabcde"
    for wire in (chunked, framed):
        head_end = wire.index(b"\r\n\r\n") + 4
        for cut in range(head_end, len(wire)):
            for pieces in ([wire[:cut]], [wire[i:i + 1] for i in range(cut)]):
                parser = llmux.RequestParser()
                events = []
                for piece in pieces:
                    parser.feed(piece)
                    while True:
                        event = parser.next_event()
                        if event is llmux.NEED_DATA:
                            break
                        events.append(event)
                assert isinstance(events[0], llmux.RequestHead), (wire, cut)
                assert llmux.EndOfMessage not in events, (wire, cut)
                assert parser.expecting_body, f"cut at {cut} of {wire!r}: {wire[:cut][-12:]!r}"


@pytest.mark.parametrize("cut", [b"5\r\nab", b"5\r\nabcde", b"5\r\nabcde\r\n0\r\n"])
def test_shutdown_answers_a_chunked_body_cut_inside_a_chunk(cut: bytes) -> None:
    """Regression (attack): the same, end to end in-process: the 503 shutting_down."""
    async def go() -> bytes:
        cfg = llmux.parse_config({"models": {"a": {"port": 9}}, "policy": {"shutdown_grace_secs": 0.1}})
        stream = ListStream()
        server = llmux.Server(cfg, llmux.Log(stream))
        port = await server.start("127.0.0.1", 0, sock=socket.create_server(("127.0.0.1", 0)))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n" + cut)
            # Read (one write, one segment: the head and the cut together), parsed, and
            # waiting for more: its reader waits again with nothing left in it.
            await steps_until(lambda: any(p.idle_since is None and p._stream_reader._waiter is not None
                                          and not p._stream_reader._buffer for p in server._busy),
                              "llmux to wait for the rest of the body")
            await asyncio.wait_for(server.shutdown(), T)
            return await asyncio.wait_for(reader.read(), T)
        finally:
            writer.close()
            await server.stop()

    answer = run_checked(go())
    assert answer.startswith(b"HTTP/1.1 503") and b'"shutting_down"' in answer, answer


@pytest.mark.parametrize("body_ends", [True, False])
def test_shutdown_gives_a_request_still_arriving_its_grace(body_ends: bool) -> None:
    """Regression (attack): SIGTERM took a connection whose request's body was still
    arriving, or whose whole request was in its socket unread, for idle: closed without a
    byte, no log line.  Such a request gets shutdown_grace_secs to arrive and be served;
    one still arriving when the grace ends is answered 503 shutting_down."""
    async def go() -> None:
        handlers: List[Any] = []
        be = await asyncio.start_server(answering_backend(handlers), sock=socket.create_server(("127.0.0.1", 0)))
        cfg = llmux.parse_config({"models": {"a": {"port": be.sockets[0].getsockname()[1]}},
                                  "policy": {"shutdown_grace_secs": 10 if body_ends else 0.2}})
        stream = ListStream()
        server = llmux.Server(cfg, llmux.Log(stream))
        port = await server.start("127.0.0.1", 0, sock=socket.create_server(("127.0.0.1", 0)))
        body = json.dumps({"model": "a", "pad": "x" * 20000}).encode()
        head = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                b"content-length: %d\r\n\r\n" % len(body))
        slow = await asyncio.open_connection("127.0.0.1", port)  # its body half sent
        whole = [await asyncio.open_connection("127.0.0.1", port) for _ in range(8)]  # sent, unread
        idle = await asyncio.open_connection("127.0.0.1", port)  # sends nothing
        try:
            await steps_until(lambda: len(server._busy) == 10, "all ten connections accepted")
            slow[1].write(head + body[:10000])
            await steps_until(lambda: any(p.idle_since is None for p in server._busy), "llmux has read the slow request's head")
            for _, writer in whole:
                writer.write(head + body)
            stopping = asyncio.get_running_loop().create_task(server.shutdown())  # no step between
            if body_ends:
                slow[1].write(body[10000:])
            answers = await asyncio.gather(*(asyncio.wait_for(r.read(), T) for r, _ in [slow, *whole]))
            assert await asyncio.wait_for(idle[0].read(), T) == b""  # idle: closed, nothing to say
            await asyncio.wait_for(stopping, T)
            if body_ends:
                assert all(a.startswith(b"HTTP/1.1 200") for a in answers), [a[:60] for a in answers]
            else:
                assert all(a.startswith(b"HTTP/1.1 200") for a in answers[1:]), [a[:60] for a in answers]
                assert answers[0].startswith(b"HTTP/1.1 503") and b'"shutting_down"' in answers[0], answers[0]
                assert [line for line in stream.lines if "request.rejected status=503" in line]
        finally:
            for _, writer in [slow, *whole, idle]:
                writer.close()
            await server.stop()
            be.close()
            await asyncio.wait_for(be.wait_closed(), T)

    run_checked(go())


def test_fuzz_field_block_agrees_with_the_line_parser(capsys: Any) -> None:
    """Exploring: a header section is parsed whole by two regexes (_field_block) and,
    when that does not match, line by line (_parse_fields), which names the error.
    Random lines from a hostile alphabet: both give the same pairs, or the same error.
    A section of whitespace-only values with a bad line at its end must not backtrack
    (it would hang here, under the test's timeout)."""
    seed = int(os.environ.get("LLMUX_FUZZ_SEED", "20261201"))
    rng = random.Random(seed)
    alphabet = [b"a", b"Z", b"-", b"!", b"~", b":", b" ", b"\t", b"\x00", b"\x01", b"\x7f", b"\x80",
                b"\xff", b"\r", b"\n", b"v", b"(", b'"']
    ok = bad = 0
    for i in range(4000):
        lines = []
        for _ in range(rng.choice([0, 1, 2, 5, 30])):
            r = rng.random()
            if r < 0.6:
                lines.append(b"%s:%s%s%s" % (rng.choice([b"a", b"X-Y", b"!#$%&'*+-.^_`|~09"]),
                                             rng.choice([b"", b" ", b"\t", b" \t "]),
                                             b"".join(rng.choice(alphabet[6:8] + [b"v", b"\x80", b"\xff", b"("])
                                                      for _ in range(rng.randint(0, 8))),
                                             rng.choice([b"", b" ", b"\t\t"])))
            else:
                lines.append(b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 10))))
        lines = [line for line in lines if b"\r\n" not in line]
        block = b"".join(line + b"\r\n" for line in lines)
        if block.count(b"\r\n") != len(lines):
            continue  # a line ending in CR: the pieces would not be these lines
        where = f"seed {seed} case {i}: {lines!r}"
        try:
            expected: Any = llmux._parse_fields(lines)
        except llmux.HTTPError as e:
            expected = ("error", e.status, e.message)
        try:
            got: Any = llmux._field_block(block)
        except llmux.HTTPError as e:
            got = ("error", e.status, e.message)
        assert got == expected, where
        ok, bad = (ok, bad + 1) if isinstance(expected, tuple) else (ok + 1, bad)
    assert ok > 500 and bad > 500, (ok, bad)
    hostile = b"a: \t \t \t \t \t \t \t\r\n" * llmux.MAX_HEADER_COUNT + b"b: \x01\r\n"
    with pytest.raises(llmux.HTTPError, match="invalid character in header"):
        llmux._field_block(hostile)
    with capsys.disabled():
        print(f"\n[fuzz] field block: seed {seed}, {ok} parsed alike, {bad} refused alike")


def test_fuzz_multipart_hostile_part_heads(capsys: Any) -> None:
    """Exploring: random forms with hostile part heads (repeated or broken
    Content-Disposition, oversized heads, stray delimiters); the model field found is the
    last well-formed one, and nothing but HTTPError is ever raised."""
    seed = int(os.environ.get("LLMUX_FUZZ_SEED", "20261201"))
    rng = random.Random(seed)
    for i in range(1500):
        boundary = rng.choice(["B", "----x1", "a'()+_,-./:=?"])
        parts, expected = [], None
        for _ in range(rng.randint(0, 6)):
            name = rng.choice(["model", "file", "model_x", "modelo"])
            head = rng.choice([
                f'Content-Disposition: form-data; name="{name}"',
                f"content-disposition: form-data; NAME={name}",
                "content-disposition:;" * rng.randint(1, 300) + f' name="{name}"',
                f'Content-Type: text/plain\r\nContent-Disposition: form-data; name="{name}"; filename="model"',
                f'X-Junk: {"; name=model" * rng.randint(1, 50)}',
            ])
            value = rng.choice(["a", "b", "model-b", "x" * rng.randint(0, 50)])
            parts.append(f"--{boundary}\r\n{head}\r\n\r\n{value}\r\n")
            if name == "model" and "X-Junk" not in head and "filename" not in head \
                    and len(head) + 2 <= llmux.MULTIPART_MAX_PART_HEAD:  # a file is no field
                expected = value
        body = ("".join(parts) + f"--{boundary}--\r\n").encode()
        if rng.random() < 0.2:
            at = rng.randrange(len(body) + 1)
            body = body[:at] + rng.choice([b"", b"\r\n", b"--" + boundary.encode(), b";;;"]) + body[at + rng.randint(0, 5):]
            expected = "?"
        try:
            got = llmux._model_from_multipart(f'multipart/form-data; boundary="{boundary}"', body)
        except llmux.HTTPError:
            got = "error"
        assert expected == "?" or got == expected, f"seed {seed} case {i}: {body[:300]!r}: {got!r}"
    with capsys.disabled():
        print(f"\n[fuzz] multipart: seed {seed}, 1500 forms")


@pytest.mark.parametrize("accept", ["transport", "connect_accepted_socket"])
def test_fuzz_live_server_keeps_serving_and_leaks_nothing(capsys: Any, accept: str) -> None:
    """Both ways a connection is set up: its transport made at accept (a stdlib loop),
    and connect_accepted_socket (the way of a loop without _make_socket_transport)."""
    backend = Backend("a", None)
    try:
        cfg = llmux.parse_config({"models": {"a": {"port": backend.port}},
                                  "http": {"max_body_bytes": 10_000, "header_timeout_secs": 5,
                                           "body_timeout_secs": 5}})
        stats = run_checked(_fuzz_live(cfg, random.Random(4242), 400, accept == "transport"))
    finally:
        backend.stop()
    with capsys.disabled():
        print(f"\n[fuzz] live server ({accept}): {stats['count']} inputs, {stats['rate']:.0f} inputs/s, "
              f"statuses {stats['statuses']}")


def _cap_server(max_connections: int) -> Tuple[llmux.Server, ListStream]:
    stream = ListStream()
    cfg = llmux.parse_config({"models": {"a": {"port": 9}}, "http": {"max_connections": max_connections}})
    return llmux.Server(cfg, llmux.Log(stream)), stream


def test_a_connection_closed_before_its_task_forgets_it_is_evicted_without_an_error() -> None:
    """Regression (attack, uvloop): a newcomer with the table full looked for an idle
    connection to evict, and one whose socket was closed already (reset by its peer, its
    task not yet run) made poll() raise on fd -1: the newcomer's task died silently,
    its entry leaked for good and shutdown waited its whole grace for it."""
    async def go() -> None:
        server, stream = _cap_server(1)
        port = await server.start("127.0.0.1", 0, sock=socket.create_server(("127.0.0.1", 0)))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            await steps_until(lambda: any(p.idle_since is not None for p in server._busy), "an idle connection")
            proto = next(iter(server._busy))
            transport = proto._llmux_writer.transport
            transport.abort()  # its socket closes in the next step; its task runs after
            await steps_until(lambda: transport.get_extra_info("socket").fileno() == -1, "its socket closed")
            assert proto.counted and proto.idle_since is not None  # (the window: not forgotten yet)
            assert not llmux._readable(proto._llmux_writer)
            assert server._evict_idle(None, "max_connections")  # its room is free
            await steps_until(lambda: not server._busy, "its task to end")
            assert server._open == 0
        finally:
            writer.close()
            await server.stop()
        assert not [line for line in stream.lines if " error " in line], stream.lines

    run_checked(go())


def test_the_address_of_a_closed_uvloop_transport_is_none_not_an_error() -> None:
    """Regression (attack, uvloop): uvloop makes a transport's peername from its fd each
    time, and raises ValueError once the socket is closed; the eviction's log line (and
    admission, and routing) then failed with an internal error.  A stand-in for such a
    transport, as uvloop's behaves (checked by hand with uvloop 0.21: 602 evictions
    under a reset flood, no error)."""
    class ClosedUvloopTransport:
        def get_extra_info(self, name: str, default: Any = None) -> Any:
            if name in ("peername", "sockname"):
                raise ValueError("negative file descriptor")
            return default

        def is_closing(self) -> bool:
            return True
    assert llmux._peername(ClosedUvloopTransport()) is None
    writer: Any = ClosedUvloopTransport()  # (all three ask a writer for get_extra_info only)
    assert llmux._peer(writer) == "None" and not llmux._readable(writer)
    assert llmux._unread_method(cast(Any, object()), writer) == ""
    # uvloop reads a connection's first bytes before its task runs: they are in the reader.
    class ReadAlready:
        _buffer = bytearray(b"\r\nHEAD /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
    assert llmux._unread_method(cast(Any, ReadAlready()), writer) == "HEAD"


def test_an_unexpected_error_in_admission_is_logged_counted_and_the_connection_closed() -> None:
    """Fault injection: admission raising took the connection's task down before its
    try/finally: never closed, never logged, its table entry leaked."""
    async def go() -> None:
        server, stream = _cap_server(4)
        port = await server.start("127.0.0.1", 0, sock=socket.create_server(("127.0.0.1", 0)))

        def broken(*_: Any) -> None:
            raise RuntimeError("injected")
        server._admit = broken  # type: ignore[method-assign]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            reply = await asyncio.wait_for(reader.read(), T)
            assert reply.startswith(b"HTTP/1.1 500 ") and b'"internal_error"' in reply, reply
            await steps_until(lambda: not server._busy, "the connection forgotten")
            assert 'llmux_internal_errors_total{where="connection"} 1' in server.metrics.render()
            assert sum("RuntimeError: injected" in line for line in stream.lines) == 1, stream.lines
        finally:
            writer.close()
            await server.stop()

    run_checked(go())


def test_a_head_refused_at_admission_gets_no_body() -> None:
    """Regression (attack): the 503 of a full table carried its JSON body to a HEAD
    already in the socket (a GET's still says why)."""
    async def go() -> List[bytes]:
        server, _ = _cap_server(1)
        port = await server.start("127.0.0.1", 0, sock=socket.create_server(("127.0.0.1", 0)))
        held = socket.create_connection(("127.0.0.1", port), timeout=T)
        held.sendall(b"GET /health HTTP/1.1\r\n")  # a request under way: not evictable
        await steps_until(lambda: server._open == 1 and not any(p.idle_since for p in server._busy),
                          "the table full")
        answers = []
        try:
            for method in (b"HEAD", b"\r\n\r\nHEAD", b"GET"):  # (RFC 9112 2.2: empty lines first)
                sock = socket.create_connection(("127.0.0.1", port), timeout=T)
                sock.sendall(method + b" /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")  # (before any step)
                sock.setblocking(False)
                r, w = await asyncio.open_connection(sock=sock)
                answers.append(await asyncio.wait_for(r.read(), T))
                w.close()
        finally:
            held.close()
            await server.stop()
        return answers

    head, after_empty_lines, get = run_checked(go())
    for head in (head, after_empty_lines):
        assert head.startswith(b"HTTP/1.1 503 ") and head.endswith(b"\r\n\r\n") and b"content-length: " in head, head
    assert get.startswith(b"HTTP/1.1 503 ") and get.endswith(b'"too_many_connections"}}\n'), get


def test_a_reload_that_shrinks_the_table_still_lets_a_newcomer_evict_an_idle_connection(tmp_path: Path) -> None:
    """Regression (attack): after a reload cut max_connections by ACCEPT_BATCH or more,
    the connections over the new limit counted as newcomers beyond the table: accepting
    paused every 0.1 s for ever, and a health check never got in, though the table held
    only idle connections to evict."""
    async def go() -> bytes:
        path = tmp_path / "llmux.json"
        path.write_text(json.dumps({"models": {"a": {"port": 9}}, "http": {"max_connections": 40}}))
        server = llmux.Server(llmux.load_config(str(path)), llmux.Log(ListStream()))
        port = await server.start("127.0.0.1", 0, sock=socket.create_server(("127.0.0.1", 0)))
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(40)]
        try:
            await steps_until(lambda: server._open == 40 and all(p.idle_since for p in server._busy),
                              "40 idle connections")
            path.write_text(json.dumps({"models": {"a": {"port": 9}}, "http": {"max_connections": 4}}))
            assert await server.reload()
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), T)
            writer.close()
            return answer
        finally:
            for _, w in idle:
                w.close()
            await server.stop()

    assert run_checked(go()).startswith(b"HTTP/1.1 200 ")


def test_at_most_accept_batch_connections_are_set_up_beyond_the_tables_room() -> None:
    """Regression (attack): with the table one short of full, each wake-up of the
    listening socket accepted ACCEPT_BATCH connections before any was admitted, twice
    the bound on connections being refused at once (their fds come out of FD_RESERVE)."""
    async def go() -> int:
        limit = 4
        server, _ = _cap_server(limit)
        port = await server.start("127.0.0.1", 0, sock=socket.create_server(("127.0.0.1", 0), backlog=512))
        held = [socket.create_connection(("127.0.0.1", port), timeout=T) for _ in range(limit - 1)]
        for sock in held:
            sock.sendall(b"GET /health HTTP/1.1\r\n")  # under way: not evictable
        await steps_until(lambda: server._open == limit - 1, "the table one short of full")
        flood = [socket.create_connection(("127.0.0.1", port), timeout=T) for _ in range(150)]
        beyond = 0
        try:
            for _ in range(400):
                await asyncio.sleep(0)
                beyond = max(beyond, server._refusing + max(0, server._open + len(server._accepting) - limit))
        finally:
            for sock in held + flood:
                sock.close()
            await server.stop()
        return beyond

    beyond = run_checked(go())
    assert 0 < beyond <= llmux.ACCEPT_BATCH, beyond


def _check_peer_tables(server: llmux.Server, cap: int) -> None:
    """The per-address tables agree with the connections: admitted ones (_peers, at most
    ``cap`` each), set up or refused (_peer_setup); an address said to have no idle
    connection has none."""
    protos = list(server._busy)
    admitted: Dict[str, set] = {}
    setup: Dict[str, int] = {}
    for p in protos:
        if p.peer_ip is not None and p.counted:
            admitted.setdefault(p.peer_ip, set()).add(p)
        if p.setup_ip is not None:
            setup[p.setup_ip] = setup.get(p.setup_ip, 0) + 1
    assert server._peers == admitted, (server._peers, admitted)
    assert server._peer_setup == setup, (server._peer_setup, setup)
    assert all(len(c) <= cap for c in server._peers.values()), server._peers
    assert server._no_idle <= set(server._peers), (server._no_idle, server._peers)
    for ip in server._no_idle:
        assert not [p for p in server._peers[ip] if server._between_requests(p)], ip
    # (a refused connection's fd is closed, and it leaves _refusing, a step after its task)
    assert sum(1 for p in protos if p.refused) <= server._refusing < llmux.ACCEPT_BATCH


async def _peer_server(tmp: Path, http: Dict[str, Any]) -> Tuple[llmux.Server, ListStream, int, Path]:
    """An in-process server on a config file (so that reload reads it) with ``http``."""
    path = tmp / "llmux.json"
    path.write_text(json.dumps({"models": {"a": {"port": 9}}, "http": http}))
    stream = ListStream()
    server = llmux.Server(llmux.load_config(str(path)), llmux.Log(stream))
    port = await server.start("127.0.0.1", 0, sock=socket.create_server(("127.0.0.1", 0), backlog=512))
    return server, stream, port, path


async def _peer_connect(port: int, ip: str, data: bytes) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection from ``ip`` whose ``data`` is sent before the loop runs again (so it
    is in the kernel's queue when accepted: never taken for idle)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=T, source_address=(ip, 0))
    sock.sendall(data)
    sock.setblocking(False)
    return await asyncio.open_connection(sock=sock)


_HALF = b"GET /health HTTP/1.1\r\n"  # a request under way: its connection is not idle
_WHOLE = _HALF + b"Host: x\r\nConnection: close\r\n\r\n"


def _refused(server: llmux.Server, reason: str) -> float:
    return server.metrics._values["llmux_connections_refused_total"].get((reason,), 0.0)


def test_a_cap_lowered_by_a_reload_refuses_a_newcomer_with_503_not_unanswered(tmp_path: Path) -> None:
    """Regression (attack): a reload set max_connections_per_peer under what an address
    held; its next connection, with nothing else of it pending, was closed unanswered as
    a flood's, where the 503 of the cap was due."""
    async def go() -> None:
        server, _, port, path = await _peer_server(tmp_path, {"max_connections_per_peer": None})
        held = [await _peer_connect(port, "127.0.0.2", _HALF) for _ in range(10)]
        try:
            await steps_until(lambda: server._open == 10, "ten connections admitted")
            path.write_text(json.dumps({"models": {"a": {"port": 9}}, "http": {"max_connections_per_peer": 4}}))
            assert await server.reload()
            reader, writer = await _peer_connect(port, "127.0.0.2", _WHOLE)
            reply = await asyncio.wait_for(reader.read(), T)
            writer.close()
            assert reply.startswith(b"HTTP/1.1 503 ") and b"too many connections from 127.0.0.2" in reply, reply
            assert _refused(server, "peer_flood") == 0
        finally:
            for _, w in held:
                w.close()
            await server.stop()

    run_checked(go())


def test_an_address_with_refusals_lingering_still_evicts_its_idle_connections(tmp_path: Path,
                                                                              monkeypatch: Any) -> None:
    """Regression (attack): while an address's refused connections lingered (their 503
    read, not yet closed), its newcomer was closed unanswered although its other
    connections had become idle: it should have taken an idle one's place."""
    monkeypatch.setattr(llmux, "REFUSED_LINGER_SECS", 60.0)  # (the refused stay for the test)

    async def go() -> None:
        server, _, port, _ = await _peer_server(tmp_path, {"max_connections_per_peer": 4})
        busy = [await _peer_connect(port, "127.0.0.2", _HALF) for _ in range(4)]
        refused = [await _peer_connect(port, "127.0.0.2", _WHOLE) for _ in range(4)]
        try:
            for reader, _ in refused:
                assert (await asyncio.wait_for(reader.read(12), T)).startswith(b"HTTP/1.1 503")
            for reader, writer in busy:  # their requests end: the connections go idle
                writer.write(b"Host: x\r\n\r\n")
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), T)
                await reader.readexactly(int(re.search(rb"content-length: (\d+)", head, re.I).group(1)))
            await steps_until(lambda: all(server._between_requests(p) for p in server._busy if p.counted),
                              "the four idle")
            reader, writer = await _peer_connect(port, "127.0.0.2", _WHOLE)
            reply = await asyncio.wait_for(reader.read(), T)
            writer.close()
            assert reply.startswith(b"HTTP/1.1 200 "), reply[:80]
            assert _refused(server, "peer_flood") == 0
        finally:
            for _, w in busy + refused:
                w.close()
            await server.stop()

    run_checked(go())


def test_a_flood_looks_for_an_idle_connection_once_not_once_a_connection(tmp_path: Path) -> None:
    """Regression (attack): each connection of a flood from an address at its cap looked
    through the server's connections for an idle one of that address: the flood cost
    the loop a scan of every connection (loopback ones too) per connection.  Now a scan
    that finds none is not made again until one of the address's connections goes idle."""
    async def go() -> None:
        server, _, port, _ = await _peer_server(tmp_path, {"max_connections_per_peer": 2})
        scans: List[Optional[str]] = []
        evict = server._evict_idle

        def counted(ip: Optional[str], reason: str) -> bool:
            scans.append(ip)
            return evict(ip, reason)

        server._evict_idle = counted  # type: ignore[method-assign]
        busy = [await _peer_connect(port, "127.0.0.2", _HALF) for _ in range(2)]
        try:
            await steps_until(lambda: server._open == 2, "the address at its cap")
            for _ in range(10):  # each connects, sends and goes at once: its refusal is short
                flood = [await _peer_connect(port, "127.0.0.2", _WHOLE) for _ in range(20)]
                for _, writer in flood:
                    writer.transport.abort()
                await steps_until(lambda: not server._peer_setup, "the flood refused")
            assert _refused(server, "peer_flood") + _refused(server, "max_connections_per_peer") == 200
            assert len(scans) <= 2, len(scans)
        finally:
            for _, w in busy:
                w.close()
            await server.stop()

    run_checked(go())


def test_the_per_peer_cap_is_kept_under_a_small_connection_table(tmp_path: Path) -> None:
    """Regression (attack): with max_connections (or the fd limit's clamp of it) no larger
    than max_connections_per_peer, one address could fill the whole table and every
    other address was refused.  The cap is kept PEER_PENDING_MAX under the table."""
    async def go() -> None:
        server, _, port, _ = await _peer_server(tmp_path, {"max_connections": 12})
        held = [await _peer_connect(port, "127.0.0.2", _HALF) for _ in range(20)]
        try:
            await steps_until(lambda: not server._accepting and _refused(server, "max_connections_per_peer")
                              + _refused(server, "peer_flood") == 20 - 12 + llmux.PEER_PENDING_MAX,
                              "the twenty seen")
            assert server._open == 12 - llmux.PEER_PENDING_MAX
            reader, writer = await _peer_connect(port, "127.0.0.3", _WHOLE)
            reply = await asyncio.wait_for(reader.read(), T)
            writer.close()
            assert reply.startswith(b"HTTP/1.1 200 "), reply[:80]
        finally:
            for _, w in held:
                w.close()
            await server.stop()

    run_checked(go())


def test_a_burst_from_an_address_at_its_cap_evicts_its_idle_connections_none_is_closed() -> None:
    """An address at its cap with idle connections (a NAT, a client's pool) that opens
    more at once than PEER_PENDING_MAX: each newcomer takes an idle one's place, none is
    closed unanswered as a flood's would be."""
    cap = 24

    async def go() -> None:
        cfg = llmux.parse_config({"models": {"a": {"port": 9}}, "http": {"max_connections_per_peer": cap}})
        stream = ListStream()
        server = llmux.Server(cfg, llmux.Log(stream))
        port = await server.start("127.0.0.1", 0, sock=socket.create_server(("127.0.0.1", 0), backlog=512))
        idle = []
        try:
            for _ in range(cap):
                reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=("127.0.0.2", 0))
                writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                head = await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(int(re.search(rb"content-length: (\d+)", head, re.I).group(1)))
                idle.append(writer)
            await steps_until(lambda: len(server._peers.get("127.0.0.2", ())) == cap, "the address at its cap")
            socks = [socket.create_connection(("127.0.0.1", port), timeout=T, source_address=("127.0.0.2", 0))
                     for _ in range(cap - 4)]  # all in the kernel's queue before one is accepted
            burst = []
            for sock in socks:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                sock.setblocking(False)
            for sock in socks:
                burst.append(await asyncio.open_connection(sock=sock))
            replies = await asyncio.gather(*(asyncio.wait_for(r.read(), T) for r, _ in burst))
            assert all(r.startswith(b"HTTP/1.1 200 ") for r in replies), [r[:40] for r in replies]
            for _, writer in burst:
                writer.close()
        finally:
            for writer in idle:
                writer.close()
            await server.stop()
        assert not server.metrics._values["llmux_connections_refused_total"]

    run_checked(go())


@pytest.mark.parametrize("accept", ["transport", "connect_accepted_socket"])
@pytest.mark.parametrize("seed", range(3))
def test_explore_connect_floods_from_few_addresses(accept: str, seed: int) -> None:
    """Seeded scenarios on loopback addresses 127.0.0.2-4 (cap 2 each): floods of up to 60
    connections, requests held half-sent, idle keep-alive connections, closes.  After each
    step: every connection opened so far is answered (200 or 503) or closed unanswered,
    none hangs; the per-address tables agree with the connections; accepting never
    paused; closes unanswered are all counted.  At the end every table is empty and each
    address is served again."""
    cap = 2
    rng = random.Random(seed)
    GET = b"GET /health HTTP/1.1\r\nHost: x\r\n"

    async def go() -> None:
        cfg = llmux.parse_config({"models": {"a": {"port": 9}},
                                  "http": {"max_connections_per_peer": cap, "max_connections": 512}})
        stream = ListStream()
        server = llmux.Server(cfg, llmux.Log(stream))
        port = await server.start("127.0.0.1", 0, sock=socket.create_server(("127.0.0.1", 0), backlog=512))
        if accept != "transport":
            server._make_transport = None
        addresses = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
        seen = {"200": 0, "503": 0, "none": 0}
        open_: List[Tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]] = []  # (.., held)

        async def connect(ip: str, data: bytes) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            # Connected and sent before the loop runs again: in the kernel's queue when it is
            # accepted, so never taken for idle (an idle connection is evicted unread).
            sock = socket.create_connection(("127.0.0.1", port), timeout=T, source_address=(ip, 0))
            sock.sendall(data)
            sock.setblocking(False)
            return await asyncio.open_connection(sock=sock)

        async def outcome(reader: asyncio.StreamReader) -> str:
            try:
                first = await asyncio.wait_for(reader.read(12), T)
            except ConnectionResetError:
                first = b""
            kind = first[9:12].decode() if first else "none"
            assert kind in seen, first
            seen[kind] += 1
            return kind

        def metric(reason: str) -> float:
            return server.metrics._values["llmux_connections_refused_total"].get((reason,), 0.0)

        try:
            for step in range(12):
                ip = rng.choice(addresses)
                action = rng.choice(["flood", "flood", "held", "idle", "finish", "close"])
                if action == "flood":
                    socks = await asyncio.gather(*(connect(ip, GET + b"Connection: close\r\n\r\n")
                                                   for _ in range(rng.randint(1, 60))))
                    await asyncio.gather(*(outcome(r) for r, _ in socks))
                    for _, w in socks:
                        w.close()
                elif action == "held":  # under way: not evictable; its outcome is read at finish
                    open_.append((*await connect(ip, GET), True))
                elif action == "idle":
                    reader, writer = await connect(ip, GET + b"\r\n")
                    if await outcome(reader) == "200":
                        head = await reader.readuntil(b"\r\n\r\n")
                        length = int(re.search(rb"content-length: (\d+)", head, re.I).group(1))
                        await reader.readexactly(length)
                        open_.append((reader, writer, False))  # idle: evictable
                    else:
                        writer.close()
                else:  # finish a request held, or close an idle connection (evicted or not)
                    some = [c for c in open_ if c[2] == (action == "finish")]
                    if some:
                        reader, writer, held = some[rng.randrange(len(some))]
                        open_.remove((reader, writer, held))
                        if held:
                            writer.write(b"Connection: close\r\n\r\n")
                            await outcome(reader)
                        writer.close()
                await steps_until(lambda: not server._accepting, "connections set up")
                _check_peer_tables(server, cap)
                assert not server.metrics._values["llmux_accept_paused_total"], (seed, step)
                assert metric("peer_flood") >= seen["none"], (seed, step)
            for reader, writer, held in open_:
                if held:
                    writer.write(b"Connection: close\r\n\r\n")
                    await outcome(reader)
                writer.close()
            open_.clear()
            await steps_until(lambda: not server._busy, "every connection closed", limit=200_000)
            _check_peer_tables(server, cap)
            assert server._peers == server._peer_setup == {} and not server._no_idle
            assert metric("peer_flood") == seen["none"], (seed, metric("peer_flood"), seen)
            assert metric("max_connections_per_peer") == seen["503"], (seed, seen)
            for ip in addresses:  # each address is served again
                reader, writer = await connect(ip, GET + b"Connection: close\r\n\r\n")
                assert await outcome(reader) == "200", (seed, ip)
                writer.close()
        finally:
            for _, writer, _ in open_:
                writer.close()
            await server.stop()
        assert not [line for line in stream.lines if " error " in line], (seed, stream.lines[-20:])

    run_checked(go())


@pytest.mark.parametrize("accept", ["transport", "connect_accepted_socket"])
def test_stop_while_connections_are_being_set_up_leaves_none_behind(accept: str) -> None:
    """Connections accepted and not yet served when the server stops: each is closed,
    none is left being set up, no task is left and nothing is logged as an error."""
    async def go() -> None:
        stream = ListStream()
        server = llmux.Server(llmux.parse_config({"models": {"a": {"port": 9}}}), llmux.Log(stream))
        port = await server.start("127.0.0.1", 0, sock=socket.create_server(("127.0.0.1", 0)))
        if accept != "transport":
            server._make_transport = None
        socks = [socket.create_connection(("127.0.0.1", port), timeout=T) for _ in range(40)]
        for sock in socks[::2]:  # (connected in the kernel, none accepted yet: no loop step)
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        clients = []
        try:
            await steps_until(lambda: server._accepting, "connections being set up")
            await server.stop()
            for sock in socks:
                sock.setblocking(False)
                clients.append(await asyncio.open_connection(sock=sock))
            answers = await asyncio.gather(*(asyncio.wait_for(r.read(), T) for r, _ in clients),
                                           return_exceptions=True)
            # Closed: with an answer, or without (a reset, for one whose request is unread,
            # or still in the backlog when the listening socket closed).
            assert all(a == b"" or isinstance(a, ConnectionResetError) or a.startswith(b"HTTP/1.1 ")
                       for a in answers), answers
            assert not server._accepting and not server._busy
            assert not [line for line in stream.lines if "error" in line.split(" ", 2)[1:2]], stream.lines
        finally:
            for _, writer in clients:
                writer.close()
            for sock in socks[len(clients):]:
                sock.close()

    run_checked(go())


async def _fuzz_live(cfg: llmux.Config, rng: random.Random, total: int, transport_now: bool = True) -> Dict[str, Any]:
    loop = asyncio.get_running_loop()
    problems: List[Dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: problems.append(context))
    server = llmux.Server(cfg, llmux.Log(ListStream()))
    port = await server.start("127.0.0.1", 0)
    assert server._make_transport is not None  # a stdlib loop
    if not transport_now:
        server._make_transport = None
    statuses: Dict[str, int] = {}

    async def one(data: bytes, close_early: bool) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for piece in random_split(rng, data):
            writer.write(piece)
        if close_early:
            writer.transport.abort()  # gone without a word
            return
        writer.write_eof()
        reply = await asyncio.wait_for(reader.read(), T)
        status = reply[9:12].decode("latin-1") if reply.startswith(b"HTTP/1.1 ") else "none"
        statuses[status] = statuses.get(status, 0) + 1
        writer.close()

    started = time.monotonic()
    for batch in range(0, total, 20):
        await asyncio.gather(*(one(fuzz_input(rng), rng.random() < 0.1) for _ in range(20)))
    rate = total / (time.monotonic() - started)
    # Still serving, nothing held, nothing leaked.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b'POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 14\r\n\r\n{"model": "a"}')
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), T)).startswith(b"HTTP/1.1 200 ")
    assert not server._accepting, "a connection served is still counted as being set up"
    writer.close()
    deadline = loop.time() + T
    while server._busy and loop.time() < deadline:
        await asyncio.sleep(0.01)
    assert not server._busy, "connections left open"
    # The body budget and the connection table are back to empty: nothing leaked.
    assert server.bodies.used == 0 and server._open == 0 and server._peers == {} \
        and server._peer_setup == {} and not server._no_idle
    assert not server._accepting, server._accepting
    assert server.switcher.queued == 0
    assert all(m.in_flight == 0 and not m.slots for m in server.switcher.models.values())
    await server.stop()
    assert problems == [], problems
    leftover = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert leftover == [], leftover
    return {"count": total, "rate": rate, "statuses": dict(sorted(statuses.items()))}


SOAK_SECS = int(os.environ.get("LLMUX_SOAK_SECS", "12"))  # CI: 0 on the other Pythons (time)


@pytest.mark.skipif(SOAK_SECS == 0, reason="LLMUX_SOAK_SECS=0")
def test_soak_12_seconds() -> None:
    """bench/soak.py, short: mixed traffic, disconnects, failing wakes, hostile bodies and
    connection floods under a low fd limit; it checks that every request was answered or
    failed with a status, slots are zero, RSS and fds are back near their baseline, no
    hook failed for lack of fds and the log is clean, and exits non-zero otherwise."""
    p = subprocess.run([sys.executable, str(HERE / "bench" / "soak.py"), "--seconds", str(SOAK_SECS),
                        "--clients", "8"],
                       capture_output=True, text=True, timeout=HARD - 5)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "FAIL" not in p.stdout and p.stdout.count("PASS") == 6, p.stdout
    for kind in ("oversized: 413", "trickle: 408", "chunk-storm: 400", "flood:"):
        assert kind in p.stdout, p.stdout


# ─────────────────────────────── operations: metrics, control ───────────────────────────

_SAMPLE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\["\\n])*",?)*\})? (\S+)')


def parse_prometheus(text: str) -> Dict[str, Dict[str, Any]]:
    """A strict reader of the text format: HELP then TYPE before samples, every sample a
    declared family, label values properly escaped, histograms cumulative with +Inf,
    _sum and _count."""
    families: Dict[str, Dict[str, Any]] = {}
    current = None
    assert text.endswith("\n")
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split(" ")[2]
            assert name not in families, f"family {name} twice"
            families[name] = {"help": line.split(" ", 3)[3], "samples": []}
            current = name
        elif line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ")
            assert name == current and kind in ("counter", "gauge", "histogram")
            families[name]["type"] = kind
        else:
            match = _SAMPLE.fullmatch(line)
            assert match, f"bad sample line {line!r}"
            sample, labels, value = match.groups()
            base = re.sub(r"_(bucket|sum|count)$", "", sample) if families[current]["type"] == "histogram" else sample
            assert base == current, f"{sample} outside its family {current}"
            float(value.replace("+Inf", "inf"))
            pairs = re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', labels or "")
            labels_dict = {k: re.sub(r"\\(.)", lambda m: "\n" if m.group(1) == "n" else m.group(1), v)
                           for k, v in pairs}
            families[current]["samples"].append((sample, labels_dict, float(value.replace("+Inf", "inf"))))
    for name, fam in families.items():
        if fam["type"] != "histogram":
            continue
        series: Dict[Tuple, List[Tuple[float, float]]] = {}
        for sample, labels, value in fam["samples"]:
            key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
            if sample.endswith("_bucket"):
                series.setdefault(key, []).append((float(labels["le"].replace("+Inf", "inf")), value))
        for key, buckets in series.items():
            bounds = [b for b, _ in buckets]
            assert bounds == sorted(bounds) and bounds[-1] == float("inf"), (name, key)
            counts = [c for _, c in buckets]
            assert counts == sorted(counts), f"{name}{key} buckets not cumulative"
            count = [v for s, l, v in fam["samples"] if s == name + "_count"
                     and tuple(sorted(l.items())) == key]
            assert count == [counts[-1]], (name, key)
            assert [v for s, l, v in fam["samples"] if s == name + "_sum" and tuple(sorted(l.items())) == key]
    return families


def test_metrics_exposition_is_strictly_valid_and_counts_what_happened(env: Env) -> None:
    flag = env.tmp / "fail"
    lx = env.start({"a": env.model("a"), 'b"\\x': env.model('b"\\x', wake_extra=f"[ ! -e {flag} ] || exit 3")})
    assert lx.chat("a")[0] == 200
    assert lx.chat('b"\\x')[0] == 200
    flag.touch()
    assert lx.chat("a")[0] == 200
    assert lx.chat('b"\\x')[0] == 503
    assert lx.chat("a")[0] == 200
    status, headers, body = lx.request("GET", "/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain; version=0.0.4")
    fams = parse_prometheus(body.decode())
    expected = {"llmux_requests_total", "llmux_request_duration_seconds", "llmux_request_queue_depth",
                "llmux_request_queue_wait_seconds", "llmux_model_in_flight", "llmux_switch_total",
                "llmux_switch_duration_seconds", "llmux_switch_drain_duration_seconds",
                "llmux_model_active_duration_seconds", "llmux_switch_cost_ema_seconds",
                "llmux_hook_duration_seconds", "llmux_hook_failures_total", "llmux_model_active"}
    assert expected <= set(fams)

    def value(name: str, **labels: str) -> float:
        found = [v for s, l, v in fams[name]["samples"] if s == name and l == labels]
        assert len(found) == 1, (name, labels, fams[name]["samples"])
        return found[0]

    assert value("llmux_requests_total", model="a", status="200") == 3
    assert value("llmux_requests_total", model='b"\\x', status="503") == 1
    assert value("llmux_switch_total", **{"from": "a", "to": 'b"\\x', "result": "ok"}) == 1
    assert value("llmux_switch_total", **{"from": "a", "to": 'b"\\x', "result": "failed"}) == 1
    assert value("llmux_hook_failures_total", model='b"\\x', hook="wake") == 1
    assert value("llmux_model_active", model="a") == 1 and value("llmux_model_active", model='b"\\x') == 0
    assert value("llmux_model_in_flight", model="a") == 0
    assert value("llmux_switch_cost_ema_seconds", **{"from": "a", "to": 'b"\\x'}) > 0
    assert 'model="b\\"\\\\x"' in body.decode()  # the raw escaping


def test_histogram_buckets_include_their_upper_bound() -> None:
    m = llmux.Metrics()
    m.define("histogram", "h", "help", ("k",))
    for value in (0.005, 0.004, 0.0051, 1.0, 700.0):
        m.observe("h", "v", value=value)
    samples = {line.split(" ")[0]: float(line.split(" ")[1])
               for line in m.render().splitlines() if not line.startswith("#")}
    assert samples['h_bucket{k="v",le="0.005"}'] == 2  # 0.004 and 0.005 itself
    assert samples['h_bucket{k="v",le="0.01"}'] == 3
    assert samples['h_bucket{k="v",le="1"}'] == 4
    assert samples['h_bucket{k="v",le="600"}'] == 4
    assert samples['h_bucket{k="v",le="+Inf"}'] == samples['h_count{k="v"}'] == 5
    assert samples['h_sum{k="v"}'] == pytest.approx(701.0141)


def test_status_and_models_show_what_is_loaded(env: Env) -> None:
    lx = env.start({"a": env.model("a", aliases=["alpha"]), "b": env.model("b")})
    assert lx.chat("alpha")[1]["backend"] == "a"  # an alias routes to its model
    models = {m["id"]: m for m in lx.request("GET", "/v1/models")[2]["data"]}
    assert models["a"]["loaded"] is True and models["a"]["aliases"] == ["alpha"]
    assert models["b"]["loaded"] is False
    status = lx.request("GET", "/llmux/status")[2]
    assert status["active"] == ["a"] and status["models"]["a"]["in_flight"] == 0
    assert status["switches"][-1]["to"] == "a" and status["switches"][-1]["result"] == "ok"
    assert status["hooks"]["a"]["wake"]["ok"] is True
    assert "-->a" in status["switch_cost_secs"]


def test_control_api_wakes_and_sleeps(env: Env) -> None:
    lx = env.start({"a": env.model("a"), "b": env.model("b")}, api_keys=["k"])
    auth = {"Authorization": "Bearer k"}
    assert lx.request("POST", "/llmux/models/a/wake")[0] == 401
    status, _, payload = lx.request("POST", "/llmux/models/a/wake", headers=auth)
    assert status == 200 and payload == {"model": "a", "state": "active", "changed": True}
    assert lx.request("POST", "/llmux/models/b/wake", headers=auth)[2]["state"] == "active"
    assert env.lines() == ["wake-start a", "wake-end a", "sleep-start a", "sleep-end a",
                           "wake-start b", "wake-end b"]
    assert lx.request("POST", "/llmux/models/b/sleep", headers=auth)[2] == {
        "model": "b", "state": "asleep", "changed": True}
    assert lx.request("POST", "/llmux/models/b/sleep", headers=auth)[2]["changed"] is False
    assert lx.request("GET", "/llmux/models/b/sleep", headers=auth)[0] == 405
    assert lx.request("POST", "/llmux/models/zz/wake", headers=auth)[0] == 404


@pytest.mark.parametrize("peer, local", [
    (("127.0.0.1", 5000), True), (("127.3.2.1", 5000), True), (("::1", 5000, 0, 0), True),
    (("::ffff:127.0.0.1", 5000, 0, 0), True), (("10.0.0.5", 5000), False),
    (("192.168.1.20", 5000), False), (("0.0.0.0", 5000), False), (("fe80::1", 5000, 0, 2), False),
    (("fe80::1%eth0", 5000, 0, 2), False), (("::ffff:10.0.0.5", 5000, 0, 0), False),
    (("2001:db8::1", 5000, 0, 0), False), (("::", 5000, 0, 0), False), (("not-an-ip", 1), False),
    ("", True), ("/run/llmux.sock", True), (None, False), ((), False),
])
def test_loopback_peer_decision(peer: Any, local: bool) -> None:
    assert llmux.is_loopback_peer(peer) is local


def test_llmux_routes_answer_a_wrong_method_405_with_allow(env: Env) -> None:
    """Regression (attack): POST /llmux/events and /llmux/ui were 404 "no llmux route";
    and no 405 said which methods the route takes (RFC 9110 15.5.6: Allow)."""
    lx = env.start({"a": env.model("a")})
    for method, path, allow in (("POST", "/llmux/events", "GET, HEAD"), ("POST", "/llmux/ui", "GET, HEAD"),
                                ("DELETE", "/llmux/status", "GET, HEAD"),
                                ("GET", "/llmux/models/a/wake", "POST")):
        status, headers, payload = lx.request(method, path)
        assert status == 405 and headers["allow"] == allow, (method, path, status, headers)
        assert payload["error"]["code"] == "method_not_allowed", payload


def test_control_api_answers_remote_peers_403_unless_keys_or_allowed() -> None:
    """Regression: with the defaults (0.0.0.0, no keys) any network peer could wake and
    sleep models and read hook output from /llmux/status."""

    async def main() -> None:
        for raw, remote_ok in ((GOOD, False), ({**GOOD, "allow_remote_control": True}, True),
                               ({**GOOD, "api_keys": ["k"]}, True)):  # the key is then required of all
            server = llmux.Server(llmux.parse_config(raw), llmux.Log(ListStream()))
            for peer in (("127.0.0.1", 1), ("::1", 1, 0, 0), ("::ffff:127.0.0.1", 1, 0, 0)):
                server._check_control_peer(peer)
            for peer in (("10.0.0.5", 40000), ("fe80::1", 40000, 0, 2)):
                if remote_ok:
                    server._check_control_peer(peer)
                    continue
                with pytest.raises(llmux.LLMuxError) as info:
                    server._check_control_peer(peer)
                assert info.value.status == 403 and info.value.to_json() == {"error": {
                    "message": "the control API answers only loopback clients; expected a request "
                               "from this host, or set api_keys (or allow_remote_control: true) in "
                               f"the config; got a request from {peer[0]}",
                    "type": "permission_error", "code": "remote_control_forbidden"}}
            await server.stop()

    run_checked(main())


def test_control_and_status_answer_this_host_without_keys(env: Env) -> None:
    lx = env.start({"a": env.model("a")})
    assert lx.request("GET", "/llmux/status")[0] == 200
    assert lx.request("POST", "/llmux/models/a/wake")[2]["changed"] is True


def test_control_sleep_drains_first_and_409_while_switching(env: Env) -> None:
    lx = env.start({"a": env.model("a"), "b": env.model("b")})
    conn, resp = sse_stream(lx.port, {"model": "a", "stream": True, "hold": str(env.gate("a"))})
    data_line(resp)
    t, box = run_bg(lx.request, "POST", "/llmux/models/a/sleep")
    lx.wait_log(r"model\.state model=a from=active to=draining .*control API")
    status, _, payload = lx.request("POST", "/llmux/models/b/wake")
    assert status == 409 and payload["error"]["message"].startswith(
        "cannot wake model 'b' now: a switch is in progress (a -> -)")
    assert "sleep-start a" not in env.lines()
    env.gate("a").touch()
    resp.read()
    conn.close()
    assert join(t, box)[0] == 200
    lines = env.lines()
    assert lines.index("stream-end a") < lines.index("sleep-start a")


# The dashboard in a real browser: headless Chromium driven over the DevTools protocol
# on a pipe (--remote-debugging-pipe: JSON messages ending in NUL, commands read from its
# fd 3, answers written to its fd 4), so no websocket client is needed.

CHROMIUM_FLAGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-default-apps", "--disable-domain-reliability", "--metrics-recording-only",
                  "--hide-scrollbars", "--mute-audio",
                  # Loopback bypasses a proxy; anything else the browser tries goes nowhere.
                  "--proxy-server=127.0.0.1:9")


# Puts the pipes on fds 3 and 4 and execs the browser (sh cannot name fds above 9).  The
# copies come first (dup2(r, 3) would close w if w were 3); a copy already on 3 or 4 is
# left as it is by dup2, close-on-exec included, hence set_inheritable.
_FDS_3_AND_4 = """import os, sys
r, w = int(sys.argv[1]), int(sys.argv[2])
a, b = os.dup(r), os.dup(w)
os.dup2(a, 3)
os.dup2(b, 4)
for fd in {r, w, a, b} - {3, 4}:
    os.close(fd)
os.set_inheritable(3, True)
os.set_inheritable(4, True)
os.execv(sys.argv[3], sys.argv[3:])
"""


def chromium_binary() -> str:
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path:
            return path
    pytest.skip("no chromium or chromium-browser binary on PATH: the dashboard is not tried in a browser")


class DevToolsError(AssertionError):
    """A DevTools command answered with an error."""


class Chromium:
    """One headless Chromium with one page, for a test; ``with`` kills it and its group."""

    def __init__(self, tmp: Path, size: Tuple[int, int] = (1200, 800)) -> None:
        binary = chromium_binary()
        self.tmp = tmp
        cmd_r, self._cmd_w = os.pipe()
        self._ans_r, ans_w = os.pipe()
        self.log = open(tmp / "chromium.log", "wb")
        self.proc = spawn([sys.executable, "-c", _FDS_3_AND_4, str(cmd_r), str(ans_w), binary,
                           *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'chromium-profile'}",
                           "--remote-debugging-pipe", f"--window-size={size[0]},{size[1]}", "about:blank"],
                          pass_fds=(cmd_r, ans_w), stdin=subprocess.DEVNULL, stdout=self.log,
                          stderr=subprocess.STDOUT, start_new_session=True)
        os.close(cmd_r)
        os.close(ans_w)
        self._buf = b""
        self._id = 0
        self.session: Optional[str] = None
        try:
            target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            self.send("Emulation.setDeviceMetricsOverride", {"width": size[0], "height": size[1],
                                                             "deviceScaleFactor": 1, "mobile": False})
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "Chromium":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # renderers and helpers too
        except ProcessLookupError:
            pass
        _kill(self.proc)
        os.close(self._cmd_w)
        os.close(self._ans_r)
        self.log.close()

    def send(self, method: str, params: Optional[Dict[str, Any]] = None, timeout: float = T) -> Dict[str, Any]:
        """Send one command (to the page, once attached); return its result."""
        self._id += 1
        msg: Dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if self.session is not None:
            msg["sessionId"] = self.session
        data = json.dumps(msg).encode() + b"\0"
        while data:
            data = data[os.write(self._cmd_w, data):]
        deadline = time.monotonic() + timeout
        while True:
            reply = self._read(deadline, method)
            if reply.get("id") == self._id:  # anything else is an event: not needed here
                if "error" in reply:
                    raise DevToolsError(f"chromium: {method}: {reply['error']}")
                return reply.get("result", {})

    def _read(self, deadline: float, method: str) -> Dict[str, Any]:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._ans_r], [], [], left)[0]:
                raise AssertionError(f"chromium: no answer to {method} in time")
            data = os.read(self._ans_r, 1 << 20)
            if not data:
                raise AssertionError(f"chromium exited; its log:\n{(self.tmp / 'chromium.log').read_text()[-3000:]}")
            self._buf += data
        msg, _, self._buf = self._buf.partition(b"\0")
        return json.loads(msg)

    def open(self, url: str) -> None:
        self.send("Page.navigate", {"url": url})

    def js(self, expression: str, timeout: float = T) -> Any:
        """The value of a JavaScript expression in the page (a promise is awaited)."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, timeout + 1)
        if "exceptionDetails" in result:
            raise AssertionError(f"chromium: {expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait(self, condition: str, timeout: float = T) -> None:
        """Wait until a JavaScript condition holds in the page: checked in the page on every
        change to its DOM, so nothing here sleeps."""
        waiter = ("new Promise((resolve) => { const check = () => { try { return !!(%s); } "
                  "catch (e) { return false; } }; if (check()) return resolve(true); "
                  "const seen = new MutationObserver(() => { if (check()) { seen.disconnect(); resolve(true); } }); "
                  "seen.observe(document, {subtree: true, childList: true, attributes: true, characterData: true}); "
                  "setTimeout(() => { seen.disconnect(); resolve(false); }, %d); })") % (condition, timeout * 1000)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.js(waiter, max(0.0, deadline - time.monotonic())):
                    return
                break
            except DevToolsError as e:
                # A navigation destroys the document the check ran in: check the new one.
                if "context" not in str(e) or time.monotonic() > deadline:
                    raise
        self.screenshot(self.tmp / "timed-out.png")
        raise AssertionError(f"the page never showed {condition}; it shows:\n"
                             + str(self.js("document.body ? document.body.innerText : ''")))

    def click(self, selector: str) -> None:
        assert self.js(f"(() => {{ const b = document.querySelector({json.dumps(selector)}); "
                       "if (!b || b.disabled) return false; b.click(); return true; })()"), selector

    def screenshot(self, path: Path) -> None:
        png = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        Path(path).write_bytes(base64.b64decode(png))


@pytest.fixture
def page(tmp_path: Path) -> Any:
    """A headless Chromium page (the test is skipped when there is no chromium)."""
    with Chromium(tmp_path) as browser:
        yield browser


def save_screenshot(page: Chromium, tmp: Path) -> None:
    page.screenshot(tmp / "dashboard.png")
    if os.environ.get("LLMUX_SCREENSHOT"):
        page.screenshot(Path(os.environ["LLMUX_SCREENSHOT"]))


def test_dashboard_shows_state_switches_and_controls_in_a_browser(env: Env, page: Chromium,
                                                                   tmp_path: Path) -> None:
    lx = env.start({"a": env.model("a", wake_extra="echo '<b>weights</b> loaded'"), "b": env.model("b")})
    page.open(f"http://127.0.0.1:{lx.port}/llmux/ui")
    page.wait('document.querySelector(\'[data-model="a"][data-state="asleep"]\')')
    assert lx.chat("a")[0] == 200 and lx.chat("b")[0] == 200
    page.wait('document.querySelector(\'[data-model="b"][data-state="active"]\') && '
              'document.querySelector(\'[data-switch="a->b"][data-result="ok"]\')')
    assert page.js('document.getElementById("active").textContent') == "b"
    assert page.js('document.querySelector(\'[data-model="a"]\').dataset.state') == "asleep"
    # a's lane shows it was awake; the costs of both switches are listed.
    assert page.js('document.querySelectorAll(\'[data-lane="a"] [data-state="active"]\').length') == 1
    assert page.js('document.querySelector(\'[data-switch="-->a"]\').dataset.result') == "ok"
    page.wait('document.getElementById("costs").textContent.includes("a → b")')
    # Hook output is text, never markup.
    assert "<b>weights</b> loaded" in page.js('document.getElementById("output").textContent')
    assert page.js('document.querySelector("#output b")') is None
    save_screenshot(page, tmp_path)
    page.click('[data-model="b"] button[data-action="sleep"]')
    page.wait('document.querySelector(\'[data-model="b"][data-state="asleep"]\') && '
              'document.querySelector(\'[data-switch="b->-"][data-result="ok"]\')')
    assert page.js('document.getElementById("active").textContent') == ""
    assert env.lines()[-2:] == ["sleep-start b", "sleep-end b"]


def test_dashboard_asks_for_the_api_key_and_shows_a_failed_wake(env: Env, page: Chromium,
                                                                 tmp_path: Path) -> None:
    lx = env.start({"a": env.model("a"), "<i>b</i>": env.model(
        "b", wake_extra="echo 'out of <i>memory</i>' >&2; exit 3"), "__proto__": env.model("p")},
        api_keys=["k"])
    page.open(f"http://127.0.0.1:{lx.port}/llmux/ui")  # the page itself needs no key
    page.wait('!document.getElementById("keyform").hidden')
    page.js('document.getElementById("key").value = "wrong"; '
            'document.getElementById("keyform").requestSubmit()')
    page.wait('!document.getElementById("keyform").hidden && '
              'document.getElementById("keymsg").textContent.includes("refused")')
    page.js('document.getElementById("key").value = "k"; '
            'document.getElementById("keyform").requestSubmit()')
    page.wait('document.querySelectorAll("[data-model]").length == 3')
    assert page.js('sessionStorage.getItem("llmux-key")') == "k"
    assert page.js('document.getElementById("keyform").hidden') is True
    # A model's name is text, never markup.
    assert page.js('document.querySelector("#models i")') is None
    assert page.js('document.querySelectorAll("[data-model]")[1].dataset.model') == "<i>b</i>"
    assert page.js('document.querySelectorAll("[data-model]")[1].cells[0].textContent') == "<i>b</i>"
    status, _, _ = lx.request("POST", "/v1/chat/completions", {"model": "<i>b</i>", "messages": []},
                              {"authorization": "Bearer k"})
    assert status == 503
    failed = 'document.querySelector(\'[data-switch="--><i>b</i>"][data-result="failed"]\')'
    page.wait(failed)
    assert page.js(failed + ".textContent").endswith(
        "hook 'wake' for model '<i>b</i>' exited 3: out of <i>memory</i>")
    assert page.js('document.querySelector(\'[data-hook="<i>b</i> wake"]\').dataset.ok') == "false"
    assert page.js('document.querySelector("main i:not(.waking):not(.active):not(.draining)'
                   ':not(.sleeping):not(.failed)")') is None
    # Regression (attack): a model named "__proto__" wrote its hooks onto Object.prototype.
    status, _, _ = lx.request("POST", "/v1/chat/completions", {"model": "__proto__", "messages": []},
                              {"authorization": "Bearer k"})
    assert status == 200
    page.wait('document.querySelector(\'[data-hook="__proto__ wake"][data-ok="true"]\')')
    assert page.js('Object.prototype.wake === undefined && ({}).wake === undefined') is True
    page.wait('document.querySelector(\'[data-model="__proto__"][data-state="active"]\')')
    save_screenshot(page, tmp_path)


# ─────────────────────────────── lifecycle ──────────────────────────────────────────────


def alive_hook(env: Env, name: str) -> str:
    """Alive while the file up-NAME exists (as a server would be)."""
    return f"[ -e {env.tmp / ('up-' + name)} ]"


def test_startup_adopts_a_model_that_is_already_up(env: Env) -> None:
    (env.tmp / "up-b").touch()
    lx = env.start({n: env.model(n, alive=alive_hook(env, n)) for n in "ab"})
    assert lx.health()["active"] == ["b"]
    assert lx.chat("b")[1]["backend"] == "b"
    assert env.lines() == ["req b"]  # no wake: adopted


def test_startup_with_several_up_keeps_preload_and_sleeps_the_rest(env: Env) -> None:
    for n in "abc":
        (env.tmp / f"up-{n}").touch()
    lx = env.start({n: env.model(n, alive=alive_hook(env, n)) for n in "abc"}, preload="b")
    assert lx.health()["active"] == ["b"]
    assert sorted(env.lines()) == ["sleep-end a", "sleep-end c", "sleep-start a", "sleep-start c"]


def test_preload_wakes_a_model_at_start(env: Env) -> None:
    lx = env.start({n: env.model(n) for n in "ab"}, preload="b")
    lx.wait_log(r"switch\.end to=b result=ok")
    assert env.lines() == ["wake-start b", "wake-end b"]


def test_liveness_failure_sleeps_the_model_and_the_next_request_wakes_it(env: Env) -> None:
    up = env.tmp / "up-a"
    lx = env.start({"a": env.model("a", alive=alive_hook(env, "a"), wake_extra=f"touch {up}")},
                   policy={"alive_interval_secs": 0.1})
    assert lx.chat("a")[0] == 200
    lx.wait_log(r"hook\.exit model=a hook=alive code=0")
    up.unlink()  # the server died
    lx.wait_log(r"warning model\.alive_failed model=a")
    lx.wait_log(r"switch\.end from=a result=ok")
    assert lx.health()["active"] == []
    assert lx.chat("a")[0] == 200
    assert env.lines().count("wake-start a") == 2


async def log_shows(stream: "ListStream", pattern: str, after: int = 0) -> int:
    """Wait (on the running loop) until a log line from index ``after`` on matches;
    return the index just past it."""
    rx = re.compile(pattern)
    deadline = time.monotonic() + T
    while True:
        for i in range(after, len(stream.lines)):
            if rx.search(stream.lines[i]):
                return i + 1
        assert time.monotonic() < deadline, f"no log line matching {pattern!r}:\n" + \
            "\n".join(stream.lines[-20:])
        await asyncio.sleep(0.005)


def test_out_of_fds_pauses_accepting_and_liveness_survives() -> None:
    """Regression (issue 8, defect 3): out of fds, asyncio's accept loop logged tracebacks
    by the tens of thousands a second, and the liveness task died silently for good."""
    stream = ListStream()

    async def go() -> None:
        cfg = llmux.parse_config({"models": {"a": {"port": 1, "alive": "true"}},
                                  "policy": {"alive_interval_secs": 0.02}})
        server = llmux.Server(cfg, llmux.Log(stream))
        listener = socket.create_server(("127.0.0.1", 0))
        port = await server.start("127.0.0.1", 0, sock=listener)
        server.switcher.adopt("a")
        server.start_background()
        loop = asyncio.get_running_loop()
        try:
            await log_shows(stream, r"hook\.exit model=a hook=alive code=0")
            client = socket.create_connection(("127.0.0.1", port), timeout=T)
            client.setblocking(False)
            with ExhaustedFds():  # the connection waits in the backlog; accept() fails
                seen = await log_shows(stream, r"warning accept\.paused reason=\"too many open files\"")
                seen = await log_shows(stream, r"hook\.exit model=a hook=alive.*could not start", seen)
                assert server.switcher.active() == ["a"]  # no verdict: not put to sleep
            await log_shows(stream, r"hook\.exit model=a hook=alive code=0", seen)
            await loop.sock_sendall(client, b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            answer = await asyncio.wait_for(loop.sock_recv(client, 65536), T)
            assert answer.startswith(b"HTTP/1.1 200 OK"), answer
            client.close()
        finally:
            await server.stop()
        assert server.switcher.active() == ["a"]

    run_checked(go())
    assert not [line for line in stream.lines if "internal.error" in line or "Traceback" in line]
    # Paused and resumed every ACCEPT_PAUSE_SECS, said once per pause, not per attempt.
    assert 1 <= sum("accept.paused" in line for line in stream.lines) <= 60


def test_sighup_during_startup_adoption_is_applied_after_listening(env: Env) -> None:
    """Regression (issue 8, defect 15): a SIGHUP before the reload handler was installed
    (systemctl reload during start-up) killed llmux and orphaned the running hook."""
    once = env.tmp / "hup-sent"
    alive = f'[ -e {once} ] || {{ touch {once}; kill -HUP "$PPID"; echo "still here"; }}'
    lx = env.start({"a": env.model("a", alive=alive)})
    lx.wait_log(r"reload\.deferred")
    lx.wait_log(r"reload\.done")
    lx.wait_log(r"hook\.output model=a hook=alive stream=stdout \| still here")
    assert lx.health()["active"] == ["a"] and lx.proc.poll() is None


def test_startup_adoption_keeps_what_fits_and_what_would_not_sleep(env: Env) -> None:
    """Regression (attack): at start, a model found up whose sleep failed was left
    ASLEEP in the switcher, and a third model was woken beside it; in capacity mode,
    co-resident models found up were put to sleep although they fitted."""
    for n in "abc":
        (env.tmp / f"up-{n}").touch()
    fail = "exit 1"
    models = {n: env.model(n, alive=alive_hook(env, n), size=2 if n == "d" else 1,
                           **({"sleep_extra": fail} if n == "c" else {})) for n in "abcd"}
    lx = env.start(models, policy={"capacity": 2})
    # a and b fit together and are kept; c would not sleep: still loaded, so counted.
    assert sorted(lx.health()["active"]) == ["a", "b", "c"]
    assert "sleep-start a" not in env.lines() and "sleep-start b" not in env.lines()
    lx.wait_log(r"error startup\.sleep_failed model=c")
    status, payload = lx.chat("d")  # needs the whole capacity: c must go too, and cannot
    assert status == 503 and "hook 'sleep' for model 'c'" in payload["error"]["message"]
    assert "wake-start d" not in env.lines()


def test_a_stale_alive_verdict_does_not_sleep_a_model_woken_since() -> None:
    """Regression (attack): an alive hook that looked at the model and reported late
    put it to sleep although it had been switched out and woken again meanwhile."""
    stream = ListStream()

    class SlowAlive(llmux.SimHooks):
        def __init__(self) -> None:
            super().__init__({"*": 0.0}, {"*": 0.0})
            self.verdict = asyncio.Event()

        async def alive(self, model: llmux.ModelConfig) -> Optional[bool]:
            await self.verdict.wait()
            return False  # about the model as it was when the hook looked

    async def go() -> None:
        cfg = llmux.parse_config({"models": {"a": {"port": 1, "alive": "x"}, "b": {"port": 2}},
                                  "policy": {"alive_interval_secs": 0}})
        hooks = SlowAlive()
        server = llmux.Server(cfg, llmux.Log(stream), hooks=hooks)  # type: ignore[arg-type]
        sw = server.switcher
        (await sw.acquire("a")).release()
        check = asyncio.get_running_loop().create_task(server._check_alive())
        await asyncio.sleep(0)
        (await sw.acquire("b")).release()  # a is switched out ...
        (await sw.acquire("a")).release()  # ... and back in, healthy
        hooks.verdict.set()
        await check
        await sw.wait_idle()
        assert sw.active() == ["a"]
        await server.stop()

    run_checked(go())
    assert not [line for line in stream.lines if "alive_failed" in line]


def test_a_config_nested_too_deeply_is_a_config_error(tmp_path: Path, env: Env) -> None:
    """Regression (attack): --check printed a raw RecursionError traceback, and a SIGHUP
    with such a file failed without a word."""
    deep = tmp_path / "deep.json"
    deep.write_text('{"models": ' + "[" * 100_000 + "]" * 100_000 + "}")
    p = subprocess.run([sys.executable, LLMUX, "-c", str(deep), "--check"], capture_output=True,
                       text=True, timeout=T)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-500:]
    assert p.stderr.strip() == f"llmux: config error: {deep}: not valid JSON: nested too deeply"
    lx = env.start({"a": env.model("a")})
    lx.config_path.write_text(deep.read_text())
    lx.proc.send_signal(signal.SIGHUP)
    lx.wait_log(r"error reload\.failed reason=.*nested too deeply")


def test_idle_sleep_frees_the_model(env: Env) -> None:
    lx = env.start({"a": env.model("a"), "b": env.model("b", idle_sleep_secs=0.2)},
                   policy={"idle_sleep_secs": 0})
    assert lx.chat("b")[0] == 200
    match = lx.wait_log(r"model\.state model=b from=active to=draining after_secs=([0-9.]+) "
                        r"reason=\"idle for 0\.2s")
    assert float(match.group(1)) >= 0.2
    lx.wait_log(r"model\.state model=b from=sleeping to=asleep")
    assert lx.chat("a")[0] == 200
    assert "sleep-start a" not in env.lines()  # model a has no idle_sleep_secs


def test_sigterm_lets_in_flight_requests_finish_then_sleeps_on_exit(env: Env) -> None:
    lx = env.start({"a": env.model("a")}, policy={"sleep_on_exit": True, "shutdown_grace_secs": 30})
    conn, resp = sse_stream(lx.port, {"model": "a", "stream": True, "hold": str(env.gate("a"))})
    resp.readline()
    lx.proc.send_signal(signal.SIGTERM)
    lx.wait_log(r"info shutdown grace_secs=30")
    with pytest.raises(OSError):  # no longer accepting
        socket.create_connection(("127.0.0.1", lx.port), timeout=T).close()
    env.gate("a").touch()
    assert resp.read().endswith(b"data: [DONE]\n\n")
    conn.close()
    assert lx.proc.wait(T) == 0
    lx.wait_log(r"shutdown\.drained requests_cut=0")
    assert env.lines()[-2:] == ["sleep-start a", "sleep-end a"]


def test_an_answer_cut_by_shutdown_is_logged_and_counted_as_cut(env: Env) -> None:
    """Regression (attack): an answer under way when shutdown_grace_secs ran out was logged
    and counted as 503 (what a request that got no answer is told), with no request.cut
    line; a begun answer that a switch cuts is a 502, and so is this one."""
    lx = env.start({"a": env.model("a")}, policy={"shutdown_grace_secs": 0.3})
    conn, resp = sse_stream(lx.port, {"model": "a", "stream": True, "hold": str(env.gate("a"))})
    assert resp.status == 200
    assert data_line(resp)  # the backend's first event: its answer has begun (a loading
    lx.proc.send_signal(signal.SIGTERM)  # comment of llmux's own, first, is not yet that)
    try:
        resp.read()
    except http.client.IncompleteRead:
        pass  # cut: no last chunk
    conn.close()
    assert lx.proc.wait(T) == 0
    lx.wait_log(r'warning request\.cut model=a reason="llmux is shutting down')
    lx.wait_log(r"info request method=POST path=/v1/chat/completions model=a status=502")


def test_sigterm_answers_queued_requests_after_the_grace_period(env: Env) -> None:
    lx = env.start({"a": env.model("a", wake_extra=f"while [ ! -e {env.gate('a')} ]; do sleep 0.01; done")},
                   policy={"shutdown_grace_secs": 0.2})
    t, box = run_bg(lx.chat, "a")
    lx.wait_log(r"hook\.start model=a hook=wake")
    lx.proc.send_signal(signal.SIGTERM)
    status, payload = join(t, box)
    assert status == 503 and payload["error"]["code"] == "shutting_down"
    assert lx.proc.wait(T) == 0
    assert "wake-end a" not in env.lines()  # the hung wake was killed, not left behind


def test_sighup_reload_keeps_unchanged_models_and_applies_changes(env: Env) -> None:
    models = {"a": env.model("a"), "b": env.model("b")}
    lx = env.start(models)
    assert lx.chat("a")[0] == 200
    config = json.loads(lx.config_path.read_text())
    # 1. An invalid config is refused; llmux keeps serving on the old one.
    lx.config_path.write_text('{"models": {"a": {"port": "x"}}}')
    lx.proc.send_signal(signal.SIGHUP)
    lx.wait_log(r'error reload\.failed reason="models\.a\.port: expected a port number')
    assert lx.chat("a")[0] == 200
    # 2. Adding a model and changing a sleeping one does not touch the active one.
    config["models"]["c"] = env.model("c")
    config["models"]["b"]["wake"] = env.hook("wake2")
    lx.config_path.write_text(json.dumps(config))
    lx.proc.send_signal(signal.SIGHUP)
    lx.wait_log(r"reload\.done added=c changed=b")
    assert lx.health()["active"] == ["a"] and env.lines() == ["wake-start a", "wake-end a", "req a", "req a"]
    assert lx.chat("c")[1]["backend"] == "c"
    assert lx.chat("b")[1]["backend"] == "b"
    assert env.lines()[-3:] == ["wake2-start b", "wake2-end b", "req b"]
    # 3. Changing the active model drains and sleeps it first; removing one fails its queue.
    config["models"]["b"]["sleep"] = env.hook("sleep2")
    del config["models"]["c"]
    lx.config_path.write_text(json.dumps(config))
    lx.proc.send_signal(signal.SIGHUP)
    lx.wait_log(r"reload\.done changed=b removed=c")
    assert env.lines()[-2:] == ["sleep-start b", "sleep-end b"]  # with its old hook
    assert lx.health()["active"] == []
    assert lx.chat("c")[0] == 404
    assert lx.chat("b")[0] == 200


def test_json_log_format_is_one_object_per_line(env: Env) -> None:
    lx = env.start({"a": env.model("a")}, args=("--log-format", "json"))
    assert lx.chat("a")[0] == 200
    lx.wait_log(r'"event":"request"')
    lx.stop()
    events = [json.loads(line) for line in lx.lines if line != "<exit>"]
    assert all({"ts", "level", "event"} <= set(e) for e in events)
    switch = next(e for e in events if e["event"] == "switch.end")
    assert "from_" not in json.dumps(events)
    assert switch["to"] == "a" and switch["result"] == "ok" and isinstance(switch["secs"], float)
    hook = next(e for e in events if e["event"] == "hook.exit")
    assert hook == {**hook, "model": "a", "hook": "wake", "code": 0}


# ─────────────────────────── visibility: loading status, events, ETA ────────────────────
# A streaming request that waits for a switch is held: 200 and SSE comments at once, the
# backend's stream after, an SSE error event if the wait fails.  /llmux/events streams a
# snapshot and then every event.  ETAs come from measured costs and are judged.


def test_stream_flag_is_found_at_the_top_level_only() -> None:
    cases = [
        (b'{"model": "a", "stream": true}', True),
        (b'{"stream":true,"model":"a"}', True),
        (b'{"model": "a", "stream": false}', False),
        (b'{"model": "a", "stream": "true"}', False),
        (b'{"model": "a", "stream": truex}', False),
        (b'{"model": "a", "x": {"stream": true}}', False),
        (b'{"model": "a", "\\u0073tre\\u0061m" : true }', True),
        (b'{"model": "a", "stream": true, "stream": false}', False),  # the last one wins
        (b'{"model": "a", "streams": true}', False),
        (b'{"model": "a", "text": "stream", "stream": 1}', False),
        (b'{"model": "a", "messages": [{"content": "\\"stream\\": true"}]}', False),
    ]
    for body, stream in cases:
        steps = llmux._json_model_scan(body)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                found = done.value
                break
        assert found is not None and found.value == "a" and found.stream is stream, body


def test_eta_is_exact_once_each_hook_was_measured() -> None:
    """With hooks that take fixed (virtual) times, the ETA a request is given when it
    queues is its wait to the microsecond once each model's wake and sleep were measured,
    also behind another model's switch; before any measurement there is none."""
    cfg = llmux.parse_config({"models": {n: {"port": i + 1} for i, n in enumerate("abc")}})
    loop = CheckedLoop()
    hooks = llmux.SimHooks({"a": 2.0, "b": 3.0, "c": 4.0}, {"*": 1.0})

    async def go() -> None:
        sw = llmux.Switcher(cfg, hooks, llmux.FifoPolicy(), llmux.Log(ListStream()))  # type: ignore[arg-type]

        async def use(name: str) -> llmux.Slot:
            slot = await sw.acquire(name)
            slot.release()
            return slot
        first = await use("a")
        assert first.eta is None and first.waited == 2.0 and first.waited_for == "switch ->a"
        assert sw.eta("a") == 0.0
        for name in "bca":  # measures every wake and sleep
            await use(name)
        assert sw.hook_costs == {("a", "wake"): 2.0, ("b", "wake"): 3.0, ("c", "wake"): 4.0,
                                 ("a", "sleep"): 1.0, ("b", "sleep"): 1.0, ("c", "sleep"): 1.0}
        # a is active: c queues first (a's sleep + c's wake), then b behind it (+ c's sleep
        # + b's wake); neither pair was measured as such.
        c = loop.create_task(use("c"))
        await asyncio.sleep(0)
        b = loop.create_task(use("b"))
        await asyncio.sleep(0)
        assert [w.eta for w in sw.models["c"].queue] == [5.0]
        assert [w.eta for w in sw.models["b"].queue] == [9.0]
        info = sw.wait_info(sw.models["b"].queue[0])
        assert info == {**info, "model": "b", "state": "asleep", "position": 1, "queued": 1,
                        "eta_secs": 9.0, "switch": "a->c", "phase": "sleeping", "phase_model": "a"}
        slot_c, slot_b = await c, await b
        assert (slot_c.waited, slot_c.eta, slot_c.waited_for) == (5.0, 5.0, "switch a->c")
        assert (slot_b.waited, slot_b.eta, slot_b.waited_for) == (9.0, 9.0, "switch c->b")
        # b's first wait had no ETA (its wake was never measured); the second was exact.
        errors = sw.metrics.render()
        assert 'llmux_eta_error_seconds_sum{model="b"} 0\nllmux_eta_error_seconds_count{model="b"} 1' in errors
        assert 'llmux_request_wait_seconds_count{model="b",reason="switch"} 2' in errors

    run_checked(go(), loop)


@pytest.mark.parametrize("arrivals, judged", [
    # Regression (bench/loading.py part 4): the target of the switch in progress was
    # counted again while its victim slept (2 s too high).
    ([(0.0, "x"), (0.3, "y")], 1),
    # ... a victim of the switch in progress with an older waiter was left out (2 s low).
    ([(0.0, "x"), (1.3, "w"), (1.5, "y")], 2),
    # ... a model's later waiter was ranked by its own arrival, not its model's oldest
    # (fifo serves a model's waiters together): z counted ahead (2 s too high).
    ([(0.0, "x"), (1.2, "y"), (1.3, "z"), (1.4, "y")], 3),
])
def test_eta_follows_fifo_order_around_a_switch_in_progress(arrivals: List[Tuple[float, str]],
                                                           judged: int) -> None:
    """Every hook takes 1 s, all measured: each request's ETA is its wait, exactly."""
    cfg = llmux.parse_config({"models": {n: {"port": i + 1} for i, n in enumerate("wxyz")}})
    loop = CheckedLoop()

    async def go() -> None:
        sw = sim_switcher(cfg, {"*": 1.0}, {"*": 1.0})
        for name in "xyzw":  # measures every wake and sleep; w is up
            (await sw.acquire(name)).release()
        start = loop.time()

        async def client(at: float, name: str) -> Tuple[Optional[float], float]:
            await asyncio.sleep(at)
            slot = await sw.acquire(name)
            slot.release()
            return slot.eta, slot.waited
        results = await asyncio.gather(*(client(at, n) for at, n in arrivals))
        assert loop.time() > start
        eta, waited = results[judged]
        assert eta == pytest.approx(waited), results

    run_checked(go(), loop)


def test_eta_counts_the_quantum_the_cost_policy_keeps_a_busy_model() -> None:
    """Regression: with policy "cost" a busy model keeps the GPU for cost_factor times the
    switch's cost; the ETA said only the switch's cost (4 s where 16 s was due)."""
    cfg = llmux.parse_config({"models": {"a": {"port": 1}, "b": {"port": 2}},
                              "policy": {"name": "cost", "cost_factor": 3, "max_wait_secs": 60}})
    loop = CheckedLoop()

    async def go() -> None:
        sw = llmux.Switcher(cfg, llmux.SimHooks({"a": 2.0, "b": 3.0}, {"*": 1.0}),  # type: ignore[arg-type]
                            llmux.CostAwarePolicy(), llmux.Log(ListStream()))
        for name in "aba":
            (await sw.acquire(name)).release()
        await asyncio.sleep(100)  # no demand left: the quantum does not hold it any more
        held = await sw.acquire("a")  # a is busy now
        b = loop.create_task(sw.acquire("b"))
        await asyncio.sleep(0)
        # a may keep the GPU for 3 x 4 s (its sleep and b's wake): then b's switch, 4 s.
        assert [w.eta for w in sw.models["b"].queue] == [16.0]
        await asyncio.sleep(5)
        held.release()
        (await b).release()

    run_checked(go(), loop)


def test_eta_counts_min_active_backoff_and_is_unknown_at_max_in_flight() -> None:
    cfg = llmux.parse_config({"models": {"a": {"port": 1, "max_in_flight": 1}, "b": {"port": 2}},
                              "policy": {"min_active_secs": 30, "wake_backoff_secs": 0}})
    loop = CheckedLoop()

    async def go() -> None:
        sw = sim_switcher(cfg, {"*": 2.0}, {"*": 1.0})
        held = await sw.acquire("a")  # woken at t=2: held by min_active_secs until t=32
        assert sw.eta("a") is None  # at its max_in_flight: it depends on the generation
        assert sw.eta("b") is None  # b's wake was never measured: nothing to say
        sw.hook_costs[("b", "wake")] = 2.0  # as if it had been
        # min_active_secs holds a 30 s more; then the switch: a's sleep was never measured
        # (no sleep was: it counts 0), b's wake 2 s.
        assert sw.eta("b") == 32.0
        held.release()

    run_checked(go(), loop)


def sse_events(data: bytes) -> List[Tuple[str, str]]:
    """An SSE body as (kind, text) in order: ("comment", text) for ': ...' lines and
    ("data", text) for each event's data, as an SSE client splits them."""
    out: List[Tuple[str, str]] = []
    for line in data.decode("utf-8").split("\n"):
        if line.startswith(":"):
            out.append(("comment", line[1:].strip()))
        elif line.startswith("data:"):
            out.append(("data", line[5:].strip()))
    return out


def openai_decode(data: bytes) -> List[Any]:
    """What the openai client does with a stream: skip comments, stop at [DONE], raise on
    a data object with "error" (openai/_streaming.py), else yield the chunks."""
    chunks = []
    for kind, text in sse_events(data):
        if kind != "data":
            continue
        if text.startswith("[DONE]"):
            break
        obj = json.loads(text)
        if isinstance(obj, dict) and obj.get("error"):
            raise RuntimeError(obj["error"]["message"])
        chunks.append(obj)
    return chunks


def gated(env: Env, name: str) -> str:
    return f"while [ ! -e {env.gate(name)} ]; do sleep 0.01; done"


def test_a_held_stream_outlives_client_read_timeouts(env: Env) -> None:
    """A wake lasting twice the clients' read timeout: a stdlib client with a socket read
    timeout and curl with a low-speed limit both get the answer, because the head and
    then a loading-status comment every progress_interval_secs keep bytes coming.  A
    model with stream_progress "off" makes the same client time out: the test can fail."""
    read_timeout = 1.5
    lx = env.start({"a": env.model("a"), "b": env.model("b", wake_extra=gated(env, "b")),
                    "c": env.model("c", wake_extra=gated(env, "b"), stream_progress="off")},
                   policy={"progress_interval_secs": 0.1})
    assert lx.chat("a")[0] == 200
    body = json.dumps({"model": "b", "stream": True, "n": 2})
    curl = None
    if shutil.which("curl"):
        curl = spawn(["curl", "-sS", "-N", "--speed-time", str(int(read_timeout)), "--speed-limit", "1",
                      "-H", "content-type: application/json", "-d", body,
                      f"http://127.0.0.1:{lx.port}/v1/chat/completions"], stdout=subprocess.PIPE,
                     stderr=subprocess.PIPE)
    conn = http.client.HTTPConnection("127.0.0.1", lx.port, timeout=read_timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body=body, headers={"content-type": "application/json"})
        resp = conn.getresponse()  # at once: the head does not wait for the wake
        assert resp.status == 200 and resp.getheader("content-type") == "text/event-stream"
        lx.wait_log(r"request\.queued model=b", count=2 if curl else 1)
        held_since = time.monotonic()
        comments = 0
        while time.monotonic() - held_since < 2 * read_timeout:  # the wake outlasts the timeout
            line = resp.readline()
            assert line == b"\n" or line.startswith(b": llmux: waiting"), line
            comments += line.startswith(b":")
        env.gate("b").touch()
        rest = resp.read()
    finally:
        conn.close()
    assert comments >= 2 * read_timeout / 0.1 / 2  # about one per interval, not a trickle
    assert [t for k, t in sse_events(rest) if k == "data"] == [
        '{"backend": "b", "i": 0}', '{"backend": "b", "i": 1}', "[DONE]"]
    if curl is not None:
        out, err = curl.communicate(timeout=T)
        assert curl.returncode == 0, err
        assert b": llmux: waiting" in out and out.endswith(b"data: [DONE]\n\n")
    lx.wait_log(r'request method=POST path=/v1/chat/completions model=b status=200 .*'
                r'waited_for="switch a->b" .*held=true', count=2 if curl else 1)
    # The same wait without progress: the client's read timeout fires.
    conn = http.client.HTTPConnection("127.0.0.1", lx.port, timeout=read_timeout)
    try:
        env.gate("b").unlink()
        conn.request("POST", "/v1/chat/completions", body=json.dumps({"model": "c", "stream": True}),
                     headers={"content-type": "application/json"})
        with pytest.raises(socket.timeout):
            conn.getresponse()
    finally:
        conn.close()
        env.gate("b").touch()


def test_a_failed_wake_ends_a_held_stream_with_an_error_event(env: Env) -> None:
    lx = env.start({"a": env.model("a"), "b": env.model("b", wake_extra="echo 'CUDA out of memory' >&2; exit 3")},
                   policy={"progress_interval_secs": 0.05, "wake_backoff_secs": 0})
    assert lx.chat("a")[0] == 200
    conn, resp = sse_stream(lx.port, {"model": "b", "stream": True})
    assert resp.status == 200
    data = resp.read()  # the stream ends: a clean chunked end, no IncompleteRead
    events = sse_events(data)
    assert events[0][0] == "comment" and events[-1][0] == "data"
    assert json.loads(events[-1][1]) == {"error": {
        "message": "hook 'wake' for model 'b' exited 3: CUDA out of memory",
        "type": "server_error", "code": "hook_failed"}}
    assert not any(t == "[DONE]" for _, t in events)
    with pytest.raises(RuntimeError, match=r"hook 'wake' for model 'b' exited 3: CUDA out of memory"):
        openai_decode(data)
    # A wait that failed is logged with how long it was and the ETA it had been given.
    lx.wait_log(r"request method=POST path=/v1/chat/completions model=b status=503 .*waited_secs=[0-9.]+ .*held=true")
    # The stream was framed to its end: the connection carries the next request.
    conn.request("POST", "/v1/chat/completions", body=json.dumps({"model": "a"}),
                 headers={"content-type": "application/json"})
    again = conn.getresponse()
    assert again.status == 200 and json.loads(again.read())["backend"] == "a"
    conn.close()
    assert 'llmux_requests_total{model="b",status="503"} 1' in lx.request("GET", "/metrics")[2].decode()
    failed = [r for r in lx.request("GET", "/llmux/status")[2]["switches"] if r["result"] == "failed"]
    assert [r["error"] for r in failed] == ["hook 'wake' for model 'b' exited 3: CUDA out of memory"]


def test_a_held_stream_passes_on_the_backends_error(env: Env) -> None:
    def answer(conn: int, n: int, method: str, target: str, body: bytes) -> bytes:
        return http_reply({"error": {"message": "context length exceeded", "type": "invalid_request_error",
                                     "code": "context_length_exceeded"}}, status="400 Bad Request")

    raw = RawBackend(env.events, answer)
    try:
        lx = env.start({"a": env.model("a"), "r": {"port": raw.port, "wake": "true"}})
        assert lx.chat("a")[0] == 200
        conn, resp = sse_stream(lx.port, {"model": "r", "stream": True})
        events = sse_events(resp.read())
        conn.close()
        assert json.loads(events[-1][1]) == {"error": {"message": "context length exceeded",
                                                       "type": "invalid_request_error",
                                                       "code": "context_length_exceeded"}}
        lx.wait_log(r"request method=POST path=/v1/chat/completions model=r status=400 .*held=true")
    finally:
        raw.stop()


def test_held_stream_over_http10_and_the_other_progress_modes(env: Env) -> None:
    lx = env.start({"a": env.model("a"), "b": env.model("b", stream_progress="reasoning")},
                   policy={"progress_interval_secs": 30})
    # HTTP/1.0: no chunking; the answer is read until the connection closes.
    body = b'{"model": "b", "stream": true, "n": 1}'
    reply = raw_exchange(lx.port, b"POST /v1/chat/completions HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s"
                         % (len(body), body))
    head, _, rest = reply.partition(b"\r\n\r\n")
    assert b"transfer-encoding" not in head.lower() and b"connection: close" in head.lower()
    kinds = sse_events(rest)
    assert kinds[0][0] == "comment" and kinds[-1] == ("data", "[DONE]")
    # "reasoning": a chat UI sees the loading as the model's thinking, then the answer.
    assert lx.chat("a")[0] == 200
    conn, resp = sse_stream(lx.port, {"model": "b", "stream": True, "n": 1})
    chunks = openai_decode(resp.read())
    conn.close()
    thinking = [c["choices"][0]["delta"]["reasoning_content"] for c in chunks[:-1]]
    assert thinking[0].startswith("Loading model 'b'") and thinking[-1].startswith("Model 'b' is ready")
    assert chunks[-1] == {"backend": "b", "i": 0}
    # Not on other routes (they have no reasoning field); and no hold without "stream".
    assert lx.chat("a")[0] == 200
    status, _, raw = lx.request("POST", "/v1/completions", {"model": "b", "stream": True, "n": 1})
    assert status == 200 and b"reasoning_content" not in raw and raw.startswith(b": llmux: waiting")
    assert lx.chat("a")[0] == 200
    status, headers, payload = lx.request("POST", "/v1/chat/completions", {"model": "b"})
    assert status == 200 and headers["content-type"] == "application/json" and payload["backend"] == "b"


HELD_SEEDS = [int(s) for s in os.environ.get("LLMUX_HELD_SEEDS", "1,2").split(",")]


@pytest.mark.parametrize("seed", HELD_SEEDS)
def test_held_streams_under_random_faults_end_in_success_or_one_error(env: Env, seed: int) -> None:
    """Exploring, seeded: wake hooks that work, exit non-zero, work slowly or hang past
    hook_timeout_secs (killed), picked per wake from a plan; clients that stream or not,
    and some that hang up while held.  After every batch: each streamed 200 ends with the
    backend's [DONE] and no error, or with exactly one error event as its last event and
    nothing of the backend's; comments come only before the backend's data; a plain
    request gets JSON; the log says the real status of each; nothing stays queued or in
    flight.  A failure names its seed (LLMUX_HELD_SEEDS=N to replay)."""
    rng = random.Random(seed)
    names = ["a", "b", "c"]
    plans = {n: env.tmp / f"plan-{n}" for n in names}
    for n in names:
        plans[n].write_text("\n".join(rng.choice(["ok", "ok", "ok", "slow", "exit", "hang"])
                                      for _ in range(40)) + "\n")
    act = ('n=$(cat {c} 2>/dev/null | wc -l); echo x >> {c}; a=$(sed -n "$((n+1))p" {p}); '
           'case "$a" in exit) echo "plan says fail" >&2; exit 7;; hang) sleep 30;; '
           'slow) sleep 0.2;; esac')
    lx = env.start({n: env.model(n, wake_extra=act.format(c=env.tmp / f"count-{n}", p=plans[n]))
                    for n in names},
                   policy={"progress_interval_secs": 0.05, "hook_timeout_secs": 0.5,
                           "request_timeout_secs": 3, "wake_backoff_secs": 0})
    sent = 0
    seen: Dict[str, int] = {}

    def one(i: int, model: str, stream: bool, leave: bool) -> Tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", lx.port, timeout=T)
        try:
            conn.request("POST", "/v1/chat/completions", headers={"content-type": "application/json"},
                         body=json.dumps({"model": model, "stream": stream, "n": 2}))
            resp = conn.getresponse()
            if leave:
                resp.readline()
                return resp.status, b"<left>"
            return resp.status, resp.read()
        finally:
            conn.close()

    for batch in range(4):
        jobs = []
        for _ in range(rng.randint(2, 5)):
            model, stream, leave = rng.choice(names), rng.random() < 0.7, rng.random() < 0.15
            jobs.append(((model, stream, leave), run_bg(one, sent, model, stream, leave)))
            sent += 1
        for (model, stream, leave), (t, box) in jobs:
            status, body = join(t, box)
            where = f"seed {seed} batch {batch}: {model} stream={stream}: {status} {body[:300]!r}"
            if leave:
                seen["left"] = seen.get("left", 0) + 1
                continue
            kind = "held" if stream and status == 200 and body.startswith(b":") else "plain"
            kind += " ok" if body.endswith(b"[DONE]\n\n") or b'"backend"' in body else " error"
            seen[kind] = seen.get(kind, 0) + 1
            if not stream or status != 200 or not body.startswith(b":"):
                if status == 200 and stream:  # served at once: the backend's stream alone
                    assert body.endswith(b"data: [DONE]\n\n"), where
                elif status == 200:
                    assert json.loads(body)["backend"] == model, where
                else:
                    assert status in (503, 504) and set(json.loads(body)["error"]) == {
                        "message", "type", "code"}, where
                continue
            events = sse_events(body)
            data = [text for kind, text in events if kind == "data"]
            first_data = next(i for i, (kind, _) in enumerate(events) if kind == "data")
            assert all(kind == "data" for kind, _ in events[first_data:]), where
            if data[-1] == "[DONE]":
                assert not any(t.startswith('{"error"') for t in data), where
                assert data[:-1] == [json.dumps({"backend": model, "i": i}) for i in range(2)], where
            else:
                assert data == [data[-1]] and set(json.loads(data[-1])["error"]) == {
                    "message", "type", "code"}, where
        lx.wait_log(r"info request method=POST", count=sent)
        health = lx.health()
        assert health["queued"] == 0 and all(m["in_flight"] == 0 for m in health["models"].values()), \
            f"seed {seed} batch {batch}: {health}"
    check_residency(env.lines())
    print(f"[explore] held streams, seed {seed}: {sent} requests, {dict(sorted(seen.items()))}")


def read_event(resp: http.client.HTTPResponse) -> Dict[str, Any]:
    """The next /llmux/events event (pings skipped)."""
    while True:
        line = resp.readline()
        assert line, "the event stream ended"
        if line.startswith(b"data: "):
            return json.loads(line[6:])  # type: ignore[no-any-return]


def test_events_stream_a_snapshot_then_a_whole_switch_in_order(env: Env) -> None:
    lx = env.start({"a": env.model("a"), "b": env.model("b")})
    assert lx.chat("a")[0] == 200
    conn = lx.conn()
    conn.request("GET", "/llmux/events")
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("content-type") == "text/event-stream"
    snap = read_event(resp)
    assert snap["event"] == "snapshot" and snap["active"] == ["a"]
    assert snap["models"]["b"] == {**snap["models"]["b"], "state": "asleep", "size": 1.0}
    assert [(t["model"], t["to"]) for t in snap["timeline"]] == [("a", "waking"), ("a", "active")]
    assert [s["to"] for s in snap["switches"]] == ["a"]
    assert lx.chat("b")[0] == 200
    seen = [snap]
    while not (seen[-1]["event"] == "request" and seen[-1].get("model") == "b"):
        seen.append(read_event(resp))
    conn.close()
    assert [e["seq"] for e in seen[1:]] == list(range(snap["seq"] + 1, snap["seq"] + len(seen)))

    def brief(e: Dict[str, Any]) -> str:
        extra = {"model.state": lambda: f"{e['model']} {e['from']}->{e['to']}",
                 "switch.phase": lambda: f"{e['phase']} {e['model']}",
                 "hook.start": lambda: f"{e['model']} {e['hook']}",
                 "hook.exit": lambda: f"{e['model']} {e['hook']} {e['code']}",
                 "switch.start": lambda: f"{e.get('from')}->{e['to']}",
                 "switch.end": lambda: f"{e.get('from')}->{e['to']} {e['result']}",
                 "queue": lambda: f"{e['models']['b']} waiting, {e['in_flight']['b']} in flight",
                 "request": lambda: f"{e['model']} {e['status']} {e['waited_for']}"}.get(e["event"])
        return e["event"] + (" " + extra() if extra else "")
    assert [brief(e) for e in seen[1:] if e["event"] != "hook.output"] == [
        "request.start", "queue 1 waiting, 0 in flight", "model.state a active->draining", "request.queued",
        "switch.start a->b", "switch.phase sleeping a", "model.state a draining->sleeping",
        "hook.start a sleep", "hook.exit a sleep 0", "model.state a sleeping->asleep",
        "switch.phase waking b", "model.state b asleep->waking", "hook.start b wake",
        "hook.exit b wake 0", "model.state b waking->active", "switch.end a->b ok",
        "queue 0 waiting, 1 in flight", "queue 0 waiting, 0 in flight", "request b 200 switch a->b"]


def test_an_events_stream_ends_when_a_reload_revokes_its_key(env: Env) -> None:
    """Regression (attack): keys were checked when a stream opened; after a reload that
    removed its key, it went on receiving every event (hook output included)."""
    lx = env.start({"a": env.model("a")}, api_keys=["k1", "k2"])
    conn = lx.conn()
    conn.request("GET", "/llmux/events", headers={"authorization": "Bearer k1"})
    resp = conn.getresponse()
    assert resp.status == 200 and read_event(resp)["event"] == "snapshot"
    config = json.loads(lx.config_path.read_text())
    config["api_keys"] = ["k2"]
    lx.config_path.write_text(json.dumps(config))
    lx.proc.send_signal(signal.SIGHUP)
    event = read_event(resp)
    while event["event"] != "events.end":
        event = read_event(resp)
    assert event["reason"] == "the API keys or allow_remote_control changed; reconnect"
    assert resp.read() == b"\n"
    conn.close()
    assert lx.request("GET", "/llmux/events", headers={"authorization": "Bearer k1"})[0] == 401


def test_metrics_drop_the_gauges_of_a_removed_model(env: Env) -> None:
    """Regression (attack): /metrics kept a removed model's gauges for ever (active 1,
    queued 2) and a max_in_flight a reload had removed."""
    lx = env.start({"a": env.model("a", max_in_flight=2), "b": env.model("b")})
    assert lx.chat("a")[0] == 200
    gauges = parse_prometheus(lx.request("GET", "/metrics")[2].decode())
    assert ("llmux_model_active", {"model": "a"}, 1.0) in gauges["llmux_model_active"]["samples"]
    assert gauges["llmux_model_max_in_flight"]["samples"] == [("llmux_model_max_in_flight", {"model": "a"}, 2.0)]
    config = json.loads(lx.config_path.read_text())
    del config["models"]["a"]
    lx.config_path.write_text(json.dumps(config))
    lx.proc.send_signal(signal.SIGHUP)
    lx.wait_log(r"reload\.done")
    gauges = parse_prometheus(lx.request("GET", "/metrics")[2].decode())
    for name in ("llmux_model_active", "llmux_request_queue_depth", "llmux_model_in_flight"):
        assert [labels["model"] for _, labels, _ in gauges[name]["samples"]] == ["b"], name
    assert gauges.get("llmux_model_max_in_flight", {"samples": []})["samples"] == []


def test_a_model_on_llmuxs_own_port_is_a_config_error(env: Env, tmp_path: Path) -> None:
    """Regression (attack): a model on the port llmux listens on (-p, or a reload adding
    one) was accepted, and a request to it came back to llmux, again and again, one
    connection more each time, until max_connections."""
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"models": {"a": {"port": 8123}}}))
    r = subprocess.run([sys.executable, LLMUX, "-c", str(cfg), "-p", "8123", "--check"],
                       capture_output=True, text=True, timeout=T)
    assert r.returncode == 2 and r.stderr == (
        "llmux: config error: models.a.port: 8123 is the port llmux itself listens on; expected "
        "another port (requests to it would come back to llmux)\n")
    lx = env.start({"a": env.model("a")})
    config = json.loads(lx.config_path.read_text())
    config["models"]["b"] = {"port": lx.port}
    lx.config_path.write_text(json.dumps(config))
    lx.proc.send_signal(signal.SIGHUP)
    lx.wait_log(r"error reload\.failed reason=\"models\.b\.port: %d is the port llmux itself "
                r"listens on" % lx.port)
    assert lx.chat("a")[0] == 200 and "b" not in lx.health()["models"]


def test_events_need_a_key_are_bounded_and_end_at_shutdown(env: Env) -> None:
    lx = env.start({"a": env.model("a")}, api_keys=["k1"], policy={"shutdown_grace_secs": 300})
    assert lx.request("GET", "/llmux/events")[0] == 401
    streams = []
    for _ in range(llmux.EVENTS_MAX_SUBSCRIBERS):
        conn = lx.conn()
        conn.request("GET", "/llmux/events", headers={"authorization": "Bearer k1"})
        resp = conn.getresponse()
        assert resp.status == 200 and read_event(resp)["event"] == "snapshot"
        streams.append((conn, resp))
    status, headers, payload = lx.request("GET", "/llmux/events", headers={"authorization": "Bearer k1"})
    assert status == 503 and payload["error"]["code"] == "too_many_subscribers" and headers["retry-after"]
    lx.proc.send_signal(signal.SIGTERM)  # open streams do not hold shutdown for its grace
    for conn, resp in streams:
        event = read_event(resp)
        while event["event"] != "events.end":
            event = read_event(resp)
        assert event["reason"] == "llmux is shutting down"
        assert resp.read() == b"\n"  # the event's blank line, then a clean chunked end
        conn.close()
    assert lx.proc.wait(T) == 0
    lx.wait_log(r"shutdown\.drained requests_cut=0")


def test_a_burst_of_events_larger_than_a_readers_bound_drops_nobody() -> None:
    """Regression: events are batched for 10 ms; a burst of over 1 MiB in one loop step
    (thousands of held streams ending at once) was one write above every reader's bound,
    and dropped them all."""
    async def load(bus: llmux.EventBus, sub: Any, transport: Any, reader: asyncio.StreamReader) -> None:
        for i in range(2000):  # ~2 MiB at once, without yielding
            bus.publish("request", {"i": i, "pad": "y" * 1000})
            if i % 100 == 99:  # the reader keeps up between pieces, as a live one does
                while transport.get_write_buffer_size():
                    await reader.read(1 << 20)

    run_checked(_one_subscriber_kept(load))


def test_a_snapshot_larger_than_a_readers_bound_is_sent_whole() -> None:
    """Regression (attack): failed wakes with long stderr tails grew the snapshot past
    EVENTS_MAX_BUFFERED; the snapshot alone was over every new reader's bound, so each
    was dropped at once and the dashboard never went live.  The bound is on what is
    unsent beyond the snapshot."""
    async def load(bus: llmux.EventBus, sub: Any, transport: Any, reader: asyncio.StreamReader) -> None:
        bus.send({"event": "snapshot", "pad": "y" * (llmux.EVENTS_MAX_BUFFERED + 4096)}, only=sub)
        bus.publish("request", {"i": 1})

    run_checked(_one_subscriber_kept(load))


async def _one_subscriber_kept(load: Callable[..., Awaitable[None]]) -> None:
    """An EventBus with one subscriber on a real socket: ``load(bus, sub, transport,
    reader)`` publishes; what it published is flushed, and the subscriber must be kept."""
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    transport, _ = await loop.create_connection(asyncio.Protocol, sock=a)
    reader, _ = await asyncio.open_connection(sock=b)
    bus = llmux.EventBus()
    sub = bus.subscribe(transport, False)  # type: ignore[arg-type]
    await load(bus, sub, transport, reader)
    bus.flush()  # what the 10 ms timer does
    assert not sub.dropped and bus.subscribers == [sub]
    bus.close("test over")
    transport.close()
    b.close()
    await asyncio.sleep(0)


def test_a_slow_events_reader_is_dropped_with_memory_bounded() -> None:
    """A subscriber that reads nothing costs at most EVENTS_MAX_BUFFERED bytes, then is
    dropped; a reader that keeps up gets every event.  Real sockets, a real transport."""
    async def go() -> None:
        loop = asyncio.get_running_loop()
        pairs = [socket.socketpair() for _ in range(2)]
        for a, b in pairs:
            a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
            b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow_t, _ = await loop.create_connection(asyncio.Protocol, sock=pairs[0][0])
        fast_t, _ = await loop.create_connection(asyncio.Protocol, sock=pairs[1][0])
        fast_r, _ = await asyncio.open_connection(sock=pairs[1][1])
        metrics = llmux.llmux_metrics()
        stream = ListStream()
        bus = llmux.EventBus(llmux.Log(stream), metrics)
        slow = bus.subscribe(slow_t, True)  # type: ignore[arg-type]
        fast = bus.subscribe(fast_t, True)  # type: ignore[arg-type]
        most = 0
        sent = 0
        while not slow.done.done():
            bus.publish("x", {"i": sent, "pad": "y" * 200})
            sent += 1
            most = max(most, slow_t.get_write_buffer_size())
            if sent % 64 == 0:
                await asyncio.sleep(0)  # the fast reader's turn
            assert sent < 100_000, "never dropped"
        assert slow.dropped and slow.done.result().startswith("it read too slowly")
        assert most <= llmux.EVENTS_MAX_BUFFERED and bus.subscribers == [fast]
        assert "llmux_events_dropped_subscribers_total 1" in metrics.render()
        await asyncio.sleep(0)  # logged soon after, not inside the publish that dropped it
        assert any(" events.dropped " in line and "it read too slowly" in line for line in stream.lines)
        got = 0
        while got < sent:
            line = await asyncio.wait_for(fast_r.readline(), T)
            got += line.startswith(b"data: ")
        assert not fast.done.done()
        bus.close("test over")
        for t in (slow_t, fast_t):
            t.close()
        for a, b in pairs:
            b.close()
        await asyncio.sleep(0)

    run_checked(go())


def test_a_held_streams_endless_error_body_is_not_waited_for(env: Env) -> None:
    """Regression (attack): a backend's non-2xx answer to a held stream was read to its
    end, and one that never ended held the stream (and the slot) for ever."""
    def answer(conn: int, n: int, method: str, target: str, body: bytes) -> bytes:
        return (b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain\r\n"
                b"content-length: 1000000000\r\n\r\n" + b"x" * (256 * 1024))

    raw = RawBackend(env.events, answer)
    try:
        lx = env.start({"a": env.model("a"), "r": {"port": raw.port, "wake": "true"}})
        assert lx.chat("a")[0] == 200
        conn, resp = sse_stream(lx.port, {"model": "r", "stream": True})
        events = sse_events(resp.read())
        conn.close()
        error = json.loads(events[-1][1])["error"]
        assert error["message"].startswith("model 'r' backend answered 500: xxxx")
        assert len(error["message"]) < 1200  # MAX_ECHOED_ERROR characters of it
        lx.wait_log(r"request method=POST path=/v1/chat/completions model=r status=500 .*held=true")
    finally:
        raw.stop()


def test_a_held_stream_answered_with_json_gets_it_as_an_event(env: Env) -> None:
    """Regression (attack): an engine that ignored "stream" answered JSON under llmux's
    event-stream head: an SSE client saw an empty, successful stream."""
    def answer(conn: int, n: int, method: str, target: str, body: bytes) -> bytes:
        return http_reply({"object": "chat.completion", "choices": [{"message": {"content": "hi"}}]})

    raw = RawBackend(env.events, answer)
    try:
        lx = env.start({"a": env.model("a"), "r": {"port": raw.port, "wake": "true"}})
        assert lx.chat("a")[0] == 200
        conn, resp = sse_stream(lx.port, {"model": "r", "stream": True})
        data = resp.read()
        conn.close()
        chunks = openai_decode(data)
        assert chunks == [{"object": "chat.completion", "choices": [{"message": {"content": "hi"}}]}]
    finally:
        raw.stop()


def test_a_held_stream_cut_before_its_backend_answered_ends_with_an_error_event(env: Env) -> None:
    """Regression (attack): a held stream whose request the switcher cut after its slot
    was granted, before the backend said a word, was closed with no error event."""
    stop = threading.Event()

    def answer(conn: int, n: int, method: str, target: str, body: bytes) -> Optional[bytes]:
        stop.wait(T)  # never answers while the test runs
        return None

    raw = RawBackend(env.events, answer)
    try:
        lx = env.start({"a": env.model("a"), "r": {"port": raw.port, "wake": "true"}},
                       policy={"drain_before_switch": False})
        assert lx.chat("a")[0] == 200
        conn, resp = sse_stream(lx.port, {"model": "r", "stream": True})
        lx.wait_log(r"raw 0 POST|request\.queued model=r")
        wait_for(lambda: raw.requests(), "the request reached the backend")
        assert lx.chat("a")[0] == 200  # the switch back to a cuts r's request
        events = sse_events(resp.read())
        conn.close()
        assert json.loads(events[-1][1])["error"]["code"] == "request_cut"
        lx.wait_log(r"request method=POST path=/v1/chat/completions model=r status=503 .*held=true")
    finally:
        stop.set()
        raw.stop()


def test_ollama_native_streams_are_not_held(env: Env) -> None:
    """Regression (attack): /api/chat streams NDJSON; SSE comments corrupted it."""
    lx = env.start({"a": env.model("a"), "b": env.model("b")})
    assert lx.chat("a")[0] == 200
    status, headers, payload = lx.request("POST", "/api/chat", {"model": "b", "stream": True, "n": 1},
                                          {"content-type": "application/json"})
    assert status == 200 and not payload.startswith(b":") and b"llmux: waiting" not in payload
    lx.wait_log(r"request method=POST path=/api/chat model=b status=200")
    assert lx.log_count(r"path=/api/chat .*held=true") == 0


def test_control_routes_answer_no_other_origin(env: Env) -> None:
    """Regression (attack): with the default cors_origins "*", any page open in a browser
    on this host (a loopback peer) could read /llmux/events and /llmux/status, hook
    stderr included, and wake or sleep models with a form POST needing no preflight."""
    lx = env.start({"a": env.model("a")})
    assert lx.chat("a")[0] == 200
    evil = {"origin": "https://evil.example"}
    for method, path in (("GET", "/llmux/status"), ("GET", "/llmux/events"),
                         ("POST", "/llmux/models/a/sleep")):
        status, headers, payload = lx.request(method, path, b"", {**evil, "content-type": "text/plain"})
        assert status == 403 and payload["error"]["code"] == "cross_origin_control", (path, payload)
        assert "access-control-allow-origin" not in headers
    assert lx.health()["active"] == ["a"]
    pre = lx.request("OPTIONS", "/llmux/models/a/sleep", None,
                     {**evil, "access-control-request-method": "POST"})
    assert pre[0] == 204 and "access-control-allow-origin" not in pre[1]
    # The dashboard's own origin may; a client without Origin may; model routes keep "*".
    same = {"origin": f"http://127.0.0.1:{lx.port}", "host": f"127.0.0.1:{lx.port}"}
    assert lx.request("GET", "/llmux/status", None, same)[0] == 200
    assert lx.request("GET", "/llmux/status")[0] == 200
    assert lx.request("GET", "/v1/models", None, evil)[1]["access-control-allow-origin"] == "*"
    lx.stop()
    named = env.start({"a": env.model("a")}, cors_origins=["https://evil.example"])
    status, headers, _ = named.request("GET", "/llmux/status", None, evil)
    assert status == 200 and headers["access-control-allow-origin"] == "https://evil.example"


def test_a_malformed_or_repeated_origin_on_control_routes_is_refused_not_a_500(env: Env) -> None:
    """Regression (attack): `Origin: http://[x]` made urlsplit raise: a 500 and an
    internal error's traceback; two Origin headers were judged by the last alone; a
    file: origin naming this host passed."""
    lx = env.start({"a": env.model("a")})
    host = f"127.0.0.1:{lx.port}".encode()
    for origins in ([b"http://[x]"], [b"http://["], [b"http://]"], [b"file://" + host],
                    [b"https://evil.example", b"http://" + host]):
        head = b"".join(b"Origin: " + o + b"\r\n" for o in origins)
        answer = raw_exchange(lx.port, b"GET /llmux/status HTTP/1.1\r\nHost: " + host + b"\r\n" + head +
                              b"Connection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 403 ") and b'"cross_origin_control"' in answer, (origins, answer)
    for origin in (b"http://" + host, b"https://" + host):  # the dashboard, maybe behind TLS
        answer = raw_exchange(lx.port, b"GET /llmux/status HTTP/1.1\r\nHost: " + host + b"\r\nOrigin: " +
                              origin + b"\r\nConnection: close\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 200 "), (origin, answer)
    assert lx.log_count("internal.error") == 0


def test_an_origin_without_a_host_is_no_same_origin_page(env: Env) -> None:
    """Regression: `Origin: null` (a sandboxed or file: page) on an HTTP/1.0 request
    without Host matched "no Host" as its own origin and got /llmux/ answered."""
    lx = env.start({"a": env.model("a")})
    for origin in (b"null", b"file://", b"http://"):
        answer = raw_exchange(lx.port, b"GET /llmux/status HTTP/1.0\r\nOrigin: " + origin + b"\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 403 ") and b'"cross_origin_control"' in answer, (origin, answer)
    answer = raw_exchange(lx.port, b"GET /llmux/status HTTP/1.0\r\n\r\n")  # curl-like: no Origin
    assert answer.startswith(b"HTTP/1.1 200 "), answer


def test_queue_position_never_exceeds_the_queue() -> None:
    """Regression (attack): "10 of 2 in its queue" once most waiters ahead had left."""
    cfg = llmux.parse_config({"models": {"a": {"port": 1}, "b": {"port": 2}}})
    loop = CheckedLoop()

    async def go() -> None:
        sw = sim_switcher(cfg, {"*": 10.0}, {"*": 1.0})
        tasks = [loop.create_task(sw.acquire("a")) for _ in range(10)]
        await asyncio.sleep(1)
        for t in tasks[1:9]:
            t.cancel()
        await asyncio.sleep(0)
        last = sw.models["a"].queue[-1]
        assert sw.wait_info(last)["position"] == 2 and sw.wait_info(last)["queued"] == 2
        for t in (tasks[0], tasks[9]):
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await sw.close()

    run_checked(go(), loop)


def test_the_request_line_is_the_line_emit_would_write_whatever_its_fields() -> None:
    """Log.request keeps each method-path-model text from the lines before: seeded
    random fields (quoting, None, unicode, extra fields, more distinct paths than it
    keeps) give byte for byte what emit("info", "request", ...) gives, to the listener too."""
    seed = int(os.environ.get("LLMUX_FUZZ_SEED", "11"))
    rng = random.Random(seed)
    texts = ["POST", "/v1/chat/completions", "/a b", 'q"uote', "", "x=y", "é/ü", "a\\b", "\u2028"]
    fast, slow = ListStream(), ListStream()
    heard: List[Tuple[str, List[Any]]] = []
    logs = {"fast": llmux.Log(fast), "slow": llmux.Log(slow)}
    for name, log in logs.items():
        log.listener = lambda level, event, fields, name=name: heard.append((name, [level, event, dict(fields)]))
    for i in range(3 * llmux.LOG_PREFIXES_MAX):
        fields: Dict[str, Any] = {
            "method": rng.choice(["GET", "POST", "HEAD"]),
            "path": rng.choice(texts) + (str(rng.randrange(2 * llmux.LOG_PREFIXES_MAX)) if rng.random() < 0.5 else ""),
            "model": rng.choice([None, "a", "m o", "qwen2.5:7b"]), "status": rng.choice([200, 499, 503]),
            "secs": round(rng.random(), 4)}
        for extra, value in (("waited_secs", 1.25), ("waited_for", "a"), ("eta_secs", 3.0), ("held", True)):
            if rng.random() < 0.2:
                fields[extra] = value
        logs["fast"].request(dict(fields))
        logs["slow"].emit("info", "request", dict(fields))
        assert fast.lines[-1].split(" ", 1)[1] == slow.lines[-1].split(" ", 1)[1], (seed, i, fields)
        assert heard[-2][1] == heard[-1][1], (seed, i)
    assert len(logs["fast"]._request_prefixes) <= llmux.LOG_PREFIXES_MAX


def test_log_suppressed_names_what_it_counted_apart_from_its_own_name() -> None:
    """Regression (attack): its "event" field overwrote the record's event name, so JSON
    logs and /llmux/events showed a fake request.failed."""
    stream = ListStream()
    log = llmux.Log(stream, fmt="json")
    second = int(time.time())
    for _ in range(llmux.LOG_BURST + 5):
        log.warning("request.failed", status=503)
    if int(time.time()) != second:  # the second turned while we wrote: try once more
        second = int(time.time())
        for _ in range(llmux.LOG_BURST + 5):
            log.warning("request.failed", status=503)
    while int(time.time()) == second:
        time.sleep(0.01)  # the report comes with the first line of the next second
    log.info("tick")
    records = [json.loads(line) for line in stream.lines]
    report = next(r for r in records if r["event"] == "log.suppressed")
    assert report["of"] == "request.failed" and report["lines"] >= 5


def test_a_slot_cut_before_its_task_resumed_is_a_cut_not_a_client_leaving() -> None:
    """Regression (attack): a model died right after a release handed its slot to a
    waiting request whose task had not resumed yet: the cut cancelled it inside wait(),
    the slot was dropped, and the request looked like a client that left (499, no answer)."""
    cfg = llmux.parse_config({"models": {"a": {"port": 1, "max_in_flight": 1}}})
    loop = CheckedLoop()

    async def go() -> None:
        sw = sim_switcher(cfg, {"*": 1.0}, {"*": 1.0})
        first = await sw.acquire("a")
        second = loop.create_task(sw.acquire("a"))
        await asyncio.sleep(0)
        first.release()  # the slot goes to the second request...
        assert sw.died("a", "its server exited")  # ... and is cut before its task resumed
        with pytest.raises(llmux.LLMuxError) as cut:
            await second
        assert cut.value.code == "request_cut" and cut.value.status == 503
        assert "its model's server died (its server exited)" in cut.value.message
        assert sw.models["a"].in_flight == 0 and sw.queued == 0
        await sw.close()

    run_checked(go(), loop)


def test_shutdown_tells_requests_it_cuts_after_the_grace(env: Env) -> None:
    """Regression (attack): requests still waiting for their backend when the shutdown
    grace ran out were closed with no answer, and logged as 499 (client closed)."""
    stop = threading.Event()

    def answer(conn: int, n: int, method: str, target: str, body: bytes) -> Optional[bytes]:
        stop.wait(T)
        return None

    raw = RawBackend(env.events, answer)
    try:
        lx = env.start({"a": env.model("a"), "r": {"port": raw.port, "wake": "true"}},
                       policy={"shutdown_grace_secs": 0.2})
        assert lx.chat("a")[0] == 200
        conn, resp = sse_stream(lx.port, {"model": "r", "stream": True})  # held
        plain = run_bg(lx.chat, "r")
        wait_for(lambda: len(raw.requests()) == 2, "both requests reached the backend")
        lx.proc.send_signal(signal.SIGTERM)
        events = sse_events(resp.read())
        conn.close()
        assert json.loads(events[-1][1])["error"]["code"] == "shutting_down"
        status, payload = join(*plain)
        assert status == 503 and payload["error"]["code"] == "shutting_down"
        lx.wait_log(r"request method=POST path=/v1/chat/completions model=r status=503 .*held=true")
        lx.wait_log(r"request method=POST path=/v1/chat/completions model=r status=503 secs")
    finally:
        stop.set()
        raw.stop()


def test_control_routes_refuse_a_rebound_host_name(env: Env) -> None:
    """Regression (attack): a web page whose name an attacker re-points at 127.0.0.1 (DNS
    rebinding) is a loopback peer whose Origin matches its Host: without keys it could
    read /llmux/events and sleep models."""
    lx = env.start({"a": env.model("a")})
    assert lx.chat("a")[0] == 200
    evil = {"host": "rebind.test:80", "origin": "http://rebind.test:80"}
    for method, path in (("GET", "/llmux/status"), ("GET", "/llmux/events"),
                         ("POST", "/llmux/models/a/sleep")):
        status, _, payload = lx.request(method, path, b"", evil)
        assert status == 403 and payload["error"]["code"] == "remote_control_forbidden", (path, payload)
        assert "Host rebind.test:80" in payload["error"]["message"]
    assert lx.health()["active"] == ["a"]
    for host in ("localhost:3000", "127.0.0.1", "[::1]:8080", "app.localhost"):
        assert lx.request("GET", "/llmux/status", None, {"host": host})[0] == 200, host
    lx.stop()
    keyed = env.start({"a": env.model("a")}, api_keys=["k"])  # a key is what counts then
    assert keyed.request("GET", "/llmux/status", None, {**evil, "authorization": "Bearer k"})[0] == 200
    assert keyed.request("GET", "/llmux/status", None, {"host": "gpu-node.lan",
                                                        "authorization": "Bearer k"})[0] == 200


def test_the_dashboard_may_not_be_framed(env: Env) -> None:
    """Regression (attack): framed under a decoy on another site, one click pressed its
    sleep button with the dashboard's own origin."""
    lx = env.start({"a": env.model("a")})
    for path, headers in (("/llmux/ui", {}), ("/", {"accept": "text/html"})):
        status, got, body = lx.request("GET", path, None, headers)
        assert status == 200 and b"<html" in body
        assert got["x-frame-options"] == "DENY" and got["content-security-policy"] == "frame-ancestors 'none'"


def test_a_held_streams_json_answer_of_many_lines_costs_no_object_per_line(env: Env) -> None:
    """Regression (attack): the body was split into one bytes object per line: an 8 MiB
    body of newlines took 600 MiB and froze the loop for 1.5 s."""
    body = b"x\n" * 500_000  # just under MAX_WRAPPED_BODY

    def answer(conn: int, n: int, method: str, target: str, req: bytes) -> bytes:
        return (b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n"
                % len(body)) + body

    raw = RawBackend(env.events, answer)
    try:
        lx = env.start({"a": env.model("a"), "r": {"port": raw.port, "wake": "true"}})
        assert lx.chat("a")[0] == 200

        def peak_kib() -> int:
            with open(f"/proc/{lx.proc.pid}/status") as f:
                return int(re.search(r"VmHWM:\s+(\d+)", f.read()).group(1))  # type: ignore[union-attr]
        before = peak_kib()
        conn, resp = sse_stream(lx.port, {"model": "r", "stream": True})
        data = resp.read()
        conn.close()
        assert data.count(b"data: x\n") == 500_000 and data.endswith(b"data: x\n\n")
        grew = peak_kib() - before
        assert grew < 32 * 1024, f"peak RSS grew {grew} KiB for a 1 MB answer"  # ~200 MiB before
    finally:
        raw.stop()


def test_models_list_says_loaded_loading_unloaded_with_an_eta(env: Env) -> None:
    lx = env.start({"a": env.model("a"), "b": env.model("b", wake_extra=gated(env, "b"))})
    assert lx.chat("a")[0] == 200
    t, box = run_bg(lx.chat, "b")
    lx.wait_log(r"hook\.start model=b hook=wake")
    cards = {m["id"]: m for m in lx.request("GET", "/v1/models")[2]["data"]}
    assert cards["a"]["status"]["value"] == "unloaded" and cards["a"]["state"] == "asleep"
    assert cards["b"]["status"]["value"] == "loading" and cards["b"]["state"] == "waking"
    assert cards["b"]["status"]["eta_secs"] is None  # b's wake was never measured
    env.gate("b").touch()
    assert join(t, box)[0] == 200
    card = lx.request("GET", "/v1/models/b")[2]
    assert card["status"] == {"value": "loaded", "eta_secs": 0.0} and card["loaded"] is True


def test_a_storm_of_sighups_is_one_reload_running_and_one_waiting(env: Env) -> None:
    """Regression: each SIGHUP queued a reload of its own; 30 signals during a slow one
    meant 30 more, one after another.  A reload that is waiting to start reads the file
    as it is when it starts, so one waiting is all a storm needs."""
    gate = env.gate("sleep")
    lx = env.start({"a": env.model("a", sleep_extra=f"while [ ! -e {gate} ]; do sleep 0.01; done")})
    assert lx.chat("a")[0] == 200
    config = json.loads(lx.config_path.read_text())
    config["models"]["a"]["wake"] += "\ntrue"  # a changed server: drained and slept first
    lx.config_path.write_text(json.dumps(config))
    lx.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "sleep-start a" in env.lines(), "the reload's sleep hook")
    lx.proc.send_signal(signal.SIGHUP)
    lx.wait_log(r"info reload\.queued reason=\"a reload is running")
    for i in range(1, 30):  # one at a time: the kernel merges a signal sent while one is pending
        lx.proc.send_signal(signal.SIGHUP)
        lx.wait_log(r"info reload\.coalesced", count=i)
    gate.touch()
    lx.wait_log(r"info reload\.done", count=2)
    lx.proc.send_signal(signal.SIGHUP)  # after the storm, a reload runs as before
    lx.wait_log(r"info reload\.done", count=3)
    assert lx.log_count(r"reload\.done") == 3 and lx.log_count(r"reload\.coalesced") == 29


def test_reload_changing_only_soft_keys_keeps_the_active_model_running(env: Env) -> None:
    """Regression: any change to a loaded model's entry (an alias, a limit) slept it."""
    models = {"a": env.model("a"), "b": env.model("b")}
    lx = env.start(models)
    assert lx.chat("a")[0] == 200
    config = json.loads(lx.config_path.read_text())
    config["models"]["a"].update(aliases=["alpha"], max_in_flight=4, stream_progress="off")
    lx.config_path.write_text(json.dumps(config))
    lx.proc.send_signal(signal.SIGHUP)
    lx.wait_log(r"reload\.done updated=a")
    assert lx.chat("alpha")[1]["backend"] == "a"
    assert "sleep-start a" not in env.lines() and lx.health()["models"]["a"]["max_in_flight"] == 4


# ─────────────────────────────── co-residency, policies, simulator ──────────────────────


def check_capacity(lines: List[str], sizes: Dict[str, float], capacity: float) -> int:
    """At no point of the hook timeline do the awake models' sizes exceed the capacity
    (a model counts from the start of its wake to the end of its sleep).  Returns the
    most that was ever awake at once."""
    awake: Dict[str, float] = {}
    most = 0
    for line in lines:
        kind, _, model = line.partition(" ")
        if kind == "wake-start":
            awake[model] = sizes[model]
        elif kind == "sleep-end":
            awake.pop(model, None)
        assert sum(awake.values()) <= capacity, f"{awake} exceed {capacity}: {lines}"
        most = max(most, len(awake))
    return most


def test_co_resident_models_share_the_capacity(env: Env) -> None:
    sizes = {"a": 1.0, "b": 1.0, "c": 2.0}
    lx = env.start({n: env.model(n, size=sizes[n]) for n in "abc"}, policy={"capacity": 2})
    assert lx.chat("a")[1]["backend"] == "a"
    assert lx.chat("b")[1]["backend"] == "b"
    assert sorted(lx.health()["active"]) == ["a", "b"]  # both fit: no sleep
    assert "sleep-start a" not in env.lines()
    assert lx.chat("a")[0] == 200  # a is now the most recently used
    assert lx.chat("c")[1]["backend"] == "c"  # needs 2: both go
    assert lx.health()["active"] == ["c"] and lx.health()["capacity_used"] == 2
    assert lx.chat("a")[0] == 200
    assert lx.chat("b")[0] == 200
    assert check_capacity(env.lines(), sizes, 2) == 2


def test_co_residency_evicts_the_least_recently_used_idle_model(env: Env) -> None:
    lx = env.start({n: env.model(n) for n in "abc"}, policy={"capacity": 2})
    conn, resp = sse_stream(lx.port, {"model": "a", "stream": True, "hold": str(env.gate("a"))})
    resp.readline()  # a is busy (and least recently used)
    assert lx.chat("b")[0] == 200
    assert lx.chat("c")[1]["backend"] == "c"  # b is idle: it goes, a keeps streaming
    assert "sleep-start a" not in env.lines() and "sleep-end b" in env.lines()
    env.gate("a").touch()
    assert resp.read().endswith(b"data: [DONE]\n\n")
    conn.close()
    check_capacity(env.lines(), {"a": 1, "b": 1, "c": 1}, 2)


def test_cost_policy_keeps_serving_a_busy_model_within_the_wait_bound(env: Env) -> None:
    lx = env.start({"a": env.model("a"), "b": env.model("b")},
                   policy={"name": "cost", "cost_factor": 1000, "max_wait_secs": 0.5})
    assert lx.chat("a")[0] == 200
    conn, resp = sse_stream(lx.port, {"model": "a", "stream": True, "hold": str(env.gate("a"))})
    resp.readline()
    t, box = run_bg(lx.chat, "b")
    lx.wait_log(r"request\.queued model=b")
    # fifo would have started draining a in the same step; cost waits while a is busy ...
    assert lx.health()["models"]["a"]["state"] == "active"
    assert lx.chat("a")[0] == 200  # ... and a keeps serving new requests meanwhile
    # ... until b's request nears max_wait_secs: then a drains and b is served.
    lx.wait_log(r"model\.state model=a from=active to=draining")
    env.gate("a").touch()
    resp.read()
    conn.close()
    assert join(t, box)[1]["backend"] == "b"


def test_cost_policy_switches_at_once_when_the_active_model_is_idle(env: Env) -> None:
    lx = env.start({"a": env.model("a"), "b": env.model("b")}, policy={"name": "cost"})
    assert lx.chat("a")[0] == 200
    # Unknown switch cost (only the first wake is measured, as "" -> a) and nothing in
    # flight: nothing is gained by waiting.
    assert lx.chat("b")[1]["backend"] == "b"


FIFO_TRACE = [("a", 0.2), ("b", 0.2), ("a", 0.2), ("c", 0.2), ("b", 0.2), ("c", 0.2), ("a", 0.2)]


@pytest.mark.parametrize("policy", [{}, {"capacity": 2}], ids=["exclusive", "capacity-2"])
def test_simulator_reproduces_the_server_switch_order(env: Env, tmp_path: Path, policy: Dict[str, Any]) -> None:
    gate = env.gate("first-wake")
    models = {n: env.model(n) for n in "abc"}
    models["a"]["wake"] = env.hook("wake", f"while [ ! -e {gate} ]; do sleep 0.01; done")
    lx = env.start(models, policy=policy)
    # Every request is queued, in trace order, while the first wake holds.
    threads = []
    for i, (model, _) in enumerate(FIFO_TRACE):
        threads.append(run_bg(lx.chat, model))
        lx.wait_log(r"request\.queued", count=i + 1)
    gate.touch()
    assert all(join(*t)[0] == 200 for t in threads)
    server = [[s["from"] or "", s["to"]] for s in lx.request("GET", "/llmux/status")[2]["switches"]]
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps({"t": i * 0.001, "model": m, "service": s}) + "\n"
                             for i, (m, s) in enumerate(FIFO_TRACE)))
    p = subprocess.run([sys.executable, LLMUX, "simulate", "-c", str(lx.config_path), "-t", str(trace),
                        "--wake-secs", "0.05", "--sleep-secs", "0.05", "--json"],
                       capture_output=True, text=True, timeout=T)
    assert p.returncode == 0, p.stderr
    simulated = json.loads(p.stdout)
    assert simulated["switch_order"] == server
    assert simulated["served"] == len(FIFO_TRACE)


def test_simulator_runs_an_hour_in_seconds_and_reports(tmp_path: Path) -> None:
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"models": {"a": {"port": 9001}, "b": {"port": 9002}},
                                  "policy": {"name": "cost", "max_wait_secs": 60}}))
    trace = tmp_path / "t.jsonl"
    trace.write_text("".join(json.dumps({"t": i * 2.0, "model": "ab"[i % 2], "service": 1.0}) + "\n"
                             for i in range(1800)))
    p = subprocess.run([sys.executable, LLMUX, "simulate", "-c", str(config), "-t", str(trace)],
                       capture_output=True, text=True, timeout=T)  # an hour of traffic, replayed
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("policy cost: 1800/1800 served, errors none\nwait p50 ")
    assert re.search(r"switches \d+, \d+\.\d% of the time switching, \d+ served per hour over 36\d\ds", p.stdout)


def test_simulator_rejects_a_bad_trace_clearly(tmp_path: Path) -> None:
    trace = tmp_path / "t.jsonl"
    trace.write_text('{"t": 0, "model": "zz", "service": 1}\n')
    p = subprocess.run([sys.executable, LLMUX, "simulate", "-c", str(HERE / "example-config.json"),
                        "-t", str(trace)], capture_output=True, text=True, timeout=T)
    assert p.returncode == 2
    assert p.stderr.strip() == f"llmux simulate: {trace}:1: model 'zz' is not in the config"


def test_a_failed_start_leaves_no_process(tmp_path: Path) -> None:
    """Regression: when llmux did not log its listening line in time, the harness raised
    without stopping it, and the process outlived the test run; and a SIGTERM during
    start-up adoption left the running alive hook behind."""
    pidfile = tmp_path / "hook.pid"
    hang = f"echo $$ > {pidfile}; while [ ! -e {tmp_path / 'never'} ]; do sleep 0.01; done"
    with pytest.raises(AssertionError):
        Llmux({"models": {"a": {"port": 9, "alive": hang}}}, tmp_path, start_timeout=0.5)
    mine = [p for p in _children if str(tmp_path) in " ".join(map(str, p.args))]
    assert mine and all(p.poll() is not None for p in mine)
    wait_for(lambda: not pidfile.exists() or pid_gone(int(pidfile.read_text())),
             "the start-up hook to be killed")


def test_client_that_stops_reading_is_cut_and_its_slot_released(env: Env) -> None:
    lx = env.start({"a": env.model("a"), "b": env.model("b")}, http={"send_timeout_secs": 0.3})
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", lx.port))
    try:
        body = json.dumps({"model": "a", "stream": True, "n": 200000}).encode()
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
                  % (len(body), body))
        # ... and never read: llmux's buffer for this client fills, then it gives up.
        lx.wait_log(r"request\.cut model=a reason=\"client read nothing for 0\.3s")
        wait_for(lambda: lx.health()["models"]["a"]["in_flight"] == 0, "the slot to be released")
        assert lx.chat("b")[1]["backend"] == "b"  # and nothing blocks a switch
    finally:
        s.close()


def test_control_wake_overriding_min_active_evicts_only_what_is_needed(env: Env) -> None:
    """Regression: a control-API wake that had to override min_active_secs evicted every
    awake model, even when the capacity needed only one of them to go."""
    lx = env.start({n: env.model(n) for n in "abc"}, policy={"capacity": 2, "min_active_secs": 600})
    assert lx.chat("a")[0] == 200
    assert lx.chat("b")[0] == 200  # both awake, both held by min_active_secs
    assert lx.request("POST", "/llmux/models/c/wake")[0] == 200
    assert sorted(lx.health()["active"]) == ["b", "c"]  # a, least recently used, went alone
    assert "sleep-start b" not in env.lines()
