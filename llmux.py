#!/usr/bin/env python3
"""llmux.py: one GPU node, many models, one OpenAI-compatible endpoint.

llmux reads the ``model`` field of each request (or its ``x-llmux-model`` header, its
``?model=``, or the NAME of ``/upstream/NAME/...``). When that model is not loaded it
drains the requests in flight, runs the loaded model's ``sleep`` hook and the
requested model's ``wake`` hook (any shell text, run with ``sh -c``; or it runs the
model's server itself, ``cmd``, and stops it to sleep), then proxies
the request to ``127.0.0.1:<model port>`` and streams the answer back::

    client ──HTTP/1.1──▶ server ──▶ route ──▶ switcher.acquire(model) ──▶ relay ──▶ 127.0.0.1:<port>
                           │                      │ (queue, drain, hooks)    (stream back,
                           │                      ▼                           release slot)
                           │                 hooks: sh -c wake / sleep / alive
                           └── /v1/models, /health, /metrics, /llmux/status, /llmux/models/*,
                               /llmux/events (SSE), /llmux/ui (the dashboard),
                               CORS preflights (the route table in Server._route_table)

One file, standard library only, CPython 3.8 to 3.13.  Run ``python3 llmux.py -h``.
Every limit is a named constant below, with the status it maps to.

Reading order (leaves first): limits → errors → logging → metrics → config → HTTP wire
(sans-I/O) → relay → hooks → events → policies and switcher → server → dashboard →
simulator → demo backend and probe → CLI.
"""

from __future__ import annotations

__all__ = [
    "__version__",
    "LLMuxError",
    "HTTPError",
    "ConfigError",
    "HookError",
    "UpstreamError",
    "Config",
    "ModelConfig",
    "Policy",
    "HttpConfig",
    "load_config",
    "parse_config",
    "RequestParser",
    "ResponseParser",
    "RequestHead",
    "ResponseHead",
    "Body",
    "EndOfMessage",
    "NEED_DATA",
    "HookRunner",
    "HookResult",
    "Switcher",
    "ModelState",
    "SchedulingPolicy",
    "FifoPolicy",
    "CostAwarePolicy",
    "POLICIES",
    "Metrics",
    "TraceEntry",
    "SimHooks",
    "VirtualTimeLoop",
    "load_trace",
    "simulate",
    "Server",
    "Log",
    "main",
]

import os
import sys

if __name__ == "__main__" and "ssl" not in sys.modules and os.environ.get("LLMUX_LOOP") != "uvloop":
    # llmux speaks plain HTTP (clients, backends and hooks' probes alike) and never TLS:
    # asyncio's optional TLS support is not loaded (libssl and libcrypto were 4 MiB of
    # an idle llmux's 43).  Only when run as the program, never under an importer, and
    # not for uvloop, which imports ssl itself.
    sys.modules["ssl"] = None  # type: ignore[assignment]

# Run by `python3 -c` in place of this file, on its compiled code (_serve_from_code).  With
# -P (3.11+) `-c` puts nothing on sys.path (3.13's -c imports linecache before this runs);
# then sys.path is the script's own, as its first interpreter had it.
_REEXEC_BOOT = ("import marshal, sys; _f = open(%d, 'rb'); _code = marshal.loads(_f.read()); "
                "_f.close(); sys.argv[:] = sys.argv[1:]; sys.path[:] = %s; __file__ = %s; "
                "_LLMUX_REEXECED = 1; del _f, marshal, sys; exec(_code)")


def _serve_from_code() -> None:
    """Run as a script, CPython keeps this file's syntax tree (about 16 MiB) for as long
    as the script runs, and llmux would idle in 38 MiB instead of 21.  So the server, run
    as a script on Linux, hands its compiled code to a fresh interpreter (the same binary,
    with the same flags and sys.path) through a memfd and execs it, before importing
    anything else: the same process (pid, fds, environment, arguments), without the tree.
    It costs the start about 50 ms.  Not for the subcommands, --check, --help or
    --version, nor under a tracer, profiler or -i, nor when run by another program
    (runpy, exec), nor where the new interpreter could not have all the script had (a
    closed stdio fd, a sys.path entry that is no string, argv[0] naming another binary);
    LLMUX_REEXEC=0 turns it off.  If anything fails, llmux carries on as it is."""
    argv = sys.argv[1:]
    module = sys._getframe(1)
    if (not argv or not argv[0].startswith("-")  # a subcommand (probe, stop, ...)
            or {"--check", "-h", "--help", "--version"} & set(argv)
            or "_LLMUX_REEXECED" in globals() or globals().get("__spec__") is not None
            or module.f_back is not None  # run by runpy or exec(): theirs to keep
            or sys.gettrace() is not None or sys.getprofile() is not None or sys.flags.inspect
            or None in (sys.stdin, sys.stdout, sys.stderr)  # fd 0-2 closed: the memfd's slot
            or not all(type(p) is str for p in sys.path)  # the loader gets them as literals
            or not isinstance(globals().get("__file__", ""), str)
            or os.environ.get("LLMUX_REEXEC", "").lower() in ("0", "false", "no", "off")
            or not hasattr(os, "memfd_create")
            or sys.version_info < (3, 9)):  # 3.8's parser kept no tree: 19 MiB as it is
        return
    try:  # the same interpreter binary, or none (sys.executable comes from argv[0])
        if not sys.executable or os.path.realpath(sys.executable) != os.path.realpath("/proc/self/exe"):
            return
    except OSError:  # pragma: no cover - no /proc
        return
    import marshal
    import subprocess
    fd = -1
    try:
        code = marshal.dumps(module.f_code)  # the module's own code
        fd = os.memfd_create("llmux-code", 0)
        view = memoryview(code)
        while view:  # a short write (RLIMIT_FSIZE, say) ends in OSError below
            n = os.write(fd, view)
            if n <= 0:
                raise OSError("short write")
            view = view[n:]
        os.lseek(fd, 0, os.SEEK_SET)
        os.set_inheritable(fd, True)
        boot = _REEXEC_BOOT % (fd, ascii(sys.path), ascii(globals().get("__file__", sys.argv[0])))
        flags = subprocess._args_from_interpreter_flags()  # type: ignore[attr-defined]
        named = {flags[i + 1].split("=")[0] for i, f in enumerate(flags[:-1]) if f == "-X"}
        flags += [f"-X{k}" if v is True else f"-X{k}={v}" for k, v in sys._xoptions.items()
                  if k not in named]  # -X perf, int_max_str_digits, ...: not in the above
        if sys.version_info >= (3, 11) and "-P" not in flags and "-I" not in flags:
            flags.append("-P")
        if type(getattr(sys.stdout, "buffer", None)).__name__ == "FileIO":
            flags.append("-u")  # unbuffered, as -u or PYTHONUNBUFFERED made it
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, *flags, "-c", boot, *sys.argv])
    except (OSError, ValueError):  # no memfd, a short write, exec refused: stay
        if fd >= 0:
            os.close(fd)


if __name__ == "__main__":
    _serve_from_code()

import argparse
import asyncio
import bisect
import collections
import dataclasses
import enum
import errno
import gc
import ipaddress
import json
import math
import re
import select
import selectors
import shlex
import signal
import socket
import subprocess
import threading
import time
import traceback
import warnings
import urllib.parse
from http import HTTPStatus
from _operator import _compare_digest  # hmac.compare_digest without hashlib's OpenSSL
from dataclasses import dataclass, field
from typing import (
    Any,
    Awaitable,
    Callable,
    Deque,
    Dict,
    FrozenSet,
    Generator,
    Iterable,
    List,
    Literal,
    NamedTuple,
    Optional,
    Sequence,
    Set,
    Tuple,
    Type,
    TypeVar,
    Union,
    cast,
)

T = TypeVar("T")

try:  # Unix only (it is stdlib there): the fd limit is raised and obeyed where it exists.
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None  # type: ignore[assignment]

try:  # Linux: prctl(2) for PR_SET_PDEATHSIG (no orphaned model servers) and the subreaper.
    import ctypes
    _LIBC: Any = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
    _PRCTL: Any = getattr(_LIBC, "prctl", None)
    _MALLOC_TRIM: Any = getattr(_LIBC, "malloc_trim", None)  # glibc's; musl has none
except (ImportError, OSError):  # pragma: no cover - no ctypes, or no libc to load
    _PRCTL = _MALLOC_TRIM = None

def _yaml() -> Any:
    """PyYAML, optional, for YAML configs (a .yaml config without it gets a clear error);
    None if not installed.  Imported only for a YAML config: it costs a JSON config's
    start 13 ms and its process 1-2 MiB."""
    try:
        import yaml  # type: ignore
    except ImportError:  # pragma: no cover - depends on the machine
        return None
    return yaml

__version__ = "0.1.0"


# ───────────────────────────────── limits and defaults ─────────────────────────────────
# Each limit names the status it maps to.  The HTTP ones bound what one client can make
# llmux hold in memory or wait for; the hook ones bound what a hook can make it hold.

MAX_REQUEST_LINE = 8 * 1024  # 414: longer than any real OpenAI route plus query string.
MAX_HEADER_BYTES = 64 * 1024  # 431: the header section, request line excluded.
MAX_HEADER_COUNT = 128  # 431: real clients send ~10-20.
MAX_CONTENT_LENGTH_DIGITS = 18  # 400: 10**18 bytes is no real body; longer is an attack.
MAX_CHUNK_SIZE_DIGITS = 16  # 400: 16 hex digits is 2**64; more would overflow a peer.
MAX_CHUNK_LINE = 4 * 1024  # 400: chunk size line with extensions.
MAX_TRAILER_BYTES = 16 * 1024  # 431: trailers are parsed and dropped.
MAX_TRAILER_LINES = 64  # 431 (request) / 502 (response): real peers send none or a few.
MAX_INTERIM_RESPONSES = 16  # 502: 1xx heads before a backend's final one (100, 103...).
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024  # 413: a chat request with several images.
DEFAULT_HEADER_TIMEOUT = 30.0  # 408: from a request's first byte to the end of its head.
DEFAULT_BODY_TIMEOUT = 60.0  # 408: longest silence while a request body arrives.
DEFAULT_IDLE_TIMEOUT = 120.0  # keep-alive connection with no request: closed quietly.
DEFAULT_SEND_TIMEOUT = 120.0  # a client whose socket stays full this long is cut.
DEFAULT_MAX_CONNECTIONS = 1024  # 503: beyond this a new connection is answered and closed.
# 503 + Retry-After: request body bytes held at once, all connections together (a body is
# held until its request is finished with: while it waits for a waking model too).  Sixteen
# bodies of the default max_body_bytes; without it 50 clients could push RSS past 3 GiB.
DEFAULT_MAX_BUFFERED_BYTES = 1024 * 1024 * 1024
BODY_BUDGET_RETRY_AFTER = 1  # seconds, in the Retry-After of that 503.
# 408: once a body has had body_timeout_secs, it must keep arriving at this average rate
# (as Apache's mod_reqtimeout MinRate): a trickle cannot hold a connection for ever.
DEFAULT_MIN_BODY_RATE = 1024.0
# 503: connections from one client address.  127.0.0.1 and ::1 are not counted: a reverse
# proxy on the same host brings every client from there (README, "Slow and hostile").
DEFAULT_MAX_CONNECTIONS_PER_PEER = 256
# 400: a body may arrive in BODY_PIECES_FREE pieces (chunks, or reads of a chunk), then one
# more per MIN_BODY_PIECE_AVG bytes.  Each piece costs a parser step on the event loop: an
# 8 MB body in 2-byte chunks was 4 million steps (25 s of CPU).
BODY_PIECES_FREE = 4096
MIN_BODY_PIECE_AVG = 256
# fds kept free beyond two per connection (the client's and its backend's): connections
# being refused (at most ACCEPT_BATCH), listening sockets, hook pipes, idle backend
# connections, the log.  max_connections is clamped to leave it.
FD_RESERVE = 96
MULTIPART_MAX_PARTS = 128  # 400: real forms (audio uploads) have a handful of parts.
MULTIPART_MAX_BOUNDARY = 70  # 400: RFC 2046 section 5.1.1 (clients send 16-40 characters).
MULTIPART_MAX_PART_HEAD = 2048  # a longer part head is not a form field: skipped unread.
# The JSON model scanner hands a regex at most this many bytes per call (its backtracking
# stack grows with the tokens matched), and yields to the event loop every JSON_SCAN_SLICE
# steps, so a token-dense 64 MB body slows other clients instead of freezing them.
JSON_SCAN_WINDOW = 64 * 1024
JSON_SCAN_SLICE = 16
JSON_QUICK_BYTES = 16 * 1024  # a body this small is read by json.loads (C, ~3 µs), not scanned
JSON_STRING_STEP = 1024 * 1024  # a long plain string is searched this much a step (~0.1 ms)
READ_SIZE = 64 * 1024  # one socket read.
LINGER_SECS = 2.0  # after an error answer, unread client bytes are drained this long ...
LINGER_BYTES = 1024 * 1024  # ... or up to this much, so closing does not reset the answer.
REFUSED_LINGER_SECS = 0.25  # the same for a connection refused at admission (503).
STREAM_LIMIT = 256 * 1024  # asyncio StreamReader buffer: reading pauses beyond 2x this.
# While reading a client is paused (it sent that much ahead), its socket is polled this
# often for a reset or close, which the paused reader would not see until a write failed.
PAUSED_CLIENT_CHECK_SECS = 1.0
MAX_UPSTREAM_HEAD = 64 * 1024  # 502: a backend's response head, its CRLF CRLF included.
MAX_IDLE_UPSTREAM = 256  # idle keep-alive connections kept per backend port.
UPSTREAM_CONNECT_TIMEOUT = 10.0  # 502: connecting to a local port takes microseconds.
UPSTREAM_JOIN_BYTES = 256 * 1024  # a request up to this size is sent in one write.
# A larger body goes a slice at a time, as the backend's socket takes it (the transport's
# pause_writing/resume_writing): one write of 20 MB copied what the socket did not take
# into the transport's buffer in one step, 17-21 ms during which no stream moved.
UPSTREAM_SLICE = 256 * 1024
UPSTREAM_FEED_STEP = 1024 * 1024  # written of a large body per step of the event loop
MAX_DRAIN_BYTES = 4 * 1024 * 1024  # read from a reset backend socket before it closes
MAX_ERROR_BODY = 64 * 1024  # a backend's error answer to a held stream: read this much of it
MAX_ERROR_BODY_SECS = 5.0  # ... for this long at most (then what came is its message)
MAX_WRAPPED_BODY = 1024 * 1024  # a held stream's non-SSE 2xx answer, sent as one event
MAX_ECHOED_ERROR = 1024  # characters of a backend's non-JSON error text passed on
# An idle backend connection older than this is closed instead of reused.  vLLM and SGLang
# serve through uvicorn, which closes a keep-alive connection after 5 s of silence; a POST
# written just as it does so may or may not have been acted on, and RFC 9110 9.2.2 forbids
# re-sending it, so the client would get a 502.  Staying under 5 s makes that race rare.
UPSTREAM_IDLE_REUSE_SECS = 4.0
# RFC 9110 9.2.2: only these may be re-sent after a connection failed once the request may
# have reached the backend.  POST and PATCH are never re-sent (a 502 instead).
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

MAX_ECHOED_NAME = 256  # an unknown model name is quoted in its 404 and log up to this long.
# 403: the engines' own routes that load, unload, sleep or wake a model.  Proxied, they let
# any client change what is in GPU memory behind llmux's back (its state would lie, and a
# client kept out of /llmux/ by allow_remote_control could still do it).  They are llmux's
# hooks' to call, on the model's port; blocked_paths in the config replaces this list.
DEFAULT_BLOCKED_PATHS = (
    "/sleep", "/wake_up", "/collective_rpc",  # vLLM (VLLM_SERVER_DEV_MODE)
    "/release_memory_occupation", "/resume_memory_occupation",  # SGLang
    "/update_weights_from_disk", "/update_weights_from_distributed",  # SGLang
    "/models/load", "/models/unload",  # llama.cpp router mode
    "/api/pull", "/api/delete", "/api/create", "/api/copy", "/api/push",  # Ollama
)
# 400: a request's model name longer than this is not read (a 60 MB "model" was decoded
# whole, then quoted in its 404); config names and aliases are held to it too.
MAX_MODEL_NAME_BYTES = 1024
# 400: "model" strings (at any depth) the JSON scanner stops at, beyond one per window:
# each stop is a step in Python, and a body of nothing but "model" strings was 1 µs a byte.
MAX_JSON_MODEL_STRINGS = 1024
# ... and one more per this many bytes: a tool list whose schemas name a "stream"
# parameter a thousand times is a real request; at ~1 µs a stop, 16 ns a byte at worst.
JSON_STOP_BYTES = 64
# Browsers may call llmux from any page, as llama-server and vLLM allow by default: a
# client that works against the engine works behind llmux (README, "Browsers and CORS").
DEFAULT_CORS_ORIGINS: Tuple[str, ...] = ("*",)
CORS_MAX_AGE = 600  # seconds a browser may cache a preflight answer (Chromium caps at 7200).
CORS_ALLOW_METHODS = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
# A preflight without Access-Control-Request-Headers is answered with these: what the
# OpenAI clients and browser UIs send.
CORS_DEFAULT_HEADERS = "authorization, content-type, x-api-key, x-llmux-model"
MODEL_HEADER = "x-llmux-model"  # names the model when the body does not (see the README)
# Retry-After (seconds) on the 503s llmux produces when no better estimate exists: a queue
# that is full, a shutdown (a restart behind a supervisor takes a few seconds), a model a
# reload removed (a client may have been pointed at a renamed one), a failed control action.
RETRY_AFTER_BUSY = 1
RETRY_AFTER_SHUTDOWN = 5
RETRY_AFTER_REMOVED = 5

DEFAULT_PORT = 3000
DEFAULT_HOST = "0.0.0.0"  # as the Rust llmux: clients come from other hosts.
DEFAULT_REQUEST_TIMEOUT = 300.0  # 504: longest wait in the queue for a model.
DEFAULT_HOOK_TIMEOUT = 600.0  # large models take minutes to load from disk.
DEFAULT_DRAIN_TIMEOUT = 300.0  # in-flight requests still running after this are cut.
DEFAULT_UPSTREAM_TIMEOUT = 600.0  # 504: longest backend silence (long prompts prefill).
DEFAULT_WAKE_BACKOFF = 1.0  # after a failed wake, the next attempt waits this long.
DEFAULT_MAX_QUEUE = 4096  # 503 + Retry-After beyond this many waiting requests.
SWITCH_COST_EMA_ALPHA = 0.3  # weight of the newest switch in the cost estimate.
DEFAULT_ALIVE_INTERVAL = 30.0  # an active model's alive hook runs this often (0 = never).
DEFAULT_SHUTDOWN_GRACE = 30.0  # on SIGTERM, in-flight requests get this long to finish.
DEFAULT_MAX_WAIT = 60.0  # policy "cost": no request waits longer for its switch to start.
DEMAND_HALF_LIFE = 60.0  # policy "cost": how fast a model's recent demand is forgotten.
TIMER_SLACK = 1e-3  # a decision timer fires this late, so the deadline it waits for has
# passed when it runs: asyncio runs timers up to its clock resolution early, and a pass
# that found the deadline not quite reached would re-arm a zero-delay timer (a busy loop).

HOOK_TAIL_LINES = 20  # lines of a hook's stderr kept for its error message.
HOOK_LINE_MAX = 4096  # a longer output line is cut (bytes).
HOOK_LOG_LINES = 500  # lines of one hook run copied to the log; the rest are counted.
# Bytes read from one hook pipe per HOOK_RATE_WINDOW seconds (16 MiB/s, a few % of a core
# past the logged lines); beyond it reading pauses until the window ends.  The writer then
# waits on a full pipe: nothing is lost and nothing spins (a background `yes` held llmux
# at 100% CPU, and a 300 MB burst froze every client for seconds).
HOOK_RATE_WINDOW = 0.1
HOOK_RATE_BYTES = 1677722
HOOK_NAMES = ("wake", "sleep", "alive")
# Managed model servers (models.NAME.cmd).  A failed start or readiness check is a 503
# (the wake failed), as for a wake hook.
DEFAULT_STOP_GRACE = 10.0  # SIGTERM, then SIGKILL after this (stop_grace_secs).
DEFAULT_READY_PATH = "/health"  # GET this on the model's port; 2xx means ready (ready_path).
READY_POLL_SECS = 0.05  # readiness is probed this often while the server starts.
# A stopped server is stopped when its whole process group has gone (its children hold
# the GPU memory as much as it does): looked for this often, and after SIGKILL for at
# most GROUP_KILL_WAIT_SECS (a process stuck in the kernel is logged and left).
GROUP_POLL_SECS = 0.05
GROUP_KILL_WAIT_SECS = 5.0
ZOMBIE_REAP_WAIT_SECS = 1.0  # a server's zombie is waited for this long to be reaped (its exit code)
READY_PROBE_TIMEOUT = 5.0  # one probe; a server that accepts but never answers is not ready.
REAP_POLL_SECS = 0.5  # with uvloop (no SIGCHLD handler of our own), orphans are looked for this often.
REAP_RETRY_SECS = 0.05  # PID 1: orphans are reaped this long after a spawn that was running.
REAP_BATCH = 256  # orphans reaped in one pass (one step of the loop); the rest in the next.
RETIRED_SLEEP_RETRY = 30.0  # a model a reload removed or changed whose sleep failed: retried this often.

EVENTS_MAX_BUFFERED = 1024 * 1024  # bytes unsent to one /llmux/events reader: beyond, dropped
EVENTS_MAX_SUBSCRIBERS = 64  # 503: /llmux/events streams open at once
EVENTS_PING_SECS = 15.0  # an idle event stream gets an SSE comment this often (proxies, LBs)
EVENTS_FLUSH_SECS = 0.01  # events are written to readers in batches this far apart at most
EVENTS_BATCH_BYTES = 64 * 1024  # ... or as soon as a batch is this large
TIMELINE_LEN = 256  # model state changes kept for the snapshot (the dashboard's timeline)
DEFAULT_PROGRESS_INTERVAL = 5.0  # a held stream gets a loading-status comment this often
LOG_BURST = 20  # warning and error lines of one event per second; the rest are counted.
LOG_PREFIXES_MAX = 256  # request lines' method-path-model texts kept (Log.request)
LISTEN_BACKLOG = 1024  # kernel queue of connections not yet accepted.
# Connections accepted per wake-up of the listening socket, and at most this many being
# refused at once (then accepting pauses ACCEPT_PAUSE_SECS: a connect flood waits in the
# kernel's backlog instead of taking fds).
ACCEPT_BATCH = 32
ACCEPT_PAUSE_SECS = 0.1  # out of fds: stop accepting this long (clients wait in the backlog).
# Connections of one address beyond max_connections_per_peer being set up or refused at
# once; more, when none of its connections is idle, are closed as accepted, unanswered:
# one address's connect flood costs an accept and a close each, and pauses no one.
PEER_PENDING_MAX = 4
# Requests that start being served in one turn of the event loop; the rest of a burst
# waits for the next turns, in arrival order (TurnBudget).  In bench/overhead.py's burst,
# 2 to 16 did alike within the host's noise; 32 was close to no budget at all.
STARTS_PER_TURN = 8
# ... but none waits longer than this: then it starts whatever the budget (a loop kept busy
# by other work has long turns, and 8 a turn would slow every burst to that pace).  A burst
# of 100 takes about 15 ms of turns on the bench's slow VM: it stays whole within this.
TURN_WAIT_MAX_SECS = 0.025


# ──────────────────────────────────────── errors ────────────────────────────────────────
# One tree.  Each error carries the HTTP status, the OpenAI error type and a code; it
# becomes a response in exactly one function (error_response, with the HTTP writers).


class LLMuxError(Exception):
    """Base of every error llmux turns into an OpenAI-style JSON response."""

    status = 500
    type = "server_error"
    code = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        status: Optional[int] = None,
        type: Optional[str] = None,
        code: Optional[str] = None,
        headers: Sequence[Tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        if code is not None:
            self.code = code
        self.headers = list(headers)

    def to_json(self) -> Dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code}}


class HTTPError(LLMuxError, ValueError):
    """A request that breaks HTTP/1.1; the connection is answered and closed."""

    status = 400
    type = "invalid_request_error"
    code = "bad_request"


CONFIG_PROBLEMS_MAX = 20  # problems a config error lists; the rest are counted


def _key_text(key: Any) -> str:
    """str(key), but for an int too long for str() (a YAML key of 5,000 digits)."""
    try:
        return str(key)
    except ValueError:
        return f"<an integer of {key.bit_length()} bits>"


def _config_name(name: Any) -> str:
    """A key or model name as a config error shows it: whole when short and printable,
    else as JSON (no newline can forge a line), cut to 60 characters."""
    text = _key_text(name)
    return text if len(text) <= 60 and text.isprintable() else _describe(text).rpartition(" (")[0]


class ConfigError(LLMuxError, ValueError):
    """A config that cannot run; ``problems`` has one message per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        problems = list(problems)
        if len(problems) > CONFIG_PROBLEMS_MAX:  # 200,000 unknown keys are not 200,000 lines
            problems[CONFIG_PROBLEMS_MAX:] = [f"... and {len(problems) - CONFIG_PROBLEMS_MAX} "
                                              "more problems"]
        super().__init__("; ".join(problems))
        self.problems = problems


class HookError(LLMuxError):
    """A hook exited non-zero, was killed, timed out or could not start."""

    status = 503
    code = "hook_failed"

    def __init__(self, message: str, result: "HookResult") -> None:
        super().__init__(message)
        self.result = result


class UpstreamError(LLMuxError):
    """The model's backend refused, reset, stalled or answered with broken HTTP."""

    status = 502
    code = "upstream_error"


class _PortHeld(Exception):
    """A switch's target shares its port with a model still loaded (see _check_port_free)."""


class ClientGone(Exception):
    """The client went away; nothing can be answered."""


# ──────────────────────────────────────── logging ───────────────────────────────────────
# One line per event on stderr: `time level event key=value ...`, or one JSON object per
# line with --log-format json.  Request bodies and Authorization headers are never logged.


_NEEDS_QUOTES = re.compile(r'[\s"=\\]').search
_LOG_KEYS: Dict[str, str] = {}  # a field's name as written: "frm_" -> "frm="


def _text_fields(fields: Dict[str, Any]) -> List[str]:
    """``key=value`` for each field that is not None, quoted as JSON where it must be."""
    parts = []
    keys = _LOG_KEYS
    for key, value in fields.items():
        if value is None:
            continue
        kind = type(value)
        if kind is str:
            if not value or _NEEDS_QUOTES(value):
                value = json.dumps(value)
        elif kind is int or kind is float:
            value = str(value)  # never needs quotes
        else:
            value = json.dumps(value, default=str)
            if not value or _NEEDS_QUOTES(value):
                value = json.dumps(value)
        prefix = keys.get(key)
        if prefix is None:  # keys are names in this file's code: a bounded set
            prefix = keys[key] = key.rstrip("_") + "="
        parts.append(prefix + value)
    return parts


class Log:
    """Event logger: ``log.info("switch.end", frm="a", to="b", secs=1.2)``."""

    LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}

    def __init__(self, stream: Any = None, verbose: bool = False, fmt: str = "text") -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.threshold = 10 if verbose else 20
        self.fmt = fmt
        self._second = -1
        self._prefix = ""
        self._milli = -1
        self._stamp = ""
        # Warnings and errors a peer can cause at will are bounded to LOG_BURST lines of
        # each event per second; the rest are counted and reported once a second.
        self._burst: Dict[str, int] = {}
        self._suppressed: Dict[str, int] = {}
        # Called with (level, event, fields) for every line written at info or above:
        # the Server's EventBus, so /llmux/events carries what the log says.
        self.listener: Optional[Callable[[str, str, Dict[str, Any]], None]] = None
        # With a loop (batch()), lines are written once per loop iteration, in one write:
        # a busy proxy logs a line per request, and a write per line was a syscall each.
        self._loop: Optional[asyncio.AbstractEventLoop] = None
        self._pending: List[str] = []
        self._request_prefixes: Dict[Tuple[Any, Any, Any], str] = {}  # see request()

    def batch(self, loop: Optional[asyncio.AbstractEventLoop]) -> None:
        """Write lines at the end of each iteration of ``loop`` (None: at once, as
        before; what is pending is written first)."""
        self.flush()
        self._loop = loop

    def flush(self) -> None:
        if not self._pending:
            return
        data = "".join(self._pending)
        self._pending.clear()
        try:
            self.stream.write(data)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed stderr must not take the proxy down

    def enabled(self, level: str) -> bool:
        return self.LEVELS[level] >= self.threshold

    def emit(self, level: str, event: str, fields: Dict[str, Any]) -> None:
        if self.LEVELS[level] < self.threshold:
            return
        stamp = self._now(level, event, fields)
        if stamp is None:
            return
        if self.fmt == "json":
            record = {"ts": stamp, "level": level, "event": event}
            record.update((k.rstrip("_"), v) for k, v in fields.items() if v is not None)
            line = json.dumps(record, default=str, separators=(",", ":"))
        else:
            text = fields.pop("text", None)
            line = " ".join([stamp, level, event, *_text_fields(fields)]) + \
                (f" | {text}" if text is not None else "")
        self._write(line)

    def request(self, fields: Dict[str, Any]) -> None:
        """emit("info", "request", fields) for the line each request ends with; ``fields``
        begins with method, path, model, status and secs.  The text of its first three is
        kept from the lines before: a busy proxy's requests repeat a few of them."""
        if self.fmt == "json" or "text" in fields:
            self.emit("info", "request", fields)
            return
        if self.LEVELS["info"] < self.threshold:
            return
        stamp = self._now("info", "request", fields)
        if stamp is None:
            return
        it = iter(fields.items())
        key = (next(it)[1], next(it)[1], next(it)[1])  # method, path, model
        prefix = self._request_prefixes.get(key)
        if prefix is None:
            if len(self._request_prefixes) >= LOG_PREFIXES_MAX:  # paths come from clients
                self._request_prefixes.clear()
            prefix = self._request_prefixes[key] = " ".join(
                ["info request", *_text_fields({"method": key[0], "path": key[1], "model": key[2]})])
        rest = _text_fields(dict(it)) if len(fields) > 5 else \
            [f"status={next(it)[1]}", f"secs={next(it)[1]}"]
        self._write(f"{stamp} {prefix} {' '.join(rest)}")

    def _now(self, level: str, event: str, fields: Dict[str, Any]) -> Optional[str]:
        """The timestamp for a line now (None: a warning over its burst, counted), once
        the listener has the line's fields."""
        now = time.time()
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            self._burst.clear()
            if self._suppressed:
                suppressed, self._suppressed = self._suppressed, {}
                for name, count in suppressed.items():
                    self.emit("warning", "log.suppressed", {"of": name, "lines": count,
                                                            "limit_per_sec": LOG_BURST})
        if level in ("warning", "error"):
            seen = self._burst[event] = self._burst.get(event, 0) + 1
            if seen > LOG_BURST and event != "log.suppressed":
                self._suppressed[event] = self._suppressed.get(event, 0) + 1
                return None
        if self.listener is not None and level != "debug":
            try:
                self.listener(level, event, fields)
            except Exception as e:  # a bug there: said once, and the log goes on without it
                self.listener = None
                log_internal_error(self, None, "events", e)
        milli = int(now * 1000)
        if milli != self._milli:  # a busy proxy writes many lines a millisecond
            self._milli = milli
            self._stamp = "%s.%03dZ" % (self._prefix, milli % 1000)
        return self._stamp

    def _write(self, line: str) -> None:
        loop = self._loop
        batched = loop is not None and not loop.is_closed()
        if batched and not self._pending:
            loop.call_soon(self.flush)  # type: ignore[union-attr]
        self._pending.append(line + "\n")
        if not batched:
            self.flush()

    def debug(self, event: str, **fields: Any) -> None:
        self.emit("debug", event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self.emit("info", event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self.emit("warning", event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self.emit("error", event, fields)


def log_internal_error(log: Log, metrics: Optional["Metrics"], where: str, e: BaseException) -> None:
    """An exception nobody expected: one error line with its traceback (on that line,
    JSON-escaped), counted in llmux_internal_errors_total by where it happened."""
    tb = "".join(traceback.format_exception(type(e), e, e.__traceback__))
    log.error("internal.error", where=where, error=f"{type(e).__name__}: {e}", traceback=tb)
    if metrics is not None:
        metrics.inc("llmux_internal_errors_total", where)


# ──────────────────────────────────────── metrics ───────────────────────────────────────
# Prometheus text exposition format 0.0.4, written by hand.  Names follow the Rust
# llmux's, so its dashboards carry over.  Gauges that describe the switcher's state are
# read from it at scrape time; counters and histograms are recorded as things happen.

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                     60.0, 120.0, 300.0, 600.0)


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(names: Tuple[str, ...], values: Tuple[str, ...], extra: str = "") -> str:
    parts = [f'{n}="{_escape_label(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(value: float) -> str:
    if value == float("inf"):
        return "+Inf"
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


class Metrics:
    """Counters, gauges and histograms with fixed label names."""

    def __init__(self) -> None:
        self._meta: Dict[str, Tuple[str, str, Tuple[str, ...]]] = {}  # name -> (type, help, labels)
        self._values: Dict[str, Dict[Tuple[str, ...], Any]] = {}

    def define(self, kind: str, name: str, help_text: str, labels: Tuple[str, ...] = ()) -> None:
        self._meta[name] = (kind, help_text, labels)
        self._values.setdefault(name, {})

    def inc(self, name: str, *labels: str, value: float = 1.0) -> None:
        series = self._values[name]
        series[labels] = series.get(labels, 0.0) + value

    def set(self, name: str, *labels: str, value: float) -> None:
        self._values[name][labels] = value

    def observe(self, name: str, *labels: str, value: float) -> None:
        series = self._values[name]
        hist = series.get(labels)
        if hist is None:  # per-bucket counts (the last is +Inf); cumulated when rendered
            hist = series[labels] = [[0] * (len(_DURATION_BUCKETS) + 1), 0.0, 0]
        hist[0][bisect.bisect_left(_DURATION_BUCKETS, value)] += 1
        hist[1] += value
        hist[2] += 1

    def render(self) -> str:
        out: List[str] = []
        for name, (kind, help_text, label_names) in self._meta.items():
            escaped = help_text.replace("\\", "\\\\").replace("\n", "\\n")
            out.append(f"# HELP {name} {escaped}")
            out.append(f"# TYPE {name} {kind}")
            for labels, value in sorted(self._values[name].items()):
                if kind != "histogram":
                    out.append(f"{name}{_labels(label_names, labels)} {_num(value)}")
                    continue
                counts, total, count = value
                cumulative = 0
                for bound, n in zip(_DURATION_BUCKETS, counts):
                    cumulative += n
                    le = 'le="%s"' % _num(bound)
                    out.append(f"{name}_bucket{_labels(label_names, labels, le)} {cumulative}")
                le = 'le="+Inf"'
                out.append(f"{name}_bucket{_labels(label_names, labels, le)} {count}")
                out.append(f"{name}_sum{_labels(label_names, labels)} {_num(total)}")
                out.append(f"{name}_count{_labels(label_names, labels)} {count}")
        return "\n".join(out) + "\n"


def llmux_metrics() -> Metrics:
    """The registry with every llmux metric defined."""
    m = Metrics()
    m.define("counter", "llmux_requests_total", "Proxied requests by model and HTTP status.",
             ("model", "status"))
    m.define("histogram", "llmux_request_duration_seconds",
             "Proxied request duration, queueing included.", ("model",))
    m.define("gauge", "llmux_request_queue_depth", "Requests waiting for a model.", ("model",))
    m.define("histogram", "llmux_request_queue_wait_seconds",
             "Time a request waited for its model to be active.", ("model",))
    m.define("gauge", "llmux_model_in_flight", "Requests holding a slot on a model.", ("model",))
    m.define("gauge", "llmux_model_max_in_flight",
             "The model's max_in_flight (models that set one); more requests wait.", ("model",))
    m.define("gauge", "llmux_model_active", "1 while the model is active (serving).", ("model",))
    m.define("counter", "llmux_switch_total", "Model switches by outcome.", ("from", "to", "result"))
    m.define("histogram", "llmux_switch_duration_seconds", "Whole switch: drain, sleep and wake.",
             ("from", "to"))
    m.define("histogram", "llmux_switch_drain_duration_seconds",
             "Time spent draining the old model during a switch.", ("from", "to"))
    m.define("histogram", "llmux_model_active_duration_seconds",
             "How long a model stayed active, observed when it leaves.", ("model",))
    m.define("gauge", "llmux_switch_cost_ema_seconds",
             "Moving average of the sleep+wake cost of switching between two models.", ("from", "to"))
    m.define("histogram", "llmux_hook_duration_seconds", "Hook run time.", ("model", "hook"))
    m.define("counter", "llmux_hook_failures_total", "Hooks that failed.", ("model", "hook"))
    m.define("counter", "llmux_model_crashes_total",
             "Models found dead while active (server exited, backend refused).", ("model",))
    m.define("counter", "llmux_internal_errors_total",
             "Unexpected exceptions (each logged with its traceback), by where.", ("where",))
    m.define("counter", "llmux_connections_refused_total",
             "Connections refused: max_connections and max_connections_per_peer (answered "
             "503), peer_flood (closed unanswered: PEER_PENDING_MAX of the address beyond its "
             "cap were pending and none of its connections was idle).", ("reason",))
    m.define("counter", "llmux_accept_paused_total",
             "Times accepting paused: out of file descriptors, or ACCEPT_BATCH newcomers "
             "being refused or set up beyond a full connection table.")
    m.define("histogram", "llmux_request_wait_seconds",
             "Time a queued request waited, by why: switch (its model was woken for it), "
             "max_in_flight (a slot was released), drain (a drain of its model was undone).",
             ("model", "reason"))
    m.define("histogram", "llmux_eta_error_seconds",
             "How far the ETA a request was given when it queued was from its actual wait "
             "(absolute), for requests that waited for a switch.", ("model",))
    m.define("counter", "llmux_stream_progress_total",
             "Streaming requests held with loading status (SSE comments) while they waited.",
             ("model",))
    m.define("counter", "llmux_request_turn_waits_total",
             "Requests that waited for a turn of the event loop to start (a burst: "
             "STARTS_PER_TURN start per turn).")
    m.define("counter", "llmux_request_turn_overdue_total",
             "Requests that waited TURN_WAIT_MAX_SECS for a turn and then started regardless "
             "(turns were long: the event loop is saturated).")
    m.define("counter", "llmux_events_dropped_subscribers_total",
             "/llmux/events readers dropped for reading too slowly.")
    return m


# ──────────────────────────────────────── config ────────────────────────────────────────


@dataclass(frozen=True)
class ModelConfig:
    """One entry of ``models``: where the model listens and how to wake and sleep it."""

    name: str
    port: int
    wake: Optional[str] = None
    sleep: Optional[str] = None
    alive: Optional[str] = None
    aliases: Tuple[str, ...] = ()
    idle_sleep_secs: Optional[float] = None  # overrides policy.idle_sleep_secs
    size: float = 1.0  # share of policy.capacity it takes while awake
    cmd: Optional[Tuple[str, ...]] = None  # a managed server's argv (README, "Managed model servers")
    ready_path: str = DEFAULT_READY_PATH
    stop_grace_secs: float = DEFAULT_STOP_GRACE
    upstream_model: Optional[str] = None  # written into forwarded bodies' "model" field
    max_in_flight: Optional[int] = None  # requests at once; more wait in the queue
    stream_progress: Optional[str] = None  # overrides policy.stream_progress


@dataclass(frozen=True)
class Policy:
    """The ``policy`` section: how and when to switch models."""

    name: str = "fifo"
    request_timeout_secs: Optional[float] = DEFAULT_REQUEST_TIMEOUT
    drain_before_switch: bool = True
    min_active_secs: float = 0.0
    hook_timeout_secs: Optional[float] = DEFAULT_HOOK_TIMEOUT
    drain_timeout_secs: Optional[float] = DEFAULT_DRAIN_TIMEOUT
    upstream_timeout_secs: Optional[float] = DEFAULT_UPSTREAM_TIMEOUT
    wake_backoff_secs: float = DEFAULT_WAKE_BACKOFF
    max_queue: int = DEFAULT_MAX_QUEUE
    alive_interval_secs: float = DEFAULT_ALIVE_INTERVAL
    idle_sleep_secs: float = 0.0
    shutdown_grace_secs: float = DEFAULT_SHUTDOWN_GRACE
    sleep_on_exit: bool = False
    capacity: Optional[float] = None  # None: one model awake at a time
    max_wait_secs: float = DEFAULT_MAX_WAIT  # policy "cost": the starvation bound
    cost_factor: float = 3.0  # policy "cost": serve this many switch costs before switching
    stream_progress: str = "comments"  # what a held stream gets while it waits (STREAM_PROGRESS)
    progress_interval_secs: float = DEFAULT_PROGRESS_INTERVAL


@dataclass(frozen=True)
class HttpConfig:
    """The ``http`` section: limits on what clients may send."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    header_timeout_secs: float = DEFAULT_HEADER_TIMEOUT
    body_timeout_secs: float = DEFAULT_BODY_TIMEOUT
    idle_timeout_secs: float = DEFAULT_IDLE_TIMEOUT
    send_timeout_secs: float = DEFAULT_SEND_TIMEOUT
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    max_buffered_bytes: int = DEFAULT_MAX_BUFFERED_BYTES
    min_body_rate_bytes_per_sec: float = DEFAULT_MIN_BODY_RATE  # 0: no minimum
    max_connections_per_peer: Optional[int] = DEFAULT_MAX_CONNECTIONS_PER_PEER  # None: no cap


@dataclass(frozen=True)
class Config:
    """A whole, validated config."""

    models: Dict[str, ModelConfig]
    policy: Policy = field(default_factory=Policy)
    http: HttpConfig = field(default_factory=HttpConfig)
    port: int = DEFAULT_PORT
    host: str = DEFAULT_HOST
    api_keys: Tuple[str, ...] = ()  # with LLMUX_API_KEYS added by parse_config
    allow_remote_control: bool = False  # without api_keys, /llmux/* answers loopback only
    blocked_paths: Tuple[str, ...] = ()  # never proxied (403): the engines' own controls
    preload: Optional[str] = None  # model to wake at start when none is adopted
    cors_origins: Tuple[str, ...] = DEFAULT_CORS_ORIGINS  # "*" or exact origins
    path: Optional[str] = None  # the file it came from; hooks run in its folder

    def resolve(self, name: str) -> Optional[ModelConfig]:
        """The model called ``name`` or aliased so, or None."""
        model = self.models.get(name)
        if model is not None:
            return model
        for candidate in self.models.values():
            if name in candidate.aliases:
                return candidate
        return None


def _preview(value: Any, limit: int) -> str:
    """``value`` as JSON, cut past ``limit`` characters, with only as much of it looked at:
    a value of YAML aliases nested a few levels deep is gigabytes when written out whole
    (and a str of 5,000 digits an error)."""
    out: List[str] = []
    size = 0

    def put(text: str) -> bool:
        nonlocal size
        out.append(text)
        size += len(text)
        return size <= limit

    def walk(v: Any) -> bool:
        if isinstance(v, dict):
            items: Iterable[Tuple[Any, Any]] = v.items()
            opening, closing = "{", "}"
        elif isinstance(v, (list, tuple)):
            items = ((None, x) for x in v)
            opening, closing = "[", "]"
        else:
            try:
                text = json.dumps(v[:limit + 1] if isinstance(v, str) else v)
            except (TypeError, ValueError):
                text = f"<{type(v).__name__}>"
            return put(text[:limit + 1])
        if not put(opening):
            return False
        for i, (k, x) in enumerate(items):
            if (i and not put(", ")) or (opening == "{" and not put(json.dumps(_key_text(k)[:limit]) + ": ")) \
                    or not walk(x):
                return False
        return put(closing)

    walk(value)
    return "".join(out)


def _describe(value: Any) -> str:
    """How a config value looks in an error message: ``"5" (a string)``."""
    text = _preview(value, 60)
    if len(text) > 60:
        text = text[:57] + "..."
    kind = {bool: "a boolean", int: "a number", float: "a number", str: "a string"}.get(type(value))
    return f"{text} ({kind})" if kind else text


class _Checker:
    """Collects config problems as ``path: expected X; got Y``."""

    def __init__(self) -> None:
        self.problems: List[str] = []

    def bad(self, path: str, expected: str, value: Any) -> None:
        self.problems.append(f"{path}: expected {expected}; got {_describe(value)}")

    def number(self, path: str, value: Any, *, minimum: float = 0.0, nullable: bool = False,
               positive: bool = False, integer: bool = False) -> Any:
        if value is None and nullable:
            return None
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        try:
            ok = ok and abs(float(value)) != float("inf")  # (an int of 400 digits: overflow)
        except OverflowError:
            ok = False
        if integer:
            ok = ok and float(value).is_integer()
        if ok and value == value:
            if (value > minimum) if positive else (value >= minimum):
                return int(value) if integer else float(value)
        what = "a whole number" if integer else "a number"
        what += f" > {minimum:g}" if positive else f" >= {minimum:g}"
        if nullable:
            what += " or null"
        self.bad(path, what, value)
        return None

    def boolean(self, path: str, value: Any) -> Any:
        if isinstance(value, bool):
            return value
        self.bad(path, "true or false", value)
        return None

    def text(self, path: str, value: Any, *, nullable: bool = True) -> Any:
        if value is None and nullable:
            return None
        if isinstance(value, str) and value.strip() and not _unpassable(value):
            return value
        self.bad(path, "a non-empty string" + (_unpassable(value) if isinstance(value, str) else "")
                 + (" or null" if nullable else ""), value)
        return None

    def choice(self, path: str, value: Any, choices: Sequence[str], *, nullable: bool = False) -> Any:
        if (value is None and nullable) or (isinstance(value, str) and value in choices):
            return value
        self.bad(path, "one of " + ", ".join(f'"{v}"' for v in choices)
                 + (" or null" if nullable else ""), value)
        return None

    def port(self, path: str, value: Any, *, allow_zero: bool = False) -> Any:
        low = 0 if allow_zero else 1
        if isinstance(value, int) and not isinstance(value, bool) and low <= value <= 65535:
            return value
        self.bad(path, f"a port number from {low} to 65535", value)
        return None

    def unknown(self, path: str, obj: Dict[str, Any], known: Iterable[str]) -> None:
        known = list(known)
        for key in obj:
            if key not in known:
                prefix = f"{path}." if path else ""
                self.problems.append(
                    f"{prefix}{_config_name(key)}: unknown key; expected one of {', '.join(known)}")


_POLICY_NUMBERS = {
    # key: (nullable, positive)
    "request_timeout_secs": (True, True),
    "min_active_secs": (False, False),
    "hook_timeout_secs": (True, True),
    "drain_timeout_secs": (True, False),
    "upstream_timeout_secs": (True, True),
    "wake_backoff_secs": (False, False),
    "alive_interval_secs": (False, False),
    "idle_sleep_secs": (False, False),
    "shutdown_grace_secs": (False, False),
    "capacity": (True, True),
    "max_wait_secs": (False, True),
    "cost_factor": (False, False),
    "progress_interval_secs": (False, True),
}
# What a streaming request that waits for a switch gets (README, "Loading status"):
# "comments": its 200 head at once, then SSE comments (ignored by clients) until the model
# serves; "reasoning": those, and a reasoning_content delta a chat UI shows; "off": nothing
# until the backend answers (its own status code then).
STREAM_PROGRESS = ("comments", "reasoning", "off")
_HTTP_NUMBERS = ("header_timeout_secs", "body_timeout_secs", "idle_timeout_secs", "send_timeout_secs")
_MODEL_KEYS = ("port", "wake", "sleep", "alive", "aliases", "idle_sleep_secs", "size", "cmd",
               "ready_path", "stop_grace_secs", "upstream_model", "max_in_flight", "stream_progress")
_TOP_KEYS = ("models", "policy", "http", "port", "host", "api_keys", "allow_remote_control",
             "blocked_paths", "preload", "cors_origins")
# An origin as browsers send it (RFC 6454 section 6.1): scheme://host[:port], no path.
_ORIGIN = re.compile(r"[a-z][a-z0-9+.\-]*://[^/\s?#]+\Z")
_ORIGIN_EXPECTED = "\"*\" or an origin like \"http://localhost:5173\" (scheme://host[:port])"
# An API key is compared byte for byte with what the client sent.  Clients send header
# values as ASCII (httpx, the openai client, curl from a UTF-8 shell would send UTF-8 that
# llmux sees as latin-1): a key with other characters could never match, so it is refused.
_API_KEY = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?\Z")
_API_KEY_EXPECTED = "a non-empty string of printable ASCII without surrounding spaces"


def _unpassable(text: str) -> str:
    """Why no process can be given ``text`` (as an argument or in its environment: the
    model name is LLMUX_MODEL): " without NUL characters", " without lone surrogates"
    (JSON's "\\ud800", not UTF-8), or "" when it can."""
    if "\x00" in text:
        return " without NUL characters"
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return " without lone surrogates"
    return ""


def _check_managed(c: _Checker, where: str, m: Dict[str, Any],
                   hooks: Dict[str, Optional[str]]) -> Dict[str, Any]:
    """The keys of a managed server: ``cmd``, ``ready_path``, ``stop_grace_secs``."""
    out: Dict[str, Any] = {}
    raw = m.get("cmd")
    expected = "a command line (a string, split as a shell would but run without one) or " \
               "a non-empty list of strings"
    if "cmd" in m and raw is not None:
        argv: Optional[List[str]] = None
        if isinstance(raw, str):
            try:
                argv = shlex.split(raw)
            except ValueError as e:  # "No closing quotation"
                c.problems.append(f"{where}.cmd: {str(e).lower()}; expected {expected}")
                argv = []
        elif isinstance(raw, list) and all(isinstance(a, str) for a in raw):
            argv = list(raw)
        unpassable = "".join(_unpassable(a) for a in argv or ())[:40]
        if not argv or not all(argv) or unpassable:  # not text, nothing to run, an empty
            # argument, or one no process can be given
            if argv is not None and not argv and isinstance(raw, str) and raw.strip():
                pass  # a quoting error, reported above
            else:
                c.bad(f"{where}.cmd", expected + ("," + unpassable if argv and all(argv) else ""), raw)
        else:
            out["cmd"] = tuple(argv)
        # With cmd, wake and sleep are vLLM-style sleep mode: both or neither (a sleep
        # hook with no wake hook would leave the server asleep for ever).
        if (hooks.get("wake") is None) != (hooks.get("sleep") is None):
            given, missing = ("wake", "sleep") if hooks.get("wake") else ("sleep", "wake")
            c.problems.append(f"{where}.{missing}: missing; with cmd, expected both wake and "
                              f"sleep hooks (sleep mode) or neither; got only {given}")
    if "ready_path" in m:
        path = m["ready_path"]
        if isinstance(path, str) and path.startswith("/") and _READY_PATH.match(path):
            out["ready_path"] = path
        else:
            c.bad(f"{where}.ready_path", "a path starting with '/' (visible ASCII)", path)
    if "stop_grace_secs" in m:
        grace = c.number(f"{where}.stop_grace_secs", m["stop_grace_secs"])
        if grace is not None:
            out["stop_grace_secs"] = grace
    if out.keys() & {"ready_path", "stop_grace_secs"} and "cmd" not in out and raw is None:
        key = "ready_path" if "ready_path" in out else "stop_grace_secs"
        c.problems.append(f"{where}.{key}: applies to a managed server only; expected a "
                          "'cmd' beside it")
    return out


_READY_PATH = re.compile(r"/[\x21-\x7e]*\Z")


def parse_config(raw: Any, path: Optional[str] = None) -> Config:
    """Validate a decoded config document; raise ConfigError naming every problem."""
    c = _Checker()
    if not isinstance(raw, dict):
        c.bad("(top level)", "an object with a 'models' key", raw)
        raise ConfigError(c.problems)
    c.unknown("", raw, _TOP_KEYS)

    port = DEFAULT_PORT
    if "port" in raw:
        port = c.port("port", raw["port"], allow_zero=True)
    host = DEFAULT_HOST
    if "host" in raw:
        host = c.text("host", raw["host"], nullable=False)
    keys = raw.get("api_keys", [])
    if not isinstance(keys, list):
        c.bad("api_keys", "a list of non-empty strings without surrounding spaces", keys)
        keys = []
    for i, k in enumerate(keys):
        if not isinstance(k, str) or not _API_KEY.match(k):
            c.bad(f"api_keys[{i}]", _API_KEY_EXPECTED, k)
    env_keys = [k.strip() for k in os.environ.get("LLMUX_API_KEYS", "").split(",") if k.strip()]
    for i, k in enumerate(env_keys):
        if not _API_KEY.match(k):
            c.bad(f"LLMUX_API_KEYS[{i}]", _API_KEY_EXPECTED, k)
    keys = keys + env_keys
    cors = _check_cors_origins(c, raw.get("cors_origins", list(DEFAULT_CORS_ORIGINS)))
    remote_control = False
    if "allow_remote_control" in raw:
        remote_control = c.boolean("allow_remote_control", raw["allow_remote_control"])
    blocked = DEFAULT_BLOCKED_PATHS
    if "blocked_paths" in raw:
        value = raw["blocked_paths"]
        if isinstance(value, list) and all(isinstance(v, str) and v.startswith("/") for v in value):
            blocked = tuple(value)
        else:
            c.bad("blocked_paths", "a list of paths, each starting with '/'", value)

    policy_raw = raw.get("policy", {})
    policy_args: Dict[str, Any] = {}
    if not isinstance(policy_raw, dict):
        c.bad("policy", "an object", policy_raw)
        policy_raw = {}
    c.unknown("policy", policy_raw, ["name", "drain_before_switch", "max_queue", "sleep_on_exit",
                                     "stream_progress", *_POLICY_NUMBERS])
    if "stream_progress" in policy_raw:
        policy_args["stream_progress"] = c.choice("policy.stream_progress",
                                                  policy_raw["stream_progress"], STREAM_PROGRESS)
    for key, (nullable, positive) in _POLICY_NUMBERS.items():
        if key in policy_raw:
            policy_args[key] = c.number(f"policy.{key}", policy_raw[key], nullable=nullable,
                                        positive=positive)
    for key in ("drain_before_switch", "sleep_on_exit"):
        if key in policy_raw:
            policy_args[key] = c.boolean(f"policy.{key}", policy_raw[key])
    if "max_queue" in policy_raw:
        policy_args["max_queue"] = c.number("policy.max_queue", policy_raw["max_queue"],
                                            integer=True, positive=True)
    if "name" in policy_raw:
        name = policy_raw["name"]
        if not isinstance(name, str) or name not in POLICIES:
            c.bad("policy.name", "one of " + ", ".join(sorted(POLICIES)), name)
        policy_args["name"] = name

    http_raw = raw.get("http", {})
    http_args: Dict[str, Any] = {}
    if not isinstance(http_raw, dict):
        c.bad("http", "an object", http_raw)
        http_raw = {}
    c.unknown("http", http_raw, ["max_body_bytes", "max_connections", *_HTTP_NUMBERS,
                                 "max_buffered_bytes", "min_body_rate_bytes_per_sec",
                                 "max_connections_per_peer"])
    for key in _HTTP_NUMBERS:
        if key in http_raw:
            http_args[key] = c.number(f"http.{key}", http_raw[key], positive=True)
    for key in ("max_body_bytes", "max_connections", "max_buffered_bytes"):
        if key in http_raw:
            http_args[key] = c.number(f"http.{key}", http_raw[key], integer=True, positive=True)
    if "max_connections_per_peer" in http_raw:
        http_args["max_connections_per_peer"] = c.number(
            "http.max_connections_per_peer", http_raw["max_connections_per_peer"], integer=True,
            positive=True, nullable=True)
    if "min_body_rate_bytes_per_sec" in http_raw:
        http_args["min_body_rate_bytes_per_sec"] = c.number(
            "http.min_body_rate_bytes_per_sec", http_raw["min_body_rate_bytes_per_sec"])
    buffered = http_args.get("max_buffered_bytes") or DEFAULT_MAX_BUFFERED_BYTES
    body_max = http_args.get("max_body_bytes") or DEFAULT_MAX_BODY_BYTES
    if buffered < body_max:  # else a body of the allowed size could never be accepted
        c.problems.append(f"http.max_buffered_bytes: {buffered} is less than http.max_body_bytes "
                          f"{body_max}; expected at least one whole body")

    models: Dict[str, ModelConfig] = {}
    models_raw = raw.get("models")
    if not isinstance(models_raw, dict) or not models_raw:
        c.bad("models", "an object naming at least one model", models_raw)
        models_raw = {}
    ports: Dict[int, str] = {}
    names: Dict[str, str] = {}
    for name, m in models_raw.items():
        where = f"models.{_config_name(name)}"
        if not isinstance(name, str):  # YAML keys may be numbers
            c.bad(where, "a model name (a string)", name)
            continue
        if not name.strip() or any(ch.isspace() or ord(ch) < 32 for ch in name) or _unpassable(name):
            c.bad(where, "a model name without spaces, control characters or lone surrogates", name)
        if not isinstance(m, dict):
            c.bad(where, "an object with at least 'port'", m)
            continue
        c.unknown(where, m, _MODEL_KEYS)
        if "port" not in m:
            c.problems.append(f"{where}.port: missing; expected a port number from 1 to 65535")
        mport = c.port(f"{where}.port", m.get("port")) if "port" in m else None
        if mport is not None:
            if mport in ports:
                c.problems.append(f"{where}.port: {mport} is already used by model "
                                  f"'{ports[mport]}'; expected a port of its own")
            elif mport == port:
                c.problems.append(f"{where}.port: {mport} is llmux's own port; "
                                  "expected the port the model's server listens on")
            ports[mport] = name
        hooks = {h: c.text(f"{where}.{h}", m.get(h)) for h in HOOK_NAMES}
        aliases_raw = m.get("aliases", [])
        aliases: List[str] = []
        if not isinstance(aliases_raw, list) or not all(isinstance(a, str) and a for a in aliases_raw):
            c.bad(f"{where}.aliases", "a list of non-empty strings", aliases_raw)
        else:
            aliases = list(aliases_raw)
        for label in [name, *aliases]:
            if len(label.encode("utf-8", "surrogatepass")) > MAX_MODEL_NAME_BYTES:
                c.problems.append(f"{where}: name or alias of {len(label)} characters; expected "
                                  f"at most {MAX_MODEL_NAME_BYTES} bytes")
            if label in names and names[label] != name:
                c.problems.append(f"{where}: name or alias '{label}' is already used by "
                                  f"model '{names[label]}'; expected names unique across models")
            names[label] = name
        idle = c.number(f"{where}.idle_sleep_secs", m["idle_sleep_secs"], nullable=True) \
            if "idle_sleep_secs" in m else None
        size = c.number(f"{where}.size", m["size"], positive=True) if "size" in m else 1.0
        capacity = policy_args.get("capacity")
        if size is not None and capacity is not None and size > capacity:
            c.problems.append(f"{where}.size: {size:g} is more than policy.capacity {capacity:g}; "
                              "expected a size that fits")
        managed = _check_managed(c, where, m, hooks)
        upstream_model = c.text(f"{where}.upstream_model", m.get("upstream_model"))
        max_in_flight = c.number(f"{where}.max_in_flight", m["max_in_flight"], integer=True,
                                 positive=True, nullable=True) if "max_in_flight" in m else None
        progress = c.choice(f"{where}.stream_progress", m["stream_progress"], STREAM_PROGRESS,
                            nullable=True) if "stream_progress" in m else None
        models[name] = ModelConfig(name=name, port=mport or 0, aliases=tuple(aliases),
                                   idle_sleep_secs=idle, size=size or 1.0,
                                   upstream_model=upstream_model, max_in_flight=max_in_flight,
                                   stream_progress=progress, **hooks, **managed)

    preload = raw.get("preload")
    if preload is not None and (not isinstance(preload, str) or preload not in models):
        c.bad("preload", "null or the name of a model in 'models'", preload)
    if c.problems:
        raise ConfigError(c.problems)
    return Config(models=models, policy=Policy(**policy_args), http=HttpConfig(**http_args),
                  port=port, host=host, api_keys=tuple(keys),
                  allow_remote_control=bool(remote_control), blocked_paths=blocked,
                  preload=preload, path=path, cors_origins=cors)


def _check_cors_origins(c: _Checker, value: Any) -> Tuple[str, ...]:
    """``cors_origins``: a list of "*" or origins, compared lower-cased with Origin."""
    if not isinstance(value, list):
        c.bad("cors_origins", f"a list of {_ORIGIN_EXPECTED}", value)
        return DEFAULT_CORS_ORIGINS
    origins: List[str] = []
    for i, o in enumerate(value):
        if isinstance(o, str) and (o == "*" or _ORIGIN.match(o.lower())):
            origins.append(o.lower())
        else:
            c.bad(f"cors_origins[{i}]", _ORIGIN_EXPECTED, o)
    return tuple(origins)


def _own_port_problems(config: Config, port: Optional[int], host: str) -> List[str]:
    """A model on the port llmux itself listens on (on loopback or every address): its
    requests would come back to llmux, each opening one more connection to itself."""
    if not port or not (host in ("", "0.0.0.0", "::", "localhost", "::1") or host.startswith("127.")):
        return []
    return [f"models.{name}.port: {port} is the port llmux itself listens on; expected another "
            "port (requests to it would come back to llmux)"
            for name, m in config.models.items() if m.port == port]


class _Mapping(dict):  # type: ignore[type-arg]
    """An object of a config file as decoded, with the keys it gave more than once (JSON
    and YAML let the last one win without a word; llmux says so)."""

    __slots__ = ("repeated",)

    def __init__(self) -> None:
        super().__init__()
        self.repeated: List[Any] = []


def _json_object(pairs: List[Tuple[str, Any]]) -> "_Mapping":
    m = _Mapping()
    for key, value in pairs:
        if key in m:
            m.repeated.append(key)
        m[key] = value
    return m


def _yaml_loader(yaml: Any) -> Any:
    """PyYAML's SafeLoader, making _Mappings: a key the document's own mapping gives twice
    (as loaded: ``1`` and ``0x1`` are one key, ``1`` and ``"1"`` two) is noted; one that a
    merge key ``<<`` brings in and the mapping overrides is not."""

    class Loader(yaml.SafeLoader):  # type: ignore[misc,name-defined]
        def __init__(self, stream: Any) -> None:
            super().__init__(stream)
            self._written: Dict[int, List[Any]] = {}  # id(node) -> the keys it repeats

        def _repeats(self, node: Any) -> List[Any]:
            """The keys ``node`` repeats as written: seen before flatten_mapping puts merged
            keys into its value, which it does to a merge source when another mapping
            merges it, maybe before the source's own turn."""
            found = self._written.get(id(node))
            if found is None:
                found = self._written[id(node)] = []
                seen: Set[Any] = set()
                merges = 0
                for key, _ in node.value:
                    if not isinstance(key, yaml.ScalarNode):
                        continue
                    if key.tag == "tag:yaml.org,2002:merge":  # two: the later one won, silently
                        merges += 1  # (several sources are one key: <<: [*a, *b])
                        if merges > 1:
                            found.append("<<")
                        continue
                    value = self.construct_object(key)
                    try:
                        if value in seen:
                            found.append(value)
                        seen.add(value)
                    except TypeError:  # unhashable: construct_mapping says so
                        pass
            return found

        def flatten_mapping(self, node: Any) -> None:
            self._repeats(node)
            super().flatten_mapping(node)

        def _map(self, node: Any) -> Any:
            data = _Mapping()
            yield data
            data.repeated = self._repeats(node)
            data.update(self.construct_mapping(node))

    Loader.add_constructor("tag:yaml.org,2002:map", Loader._map)
    # YAML 1.1 reads 1:30 as 90 (base 60) and 1:30.5 as a float: a port or a time typed
    # that way would be taken silently.  As in YAML 1.2, they are strings (a config error).
    base_60 = re.compile(r"\|[^|\n]*\(\?::\[0-5\]\?\[0-9\]\)\+[^|\n)]*")  # that alternative
    Loader.yaml_implicit_resolvers = {
        first: [(tag, re.compile(base_60.sub("", rx.pattern), rx.flags) if base_60.search(rx.pattern) else rx)
                for tag, rx in entries]
        for first, entries in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    return Loader


def _repeated_keys(raw: Any) -> List[str]:
    """A problem for each key an object of the file gave more than once, by key path.
    Each object or list is visited once (a YAML alias bomb costs what it loads), and a
    path is written out only for a problem: a deep document costs one link a container."""
    problems: List[str] = []
    if not isinstance(raw, (dict, list)):
        return problems  # (null, a number: parse_config says what the top level must be)
    seen: Set[int] = {id(raw)}
    # (node, its path as links: (key or [index], the parent's links) or None at the top)
    stack: List[Tuple[Any, Any]] = [(raw, None)]
    while stack and len(problems) <= CONFIG_PROBLEMS_MAX:
        node, links = stack.pop()
        if isinstance(node, dict):
            repeated = getattr(node, "repeated", ())
            if repeated:
                counts: Dict[Any, int] = {}
                for key in repeated:
                    counts[key] = counts.get(key, 1) + 1
                where = _key_path(links)
                for key, count in counts.items():
                    problems.append(f"{where or '(top level)'}: the key '{_config_name(key)}' is "
                                    f"given {count} times; expected each key once")
            children: Iterable[Tuple[Any, Any]] = node.items()
        else:
            children = ((_Index(i), v) for i, v in enumerate(node))
        below = []
        for key, value in children:
            if isinstance(value, (dict, list)) and id(value) not in seen:
                seen.add(id(value))
                below.append((value, (key, links)))
        stack.extend(reversed(below))  # problems in the file's order
    return problems


class _Index(int):
    """A list index in a key path (written ``[i]``)."""


def _key_path(links: Any) -> str:
    parts: List[str] = []
    while links is not None:
        key, links = links
        parts.append(f"[{int(key)}]" if isinstance(key, _Index) else "." + _config_name(key))
    return "".join(reversed(parts)).lstrip(".")


def load_config(path: str) -> Config:
    """Read and validate a JSON (or, with PyYAML, YAML) config file."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError([f"{path}: cannot read: {e.strerror}"]) from None
    if path.endswith((".yaml", ".yml")):
        yaml = _yaml()
        if yaml is None:
            raise ConfigError([f"{path}: a YAML config needs PyYAML, which is not installed; "
                               "install it (pip install pyyaml) or write the config as JSON"])
        try:
            raw = yaml.load(data, Loader=_yaml_loader(yaml))  # safe: a SafeLoader
        except (yaml.YAMLError, ValueError) as e:  # (ValueError: an int of 5,000 digits)
            raise ConfigError([f"{path}: not valid YAML: {e}"]) from None
        except RecursionError:
            raise ConfigError([f"{path}: not valid YAML: nested too deeply"]) from None
    else:
        try:
            raw = json.loads(data, object_pairs_hook=_json_object)
        except ValueError as e:
            raise ConfigError([f"{path}: not valid JSON: {e}"]) from None
        except RecursionError:
            raise ConfigError([f"{path}: not valid JSON: nested too deeply"]) from None
    repeated = _repeated_keys(raw)
    try:
        config = parse_config(raw, os.path.abspath(path))
    except ConfigError as e:
        raise ConfigError(repeated + e.problems) from None
    if repeated:
        raise ConfigError(repeated)
    return config


# ─────────────────────────────── HTTP wire (sans-I/O) ───────────────────────────────────
# The parsers do no I/O: feed() them bytes, call next_event() until NEED_DATA.  A broken
# message raises HTTPError carrying the status to answer with; the parser then stays
# broken.  Only CRLF line endings are accepted: a bare CR or LF is how requests get
# smuggled past a front end that reads lines differently.

NEED_DATA = type("NeedData", (), {"__repr__": lambda self: "NEED_DATA"})()


class RequestHead(NamedTuple):
    method: str
    target: str
    version: str  # "HTTP/1.1" or "HTTP/1.0"
    headers: List[Tuple[str, str]]  # (lower-case name, value), in order, duplicates kept
    keep_alive: bool
    expect_continue: bool

    def get(self, name: str) -> Optional[str]:
        """The value of the last header called ``name`` (lower case), or None."""
        for key, value in reversed(self.headers):
            if key == name:
                return value
        return None


class ResponseHead(NamedTuple):
    status: int
    reason: str
    version: str
    headers: List[Tuple[str, str]]
    keep_alive: bool
    framing: Union[str, int]  # response_framing() for the request's method


class Body(NamedTuple):
    data: bytes


class _EndOfMessage:
    def __repr__(self) -> str:
        return "EndOfMessage"


EndOfMessage = _EndOfMessage()

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
# A whole header section at once (each line with its CRLF): _FIELD_BLOCK says whether every
# line is a field (unambiguous: a value cannot hold CR, so each repetition ends at its
# line's CRLF and a failure never backtracks into earlier lines); then _FIELD_LINE takes
# them apart, on text that is known to match.  Anything else goes to _parse_fields, which
# names what is wrong.  The same result as _parse_fields, line for line (a fuzz test checks).
_FIELD_BLOCK = re.compile(r"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\x00-\x08\x0a-\x1f\x7f]*\r\n)*")
_FIELD_LINE = re.compile(r"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*((?:[^\x00-\x08\x0a-\x1f\x7f]*"
                         r"[^\x00-\x20\x7f])?)[ \t]*\r\n")
_BARE_CR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n|\x00")
_CR_OR_LF = re.compile(rb"[\r\n]")
_EMPTY_LINES = re.compile(rb"(?:\r\n)+")
_REQUEST_LINE_BAD = re.compile(rb"[^\x21-\x7e ]")  # a request line is visible ASCII and SP
_FIELD_VALUE_BAD = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_DIGITS = re.compile(r"[0-9]+\Z")
_HEX = re.compile(rb"[0-9A-Fa-f]+\Z")
_CHUNK_HEAD = re.compile(rb"([0-9A-Fa-f]{1,%d})\r\n" % MAX_CHUNK_SIZE_DIGITS)  # no extension: the usual
_TARGET_BAD = re.compile(rb"[\x00-\x20\x7f-\xff]")
# (A target holds no "#": RFC 9112 section 3.2.  A fragment is not part of the path to
# llmux, but uvicorn drops it and routes /sleep#x to /sleep: blocked_paths would not see it.)
_PLAIN_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) ([\x21\x22\x24-\x7e]+) HTTP/1\.([01])")
_VERSION = re.compile(rb"HTTP/([0-9])\.([0-9])\Z")
# RFC 9110 section 15: a status code is 100 to 599 (a "099" is no interim answer).
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([1-5][0-9]{2})(?: ([\x09\x20-\x7e\x80-\xff]*))?\Z")

# RFC 9110 section 7.6.1: headers that describe one connection, never forwarded.
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
                        "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade"})


def _header_tokens(headers: List[Tuple[str, str]], name: str) -> List[str]:
    """Comma-separated values of every ``name`` header, lower-cased and stripped."""
    out: List[str] = []
    for key, value in headers:
        if key == name:
            if "," in value:
                out.extend(t.strip().lower() for t in value.split(","))
            else:
                out.append(value.strip().lower())
    return out


def _parse_fields(lines: List[bytes], status: int = 400) -> List[Tuple[str, str]]:
    """Header field lines (RFC 9112 section 5: field-name ":" OWS field-value OWS, the
    value without CTLs but HTAB) to (lower-case name, value) pairs.  Each test is one
    pass that cannot backtrack: a regex for the whole line, with OWS on both sides of a
    lazy value, took quadratic time to fail on a run of spaces (17 s for 60,000)."""
    headers: List[Tuple[str, str]] = []
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or _TOKEN.match(name) is None:
            if line[:1] in (b" ", b"\t"):
                raise HTTPError("obsolete line folding in header section", status=status)
            raise HTTPError(f"invalid header line {line[:40]!r}", status=status)
        if _FIELD_VALUE_BAD.search(value) is not None:
            raise HTTPError(f"invalid character in header {name.decode()!r}", status=status)
        headers.append((name.decode("ascii").lower(), value.strip(b" \t").decode("latin-1")))
    return headers


def _field_block(block: bytes, status: int = 400) -> List[Tuple[str, str]]:
    """A header section (field lines, each ending in CRLF) to (lower-case name, value)
    pairs: _parse_fields's result, at C speed for a valid one."""
    text = block.decode("latin-1")
    if _FIELD_BLOCK.fullmatch(text) is None:
        return _parse_fields(block.split(b"\r\n")[:-1], status)  # raises, naming the line
    return [(name.lower(), value) for name, value in _FIELD_LINE.findall(text)]


def _content_length(headers: List[Tuple[str, str]], status: int = 400) -> Optional[int]:
    """The one Content-Length, or None; differing, signed or oversized ones raise."""
    values = [v for k, v in headers if k == "content-length"]
    if len(values) == 1:  # the usual: one plain number (isdigit alone takes "²" too)
        v = values[0]
        if v.isdigit() and v.isascii() and len(v) <= MAX_CONTENT_LENGTH_DIGITS:
            return int(v)
    values = _header_tokens(headers, "content-length")
    if not values:
        return None
    first = values[0]
    for v in values:
        if not _DIGITS.match(v) or len(v) > MAX_CONTENT_LENGTH_DIGITS:
            raise HTTPError(f"invalid content-length {v!r}", status=status)
        if v != first:
            raise HTTPError("conflicting content-length values", status=status)
    return int(first)


def request_framing(version: str, headers: List[Tuple[str, str]]) -> Union[str, int]:
    """How a request body is delimited (RFC 9112 section 6.3), in its order:

    1. Transfer-Encoding and Content-Length together: 400 (a smuggling shape).
    2. Transfer-Encoding: only ``chunked``, once, on HTTP/1.1.  Another coding: 501.
    3. Content-Length: digits only, repeated values identical.
    4. Neither: no body.
    Returns "chunked" or the body length.
    """
    names = {k for k, _ in headers}
    codings = _header_tokens(headers, "transfer-encoding") if "transfer-encoding" in names else []
    has_length = "content-length" in names
    if codings and has_length:
        raise HTTPError("both transfer-encoding and content-length")
    if codings:
        if version == "HTTP/1.0":
            raise HTTPError("transfer-encoding in an HTTP/1.0 request")
        if any(c not in ("chunked",) for c in codings):
            if "" in codings:
                raise HTTPError("empty transfer coding")
            raise HTTPError("transfer coding other than chunked is not supported",
                            status=501, code="not_implemented")
        if len(codings) != 1:
            raise HTTPError("chunked applied more than once")
        return "chunked"
    return (_content_length(headers) or 0) if has_length else 0


def response_framing(method: str, status: int, headers: List[Tuple[str, str]]) -> Union[str, int]:
    """How a response body is delimited (RFC 9112 section 6.3), in its order:

    1. A response to HEAD, any 1xx, 204 or 304: no body.
    2. Transfer-Encoding: only ``chunked``, once; another coding: 502.  (RFC 9112
       would read a body whose final coding is not chunked until the close, and pass
       the codings on; llmux re-frames bodies and its clients, HTTP/1.0 ones included,
       cannot be relied on to decode a transfer coding, so forwarding ``gzip`` bytes
       would hand them garbage.  Model servers never send one.)
    3. Content-Length: that many bytes (invalid: 502).
    4. Otherwise: read until the connection closes.
    Returns "chunked", "close" or the body length.
    """
    if method == "HEAD" or status < 200 or status in (204, 304):
        return 0
    names = {k for k, _ in headers}
    if "transfer-encoding" in names:
        codings = _header_tokens(headers, "transfer-encoding")
        other = [c for c in codings if c != "chunked"]
        if other:
            raise HTTPError(f"unsupported transfer coding {other[0]!r} in response; expected chunked",
                            status=502)
        if len(codings) != 1:
            raise HTTPError("chunked applied more than once in response; expected it once", status=502)
        return "chunked"
    length = _content_length(headers, status=502) if "content-length" in names else None
    return "close" if length is None else length


_AGAIN = object()  # a state reader moved on without an event: run the next reader


def _crlf_only(buf: bytearray, start: int, end: int) -> bool:
    """No bare CR, bare LF or NUL in ``buf[start:end]``: three counts at C speed (every CR
    is followed by LF and every LF preceded by CR exactly when all three counts agree)."""
    crlf = buf.count(b"\r\n", start, end)
    return buf.count(b"\r", start, end) == crlf and buf.count(b"\n", start, end) == crlf \
        and buf.find(b"\x00", start, end) < 0


def _split_head(buf: bytearray, first: int, end: int) -> Tuple[bytes, bytes]:
    """Take a head out of ``buf`` (its CRLF CRLF at ``end``, its first CRLF at ``first``):
    the start line, and the field lines each with its CRLF (b"" for none)."""
    start = bytes(buf[:first])
    block = bytes(buf[first + 2:end + 2]) if end > first else b""
    del buf[:end + 4]
    return start, block


def _bad_byte(byte: bytes) -> str:
    """How an error message names a byte that breaks the line grammar."""
    return {b"\r": "bare CR", b"\n": "bare LF", b"\x00": "NUL byte"}.get(byte, f"byte {byte!r}")


class _Parser:
    """Shared machinery: find the head, then deliver the body by its framing.

    next_event() runs a loop over per-state readers (``_READERS``, indexed by state).
    A reader returns an event, NEED_DATA, or ``_AGAIN`` after consuming bytes and
    changing state; nothing recurses, so a peer's many trailer lines or tiny chunks
    cost loop iterations, never stack.  Every ``_AGAIN`` consumes at least two bytes
    (or hands a start line on to _FIELDS, which then consumes the head), and every
    call ends at an event or NEED_DATA, so ``steps`` (the iterations, for tests) stays
    below a small constant times the bytes fed plus the calls made.
    Searches for line ends resume where the last one stopped (``_scan``, ``_checked``)
    and are bounded by the limit in force, so a byte is looked at a bounded number of
    times however the input is split.
    """

    (_START, _FIELDS, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER, _CLOSE,
     _DONE, _BROKEN) = range(10)
    _error_status = 400
    _trailer_status = 431
    _trailer_code: Optional[str] = "headers_too_large"  # (as the head's 431s)

    def __init__(self) -> None:
        self._buf = bytearray()
        self._state = self._START
        self._line_end = 0  # where the start line ends (RequestParser: its CRLF)
        self._scan = 0  # where to resume looking for the line end that is due
        self._checked = 0  # bytes of the pending line or head already checked for bad bytes
        self._remaining = 0
        self._trailer_bytes = 0
        self._trailer_lines = 0
        self._eof = False
        self._error: Optional[HTTPError] = None
        self._method: Optional[bytes] = None  # (RequestParser) of the head being read, once read
        self.steps = 0  # reader calls so far: the work-per-byte bound is tested on it

    @property
    def buffered(self) -> int:
        """Bytes received and not yet returned as events.  After a ResponseParser's
        final EndOfMessage these are bytes the backend sent beyond its response: a
        backend out of sync, whose connection must not be reused."""
        return len(self._buf)

    @property
    def expecting_body(self) -> bool:
        """True between a head and its EndOfMessage when body bytes are still due."""
        return self._state in (self._CHUNK_SIZE, self._CHUNK_DATA, self._CHUNK_END, self._TRAILER,
                               self._CLOSE) or (self._state == self._LENGTH and self._remaining > 0)

    def feed(self, data: bytes) -> None:
        """Append bytes received from the peer."""
        self._buf += data

    def feed_eof(self) -> None:
        """The peer closed its side."""
        self._eof = True

    def next_event(self) -> Any:
        """The next head, Body, EndOfMessage, or NEED_DATA; HTTPError if broken."""
        if self._error is not None:
            raise self._error
        readers = self._READERS
        try:
            while True:
                self.steps += 1
                event = readers[self._state](self)
                if event is not _AGAIN:
                    return event
        except HTTPError as e:
            self._error = e
            self._state = self._BROKEN
            raise

    def _fail(self, message: str, status: Optional[int] = None, **kw: Any) -> HTTPError:
        return HTTPError(message, status=status or self._error_status, **kw)

    # -- the head --

    def _read_start(self) -> Any:
        # RFC 9112 section 2.2: ignore empty lines before a message.
        buf = self._buf
        if buf[:2] == b"\r\n":
            empty = _EMPTY_LINES.match(buf)
            if empty:
                del buf[:empty.end()]
        if not buf:
            return self._eof_between_messages() if self._eof else NEED_DATA
        self._trailer_bytes = self._trailer_lines = 0
        self._method = None
        whole = self._head_at_once()
        if whole is not None:
            return whole
        return self._start_line()

    def _head_at_once(self) -> Any:
        """A whole, plain head read in one step (each parser's, by _whole_head); None: go
        step by step."""
        return None

    def _whole_head(self, limit: int, start_line: "re.Pattern[bytes]", line_max: int,
                    fields_max: int) -> Optional[Tuple[Tuple[Any, ...], List[Tuple[str, str]]]]:
        """A whole head at the buffer's start (its CRLF CRLF within ``limit``), its start
        line matching ``start_line`` and its fields valid: the line's groups and the
        fields, the head consumed.  None (nothing consumed) for anything else, which the
        step-by-step way then reads and names.  Such a head holds no CR, LF or NUL but its
        CRLFs, so the step-by-step way's check for them is implied."""
        buf = self._buf
        end = buf.find(b"\r\n\r\n", 0, limit)
        if end < 0:
            return None
        first = buf.find(b"\r\n", 0, end + 2)
        if first > line_max or end - first > fields_max:
            return None
        line = start_line.fullmatch(buf, 0, first)
        if line is None:
            return None
        text = buf[first + 2:end + 2].decode("latin-1") if end > first else ""
        if _FIELD_BLOCK.fullmatch(text) is None:
            return None
        headers = [(name.lower(), value) for name, value in _FIELD_LINE.findall(text)]
        if len(headers) > MAX_HEADER_COUNT:  # (before the head is consumed: its error may
            raise self._too_many_fields()   # need it, as refused_method does)
        groups = line.groups()  # (before the buffer changes under the match)
        del buf[:end + 4]
        self._line_end = self._scan = self._checked = 0
        self._state = self._FIELDS  # as _start_line leaves it, for the errors that follow
        return groups, headers

    def _too_many_fields(self) -> HTTPError:
        raise NotImplementedError

    def _start_line(self) -> Any:
        """RequestParser checks its request line first; a response goes on to _FIELDS."""
        self._line_end = self._scan = self._checked = 0
        self._state = self._FIELDS
        return _AGAIN

    def _read_fields(self) -> Any:
        # The head ends at CRLF CRLF, which must lie wholly within _head_limit() bytes:
        # the same bound whether the head arrives whole or a byte at a time.  Bytes are
        # checked for bare CR, bare LF and NUL as they arrive, so a peer that ends its
        # lines with LF alone is refused at once instead of waiting for a CRLF CRLF
        # that never comes.
        buf = self._buf
        limit = self._head_limit()
        end = buf.find(b"\r\n\r\n", self._scan, limit)
        if end >= 0:
            upto = end + 4
        else:
            upto = min(len(buf), limit)
            if buf[upto - 1:upto] == b"\r":
                upto -= 1  # maybe the start of a CRLF: judged when the next byte comes
        checked = self._checked
        if not _crlf_only(buf, checked, upto):
            bad = _BARE_CR_LF.search(buf, checked, upto)  # which byte, and where
            if bad:
                byte = bad.group()
                raise self._fail(_bad_byte(byte) + " in message head" +
                                 ("; expected CRLF line endings" if byte != b"\x00" else ""))
        self._checked = upto
        if end < 0:
            if len(buf) >= limit:
                raise self._head_too_large()
            if self._eof:
                raise self._fail("connection closed inside the message head")
            self._scan = max(self._line_end, len(buf) - 3)
            return NEED_DATA
        start, block = _split_head(buf, buf.find(b"\r\n", 0, end + 2), end)
        self._line_end = self._scan = self._checked = 0
        return self._parse_head(start, block)

    def _head_limit(self) -> int:
        raise NotImplementedError

    def _head_too_large(self) -> HTTPError:
        raise NotImplementedError

    def _eof_between_messages(self) -> Any:
        return None

    def _parse_head(self, start: bytes, block: bytes) -> Any:
        """The start line, and the field lines (each ending in CRLF; b"" for none)."""
        raise NotImplementedError

    # -- the body --

    def _read_length(self) -> Any:
        if self._remaining == 0:
            return self._end()
        return self._take("connection closed before the body was complete")

    def _line(self, limit: int, too_long: str, status: Optional[int] = None,
              code: Optional[str] = None) -> Optional[bytes]:
        """The CRLF-terminated line (at most ``limit`` bytes) at the start of the buffer,
        consumed; None while it is incomplete.  HTTPError(``too_long``) past the limit."""
        buf = self._buf
        end = buf.find(b"\r\n", self._checked, limit + 2)
        if end >= 0:
            upto = end
        else:
            upto = min(len(buf), limit + 1)
            if buf[upto - 1:upto] == b"\r":
                upto -= 1  # maybe the start of a CRLF: judged when the next byte comes
        # No CRLF starts before ``upto``, so any CR or LF there is bare.
        bad = _CR_OR_LF.search(buf, self._checked, upto)
        if bad:
            raise self._fail(_bad_byte(bad.group()) + " in chunked framing; expected CRLF line endings")
        self._checked = upto
        if end < 0:
            if len(buf) >= limit + 2:
                raise self._fail(too_long, status, code=code)
            return None
        line = bytes(buf[:end])
        del buf[: end + 2]
        self._checked = 0
        return line

    def _read_chunk_size(self) -> Any:
        buf = self._buf
        if not buf:  # as _line would say, without its searches: once per chunk relayed
            if self._eof:
                raise self._fail("connection closed inside a chunked body")
            return NEED_DATA
        plain = _CHUNK_HEAD.match(buf) if not self._checked else None
        if plain is not None:  # the usual line, and often its whole chunk: one step for both
            size = int(plain.group(1), 16)
            self._on_chunk(size)
            start = plain.end()
            end = start + size
            if size and buf[end:end + 2] == b"\r\n":
                data = bytes(buf[start:end])
                del buf[:end + 2]
                return Body(data)  # and the next size line is due: the state stays
            del buf[:start]
            return self._chunk_due(size)
        line = self._line(MAX_CHUNK_LINE,
                          f"chunk size line too long; expected at most {MAX_CHUNK_LINE} bytes")
        if line is None:
            if self._eof:
                raise self._fail("connection closed inside a chunked body")
            return NEED_DATA
        size_text, _, ext = line.partition(b";")
        size_text = size_text.rstrip(b" \t")  # RFC 9112 section 7.1.1: BWS before ';'
        if not _HEX.match(size_text) or len(size_text) > MAX_CHUNK_SIZE_DIGITS:
            raise self._fail(f"invalid chunk size {size_text[:20]!r}")
        if _FIELD_VALUE_BAD.search(ext):
            raise self._fail("invalid character in chunk extension")
        size = int(size_text, 16)
        self._on_chunk(size)
        return self._chunk_due(size)

    def _chunk_due(self, size: int) -> Any:
        """After a chunk-size line: its data is due, or (size 0) the trailer section."""
        if size == 0:
            self._state = self._TRAILER
        else:
            self._remaining = size
            self._state = self._CHUNK_DATA
        return _AGAIN

    def _read_chunk_data(self) -> Any:
        event = self._take("connection closed inside a chunk")
        if self._remaining == 0:
            self._state = self._CHUNK_END
        return event

    def _read_chunk_end(self) -> Any:
        buf = self._buf
        if len(buf) < 2:
            if buf[:1] not in (b"", b"\r"):
                raise self._fail("missing CRLF after chunk data")
            if self._eof:
                raise self._fail("connection closed inside a chunked body")
            return NEED_DATA
        if buf[:2] != b"\r\n":
            raise self._fail("missing CRLF after chunk data")
        del buf[:2]
        self._state = self._CHUNK_SIZE
        return _AGAIN

    def _read_trailer(self) -> Any:
        # Trailers are checked and dropped.  Their bytes and their lines are both
        # bounded: each line costs a loop iteration and a regex match.
        budget = MAX_TRAILER_BYTES - self._trailer_bytes
        line = self._line(max(0, budget - 2), f"trailer section too large; expected at most "
                          f"{MAX_TRAILER_BYTES} bytes", self._trailer_status, self._trailer_code)
        if line is None:
            if self._eof:
                raise self._fail("connection closed inside the trailer section")
            return NEED_DATA
        if not line:
            return self._end()
        self._trailer_bytes += len(line) + 2
        self._trailer_lines += 1
        if self._trailer_lines > MAX_TRAILER_LINES:
            raise self._fail(f"too many trailer fields; expected at most {MAX_TRAILER_LINES}",
                             self._trailer_status, code=self._trailer_code)
        _parse_fields([line], self._error_status)
        return _AGAIN

    def _read_close(self) -> Any:
        buf = self._buf
        if buf:
            data = bytes(buf)
            buf.clear()
            return Body(data)
        if self._eof:
            return self._end()
        return NEED_DATA

    def _read_done(self) -> Any:
        return NEED_DATA  # ResponseParser after its final response: see ``buffered``

    def _read_broken(self) -> Any:
        raise AssertionError("broken parser")  # next_event raises the stored error first

    _READERS: Tuple[Callable[["_Parser"], Any], ...] = (
        _read_start, _read_fields, _read_length, _read_chunk_size, _read_chunk_data,
        _read_chunk_end, _read_trailer, _read_close, _read_done, _read_broken)

    def _take(self, eof_message: str) -> Any:
        """Up to ``_remaining`` buffered body bytes as a Body; NEED_DATA; an error at EOF."""
        buf = self._buf
        if not buf:
            if self._eof:
                raise self._fail(eof_message)
            return NEED_DATA
        n = min(self._remaining, len(buf))
        self._remaining -= n
        return Body(self._cut(n))

    def _cut(self, n: int) -> bytes:
        """The buffer's first ``n`` bytes, taken out of it (all of it without a copy more)."""
        buf = self._buf
        if n == len(buf):
            data = bytes(buf)
            buf.clear()
        else:
            data = bytes(buf[:n])
            del buf[:n]
        return data

    def whole_body(self) -> Optional[bytes]:
        """After a head: its length-framed body and its end in one step, if all of it
        is buffered (the usual small message); None: take it event by event."""
        if self._state != self._LENGTH:
            return None
        n = self._remaining
        if len(self._buf) < n:
            return None
        data = self._cut(n)
        self._remaining = 0
        self.steps += 1
        self._end()
        return data

    def _on_chunk(self, size: int) -> None:
        pass

    def _end(self) -> Any:
        self._state = self._START
        self._scan = self._checked = 0
        return EndOfMessage

    def _start_body(self, framing: Union[str, int]) -> None:
        self._checked = 0
        if framing == "chunked":
            self._state = self._CHUNK_SIZE
        elif framing == "close":
            self._state = self._CLOSE
        else:
            self._state = self._LENGTH
            self._remaining = int(framing)


class RequestParser(_Parser):
    """Sans-I/O HTTP/1.1 request parser.

    Events: RequestHead, then Body pieces, then EndOfMessage; then the next request's
    head (pipelining).  None means the client closed cleanly between requests.
    """

    def __init__(self, max_body: int = DEFAULT_MAX_BODY_BYTES) -> None:
        super().__init__()
        self.max_body = max_body
        self._body_total = 0
        self.framing: Union[str, int] = 0  # the last head's (request_framing)

    def refused_method(self) -> str:
        """The method of the request being read, as far as it is known ("" if not): for
        the answer to one refused before it was routed, which for a HEAD has no body."""
        if self._method is not None:
            return self._method.decode("latin-1")
        return _method_of(bytes(self._buf[:MAX_REQUEST_LINE]))

    def _start_line(self) -> Any:
        # The request line is checked as it arrives: bytes that are not HTTP (a TLS
        # ClientHello, binary) are refused at once, not at a limit.  A bad byte within
        # the first MAX_REQUEST_LINE + 1 bytes is a 400, a longer line a 414, whether
        # the line arrives whole or a byte at a time.
        buf = self._buf
        checked = self._checked
        end = buf.find(b"\r\n", checked, MAX_REQUEST_LINE + 2)
        if end >= 0:
            upto = end
        else:
            upto = min(len(buf), MAX_REQUEST_LINE + 1)
            if buf[upto - 1:upto] == b"\r":
                upto -= 1  # maybe the start of the CRLF
        if checked == 0 and upto and not _TOKEN.match(buf[:1]):
            raise self._fail("not an HTTP request")
        bad = _REQUEST_LINE_BAD.search(buf, checked, upto)
        if bad:
            byte = bad.group()
            raise self._fail(_bad_byte(byte) + " in request line; expected CRLF line endings"
                             if byte in (b"\r", b"\n") else "not an HTTP request")
        self._checked = upto
        if end < 0:
            if len(buf) >= MAX_REQUEST_LINE + 2:
                raise self._fail(f"request line too long; expected at most {MAX_REQUEST_LINE} bytes",
                                 414, code="uri_too_long")
            if self._eof:
                raise self._fail("connection closed inside the message head")
            return NEED_DATA
        self._line_end = self._scan = self._checked = end
        self._state = self._FIELDS
        return _AGAIN

    def _head_at_once(self) -> Any:
        # The usual request: its whole head is here, its request line plain.  The same
        # checks as _start_line and _read_fields, fused; anything unusual (a bad byte, a
        # limit reached, a line that is not plain) goes the step-by-step way, which says
        # what is wrong.  The parser fuzz tests compare both ways on the same bytes.
        whole = self._whole_head(MAX_REQUEST_LINE + MAX_HEADER_BYTES + 6, _PLAIN_REQUEST_LINE,
                                 MAX_REQUEST_LINE, MAX_HEADER_BYTES)
        if whole is None:
            return None
        (method, target, minor), headers = whole
        return self._head(method, target, "HTTP/1.1" if minor == b"1" else "HTTP/1.0", headers)

    def _head_limit(self) -> int:
        # The header section (its field lines with their CRLFs) is the bytes from the
        # end of the request line to the CRLF CRLF: at most MAX_HEADER_BYTES.
        return self._line_end + MAX_HEADER_BYTES + 4

    def _head_too_large(self) -> HTTPError:
        return self._fail(f"request header section too large; expected at most "
                          f"{MAX_HEADER_BYTES} bytes", 431, code="headers_too_large")

    def _too_many_fields(self) -> HTTPError:
        return self._fail(f"too many header fields; expected at most {MAX_HEADER_COUNT}", 431,
                          code="headers_too_large")

    def _parse_head(self, request_line: bytes, block: bytes) -> RequestHead:
        self._method = request_line.partition(b" ")[0]  # (the line is consumed)
        if block.count(b"\r\n") > MAX_HEADER_COUNT:
            raise self._too_many_fields()
        parts = request_line.split(b" ")
        if len(parts) != 3 or not _TOKEN.match(parts[0]) or not parts[1]:
            raise self._fail("malformed request line")
        method, target, version = parts
        if _TARGET_BAD.search(target):
            raise self._fail("invalid character in request target")
        if b"#" in target:
            raise self._fail("a request target has no fragment ('#'); expected a path and query")
        match = _VERSION.match(version)
        if not match:
            raise self._fail("malformed HTTP version")
        if match.group(1) != b"1":
            raise self._fail("only HTTP/1.0 and HTTP/1.1 are supported", 505,
                             code="http_version_not_supported")
        ver = "HTTP/1.1" if match.group(2) != b"0" else "HTTP/1.0"
        return self._head(method, target, ver, _field_block(block))

    def _head(self, method: bytes, target: bytes, ver: str,
              headers: List[Tuple[str, str]]) -> RequestHead:
        """A head whose request line and fields are valid, as a RequestHead (or the
        error its fields make: host, framing, expectations)."""
        self._method = method
        names = [k for k, _ in headers]
        if ver == "HTTP/1.1" and names.count("host") != 1:
            raise self._fail("an HTTP/1.1 request needs exactly one host header")
        framing = request_framing(ver, headers)
        if isinstance(framing, int) and framing > self.max_body:
            raise self._fail(f"request body of {framing} bytes exceeds the limit of "
                             f"{self.max_body} bytes", 413, code="request_too_large")
        connection = _header_tokens(headers, "connection") if "connection" in names else []
        keep_alive = ("close" not in connection) if ver == "HTTP/1.1" else ("keep-alive" in connection)
        expect = _header_tokens(headers, "expect") if "expect" in names else []
        if expect and (expect != ["100-continue"]):
            raise self._fail("unsupported expectation", 417, code="expectation_failed")
        self._body_total = 0
        self.framing = framing
        self._start_body(framing)
        return RequestHead(method.decode("ascii"), target.decode("ascii"), ver, headers,
                           keep_alive, bool(expect) and ver == "HTTP/1.1")

    def _on_chunk(self, size: int) -> None:
        self._body_total += size
        if self._body_total > self.max_body:
            raise self._fail(f"request body exceeds the limit of {self.max_body} bytes",
                             413, code="request_too_large")


class ResponseParser(_Parser):
    """Sans-I/O HTTP/1.x response parser for a backend's answer to ``method``.

    Events: ResponseHead (1xx heads too; skip them), Body pieces, EndOfMessage.  Call
    feed_eof() when the backend closes: a close-delimited body then ends; anything
    else incomplete raises HTTPError(502).  A 101 raises HTTPError(502): llmux does
    not support protocol upgrades.  After the final EndOfMessage the parser only
    returns NEED_DATA, and ``buffered`` > 0 means the backend sent bytes beyond its
    response (out of sync: do not reuse the connection).
    """

    _error_status = 502
    _trailer_status = 502
    _trailer_code = None

    def __init__(self, method: str) -> None:
        super().__init__()
        self.method = method
        self._interim = 0

    def _head_limit(self) -> int:
        return MAX_UPSTREAM_HEAD

    def _head_too_large(self) -> HTTPError:
        return self._fail(f"response head too large; expected at most {MAX_UPSTREAM_HEAD} bytes")

    def _head_at_once(self) -> Any:
        # The usual answer: its whole head is here, its status line and fields valid
        # (so it holds no bare CR, LF or NUL).  Anything else goes the step-by-step way.
        whole = self._whole_head(MAX_UPSTREAM_HEAD, _STATUS_LINE, MAX_UPSTREAM_HEAD, MAX_UPSTREAM_HEAD)
        return None if whole is None else self._response(*whole)

    def _too_many_fields(self) -> HTTPError:
        return self._fail(f"too many header fields; expected at most {MAX_HEADER_COUNT}")

    def _parse_head(self, status_line: bytes, block: bytes) -> ResponseHead:
        match = _STATUS_LINE.match(status_line)
        if not match:
            raise self._fail(f"malformed status line {status_line[:40]!r}")
        if block.count(b"\r\n") > MAX_HEADER_COUNT:
            raise self._too_many_fields()
        return self._response(match.groups(), block)

    def _response(self, line: Tuple[Any, ...],
                  fields: Union[bytes, List[Tuple[str, str]]]) -> ResponseHead:
        """The head of a valid status line and its fields (a header section to check,
        or checked ones), as a ResponseHead, with the body's framing set."""
        minor, code, reason_bytes = line
        ver = "HTTP/1.1" if minor == b"1" else "HTTP/1.0"
        status = int(code)
        if status == 101:
            # The connection would stop being HTTP: nothing llmux could relay.  An error
            # also makes the relay close the connection instead of pooling it.
            raise self._fail("backend switched protocols (101); expected a final http/1.1 "
                             "response (llmux does not support protocol upgrades)")
        headers = _field_block(fields, 502) if isinstance(fields, bytes) else fields
        names = {k for k, _ in headers}
        connection = _header_tokens(headers, "connection") if "connection" in names else []
        keep_alive = ("close" not in connection) if ver == "HTTP/1.1" else ("keep-alive" in connection)
        reason = (reason_bytes or b"").decode("latin-1")
        if status < 200:
            self._interim += 1
            if self._interim > MAX_INTERIM_RESPONSES:
                raise self._fail(f"too many interim (1xx) responses; expected at most "
                                 f"{MAX_INTERIM_RESPONSES}")
            self._state = self._START  # the final head is still due
            return ResponseHead(status, reason, ver, headers, keep_alive, 0)
        framing = response_framing(self.method, status, headers)
        if framing == "close":
            keep_alive = False
        elif "transfer-encoding" in names and "content-length" in names:
            keep_alive = False  # RFC 9112 section 6.1: chunked wins, but a smuggling shape
        elif (status in (204, 304) or self.method == "HEAD") and ("transfer-encoding" in names or any(
                k == "content-length" and v.strip() != "0" for k, v in headers)):
            # No body by rule, but the head announces one (a 204's is forbidden, RFC 9110
            # section 8.6; a HEAD's or 304's describes the GET's): a server that answered as
            # it would GET sends it anyway, and the next request on the connection, any
            # client's, would read it as its own answer.
            keep_alive = False
        self._start_body(framing)
        return ResponseHead(status, reason, ver, headers, keep_alive, framing)

    def _end(self) -> Any:
        self._state = self._DONE
        return EndOfMessage

    def _eof_between_messages(self) -> Any:
        raise self._fail("connection closed before a response head")


# Writers: bytes for the wire, no I/O.

# (HTTPStatus has the rest; a status it lacks is "Unknown".)
_REASONS = {200: "OK", 204: "No Content", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
            404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout", 409: "Conflict",
            413: "Content Too Large", 414: "URI Too Long", 417: "Expectation Failed",
            431: "Request Header Fields Too Large", 500: "Internal Server Error",
            501: "Not Implemented", 502: "Bad Gateway", 503: "Service Unavailable",
            504: "Gateway Timeout", 505: "HTTP Version Not Supported"}


def encode_chunk(data: bytes) -> bytes:
    """One chunk of a chunked body; never call it with empty data (that ends the body)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def json_response(status: int, obj: Any, *, keep_alive: bool = True,
                  headers: Sequence[Tuple[str, str]] = (), head_only: bool = False,
                  http10: bool = False) -> bytes:
    """A complete response with a JSON body."""
    body = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
    return local_response(status, body, "application/json", keep_alive=keep_alive,
                          headers=headers, head_only=head_only, http10=http10)


def _reason_phrase(status: int) -> str:
    reason = _REASONS.get(status)
    if reason is None:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
    return reason


def local_response(status: int, body: bytes, content_type: Optional[str], *,
                   keep_alive: bool = True, headers: Sequence[Tuple[str, str]] = (),
                   head_only: bool = False, http10: bool = False) -> bytes:
    """A complete response llmux writes itself; a 204 gets no body and, as RFC 9110
    section 8.6 requires, no Content-Length.  ``head_only``: the answer to a HEAD (its
    Content-Length the GET's).  ``http10``: to an HTTP/1.0 client, whose connection
    closes unless the answer says keep-alive (RFC 9112 section 9.3)."""
    lines = [f"HTTP/1.1 {status} {_reason_phrase(status)}"]
    if status != 204:
        if content_type is not None:
            lines.append(f"content-type: {content_type}")
        lines.append(f"content-length: {len(body)}")
    lines.extend(f"{k}: {v}" for k, v in headers)
    if not keep_alive:
        lines.append("connection: close")
    elif http10:
        lines.append("connection: keep-alive")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only or status == 204 else head + body


def error_response(e: LLMuxError, keep_alive: bool = False,
                   headers: Sequence[Tuple[str, str]] = (), head: Optional["RequestHead"] = None,
                   method: str = "") -> bytes:
    """The one way an error becomes a response: its status, its JSON, its headers (and
    ``headers``: the request's CORS ones); as an answer to ``head``, when there is one
    (no body for a HEAD, keep-alive said to HTTP/1.0), or to a ``method`` whose head
    was refused."""
    return json_response(e.status, e.to_json(), keep_alive=keep_alive,
                         headers=[*e.headers, *headers],
                         head_only=(head.method if head is not None else method) == "HEAD",
                         http10=head is not None and head.version == "HTTP/1.0")


def error_event(e: LLMuxError) -> bytes:
    """An error as an SSE event, for a stream whose 200 head was already sent: the shape
    the openai client raises on (a ``data:`` event whose object has ``error``)."""
    return b"data: " + json.dumps(e.to_json(), separators=(",", ":")).encode() + b"\n\n"


def held_error(e: LLMuxError, chunked: bool, prefix: bytes = b"") -> bytes:
    """The end of a held stream that failed: its error event, then (chunked) the body's end."""
    event = prefix + error_event(e)
    return encode_chunk(event) + b"0\r\n\r\n" if chunked else event


def sse_head(chunked: bool, keep_alive: bool, headers: Sequence[Tuple[str, str]] = ()) -> bytes:
    """The head of an event stream llmux writes itself (/llmux/events, a held request);
    an HTTP/1.0 client (not ``chunked``) reads it until the connection closes."""
    lines = ["HTTP/1.1 200 OK", "content-type: text/event-stream", "cache-control: no-cache",
             "x-accel-buffering: no", *(f"{k}: {v}" for k, v in headers)]
    if chunked:
        lines.append("transfer-encoding: chunked")
    if not (chunked and keep_alive):
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def cors_headers(origins: Sequence[str], origin: Optional[str]) -> List[Tuple[str, str]]:
    """The CORS headers of any response to a request from ``origin`` (its Origin header,
    or None): Access-Control-Allow-Origin when the origin is allowed, and Vary: Origin
    whenever the answer depends on it (the Fetch standard, "CORS protocol and HTTP
    caches"), so a cache never serves one origin's answer to another."""
    if "*" in origins:
        return [("access-control-allow-origin", "*")]
    if origin is not None and origin.lower() in origins:
        return [("access-control-allow-origin", origin), ("vary", "origin")]
    return [("vary", "origin")]


def is_preflight(head: RequestHead) -> bool:
    """A CORS preflight: OPTIONS with Origin and Access-Control-Request-Method (Fetch
    standard, "CORS-preflight request").  A plain OPTIONS is proxied like any request."""
    return (head.method == "OPTIONS" and head.get("origin") is not None
            and head.get("access-control-request-method") is not None)


def preflight_response(head: RequestHead, origins: Sequence[str], keep_alive: bool = True) -> bytes:
    """llmux's own 204 answer to a preflight.  Without an allowed origin it carries no
    Access-Control-Allow-* header, and the browser refuses the request."""
    headers = cors_headers(origins, head.get("origin"))
    if any(k == "access-control-allow-origin" for k, _ in headers):
        asked = head.get("access-control-request-headers")
        headers += [("access-control-allow-methods", CORS_ALLOW_METHODS),
                    ("access-control-allow-headers", asked.strip() if asked else CORS_DEFAULT_HEADERS),
                    ("access-control-max-age", str(CORS_MAX_AGE)),
                    ("vary", "access-control-request-headers")]  # echoed just above
    return local_response(204, b"", None, keep_alive=head.keep_alive and keep_alive, headers=headers,
                          http10=head.version == "HTTP/1.0")


def forward_headers(headers: List[Tuple[str, str]], drop: Iterable[str] = ()) -> List[Tuple[str, str]]:
    """Headers minus hop-by-hop ones, those named in Connection, and ``drop``."""
    skip = _skipped(headers, HOP_BY_HOP.union(drop) if drop else HOP_BY_HOP)
    return [(k, v) for k, v in headers if k not in skip]


def _skipped(headers: List[Tuple[str, str]], skip: FrozenSet[str]) -> FrozenSet[str]:
    """``skip`` (hop-by-hop headers, and more), and the headers Connection names."""
    for k, _ in headers:
        if k == "connection":
            return skip.union(_header_tokens(headers, "connection"))
    return skip


def _field_lines(headers: List[Tuple[str, str]], skip: FrozenSet[str]) -> List[str]:
    """The lines ``name: value`` (no CRLF) of forward_headers(headers) less ``skip``."""
    skip = _skipped(headers, skip)
    return [f"{k}: {v}" for k, v in headers if k not in skip]


# ───────────────────────────────── relay and streaming ──────────────────────────────────
# One request out, one response back.  Every piece read from the backend is written to
# the client and drained before the next read, so SSE events are never held back and a
# slow client slows the backend instead of filling memory.


class _Cut(Exception):
    """The response had started when the backend failed: the client's stream is cut."""


class _Timeout(Exception):
    """A read deadline passed."""


class _NotSent(ConnectionError):
    """A backend connection spoke or closed while the request begun on it waited its turn,
    unwritten: what came is not its answer, and the backend never saw it (relay sends it
    on a new connection, whatever its method)."""


class _LazyTimer:
    """A deadline that moves without a timer call: the owner sets ``when`` (at(), or the
    attribute itself on a hot path, forward only), and the one timer, when it fires
    early, sleeps on to it.  Only a deadline earlier than the timer's replaces it.  When
    it fires and ``armed()`` holds, ``expired()`` runs; else it stops until at() again."""

    __slots__ = ("loop", "when", "_armed", "_expired", "_handle", "_at")

    def __init__(self, loop: asyncio.AbstractEventLoop, armed: Callable[[], bool],
                 expired: Callable[[], None]) -> None:
        self.loop = loop
        self.when = 0.0
        self._armed = armed
        self._expired = expired
        self._handle: Optional[asyncio.TimerHandle] = None
        self._at = 0.0  # when the handle fires

    def at(self, when: float) -> None:
        self.when = when
        if self._handle is not None:
            if self._at <= when:
                return  # it fires first, and sleeps on to ``when``
            self._handle.cancel()
        self._handle = self.loop.call_at(when, self._fire)
        self._at = when

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        if not self._armed():
            return
        if self.loop.time() < self.when:
            self._handle = self.loop.call_at(self.when, self._fire)
            self._at = self.when
            return
        self._expired()


class _ReadDeadline:
    """One connection's read timeout, without a timer call per read (a _LazyTimer): at
    the deadline, if still armed, the reader is poisoned with the exception given."""

    __slots__ = ("reader", "exc", "timer")

    def __init__(self, loop: asyncio.AbstractEventLoop, reader: asyncio.StreamReader) -> None:
        self.reader = reader
        self.exc: Union[Exception, Type[Exception], None] = None
        self.timer = _LazyTimer(loop, lambda: self.exc is not None, self._expired)

    def arm(self, timeout: float, exc: Union[Exception, Type[Exception]]) -> None:
        """``exc``: an exception, or its class (made only if it is raised)."""
        self.exc = exc
        self.timer.at(self.timer.loop.time() + timeout)

    def disarm(self) -> None:
        self.exc = None

    def close(self) -> None:
        self.exc = None
        self.timer.cancel()

    def _expired(self) -> None:
        exc, self.exc = self.exc, None
        if exc is not None:
            self.reader.set_exception(exc() if isinstance(exc, type) else exc)


async def read_within(reader: asyncio.StreamReader, timeout: Optional[float],
                      exc: Exception, n: int = READ_SIZE,
                      deadline: Optional[_ReadDeadline] = None) -> bytes:
    """``reader.read(n)``, raising ``exc`` if nothing arrives within ``timeout`` seconds.

    On timeout the reader is poisoned with ``exc``: the caller is expected to give up
    on the connection.  A timer handle costs a few microseconds; asyncio.wait_for would
    create a task for every read.
    """
    # Bytes already buffered need no timer.  (A private attribute, so only a shortcut:
    # without it every read just arms the timer.)
    if timeout is None or getattr(reader, "_buffer", None):
        return await reader.read(n)
    if deadline is not None:  # the connection's own: no timer call (see _ReadDeadline)
        deadline.arm(timeout, exc)
        try:
            return await reader.read(n)
        finally:
            deadline.disarm()
    handle = asyncio.get_running_loop().call_later(timeout, reader.set_exception, exc)
    try:
        return await reader.read(n)
    finally:
        handle.cancel()


class _Upstream(asyncio.Protocol):
    """One keep-alive connection to a backend, serving one request at a time.

    The relay coroutine awaits the response head; after it has written the client's
    head it calls pipe(), and from then on data_received parses each piece and writes
    it straight to the client transport: no task switch per SSE event.  Back-pressure
    is transport-level: a client that stops reading pauses reading from the backend.

    Reuse (DESIGN.md invariant 12): ``in_sync`` is set only when the response ended
    exactly at its framing with no byte left over, and the whole request had left our
    write buffer before the response head came (a backend that answers before reading
    the body may take the rest of it for the next request).  Bytes arriving while idle
    close the connection; UpstreamPool.get also peeks for them, and for an EOF or reset
    not yet seen by the loop, before it hands an idle connection out again.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: Optional[socket.socket] = None) -> None:
        self.loop = loop
        self.sock = sock  # ours, so that the pool can peek at it before reuse
        self._poll: Optional[Any] = None  # select.poll of sock, for pending()
        if sock is not None and hasattr(select, "poll"):
            self._poll = select.poll()
            self._poll.register(sock.fileno(), select.POLLIN | select.POLLPRI)
        self.transport: Optional[asyncio.Transport] = None
        self.closed = False
        self.reused = False
        self.received = False  # any byte of the current response arrived
        self.in_sync = False  # the last exchange provably ended in step (see above)
        self.idle_since = 0.0  # loop time at which the pool took it back
        self._written_late = False  # request bytes still unsent when the head came
        self.parser: Optional[ResponseParser] = None
        self.waiter: Optional["asyncio.Future[Any]"] = None
        self.head: Optional[ResponseHead] = None
        self.client: Optional[asyncio.WriteTransport] = None
        self.chunked = False
        self.timeout: Optional[float] = None
        # The silence timeout; left running between exchanges on a pooled connection.
        self._timer = _LazyTimer(loop, self._timing, self._timed_out)
        self._paused = False
        self._body: Optional[memoryview] = None  # the request body's part not yet written
        self._write_paused = False
        self._answer: Optional[_Answer] = None  # where the head goes as it comes (begin)
        self.answering = False  # the head went to the client as it came: the body follows
        self.keep_client = False  # whether the client connection may be kept (answering)
        self.sent = False  # the current request was handed to the transport (begin)
        self._request: Optional[Sequence[bytes]] = None  # begun, waiting for its turn
        self._inline = False  # begin's own call of _send (not a later turn's)

    # -- driven by relay() --

    def begin(self, method: str, request: Sequence[bytes], timeout: Optional[float],
              answer: Optional["_Answer"] = None,
              turns: Optional["TurnBudget"] = None) -> "asyncio.Future[Any]":
        """Send a request (its pieces, see upstream_request); the returned future resolves
        to the final ResponseHead.  With ``answer``, the head is instead written to its
        client from data_received as it comes, the body follows it (``answering`` is set),
        and the future resolves at the body's end: a request costs one task switch less,
        and in a burst its answer starts without waiting for a turn of the loop.  With
        ``turns``, the request is written when its turn comes (TurnBudget.start); until
        then ``sent`` is False, and a failure of the connection meanwhile (the backend
        closed it) reached the backend with nothing."""
        assert self.transport is not None and self.parser is None
        self.parser = ResponseParser(method)
        self.waiter = self.loop.create_future()
        self.head = self.client = None
        self.received = False
        self.in_sync = False
        self._written_late = False
        self._answer = answer
        self.answering = False
        self.timeout = timeout
        self.sent = False
        self._request = request
        if turns is None:
            self._send()
        else:
            self._inline = True  # (start() may call _send at once: nothing to check again)
            turns.start(self._send)
            self._inline = False
        return self.waiter

    def _send(self) -> bool:
        """Write the request begun (now, or in its turn); False if it was given up first."""
        request, self._request = self._request, None
        if request is None or self.closed or self.waiter is None or self.waiter.done():
            return False  # cancelled (relay closes the connection) or failed while it waited
        if not self._inline and self.pending():
            # It waited its turn: a byte, an EOF or a reset may have come since the pool
            # checked it that the loop has not read yet (the turn runs first in a step).
            self._stale()
            return False
        try:
            self.sent = True
            self._touch()
            # No drain: a backend that never reads the body must not stop us from reading
            # its answer; the timeout bounds the whole exchange.  A small request goes in
            # one write (one segment): head and body apart cost a 40 ms delayed-ACK stall
            # per request against some backends.  A large body is not copied to join it.
            head, body = request
            assert self.transport is not None
            if len(head) + len(body) <= UPSTREAM_JOIN_BYTES:
                self.transport.write(head + body)
            else:
                self.transport.write(head)
                self._body = memoryview(body)
                self._feed()
        except Exception as e:  # a bug, here in a turn's callback: the relay raises it
            self._end(e)
            self.close()
        return True

    def _feed(self) -> None:
        """Write the body on, a slice at a time, until the transport's buffer is full
        (pause_writing, called from within write) or the body is all written; at most
        UPSTREAM_FEED_STEP bytes a step (the kernel took 6 MB at once, 5 ms of copying):
        the rest in a later step of the loop."""
        budget = UPSTREAM_FEED_STEP
        while self._body is not None and not self._write_paused and not self.closed:
            if budget <= 0:
                self.loop.call_soon(self._feed)
                return
            budget -= UPSTREAM_SLICE
            assert self.transport is not None
            if self.transport.is_closing():
                self._body = None  # a write failed: connection_lost is on its way
                return
            piece, rest = self._body[:UPSTREAM_SLICE], self._body[UPSTREAM_SLICE:]
            self._body = rest if rest else None
            self.transport.write(piece)

    def pipe(self, client: asyncio.WriteTransport, chunked: bool, head: bytes,
             flow: Optional["_ClientProtocol"] = None) -> "asyncio.Future[Any]":
        """Write ``head`` and stream the body to ``client``; the future resolves at its end."""
        self._attach(client, chunked, flow)
        self.waiter = self.loop.create_future()
        self._pump(head)
        return self.waiter

    def _attach(self, client: asyncio.WriteTransport, chunked: bool,
                flow: Optional["_ClientProtocol"]) -> None:
        """From here on the body goes to ``client``; ``flow``, its connection, learns that
        its answer has begun and pauses this one while its buffer is full."""
        self.client = client
        self.chunked = chunked
        if flow is not None:
            flow.responding = True
            flow.relayed = True
            flow.upstream = self
            if flow.write_paused:
                self.pause()

    def pause(self) -> None:
        """The client's buffer is full: stop reading the backend (and its timeout)."""
        self._paused = True
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume(self) -> None:
        self._paused = False
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()
            self._touch()

    def close(self) -> None:
        self.closed = True
        self._body = None
        self._stop_timer()
        if self.transport is not None:
            self.transport.abort()  # at once: the engine sees the disconnect and stops

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        self._feed()

    # -- asyncio callbacks --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.parser is None:  # bytes on an idle connection: the backend is confused
            self.close()
            return
        if not self.sent:  # before the request was written (it waits its turn)
            self._stale()
            return
        self.received = True
        if self.timeout is not None:
            self._timer.when = self.loop.time() + self.timeout  # forward: no timer call
        self.parser.feed(data)
        self._pump()

    def eof_received(self) -> bool:
        if self.parser is not None:
            if not self.sent:
                self._stale()
                return False
            self.parser.feed_eof()
            self._pump()
        return False

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self.closed = True
        self._body = None
        self._stop_timer()
        if self.parser is not None and not self.sent:
            self._stale()
            return
        if self.parser is not None and exc is not None:
            self._drain_socket()
        if self.parser is not None:
            self.parser.feed_eof()
            self._pump()

    # -- internals --

    def _drain_socket(self) -> None:
        """A write failed (the backend reset the connection as it answered without reading
        all of the body): the transport stops reading at once, but what the backend said
        first may still wait in the kernel.  It is read now (the socket is still open
        while connection_lost runs), up to MAX_DRAIN_BYTES, so its answer is not lost."""
        sock, left = self.sock, MAX_DRAIN_BYTES
        while sock is not None and left > 0 and self.parser is not None:
            try:
                data = sock.recv(min(left, READ_SIZE))
            except OSError:  # nothing more (BlockingIOError), or the reset itself
                return
            if not data:
                return
            left -= len(data)
            self.received = True
            self.parser.feed(data)
            self._pump()

    def _pump(self, prefix: bytes = b"") -> None:
        parser = self.parser
        out: List[bytes] = [prefix] if prefix else []
        if parser is None:
            if out and self.client is not None:
                self.client.write(prefix)
            return
        try:
            while True:
                if self.client is None and self.head is not None:
                    return  # the body waits in the parser until pipe() (an EOF too)
                event = parser.next_event()
                if event is NEED_DATA:
                    return
                kind = type(event)
                if kind is Body:
                    if event.data:  # an empty chunk would end the client's body
                        out.append(encode_chunk(event.data) if self.chunked else event.data)
                elif kind is ResponseHead:
                    if event.status < 200:
                        continue  # 100 Continue, 103 Early Hints: ours to absorb
                    # The backend answered before it had all of the request: it may yet
                    # read the rest as a new request, so this connection is not reused.
                    self._written_late = self._unsent() > 0
                    self.head = event
                    if self._answer is not None:
                        out.append(self._answer_head(self._answer, event))
                        whole = parser.whole_body()  # it came with its head: no events
                        if whole is None:
                            continue
                        if whole:
                            out.append(encode_chunk(whole) if self.chunked else whole)
                        self._done(parser, out)
                        return
                    self._settle(event)
                    if self.client is None:
                        return  # body events wait in the parser until pipe()
                else:
                    self._done(parser, out)
                    return
        except HTTPError as e:
            self._end(e)
        except Exception as e:  # a bug, here in a callback: the relay raises it (logged
            # once, a 500), instead of waiting for the silence timeout
            self._end(e)
            self.close()
        finally:
            if out and self.client is not None:
                self.client.write(b"".join(out))

    def _done(self, parser: ResponseParser, out: List[bytes]) -> None:
        """The answer's end (EndOfMessage): the last chunk, and whether in step."""
        if self.chunked:
            out.append(b"0\r\n\r\n")
        # O(1): bytes past the framing, or request bytes still unsent, mean the next
        # exchange could read what belongs to this one.
        self.in_sync = not (parser.buffered or self._written_late or self._unsent())
        self._end(None)

    def _answer_head(self, answer: "_Answer", resp: ResponseHead) -> bytes:
        """The client's head for ``resp``, as relay() would have written it; from here on
        this connection pipes to the client (back-pressure included)."""
        # Its server's shutdown, if it began since the request came, closes the connection.
        server = getattr(answer.flow, "_llmux_server", None)  # (None: not a _ClientProtocol)
        keep = answer.keep_alive and not (server is not None and server.closing)
        data, chunked, self.keep_client = client_response_head(resp, answer.client_10, keep, answer.cors)
        self._attach(answer.transport, chunked, answer.flow)
        self.answering = True
        return data

    def pending(self) -> bool:
        """Whether this idle connection's socket has anything to read (_pending): with
        poll(2) where there is one, a third of a peek's cost (no exception)."""
        if self._poll is None:
            return _pending(self.sock)
        return bool(self._poll.poll(0))  # POLLIN (a byte or an EOF), POLLERR, POLLHUP

    def _stale(self) -> None:
        """The connection spoke or closed before the request begun on it was written:
        closed, and the request fails as never sent (_NotSent)."""
        self._request = None
        self._end(_NotSent("the backend connection closed or spoke before the request "
                           "was written"))
        self.close()

    def _unsent(self) -> int:
        """Request bytes not yet handed to the kernel: in the transport, or not yet given it."""
        transport = self.transport
        buffered = transport.get_write_buffer_size() if transport is not None else 0
        return buffered + (len(self._body) if self._body is not None else 0)

    def _settle(self, result: Any) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            if isinstance(result, BaseException):
                waiter.set_exception(result)
            else:
                waiter.set_result(result)

    def _end(self, error: Optional[BaseException]) -> None:
        self.parser = None  # the timer, when it fires, sees no exchange and stops (_timing):
        # left running, the next exchange on this connection moves its deadline, not a timer
        self._settle(error if error is not None else None)

    def _touch(self) -> None:
        """(Re)arm the silence timeout.  data_received only moves its deadline forward;
        a timer left from an exchange with a longer timeout (a reload lowered it) is
        replaced, as it would fire late."""
        if self.timeout is not None:
            self._timer.at(self.loop.time() + self.timeout)

    def _timing(self) -> bool:
        """Whether silence counts now: in an exchange whose request was written, not
        paused, with a timeout.  (Idle, or waiting its turn, the timer left from the last
        exchange stops when it fires; the write re-arms it.)"""
        return self.sent and self.parser is not None and not self._paused and self.timeout is not None

    def _timed_out(self) -> None:
        self._end(_Timeout())
        self.close()

    def _stop_timer(self) -> None:
        self._timer.cancel()


def _pending(sock: Optional[socket.socket]) -> bool:
    """Whether an idle backend socket has anything to read: a byte, an EOF or an error.
    Any of these means the connection is out of step or going away; the loop may not
    have run its reader callback yet, so the kernel is asked directly (one syscall)."""
    if sock is None:
        return False
    try:
        sock.recv(1, socket.MSG_PEEK)
    except (BlockingIOError, InterruptedError):
        return False  # nothing there: the backend has said nothing since the response
    except OSError:
        return True  # reset
    return True  # a byte, or b"" for EOF


_CONNECTING = (errno.EINPROGRESS, errno.EAGAIN, errno.EINTR)  # a non-blocking connect goes on
_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE)  # this process's table, or the system's, is full


async def _connect_within(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                          address: Tuple[str, int], timeout: float) -> None:
    """Connect a non-blocking socket; OSError if that fails, asyncio.TimeoutError if it is
    not done within ``timeout``.  A future, a writer callback and a timer: before Python
    3.12, asyncio.wait_for made a task for each connection, and a burst after a switch
    (every request on a new backend connection) waited two more turns of the loop each."""
    err = sock.connect_ex(address)
    if err == 0:
        return
    if err not in _CONNECTING:
        raise OSError(err, os.strerror(err))
    fd = sock.fileno()
    done: "asyncio.Future[None]" = loop.create_future()

    def writable() -> None:
        if not done.done():
            done.set_result(None)

    def expired() -> None:
        if not done.done():
            done.set_exception(asyncio.TimeoutError())

    loop.add_writer(fd, writable)
    timer = loop.call_later(timeout, expired)
    try:
        await done
    finally:  # before the caller may close the socket (and its fd number be reused)
        loop.remove_writer(fd)
        timer.cancel()
    err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if err:
        raise OSError(err, os.strerror(err))


class UpstreamPool:
    """Keep-alive connections to the backends, per port."""

    def __init__(self, log: Log, host: str = "127.0.0.1") -> None:
        self.log = log
        self.host = host
        self._idle: Dict[int, List[_Upstream]] = {}
        self._sweep: Optional[asyncio.TimerHandle] = None  # closes what is too old to reuse

    def idle(self, port: int) -> Optional[_Upstream]:
        """get()'s idle connection, without a coroutine: None if there is none."""
        idle = self._idle.get(port)
        if not idle:
            return None
        now = idle[0].loop.time()
        while idle:
            conn = idle.pop()
            if now - conn.idle_since > UPSTREAM_IDLE_REUSE_SECS:
                # The list is in the order connections came back: the rest are older.
                for old in idle:
                    old.close()
                idle.clear()
                conn.close()
            elif not conn.closed and not conn.pending():
                conn.reused = True
                return conn
            else:
                conn.close()
        return None

    async def get(self, port: int, model: str) -> _Upstream:
        """An idle connection to ``port`` (``reused`` set), or a new one.

        An idle connection is handed out only if it is young enough (see
        UPSTREAM_IDLE_REUSE_SECS) and its socket has nothing pending: no byte, no EOF, no
        reset.  What it returns has had nothing written to it since it was checked."""
        conn = self.idle(port)
        if conn is not None:
            return conn
        loop = asyncio.get_running_loop()
        self.log.debug("upstream.connect", model=model, port=port)
        sock = await self._socket(model, port)
        try:
            _, conn = await self._connect(loop, sock, port)
        except asyncio.TimeoutError:
            sock.close()
            raise UpstreamError(f"model '{model}' backend at {self.host}:{port} did not accept "
                                f"a connection within {UPSTREAM_CONNECT_TIMEOUT:g}s",
                                status=504, code="upstream_timeout") from None
        except OSError as e:
            sock.close()
            raise UpstreamError(f"model '{model}' backend at {self.host}:{port} is not "
                                f"reachable: {_reason(e)}", code="upstream_unavailable") from None
        except BaseException:
            sock.close()
            raise
        return conn

    async def _socket(self, model: str, port: int) -> socket.socket:
        """A new non-blocking socket.  Out of fds, the idle connections (of every port)
        are closed first and it is tried once more: they are what llmux can give up."""
        for attempt in (0, 1):
            try:
                sock = socket.socket(socket.AF_INET6 if ":" in self.host else socket.AF_INET,
                                     socket.SOCK_STREAM)
                sock.setblocking(False)
                return sock
            except OSError as e:
                if attempt == 0 and e.errno in _OUT_OF_FDS:
                    self.give_up_idle(_reason(e))
                    # Their transports close their sockets in the loop's next turn; so do
                    # those a request before this one gave up in this turn.
                    await asyncio.sleep(0)
                    continue
                raise UpstreamError(f"llmux could not open a connection to model '{model}' "
                                    f"backend at {self.host}:{port}: {_reason(e)}; retry later",
                                    status=503, code="too_many_open_files",
                                    headers=[("retry-after", str(RETRY_AFTER_BUSY))]) from None
        raise AssertionError("unreachable")

    async def accepts(self, port: int, model: str) -> bool:
        """Whether ``model``'s backend at ``port`` accepts a new connection now (closed at once);
        True when llmux cannot even try (out of fds: that says nothing of the backend)."""
        try:
            sock = await self._socket(model, port)
        except UpstreamError as e:
            self.log.warning("model.backend_check_failed", model=model, reason=e.message)
            return True
        try:
            await _connect_within(asyncio.get_running_loop(), sock, (self.host, port),
                                  UPSTREAM_CONNECT_TIMEOUT)
            return True
        except (OSError, asyncio.TimeoutError):
            return False
        finally:
            sock.close()

    def _idle_count(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    def give_up_idle(self, reason: str) -> None:
        """Out of fds: close every idle connection (of every port), what llmux can give up
        to open a backend connection, accept a client or start a hook."""
        count = self._idle_count()
        if count:
            self.log.warning("upstream.fds", reason=reason, closed_idle=count)
            self.close_all()

    async def _connect(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                       port: int) -> Tuple[asyncio.BaseTransport, _Upstream]:
        await _connect_within(loop, sock, (self.host, port), UPSTREAM_CONNECT_TIMEOUT)
        return await loop.create_connection(lambda: _Upstream(loop, sock), sock=sock)

    def put(self, port: int, conn: _Upstream) -> None:
        """Return a connection whose last exchange ended in sync (``conn.in_sync``)."""
        idle = self._idle.setdefault(port, [])
        if conn._paused:
            # A slow client paused it as the answer's last bytes went out (after the end of
            # the exchange, so nothing resumed it): pooled paused, the next exchange on it
            # read nothing and its silence timeout, paused too, never fired.
            conn.resume()
        if len(idle) < MAX_IDLE_UPSTREAM and not conn.closed and conn.in_sync:
            conn.idle_since = conn.loop.time()
            idle.append(conn)
            if self._sweep is None:
                self._sweep = conn.loop.call_later(UPSTREAM_IDLE_REUSE_SECS, self._sweep_idle)
        else:
            conn.close()

    def _sweep_idle(self) -> None:
        """Close the idle connections too old to be handed out again (get() would close
        them only when asked for their port): each holds an fd, and the backend a slot."""
        self._sweep = None
        loop = asyncio.get_running_loop()
        now = loop.time()
        oldest: Optional[float] = None
        for port, idle in list(self._idle.items()):
            while idle and now - idle[0].idle_since > UPSTREAM_IDLE_REUSE_SECS:
                idle.pop(0).close()  # oldest first: the list is in the order they came back
            if idle:
                oldest = idle[0].idle_since if oldest is None else min(oldest, idle[0].idle_since)
            else:
                del self._idle[port]
        if oldest is not None:
            self._sweep = loop.call_at(oldest + UPSTREAM_IDLE_REUSE_SECS + 0.001, self._sweep_idle)

    def close_port(self, port: int) -> None:
        """Forget the idle connections to ``port`` (its model went to sleep)."""
        for conn in self._idle.pop(port, []):
            conn.close()

    def close_all(self) -> None:
        for port in list(self._idle):
            self.close_port(port)
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None


_REQUEST_DROP = HOP_BY_HOP.union({"host", "content-length", "expect"})


def upstream_request(head: RequestHead, body: bytes, port: int) -> Tuple[bytes, bytes]:
    """The request as sent to the backend: HTTP/1.1, keep-alive, re-framed by length.
    The head and the body come back apart, to be written one after the other: joining
    them would copy a body of up to max_body_bytes once more."""
    lines = [f"{head.method} {head.target} HTTP/1.1\r\nhost: 127.0.0.1:{port}"]
    lines += _field_lines(head.headers, _REQUEST_DROP)
    if body or head.method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), body


_RESPONSE_DROP = HOP_BY_HOP.union({"content-length", "access-control-allow-origin",
                                   "access-control-allow-credentials"})


def client_response_head(resp: ResponseHead, client_10: bool, keep_alive: bool,
                         cors: Sequence[Tuple[str, str]] = ()) -> Tuple[bytes, bool, bool]:
    """The response head for the client, whether to re-chunk the body, and whether
    the client connection may be kept (an HTTP/1.0 client reads until close).
    ``cors`` (cors_headers) is added unless the backend answered CORS itself."""
    open_ended = resp.framing in ("chunked", "close")
    # RFC 9110 sections 8.6 and 15.3.5: a 204 carries no Content-Length, and neither
    # forwarded 204 nor 304 a body; a 304's length describes a body nobody sends.
    no_body = resp.status in (204, 304)
    lines = [f"HTTP/1.1 {resp.status} {resp.reason}"]
    # llmux's cors_origins decide who may read an answer, not the backend's own CORS
    # headers (llama-server echoes any Origin; vLLM allows "*" by default): they go.
    lines += _field_lines(resp.headers, _RESPONSE_DROP)
    if not (open_ended or no_body):
        # One Content-Length, however the backend wrote it (`3, 3`, twice: RFC 9110 8.6
        # lets a recipient that checked them send one).  The parser checked they agree;
        # for HEAD it is the length of the body a GET would have, so it is the backend's.
        length = resp.framing if type(resp.framing) is int and resp.framing else \
            _content_length(resp.headers, 502)  # (a HEAD's, or 0)
        if length is not None:
            lines.append(f"content-length: {length}")
    lines += [f"{k}: {v}" for k, v in cors]
    # A stream (SSE, or any body of unknown length) must not be buffered by an nginx
    # put in front of llmux: it honours this header (proxy_buffering per response).
    if open_ended and not no_body and all(k != "x-accel-buffering" for k, _ in resp.headers):
        lines.append("x-accel-buffering: no")
    chunked = open_ended and not client_10
    if chunked:
        lines.append("transfer-encoding: chunked")
    elif open_ended:
        keep_alive = False
    if not keep_alive:
        lines.append("connection: close")
    elif client_10:
        lines.append("connection: keep-alive")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"), chunked, keep_alive


class _Answer(NamedTuple):
    """Where a backend's answer goes, for _Upstream.begin to relay as it comes."""
    transport: asyncio.WriteTransport
    client_10: bool  # an HTTP/1.0 client
    keep_alive: bool  # the client asked to keep its connection
    cors: Sequence[Tuple[str, str]]
    flow: Optional["_ClientProtocol"]


class RelayResult(NamedTuple):
    status: int
    keep_alive: bool  # whether the client connection may carry another request
    error: Optional[LLMuxError] = None  # a held stream's backend said no (see relay)


class _Sink:
    """Stands in for a client transport to keep the first ``limit`` bytes of a body;
    ``full`` resolves when it has them (the reader stops there: the rest is not read)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.parts: List[bytes] = []
        self.size = 0
        self.over = False
        self.full: "asyncio.Future[None]" = asyncio.get_running_loop().create_future()

    def write(self, data: bytes) -> None:
        if self.size + len(data) > self.limit:
            self.over = True  # some of it was not kept
        if self.size < self.limit:
            self.parts.append(data[:self.limit - self.size])
            self.size += len(self.parts[-1])
        if self.size >= self.limit and not self.full.done():
            self.full.set_result(None)

    def is_closing(self) -> bool:
        return False


async def _read_answer(pool: "UpstreamPool", port: int, conn: "_Upstream", resp: ResponseHead,
                       limit: int, timeout: Optional[float]) -> Tuple[bytes, bool]:
    """A backend's body that llmux reads itself instead of relaying it: up to ``limit``
    bytes, for up to ``timeout`` seconds.  Returns what came and whether it was all of it.
    A connection left mid-body is closed; one that ended in step goes back to the pool.
    A broken body raises (HTTPError)."""
    sink = _Sink(limit)
    body_done = conn.pipe(cast(asyncio.WriteTransport, sink), False, b"")
    await asyncio.wait([body_done, sink.full], timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    ended = body_done.done()
    if ended:
        body_done.result()
    if ended and resp.keep_alive and conn.in_sync and not conn.closed:
        pool.put(port, conn)
    else:
        conn.close()
        _abandon(body_done)
    return b"".join(sink.parts), ended and not sink.over


def _abandon(fut: "asyncio.Future[Any]") -> None:
    """A body read we stopped waiting for: closing its connection ends it, maybe with an
    error that nobody wants (retrieved here, so it is not reported as lost)."""
    fut.add_done_callback(lambda f: f.cancelled() or f.exception())


def _is_sse(resp: ResponseHead) -> bool:
    return "text/event-stream" in "".join(v for k, v in resp.headers if k == "content-type").lower()


async def _relay_as_event(pool: "UpstreamPool", port: int, model: str, conn: "_Upstream",
                          resp: ResponseHead, writer: asyncio.StreamWriter, chunked: bool,
                          keep: bool) -> RelayResult:
    """A held stream whose backend answered 2xx but not with SSE (an engine that ignores
    "stream"): its body, up to MAX_WRAPPED_BODY, goes as one SSE event (one data: line
    per line), so an SSE client sees the answer instead of an empty stream."""
    body, whole = await _read_answer(pool, port, conn, resp, MAX_WRAPPED_BODY, None)
    if not whole:
        return RelayResult(502, keep, UpstreamError(
            f"model '{model}' backend answered a streaming request with more than "
            f"{MAX_WRAPPED_BODY} bytes that are not an event stream"))
    # One pass each, no object per line: a body of newlines is not a million lines.
    body = body.replace(b"\r\n", b"\n").strip(b"\n")
    event = b"data: " + body.replace(b"\n", b"\ndata: ") + b"\n\n"
    writer.write(encode_chunk(event) + b"0\r\n\r\n" if chunked else event)
    await writer.drain()
    return RelayResult(resp.status, keep)


def backend_error(model: str, status: int, body: bytes) -> LLMuxError:
    """A backend's error answer as an LLMuxError with its status, keeping its OpenAI
    error object (or Ollama's and llama.cpp's {"error": "text"}) when it has one."""
    text = body.decode("utf-8", "replace").strip()
    try:
        obj = json.loads(text)
    except ValueError:
        obj = None
    err = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(err, dict) and isinstance(err.get("message"), str):
        code = err.get("code")
        return LLMuxError(err["message"], status=status, type=str(err.get("type") or "upstream_error"),
                          code=code if isinstance(code, str) else str(code or "upstream_error"))
    message = err if isinstance(err, str) else text[:MAX_ECHOED_ERROR]
    return UpstreamError(f"model '{model}' backend answered {status}: {message}", status=status)


async def relay(pool: UpstreamPool, model: str, port: int, head: RequestHead, body: bytes,
                writer: asyncio.StreamWriter, timeout: Optional[float],
                flow: Optional["_ClientProtocol"] = None,
                cors: Sequence[Tuple[str, str]] = (), opened: Optional[bool] = None,
                turns: Optional["TurnBudget"] = None) -> RelayResult:
    """Forward one request to 127.0.0.1:``port`` and stream the answer to ``writer``.

    ``opened`` (not None) says the client already has a 200 event-stream head, chunked
    if True (a held stream, Server._hold_stream): a 2xx answer's body follows it as it
    comes; any other answer is read (up to MAX_ERROR_BODY) and returned as the
    RelayResult's error, for the caller to send as an SSE error event.

    Raises UpstreamError if the backend failed before anything reached the client, _Cut
    if it failed afterwards.  An idempotent request (IDEMPOTENT_METHODS) on a reused
    keep-alive connection that failed before any response byte is retried once on a new
    connection; any other request may have reached the backend and is never re-sent,
    unless it was not: one whose connection failed while it waited for its turn
    (``turns``, TurnBudget) was never written, and is sent again on a new connection.
    """
    request = upstream_request(head, body, port)
    answer = None if opened is not None else _Answer(
        writer.transport, head.version == "HTTP/1.0", head.keep_alive, cors, flow)
    for attempt in (0, 1):
        conn = pool.idle(port) or await pool.get(port, model)
        started = False
        try:
            resp = await conn.begin(head.method, request, timeout, answer,
                                    turns if attempt == 0 else None)
            if not conn.answering:  # a held stream's answer: the task judges its head
                assert opened is not None
                if 200 <= resp.status < 300 and not _is_sse(resp):
                    return await _relay_as_event(pool, port, model, conn, resp, writer, opened,
                                                 opened and head.keep_alive)
                if not 200 <= resp.status < 300:
                    # Its error answer: read MAX_ERROR_BODY of it at most, for at most
                    # MAX_ERROR_BODY_SECS (an endless or trickling body is not waited for).
                    text, _ = await _read_answer(pool, port, conn, resp, MAX_ERROR_BODY,
                                                 MAX_ERROR_BODY_SECS)
                    return RelayResult(resp.status, opened and head.keep_alive,
                                       backend_error(model, resp.status, text))
                started = True
                conn.keep_client = opened and head.keep_alive
                await conn.pipe(writer.transport, opened, b"", flow)
            started = True
            resp = conn.head
            assert resp is not None
            if flow is not None:
                flow.upstream = None
                if flow.write_paused:
                    await writer.drain()
            if resp.keep_alive and conn.in_sync and not conn.closed:
                pool.put(port, conn)
            else:
                conn.close()
            return RelayResult(resp.status, conn.keep_client)
        except (OSError, HTTPError, _Timeout) as e:
            conn.close()
            started = started or conn.answering
            if attempt == 0 and not conn.received and (not conn.sent or (
                    conn.reused and not isinstance(e, _Timeout) and head.method in IDEMPOTENT_METHODS)):
                continue  # the backend closed an idle connection as we reused it
            if started:
                raise _Cut(f"model '{model}' backend failed mid-response: {_reason(e)}") from None
            if isinstance(e, _Timeout):
                raise UpstreamError(f"model '{model}' backend sent nothing for {timeout:g}s",
                                    status=504, code="upstream_timeout") from None
            if isinstance(e, HTTPError) and conn.received:
                raise UpstreamError(f"model '{model}' backend sent an invalid response: "
                                    f"{e.message}") from None
            raise UpstreamError(f"model '{model}' backend failed before answering: "
                                f"{_reason(e)}", code="upstream_unavailable") from None
        except BaseException:
            conn.close()  # client gone or shutdown: closing stops the engine generating
            raise
        finally:
            if flow is not None:
                flow.upstream = None
    raise AssertionError("unreachable")


def _reason(e: BaseException) -> str:
    if isinstance(e, LLMuxError):
        return e.message
    if isinstance(e, _Timeout):
        return "timed out"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror.lower()
    return str(e) or type(e).__name__


def _spawn_reason(e: BaseException, cwd: Optional[str]) -> str:
    """Why a process could not start: _reason, but a missing working directory (the
    config's folder, moved or deleted while llmux runs) is named, not taken for sh."""
    if isinstance(e, FileNotFoundError) and cwd is not None and not os.path.isdir(cwd):
        return f"its working directory {cwd} (the config file's) does not exist any more"
    return _reason(e)


# ───────────────────────────────────────── hooks ────────────────────────────────────────
# A hook is shell text run as `sh -c TEXT` in its own session (so a timeout can kill its
# whole process group), with LLMUX_MODEL, LLMUX_PORT and LLMUX_HOOK set.  Its stdout and
# stderr are pipes that llmux reads without ever waiting for them to close: a wake hook
# that starts `vllm serve ... &` leaves the server holding them, and llmux only waits for
# the hook's own process to exit.


@dataclass
class HookResult:
    """What one hook run did."""

    model: str
    hook: str
    exit_code: Optional[int]  # None when killed by a signal or not started
    signal: Optional[int] = None
    timed_out: bool = False
    duration: float = 0.0
    timeout: Optional[float] = None  # the one reached, when timed_out
    stderr_tail: List[str] = field(default_factory=list)
    error: Optional[str] = None  # could not start
    summary: Optional[str] = None  # a managed server's failure, said in its own words

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and self.error is None \
            and self.summary is None

    def describe(self) -> str:
        """``hook 'wake' for model 'llama' exited 1: <stderr tail>``."""
        what = f"hook '{self.hook}' for model '{self.model}'"
        if self.summary:
            what = self.summary
        elif self.error:
            what += f" could not start: {self.error}"
        elif self.timed_out:
            after = f"{self.timeout:g}s (hook_timeout_secs; " if self.timeout is not None \
                else f"{self.duration:.1f}s ("
            what += f" timed out after {after}its process group was killed)"
        elif self.signal is not None:
            what += f" was killed by signal {self.signal} ({_signame(self.signal)})"
        else:
            what += f" exited {self.exit_code}"
        tail = " | ".join(self.stderr_tail[-5:])
        return f"{what}: {tail}" if tail else what


def _signame(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return "unknown"


class _PipeReader:
    """Copies one output pipe of a hook to the log, line by line, never blocking.

    It outlives the hook when a background child keeps the pipe open, and stops at EOF.
    Memory is bounded: lines are cut at HOOK_LINE_MAX, and only a tail is kept.
    """

    def __init__(self, fd: int, log: "Log", model: str, hook: str, stream: str,
                 on_close: Callable[["_PipeReader"], None]) -> None:
        self.fd = fd
        self.log = log
        self.fields = {"model": model, "hook": hook, "stream": stream}
        self.tail: Deque[str] = collections.deque(maxlen=HOOK_TAIL_LINES)
        self.logged = 0
        self.dropped = 0
        self._partial = b""
        self._on_close = on_close
        self._loop = asyncio.get_running_loop()
        self._window_end = 0.0
        self._window_bytes = 0
        self._resume: Optional[asyncio.TimerHandle] = None  # paused for the rate until then
        os.set_blocking(fd, False)
        self._loop.add_reader(fd, self.pump)

    def pump(self, budget: int = 16, limited: bool = True) -> None:
        """Read what the pipe holds now: at most ``budget`` reads (to stay fair) and, if
        ``limited``, at most HOOK_RATE_BYTES a window (then it pauses itself)."""
        for _ in range(budget):
            if self.fd < 0 or (limited and self._resume is not None):
                return
            try:
                data = os.read(self.fd, READ_SIZE)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._line(self._partial, final=True)
                self.close()
                return
            self._take(data)
            if limited and self._over_rate(len(data)):
                return

    def _take(self, data: bytes) -> None:
        buf = self._partial + data
        if self.logged < HOOK_LOG_LINES:
            lines = buf.split(b"\n")
            self._partial = lines.pop()
            for line in lines:
                self._line(line)
        else:  # past what is logged: count the lines in C and keep only the tail
            newlines = buf.count(b"\n")
            if newlines:
                lines = buf.rsplit(b"\n", HOOK_TAIL_LINES + 1)
                self._partial = lines.pop()
                self.dropped += newlines - min(newlines, HOOK_TAIL_LINES)
                for line in lines[-HOOK_TAIL_LINES:]:
                    self._line(line)
            else:
                self._partial = buf
        if len(self._partial) > HOOK_LINE_MAX:
            self._line(self._partial)
            self._partial = b""

    def _over_rate(self, n: int) -> bool:
        """Count ``n`` bytes in the current window; past the rate, pause until it ends."""
        now = self._loop.time()
        if now >= self._window_end:
            self._window_end, self._window_bytes = now + HOOK_RATE_WINDOW, 0
        self._window_bytes += n
        if self._window_bytes < HOOK_RATE_BYTES:
            return False
        self._loop.remove_reader(self.fd)
        self._resume = self._loop.call_at(self._window_end, self._unpause)
        return True

    def _unpause(self) -> None:
        self._resume = None
        if self.fd >= 0:
            self._loop.add_reader(self.fd, self.pump)

    def _line(self, raw: bytes, final: bool = False) -> None:
        if final and not raw:
            return
        text = raw[:HOOK_LINE_MAX].decode("utf-8", "replace").rstrip("\r")
        self.tail.append(text)
        if self.logged < HOOK_LOG_LINES:
            self.logged += 1
            self.log.info("hook.output", text=text, **self.fields)
        else:
            self.dropped += 1

    def close(self) -> None:
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        if self.fd >= 0:
            self._loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = -1
            if self.dropped:
                self.log.info("hook.output", text=f"({self.dropped} more lines not logged)",
                              **self.fields)
            self._on_close(self)


class HookRunner:
    """Runs hooks with ``sh -c``; bounded in time, never blocked by their pipes."""

    def __init__(self, log: "Log", timeout: Optional[float] = DEFAULT_HOOK_TIMEOUT,
                 cwd: Optional[str] = None, metrics: Optional[Metrics] = None) -> None:
        self.log = log
        self.metrics = metrics
        self.timeout = timeout
        self.cwd = cwd
        self.last: Dict[Tuple[str, str], HookResult] = {}
        self._readers: Set[_PipeReader] = set()
        self._running: Set[int] = set()  # process group ids of hooks still running
        self.servers: Dict[str, _ManagedServer] = {}  # managed servers (cmd), by model
        # Servers that exited by themselves (their groups killed), and when: the next
        # start of the model waits for what is left of the group, for the rest of
        # GROUP_KILL_WAIT_SECS (later its number may name a stranger's group).
        self._dying: Dict[str, Tuple[_ManagedServer, float]] = {}
        self._stuck_left: Dict[str, Tuple[int, List[int]]] = {}  # (pgid, what outlived SIGKILL)
        self.spawning = 0  # children being started: their pids are not known yet
        # Set at shutdown (shutdown_grace_secs): no server's stop may take longer.
        self.grace_cap: Optional[float] = None
        # Called with (model, why) when a managed server that was ready exits by itself.
        self.on_exit: Callable[[str, str], None] = lambda model, why: None
        # Called with why when a hook cannot start for lack of fds, before one more try:
        # the server gives up its idle backend connections.
        self.out_of_fds: Optional[Callable[[str], None]] = None

    async def run(self, model: ModelConfig, hook: str) -> HookResult:
        """Run ``hook`` of ``model``; return its result, or raise HookError if it failed.

        A model without that hook succeeds at once.
        """
        script = getattr(model, hook)
        if model.cmd and hook == "wake":
            await self._start_server(model)  # then the wake hook, if any (sleep mode)
        elif model.cmd and hook == "sleep" and (not script or not self.server_running(model.name)):
            return await self._stop_server(model)  # no sleep mode, or nothing to put to sleep
        if not script:
            return HookResult(model.name, hook, 0)
        result = await self._run(model, hook, script)
        if model.cmd and hook == "wake" and result.ok and not self.server_running(model.name):
            result.summary = f"server for model '{model.name}' exited during its wake hook"
        self.last[(model.name, hook)] = result
        if self.metrics is not None:
            self.metrics.observe("llmux_hook_duration_seconds", model.name, hook, value=result.duration)
            if not result.ok:
                self.metrics.inc("llmux_hook_failures_total", model.name, hook)
        level = self.log.info if result.ok else self.log.warning if hook == "alive" else self.log.error
        level("hook.exit", model=model.name, hook=hook, code=result.exit_code,
              secs=round(result.duration, 3),
              **({} if result.ok else {"error": result.describe()}))
        if not result.ok:
            raise HookError(result.describe(), result)
        return result

    async def alive(self, model: ModelConfig) -> Optional[bool]:
        """Run the alive hook: True when it exits 0 (or there is none), False when it
        fails, None when it could not even start (out of fds, say): that says nothing
        about the model, which must not be put to sleep for it."""
        try:
            await self.run(model, "alive")
        except HookError as e:
            return None if e.result.error is not None else False
        return True

    async def _run(self, model: ModelConfig, hook: str, script: str) -> HookResult:
        loop = asyncio.get_running_loop()
        env = dict(os.environ, LLMUX_MODEL=model.name, LLMUX_PORT=str(model.port), LLMUX_HOOK=hook)
        self.log.info("hook.start", model=model.name, hook=hook)
        self.log.debug("hook.script", model=model.name, hook=hook, script=script, cwd=self.cwd)
        started = loop.time()
        timeout = self.timeout  # (as it is now: a reload may change it meanwhile)
        for attempt in (0, 1):
            fds: List[int] = []
            try:  # out of fds (EMFILE), no sh, a bad cwd: the hook could not start, a failure
                fds.extend(os.pipe())
                fds.extend(os.pipe())
                out_r, out_w, err_r, err_w = fds
                self.spawning += 1
                try:
                    proc = await asyncio.create_subprocess_exec(
                        "sh", "-c", script, stdin=subprocess.DEVNULL, stdout=out_w, stderr=err_w,
                        env=env, cwd=self.cwd, start_new_session=True)
                finally:
                    self.spawning -= 1
                break
            except OSError as e:
                for fd in fds:
                    os.close(fd)
                if attempt == 0 and e.errno in _OUT_OF_FDS and self.out_of_fds is not None:
                    self.out_of_fds(_reason(e))  # the server gives up idle connections
                    await asyncio.sleep(0)  # their sockets close in the loop's next turn
                    continue
                return HookResult(model.name, hook, None, error=_spawn_reason(e, self.cwd),
                                  duration=loop.time() - started)
        os.close(out_w)
        os.close(err_w)
        out = _PipeReader(out_r, self.log, model.name, hook, "stdout", self._readers.discard)
        err = _PipeReader(err_r, self.log, model.name, hook, "stderr", self._readers.discard)
        self._readers.update((out, err))
        self._running.add(proc.pid)
        timed_out = False
        try:
            try:
                await asyncio.wait_for(proc.wait(), timeout)
            except asyncio.TimeoutError:
                timed_out = True
                _killpg(proc.pid)
                try:  # bounded: a hook held by a tracer, or stuck in the kernel, stays unreaped
                    await asyncio.wait_for(proc.wait(), GROUP_KILL_WAIT_SECS)
                except asyncio.TimeoutError:
                    self.log.warning("hook.unreaped", model=model.name, hook=hook, pid=proc.pid,
                                     reason=f"killed, and not reaped {GROUP_KILL_WAIT_SECS:g}s later "
                                            "(traced, or stuck in the kernel); the switch goes on")
        except BaseException:
            _killpg(proc.pid)  # cancelled (shutdown): leave no half-run hook behind
            raise
        finally:
            self._running.discard(proc.pid)
        # What the hook wrote before it exited is in the pipes now; take it.
        out.pump(budget=64, limited=False)
        err.pump(budget=64, limited=False)
        code = proc.returncode
        return HookResult(model.name, hook, code if code is not None and code >= 0 else None,
                          signal=-code if code is not None and code < 0 and not timed_out else None,
                          timed_out=timed_out, duration=loop.time() - started,
                          timeout=timeout if timed_out else None, stderr_tail=list(err.tail))

    def close(self) -> None:
        """Kill hooks and managed servers still running (SIGKILL, at once) and stop
        copying background output.  stop_servers() first stops servers gracefully."""
        for pgid in list(self._running):
            _killpg(pgid)
        for server in list(self.servers.values()):
            server.stopping = True
            server.kill_group()
        for reader in list(self._readers):
            reader.close()

    # -- managed servers (models.NAME.cmd) --

    def server_running(self, name: str) -> bool:
        server = self.servers.get(name)
        return server is not None and server.running

    def own_pids(self) -> Set[int]:
        """Pids of the children llmux waits for itself: hooks and managed servers."""
        return self._running | {s.proc.pid for s in self.servers.values()}

    async def stop_server(self, name: str) -> None:
        """Stop ``name``'s managed server if one runs (a reload changed or removed a
        model asleep in sleep mode, whose process its sleep hook left up)."""
        server = self.servers.get(name)
        if server is not None and server.running:
            await self._stop(server)

    async def stop_servers(self) -> None:
        """Stop every managed server at once (SIGTERM, SIGKILL after its grace, or after
        grace_cap if that is shorter: a shutdown has its own deadline): a managed server
        is llmux's child and never outlives it, whatever sleep_on_exit says."""
        await asyncio.gather(*(self._stop(s) for s in list(self.servers.values())))

    async def _start_server(self, model: ModelConfig) -> None:
        """Start ``model``'s server unless it runs, and wait until it is ready; raise
        HookError at once if it exits first, or if it is not ready within the timeout."""
        old = self.servers.get(model.name)
        if old is not None and old.running:
            if (old.model.cmd, old.model.port, old.model.ready_path) == \
                    (model.cmd, model.port, model.ready_path):
                return  # idempotent: a second wake does not start a second server
            await self._stop(old)  # sleep mode kept it up; a reload changed how to run it
        loop = asyncio.get_running_loop()
        started = loop.time()
        timeout = self.timeout  # (as it is now: a reload may change it meanwhile)
        name = model.name

        def fail(summary: str, tail: Sequence[str] = (), **kw: Any) -> HookError:
            result = HookResult(name, "wake", kw.pop("exit_code", None), duration=loop.time() - started,
                                stderr_tail=list(tail), summary=summary, **kw)
            self.last[(name, "wake")] = result
            if self.metrics is not None:
                self.metrics.inc("llmux_hook_failures_total", name, "server")
            self.log.error("server.failed", model=name, error=result.describe())
            return HookError(result.describe(), result)

        dying, died_at = self._dying.pop(name, (None, 0.0))  # the last one crashed
        if dying is not None and loop.time() - died_at < GROUP_KILL_WAIT_SECS:
            self._stuck(dying, await _group_wait(dying, GROUP_KILL_WAIT_SECS - (loop.time() - died_at)))
        # A server llmux did not start (left by an old llmux on a host without
        # PR_SET_PDEATHSIG, say) would pass the readiness check and be taken for ours.
        if await _port_taken(model.port):
            stuck = _group_left(*self._stuck_left[name]) if name in self._stuck_left else []
            if stuck:
                raise fail(f"server for model '{name}' cannot start: port {model.port} is still "
                           f"held by what its last server left running after SIGKILL (pid "
                           f"{', '.join(map(str, stuck[:8]))}: stuck in the kernel?); expected "
                           "it to exit")
            raise fail(f"server for model '{name}' cannot start: port {model.port} is served "
                       "by a process llmux did not start; expected a free port (stop that "
                       "process)")
        argv = [_expand(a, model) for a in model.cmd or ()]
        env = dict(os.environ, LLMUX_MODEL=name, LLMUX_PORT=str(model.port), LLMUX_HOOK="server")
        self.log.info("server.start", model=name, cmd=argv, cwd=self.cwd)
        fds: List[int] = []
        try:
            fds.extend(os.pipe())  # stdout and stderr in one pipe: their lines stay in order
            self.spawning += 1
            try:
                proc = await asyncio.create_subprocess_exec(
                    *argv, stdin=subprocess.DEVNULL, stdout=fds[1], stderr=fds[1], env=env,
                    cwd=self.cwd, start_new_session=True, preexec_fn=_child_setup(os.getpid()))
            finally:
                self.spawning -= 1
        except (OSError, subprocess.SubprocessError) as e:
            for fd in fds:
                os.close(fd)
            why = _spawn_reason(e, self.cwd)
            raise fail(f"server for model '{name}' could not start: {why}", error=why)
        os.close(fds[1])
        output = _PipeReader(fds[0], self.log, name, "server", "output", self._readers.discard)
        self._readers.add(output)
        server = self.servers[name] = _ManagedServer(model, proc, output)
        server.exited.add_done_callback(lambda _: self._exited(server))
        self.log.info("server.started", model=name, pid=proc.pid)
        deadline = None if timeout is None else started + timeout
        try:
            while True:
                if not server.running or server.exited.done():
                    await server.exited
                    output.pump(budget=64)
                    code = proc.returncode if proc.returncode is not None else -1
                    raise fail(f"server for model '{name}' {server.describe_exit()} before it "
                               "was ready", output.tail, exit_code=code if code >= 0 else None,
                               signal=-code if code < 0 else None)
                left = None if deadline is None else deadline - loop.time()
                if left is not None and left <= 0:
                    raise fail(f"server for model '{name}' was not ready within "
                               f"{timeout:g}s (hook_timeout_secs; it was stopped)",
                               output.tail, timed_out=True)
                probe = READY_PROBE_TIMEOUT if left is None else min(left, READY_PROBE_TIMEOUT)
                # Ready only while the process still runs: a stale server on the port
                # answering for a child that failed to bind is not ours.
                if await _probe_ready(model.port, model.ready_path, probe) and server.running:
                    break
                await asyncio.wait([server.exited], timeout=READY_POLL_SECS)
        except BaseException:  # failed, timed out or cancelled (shutdown): no server left
            await self._stop(server, grace=0.0)
            raise
        server.ready = True
        secs = loop.time() - started
        self.last[(name, "wake")] = HookResult(name, "wake", 0, duration=secs)
        if self.metrics is not None:
            self.metrics.observe("llmux_hook_duration_seconds", name, "server", value=secs)
        self.log.info("server.ready", model=name, pid=proc.pid, secs=round(secs, 3))

    def _stuck(self, server: _ManagedServer, left: List[int]) -> None:
        """What is ``left`` of a server's group outlived SIGKILL by GROUP_KILL_WAIT_SECS."""
        self._stuck_left.pop(server.model.name, None)
        if left:
            server.kill_group()  # (what it forked since the first SIGKILL)
            self._stuck_left[server.model.name] = (server.proc.pid, left)
            self.log.warning("server.group_left", model=server.model.name, pid=server.proc.pid,
                             left=",".join(map(str, left[:8])),
                             reason=f"its process group still runs {GROUP_KILL_WAIT_SECS:g}s "
                                    "after SIGKILL (stuck in the kernel: a GPU driver, a hung "
                                    "mount?); going on without it")

    def _exited(self, server: _ManagedServer) -> None:
        """A managed server's process exited (and was reaped): it is noticed at once."""
        name = server.model.name
        if server.stopping:
            return  # _stop gives the rest of its group its grace
        if self.servers.get(name) is server:
            del self.servers[name]
        server.kill_group()  # what it left in its process group goes with it
        self._dying[name] = (server, asyncio.get_running_loop().time())  # (and is waited for)
        if not server.ready:
            return  # its wake reports the exit
        server.output.pump(budget=64)
        why = f"its server {server.describe_exit()}"
        tail = " | ".join(list(server.output.tail)[-5:])
        self.log.error("server.exit", model=name, pid=server.proc.pid,
                       code=server.proc.returncode, reason=why, output=tail or None)
        self.on_exit(name, why + (f": {tail}" if tail else ""))

    async def _stop_server(self, model: ModelConfig) -> HookResult:
        """Stop ``model``'s managed server if it runs (the sleep of a ``cmd`` model)."""
        server = self.servers.get(model.name)
        if server is None:
            return HookResult(model.name, "sleep", 0)  # not running: nothing to stop
        return await self._stop(server)

    async def _stop(self, server: _ManagedServer, grace: Optional[float] = None) -> HookResult:
        """SIGTERM the server's process group, SIGKILL after stop_grace_secs, and
        await its exit (reaped by the child watcher: a zombie is never taken as alive)
        and the end of every process of its group (its workers hold GPU memory too)."""
        model = server.model
        loop = asyncio.get_running_loop()
        started = loop.time()
        server.stopping = True
        grace = server.model.stop_grace_secs if grace is None else grace
        if self.grace_cap is not None:
            grace = min(grace, self.grace_cap)  # shutting down: its deadline is the bound
        forced = False
        pgid = server.proc.pid
        try:
            if server.running or await _group_scan(pgid):
                _signal_group(pgid, signal.SIGTERM if grace > 0 else signal.SIGKILL)
                left = await _group_wait(server, grace) if grace > 0 else []
                if left:
                    forced = True
                    why = "still running" if server.running else \
                        f"its process group (pid{'s' if len(left) > 1 else ''} " \
                        f"{', '.join(map(str, left[:8]))}) still ran"
                    self.log.warning("server.kill", model=model.name, pid=pgid,
                                     reason=f"{why} {grace:g}s after SIGTERM (stop_grace_secs)")
                    server.kill_group()
            # (bounded: a process stuck in the kernel, or traced, may never be reaped)
            self._stuck(server, await _group_wait(server, GROUP_KILL_WAIT_SECS))
        except BaseException:  # cancelled (shutdown): no half-stopped group is left
            if server.running or _group_has_members(pgid):
                self.log.warning("server.kill", model=model.name, pid=pgid,
                                 reason="its stop was cut short (llmux is shutting down)")
            server.kill_group()
            self._dying[model.name] = (server, loop.time())  # a start of it waits for that group
            raise
        if self.servers.get(model.name) is server:
            del self.servers[model.name]
        server.output.pump(budget=64)
        server.output.close()  # its children may hold the pipe; they were killed with it
        secs = loop.time() - started
        self.log.info("server.stopped", model=model.name, pid=server.proc.pid,
                      code=server.proc.returncode, killed=forced or None, secs=round(secs, 3))
        result = HookResult(model.name, "sleep", 0, duration=secs)
        self.last[(model.name, "sleep")] = result
        return result


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _group_has_members(pgid: int) -> bool:
    """Whether any process is in group ``pgid``, a zombie included."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _group_left(pgid: int, among: Optional[Sequence[int]] = None) -> List[int]:
    """The processes of group ``pgid`` still running (_pid_running: a zombie holds no
    memory and no port); of ``among`` only, if given, else found in /proc.  Without a
    /proc of llmux's own (not Linux; a pid namespace without its own /proc mounted),
    [pgid] while the group has any member."""
    if not _group_has_members(pgid):
        return []  # the usual end: no member left, not even a zombie
    if not _proc_ours():
        return [pgid]
    if among is None:
        try:
            among = [int(name) for name in os.listdir("/proc") if name.isdigit()]
        except OSError:
            return [pgid]
    left = []
    for pid in among:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                if int(f.read().rpartition(b")")[2].split()[2]) != pgid:
                    continue
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if _pid_running(pid):
            left.append(pid)
    return left


def _in_thread(fn: Callable[..., T], *args: Any) -> "asyncio.Future[T]":
    """``fn(*args)`` in a daemon thread of its own: unlike the default executor's threads,
    asyncio.run does not wait for it at exit (a reload's parse must not hold shutdown)."""
    loop = asyncio.get_running_loop()
    future: "asyncio.Future[T]" = loop.create_future()

    def done(result: Any, error: Optional[BaseException]) -> None:
        if not future.done():
            future.set_exception(error) if error is not None else future.set_result(result)

    def run() -> None:
        try:
            result, error = fn(*args), None
        except BaseException as e:  # handed to the awaiting coroutine
            result, error = None, e
        try:
            loop.call_soon_threadsafe(done, result, error)
        except RuntimeError:
            pass  # the loop has closed: nobody waits any more

    threading.Thread(target=run, name="llmux-" + getattr(fn, "__name__", "work"), daemon=True).start()
    return future


async def _group_scan(pgid: int) -> List[int]:
    """_group_left(pgid), with /proc read in a thread when the group has members (on a
    node of 1,000 processes, reading each one's stat takes ~20 ms: not on the loop)."""
    if not _group_has_members(pgid):
        return []
    return await _in_thread(_group_left, pgid)


async def _group_wait(server: _ManagedServer, timeout: float) -> List[int]:
    """Wait until ``server`` has exited and no process of its group runs; what still
    ran when ``timeout`` was out ([]: all gone).  /proc is read whole at the start and
    again when the processes found have gone (meanwhile only theirs, every GROUP_POLL_SECS).
    Its main process counts as gone once it is a zombie, reaped or not (a tracer that
    never waits for it keeps it from llmux: it holds nothing any more)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    pgid = server.proc.pid
    while server.running and _pid_running(pgid):
        wait = deadline - loop.time()
        if wait <= 0:
            return [pgid]
        await asyncio.wait([server.exited], timeout=min(GROUP_POLL_SECS, wait))
    if server.running:  # a zombie: the child watcher reaps it in a moment, unless a tracer
        await asyncio.wait([server.exited], timeout=ZOMBIE_REAP_WAIT_SECS)  # holds it
    swept = False
    left = [] if server.reused() else await _group_scan(pgid)
    while True:
        if not left:
            if swept or server.reused() or not _group_has_members(pgid):
                return []
            # The group has members and none was seen running: zombies, or one that
            # forked and exited while /proc was read (a chain of them can hop past every
            # scan).  SIGKILL is nothing to a zombie, and no fork escapes a group's signal.
            server.kill_group()
            swept = True
            left = await _group_scan(pgid)
            continue
        wait = deadline - loop.time()
        if wait <= 0:
            return left
        await asyncio.sleep(min(GROUP_POLL_SECS, wait))
        left = _group_left(pgid, left) or await _group_scan(pgid)


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _child_setup(parent: int) -> Callable[[], None]:
    """What a managed server's child runs between fork and exec (Linux): die with llmux.

    PR_SET_PDEATHSIG sends SIGKILL to the child when llmux dies, even by kill -9; it is
    why the server is exec'd directly, without a shell: only the direct child gets it.
    If llmux died before the prctl, the child was already reparented: it exits."""
    def setup() -> None:
        if _PRCTL is not None:
            _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:
            os._exit(1)
    return setup


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
PR_SET_CHILD_SUBREAPER = 36
PR_GET_CHILD_SUBREAPER = 37


def reaps_orphans() -> bool:
    """True when orphaned processes are reparented to llmux: it is PID 1 (a container
    without --init) or a child subreaper (PR_SET_CHILD_SUBREAPER); it must reap them."""
    if os.getpid() == 1:
        return True
    if _PRCTL is None:
        return False
    flag = ctypes.c_int(0)
    return _PRCTL(PR_GET_CHILD_SUBREAPER, ctypes.byref(flag), 0, 0, 0) == 0 and flag.value != 0


def _reap_pass(own: Set[int]) -> Tuple[List[Tuple[int, int]], bool]:
    """Reap zombie children of llmux that it did not start itself (orphans reparented
    to it); return their (pid, status).  Its own hooks and servers (``own``) are left to
    asyncio's child watcher, which waits for each by pid: reaping one here would steal
    its exit status.  waitid(WNOWAIT) names each waiting child without reaping it, so a
    pass costs a few system calls, not a read of every process in /proc; only when one
    of llmux's own is first in line (the watcher has not reaped it yet) is /proc read
    for the others behind it (Linux, and only a /proc of llmux's own pid namespace)."""
    me = os.getpid()
    reaped: List[Tuple[int, int]] = []
    behind = False  # stopped at one of its own, with no /proc of its own to look past it
    waitid = getattr(os, "waitid", None)
    if waitid is not None:
        for _ in range(REAP_BATCH):
            try:
                info = waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:
                return reaped, False  # no child at all
            if info is None or info.si_pid == 0:
                return reaped, False  # none waiting
            if info.si_pid in own:
                behind = True  # the watcher's: look behind it (or, without a /proc
                break  # of our own, again once the watcher has reaped it)
            pid, status = os.waitpid(info.si_pid, os.WNOHANG)
            if pid:
                reaped.append((pid, status))
        else:
            return reaped, False  # a full batch: the next SIGCHLD (or poll) goes on
    if not _proc_ours():
        return reaped, behind
    try:
        names = os.listdir("/proc")
    except OSError:
        return reaped, False
    for name in names:
        if not name.isdigit() or int(name) in own:
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
        except OSError:
            continue  # gone meanwhile
        if len(fields) < 2 or fields[0] != b"Z" or int(fields[1]) != me:
            continue
        try:
            pid, status = os.waitpid(int(name), os.WNOHANG)
        except ChildProcessError:
            continue
        if pid:
            reaped.append((pid, status))
    return reaped, False


def reap_orphans(own: Set[int]) -> List[Tuple[int, int]]:
    """_reap_pass's orphans: their (pid, status)."""
    return _reap_pass(own)[0]


class _ManagedServer:
    """One model server that llmux started (``cmd``) and owns until it exits."""

    def __init__(self, model: ModelConfig, proc: "asyncio.subprocess.Process",
                 output: _PipeReader) -> None:
        self.model = model
        self.proc = proc
        self.output = output
        self.ready = False  # its readiness check passed: an exit from now on is a crash
        self.stopping = False  # llmux stops it: its exit is expected
        self.exited: "asyncio.Task[int]" = asyncio.get_running_loop().create_task(proc.wait())

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    def reused(self) -> bool:
        """Whether its pid (its group's number) names another process now: once it has
        been reaped, that means its group is empty (a pid is not given out while a
        group has its number), and the group of that number is a stranger's."""
        if self.running:
            return False
        try:
            os.kill(self.proc.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True

    def kill_group(self) -> None:
        """SIGKILL what runs of its process group (not a stranger's of the same number)."""
        if not self.reused():
            _killpg(self.proc.pid)

    def describe_exit(self) -> str:
        code = self.proc.returncode
        if code is not None and code < 0:
            how = f"was killed by signal {-code} ({_signame(-code)})"
        else:
            how = f"exited {code}"
        return how


async def _probe_ready(port: int, path: str, timeout: float) -> bool:
    """GET ``path`` on 127.0.0.1:``port``: True on a 2xx status line."""
    writer: Optional[asyncio.StreamWriter] = None
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), timeout)
        assert writer is not None
        writer.write(f"GET {path} HTTP/1.1\r\nhost: 127.0.0.1:{port}\r\n"
                     "connection: close\r\n\r\n".encode("ascii"))
        line = await asyncio.wait_for(reader.readline(), timeout)
    except (OSError, asyncio.TimeoutError, ValueError):
        return False
    finally:
        if writer is not None:
            writer.close()
    match = re.match(rb"HTTP/1\.[01] (\d{3}) ", line)
    return match is not None and 200 <= int(match.group(1)) < 300


async def _port_taken(port: int) -> bool:
    """True when something accepts connections on 127.0.0.1:``port`` already."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port),
                                           READY_PROBE_TIMEOUT)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True


def _expand(arg: str, model: ModelConfig) -> str:
    return arg.replace("${PORT}", str(model.port)).replace("${MODEL}", model.name)


# ──────────────────────────────────────── events ────────────────────────────────────────


class _Subscriber:
    """One /llmux/events client: its transport, written to directly (no queue, no task)."""

    __slots__ = ("transport", "chunked", "done", "dropped", "allowance")

    def __init__(self, transport: asyncio.WriteTransport, chunked: bool,
                 done: "asyncio.Future[str]") -> None:
        self.transport = transport
        self.chunked = chunked
        self.done = done  # resolves to why the stream ends (dropped, shutdown)
        self.dropped = False
        self.allowance = 0  # its snapshot's size: unsent beyond EVENTS_MAX_BUFFERED

    def frame(self, data: bytes) -> bytes:
        return encode_chunk(data) if self.chunked else data


class EventBus:
    """llmux's events, fanned out as SSE to the subscribers of GET /llmux/events.

    Every info-or-worse log event is published (Log.listener), plus a few that are not
    logged because they come once per request or queue change.  publish() never awaits
    and never blocks: it writes each subscriber's transport directly.  A subscriber with
    more than EVENTS_MAX_BUFFERED bytes still unsent is dropped (its stream ends, and it
    may reconnect for a fresh snapshot): a slow reader can cost llmux memory up to that
    bound, never time.  Nothing is serialized while nobody listens.
    """

    def __init__(self, log: Optional[Log] = None, metrics: Optional[Metrics] = None) -> None:
        self.log = log
        self.metrics = metrics
        self.seq = 0  # events published so far (the SSE id; a gap means events were missed)
        self.subscribers: List[_Subscriber] = []
        # Events of the last EVENTS_FLUSH_SECS, written in one piece per subscriber: under
        # load, each reader costs llmux one write per interval, not one per event.
        self._pending: List[bytes] = []
        self._pending_bytes = 0
        self._flush_handle: Optional[asyncio.TimerHandle] = None

    def __len__(self) -> int:
        return len(self.subscribers)

    def publish(self, event: str, fields: Dict[str, Any], level: str = "info") -> None:
        """Send one event to every subscriber: ``{"seq", "ts", "event", "level", ...}``."""
        self.seq += 1
        if not self.subscribers:
            return
        record: Dict[str, Any] = {"seq": self.seq, "ts": round(time.time(), 3), "event": event}
        if level != "info":
            record["level"] = level
        for k, v in fields.items():
            if v is not None:
                record[k.rstrip("_")] = v
        self.send(record)

    def send(self, record: Dict[str, Any], only: Optional[_Subscriber] = None) -> None:
        """Queue ``record`` for every subscriber (written within EVENTS_FLUSH_SECS), or
        write it to ``only`` at once (its snapshot)."""
        data = b"id: %d\ndata: %s\n\n" % (record.get("seq", self.seq), json.dumps(
            record, default=str, separators=(",", ":")).encode())
        if only is not None:  # a snapshot, bounded by what it shows, not by the reader's
            frame = only.frame(data)  # bound (which a large one once passed by itself)
            only.allowance = len(frame)
            self._write(only, frame)
            return
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes >= EVENTS_BATCH_BYTES:
            self.flush()  # a burst goes in pieces: no one write is near a reader's bound
        elif self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_later(EVENTS_FLUSH_SECS, self.flush)

    def flush(self) -> None:
        """Write the queued events to every subscriber, one write each."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._pending:
            return
        data = b"".join(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        for sub in list(self.subscribers):
            self._write(sub, sub.frame(data))

    def ping(self, sub: _Subscriber) -> None:
        self._write(sub, sub.frame(b": ping\n\n"))

    def _write(self, sub: _Subscriber, frame: bytes) -> None:
        transport = sub.transport
        if transport.is_closing():
            self.end(sub, "gone")
            return
        if transport.get_write_buffer_size() + len(frame) > EVENTS_MAX_BUFFERED + sub.allowance:
            sub.dropped = True
            why = f"it read too slowly (over {EVENTS_MAX_BUFFERED} bytes unsent)"
            if self.metrics is not None:
                self.metrics.inc("llmux_events_dropped_subscribers_total")
            if self.log is not None:  # soon, not now: we may be inside a log call
                log = self.log
                peer = _peername(transport)
                asyncio.get_running_loop().call_soon(
                    lambda: log.warning("events.dropped", peer=peer, reason=why))
            self.end(sub, why)
            transport.abort()  # what it has not read is lost anyway: free it now
            return
        transport.write(frame)

    def subscribe(self, transport: asyncio.WriteTransport, chunked: bool) -> _Subscriber:
        """A new subscriber; what was published before reaches only the earlier ones (its
        snapshot, sent next, already shows it)."""
        self.flush()
        sub = _Subscriber(transport, chunked, asyncio.get_running_loop().create_future())
        self.subscribers.append(sub)
        return sub

    def end(self, sub: _Subscriber, why: str) -> None:
        """Take ``sub`` off the list; its stream's task sees ``why`` and ends it."""
        try:
            self.subscribers.remove(sub)
        except ValueError:
            pass
        if not sub.done.done():
            sub.done.set_result(why)

    def close(self, why: str) -> None:
        """End every stream (shutdown): each gets a last event saying why."""
        self.publish("events.end", {"reason": why})
        self.flush()
        for sub in list(self.subscribers):
            self.end(sub, why)


# ───────────────────────────────── policies and switcher ────────────────────────────────


class ModelState(enum.Enum):
    """Where one model is in its life; what moves it is in _TRANSITIONS below."""

    ASLEEP = "asleep"  # not loaded; a request for it asks the policy for a switch
    WAKING = "waking"  # its wake hook runs
    ACTIVE = "active"  # loaded: requests get slots at once
    DRAINING = "draining"  # chosen to sleep: new requests queue, in-flight ones finish
    SLEEPING = "sleeping"  # its sleep hook runs (or ran and was interrupted: see close())


class ModelEvent(enum.Enum):
    """What happens to a model.  Each (state, event) pair has one next state, or none:
    then the event is illegal in that state, raises, and leaves the state as it was."""

    WAKE = "wake"  # its wake hook starts
    WOKE = "woke"  # its wake hook exited 0
    WAKE_FAILED = "wake_failed"  # its wake hook failed (or the wake was interrupted)
    ADOPT = "adopt"  # found alive at start, without a wake
    DRAIN = "drain"  # chosen to make room; in-flight requests finish first
    UNDRAIN = "undrain"  # the switch it was drained for was abandoned or failed first
    SLEEP = "sleep"  # its sleep hook starts
    SLEPT = "slept"  # its sleep hook exited 0 (or a failed wake was cleaned up)
    SLEEP_FAILED = "sleep_failed"  # its sleep hook failed: it is still loaded
    DIED = "died"  # found dead while serving (its managed server exited, its backend refused)


_S = ModelState
_TRANSITIONS: Dict[Tuple[ModelState, ModelEvent], ModelState] = {
    (_S.ASLEEP, ModelEvent.WAKE): _S.WAKING,
    (_S.ASLEEP, ModelEvent.ADOPT): _S.ACTIVE,
    (_S.WAKING, ModelEvent.WOKE): _S.ACTIVE,
    (_S.WAKING, ModelEvent.WAKE_FAILED): _S.SLEEPING,  # its sleep hook cleans up
    (_S.ACTIVE, ModelEvent.DRAIN): _S.DRAINING,
    (_S.DRAINING, ModelEvent.UNDRAIN): _S.ACTIVE,
    (_S.DRAINING, ModelEvent.SLEEP): _S.SLEEPING,
    (_S.SLEEPING, ModelEvent.SLEPT): _S.ASLEEP,
    # A victim whose sleep failed is still loaded: it serves again and still counts
    # against the capacity (invariant 9).  So does a failed wake whose cleanup sleep
    # failed too: its wake may have loaded it, and only a sleep that worked says not.
    (_S.SLEEPING, ModelEvent.SLEEP_FAILED): _S.ACTIVE,
    # Only an ACTIVE model can be declared dead: a draining one is about to be slept
    # anyway (its sleep reaps a dead server), and a waking one's wake reports the death.
    (_S.ACTIVE, ModelEvent.DIED): _S.ASLEEP,
}


class IllegalTransition(AssertionError):
    """An event that the model's state does not allow: a switcher bug, never a peer's."""


class _Waiter:
    """A request in a model's queue.  ``eta`` is what the switcher predicted, when it
    queued, for its wait (None: unknown), so that the prediction can be judged."""

    __slots__ = ("model", "future", "enqueued_at", "task", "eta", "handle", "seq")

    def __init__(self, model: "_Model", future: "asyncio.Future[Slot]", now: float) -> None:
        self.model = model
        self.future = future
        self.enqueued_at = now
        self.task = asyncio.current_task()
        self.eta: Optional[float] = None
        self.handle: Optional[asyncio.TimerHandle] = None  # its request_timeout_secs
        model.enqueued += 1
        self.seq = model.enqueued  # its place in the model's arrival order


class _Model:
    """The switcher's view of one model.  Policies read it; only the switcher writes."""

    def __init__(self, cfg: ModelConfig, now: float) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.state = ModelState.ASLEEP
        self.state_since = now
        self.transitions = 0  # how many times its state changed
        self.in_flight = 0
        self.slots: Set["Slot"] = set()
        self.queue: Deque[_Waiter] = collections.deque()
        self.active_since: Optional[float] = None
        self.last_used = 0.0
        self.backoff_until = 0.0
        self.demand = 0.0  # requests, decayed with DEMAND_HALF_LIFE
        self.demand_at = now
        # A reload removed (retired) or changed (pending_cfg) this model while it was
        # loaded and its sleep failed: it keeps running, and counting against the
        # capacity, with its old config until a later sleep succeeds.
        self.retired = False
        self.pending_cfg: Optional[ModelConfig] = None
        self.woken_by: Optional[str] = None  # the last switch that woke it ("a->b")
        self.undrained_at = -math.inf  # when a drain of it was last undone
        self.enqueued = 0  # requests ever queued for it (_Waiter.seq)

    def recent_demand(self, now: float) -> float:
        """Requests lately, each counting less as it ages (half-life DEMAND_HALF_LIFE)."""
        return self.demand * 0.5 ** ((now - self.demand_at) / DEMAND_HALF_LIFE)

    def oldest_wait(self) -> Optional[float]:
        """When the oldest waiting request for this model arrived, or None."""
        return self.queue[0].enqueued_at if self.queue else None

    def has_room(self) -> bool:
        """Whether one more slot stays within max_in_flight (of the config it runs)."""
        limit = self.cfg.max_in_flight
        return limit is None or self.in_flight < limit

    def at_limit(self) -> bool:
        """ACTIVE with max_in_flight slots taken: its waiters wait for a release."""
        return self.state is ModelState.ACTIVE and not self.has_room()


# What a model's server is: a reload that changes one of these sleeps a loaded model
# first (with its old hooks).  Any other key changes in place.
_RESTART_FIELDS = ("port", "wake", "sleep", "cmd", "ready_path")


def _needs_restart(old: ModelConfig, new: ModelConfig) -> bool:
    return any(getattr(old, f) != getattr(new, f) for f in _RESTART_FIELDS)


def _shutting_down() -> LLMuxError:
    return LLMuxError("llmux is shutting down", status=503, code="shutting_down",
                      headers=[("retry-after", str(RETRY_AFTER_SHUTDOWN))])


def _model_removed(name: str) -> LLMuxError:
    return LLMuxError(f"model '{name}' was removed by a config reload", status=503,
                      code="model_removed", headers=[("retry-after", str(RETRY_AFTER_REMOVED))])


def _request_cut(model: Optional[ModelConfig], cut: str) -> LLMuxError:
    return LLMuxError(f"the request to model '{model.name if model else '?'}' was cut: {cut}",
                      status=503, code="request_cut", headers=[("retry-after", str(RETRY_AFTER_BUSY))])


def _retry_after(until: float, now: float) -> List[Tuple[str, str]]:
    """Retry-After for a wait that ends at clock time ``until``: whole seconds, at least 1."""
    return [("retry-after", str(max(1, math.ceil(until - now))))]


class Slot:
    """One request's hold on an active model; release() exactly once (extra calls no-op)."""

    __slots__ = ("model", "task", "cut", "waited", "waited_for", "eta", "_switcher", "_released")

    def __init__(self, switcher: "Switcher", model: _Model, task: Optional["asyncio.Task[Any]"]) -> None:
        self._switcher = switcher
        self.model = model
        self.task = task
        self.cut: Optional[str] = None  # why the switcher cancelled its task, if it did
        self.waited = 0.0  # seconds in the queue
        self.waited_for: Optional[str] = None  # why: "switch a->b", "max_in_flight"
        self.eta: Optional[float] = None  # the wait predicted when it queued
        self._released = False

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._switcher._release(self)


class SchedulingPolicy:
    """Decides which model the switcher moves to next, and when.

    Subclass, set ``name``, and add the class to POLICIES.  The switcher asks again
    whenever something changes (a request arrives or leaves, a slot is released, a
    switch ends) and at the time a policy asked for.  Policies only read the switcher.
    """

    name = "base"

    def choose(self, switcher: "Switcher", now: float) -> Tuple[Optional[str], Optional[float]]:
        """Return ``(model, None)`` to switch to ``model`` now, ``(None, when)`` to be
        asked again at clock time ``when``, or ``(None, None)`` to wait for a change.

        Only ASLEEP models with waiting requests are candidates; the switcher itself
        enforces min_active_secs and the backoff after a failed wake.
        """
        raise NotImplementedError

    def eviction_order(self, switcher: "Switcher", awake: List["_Model"], now: float) -> List["_Model"]:
        """Awake models in the order to put them to sleep when room is needed (first
        evicted first).  Default: retired ones, then those with nothing in flight, least
        recently used first."""
        return sorted(awake, key=lambda m: (not m.retired, m.in_flight > 0, m.last_used))

    def start_at(self, switcher: "Switcher", m: "_Model", now: float) -> float:
        """When this policy would start a switch to the waited-for model ``m`` if nothing
        else changed (for ETAs).  Default: at once."""
        return now


class FifoPolicy(SchedulingPolicy):
    """Switch to the model whose oldest waiting request arrived first."""

    name = "fifo"

    def choose(self, switcher: "Switcher", now: float) -> Tuple[Optional[str], Optional[float]]:
        best: Optional[_Model] = None
        for m in switcher.candidates():
            if best is None or m.queue[0].enqueued_at < best.queue[0].enqueued_at:
                best = m
        if best is None:
            return None, None
        # A model to evict that has requests waiting for a max_in_flight slot, older than
        # the candidate's: they are served first (in arrival order); each release asks
        # again, so the candidate's turn comes once its request is the oldest.
        oldest = best.queue[0].enqueued_at
        if any(v.queue and v.queue[0].enqueued_at < oldest
               for v in switcher.victims_for(best, now) or []):
            return None, None
        return best.name, None


class CostAwarePolicy(SchedulingPolicy):
    """Amortize switches over their measured cost, within a starvation bound.

    For a waiting model M whose switch would put models V to sleep, let c be the
    measured cost of that switch (moving average of sleep + wake for V -> M) and
    q = cost_factor * c, the quantum:
    - if V have no demand (nothing in flight and no request for c seconds), switch to M
      now: nothing is gained by waiting;
    - otherwise V keep the GPU until they have been active for q, and then until M's
      oldest request has waited q: switching costs c, so each model is served for a
      few times c before paying it again (time lost to switching <= 1 / (1 + factor));
    - but never later than when M's oldest request has waited max_wait_secs - c - d
      (d: the longest of the last 8 drains): the starvation bound;
    - of several models due, the one whose oldest request came first goes first.
    With co-residency it evicts the models whose recent demand times wake cost is lowest.
    """

    name = "cost"

    def choose(self, switcher: "Switcher", now: float) -> Tuple[Optional[str], Optional[float]]:
        due: List[_Model] = []
        again: Optional[float] = None
        for m in switcher.candidates():
            when = self.start_at(switcher, m, now)
            if when <= now:
                due.append(m)
            else:
                again = when if again is None else min(again, when)
        if due:
            return min(due, key=lambda m: m.queue[0].enqueued_at).name, None
        return None, again

    def start_at(self, switcher: "Switcher", m: "_Model", now: float) -> float:
        policy = switcher.policy_cfg
        victims = switcher.victims_for(m, now)
        if not victims:  # it fits (waking it costs nobody anything), or None: held by
            return now   # min_active_secs, which the switcher waits for anyway
        cost = switcher.cost_estimate([v.name for v in victims], m.name)
        quantum = policy.cost_factor * cost
        oldest = m.queue[0].enqueued_at if m.queue else now
        bound = oldest + max(0.0, policy.max_wait_secs - cost - max(switcher.drains, default=0.0))
        in_flight = any(v.in_flight for v in victims)
        quiet_at = max(v.last_used + cost for v in victims)
        if not in_flight and quiet_at <= now:
            return now  # the victims have no demand left
        served_until = max((v.active_since or now) + quantum for v in victims)
        ready = max(served_until, oldest + quantum)
        when = min(ready, bound)
        if when > now and not in_flight:
            when = min(when, quiet_at)
        return when

    def eviction_order(self, switcher: "Switcher", awake: List["_Model"], now: float) -> List["_Model"]:
        def worth(m: _Model) -> Tuple[bool, bool, float, float]:
            return (not m.retired, m.in_flight > 0,
                    m.recent_demand(now) * switcher.cost_estimate([], m.name), m.last_used)
        return sorted(awake, key=worth)


POLICIES: Dict[str, Callable[[], SchedulingPolicy]] = {"fifo": FifoPolicy, "cost": CostAwarePolicy}


class Switcher:
    """Hands out slots on active models and switches models, one switch at a time.

    Invariants (numbered as in DESIGN.md), each with a test in test_llmux.py, and all of
    them checked after every step of the seeded explorer (test_switcher_explorer):
    1. Exclusive residency: a sleep hook exits before the next wake hook starts; at most
       one model is awake (with policy.capacity: the awake sizes never exceed it).
    2. A slot is handed out only on an ACTIVE model (asserted in _new_slot).
    3. Strict drain: once a model is DRAINING, new requests for it queue.
    4. When a model becomes ACTIVE, every request waiting for it gets its slot at once
       (synchronously, in _schedule) before any later switch can drain it, up to its
       max_in_flight; the rest get theirs in arrival order as slots are released (each
       release ends in one _schedule pass).  So an ACTIVE model below its limit has an
       empty queue, and in_flight never exceeds max_in_flight.
    5. Every slot is released exactly once; a queued request that leaves is forgotten
       and no longer counts as demand (a drain with no demand left is abandoned).
    6. Every wait is bounded: request_timeout_secs in the queue, drain_timeout_secs for
       a drain, hook_timeout_secs for a hook (null in the config means unbounded).
    7. Hooks cannot hang the switcher: HookRunner kills a hook's process group on
       timeout and never waits for pipes that background children hold open.
    8. A failed wake runs the model's sleep hook, then fails its waiters with the wake
       hook's message; the model is not tried again for wake_backoff_secs.
    9. The state never lies: a model whose sleep failed is still loaded, stays ACTIVE
       and counts against the capacity, whoever asked for the sleep (a switch, a reload,
       a liveness failure, the control API).  Any exception in any phase of a switch
       (drain, each sleep, the wake), of any type, puts every model that phase moved back
       in the state that tells the truth (_restore).
    Between switches every model is ASLEEP or ACTIVE.

    A model found dead while ACTIVE (died(): its managed server exited, or its backend
    refused and it has no alive hook) becomes ASLEEP at once, its slots released and
    their requests cut, without a sleep hook: nothing is loaded any more.

    How state changes: only through _fire(model, event), which looks the pair up in
    _TRANSITIONS.  Every public method that changes anything ends in one _schedule()
    pass, the only place that decides; _schedule never awaits, so decisions cannot
    interleave.  The only awaits are in acquire(), in the one switch task, and in
    reconfigure(), which holds scheduling while it sleeps what a reload changed.
    """

    def __init__(self, config: Config, hooks: HookRunner, policy: SchedulingPolicy, log: Log,
                 clock: Optional[Callable[[], float]] = None,
                 on_sleep: Callable[[ModelConfig], None] = lambda cfg: None,
                 metrics: Optional[Metrics] = None, events: Optional[EventBus] = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.metrics = metrics or llmux_metrics()
        self.events = events if events is not None else EventBus()
        self.clock = clock or self.loop.time
        self.config = config
        self.policy_cfg = config.policy
        self.hooks = hooks
        self.policy = policy
        self.log = log
        self.on_sleep = on_sleep
        now = self.clock()
        self.models: Dict[str, _Model] = {n: _Model(c, now) for n, c in config.models.items()}
        self.queued = 0
        self.switching: Optional[Tuple[List[str], str]] = None  # (victims, target)
        self.costs: Dict[Tuple[str, str], float] = {}  # (from, to) -> EMA seconds
        # Each hook's own time, EMA seconds by model: a pair never measured is estimated
        # from its parts (the victims' sleeps, the target's wake).
        self.hook_costs: Dict[Tuple[str, str], float] = {}  # (model, "wake" | "sleep")
        self.drains: Deque[float] = collections.deque(maxlen=8)  # recent drain times
        self.history: Deque[Dict[str, Any]] = collections.deque(maxlen=32)
        self.switch_log: Optional[List[Dict[str, Any]]] = None  # every switch, when a list
        self.closed = False
        self.held = False  # a config reload is being applied: start no new switch
        # The switch in progress, for ETAs and status: its phase ("draining", "sleeping",
        # "waking"), the model that phase works on, when the switch and the phase began,
        # when its drain ended, and the cost (sleep + wake) expected for it (None: unknown).
        self.phase: Optional[Dict[str, Any]] = None
        # Model state changes, newest last, with wall-clock times: the dashboard's timeline.
        self.timeline: Deque[Dict[str, Any]] = collections.deque(maxlen=TIMELINE_LEN)
        self._depths: Optional[Tuple[int, ...]] = None  # queue depths last published
        self._switch_task: Optional["asyncio.Task[str]"] = None
        self._timer: Optional[asyncio.TimerHandle] = None
        self._idle_timers: Dict[str, Tuple[asyncio.TimerHandle, _Model]] = {}
        self._changed: Optional["asyncio.Future[None]"] = None
        self._reconfiguring = asyncio.Lock()

    # -- what policies and status read --

    def victims_for(self, target: _Model, now: float,
                    honour_min_active: bool = True) -> Optional[List[_Model]]:
        """The awake models to put to sleep so that ``target`` fits, in eviction order;
        None if room can only be made by evicting models held by min_active_secs."""
        awake = [m for m in self.models.values() if m is not target and m.state is ModelState.ACTIVE]
        capacity = self.policy_cfg.capacity
        if capacity is None:
            need, victims = (1.0 if awake else 0.0), awake  # one model at a time
        else:
            need = sum(m.cfg.size for m in awake) + target.cfg.size - capacity
            victims = []
        if need <= 1e-9:
            return []
        min_active = self.policy_cfg.min_active_secs if honour_min_active else 0.0
        free = [m for m in self.policy.eviction_order(self, awake, now)
                if m.active_since is None or now - m.active_since >= min_active or m.retired]
        if capacity is None:
            return victims if len(free) == len(awake) else None
        for m in free:
            victims.append(m)
            need -= m.cfg.size
            if need <= 1e-9:
                return victims
        return None

    def cost_estimate(self, victims: List[str], target: str) -> float:
        """Measured cost of sleeping ``victims`` and waking ``target``: the moving average
        for that pair, else for any switch to ``target``, else for any switch, else 0."""
        exact = self.costs.get((",".join(victims), target))
        if exact is not None:
            return exact
        parts = [self.hook_costs.get((v, "sleep")) for v in victims]
        parts.append(self.hook_costs.get((target, "wake")))
        if all(p is not None for p in parts):
            return sum(p for p in parts if p is not None)
        to_target = [v for (f, t), v in self.costs.items() if t == target]
        pool = to_target or list(self.costs.values())
        return sum(pool) / len(pool) if pool else 0.0

    def capacity_used(self) -> float:
        return sum(m.cfg.size for m in self.models.values() if m.state is not ModelState.ASLEEP)

    def candidates(self) -> List[_Model]:
        """Models a switch could go to now: waited for, ASLEEP, not backing off."""
        now = self.clock()
        return [m for m in self.models.values()
                if m.queue and m.state is ModelState.ASLEEP and m.backoff_until <= now]

    def active(self) -> List[str]:
        return [m.name for m in self.models.values() if m.state is ModelState.ACTIVE]

    def status(self) -> Dict[str, Any]:
        models: Dict[str, Any] = {}
        for m in self.models.values():
            models[m.name] = {"state": m.state.value, "in_flight": m.in_flight,
                              "queued": len(m.queue)}
            if m.cfg.max_in_flight is not None:
                models[m.name]["max_in_flight"] = m.cfg.max_in_flight
            if m.retired or m.pending_cfg is not None:
                models[m.name]["reload_pending"] = "removed" if m.retired else "changed"
        return {
            "state": "switching" if self.switching else "idle",
            "active": self.active(),
            "switching": ({"from": self.switching[0], "to": self.switching[1]}
                          if self.switching else None),
            "queued": self.queued,
            "capacity": self.policy_cfg.capacity,
            "capacity_used": self.capacity_used(),
            "models": models,
            "switch_cost_secs": {f"{frm or '-'}->{to}": round(secs, 6)
                                 for (frm, to), secs in self.costs.items()},
        }

    def detail(self) -> Dict[str, Any]:
        """status(), and what the dashboard and /llmux/status add: each model's size, since
        when (wall clock) it is in its state and its ETA; the phase of the switch in
        progress; the measured costs of each hook."""
        out = self.status()
        now = self.clock()
        wall = time.time()
        for m in self.models.values():
            eta = self.eta(m.name)
            out["models"][m.name].update(size=m.cfg.size, since=round(wall - (now - m.state_since), 3),
                                         eta_secs=None if eta is None else round(eta, 3))
        if out["switching"] is not None:
            out["switching"].update(self._phase_status(now, wall))
        out["hook_cost_secs"] = {f"{model} {hook}": round(secs, 6)
                                 for (model, hook), secs in self.hook_costs.items()}
        return out

    def _phase_status(self, now: float, wall: float) -> Dict[str, Any]:
        """The switch in progress: its phase, on which model, since when (wall clock),
        and the seconds it is expected to take yet (None: never measured)."""
        p = self.phase
        if p is None:
            return {}
        left = self._switch_left(now)
        return {"phase": p["phase"], "phase_model": p["model"] or None,
                "phase_since": round(wall - (now - p["since"]), 3),
                "started": round(wall - (now - p["started"]), 3),
                "eta_secs": None if left is None else round(left, 3)}

    def _measured(self, model: str, hook: str) -> None:
        """A wake or sleep of a switch has just exited 0: fold its time into hook_costs."""
        assert self.phase is not None
        secs = self.clock() - self.phase["since"]
        old = self.hook_costs.get((model, hook))
        self.hook_costs[(model, hook)] = secs if old is None else old + SWITCH_COST_EMA_ALPHA * (secs - old)

    def _enter_phase(self, phase: str, model: str) -> None:
        assert self.phase is not None
        self.phase["phase"], self.phase["model"], self.phase["since"] = phase, model, self.clock()
        self.events.publish("switch.phase", {"phase": phase, "model": model})

    def _publish_depths(self) -> None:
        """A ``queue`` event when a queue's depth or a model's requests in flight changed."""
        depths = tuple(n for m in self.models.values() for n in (len(m.queue), m.in_flight))
        if depths != self._depths:
            self._depths = depths
            self.events.publish("queue", {
                "queued": self.queued, "models": {m.name: len(m.queue) for m in self.models.values()},
                "in_flight": {m.name: m.in_flight for m in self.models.values()}})

    # -- ETAs: predicted from the measured costs, and judged (llmux_eta_error_seconds) --

    def known_cost(self, victims: List[str], target: str) -> Optional[float]:
        """What sleeping ``victims`` and waking ``target`` is measured to cost, for ETAs:
        the moving average for that pair, else the target's own wake plus each victim's
        sleep (a sleep never measured counts as the mean of those that were).  None while
        the target's wake was never measured: another model's cost says nothing of it."""
        exact = self.costs.get((",".join(victims), target))
        if exact is not None:
            return exact
        wake = self.hook_costs.get((target, "wake"))
        if wake is None:
            return None
        sleeps = [secs for (_, hook), secs in self.hook_costs.items() if hook == "sleep"]
        usual = sum(sleeps) / len(sleeps) if sleeps else 0.0
        return wake + sum(self.hook_costs.get((v, "sleep"), usual) for v in victims)

    def drain_estimate(self) -> float:
        """What a drain is expected to take: the mean of the last few."""
        return sum(self.drains) / len(self.drains) if self.drains else 0.0

    def _switch_left(self, now: float) -> Optional[float]:
        """Seconds the switch in progress is expected to take yet: the rest of its drain
        (expected as the recent mean), then its measured cost less what has run of it.
        0 when none runs, and when it takes longer than expected; None if never measured."""
        p = self.phase
        if p is None:
            return 0.0
        cost = p["cost"]
        if cost is None:
            return None
        if p["drained"] is None:
            victims = self.switching[0] if self.switching else []
            busy = any(self.models[v].in_flight for v in victims if v in self.models)
            drain = max(0.0, self.drain_estimate() - (now - p["started"])) if busy else 0.0
            return drain + cost
        return max(0.0, cost - (now - p["drained"]))

    def eta(self, name: str, waiter: Optional[_Waiter] = None) -> Optional[float]:
        """Seconds until ``name`` is expected to serve a request queued now (or ``waiter``):
        the rest of the switch in progress, then one drain and one switch for each model
        whose oldest waiting request is older than ``name``'s (fifo order: a model's
        waiters are served together), then its own.  0 if it serves now; None if unknown:
        a switch on the way was never measured (known_cost), or ``name`` is up but at its
        max_in_flight (that depends on how long the requests in flight generate)."""
        m = self.models.get(name)
        if m is None:
            return None
        if m.state is ModelState.ACTIVE:
            return 0.0 if m.has_room() and (not m.queue or m.queue[0] is waiter) else None
        now = self.clock()
        left = self._switch_left(now)
        if left is None:
            return None
        target = self.switching[1] if self.switching else None
        if target == name:
            return left
        if self.switching:
            awake = [target] if target else []
        else:
            awake = [a.name for a in self.models.values() if a.state is ModelState.ACTIVE]
        mine = m.oldest_wait()
        # Ahead: every other model waited for since before, that a switch must wake
        # (asleep, or being put to sleep by the switch in progress); not the target of
        # that switch (its wake is in ``left``), not an awake one (served without one).
        ahead = sorted((c for c in self.models.values()
                        if c is not m and c.name != target and c.queue
                        and c.state not in (ModelState.ACTIVE, ModelState.WAKING)
                        and (mine is None or c.queue[0].enqueued_at < mine)),
                       key=lambda c: c.queue[0].enqueued_at)
        drain = self.drain_estimate()
        t = left
        if not self.switching:  # the policy may keep what is up a while yet (cost: its quantum)
            first = ahead[0] if ahead else m
            if first.state is ModelState.ASLEEP:
                t = max(t, self.policy.start_at(self, first, now) - now)
        if awake and self.policy_cfg.capacity is None:
            # The model up now serves at least min_active_secs before it can be switched out.
            since = [t0 for t0 in (self.models[a].active_since for a in awake if a in self.models)
                     if t0 is not None]
            if since:
                t = max(t, max(since) + self.policy_cfg.min_active_secs - now)
        one_at_a_time = self.policy_cfg.capacity is None
        for c in ahead:
            cost = self.known_cost(awake if one_at_a_time else [], c.name)
            if cost is None:
                return None
            t += drain + cost
            awake = [c.name]
        cost = self.known_cost(awake if one_at_a_time else [], name)
        if cost is None:
            return None
        busy = not self.switching and any(self.models[a].in_flight for a in awake if a in self.models)
        t += (drain if busy or ahead else 0.0) + cost
        return max(t, m.backoff_until - now)

    def wait_info(self, waiter: _Waiter) -> Dict[str, Any]:
        """What a queued request waits for, for its loading status (Server._hold_stream):
        its place in the queue (at most that many are ahead: some may have left), the
        switch in progress and its phase, and the ETA.  O(models): no queue is scanned."""
        m = waiter.model
        now = self.clock()
        ahead = waiter.seq - m.queue[0].seq if m.queue else 0
        info: Dict[str, Any] = {"model": m.name, "state": m.state.value,
                                "position": max(1, min(ahead + 1, len(m.queue))),
                                "queued": len(m.queue),
                                "waited_secs": now - waiter.enqueued_at,
                                "eta_secs": self.eta(m.name, waiter)}
        if self.switching and self.phase is not None:
            info.update(switch=f"{','.join(self.switching[0])}->{self.switching[1]}",
                        phase=self.phase["phase"], phase_model=self.phase["model"],
                        phase_secs=now - self.phase["since"])
        return info

    # -- requests --

    async def acquire(self, name: str) -> Slot:
        """Wait for a slot on model ``name`` (switching to it if need be).

        Raises LLMuxError 503 when the queue is full, 504 after request_timeout_secs,
        HookError when the switch to ``name`` failed.
        """
        ticket = self.enqueue(name)
        if isinstance(ticket, Slot):
            return ticket
        slot = await self.wait(ticket)
        assert slot is not None
        return slot

    def enqueue(self, name: str) -> Union[Slot, _Waiter]:
        """A slot on ``name`` at once, or the request's place in its queue: then wait()
        for it, or leave() it.  Raises as acquire() does when it cannot queue."""
        m = self.models.get(name)
        if m is None or m.retired:
            raise _model_removed(name)
        now = self.clock()
        m.demand = m.recent_demand(now) + 1.0
        m.demand_at = now
        # Behind earlier waiters of an ACTIVE model at its limit, a request queues too:
        # slots go in arrival order.
        if m.state is ModelState.ACTIVE and m.has_room() and not m.queue:
            self.metrics.observe("llmux_request_queue_wait_seconds", name, value=0.0)
            slot = self._new_slot(m, asyncio.current_task())
            if self.events.subscribers:
                self._publish_depths()
            return slot
        if self.closed:
            raise _shutting_down()
        if self.queued >= self.policy_cfg.max_queue:
            raise LLMuxError(f"too many requests waiting ({self.queued}); retry later",
                             status=503, code="queue_full",
                             headers=[("retry-after", str(RETRY_AFTER_BUSY))])
        waiter = _Waiter(m, self.loop.create_future(), self.clock())
        m.queue.append(waiter)
        self.queued += 1
        timeout = self.policy_cfg.request_timeout_secs
        if timeout is not None:
            waiter.handle = self.loop.call_later(timeout, self._expire, waiter)
        try:
            self._schedule()
            waiter.eta = self.eta(name, waiter)  # after the pass: the switch it started counts
        except BaseException:
            self.leave(waiter)
            raise
        self.log.info("request.queued", model=name, state=m.state.value, waiting=len(m.queue),
                      eta_secs=None if waiter.eta is None else round(waiter.eta, 3))
        return waiter

    async def wait(self, waiter: _Waiter, timeout: Optional[float] = None) -> Optional[Slot]:
        """The slot ``waiter`` waits for; None if ``timeout`` seconds pass first (it stays
        queued: wait again, or leave()).  Cancelled or failed, it leaves the queue."""
        try:
            if timeout is not None and not waiter.future.done():
                done, _ = await asyncio.wait([waiter.future], timeout=timeout)
                if not done:
                    return None
            slot = await waiter.future
        except asyncio.CancelledError:
            fut = waiter.future
            given = fut.result() if fut.done() and not fut.cancelled() and fut.exception() is None else None
            self.leave(waiter)  # off the queue, or the slot it was given released
            if given is None or given.cut is None:
                raise  # its client left, or shutdown
            # The slot it was given was cut (its model died) before its task resumed: that
            # is the switcher's doing, not the client's, and the client is told so.
            task = asyncio.current_task()
            if task is not None and hasattr(task, "uncancel"):
                task.uncancel()  # 3.11+: this cancellation was handled here
            raise _request_cut(given.model.cfg, given.cut) from None
        except BaseException:
            self.leave(waiter)  # it failed: off the queue
            raise
        if waiter.handle is not None:
            waiter.handle.cancel()
        name = waiter.model.name
        self.metrics.observe("llmux_request_queue_wait_seconds", name, value=slot.waited)
        self.metrics.observe("llmux_request_wait_seconds", name,
                             (slot.waited_for or "switch").split(" ", 1)[0], value=slot.waited)
        if slot.eta is not None and (slot.waited_for or "").startswith("switch"):
            self.metrics.observe("llmux_eta_error_seconds", name, value=abs(slot.waited - slot.eta))
        return slot

    def leave(self, waiter: _Waiter) -> None:
        """The request behind ``waiter`` no longer waits (its client left, or its wait failed)."""
        if waiter.handle is not None:
            waiter.handle.cancel()
        self._forget(waiter)

    def _new_slot(self, m: _Model, task: Optional["asyncio.Task[Any]"]) -> Slot:
        assert m.state is ModelState.ACTIVE and m.has_room()  # invariants 2 and 4
        m.in_flight += 1
        slot = Slot(self, m, task)
        m.slots.add(slot)
        return slot

    def _release(self, slot: Slot) -> None:
        m = slot.model
        m.in_flight -= 1
        m.slots.discard(slot)
        m.last_used = self.clock()
        if self.queued or self.switching:
            self._schedule()
        else:
            if self.events.subscribers:
                self._publish_depths()
            if m.in_flight == 0:
                self._arm_idle(m)

    def _forget(self, waiter: _Waiter) -> None:
        """A queued request left (client gone): drop it, or release what it was given."""
        fut = waiter.future
        if fut.done() and not fut.cancelled() and fut.exception() is None:
            fut.result().release()  # granted, but the task was cancelled before it resumed
            return
        try:  # the task's cancellation has cancelled the future; it may still be queued
            waiter.model.queue.remove(waiter)
        except ValueError:
            return
        self.queued -= 1
        self._schedule()

    def _expire(self, waiter: _Waiter) -> None:
        if waiter.future.done():
            return
        try:
            waiter.model.queue.remove(waiter)
        except ValueError:
            pass  # already taken off by a reload or a failure
        else:
            self.queued -= 1
        timeout = self.policy_cfg.request_timeout_secs
        waiter.future.set_exception(LLMuxError(
            f"model '{waiter.model.name}' did not become available within {timeout:g}s "
            f"(request_timeout_secs)", status=504, code="request_timeout"))
        self._schedule()

    # -- decisions: synchronous, never await --

    def _schedule(self) -> None:
        """The one decision pass: grant what can be granted, then maybe start a switch."""
        for m in self.models.values():
            if m.queue and m.state is ModelState.ACTIVE:
                self._grant(m)  # invariant 4
        if self.events.subscribers:
            self._publish_depths()
        if self._changed is not None and not self._changed.done():
            self._changed.set_result(None)
        if self._switch_task is not None or self.closed or self.held:
            return
        now = self.clock()
        target_name, when = self.policy.choose(self, now)
        backoff = [m.backoff_until for m in self.models.values()
                   if m.queue and m.backoff_until > now and m.state is ModelState.ASLEEP]
        if target_name is None:
            self._set_timer(min([t for t in [when, *backoff] if t is not None], default=None))
            return
        target = self.models[target_name]
        victims = self.victims_for(target, now)
        if victims is None:  # room only by evicting models held by min_active_secs
            min_active = self.policy_cfg.min_active_secs
            self._set_timer(min(m.active_since + min_active for m in self.models.values()
                                if m.state is ModelState.ACTIVE and m.active_since is not None
                                and now - m.active_since < min_active))
            return
        self._set_timer(None)
        self._start_switch(target, victims, False, "")

    def _start_switch(self, target: Optional[_Model], victims: List[_Model], forced: bool,
                      reason: str) -> "asyncio.Task[str]":
        if target is None:
            why = reason
        else:
            why = f"switching to '{target.name}'" + (f" ({reason})" if reason else "")
        for v in victims:
            self._fire(v, ModelEvent.DRAIN, why)
        self.switching = ([v.name for v in victims], target.name if target is not None else "")
        now = self.clock()
        frm = ",".join(v.name for v in victims)
        self.phase = {"phase": "draining" if victims else "starting", "model": frm,
                      "started": now, "since": now,
                      "drained": None,
                      "cost": self.known_cost([v.name for v in victims], target.name) if target else 0.0}
        task = self.loop.create_task(self._run_switch(target, victims, forced, reason))
        self._switch_task = task
        return task

    def _grant(self, m: _Model) -> None:
        now = self.clock()
        while m.queue and m.has_room():
            waiter = m.queue.popleft()
            self.queued -= 1
            if not waiter.future.done():
                slot = self._new_slot(m, waiter.task)
                slot.waited = now - waiter.enqueued_at
                slot.eta = waiter.eta
                if m.active_since is not None and m.active_since >= waiter.enqueued_at:
                    slot.waited_for = f"switch {m.woken_by or '?'}"  # it was woken meanwhile
                else:  # it was already up: a slot was released, or a drain was undone
                    slot.waited_for = "drain" if m.undrained_at >= waiter.enqueued_at else "max_in_flight"
                waiter.future.set_result(slot)

    def _set_timer(self, when: Optional[float]) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if when is not None:
            self._timer = self.loop.call_later(max(0.0, when - self.clock()) + TIMER_SLACK,
                                               self._schedule)

    def _fire(self, m: _Model, event: ModelEvent, reason: str = "") -> None:
        """The one place a model's state changes: (state, event) -> next state."""
        state = _TRANSITIONS.get((m.state, event))
        if state is None:
            raise IllegalTransition(f"model '{m.name}': event {event.value} is illegal in "
                                    f"state {m.state.value}")
        now = self.clock()
        self.log.info("model.state", model=m.name, from_=m.state.value, to=state.value,
                      after_secs=round(now - m.state_since, 3), reason=reason or None,
                      on=event.value)
        self.timeline.append({"at": round(time.time(), 3), "model": m.name, "from": m.state.value,
                              "to": state.value, "on": event.value, "reason": reason or None})
        m.state = state
        m.state_since = now
        m.transitions += 1
        if event is ModelEvent.UNDRAIN:
            m.undrained_at = now
        if state is ModelState.ACTIVE:
            if m.active_since is None:
                m.active_since = now
                m.last_used = now
            if event is ModelEvent.SLEEP_FAILED:
                m.last_used = now  # an idle sleep that failed is retried one period later
            self._arm_idle(m)
        elif state is ModelState.ASLEEP:
            if m.active_since is not None:
                self.metrics.observe("llmux_model_active_duration_seconds", m.name,
                                     value=now - m.active_since)
            m.active_since = None
            self._asleep(m)

    def _asleep(self, m: _Model) -> None:
        """A model is asleep for sure: apply what a reload left pending for it."""
        try:
            self.on_sleep(m.cfg)
        except Exception as e:  # a callback's bug must not leave the switch half-done
            self._internal_error("on_sleep", e)
        if m.retired:
            self._fail_waiters(m, lambda: _model_removed(m.name))
            if self.models.get(m.name) is m:
                del self.models[m.name]
            self.log.info("reload.applied", model=m.name, change="removed")
        elif m.pending_cfg is not None:
            m.cfg, m.pending_cfg = m.pending_cfg, None
            self.log.info("reload.applied", model=m.name, change="changed")

    def _internal_error(self, where: str, e: BaseException) -> None:
        """An exception nobody expected: logged once with its traceback, and counted."""
        log_internal_error(self.log, self.metrics, where, e)

    # -- the switch task --

    async def _run_switch(self, target: Optional[_Model], victims: List[_Model],
                          forced: bool = False, reason: str = "") -> str:
        """Drain and sleep ``victims``, then wake ``target`` (None: only sleep them).

        ``forced`` (the control API, preload, reload, liveness) switches even with no
        request waiting.  Returns "ok", "failed" or "abandoned"; never raises but for
        cancellation (close()), after which the states tell the truth too.
        """
        started = self.clock()
        frm = ",".join(v.name for v in victims)
        to = target.name if target is not None else ""
        self.log.info("switch.start", from_=frm or None, to=to or None,
                      waiting=len(target.queue) if target else None, reason=reason or None)
        result = "failed"
        drain_secs = 0.0
        failure: Optional[str] = None  # why it failed, for the log and /llmux/status
        try:
            if target is not None:  # before anything is drained or slept for nothing
                self._check_port_free(target, victims)
            # Phase 1: drain.
            if victims:
                if not await self._drain(target, victims, forced):
                    for v in victims:
                        self._fire(v, ModelEvent.UNDRAIN, "no request waits for the target")
                    result = "abandoned"
                    return result
                drain_secs = self.clock() - started
                self.drains.append(drain_secs)
            if self.phase is not None:
                self.phase["drained"] = self.clock()
            # Phase 2: sleep each victim.  A failure stops here (_restore undrains the rest).
            for v in victims:
                self._enter_phase("sleeping", v.name)
                self._fire(v, ModelEvent.SLEEP, reason)
                await self.hooks.run(v.cfg, "sleep")
                self._measured(v.name, "sleep")
                self._fire(v, ModelEvent.SLEPT)
            # Phase 3: wake.
            if target is not None:
                self._enter_phase("waking", to)
                self._fire(target, ModelEvent.WAKE)
                await self.hooks.run(target.cfg, "wake")
                self._measured(to, "wake")
                target.woken_by = f"{frm}->{to}"
                self._fire(target, ModelEvent.WOKE)
                secs = self.clock() - started - drain_secs
                old = self.costs.get((frm, to))
                self.costs[(frm, to)] = secs if old is None else old + SWITCH_COST_EMA_ALPHA * (secs - old)
            result = "ok"
            return result
        except asyncio.CancelledError:
            self._restore(target, victims, None)
            raise
        except Exception as e:
            failure = _reason(e)
            if not isinstance(e, (HookError, _PortHeld)):
                self._internal_error("switch", e)
            await self._restore_and_clean(target, victims, e)
            return result
        finally:
            secs = self.clock() - started
            self.log.info("switch.end", from_=frm or None, to=to or None, result=result,
                          secs=round(secs, 3), drain_secs=round(drain_secs, 3), error=failure)
            record = {"from": frm or None, "to": to or None, "result": result,
                      "reason": reason or None, "secs": round(secs, 6),
                      "drain_secs": round(drain_secs, 6), "at": time.time(), "error": failure}
            self.history.append(record)
            if self.switch_log is not None:
                self.switch_log.append(record)
            self.metrics.inc("llmux_switch_total", frm, to, result)
            self.metrics.observe("llmux_switch_duration_seconds", frm, to, value=secs)
            self.metrics.observe("llmux_switch_drain_duration_seconds", frm, to, value=drain_secs)
            self._switch_task = None
            self.switching = None
            self.phase = None
            if not self.closed:
                try:
                    self._schedule()
                except Exception as e:
                    self._internal_error("schedule", e)

    def _check_port_free(self, target: _Model, victims: List[_Model]) -> None:
        """Raise _PortHeld if another model still loaded, and not slept by this switch,
        serves on ``target``'s port: one a reload removed or moved, whose sleep failed,
        keeps its old port until a sleep succeeds (retried: _arm_idle), and a model the
        reload gave that port would be answered by it."""
        for m in self.models.values():
            if m is not target and m not in victims and m.state is not ModelState.ASLEEP \
                    and m.cfg.port == target.cfg.port:
                why = "removed by a config reload" if m.retired else "changed by a config reload"
                raise _PortHeld(f"its port {target.cfg.port} is still held by model '{m.name}' "
                                f"({why}; still loaded, as its sleep failed); it wakes once "
                                f"'{m.name}' sleeps")

    def _restore(self, target: Optional[_Model], victims: List[_Model],
                 error: Optional[BaseException]) -> List[_Model]:
        """After a switch failed (``error``) or was cancelled (None) at any point: put
        every model it moved in the state that tells the truth.  Returns the models
        whose sleep hook must still run to clean up (a target whose wake failed)."""
        why = "the switch was interrupted" if error is None else f"the switch failed: {_reason(error)}"
        for v in victims:
            if v.state is ModelState.DRAINING:  # not slept yet: still loaded and serving
                self._fire(v, ModelEvent.UNDRAIN, why)
            elif v.state is ModelState.SLEEPING:  # its sleep failed or was cut: still loaded
                self._fire(v, ModelEvent.SLEEP_FAILED, f"its sleep did not complete; still loaded ({why})")
        cleanup = []
        if target is not None and target.state is ModelState.WAKING:
            self._fire(target, ModelEvent.WAKE_FAILED, why)
            cleanup.append(target)  # SLEEPING until its sleep hook has run
        return cleanup

    async def _restore_and_clean(self, target: Optional[_Model], victims: List[_Model],
                                 error: BaseException) -> None:
        """_restore, then clean up a failed wake, then answer the target's waiters:
        clean up first, so a client that sees the failure sees a clean state (inv. 8)."""
        for m in self._restore(target, victims, error):
            if isinstance(error, HookError) and error.result.error is not None \
                    and error.result.hook == "wake" and error.result.model == m.name:
                # Its wake hook could not even start (out of fds, no sh): nothing can have
                # been loaded, so nothing is to clean up (a cleanup could fail the same way
                # and count it as loaded, and it would never be woken).
                self._fire(m, ModelEvent.SLEPT, "its wake hook could not start; nothing loaded")
                continue
            try:
                await self.hooks.run(m.cfg, "sleep")
                self._fire(m, ModelEvent.SLEPT, "its wake failed; cleaned up")
            except asyncio.CancelledError:
                raise  # close(): it stays SLEEPING, so sleep_on_exit runs its sleep hook
            except Exception as e:
                if not isinstance(e, HookError):
                    self._internal_error("switch.cleanup", e)
                # Its wake may have loaded it before failing: without a sleep that worked
                # it is counted as loaded (invariant 9), and slept before any other wake.
                self._fire(m, ModelEvent.SLEEP_FAILED, "its wake and its cleanup sleep failed; "
                                                       "it may be loaded: counted as loaded")
        if target is not None:
            now = self.clock()
            target.backoff_until = now + self.policy_cfg.wake_backoff_secs
            retry = _retry_after(target.backoff_until, now)  # the next try starts then

            def failed() -> LLMuxError:
                e: LLMuxError
                if isinstance(error, HookError):
                    e = HookError(error.message, error.result)
                else:
                    e = LLMuxError(f"the switch to model '{target.name}' failed: "
                                   f"{_reason(error)}", status=503, code="switch_failed")
                e.headers = list(retry)
                return e

            self._fail_waiters(target, failed)

    # -- explicit operations: control API, idle sleep, liveness, start-up, reload --

    def busy(self) -> bool:
        """True while a switch (or a sleep) runs."""
        return self._switch_task is not None

    def busy_reason(self) -> Optional[str]:
        """Why no explicit wake or sleep can start now, or None."""
        if self.switching:
            return (f"a switch is in progress ({', '.join(self.switching[0]) or '-'} -> "
                    f"{self.switching[1] or '-'})")
        if self.held:
            return "a config reload is being applied"
        return None

    def start_wake(self, name: str, reason: str) -> "Optional[asyncio.Task[str]]":
        """Switch to ``name`` now even if no request waits; None if a switch runs, a
        reload is being applied, or ``name`` is not ASLEEP."""
        m = self.models.get(name)
        if m is None or self.busy() or self.held or self.closed or m.retired \
                or m.state is not ModelState.ASLEEP:
            return None
        # An explicit request overrides min_active_secs; then every awake model may go,
        # and every size fits the capacity (parse_config checks), so room can be made.
        victims = self.victims_for(m, self.clock(), honour_min_active=False)
        assert victims is not None
        return self._start_switch(m, victims, True, reason)

    def start_sleep(self, name: str, reason: str) -> "Optional[asyncio.Task[str]]":
        """Drain and sleep the ACTIVE model ``name``; None if it is not ACTIVE, a switch
        runs, or a reload is being applied."""
        m = self.models.get(name)
        if m is None or self.busy() or self.held or self.closed or m.state is not ModelState.ACTIVE:
            return None
        return self._start_switch(None, [m], True, reason)

    async def wait_idle(self) -> None:
        """Wait until no switch runs."""
        while self._switch_task is not None:
            task = self._switch_task
            try:
                await asyncio.shield(task)
            except asyncio.CancelledError:
                if not task.cancelled():
                    raise  # we were cancelled, not the switch
            except Exception:
                pass  # _run_switch logs its own failures

    def adopt(self, name: str) -> None:
        """Mark ``name`` ACTIVE without waking it: it was found up at start."""
        self._fire(self.models[name], ModelEvent.ADOPT, "found alive at start (adopted)")
        self._schedule()

    def unchanged(self, m: "_Model", before: Tuple[int, ModelConfig]) -> bool:
        """Whether ``m`` is still, and active as, what ``before`` (its transitions and its
        config, taken as a check began) described: a verdict about the model as it was
        says nothing about it once it was switched out (and back in), removed or reloaded."""
        return self.models.get(m.name) is m and m.state is ModelState.ACTIVE \
            and m.transitions == before[0] and m.cfg is before[1]

    def alive_failed(self, name: str) -> "Optional[asyncio.Task[str]]":
        """The alive hook of ACTIVE ``name`` failed: drain it and run its sleep hook
        (its sleep failing leaves it ACTIVE: the next check tries again)."""
        self.log.warning("model.alive_failed", model=name)
        return self.start_sleep(name, "its alive hook failed")

    def died(self, name: str, reason: str) -> bool:
        """ACTIVE ``name`` is dead (its server exited, or its backend refused and it has
        no alive hook): cut its requests in flight, mark it ASLEEP without a sleep hook,
        and let the next request wake it again after wake_backoff_secs.  False (nothing
        done) if it is not ACTIVE."""
        m = self.models.get(name)
        if m is None or m.state is not ModelState.ACTIVE:
            return False
        self.log.error("model.died", model=name, reason=reason, requests_cut=m.in_flight or None)
        self.metrics.inc("llmux_model_crashes_total", name)
        slots = list(m.slots)
        self._fire(m, ModelEvent.DIED, reason)  # first: a release must not decide on ACTIVE
        for slot in slots:  # released now: no slot outlives its model's ACTIVE state
            if slot.task is not None:
                self.log.warning("request.cut", model=name, reason=reason)
                slot.cut = f"its model's server died ({reason})"
                slot.task.cancel()
            slot.release()
        m.backoff_until = self.clock() + self.policy_cfg.wake_backoff_secs
        self._schedule()
        return True

    def _arm_idle(self, m: _Model) -> None:
        """Schedule the idle check of an ACTIVE model with nothing in flight."""
        secs = m.cfg.idle_sleep_secs if m.cfg.idle_sleep_secs is not None else self.policy_cfg.idle_sleep_secs
        if m.retired or m.pending_cfg is not None:
            secs = secs or RETIRED_SLEEP_RETRY  # a removed or changed model's sleep is retried
        if not secs or m.state is not ModelState.ACTIVE or m.in_flight or self.closed:
            return
        when = m.last_used + secs
        timer, of = self._idle_timers.get(m.name, (None, None))
        if timer is not None and of is m and timer.when() <= when:
            return  # it fires first and re-arms itself for the later time
        if timer is not None:
            timer.cancel()  # (or it was a removed model's of the same name)
        self._idle_timers[m.name] = (self.loop.call_at(when, self._idle_check, m), m)

    def _idle_check(self, m: _Model) -> None:
        if self._idle_timers.get(m.name, (None, None))[1] is m:
            del self._idle_timers[m.name]
        secs = m.cfg.idle_sleep_secs if m.cfg.idle_sleep_secs is not None else self.policy_cfg.idle_sleep_secs
        if m.retired or m.pending_cfg is not None:
            secs = secs or RETIRED_SLEEP_RETRY
        if not secs or m.state is not ModelState.ACTIVE or m.in_flight or m.queue:
            return
        if self.clock() < m.last_used + secs - 1e-3:
            self._arm_idle(m)
        elif self.start_sleep(m.name, "removed by a config reload" if m.retired else
                              "changed by a config reload" if m.pending_cfg is not None else
                              f"idle for {secs:g}s (idle_sleep_secs)") is None:
            m.last_used = self.clock()  # a switch runs: look again one period later
            self._arm_idle(m)

    async def reconfigure(self, config: Config) -> Dict[str, List[str]]:
        """_reconfigure, then, whatever it raised, one decision pass: a reload that failed
        half-way must not leave waiting demand without a switch or a timer."""
        try:
            return await self._reconfigure(config)
        finally:
            if not self.closed:
                self._schedule()
                for m in list(self.models.values()):
                    self._arm_idle(m)  # a new or shorter idle_sleep_secs applies now

    async def _reconfigure(self, config: Config) -> Dict[str, List[str]]:
        """Apply a reloaded config.  Unchanged models are not touched.  A changed or
        removed model that is loaded is drained and put to sleep (with its old hooks)
        first; if its sleep fails it keeps running with its old config, still counted
        against the capacity, and the change applies when a later sleep succeeds.
        Requests queued for a removed model are failed.  Returns what changed."""
        async with self._reconfiguring:
            if self.closed:  # shutting down: a switch it cut may have left a model SLEEPING
                return {"added": [], "changed": [], "updated": [], "removed": []}
            now = self.clock()
            added = [n for n in config.models if n not in self.models or self.models[n].retired]
            for name in added:  # asleep: harmless, and requests for them can queue now
                if name not in self.models:  # (a retired one still loaded is kept: below)
                    self.models[name] = _Model(config.models[name], now)
            # While held, nothing but this reload starts a switch (not even the control
            # API: it gets 409), so what is compared below cannot move under it.  A switch
            # already running may be waking or sleeping a model that changes: let it end.
            self.held = True
            try:
                await self.wait_idle()
                old = {n: m.cfg for n, m in self.models.items()
                       if not m.retired and n not in added}
                changed = [n for n in old if n in config.models
                           and _needs_restart(old[n], config.models[n])]
                removed = [n for n in old if n not in config.models]
                # A change that does not touch what runs (aliases, limits, progress...)
                # applies at once, to a loaded model too: a reload does not stop it.
                updated = [n for n in old if n in config.models and n not in changed
                           and old[n] != config.models[n] and self.models[n].pending_cfg is None]
                for name in updated:
                    self.models[name].cfg = config.models[name]
                for name in changed + removed:
                    m = self.models[name]
                    if m.state is ModelState.ACTIVE and not self.closed:
                        if not await self._sleep_for_reload(m, "config reload"):
                            self.log.error("reload.sleep_failed", model=name,
                                           keeping="its old config until a sleep succeeds")
                    if m.state is ModelState.ASLEEP and not self.closed:
                        # Asleep in sleep mode, its managed server still runs: it is not
                        # what the new config describes (or there is none), so it goes.
                        await self.hooks.stop_server(name)
                # A smaller capacity (or one model at a time again) sleeps what no longer
                # fits, in eviction order, before the new config takes over.
                while not self.closed:
                    awake = [m for m in self.models.values() if m.state is ModelState.ACTIVE]
                    capacity = config.policy.capacity
                    if (len(awake) <= 1) if capacity is None else \
                            sum(m.cfg.size for m in awake) <= capacity + 1e-9:
                        break
                    victim = self.policy.eviction_order(self, awake, self.clock())[0]
                    if not await self._sleep_for_reload(victim, "config reload: capacity"):
                        self.log.error("reload.sleep_failed", model=victim.name,
                                       keeping="loaded beyond the new capacity until a "
                                               "sleep succeeds")
                        break
            finally:
                self.held = False
            for name in removed:
                m = self.models[name]
                self._fail_waiters(m, lambda: _model_removed(name))
                if m.state is ModelState.ASLEEP:
                    del self.models[name]
                else:
                    m.retired = True  # still loaded: slept when idle (_arm_idle retries)
                    self._arm_idle(m)
            for name, cfg in config.models.items():
                known = self.models.get(name)
                if known is None:  # a retired model of that name was slept and dropped meanwhile
                    self.models[name] = _Model(cfg, now)
                elif known.state is ModelState.ASLEEP:
                    known.cfg, known.pending_cfg, known.retired = cfg, None, False
                elif known.cfg != cfg or known.retired:
                    known.pending_cfg, known.retired = cfg, False  # loaded with its old config
            self.config = config
            self.policy_cfg = config.policy
            if self.policy.name != config.policy.name:
                self.policy = POLICIES[config.policy.name]()
            self._schedule()
            return {"added": added, "changed": changed, "updated": updated, "removed": removed}



    async def _sleep_for_reload(self, m: _Model, reason: str) -> bool:
        """Drain and sleep ``m`` while a reload holds the switcher; True if it is asleep."""
        task = self._start_switch(None, [m], True, reason)
        return await asyncio.shield(task) == "ok" and m.state is ModelState.ASLEEP

    async def _drain(self, target: Optional[_Model], victims: List[_Model], forced: bool) -> bool:
        """Wait until the victims have nothing in flight; False if nobody waits any more."""
        if not self.policy_cfg.drain_before_switch:
            self._cut(victims, "drain_before_switch is false")
        timeout = self.policy_cfg.drain_timeout_secs
        deadline = None if timeout is None else self.clock() + timeout
        while any(v.in_flight for v in victims):
            if target is not None and not forced and not target.queue:
                return False
            remaining = None if deadline is None else deadline - self.clock()
            if remaining is not None and remaining <= 0:
                self._cut(victims, f"drain took longer than {timeout:g}s (drain_timeout_secs)")
                deadline = remaining = None
            self._changed = self.loop.create_future()
            try:
                await asyncio.wait_for(self._changed, remaining)
            except asyncio.TimeoutError:
                pass
        return forced or target is None or bool(target.queue)

    def _cut(self, victims: List[_Model], reason: str) -> None:
        for v in victims:
            for slot in list(v.slots):
                if slot.task is not None:
                    self.log.warning("request.cut", model=v.name, reason=reason)
                    slot.cut = reason
                    slot.task.cancel()

    def _fail_waiters(self, m: _Model, make_error: Callable[[], BaseException]) -> None:
        """Empty ``m``'s queue, failing each request still waiting with a new error."""
        while m.queue:
            waiter = m.queue.popleft()
            self.queued -= 1
            if not waiter.future.done():
                waiter.future.set_exception(make_error())

    async def close(self) -> None:
        """Stop switching: cancel the timer and a running switch."""
        self.closed = True
        self._set_timer(None)
        for timer, _ in self._idle_timers.values():
            timer.cancel()
        for m in self.models.values():
            self._fail_waiters(m, _shutting_down)
        task = self._switch_task
        if task is not None:
            task.cancel()
            try:
                await task
            except BaseException:
                pass


# ───────────────────────────────────────── server ───────────────────────────────────────


class _Idle(Exception):
    """A keep-alive connection stayed quiet for idle_timeout_secs."""


class _ClientProtocol(asyncio.StreamReaderProtocol):
    """A client connection.  When the client goes away (EOF or reset) the task serving
    it is cancelled at once, wherever it is: queued for a model, or relaying."""

    # Each connection's state starts as these class attributes say (one is set on the
    # instance when it changes: a new connection costs no assignment for them).
    _llmux_task: Optional["asyncio.Task[None]"] = None
    gone = False
    write_paused = False
    upstream: Optional[_Upstream] = None  # the backend piping into us now
    model: Optional[str] = None  # of the request being served, for the log
    responding = False  # a byte of the current request's answer was written
    relayed = False  # a byte of the backend's answer was written (held streams)
    refused = False  # answered 503 at admission; counted in Server._refusing
    idle_since: Optional[float] = None  # waiting for a request, nothing buffered
    peer_ip: Optional[str] = None  # in Server._peers (None: loopback, or not yet)
    setup_ip: Optional[str] = None  # counted in Server._peer_setup (accepted, not admitted)
    counted = False  # in Server's connection table (admitted, not yet forgotten)
    _stall: Optional[asyncio.TimerHandle] = None
    _llmux_writer: Optional[asyncio.StreamWriter] = None
    deadline: Optional[_ReadDeadline] = None  # its reads' timeout (read_request)
    _watch: Optional[asyncio.TimerHandle] = None  # while reading is paused

    def __init__(self, server: "Server") -> None:
        self._llmux_server = server
        super().__init__(asyncio.StreamReader(limit=STREAM_LIMIT), self._llmux_connected)

    def pause_writing(self) -> None:
        super().pause_writing()
        self.write_paused = True
        if self.upstream is not None:
            self.upstream.pause()
        timeout = self._llmux_server.config.http.send_timeout_secs
        self._stall = asyncio.get_running_loop().call_later(timeout, self._llmux_stalled, timeout)

    def resume_writing(self) -> None:
        super().resume_writing()
        self.write_paused = False
        if self._stall is not None:
            self._stall.cancel()
            self._stall = None
        if self.upstream is not None:
            self.upstream.resume()

    def _llmux_stalled(self, timeout: float) -> None:
        """The client has read nothing for send_timeout_secs: it will not hold a slot."""
        self._llmux_server.log.warning("request.cut", model=self.model,
                                       reason=f"client read nothing for {timeout:g}s")
        if self._llmux_writer is not None:
            self._llmux_writer.transport.abort()  # connection_lost cancels the task serving it

    def _llmux_connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._llmux_writer = writer
        self.deadline = _ReadDeadline(asyncio.get_running_loop(), reader)
        self._llmux_task = asyncio.get_running_loop().create_task(
            self._llmux_server._serve_connection(reader, writer, self))

    def _llmux_gone(self) -> None:
        if not self.gone:
            self.gone = True
            task = self._llmux_task
            if task is not None and not task.done() and self._llmux_server._busy.get(self):
                task.cancel()

    def data_received(self, data: bytes) -> None:
        self.idle_since = None  # a request is starting: no longer evictable
        super().data_received(data)
        writer = self._llmux_writer
        if self._watch is None and writer is not None and not _reading(writer):
            # The reader holds 2 x STREAM_LIMIT unread (a client far ahead): it stopped
            # reading the socket, and with it the news of the client's reset or close.
            self._watch = asyncio.get_running_loop().call_later(
                PAUSED_CLIENT_CHECK_SECS, self._llmux_check_gone)

    def _llmux_check_gone(self) -> None:
        self._watch = None
        writer = self._llmux_writer
        if self.gone or writer is None or writer.transport.is_closing() or _reading(writer):
            return  # gone already, or read again (an EOF or reset is seen as it comes)
        if _peer_gone(writer.transport.get_extra_info("socket")):
            self._llmux_gone()  # the task serving it is cancelled
            writer.transport.abort()
            return
        self._watch = asyncio.get_running_loop().call_later(
            PAUSED_CLIENT_CHECK_SECS, self._llmux_check_gone)

    def eof_received(self) -> bool:
        self._llmux_gone()
        return bool(super().eof_received())

    def connection_lost(self, exc: Optional[Exception]) -> None:
        if self.deadline is not None:
            self.deadline.close()
        if self._stall is not None:
            self._stall.cancel()
        if self._watch is not None:
            self._watch.cancel()
        if self.refused:  # its fd is closed now: one fewer being refused
            self.refused = False
            self._llmux_server._refusing -= 1
        self._llmux_server._unsetup(self)
        self._llmux_server._flushing.discard(self)
        if self._llmux_writer is not None:
            self._llmux_server._accepting.discard(self._llmux_writer.transport)
        self._llmux_gone()
        super().connection_lost(exc)
        # StreamReaderProtocol keeps the reset in a future that only its own __del__
        # retrieves; the garbage collector may finalize the future first, and asyncio then
        # reported "Future exception was never retrieved" (an internal.error, under load).
        closed = getattr(self, "_closed", None)
        if isinstance(closed, asyncio.Future) and closed.done() and not closed.cancelled():
            closed.exception()


# Reading ``model`` from a body.  The body may be 64 MB: nothing here builds the document,
# recurses, or backtracks; every step consumes input, and the regexes are handed bounded
# windows, so time is linear in the body and memory does not grow with it.

_JSON_WS = rb"[ \t\r\n]*"  # RFC 8259 section 2
_JSON_WS_RUN = re.compile(_JSON_WS)
# The strings that decode to "model", after their opening quote (a JSON escape spells a
# letter as \u00XX, hex digits in either case).  At most 31 bytes, so a window that
# cannot show one whole cannot show the string's end either.
_JSON_MODEL_TEXT = (rb'(?:m|\\u006[dD])(?:o|\\u006[fF])(?:d|\\u0064)(?:e|\\u0065)'
                    rb'(?:l|\\u006[cC])"')
# One run the JSON scanner skips at C speed: bytes outside strings, and whole strings
# except "model" (key or value: Python looks at those).  The string alternative matches
# exactly one string, so the repetition never backtracks; a window edge inside a
# string stops the run at its opening quote.
# The same for "stream" (at most 37 bytes): a top-level "stream": true asks for SSE, and a
# request that has to wait for a switch then gets its loading status (stream_progress).
_JSON_STREAM_TEXT = (rb'(?:s|\\u0073)(?:t|\\u0074)(?:r|\\u0072)(?:e|\\u0065)(?:a|\\u0061)'
                     rb'(?:m|\\u006[dD])"')
# Its string alternative is atomic ((?=(X))\1 matches what X matches, and is never backtracked
# into; Python 3.8 has no atomic groups): a string cut by the window's edge fails at once
# instead of giving back its 64 KiB a byte at a time (4 ms for one long image string).
# "model" in any case (Go's encoding/json, under Ollama, takes a key in any case for a
# field, the last one winning: {"model": "a", "MODEL": "b"} is b there), at most 31 bytes.
_JSON_MODEL_ANY_CASE = (rb'(?:[mM]|\\u00[46][dD])(?:[oO]|\\u00[46][fF])(?:[dD]|\\u00[46]4)'
                        rb'(?:[eE]|\\u00[46]5)(?:[lL]|\\u00[46][cC])"')
_JSON_RUN = re.compile(rb'(?:[^"]+|"(?!' + _JSON_MODEL_ANY_CASE + rb'|' + _JSON_STREAM_TEXT
                       + rb')(?=([^"\\]*))\1(?:\\[\s\S](?=([^"\\]*))\2)*")*')
_JSON_MODEL_TEXT_RE = re.compile(_JSON_MODEL_TEXT)
_JSON_MODEL_ANY_CASE_RE = re.compile(_JSON_MODEL_ANY_CASE)
_JSON_STREAM_TEXT_RE = re.compile(_JSON_STREAM_TEXT)
_JSON_TRUE = re.compile(rb"true(?![A-Za-z0-9])")
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\[\s\S][^"\\]*)*"')
_JSON_STRING_BODY = re.compile(rb'[^"\\]*(?:\\[\s\S][^"\\]*)*')
_JSON_KINDS = {**{c: "a number" for c in b"-0123456789"}, ord("{"): "an object",
               ord("["): "an array", ord("t"): "a boolean", ord("f"): "a boolean", ord("n"): "null"}


class _NotString(NamedTuple):
    """A ``model`` member whose value is not a string: what it is instead."""

    kind: str


class _NotAnObject(ValueError):
    """The body is a JSON value, but not an object."""


def _match_end(pattern: "re.Pattern[bytes]", data: bytes, pos: int, endpos: int) -> int:
    """Where ``pattern`` (one that always matches, maybe empty) stops, from ``pos``."""
    m = pattern.match(data, pos, endpos)
    return m.end() if m is not None else pos


def _json_string_end(body: bytes, start: int) -> Generator[None, None, int]:
    """The index of the quote that closes the JSON string opened at ``start``; yields
    once per window after the first (a long string of escapes shares the loop too)."""
    i = start + 1
    n = len(body)
    while True:  # no escape: the next quote closes it, found at memchr speed, a step at a time
        stop = min(n, i + JSON_STRING_STEP)
        end = body.find(b'"', i, stop)
        if body.find(b"\\", i, end if end >= 0 else stop) >= 0:
            break  # an escape: the window scan below takes over from i
        if end >= 0:
            return end
        if stop >= n:
            raise ValueError(f"unterminated string starting at byte {start}")
        i = stop
        yield None  # a 20 MB image string is 20 steps, not one 6 ms freeze of the loop
    first = True
    while True:  # escapes: a window at a time, so the regex's stack stays bounded
        if not first:
            yield None
        first = False
        i = _match_end(_JSON_STRING_BODY, body, i, min(n, i + JSON_SCAN_WINDOW))
        if i >= n:
            raise ValueError(f"unterminated string starting at byte {start}")
        if body[i] == 0x22:
            return i
        # else the window ended (maybe between a backslash and what it escapes): go on


class _ModelMember(NamedTuple):
    """The top-level ``model`` member found in a body: its value, and where that value's
    bytes lie (``body[start:end]``, quotes included for JSON), so that it can be
    replaced without re-serialising the rest.  ``body`` is the text scanned: the body
    itself, or for UTF-16/32 JSON its UTF-8 transcoding."""

    value: Union[str, _NotString]
    start: int
    end: int
    body: bytes
    stream: bool = False  # the object also has a top-level "stream": true


def _json_model_steps(body: bytes) -> Generator[None, None, Union[str, _NotString, None]]:
    """The value of the top-level ``model`` member of the JSON object ``body``: a str,
    _NotString, or None when there is none (_json_model_scan, without where it is)."""
    found = yield from _json_model_scan(body)
    return None if found is None else found.value


def _json_model_scan(body: bytes) -> Generator[None, None, Optional[_ModelMember]]:
    """The top-level ``model`` member of the JSON object ``body``, or None when there is
    none.  With duplicate members the last one wins, as in Python's json and the
    engines, so llmux routes where the backend will read.

    A generator: it yields every JSON_SCAN_SLICE steps (see _json_model for the plain
    call).  It does not validate the document (the backend rejects invalid JSON), but
    raises ValueError for what it must read and cannot, and _NotAnObject.

    Depth is counted, never recursed: every string is skipped whole, so the brackets
    left in a run are structure, and the depth at any string is exact.
    """
    encoding = json.detect_encoding(body)  # as json.loads(bytes) does
    start = 0
    if encoding == "utf-8-sig":
        start = 3
    elif encoding != "utf-8":  # UTF-16/32: rare; one transcoded copy
        body = body.decode(encoding, "surrogatepass").encode("utf-8", "surrogatepass")
    n = len(body)
    pos = _match_end(_JSON_WS_RUN, body, start, n)
    if pos >= n or body[pos] != 0x7B:
        kind = _JSON_KINDS.get(body[pos]) if pos < n else None
        if pos < n and body[pos] == 0x22:
            kind = "a string"
        if kind is None:
            raise ValueError(f"expected a JSON object at byte {pos}")
        raise _NotAnObject(kind)
    pos += 1
    depth = 1
    model: Optional[_ModelMember] = None
    stream = False
    steps = 0
    stops = 0
    stops_allowed = MAX_JSON_MODEL_STRINGS + n // JSON_STOP_BYTES
    while pos < n:
        steps += 1
        if steps % JSON_SCAN_SLICE == 0:
            yield None
        stop = _match_end(_JSON_RUN, body, pos, min(n, pos + JSON_SCAN_WINDOW))
        if stop > pos:
            seg = body[pos:stop]
            opened = seg.count(b"{") + seg.count(b"[")
            closed = seg.count(b"}") + seg.count(b"]")
            if (opened or closed) and b'"' in seg:  # brackets inside strings are not structure
                seg = _JSON_STRING.sub(b"", seg)
                opened = seg.count(b"{") + seg.count(b"[")
                closed = seg.count(b"}") + seg.count(b"]")
            depth += opened - closed
            pos = stop
            if pos >= n or body[pos] != 0x22:
                continue  # the window's edge
        # A string the run would not take: "model" (perhaps escaped), or one the
        # window's edge cut.
        stops += 1
        if stops > stops_allowed:
            raise ValueError(f"more than {stops_allowed} \"model\" or \"stream\" strings ("
                             f"{MAX_JSON_MODEL_STRINGS} and one per {JSON_STOP_BYTES} bytes); "
                             "expected a request body, not a list of them")
        end = yield from _json_string_end(body, pos)
        if depth <= 0:
            raise ValueError(f"data after the top-level object at byte {pos}")
        if depth == 1:
            colon = _match_end(_JSON_WS_RUN, body, end + 1, n)
            if colon < n and body[colon] == 0x3A:  # a member of the top-level object
                is_model = end - pos <= 31 and _JSON_MODEL_TEXT_RE.match(body, pos + 1, end + 1) is not None
                if not is_model and end - pos <= 31 and _JSON_MODEL_ANY_CASE_RE.match(body, pos + 1, end + 1):
                    raise _OtherCase(_other_case(_json_model_name(body, pos, end + 1)))
                value = _match_end(_JSON_WS_RUN, body, colon + 1, n)
                if not is_model and end - pos <= 37 and _JSON_STREAM_TEXT_RE.match(body, pos + 1, end + 1):
                    stream = _JSON_TRUE.match(body, value) is not None  # the last one wins
                    pos = value
                    continue
                if value < n and body[value] == 0x22:
                    value_end = yield from _json_string_end(body, value)
                    if is_model:
                        model = _ModelMember(_json_model_name(body, value, value_end + 1),
                                             value, value_end + 1, body)
                    pos = value_end + 1
                    continue
                if is_model:
                    kind = _JSON_KINDS.get(body[value]) if value < n else None
                    if kind is None:
                        raise ValueError(f"expected a value at byte {value}")
                    model = _ModelMember(_NotString(kind), value, value, body)
                pos = value
                continue
        pos = end + 1
    if depth != 0:
        raise ValueError("the top-level object is not closed")
    return model._replace(stream=True) if model is not None and stream else model


_JSON_SCAN: Callable[[str, int], Tuple[Any, int]] = json.JSONDecoder().scan_once  # type: ignore[attr-defined]
_JSON_WS_TEXT = re.compile(r"[ \t\n\r]*")


class _OtherCase(ValueError):
    """A top-level key that is "model" in another case (see _JSON_MODEL_ANY_CASE)."""


def _other_case(key: Any) -> str:
    return (f"the top-level key {str(key)!r} is 'model' in another case; expected 'model' "
            "alone (an engine such as Ollama would read it as the model, llmux does not)")


def _json_model_quick(body: bytes) -> Union[_ModelMember, None, Literal[False]]:
    """For a small body (JSON_QUICK_BYTES), its ``model`` member by json.loads, without
    where it lies (start and end are -1); False when only the scanner can say (invalid
    JSON, not an object, a model that is not a short string): it then gives the
    same answer as for any body, with its error messages."""
    # json.loads(body) less its Python layers: a body that opens with "{" and a non-NUL
    # byte is UTF-8 to json.detect_encoding; the C scanner reads it, then only
    # whitespace may follow (json.decoder's own rule).
    if len(body) > JSON_QUICK_BYTES or body[:1] != b"{" or body[1:2] == b"\x00":
        return False
    if body.count(b'"') > 2 * MAX_JSON_MODEL_STRINGS:
        return False  # the scanner may refuse this many "model"/"stream" strings: it says
    try:
        text = body.decode("utf-8", "surrogatepass")
        doc, end = _JSON_SCAN(text, 0)
    except (ValueError, StopIteration, RecursionError):
        return False
    if type(doc) is not dict:
        return False
    if end != len(text):  # only whitespace may follow
        trailing = _JSON_WS_TEXT.match(text, end)  # always matches, maybe empty
        if trailing is None or trailing.end() != len(text):
            return False
    for key in doc:
        if len(key) == 5 and key != "model" and key.lower() == "model":
            return False  # the scanner says what is wrong (_other_case)
    if "model" not in doc:
        return None
    name = doc["model"]
    if type(name) is not str or len(name) > MAX_MODEL_NAME_BYTES // 4 and \
            len(name.encode("utf-8", "surrogatepass")) > MAX_MODEL_NAME_BYTES:
        return False
    return _ModelMember(name, -1, -1, body, doc.get("stream") is True)


def _json_model_name(body: bytes, start: int, end: int) -> Union[str, _NotString]:
    """The JSON string ``body[start:end]`` as a model name, unless it is too long to be one
    (then it is not decoded: a _NotString naming its size)."""
    if end - start - 2 > MAX_MODEL_NAME_BYTES * 6:  # every character might be escaped
        return _NotString(f"a string of {end - start - 2} bytes")
    name = json.loads(body[start:end])
    if len(name.encode("utf-8", "surrogatepass")) > MAX_MODEL_NAME_BYTES:
        return _NotString(f"a string of {len(name)} characters")
    return name  # type: ignore[no-any-return]


def _json_model(body: bytes) -> Union[str, _NotString, None]:
    """_json_model_steps run to its end at once (tests, tools)."""
    steps = _json_model_steps(body)
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]


def _multipart_boundary(content_type: str) -> bytes:
    """The boundary parameter of a multipart Content-Type (RFC 2046 section 5.1.1)."""
    for param in content_type.split(";")[1:]:
        name, eq, value = param.partition("=")
        if eq and name.strip().lower() == "boundary":
            value = value.strip()
            if len(value) >= 2 and value[0] == value[-1] == '"':
                value = value[1:-1]
            if len(value) > MULTIPART_MAX_BOUNDARY:
                raise HTTPError(f"multipart/form-data boundary of {len(value)} characters; "
                                f"expected at most {MULTIPART_MAX_BOUNDARY} (RFC 2046)")
            if value:
                return value.encode("latin-1", "replace")
    raise HTTPError("multipart/form-data without a boundary")


if sys.version_info >= (3, 10):
    def _find(data: bytes, needle: bytes, start: int) -> int:
        """data.find(needle, start): linear since Python 3.10 (two-way for long needles)."""
        return data.find(needle, start)
else:
    def _find(data: bytes, needle: bytes, start: int) -> int:
        """data.find(needle, start) in linear time.  Before 3.10 bytes.find is O(n*m) on
        some inputs (a needle of dashes in runs of slightly more: 8 s for 4 MB); re's
        search for a literal uses a failure table (KMP), linear on all of them."""
        found = _literal(needle).search(data, start)
        return found.start() if found is not None else -1

    _LITERALS: Dict[bytes, "re.Pattern[bytes]"] = {}

    def _literal(needle: bytes) -> "re.Pattern[bytes]":
        pattern = _LITERALS.get(needle)
        if pattern is None:
            if len(_LITERALS) >= 16:  # (needles come from clients' boundaries)
                _LITERALS.clear()
            pattern = _LITERALS[needle] = re.compile(re.escape(needle))
        return pattern


def _is_model_field(head: bytes) -> bool:
    """Whether a part head says ``Content-Disposition: form-data; name="model"``, and is
    not a file (a part with a filename is an upload, whatever its name)."""
    for line in bytes(head).split(b"\r\n"):  # the body is one bytearray: keys must hash
        name, colon, value = line.partition(b":")
        if not colon or name.strip().lower() != b"content-disposition":
            continue
        params = {}
        for param in _split_params(value)[1:]:  # ';' inside quotes is not a split
            key, eq, text = param.partition(b"=")
            if eq:
                text = text.strip()
                if len(text) >= 2 and text[:1] == text[-1:] == b'"':
                    text = text[1:-1]
                params[key.strip().lower()] = text
        return params.get(b"name") == b"model" and b"filename" not in params
    return False


def _split_params(value: bytes) -> List[bytes]:
    """``value`` split at each ';' outside a quoted string (a part head is at most
    MULTIPART_MAX_PART_HEAD bytes: a loop over its quotes is cheap)."""
    pieces, start, quoted, i = [], 0, False, 0
    while True:
        j = value.find(b'"' if quoted else b';', i) if quoted else min(
            (k for k in (value.find(b';', i), value.find(b'"', i)) if k >= 0), default=-1)
        if j < 0:
            pieces.append(value[start:])
            return pieces
        if quoted:
            quoted, i = False, j + 1
        elif value[j:j + 1] == b'"':
            quoted, i = True, j + 1
        else:
            pieces.append(value[start:j])
            start = i = j + 1


def _model_from_multipart(content_type: str, body: bytes) -> Union[str, _NotString, None]:
    """The ``model`` field of a multipart/form-data body (audio uploads), or None."""
    found = _multipart_model_field(content_type, body)
    return None if found is None else found.value


def _multipart_model_field(content_type: str, body: bytes) -> Optional[_ModelMember]:
    """The ``model`` field of a multipart/form-data body and its value's span, or None;
    the last one if several, as the engines' form parsers (Starlette) keep.  Parts are
    found with bytes.find, never a regex over the body; each part head is bounded."""
    delimiter = b"--" + _multipart_boundary(content_type)
    found: Optional[_ModelMember] = None
    at = _find(body, delimiter, 0)
    parts = 0
    while at >= 0:
        start = at + len(delimiter)
        if body[start:start + 2] == b"--":
            break  # the close delimiter
        nxt = _next_delimiter(body, delimiter, start)
        end = nxt if nxt >= 0 else len(body)
        parts += 1
        if parts > MULTIPART_MAX_PARTS:
            raise HTTPError(f"multipart/form-data body has more than {MULTIPART_MAX_PARTS} parts; "
                            f"expected at most {MULTIPART_MAX_PARTS}")
        head_end = body.find(b"\r\n\r\n", start, min(end, start + MULTIPART_MAX_PART_HEAD))
        if head_end >= 0 and _is_model_field(body[start:head_end]):
            size = end - head_end - 4
            found = _ModelMember(body[head_end + 4:end].decode("utf-8", "replace")
                                 if size <= MAX_MODEL_NAME_BYTES else _NotString(f"a field of {size} bytes"),
                                 head_end + 4, end, body)
        at = nxt + 2 if nxt >= 0 else -1
    return found


_DELIMITER_END = re.compile(rb"--|[ \t]*\r\n")  # RFC 2046 5.1.1: close, or LWSP then CRLF


def _next_delimiter(body: bytes, delimiter: bytes, start: int) -> int:
    """Where the next CRLF + delimiter line starts, or -1.  ``--BOUNDARY`` followed by
    anything else (``--BOUNDARYx`` inside an uploaded file, say) is not a delimiter, as
    for the engines' parsers.  Each find starts past the last: linear."""
    line = b"\r\n" + delimiter
    at = _find(body, line, start)
    while at >= 0:
        after = at + 2 + len(delimiter)
        if after >= len(body) or _DELIMITER_END.match(body, after):
            return at
        at = _find(body, line, at + 1)
    return -1


def _replace_model(found: _ModelMember, name: str, multipart: bool) -> bytes:
    """The scanned body with the ``model`` value ``found`` replaced by ``name``: one
    splice over the value's bytes, everything else byte-identical (the caller frames
    the new length).  JSON gets a JSON string, a form field the UTF-8 text."""
    new = name.encode("utf-8") if multipart else json.dumps(name).encode("ascii")
    body = found.body
    return b"".join((body[:found.start], new, body[found.end:]))


def _raise_fd_limit(wanted: int) -> Optional[int]:
    """Raise the soft RLIMIT_NOFILE toward ``wanted`` (never past the hard limit, never
    down); return the soft limit now in force, or None where there is none (Windows).
    Only as far as needed: hooks inherit it, and some programs still use select()."""
    if resource is None:
        return None
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (OSError, ValueError):
        return None
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (OSError, ValueError):
            pass  # e.g. macOS refuses more than OPEN_MAX: keep what we have
    return None if soft == resource.RLIM_INFINITY else int(soft)


def _reading(writer: asyncio.StreamWriter) -> bool:
    """Whether the connection's transport is reading (a StreamReader pauses it when full)."""
    return cast(asyncio.Transport, writer.transport).is_reading()


_HUNG_UP = select.POLLHUP | select.POLLERR | getattr(select, "POLLRDHUP", 0)


def _peer_gone(sock: Any) -> bool:
    """Whether a socket's peer reset or closed it: poll says so even when unread bytes
    come before (a read would return those first)."""
    try:
        poller = select.poll()
        poller.register(sock.fileno(), _HUNG_UP)
        return bool(poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return True  # closed under us


def _readable(writer: asyncio.StreamWriter) -> bool:
    """Whether the connection's socket has bytes (or EOF) llmux has not read yet; False
    for a socket closed already (its fd is -1 until its task has run: uvloop closes it
    at once when its peer resets)."""
    if not hasattr(select, "poll"):
        return False
    try:
        sock = writer.get_extra_info("socket")
        if sock is None:
            return False
        poller = select.poll()
        poller.register(sock.fileno(), select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return False


def _method_of(data: bytes) -> str:
    """The method a request's first bytes begin with, after any empty lines (RFC 9112
    section 2.2); "" until the space after it has arrived."""
    data = data.lstrip(b"\r\n")
    return data.partition(b" ")[0].decode("latin-1") if b" " in data else ""


UNREAD_PEEK_BYTES = 64  # _unread_method: what it looks at (empty lines, then a method)


def _unread_method(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
    """The method of a request not read yet, as far as it has arrived ("" if none): for
    an answer written before the request is read (a full table's 503), which for a HEAD
    has no body.  In the reader's buffer (uvloop reads before the task runs), else peeked
    at in the socket through a duplicate of its fd: nothing is taken."""
    data = bytes(getattr(reader, "_buffer", b"")[:UNREAD_PEEK_BYTES])
    if not data:
        try:
            sock = writer.get_extra_info("socket")
            with socket.socket(fileno=os.dup(sock.fileno())) as peek:
                data = peek.recv(UNREAD_PEEK_BYTES, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (OSError, ValueError, AttributeError):
            return ""  # nothing arrived yet, closed, or out of fds: no method known
    return _method_of(data)


def _is_loopback(ip: str) -> bool:
    """The address a reverse proxy on this host connects from (the rest of 127/8 is not:
    it is rarely a proxy, and lets the per-peer cap be tested on one host)."""
    return ip in ("127.0.0.1", "::1", "::ffff:127.0.0.1")


class BodyBudget:
    """Request body bytes buffered by all connections together, against
    http.max_buffered_bytes.  Each request holds one _BodyClaim; the connection that
    reads the request owns it and releases it in a ``finally`` (Server._serve_connection),
    so the bytes come back whether the request was relayed, failed, or its client left."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    def claim(self) -> "_BodyClaim":
        return _BodyClaim(self)


class _BodyClaim:
    """One request's share of the BodyBudget: grows as its body does, released once."""

    def __init__(self, budget: BodyBudget) -> None:
        self.budget = budget
        self.held = 0

    def check(self, total: int) -> None:
        """503 with Retry-After now if ``total`` more bytes would not fit in what is free
        now.  Nothing is reserved: a head that declares 64 MiB and sends nothing holds
        nothing, so a few idle sockets cannot shut every body out."""
        budget = self.budget
        if budget.used + total - self.held > budget.limit:
            raise HTTPError(f"too many request bodies held now ({budget.used} of "
                            f"{budget.limit} bytes buffered); retry later", status=503,
                            type="server_error", code="server_busy",
                            headers=[("retry-after", str(BODY_BUDGET_RETRY_AFTER))])

    def grow_to(self, total: int) -> None:
        """Hold ``total`` bytes (those that arrived); 503 if the budget has not that many."""
        if total > self.held:
            self.check(total)
            self.budget.used += total - self.held
            self.held = total

    def release(self) -> None:
        self.budget.used -= self.held
        self.held = 0


class TurnBudget:
    """At most ``per_turn`` requests start being served in one turn of the event loop;
    the rest wait their turn, in arrival order.  A burst of 100 requests that arrive
    together would otherwise all be parsed, routed and sent to their backends in one
    turn before the loop looks at a socket again: no answer moved, not even the first
    request's, until the last one was on its way.  With turns, the loop polls between
    batches, so the burst's first answers go out while its last requests are still
    being read, the backend works while llmux does, and streams already under way
    keep flowing.  A request that does not wait pays a counter.  One that waits is a
    place in a queue: the call that writes it to its backend (start(), from
    _Upstream.begin), made from the turn itself, so waiting costs no future and no
    task step.

    No request waits more than ``max_wait`` seconds: then it starts in the next turn
    whatever the budget.  Turns are only as short as the other work in them: a peer
    that keeps the loop busy (hundreds of heads dripping in a byte at a time) makes
    every turn long, and 8 starts a turn would then slow every burst to its pace.
    """

    def __init__(self, per_turn: int, max_wait: float, metrics: Optional["Metrics"] = None) -> None:
        self.per_turn = per_turn
        self.max_wait = max_wait
        self.metrics = metrics
        self.left = per_turn  # starts left in this turn
        self.waiting: Deque[Tuple[float, Callable[[], bool]]] = collections.deque()  # (asked at, go)
        self._armed = False  # a _turn is scheduled

    def start(self, go: Callable[[], bool]) -> None:
        """Call ``go`` now, or in the turn this request's place comes to.  ``go`` returns
        whether the request started: False (it was given up meanwhile) keeps no place."""
        loop = asyncio.get_running_loop()
        if not self._armed:
            self._armed = True
            loop.call_soon(self._turn)
        if self.left and not self.waiting:
            self.left -= 1
            go()
            return
        self.waiting.append((loop.time(), go))
        if self.metrics is not None:
            self.metrics.inc("llmux_request_turn_waits_total")

    def _turn(self) -> None:
        """At the next turn: a fresh budget, first for those who waited; and whoever has
        waited ``max_wait`` starts now, budget or not.  What is left of the budget then
        is for newcomers in this turn: they come after every request that waited."""
        loop = asyncio.get_running_loop()
        self.left = self.per_turn
        waiting = self.waiting
        overdue = loop.time() - self.max_wait
        while waiting and (self.left or waiting[0][0] <= overdue):
            if not waiting.popleft()[1]():
                continue  # given up: it keeps no place
            if self.left:
                self.left -= 1
            elif self.metrics is not None:
                self.metrics.inc("llmux_request_turn_overdue_total")
        if self.left < self.per_turn or waiting:  # spent some: the next turn resets it
            loop.call_soon(self._turn)
        else:
            self._armed = False  # an idle budget schedules nothing


_ABSOLUTE_FORM = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^/?]*")
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


def route_path(target: str) -> str:
    """The path llmux routes *and* authenticates a request by: the target's path
    (absolute-form ``http://host/p`` gives ``/p``, RFC 9112 3.2.2), without the query,
    percent-decoded as UTF-8.  Nothing else is normalised (case, ``//``, dot segments,
    a trailing ``/``): such a path is just not one of llmux's routes.  The target sent
    to a backend is never this, but the client's bytes as they came.

    Raises HTTPError(400) for a malformed percent-escape or a path that is not UTF-8."""
    absolute = _ABSOLUTE_FORM.match(target) if target[:1] != "/" else None  # (it starts with a letter)
    if absolute:
        target = target[absolute.end():]
        if not target.startswith("/"):
            target = "/" + target
    path = target.split("?", 1)[0]
    if "%" not in path:
        return path
    bad = _BAD_PERCENT.search(path)
    if bad:
        raise HTTPError(f"invalid percent-escape in request path; expected '%' and two hex "
                        f"digits; got {path[bad.start():bad.start() + 3]!r}", code="invalid_path")
    try:
        return urllib.parse.unquote_to_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        raise HTTPError("invalid request path; expected UTF-8 after percent-decoding; "
                        f"got {path[:60]!r}", code="invalid_path") from None


def is_loopback_peer(peer: Any) -> bool:
    """Whether a ``peername`` is this host: 127.0.0.0/8, ::1, or IPv4-mapped loopback.
    A Unix socket peer (a str) is local by nature; an unknown one is not."""
    if isinstance(peer, str):
        return True
    if not isinstance(peer, tuple) or not peer or not isinstance(peer[0], str):
        return False
    try:
        ip = ipaddress.ip_address(peer[0].split("%", 1)[0])  # fe80::1%eth0: scope dropped
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


class _Local(NamedTuple):
    """A route's answer that llmux gives itself."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: Tuple[Tuple[str, str], ...] = ()

    @classmethod
    def json(cls, status: int, obj: Any) -> "_Local":
        return cls(status, json.dumps(obj, separators=(",", ":")).encode() + b"\n")


class _Stream(NamedTuple):
    """A route's answer that llmux streams itself until it ends: serve(head, writer,
    proto, cors) writes it and returns the status to log."""

    serve: Callable[[RequestHead, asyncio.StreamWriter, "_ClientProtocol", List[Tuple[str, str]]],
                    Awaitable[int]]


class _Forward(NamedTuple):
    """A route's answer to proxy: to which model, with which head and body."""

    model: ModelConfig
    head: RequestHead
    body: bytes
    stream: bool = False  # its JSON body asks for SSE ("stream": true)


class _Route(NamedTuple):
    methods: Optional[FrozenSet[str]]  # None: any method (the handler says which)
    pattern: "re.Pattern[str]"  # matched against the whole decoded path
    handler: Callable[[RequestHead, bytes, "re.Match[str]", Any],
                      Awaitable[Union[_Local, _Forward, _Stream]]]


class Server:
    """llmux's HTTP front: routes, the switcher, the relay, and their lifecycle."""

    def __init__(self, config: Config, log: Log, *, hooks: Optional[HookRunner] = None,
                 policy: Optional[SchedulingPolicy] = None) -> None:
        self.config = config
        self.log = log
        cwd = os.path.dirname(config.path) if config.path else None
        self.metrics = llmux_metrics()
        self.hooks = hooks or HookRunner(log, config.policy.hook_timeout_secs, cwd, self.metrics)
        self.pool = UpstreamPool(log)
        self.events = EventBus(log, self.metrics)
        log.listener = lambda level, event, fields: self.events.publish(event, fields, level)
        self.switcher = Switcher(config, self.hooks, policy or POLICIES[config.policy.name](),
                                 log, on_sleep=lambda cfg: self.pool.close_port(cfg.port),
                                 metrics=self.metrics, events=self.events)
        self.started = int(time.time())
        self._keys = [k.encode("utf-8") for k in config.api_keys]
        self._routes = self._route_table()
        self._listening: List[socket.socket] = []
        # Connections being set up: their transport (made at accept) until their task
        # runs, or the task of connect_accepted_socket (a loop without _make_socket_transport).
        self._accepting: Set[Any] = set()
        self._refusing = 0  # connections answered 503 at admission whose fd is not closed yet
        self._accept_paused: Optional[asyncio.TimerHandle] = None
        self._busy: Dict[_ClientProtocol, bool] = {}  # connection -> serving a request now
        # Closed connections whose answer's last bytes are still in the transport: shutdown
        # waits for them (within its grace), or the process's exit would drop those bytes.
        self._flushing: Set[_ClientProtocol] = set()
        self._open = 0  # connections admitted and not yet closed or evicted
        self._peers: Dict[str, Set[_ClientProtocol]] = {}  # non-loopback address -> its connections
        # Non-loopback address -> its connections accepted and not admitted yet (being set
        # up, or refused and lingering).
        self._peer_setup: Dict[str, int] = {}
        # Addresses whose last look for an idle connection found none, and none of whose
        # connections has gone idle since (read_request takes them out): not looked again.
        self._no_idle: Set[str] = set()
        self.bodies = BodyBudget(config.http.max_buffered_bytes)
        self.turns = TurnBudget(STARTS_PER_TURN, TURN_WAIT_MAX_SECS, self.metrics)
        self.fd_limit: Optional[int] = None  # RLIMIT_NOFILE's soft limit after start()
        self._background: List["asyncio.Task[None]"] = []
        self._reload_lock = asyncio.Lock()
        self.reload_waiting = False  # a SIGHUP's reload has not started yet (main coalesces)
        self.closing = False
        self.port: Optional[int] = None
        self.host = ""
        self._liveness_wake: Optional[asyncio.Event] = None  # set: a reload changed the interval
        self.hooks.on_exit = self._server_exited
        self.hooks.out_of_fds = self.pool.give_up_idle
        self._checking: Set[str] = set()  # models whose backend failed, being checked now
        self._reaping = False  # PID 1 or a subreaper: SIGCHLD reaps orphans (start_reaper)
        self._reap_timer: Optional[asyncio.TimerHandle] = None
        self._reap_poll: Optional[float] = None  # seconds between looks, without SIGCHLD (uvloop)
        self._make_transport: Optional[Callable[..., Any]] = None  # (start: see _accept)

    async def start(self, host: str, port: int, sock: Optional[socket.socket] = None) -> int:
        """Listen (on ``sock`` if given); return the bound port.  Also makes this
        server the loop's last-resort error boundary (see _loop_error)."""
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(self._loop_error)
        self._make_transport = loop._make_socket_transport if isinstance(  # type: ignore[attr-defined]
            loop, asyncio.selector_events.BaseSelectorEventLoop) else None  # (see _accept)
        if sock is None:
            socks = []
            try:
                infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                               flags=socket.AI_PASSIVE)
                for family, kind, proto, _, addr in dict.fromkeys(infos):
                    s = socket.socket(family, kind, proto)
                    socks.append(s)
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if family == socket.AF_INET6:
                        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    s.bind(addr)
                    if port == 0:  # every address on the port the first one got
                        port = s.getsockname()[1]
                    s.listen(LISTEN_BACKLOG)
            except OSError:
                for s in socks:
                    s.close()
                raise
        else:
            socks = [sock]
            sock.listen(LISTEN_BACKLOG)
        for s in socks:
            s.setblocking(False)
            loop.add_reader(s.fileno(), self._accept, s)
        self._listening = socks
        self.port = socks[0].getsockname()[1]
        self.host = host
        own = _own_port_problems(self.config, self.port, host)  # (-p 0 may have picked it)
        if own:
            self._stop_listening()
            raise ConfigError(own)
        self.fd_limit = _raise_fd_limit(2 * self.config.http.max_connections + FD_RESERVE)
        if self.fd_limit is not None:
            limit = self.connection_limit()
            configured = self.config.http.max_connections
            (self.log.warning if limit < configured else self.log.info)(
                "limits.connections", max_connections=limit, configured=configured,
                fd_limit=self.fd_limit, reserve=FD_RESERVE,
                reason="two fds per connection (client and backend) plus the reserve",
                max_connections_per_peer=self.peer_cap())
        return self.port

    # Our own accept loop, not asyncio's: out of fds, asyncio's retries accept() once per
    # backlog slot and logs a traceback for each, tens of thousands a second.  A stdlib
    # loop's transport is made at once, with the call asyncio's own accept makes
    # (_make_socket_transport, in every selector loop, 3.4 to 3.13): connect_accepted_socket
    # costs a task, two coroutines and a future more a connection, 8% of what a request
    # on a new connection costs (bench/instructions.py).  Other loops (uvloop) take that way.
    def _accept(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        make = self._make_transport
        limit = self.connection_limit()
        cap = self.peer_cap()
        for _ in range(ACCEPT_BATCH):
            # Newcomers beyond the table's room will be refused (or evict an idle
            # connection): at most ACCEPT_BATCH of those at once, counting those still
            # being set up from earlier wake-ups (only newcomers: a reload that shrank
            # the table leaves it over full, its idle connections still evictable).
            # With room, a burst is accepted at full speed.
            beyond = self._refusing + max(0, len(self._accepting) - max(0, limit - self._open))
            if beyond >= ACCEPT_BATCH:
                self._pause_accepting(f"the connection table is full (max_connections {limit}) and "
                                      f"{beyond} newcomers are being refused or set up beyond it",
                                      out_of_fds=False)
                return
            try:
                conn, addr = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as e:
                if e.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    self._pause_accepting(_reason(e))
                else:
                    log_internal_error(self.log, self.metrics, "accept", e)
                return
            ip = addr[0] if cap is not None and isinstance(addr, tuple) and not _is_loopback(addr[0]) \
                else None
            if ip is not None and cap is not None and self._flooding(ip, cap):
                conn.close()
                continue
            proto = _ClientProtocol(self)
            if ip is not None:
                proto.setup_ip = ip
                self._peer_setup[ip] = self._peer_setup.get(ip, 0) + 1
            conn.setblocking(False)
            if make is not None:
                self._transport_now(make, conn, proto)
                continue
            task = loop.create_task(self._connect(conn, proto))
            self._accepting.add(task)
            task.add_done_callback(self._accepting.discard)

    def _flooding(self, ip: str, cap: int) -> bool:
        """Whether a connection just accepted from ``ip`` is one too many: PEER_PENDING_MAX
        of the address's connections beyond its ``cap`` are being set up or refused
        already, and none of its connections is idle (to be evicted for it).  Then it is
        closed unanswered: a flood from one address costs an accept, a set lookup and a
        close a connection, not an fd and a task for REFUSED_LINGER_SECS each, nor a
        pause of accepting for everyone."""
        setup = self._peer_setup.get(ip, 0)
        if setup - max(0, cap - len(self._peers.get(ip, ()))) < PEER_PENDING_MAX:
            return False  # (those that will fit under the cap are not beyond it)
        if self._evict_idle_of(ip):
            return False
        self.metrics.inc("llmux_connections_refused_total", "peer_flood")
        self.log.warning("connection.flood", reason="max_connections_per_peer", limit=cap,
                         peer=ip, pending=setup)
        return True

    def _evict_idle_of(self, ip: str) -> bool:
        """Close ``ip``'s connection idle longest for a newcomer of its own; False if none
        is, and then no look again until one of its connections goes idle (_no_idle)."""
        if ip in self._no_idle:
            return False
        if self._evict_idle(ip, "max_connections_per_peer"):
            return True
        self._no_idle.add(ip)
        return False

    def _unsetup(self, proto: _ClientProtocol) -> None:
        """The connection is admitted or closed: out of _peer_setup."""
        ip = proto.setup_ip
        if ip is not None:
            proto.setup_ip = None
            left = self._peer_setup.get(ip, 1) - 1
            if left > 0:
                self._peer_setup[ip] = left
            else:
                self._peer_setup.pop(ip, None)

    def _transport_now(self, make: Callable[..., Any], conn: socket.socket,
                       proto: _ClientProtocol) -> None:
        """An accepted socket's transport, made now: the loop calls the protocol's
        connection_made next (its task takes it out of _accepting, as does its loss)."""
        try:
            self._accepting.add(make(conn, proto))
        except OSError:
            self._unsetup(proto)
            conn.close()
        except Exception as e:  # (3.13: a transport still registered for the fd)
            self._unsetup(proto)
            conn.close()
            log_internal_error(self.log, self.metrics, "accept", e)

    async def _connect(self, conn: socket.socket, proto: _ClientProtocol) -> None:
        try:
            await asyncio.get_running_loop().connect_accepted_socket(lambda: proto, conn)
        except OSError:
            self._unsetup(proto)
            conn.close()  # gone before we got to it, or out of fds for the transport
        except Exception as e:
            self._unsetup(proto)
            conn.close()
            log_internal_error(self.log, self.metrics, "accept", e)

    def _pause_accepting(self, reason: str, out_of_fds: bool = True) -> None:
        """Out of fds, or too many newcomers beyond a full table: stop accepting for
        ACCEPT_PAUSE_SECS (new clients wait in the kernel's backlog), say so, count it."""
        loop = asyncio.get_running_loop()
        self.metrics.inc("llmux_accept_paused_total")
        self.log.warning("accept.paused", reason=reason, secs=ACCEPT_PAUSE_SECS,
                         connections=len(self._busy))
        if out_of_fds:
            self.pool.give_up_idle(reason)  # their fds are free when accepting resumes
        for s in self._listening:
            loop.remove_reader(s.fileno())
        if self._accept_paused is None:
            self._accept_paused = loop.call_later(ACCEPT_PAUSE_SECS, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._accept_paused = None
        if not self.closing:
            loop = asyncio.get_running_loop()
            for s in self._listening:
                loop.add_reader(s.fileno(), self._accept, s)

    def _stop_listening(self) -> None:
        """Close the listening sockets (new connections are refused from now on)."""
        loop = asyncio.get_running_loop()
        if self._accept_paused is not None:
            self._accept_paused.cancel()
            self._accept_paused = None
        for s in self._listening:
            loop.remove_reader(s.fileno())
            s.close()
        self._listening = []

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: Dict[str, Any]) -> None:
        """The loop's exception handler: whatever reaches it (a callback that raised, a
        task exception nobody retrieved) is a bug: logged once with its traceback and
        counted, never printed raw."""
        e = context.get("exception")
        if not isinstance(e, BaseException):
            e = RuntimeError(str(context.get("message")))
        elif context.get("message"):  # what asyncio says of it ("... never retrieved")
            e = RuntimeError(f"{context['message']}: {type(e).__name__}: {e}").with_traceback(e.__traceback__)
        log_internal_error(self.log, self.metrics, "loop", e)

    async def adopt(self) -> None:
        """At start, before listening: run every alive hook.  The models that are up
        already (llmux restarted while they stayed loaded) become ACTIVE without a wake,
        as many as the capacity holds (one, without ``policy.capacity``): the preload one
        first, then in config order.  The others are put to sleep; one whose sleep fails
        is still loaded, so it is adopted too, however full that makes the GPU: the state
        tells the truth, and the next switch evicts it first.  With none up, ``preload``
        is woken in the background."""
        # A managed server cannot have outlived the llmux that started it (PDEATHSIG):
        # only hook models are adopted.
        cfgs = [m for m in self.config.models.values() if m.alive and not m.cmd]
        found = await asyncio.gather(*(self.hooks.alive(m) for m in cfgs))
        up = [m.name for m, ok in zip(cfgs, found) if ok]
        preload = self.config.preload
        capacity = self.config.policy.capacity
        keep: List[str] = []
        for name in sorted(up, key=lambda n: n != preload):  # stable: config order after
            size = self.config.models[name].size
            used = sum(self.config.models[k].size for k in keep)
            if (not keep) if capacity is None else used + size <= capacity + 1e-9:
                keep.append(name)
                continue
            self.log.info("startup.extra_model_up", model=name, keeping=",".join(keep))
            try:
                await self.hooks.run(self.config.models[name], "sleep")
            except HookError:
                self.log.error("startup.sleep_failed", model=name,
                               keeping="it counted as loaded until a sleep succeeds")
                keep.append(name)
        for name in keep:
            self.switcher.adopt(name)
        if not up and preload is not None:
            self.switcher.start_wake(preload, "preload")

    def start_reaper(self) -> None:
        """As PID 1 (a container without --init) or a child subreaper, orphans are
        reparented to llmux: reap each on SIGCHLD, or they stay zombies for ever."""
        if not reaps_orphans():
            return
        self._reaping = True
        try:
            asyncio.get_running_loop().add_signal_handler(signal.SIGCHLD, self._reap)
            self._reap_poll = None
        except RuntimeError:  # uvloop keeps SIGCHLD for its own children: look every so often
            self._reap_poll = REAP_POLL_SECS
        self.log.info("reaper.on", pid=os.getpid(), reason="orphans are reparented to llmux",
                      poll_secs=self._reap_poll)
        self._reap()

    def _reap(self) -> None:
        self._reap_timer = None
        if not self._reaping:
            return
        if self.hooks.spawning:  # a child whose pid is not known yet may have exited
            self._reap_timer = asyncio.get_running_loop().call_later(REAP_RETRY_SECS, self._reap)
            return
        reaped: List[Tuple[int, int]] = []
        behind = False
        try:
            reaped, behind = _reap_pass(self.hooks.own_pids())
            for pid, status in reaped:
                self.log.info("reaper.reaped", pid=pid, status=status)
        except Exception as e:
            log_internal_error(self.log, self.metrics, "reaper", e)
        if len(reaped) >= REAP_BATCH:  # more may wait: in the next step, after other work
            self._reap_timer = asyncio.get_running_loop().call_later(0, self._reap)
        elif behind:  # orphans may wait behind one of its own children, and
            # no SIGCHLD will come for them again: look once the watcher has reaped it
            self._reap_timer = asyncio.get_running_loop().call_later(REAP_RETRY_SECS, self._reap)
        elif self._reap_poll is not None:
            self._reap_timer = asyncio.get_running_loop().call_later(self._reap_poll, self._reap)

    def _server_exited(self, name: str, why: str) -> None:
        """A managed server exited by itself: if its model was ACTIVE, it died."""
        self.switcher.died(name, why)

    def _backend_failed(self, name: str) -> None:
        """An ACTIVE model's backend refused or reset a connection: check it now, not
        at the next alive_interval_secs.  One check at a time per model (a burst of
        failed requests starts one).  With an alive hook, its failure sleeps the model
        as a liveness failure does; with none, the model is taken as dead (died), so the
        next request wakes it again (a wake hook must be idempotent).  A managed server
        is watched by its exit instead."""
        m = self.switcher.models.get(name)
        if name in self._checking or m is None or m.state is not ModelState.ACTIVE or m.cfg.cmd:
            return
        self._checking.add(name)
        task = asyncio.get_running_loop().create_task(self._recheck(m))
        self._background.append(task)

        def done(t: "asyncio.Task[None]") -> None:
            self._checking.discard(name)
            self._background.remove(t)
        task.add_done_callback(done)

    async def _recheck(self, m: _Model) -> None:
        sw, cfg = self.switcher, m.cfg
        before = (m.transitions, cfg)
        try:
            if cfg.alive:
                self.log.warning("model.backend_failed", model=cfg.name, check="its alive hook")
                if await self.hooks.alive(cfg) is False and sw.unchanged(m, before):
                    sw.alive_failed(cfg.name)
            elif await self.pool.accepts(cfg.port, cfg.name):
                # The failure was on a kept-alive connection the backend had just closed
                # (its keep-alive timeout: a race no proxy can avoid), not a dead backend.
                self.log.warning("model.backend_failed", model=cfg.name,
                                 check="a new connection", result="accepted: still up")
            elif sw.unchanged(m, before):
                sw.died(cfg.name, "its backend refused or reset a connection, and a new one; "
                                  "it has no alive hook: taken as down")
        except Exception as e:
            log_internal_error(self.log, self.metrics, "recheck", e)

    def start_background(self) -> None:
        """Liveness checks of the active model."""
        self._liveness_wake = asyncio.Event()
        self._background.append(asyncio.get_running_loop().create_task(self._liveness()))

    async def _liveness(self) -> None:
        """Run the alive hook of each ACTIVE model every alive_interval_secs.  It survives
        any exception (logged and counted), so liveness never stops silently."""
        while True:
            interval = self.config.policy.alive_interval_secs
            wake = self._liveness_wake
            assert wake is not None
            wake.clear()
            try:  # a reload sets it: a shorter interval counts from now, not after the old one
                await asyncio.wait_for(wake.wait(), interval or 1.0)
                continue
            except asyncio.TimeoutError:
                pass
            if not interval:
                continue
            try:
                await self._check_alive()
            except Exception as e:
                log_internal_error(self.log, self.metrics, "liveness", e)

    async def _check_alive(self) -> None:
        sw = self.switcher
        for m in list(sw.models.values()):
            if m.state is not ModelState.ACTIVE or not m.cfg.alive or sw.busy():
                continue
            before = (m.transitions, m.cfg)
            if await self.hooks.alive(m.cfg) is False and sw.unchanged(m, before):
                sw.alive_failed(m.name)

    async def reload(self) -> bool:
        """Re-read the config file (SIGHUP).  An invalid one is logged and ignored.
        Models whose config is unchanged are not touched (Switcher.reconfigure).  Never
        raises: a bug is logged as an internal error, and llmux keeps running."""
        try:
            return await self._reload()
        except Exception as e:
            log_internal_error(self.log, self.metrics, "reload", e)
            return False

    def reloading(self) -> bool:
        return self._reload_lock.locked()

    async def _reload(self) -> bool:
        async with self._reload_lock:
            self.reload_waiting = False
            if self.closing:
                self.log.info("reload.skipped", reason="llmux is shutting down")
                return False
            try:  # in a thread: a YAML file nested deep takes seconds to parse
                new = await _in_thread(load_config, self.config.path or "")
                own = _own_port_problems(new, self.port, self.host)
                if own:
                    raise ConfigError(own)
            except ConfigError as e:
                self.log.error("reload.failed", reason="; ".join(e.problems),
                               keeping="the running config")
                return False
            old = self.config
            if (new.api_keys, new.allow_remote_control) != (old.api_keys, old.allow_remote_control):
                # A stream's key was checked when it opened: one revoked must not go on.
                self.events.close("the API keys or allow_remote_control changed; reconnect")
            if (new.port, new.host) != (old.port, old.host):
                self.log.warning("reload.restart_needed", reason="port and host apply at start only")
            # Routing and keys change first: a removed model takes no new requests while
            # it drains; its queued requests are failed by the switcher.
            self.config = new
            self.hooks.timeout = new.policy.hook_timeout_secs
            self.hooks.cwd = os.path.dirname(new.path) if new.path else None
            self._keys = [k.encode("utf-8") for k in new.api_keys]
            self.bodies.limit = new.http.max_buffered_bytes
            done = await self.switcher.reconfigure(new)
            if new.policy.alive_interval_secs != old.policy.alive_interval_secs and \
                    self._liveness_wake is not None:
                self._liveness_wake.set()
            self.log.info("reload.done", **{k: ",".join(v) or None for k, v in done.items()})
            return True

    async def shutdown(self) -> None:
        """SIGTERM: stop accepting, let requests in flight finish within
        shutdown_grace_secs, then stop; with sleep_on_exit, sleep the active model."""
        self.closing = True
        self._stop_listening()
        self.log.info("shutdown", grace_secs=self.config.policy.shutdown_grace_secs)
        self.events.close("llmux is shutting down")  # event streams do not hold it up
        for proto in list(self._busy):
            if self._between_requests(proto) and proto._llmux_task is not None:
                proto._llmux_task.cancel()  # idle keep-alive connections go now
                if proto._llmux_writer is not None:  # (their last answer may still be leaving)
                    self._note_unsent(proto, proto._llmux_writer)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.policy.shutdown_grace_secs
        # A request being read (its body still arriving, or all of it in the socket) is in
        # flight too: it gets the grace to arrive and be served, and then a 503.
        # And an answer written whole is sent whole: a connection closed with bytes still
        # in its transport (a slow reader of a large answer) is waited for until they leave.
        while (self._flushing or self._in_flight()) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        left = self._in_flight()
        self.log.info("shutdown.drained", requests_cut=left)
        await self.stop()

    async def stop(self) -> None:
        """Stop accepting, fail the queue, cut what is left, kill running hooks."""
        self.closing = True
        self._stop_listening()
        self.events.close("llmux is shutting down")
        for setup in list(self._accepting):
            setup.cancel() if isinstance(setup, asyncio.Task) else setup.close()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await self.switcher.close()  # queued requests get 503 shutting_down
        await asyncio.sleep(0)  # let them write it
        for proto in list(self._busy):
            if proto._llmux_task is not None:
                proto._llmux_task.cancel()
        tasks = [p._llmux_task for p in self._busy if p._llmux_task is not None]
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        # SIGTERM has come with a deadline (shutdown_grace_secs, a systemd stop timeout):
        # a server slow to die is killed within it rather than waited for.
        self.hooks.grace_cap = self.config.policy.shutdown_grace_secs
        if self.config.policy.sleep_on_exit:
            for m in self.switcher.models.values():
                if m.state is not ModelState.ASLEEP:
                    self.log.info("shutdown.sleep", model=m.name, state=m.state.value)
                    try:
                        await self.hooks.run(m.cfg, "sleep")
                    except HookError:
                        pass  # logged
        await self.hooks.stop_servers()
        self.hooks.close()
        self.pool.close_all()
        if self._reaping:
            self._reaping = False
            if self._reap_poll is None:
                asyncio.get_running_loop().remove_signal_handler(signal.SIGCHLD)
            if self._reap_timer is not None:
                self._reap_timer.cancel()

    # -- one connection --

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                                proto: _ClientProtocol) -> None:
        http = self.config.http
        self._accepting.discard(writer.transport)
        self._busy[proto] = False
        parser = RequestParser(http.max_body_bytes)
        try:  # (from here on, however it ends, the connection is closed and forgotten)
            refused = self._admit(proto, writer)
            if refused is not None:
                # A refused connection's fd is in no table: it lingers only REFUSED_LINGER_SECS
                # (enough for the request it already sent), and at most ACCEPT_BATCH are being
                # refused at once (_accept pauses beyond): a connect flood once took every fd.
                proto.refused = True
                self._refusing += 1
                writer.write(error_response(refused, method=_unread_method(reader, writer)))
                await _linger(reader, writer, REFUSED_LINGER_SECS)
                return
            while True:
                # The claim is this request's share of the body budget.  It has one owner,
                # this loop, and is released in the finally however the request ends.
                claim = self.bodies.claim()
                try:
                    request = await read_request(reader, writer, parser, http, claim, proto)
                    if request is None:
                        return  # closed cleanly between requests
                    self._busy[proto] = True
                    keep = await self._respond(request[0], request[1], writer, proto)
                    self._busy[proto] = False
                finally:
                    request = None  # the body goes now, not when the next request comes
                    claim.release()
                if not keep or proto.gone:
                    return
                if self.closing and not (parser.buffered or getattr(reader, "_buffer", None)
                                         or _readable(writer)):
                    return  # (a request already here is in flight: shutdown's grace serves it)
        except HTTPError as e:
            await self._reject(reader, writer, e, LINGER_SECS, parser)
        except (_Idle, _Cut, ConnectionError):
            pass
        except asyncio.CancelledError:
            if not proto.gone:
                if self.closing and not self._busy.get(proto) and (parser.buffered or parser.expecting_body):
                    # Shutdown's grace ended while a request was arriving: told, not dropped
                    # (it lingers as a refused connection does: shutdown waits for it).
                    await self._reject(reader, writer, _shutting_down(), REFUSED_LINGER_SECS, parser)
                raise  # shutdown, or cut by a drain: the caller knows
        except Exception as e:  # a bug outside a request's own boundary (_respond)
            log_internal_error(self.log, self.metrics, "connection", e)
            if not proto.responding:
                writer.write(_internal_error_response())
        finally:
            await self._close(writer, proto)

    async def _reject(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                      e: LLMuxError, linger_secs: float, parser: "RequestParser") -> None:
        """A request refused before it was routed: logged, answered, and the connection
        lingers so that the client reads the answer before the close."""
        self.log.info("request.rejected", status=e.status, reason=e.message, peer=_peer(writer))
        writer.write(error_response(e, method=parser.refused_method()))
        await _linger(reader, writer, linger_secs)

    async def _close(self, writer: asyncio.StreamWriter, proto: _ClientProtocol) -> None:
        self._forget(proto)
        self._unsetup(proto)  # (and in connection_lost: one lost before its task ran)
        self._busy.pop(proto, None)
        self._note_unsent(proto, writer)
        writer.close()

    def _in_flight(self) -> int:
        """Connections serving a request, or with one (part of one) arrived unread."""
        return sum(1 for p, busy in self._busy.items() if busy or not self._between_requests(p))

    def _note_unsent(self, proto: _ClientProtocol, writer: asyncio.StreamWriter) -> None:
        """A connection closing with bytes still in its transport is in _flushing until
        connection_lost (the close sends them first), for shutdown to wait for."""
        if writer.transport.get_write_buffer_size() and not proto.gone:
            self._flushing.add(proto)

    # -- connection admission: max_connections, per peer, idle eviction --

    def connection_limit(self) -> int:
        """http.max_connections, clamped to what the fd limit found at start allows."""
        limit = self.config.http.max_connections
        if self.fd_limit is not None:
            limit = min(limit, max(1, (self.fd_limit - FD_RESERVE) // 2))
        return limit

    def peer_cap(self) -> Optional[int]:
        """http.max_connections_per_peer, kept PEER_PENDING_MAX under connection_limit():
        one address never fills the table by itself (None: no cap)."""
        cap = self.config.http.max_connections_per_peer
        return None if cap is None else min(cap, max(1, self.connection_limit() - PEER_PENDING_MAX))

    def _admit(self, proto: _ClientProtocol, writer: asyncio.StreamWriter) -> Optional[LLMuxError]:
        """Count a new connection in, or say why not (a 503 to answer).  A full table, or
        a peer at its cap, first makes room by closing the connection idle longest (no
        request in progress: nothing accepted is lost): idle connections cannot keep
        a newcomer, a health check say, out."""
        peer = _peername(writer)
        ip = peer[0] if isinstance(peer, tuple) else None
        if ip is not None and _is_loopback(ip):
            ip = None  # a reverse proxy on this host: every client comes from there
        cap = self.peer_cap()
        if ip is not None and cap is not None and len(self._peers.get(ip, ())) >= cap:
            if not self._evict_idle_of(ip):
                self.metrics.inc("llmux_connections_refused_total", "max_connections_per_peer")
                self.log.warning("connection.refused", reason="max_connections_per_peer",
                                 limit=cap, peer=ip)
                return LLMuxError(f"too many connections from {ip}; expected at most {cap} "
                                  "per client address; retry later", status=503,
                                  code="too_many_connections", headers=[("retry-after", "1")])
        limit = self.connection_limit()
        if self._open >= limit and not self._evict_idle(None, "max_connections"):
            self.metrics.inc("llmux_connections_refused_total", "max_connections")
            self.log.warning("connection.refused", reason="max_connections", limit=limit)
            return LLMuxError("too many connections; retry later", status=503,
                              code="too_many_connections", headers=[("retry-after", "1")])
        self._open += 1
        proto.counted = True
        self._unsetup(proto)
        if ip is not None:
            proto.peer_ip = ip
            self._peers.setdefault(ip, set()).add(proto)
        return None

    @staticmethod
    def _between_requests(proto: _ClientProtocol) -> bool:
        """Whether a connection waits for a request with no byte of one arrived: none
        read (``idle_since``), none in its socket unread."""
        writer = proto._llmux_writer
        return proto.idle_since is not None and writer is not None and not _readable(writer)

    def _evict_idle(self, ip: Optional[str], reason: str) -> bool:
        """Close the connection idle longest (of ``ip`` only, if given); False if none is.
        One whose next request is already in its socket (not read yet) is not idle."""
        idle = sorted((p for p in (self._busy if ip is None else self._peers.get(ip, ()))
                       if p.counted and p.idle_since is not None), key=lambda p: p.idle_since or 0.0)
        for proto in idle:
            writer = proto._llmux_writer
            if writer is None or not self._between_requests(proto):
                continue
            self.log.info("connection.evicted", reason=reason, peer=_peer(writer),
                          idle_secs=round(asyncio.get_running_loop().time() - (proto.idle_since or 0.0), 3))
            self._forget(proto)
            proto.idle_since = None
            # A FIN: its read returns EOF and its task ends as for a client that closed.
            writer.transport.close()
            return True
        return False

    def _forget(self, proto: _ClientProtocol) -> None:
        """Take a connection out of the table (closed or evicted); safe to call twice."""
        if not proto.counted:
            return
        proto.counted = False
        self._open -= 1
        ip = proto.peer_ip
        if ip is not None:
            conns = self._peers.get(ip)
            if conns is not None:
                conns.discard(proto)
                if not conns:
                    del self._peers[ip]
                    self._no_idle.discard(ip)

    # -- one request --

    async def _respond(self, head: RequestHead, body: bytes, writer: asyncio.StreamWriter,
                       proto: _ClientProtocol) -> bool:
        """Answer one request; return whether the connection may carry another.

        In steps: (1) a CORS preflight is answered at once; (2) authentication, on the
        very path routing uses; (3) routing, by the route table, to llmux's own answer
        or to a model; (4) llmux's answer is written, or (5) the request waits its turn
        if many start at once (TurnBudget) and is proxied with a slot; (6) an error
        becomes a response here, in one place."""
        started = time.monotonic()
        model: Optional[ModelConfig] = None
        slot: Optional[Slot] = None
        held: Optional[bool] = None  # a held stream's head was sent (chunked if True)
        held_keeps = True  # and whether that head kept the connection
        ticket: Union[Slot, _Waiter, None] = None
        status = 500
        proto.responding = False  # set once a byte of this request's answer is written
        proto.relayed = False
        bad_path: Optional[HTTPError] = None
        raw_path = head.target.split("?", 1)[0]  # logged: visible ASCII, unlike the decoded one
        try:
            path = route_path(head.target)
        except HTTPError as e:
            path, bad_path = raw_path, e
        origins = _control_origins(self.config.cors_origins) if _is_control(path) \
            else self.config.cors_origins
        cors = cors_headers(origins, head.get("origin"))
        try:
            if head.method == "OPTIONS" and is_preflight(head):
                # The Fetch standard sends preflights without credentials, so they need
                # no key; they are never forwarded (an engine may not answer them).
                status = 204
                keep = self._keeps(head)
                await self._send(writer, proto, preflight_response(head, origins, keep))
                return keep
            # Only GET and HEAD of /health and of the dashboard's page (no data in it: what
            # it shows it fetches with the key it asks for) go without a key.
            public = bad_path is None and head.method in ("GET", "HEAD") and (
                path in ("/health", "/llmux/ui", "/llmux/ui/") or _wants_dashboard(head, path))
            if self._keys and not public:
                self._authorize(head)
            if bad_path is not None:
                raise bad_path
            answer = self._route_now(head, body, path) or \
                await self._route(head, body, path, _peername(writer))
            if isinstance(answer, _Stream):
                status = 200
                status = await answer.serve(head, writer, proto, cors)
                return False
            if isinstance(answer, _Local):
                status = answer.status
                keep = self._keeps(head)
                await self._send(writer, proto, local_response(
                    answer.status, answer.body, answer.content_type, keep_alive=keep,
                    headers=[*cors, *answer.headers], head_only=head.method == "HEAD",
                    http10=head.version == "HTTP/1.0"))
                return keep
            model = answer.model
            proto.model = model.name
            if self.log.enabled("debug"):
                self.log.debug("request.head", method=head.method, target=head.target,
                               version=head.version, model=model.name, body_bytes=len(body),
                               headers=[k for k, _ in head.headers])  # names only: no secrets
            if self.events.subscribers:
                self.events.publish("request.start", {"model": model.name, "method": head.method,
                                                      "path": raw_path})
            ticket = self.switcher.enqueue(model.name)
            progress = ""
            if isinstance(ticket, Slot):
                slot = ticket
            else:
                progress = model.stream_progress or self.config.policy.stream_progress
                # Ollama's own API (/api/*) streams NDJSON, not SSE: comments would break it.
                if answer.stream and progress != "off" and head.method == "POST" \
                        and not path.startswith("/api/"):
                    held = head.version != "HTTP/1.0"  # chunked; else read until close
                    held_keeps = self._keeps(head)  # what its head, written now, says
                    slot = await self._hold_stream(ticket, head, path, writer, proto, cors,
                                                   progress, held, held_keeps)
                else:
                    slot = await self.switcher.wait(ticket)
                assert slot is not None
            try:  # the switcher's config: a reload may have left the old one running
                if held is not None and progress == "reasoning" and path.endswith("/chat/completions"):
                    ready = _reasoning_delta(model.name, f"Model '{model.name}' is ready "
                                                         f"(waited {slot.waited:.1f}s).\n\n")
                    await self._send(writer, proto, encode_chunk(ready) if held else ready)
                # Later in a burst, it is written to its backend in its turn (TurnBudget).
                result = await relay(self.pool, model.name, slot.model.cfg.port, answer.head,
                                     answer.body, writer, self.config.policy.upstream_timeout_secs,
                                     proto, cors, held, self.turns)
            finally:
                slot.release()
            status = result.status
            if result.error is not None:
                raise result.error
            return result.keep_alive and held_keeps
        except LLMuxError as e:
            status = e.status
            if e.status >= 500:
                self.log.warning("request.failed", model=model.name if model else None,
                                 status=e.status, reason=e.message)
            if model is not None and e.code == "upstream_unavailable":
                self._backend_failed(model.name)  # refused or reset: is it down?
            if held is not None:  # its 200 head is out: the error ends the stream instead
                await self._send(writer, proto, held_error(e, held))
                return held and held_keeps
            keep = self._keeps(head)
            await self._send(writer, proto, error_response(e, keep, cors, head))
            return keep
        except _Cut as e:
            status = 502
            self.log.warning("request.cut", model=model.name if model else None, reason=str(e))
            if held is not None:  # llmux frames a held stream: it ends with the error, not
                # torn (the blank lines end whatever event the backend left half-written)
                writer.write(held_error(UpstreamError(str(e)), held, b"\n\n"))
            raise
        except asyncio.CancelledError:
            cut = slot.cut if slot is not None else None
            if proto.gone or (cut is None and not self.closing):
                status = 499  # nginx's code for "client closed request"
                raise
            # Cut by shutdown (after shutdown_grace_secs) or by the switcher (a drain
            # timeout, drain_before_switch false, its server died), not by its client: it
            # is told once, and the log says the truth.  A held stream is llmux's to frame:
            # it ends with the error, not torn (blank lines end an event left half-written).
            told = _shutting_down() if cut is None else _request_cut(model, cut)
            began = proto.relayed if held is not None else proto.responding
            status = 502 if began else 503
            if began and cut is None:  # (the switcher logs its own cuts)
                self.log.warning("request.cut", model=model.name if model else None,
                                 reason=f"{told.message}: its shutdown_grace_secs ran out")
            if held is not None:
                writer.write(held_error(told, held, b"\n\n" if proto.relayed else b""))
            elif not proto.responding:
                writer.write(error_response(told, False, cors, head))
            if cut is None:
                raise  # the shutdown goes on
            task = asyncio.current_task()
            if task is not None and hasattr(task, "uncancel"):
                task.uncancel()  # 3.11+: this cancellation was handled here
            return False
        except ConnectionError:
            raise  # the client went away while we wrote: _serve_connection closes
        except Exception as e:  # a bug: the last-resort boundary of one request
            status = 500
            log_internal_error(self.log, self.metrics, "request", e)
            if not proto.responding:
                proto.responding = True
                writer.write(_internal_error_response())
            return False  # the connection may be out of step: close it
        finally:
            secs = time.monotonic() - started
            waited: Optional[float] = None
            eta: Optional[float] = None
            if slot is not None and slot.waited_for is not None:
                waited, eta = slot.waited, slot.eta
            elif isinstance(ticket, _Waiter):  # it queued and never got a slot
                waited, eta = self.switcher.clock() - ticket.enqueued_at, ticket.eta
            line: Dict[str, Any] = {"method": head.method, "path": raw_path,
                                    "model": model.name if model else None, "status": status,
                                    "secs": round(secs, 4)}
            if waited is not None:
                line["waited_secs"] = round(waited, 3)
            if slot is not None and slot.waited_for is not None:
                line["waited_for"] = slot.waited_for
            if eta is not None:
                line["eta_secs"] = round(eta, 3)
            if held is not None:
                line["held"] = True
            self.log.request(line)
            if model is not None:
                self.metrics.inc("llmux_requests_total", model.name, str(status))
                self.metrics.observe("llmux_request_duration_seconds", model.name, value=secs)

    async def _hold_stream(self, waiter: _Waiter, head: RequestHead, path: str,
                           writer: asyncio.StreamWriter, proto: _ClientProtocol,
                           cors: List[Tuple[str, str]], progress: str, chunked: bool,
                           keep_alive: bool) -> Slot:
        """A streaming request that has to wait for its model: its 200 event-stream head
        at once, then a loading-status SSE comment every progress_interval_secs until
        its slot comes (with stream_progress "reasoning", on chat completions, also a
        reasoning_content delta a chat UI shows).  Client timeouts see bytes, so a long
        wake does not fail them.  Raises what the wait raises (the caller ends the stream
        with an error event); the waiter leaves the queue whatever happens."""
        sw = self.switcher
        name = waiter.model.name
        visible = progress == "reasoning" and path.endswith("/chat/completions")
        self.metrics.inc("llmux_stream_progress_total", name)

        def frame(data: bytes) -> bytes:
            return encode_chunk(data) if chunked else data

        try:
            await self._send(writer, proto, sse_head(chunked, keep_alive, cors)
                             + frame(self._progress(sw.wait_info(waiter), visible, True)))
            while True:
                slot = await sw.wait(waiter, self.config.policy.progress_interval_secs)
                if slot is not None:
                    break
                await self._send(writer, proto, frame(self._progress(sw.wait_info(waiter), visible)))
        except BaseException:
            sw.leave(waiter)
            raise
        return slot

    @staticmethod
    def _progress(info: Dict[str, Any], visible: bool, first: bool = False) -> bytes:
        """One loading status: an SSE comment, and with ``visible`` a reasoning delta."""
        name = info["model"]
        eta = info["eta_secs"]
        if eta is None:
            until = "eta unknown " + ("(a wake on the way was never measured)" if info["state"] != "active"
                                      else "(it waits for one of the max_in_flight slots)")
        elif eta <= 0:
            until = "eta any moment (later than measured)"
        else:
            until = f"eta {eta:.0f}s" if eta >= 1 else "eta <1s"
        doing = ""
        if "phase" in info:
            doing = f"; switch {info['switch']}: {info['phase']} {info['phase_model'] or ''}".rstrip() \
                    + f" for {info['phase_secs']:.1f}s"
        text = (f"llmux: waiting {info['waited_secs']:.1f}s for model '{name}' ({info['state']}), "
                f"{info['position']} of {info['queued']} in its queue{doing}; {until}")
        out = b": " + text.encode("utf-8") + b"\n\n"
        if visible:
            line = (f"Loading model '{name}'" if first else "Still loading") + \
                   (f", about {eta:.0f}s left" if eta and eta >= 1 else "") + "...\n"
            out += _reasoning_delta(name, line)
        return out

    def _keeps(self, head: RequestHead) -> bool:
        """Whether an answer written now keeps its connection: as its client asked, but
        not once shutdown has begun (RFC 9112 9.6: the last answer says it closes)."""
        return head.keep_alive and not self.closing

    @staticmethod
    async def _send(writer: asyncio.StreamWriter, proto: _ClientProtocol, data: bytes) -> None:
        proto.responding = True
        writer.write(data)
        await writer.drain()

    # -- routes --
    # A request goes to the first route whose methods include its method (None: any)
    # and whose pattern matches the whole decoded path; one that matches none is
    # proxied to the model it names (_route_model).  A handler returns llmux's own
    # answer (_Local) or what to forward where (_Forward).

    def _route_table(self) -> List["_Route"]:
        read = frozenset({"GET", "HEAD"})
        return [
            _Route(read, re.compile(r"/metrics"), self._route_metrics),
            _Route(read, re.compile(r"/health"), self._route_health),
            _Route(read, re.compile(r"/(?:v1/)?models"), self._route_models),
            _Route(read, re.compile(r"/v1/models/(.+)", re.DOTALL), self._route_model_card),
            _Route(read, re.compile(r"/llmux/events"), self._route_events),
            _Route(read, re.compile(r"/llmux/ui/?"), self._route_ui),
            _Route(None, re.compile(r"/llmux(?:/.*)?", re.DOTALL), self._route_control),
            _Route(None, re.compile(r"/upstream/.+", re.DOTALL), self._route_upstream),
        ]

    async def _route(self, head: RequestHead, body: bytes, path: str,
                     peer: Any) -> Union["_Local", "_Forward", "_Stream"]:
        for route in self._routes:
            if route.methods is not None and head.method not in route.methods:
                continue
            match = route.pattern.fullmatch(path)
            if match is not None:
                return await route.handler(head, body, match, peer)
        if _wants_dashboard(head, path):
            return _dashboard()
        self._check_not_blocked(path)
        return await self._route_model(head, body)

    def _route_now(self, head: RequestHead, body: bytes, path: str) -> Optional["_Forward"]:
        """_route's answer for the usual request, a POST whose small JSON body names a
        model to send it to as it is, without a coroutine; None: ask _route, which also
        says what is wrong.  (POST matches no route of llmux's but /llmux and /upstream.)"""
        if head.method != "POST" or path.startswith(("/llmux", "/upstream/")) \
                or path in self.config.blocked_paths or not body:
            return None
        content_type = head.get("content-type")
        if content_type is not None and content_type.lower().startswith("multipart/form-data"):
            return None
        found = _json_model_quick(body)
        if not found:
            return None
        name = found.value
        model = self.config.resolve(name) if type(name) is str and name else None
        if model is None or (model.upstream_model is not None and name != model.upstream_model):
            return None
        return _Forward(model, head, body, found.stream)

    def _check_not_blocked(self, path: str) -> None:
        """403 for the engines' own load/unload/sleep/wake routes (blocked_paths)."""
        if path in self.config.blocked_paths:
            raise LLMuxError(f"{path} is not proxied: llmux decides what is loaded; use "
                             "POST /llmux/models/NAME/wake or /sleep, or change "
                             "blocked_paths in the config", status=403,
                             type="permission_error", code="blocked_path")

    async def _route_metrics(self, head: RequestHead, body: bytes, match: "re.Match[str]",
                             peer: Any) -> "_Local":
        return _Local(200, self._scrape().encode(), "text/plain; version=0.0.4; charset=utf-8")

    async def _route_health(self, head: RequestHead, body: bytes, match: "re.Match[str]",
                            peer: Any) -> "_Local":
        return _Local.json(200, {"status": "ok", **self.switcher.status()})

    async def _route_models(self, head: RequestHead, body: bytes, match: "re.Match[str]",
                            peer: Any) -> "_Local":
        return _Local.json(200, {"object": "list",
                                 "data": [self._model_card(m) for m in self.config.models.values()]})

    async def _route_model_card(self, head: RequestHead, body: bytes, match: "re.Match[str]",
                                peer: Any) -> "_Local":
        m = self.config.resolve(match.group(1))
        if m is None:
            raise self._unknown_model(match.group(1))
        return _Local.json(200, self._model_card(m))

    async def _route_events(self, head: RequestHead, body: bytes, match: "re.Match[str]",
                            peer: Any) -> "_Stream":
        self._check_control_peer(peer, head)
        self._check_control_origin(head)
        if len(self.events) >= EVENTS_MAX_SUBSCRIBERS:
            raise LLMuxError(f"too many /llmux/events streams open; expected at most "
                             f"{EVENTS_MAX_SUBSCRIBERS}; retry later", status=503,
                             code="too_many_subscribers", headers=[("retry-after", "5")])
        return _Stream(self._serve_events)

    async def _serve_events(self, head: RequestHead, writer: asyncio.StreamWriter,
                            proto: _ClientProtocol, cors: List[Tuple[str, str]]) -> int:
        """GET /llmux/events: a snapshot (``"event": "snapshot"``: what /llmux/status
        says, plus the timeline of state changes), then every event as it happens, a
        ping comment every EVENTS_PING_SECS, until the client leaves, it is dropped for
        reading too slowly, or llmux shuts down (``events.end``)."""
        chunked = head.version != "HTTP/1.0"
        if head.method == "HEAD":
            await self._send(writer, proto, sse_head(chunked, False, cors))
            return 200
        proto.responding = True
        writer.write(sse_head(chunked, False, cors))
        # Subscribed in the same step as the snapshot is written: no event falls between.
        sub = self.events.subscribe(writer.transport, chunked)
        try:
            self.events.send({"seq": self.events.seq, "ts": round(time.time(), 3),
                              "event": "snapshot", **self.status(),
                              "timeline": list(self.switcher.timeline)}, only=sub)
            while not sub.done.done():
                done, _ = await asyncio.wait([sub.done], timeout=EVENTS_PING_SECS)
                if not done:
                    self.events.ping(sub)
            if not sub.dropped and not writer.transport.is_closing():
                writer.write(b"0\r\n\r\n" if chunked else b"")
        finally:
            self.events.end(sub, "gone")
        return 200

    async def _route_ui(self, head: RequestHead, body: bytes, match: "re.Match[str]",
                        peer: Any) -> "_Local":
        return _dashboard()

    async def _route_control(self, head: RequestHead, body: bytes, match: "re.Match[str]",
                             peer: Any) -> "_Local":
        self._check_control_peer(peer, head)  # /llmux/* is never proxied
        self._check_control_origin(head)
        return _Local.json(*await self._control(head.method, match.group(0)))

    async def _route_upstream(self, head: RequestHead, body: bytes, match: "re.Match[str]",
                              peer: Any) -> "_Forward":
        """/upstream/NAME/PATH: forwarded to NAME's backend as /PATH, query and body as
        they came, so engine routes that name no model (/props, /slots, /metrics, web
        UIs) are reachable.  NAME is the longest configured name or alias that the
        decoded path starts with, followed by '/' or the end: with models 'org' and
        'org/m', /upstream/org/m/props is /props on 'org/m'."""
        target = head.target
        absolute = _ABSOLUTE_FORM.match(target)
        if absolute:
            target = target[absolute.end():] or "/"
        raw, question, query = target.partition("?")
        decoded = match.group(0)[len("/upstream/"):]
        labels = [n for m in self.config.models.values() for n in (m.name, *m.aliases)]
        for label in sorted(labels, key=len, reverse=True):
            if decoded != label and not decoded.startswith(label + "/"):
                continue
            # The raw segments that decode to the label: as many as it has '/', or fewer
            # when the client sent some of them as %2F.
            segments = raw.split("/")[2:]
            for k in range(1, label.count("/") + 2):
                if urllib.parse.unquote("/".join(segments[:k])) == label:
                    rest = "/" + "/".join(segments[k:])
                    self._check_not_blocked(route_path(rest))
                    cfg = self.config.resolve(label)
                    assert cfg is not None
                    await self._check_body_names(cfg, head, body)
                    return _Forward(cfg, head._replace(target=rest + question + query), body)
        raise self._unknown_model(decoded.split("/", 1)[0])

    async def _check_body_names(self, cfg: ModelConfig, head: RequestHead, body: bytes) -> None:
        """/upstream/NAME takes no body naming another model: an engine serving several
        (Ollama, llama.cpp's router) would load it behind llmux's back."""
        if not body:
            return
        multipart = (head.get("content-type") or "").lower().startswith("multipart/form-data")
        try:
            found = await self._model_member(head, body, multipart)
        except LLMuxError as e:
            if e.code == "ambiguous_model":
                raise
            return  # not a body llmux can read: the backend judges it
        name = found.value if found is not None else None
        if isinstance(name, str) and name not in (cfg.name, *cfg.aliases, cfg.upstream_model):
            raise LLMuxError(f"/upstream/{cfg.name}/... with a body naming model '{name[:MAX_ECHOED_NAME]}'; "
                             f"expected '{cfg.name}' or no model (send it to /v1/... or "
                             f"/upstream/{name[:MAX_ECHOED_NAME]}/... instead)", status=400,
                             type="invalid_request_error", code="model_mismatch")

    async def _route_model(self, head: RequestHead, body: bytes) -> "_Forward":
        """Any other request: proxied to the model its body names (JSON or multipart),
        else its x-llmux-model header, else its ?model= parameter.  With the model's
        upstream_model set, the body's ``model`` is rewritten to it (one splice)."""
        named = self._named_elsewhere(head)
        content_type = (head.get("content-type") or "").lower()
        multipart = content_type.startswith("multipart/form-data")
        try:
            found = await self._model_member(head, body, multipart)
        except LLMuxError:
            if named is None:
                raise
            found = None  # the header names the model; the backend judges the body
        name = found.value if found is not None else None
        if not isinstance(name, str) or not name:
            if named is not None:
                name, found = named, None
            elif isinstance(name, _NotString):
                raise LLMuxError(f"request's 'model' field is {name.kind}; expected the name "
                                 "of a model", status=400, type="invalid_request_error",
                                 code="missing_model")
            else:
                raise LLMuxError("request has no 'model' field; expected the name of a model "
                                 f"(or an {MODEL_HEADER} header, or ?model=NAME)", status=400,
                                 type="invalid_request_error", code="missing_model")
        model = self.config.resolve(name)
        if model is None:
            raise self._unknown_model(name)
        if found is not None and model.upstream_model is not None and name != model.upstream_model:
            if found.start < 0:
                found = await self._model_member(head, body, multipart, where=True)
                assert found is not None
            body = _replace_model(found, model.upstream_model, multipart)
        return _Forward(model, head, body, found is not None and found.stream)

    async def _model_for(self, head: RequestHead, body: bytes) -> ModelConfig:
        """The configured model a proxied request names."""
        return (await self._route_model(head, body)).model

    @staticmethod
    def _named_elsewhere(head: RequestHead) -> Optional[str]:
        """The model an x-llmux-model header or a ?model= parameter names, or None."""
        header = head.get(MODEL_HEADER)
        if header is not None and header.strip():
            try:  # header values arrive as bytes, read as latin-1: names are UTF-8
                return header.strip().encode("latin-1").decode("utf-8")
            except UnicodeError:
                return header.strip()
        _, question, query = head.target.partition("?")
        if question:
            values = [v for k, v in urllib.parse.parse_qsl(query) if k == "model" and v]
            if values:
                return values[-1]
        return None

    async def _model_member(self, head: RequestHead, body: bytes, multipart: bool,
                            where: bool = False) -> Optional[_ModelMember]:
        """The body's ``model`` member, or None when there is none; where it lies (for a
        rewrite) only if ``where`` (a small JSON body's is read without)."""
        if multipart:
            return _multipart_model_field(head.get("content-type") or "", body)
        if not body:
            raise LLMuxError(f"{head.method} {head.target.split('?')[0]} has no body; expected "
                             f"a JSON object with a 'model' field (or an {MODEL_HEADER} header, "
                             "or ?model=NAME)", status=400, type="invalid_request_error",
                             code="missing_model")
        quick = _json_model_quick(body) if not where else False
        if quick is not False:
            return quick
        steps = _json_model_scan(body)
        try:
            while True:
                next(steps)
                await asyncio.sleep(0)  # a long scan shares the loop
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        except _NotAnObject as e:
            raise LLMuxError(f"request body is {e}; expected a JSON object with a 'model' field",
                             status=400, type="invalid_request_error", code="missing_model") from None
        except _OtherCase as e:  # valid JSON, but two engines would read two models
            raise LLMuxError(str(e), status=400, type="invalid_request_error",
                             code="ambiguous_model") from None
        except ValueError as e:
            raise LLMuxError(f"request body is not valid JSON: {e}", status=400,
                             type="invalid_request_error", code="invalid_json") from None

    def _authorize(self, head: RequestHead) -> None:
        """Require one of the API keys: ``Authorization: Bearer KEY`` or ``x-api-key``."""
        given = head.get("x-api-key") or ""
        auth = head.get("authorization") or ""
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip(" \t")
        # The parser decoded the header as latin-1, so this gives back the bytes the
        # client sent; keys are ASCII (parse_config), so equal bytes mean equal keys.
        raw = given.encode("latin-1")
        ok = False
        for key in self._keys:  # every key compared, in constant time
            ok |= _compare_digest(raw, key)
        if not ok:
            raise LLMuxError("missing or invalid API key; send 'Authorization: Bearer <key>'",
                             status=401, type="authentication_error", code="invalid_api_key",
                             headers=[("www-authenticate", "Bearer")])

    def _check_control_origin(self, head: RequestHead) -> None:
        """A browser page of another origin may not use /llmux/* (a page on this host is a
        loopback peer: with cors_origins "*" it could read hook output and, with a plain
        form POST that needs no preflight, wake and sleep models).  Same-origin pages (the
        dashboard), origins listed by name in cors_origins, and clients that send no
        Origin (curl, SDKs) may."""
        given = [v for k, v in head.headers if k == "origin"]
        if not given:
            return
        origin = given[-1]
        if len(given) == 1:  # (a browser sends one: two is no page's request)
            if origin.lower() in _control_origins(self.config.cors_origins):
                return
            try:  # https too: llmux behind a TLS-terminating proxy
                url = urllib.parse.urlsplit(origin.strip(" \t"))
            except ValueError:  # "http://[x]": no origin of any page
                url = None
            if url is not None and url.scheme.lower() in ("http", "https") and url.netloc \
                    and url.netloc.lower() == (head.get("host") or "").strip(" \t").lower():
                return
        raise LLMuxError(f"/llmux/ does not answer pages of other origins; expected a request "
                         f"from the dashboard's own origin or one listed by name in cors_origins "
                         f"(\"*\" does not count here); got Origin {origin[:MAX_ECHOED_NAME]}",
                         status=403, type="permission_error", code="cross_origin_control")

    def _check_control_peer(self, peer: Any, head: Optional[RequestHead] = None) -> None:
        """/llmux/* can wake and sleep models and shows hook output: without api_keys it
        answers only this host, unless allow_remote_control says otherwise.  With keys,
        _authorize has already required one from every peer.  Answering this host alone,
        it also wants a Host that names this host: a web page whose name an attacker
        re-points at 127.0.0.1 (DNS rebinding) is a loopback peer of the same origin."""
        if self._keys or self.config.allow_remote_control:
            return
        if is_loopback_peer(peer):
            host = (head.get("host") if head is not None else None) or "localhost"
            if head is None or _is_loopback_host(host):
                return
            raise LLMuxError(f"the control API answers only requests for this host; expected a "
                             f"Host of localhost or a loopback address (or set api_keys); got "
                             f"Host {host[:MAX_ECHOED_NAME]}", status=403,
                             type="permission_error", code="remote_control_forbidden")
        host = peer[0] if isinstance(peer, tuple) and peer else "an unknown address"
        raise LLMuxError("the control API answers only loopback clients; expected a request "
                         f"from this host, or set api_keys (or allow_remote_control: true) "
                         f"in the config; got a request from {host}", status=403,
                         type="permission_error", code="remote_control_forbidden")

    def _model_card(self, m: ModelConfig) -> Dict[str, Any]:
        state = self.switcher.models[m.name].state
        eta = self.switcher.eta(m.name)
        return {"id": m.name, "object": "model", "created": self.started, "owned_by": "llmux",
                "aliases": list(m.aliases), "loaded": state is ModelState.ACTIVE,
                "state": state.value,
                # llama.cpp's router mode and llama-swap clients read status.value.
                "status": {"value": _STATUS_VALUE[state],
                           "eta_secs": None if eta is None else round(eta, 3)}}

    def _scrape(self) -> str:
        """Refresh the gauges read from the switcher, then render every metric."""
        mt = self.metrics
        names = {(m.name,) for m in self.switcher.models.values()}
        for gauge in ("llmux_request_queue_depth", "llmux_model_in_flight",
                      "llmux_model_max_in_flight", "llmux_model_active"):
            series = mt._values[gauge]  # a removed model's (or limit's) gauge goes with it
            for labels in [k for k in series if k not in names]:
                del series[labels]
        for m in self.switcher.models.values():
            if m.cfg.max_in_flight is None:
                mt._values["llmux_model_max_in_flight"].pop((m.name,), None)
            mt.set("llmux_request_queue_depth", m.name, value=len(m.queue))
            mt.set("llmux_model_in_flight", m.name, value=m.in_flight)
            if m.cfg.max_in_flight is not None:
                mt.set("llmux_model_max_in_flight", m.name, value=m.cfg.max_in_flight)
            mt.set("llmux_model_active", m.name, value=1 if m.state is ModelState.ACTIVE else 0)
        for (frm, to), secs in self.switcher.costs.items():
            mt.set("llmux_switch_cost_ema_seconds", frm, to, value=secs)
        return mt.render()

    def status(self) -> Dict[str, Any]:
        """GET /llmux/status: the switcher, recent switches, costs, last hook results."""
        hooks: Dict[str, Dict[str, Any]] = {}
        for (model, hook), r in sorted(self.hooks.last.items()):
            hooks.setdefault(model, {})[hook] = {
                "ok": r.ok, "exit_code": r.exit_code, "secs": round(r.duration, 6),
                "error": None if r.ok else r.describe()}
        return {**self.switcher.detail(), "version": __version__,
                "policy": self.config.policy.name,
                "switches": list(self.switcher.history), "hooks": hooks}

    async def _control(self, method: str, path: str) -> Tuple[int, Any]:
        """/llmux/status, POST /llmux/models/NAME/wake and /sleep; 404 for any other
        /llmux/ path.  NAME is decoded (route_path) and may hold '/' (``org/model``)."""
        if path in ("/llmux/status", "/llmux/events", "/llmux/ui", "/llmux/ui/"):
            if method in ("GET", "HEAD") and path == "/llmux/status":
                return 200, self.status()
            raise LLMuxError(f"{path} takes GET", status=405, type="invalid_request_error",
                             code="method_not_allowed", headers=[("allow", "GET, HEAD")])
        match = re.fullmatch(r"/llmux/models/(.+)/(wake|sleep)", path, re.DOTALL)
        if not match:
            raise LLMuxError(f"no llmux route {path}; expected /llmux/status or "
                             "/llmux/models/NAME/wake or /llmux/models/NAME/sleep",
                             status=404, type="invalid_request_error", code="not_found")
        if method != "POST":
            raise LLMuxError(f"{path} takes POST", status=405, type="invalid_request_error",
                             code="method_not_allowed", headers=[("allow", "POST")])
        cfg = self.config.resolve(match.group(1))
        if cfg is None:
            raise self._unknown_model(match.group(1))
        sw = self.switcher
        m = sw.models[cfg.name]
        action = match.group(2)
        if action == "wake" and m.state is ModelState.ACTIVE:
            return 200, {"model": cfg.name, "state": m.state.value, "changed": False}
        if action == "sleep" and m.state is ModelState.ASLEEP:
            return 200, {"model": cfg.name, "state": m.state.value, "changed": False}
        task = sw.start_wake(cfg.name, "control API") if action == "wake" else \
            sw.start_sleep(cfg.name, "control API")
        if task is None:
            why = sw.busy_reason() or f"model '{cfg.name}' is {m.state.value}"
            raise LLMuxError(f"cannot {action} model '{cfg.name}' now: {why}", status=409,
                             type="invalid_request_error", code="conflict")
        result = await asyncio.shield(task)
        if result != "ok":
            last = self.hooks.last.get((cfg.name, action)) or next(
                (r for (mn, h), r in self.hooks.last.items() if not r.ok), None)
            raise LLMuxError(f"{action} of model '{cfg.name}' failed"
                             + (f": {last.describe()}" if last is not None and not last.ok else ""),
                             status=503, code="hook_failed",
                             headers=_retry_after(max(m.backoff_until, sw.clock()), sw.clock()))
        return 200, {"model": cfg.name, "state": m.state.value, "changed": True}

    def _unknown_model(self, name: str) -> LLMuxError:
        names = ", ".join(self.config.models)
        if len(name) > MAX_ECHOED_NAME:  # a client's 60 MB "model" is not echoed back
            name = name[:MAX_ECHOED_NAME] + f"... ({len(name)} characters)"
        return LLMuxError(f"model '{name}' does not exist; available models: {names}",
                          status=404, type="invalid_request_error", code="model_not_found")


def _dashboard() -> "_Local":
    """The dashboard's page.  It may not be framed: in a frame over a decoy, one click on
    another site's page would press its sleep button with the dashboard's own origin."""
    return _Local(200, DASHBOARD_HTML.encode("utf-8"), "text/html; charset=utf-8",
                  (("x-frame-options", "DENY"), ("content-security-policy", "frame-ancestors 'none'"),
                   ("cache-control", "no-cache")))


def _is_loopback_host(host: str) -> bool:
    """A Host header naming this machine: localhost (or a name under it) or a loopback
    address, with or without a port."""
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:3000
        name = host[1:].split("]", 1)[0]
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _is_control(path: str) -> bool:
    return path == "/llmux" or path.startswith("/llmux/")


def _control_origins(origins: Sequence[str]) -> Tuple[str, ...]:
    """cors_origins as they apply to /llmux/*: only origins named; never "*"."""
    return tuple(o for o in origins if o != "*")


def _wants_dashboard(head: RequestHead, path: str) -> bool:
    """GET / from a browser (it asks for HTML): the dashboard, not a proxied request."""
    return path == "/" and head.method in ("GET", "HEAD") and \
        "text/html" in (head.get("accept") or "").lower()


# A model's state as llama.cpp's router mode says it in /models (status.value).
_STATUS_VALUE = {ModelState.ASLEEP: "unloaded", ModelState.WAKING: "loading",
                 ModelState.ACTIVE: "loaded", ModelState.DRAINING: "unloading",
                 ModelState.SLEEPING: "unloading"}


def _reasoning_delta(model: str, text: str) -> bytes:
    """A chat.completion.chunk whose delta is ``text`` as reasoning_content (what chat
    UIs such as Open WebUI show as the model's thinking), as an SSE event."""
    chunk = {"id": "llmux-loading", "object": "chat.completion.chunk", "created": int(time.time()),
             "model": model, "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                "reasoning_content": text},
                                          "finish_reason": None}]}
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


def _internal_error_response() -> bytes:
    return error_response(LLMuxError("internal error in llmux; it was logged with its traceback"))


async def read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       parser: RequestParser, http: HttpConfig,
                       claim: Optional[_BodyClaim] = None,
                       conn: Optional["_ClientProtocol"] = None,
                       ) -> Optional[Tuple[RequestHead, bytes]]:
    """Read one whole request; None if the client closed cleanly before it began.

    Before the first byte the connection may idle for idle_timeout_secs (then _Idle;
    ``conn.idle_since`` is set meanwhile, so the server may evict it); the head must then
    arrive within header_timeout_secs; the body may pause for at most body_timeout_secs
    at a time and, after its first body_timeout_secs, must average
    min_body_rate_bytes_per_sec (else HTTPError 408).  The body is held in ``claim``
    (503 when the budget is spent: decided on Content-Length before any body byte is
    read, or as a chunked body grows) and in one buffer, which is returned.
    """
    loop = asyncio.get_running_loop()
    deadline = None
    lazy = conn.deadline if conn is not None else None
    # Idle time counts from the end of the last request, not from the last byte: the
    # empty lines RFC 9112 2.2 lets a client send before a request are skipped without a
    # trace, and must not keep an idle connection open for ever.
    idle_until = loop.time() + http.idle_timeout_secs
    event = parser.next_event()
    while event is NEED_DATA:
        if parser.buffered == 0 and deadline is None:
            if conn is not None:
                conn.idle_since = idle_until - http.idle_timeout_secs  # eviction: oldest first
                if conn.peer_ip is not None:  # it may make room for its address's newcomer
                    conn._llmux_server._no_idle.discard(conn.peer_ip)
            try:
                if lazy is not None:  # read_within's way, less its coroutine (once a request)
                    lazy.arm(max(0.0, idle_until - loop.time()), _Idle)
                    data = await reader.read(READ_SIZE)
                else:
                    data = await read_within(reader, max(0.0, idle_until - loop.time()), _Idle())
            finally:
                if lazy is not None:
                    lazy.disarm()
                if conn is not None:
                    conn.idle_since = None
        else:
            if deadline is None:
                deadline = loop.time() + http.header_timeout_secs
            data = await read_within(reader, max(0.0, deadline - loop.time()),
                                     _request_timeout("head"), deadline=lazy)
        parser.feed(data) if data else parser.feed_eof()
        event = parser.next_event()
    if event is None:
        return None
    head: RequestHead = event
    framing = parser.framing
    if claim is not None and isinstance(framing, int):
        claim.check(framing)  # before any body byte, and before 100 Continue
    if head.expect_continue and parser.expecting_body and not parser.buffered:
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    whole = parser.whole_body()  # it came with its head (the usual): no events
    if whole is not None:
        if claim is not None and whole:
            claim.grow_to(len(whole))
        return head, whole
    body: Union[bytes, bytearray] = b""
    pieces = size = 0
    started = loop.time()
    rate = http.min_body_rate_bytes_per_sec
    event = parser.next_event()
    while event is not EndOfMessage:
        if event is NEED_DATA:
            timeout, error = http.body_timeout_secs, _request_timeout("body")
            if rate:  # mod_reqtimeout's rule: the grace, plus a second per `rate` bytes
                left = started + http.body_timeout_secs + size / rate - loop.time()
                if left < timeout:
                    timeout = max(0.0, left)
                    error = _body_too_slow(size, left + loop.time() - started, http)
            data = await read_within(reader, timeout, error, deadline=lazy)
            parser.feed(data) if data else parser.feed_eof()
        else:
            if not pieces:
                body = event.data  # a body that came in one piece is not copied again
            else:
                if pieces == 1:
                    body = bytearray(body)
                body += event.data  # one buffer grown in place: no second copy of it all
            pieces += 1
            size += len(event.data)
            if pieces > BODY_PIECES_FREE + size // MIN_BODY_PIECE_AVG:
                raise HTTPError(f"request body arrives in too many small pieces; expected at most "
                                f"{BODY_PIECES_FREE} pieces plus one per {MIN_BODY_PIECE_AVG} "
                                f"bytes; got {pieces} for {size} bytes", code="body_too_fragmented")
            if claim is not None:
                claim.grow_to(size)
        event = parser.next_event()
    # Read as bytes everywhere and never changed again.
    return head, cast(bytes, body)


def _body_too_slow(received: int, secs: float, http: HttpConfig) -> HTTPError:
    return HTTPError(f"request body arrives too slowly; expected at least "
                     f"{http.min_body_rate_bytes_per_sec:g} bytes/s after the first "
                     f"{http.body_timeout_secs:g}s; got {received} bytes in {secs:.0f}s",
                     status=408, code="request_timeout")


async def _linger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                  secs: float = LINGER_SECS) -> None:
    """Half-close, then discard what the client still sends for a moment: closing a
    socket with unread bytes makes the kernel send a reset, which can destroy the error
    answer we just wrote before the client reads it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + secs
    total = 0
    try:
        if writer.can_write_eof():
            writer.write_eof()
        while total < LINGER_BYTES:
            data = await read_within(reader, max(0.0, deadline - loop.time()), _Idle())
            if not data:
                return
            total += len(data)
    except (_Idle, HTTPError, OSError):
        pass


def _request_timeout(part: str) -> HTTPError:
    return HTTPError(f"request {part} not received in time", status=408, code="request_timeout")


def _peername(side: Any) -> Any:
    """A transport's (or writer's) peer address; None once its socket is closed (uvloop
    makes the address from the fd each time, and raises for fd -1)."""
    try:
        return side.get_extra_info("peername")
    except (OSError, ValueError):
        return None


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = _peername(writer)
    return f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)


# ─────────────────────────────────────── dashboard ──────────────────────────────────────
# GET /llmux/ui (and / from a browser): one page, no external assets, live through
# /llmux/events.  Its data needs the API key when keys are set; it asks for it.  Hooks
# the tests (and scripts) read: model rows carry data-model and data-state; #active lists
# the active models; each switch is an li with data-switch="a->b" (or "-->b", "b->-")
# and data-result; timeline lanes are data-lane=NAME holding data-state segments;
# hook results carry data-hook="NAME wake" and data-ok; the key form is #keyform.

DASHBOARD_HTML = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width">
<title>llmux</title><link rel="icon" href="data:,">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; script-src 'unsafe-inline';
  style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'">
<style>
:root { --bg: #101318; --panel: #181c23; --fg: #dde3ec; --dim: #8b95a7; --line: #2a303b; --well: #12151b;
  --waking: #e5c07b; --active: #98c379; --draining: #d19a66; --sleeping: #61afef; --bad: #e06c75; }
body { margin: 0; font: 13px/1.45 system-ui, sans-serif; background: var(--bg); color: var(--fg); }
header { display: flex; flex-wrap: wrap; gap: 6px 18px; align-items: baseline; padding: 8px 16px;
  border-bottom: 1px solid var(--line); }
header h1 { font-size: 17px; margin: 0; }
#conn { margin-left: auto; }
main { display: grid; grid-template-columns: repeat(6, 1fr); gap: 10px; padding: 10px 16px; }
section { grid-column: span 2; background: var(--panel); border: 1px solid var(--line); border-radius: 6px;
  padding: 6px 12px 8px; min-width: 0; }
.wide { grid-column: 1 / -1; } .two { grid-column: span 4; }
h2 { font-size: 11px; text-transform: uppercase; letter-spacing: .06em; color: var(--dim); margin: 0 0 4px; font-weight: 600; }
#now h2 { display: inline; margin-right: 12px; }
table { border-collapse: collapse; width: 100%; }
td, th { text-align: left; padding: 2px 8px 2px 0; border-bottom: 1px solid var(--line); white-space: nowrap; }
th { color: var(--dim); font-weight: normal; }
td.err { white-space: normal; }
.n { font-variant-numeric: tabular-nums; }
.dim, #active:empty::after { color: var(--dim); }
#active:empty::after { content: "none"; font-weight: normal; }
.badge { display: inline-block; padding: 0 6px; border-radius: 3px; color: #111; background: var(--line); }
.badge.asleep { color: var(--dim); }
.waking { background: var(--waking); } .active { background: var(--active); }
.draining { background: var(--draining); } .sleeping { background: var(--sleeping); }
.ok { color: var(--active); } .failed, .abandoned, .err, .error, .stderr { color: var(--bad); }
.warning { color: var(--waking); }
button { background: #262c37; color: var(--fg); border: 1px solid var(--line); border-radius: 4px; padding: 0 8px;
  cursor: pointer; }
button:disabled { opacity: .35; cursor: default; }
#keyform { margin: 10px 16px 0; padding: 8px 12px; border: 1px solid var(--waking); border-radius: 6px; }
#keyform[hidden] { display: none; }
#keyform input { background: var(--bg); color: var(--fg); border: 1px solid var(--line); padding: 2px 6px; width: 22em; }
.lanes { display: grid; grid-template-columns: max-content 1fr; gap: 4px 10px; align-items: center; }
.lane, .bar { position: relative; height: 16px; background: var(--well); border-radius: 3px; overflow: hidden; }
.seg { position: absolute; top: 0; bottom: 0; min-width: 2px; }
.seg.failed { background: repeating-linear-gradient(135deg, var(--bad) 0 4px, #5a2a2e 4px 8px); }
.bar { display: flex; margin-top: 4px; }
.bar div { border-right: 2px solid var(--panel); color: #111; font-size: 11px; padding-left: 4px; overflow: hidden;
  white-space: nowrap; }
.axis { display: flex; justify-content: space-between; color: var(--dim); font-size: 11px; }
.legend i { display: inline-block; width: 10px; height: 10px; margin: 0 4px 0 10px; border-radius: 2px; }
ol, ul { margin: 0; padding: 0; list-style: none; max-height: 240px; overflow: auto; }
li { padding: 2px 0; border-bottom: 1px solid var(--line); }
#output { font: 12px/1.4 ui-monospace, monospace; max-height: 240px; overflow: auto; white-space: pre-wrap;
  overflow-wrap: anywhere; }
#notices { max-height: 120px; }
#notices:empty::after, #output:empty::after { content: "none"; color: var(--dim); }
</style></head>
<body>
<header><h1>llmux</h1><span>active: <b id="active"></b></span><span id="state" class="dim"></span>
  <span id="policy" class="dim"></span><span id="conn" class="dim">connecting</span></header>
<form id="keyform" hidden><label>API key <input id="key" type="password" autocomplete="off"></label>
  <button>connect</button> <span id="keymsg" class="warning"></span></form>
<main>
<section id="now" class="wide"><h2>switch in progress</h2><span id="switching" class="dim">none</span></section>
<section class="two"><h2>models</h2><table><thead><tr><th>model</th><th>state</th><th>for</th><th>in flight</th>
  <th>queued</th><th>size</th><th>eta</th><th></th></tr></thead><tbody id="models"></tbody></table>
  <div id="capacity" class="dim"></div></section>
<section><h2>switch costs (measured)</h2><table><tbody id="costs"></tbody></table></section>
<section class="wide"><h2>timeline</h2><div id="lanes" class="lanes"></div>
  <div class="legend dim"><i class="waking"></i>waking <i class="active"></i>active <i class="draining"></i>draining
  <i class="sleeping"></i>sleeping <i class="seg failed" style="position: static"></i>failed</div></section>
<section><h2>switches</h2><ol id="switches"></ol></section>
<section><h2>hooks: last run (average)</h2><table><tbody id="hooks"></tbody></table></section>
<section><h2>hook output (newest first)</h2><div id="output"></div></section>
<section class="wide"><h2>warnings and errors</h2><ul id="notices"></ul></section>
</main>
<script>
"use strict";
const KEY = "llmux-key", SHOWN = ["waking", "active", "draining", "sleeping"];
const FAILS = ["wake_failed", "sleep_failed", "died"];  // a lane segment that ended this way is red
let S = null;  // the last snapshot, kept up to date by the events that follow it
let skew = 0;  // server clock minus ours, in seconds: every time in the stream is the server's
let pending = Object.create(null), outputs = [], notices = [], hookError = null;
let stream = null, lastData = 0, keyWaiter = null, timer = null;
const $ = (id) => document.getElementById(id);
const now = () => Date.now() / 1000 + skew;

// Every text goes in as a text node: model names and hook output are never parsed as HTML.
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) if (v != null) e.setAttribute(k, v);
  e.append(...kids.filter((k) => k != null).map((k) => (k instanceof Node ? k : String(k))));
  return e;
}
function secs(s) {
  if (s == null) return "";
  s = Math.max(0, s);
  return s < 10 ? s.toFixed(2) + " s" : s < 120 ? s.toFixed(1) + " s" : (s / 60).toFixed(1) + " min";
}
const clock = (ts) => new Date((ts - skew) * 1000).toLocaleTimeString();
const key = (from, to) => (Array.isArray(from) ? from.join(",") : from || "-") + "->" + (to || "-");
const label = (from, to) => (Array.isArray(from) ? from.join(", ") : from || "(none)") + " → " + (to || "(asleep)");
const left = (eta, at) => (eta == null ? null : Math.max(0, eta - (now() - at)));
const trim = (list, n) => list.splice(0, Math.max(0, list.length - n));

function headers() {
  const k = sessionStorage.getItem(KEY);
  return k ? { Authorization: "Bearer " + k } : {};
}
async function errorText(r) {
  try { return (await r.json()).error.message; } catch (e) { return "HTTP " + r.status; }
}
function askKey() {
  $("keymsg").textContent = sessionStorage.getItem(KEY) ? "that key was refused" : "this llmux needs an API key";
  $("keyform").hidden = false;
  $("key").focus();
  setConn("waiting for the API key", "warning");
  return new Promise((resolve) => { keyWaiter = resolve; });
}
$("keyform").addEventListener("submit", (e) => {
  e.preventDefault();
  sessionStorage.setItem(KEY, $("key").value.trim());
  $("key").value = "";
  $("keyform").hidden = true;
  if (keyWaiter) keyWaiter();
});
function setConn(text, cls) { $("conn").textContent = text; $("conn").className = cls || "dim"; }
function notice(level, text, ts) { notices.push({ ts: ts || now(), level, text }); trim(notices, 30); schedule(); }
function hooksOf(model, create) {
  if (create && !S.hooks[model]) S.hooks[model] = {};
  return S.hooks[model] || {};
}

async function control(name, action) {
  const r = await fetch("/llmux/models/" + encodeURIComponent(name) + "/" + action,
                        { method: "POST", headers: headers() });
  if (r.status === 401) askKey();
  else if (!r.ok) notice("error", action + " " + name + ": " + (await errorText(r)));
}

// One /llmux/events stream at a time (fetch, not EventSource: it can send the key); when
// it ends, wait a little and open another: its snapshot replaces everything.
async function connect() {
  for (let backoff = 500; ; backoff = Math.min(backoff * 2, 8000)) {
    stream = new AbortController();
    lastData = Date.now();
    try {
      const r = await fetch("/llmux/events", { headers: headers(), signal: stream.signal, cache: "no-store" });
      if (r.status === 401) { await askKey(); backoff = 250; continue; }
      if (!r.ok) throw new Error(await errorText(r));
      const reader = r.body.getReader(), dec = new TextDecoder();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        lastData = Date.now();
        buf += dec.decode(value, { stream: true }).replace(/\r/g, "");
        for (let i; (i = buf.indexOf("\n\n")) >= 0; buf = buf.slice(i + 2)) {
          const data = buf.slice(0, i).split("\n").filter((l) => l.startsWith("data:"))
            .map((l) => l.slice(5).trim()).join("\n");
          if (data) { handle(JSON.parse(data)); backoff = 500; }
        }
      }
      setConn("stream ended; reconnecting", "warning");
    } catch (e) {
      setConn("disconnected (" + e.message + "); retrying", "error");
    }
    await new Promise((resolve) => setTimeout(resolve, backoff));
  }
}

const dict = (o) => Object.assign(Object.create(null), o);  // keys are names: "__proto__" too

function snapshot(ev) {
  S = ev;
  S.models = dict(S.models);
  S.hooks = dict(S.hooks);
  skew = ev.ts - Date.now() / 1000;
  pending = Object.create(null);
  for (const [n, m] of Object.entries(S.models)) { pending[n] = m.in_flight + m.queued; m.eta_at = ev.ts; }
  if (S.switching) S.switching.eta_at = ev.ts;
  $("keyform").hidden = true;
  setConn("live", "ok");
}

function handle(ev) {
  if (ev.event === "snapshot") snapshot(ev);
  if (!S) return;
  const m = S.models[ev.model];
  switch (ev.event) {
    case "model.state":
      if (m) { m.state = ev.to; m.since = ev.ts; if (ev.to === "active") m.eta_secs = null; }
      S.timeline.push({ at: ev.ts, model: ev.model, from: ev.from, to: ev.to, on: ev.on, reason: ev.reason });
      trim(S.timeline, 256);
      S.active = Object.keys(S.models).filter((n) => S.models[n].state === "active");
      S.capacity_used = Object.values(S.models).reduce((sum, x) => sum + (x.state === "asleep" ? 0 : x.size), 0);
      break;
    case "switch.start": {
      // Its ETA: llmux's own for the request that started it (request.queued, just before).
      const to = S.models[ev.to] || {}, known = to.eta_secs != null;
      hookError = null;
      S.state = "switching";
      S.switching = { from: ev.from ? ev.from.split(",") : [], to: ev.to || null, started: ev.ts,
                      phase: ev.from ? "draining" : "starting", phase_model: ev.from || null, phase_since: ev.ts,
                      eta_secs: known ? to.eta_secs : S.switch_cost_secs[key(ev.from, ev.to)],
                      eta_at: known ? to.eta_at : ev.ts };
      break;
    }
    case "switch.phase":
      if (S.switching) Object.assign(S.switching, { phase: ev.phase, phase_model: ev.model, phase_since: ev.ts });
      break;
    case "switch.end":
      S.state = "idle";
      S.switching = null;
      S.switches.push({ from: ev.from, to: ev.to, result: ev.result, secs: ev.secs, drain_secs: ev.drain_secs,
                        at: ev.ts, error: ev.error || (ev.result === "ok" ? null : hookError) });
      trim(S.switches, 32);
      refreshCosts();
      break;
    case "hook.start": hooksOf(ev.model, true)[ev.hook] = { running: true }; break;
    case "hook.exit":
      hooksOf(ev.model, true)[ev.hook] = { ok: ev.code === 0 && !ev.error, exit_code: ev.code, secs: ev.secs,
                                          error: ev.error || null };
      if (ev.error) hookError = ev.error;
      break;
    case "hook.output": outputs.push(ev); trim(outputs, 80); break;
    case "queue":
      S.queued = ev.queued;
      for (const [n, d] of Object.entries(ev.models)) {
        if (S.models[n]) S.models[n].queued = d;
        if (S.models[n] && !d) S.models[n].eta_secs = null;
        if (S.models[n] && ev.in_flight) pending[n] = ev.in_flight[n] + d;  // exact, not counted
      }
      break;
    case "request.queued": if (m) { m.eta_secs = ev.eta_secs; m.eta_at = ev.ts; } break;
    case "request.start": pending[ev.model] = (pending[ev.model] || 0) + 1; break;
    case "request": if (ev.model in pending) pending[ev.model] = Math.max(0, pending[ev.model] - 1); break;
    case "reload.done": stream.abort(); break;  // models may have come or gone: start from a new snapshot
  }
  if (ev.level === "warning" || ev.level === "error") {
    const fields = Object.entries(ev).filter(([k]) => !["seq", "ts", "event", "level"].includes(k));
    notice(ev.level, ev.event + " " + fields.map(([k, v]) => k + "=" + JSON.stringify(v)).join(" "), ev.ts);
  }
  schedule();
}

async function refreshCosts() {  // llmux averages the costs: ask for them after a switch
  const r = await fetch("/llmux/status", { headers: headers(), cache: "no-store" });
  if (!r.ok || !S) return;
  const st = await r.json();
  Object.assign(S, { switch_cost_secs: st.switch_cost_secs, hook_cost_secs: st.hook_cost_secs });
  schedule();
}

function schedule() { if (!timer) timer = setTimeout(render, 30); }
const rows = (list, empty) => (list.length ? list : [el("tr", {}, el("td", { class: "dim" }, empty))]);

function render() {
  timer = null;
  if (!S) return;
  const t = now(), sw = S.switching;
  $("active").textContent = S.active.join(", ");
  $("state").textContent = S.state + (S.queued ? ", " + S.queued + " queued" : "");
  $("policy").textContent = "policy " + S.policy + " · llmux " + S.version;
  $("switching").className = sw ? "" : "dim";
  $("switching").textContent = !sw ? "none" : label(sw.from, sw.to) + ": " + sw.phase + " " + (sw.phase_model || "") +
    " for " + secs(t - sw.phase_since) + " (switch running " + secs(t - sw.started) + "), eta " +
    (sw.eta_secs == null ? "unknown: never measured" : secs(left(sw.eta_secs, sw.eta_at)));
  renderModels(t);
  renderLanes(t);
  $("switches").replaceChildren(...S.switches.slice().reverse().map((s) => el("li",
    { "data-switch": key(s.from, s.to), "data-result": s.result },
    el("span", { class: "dim" }, clock(s.at) + " "), label(s.from, s.to), " ", el("b", { class: s.result }, s.result),
    " in " + secs(s.secs) + (s.drain_secs ? " (drain " + secs(s.drain_secs) + ")" : ""),
    s.reason ? el("span", { class: "dim" }, " · " + s.reason) : null,
    s.error ? el("div", { class: "err" }, s.error) : null)));
  $("costs").replaceChildren(...rows(Object.entries(S.switch_cost_secs).map(([k, v]) => el("tr", {},
    el("td", {}, label(...k.split("->").map((n) => (n === "-" ? null : n)))), el("td", { class: "n" }, secs(v)))),
    "nothing measured yet"));
  const hooks = [];
  for (const [model, hs] of Object.entries(S.hooks)) {
    for (const [hook, h] of Object.entries(hs)) {
      const avg = S.hook_cost_secs[model + " " + hook], result = h.running ? "running" : h.ok ? "ok" : "failed";
      hooks.push(el("tr", { "data-hook": model + " " + hook, "data-ok": h.running ? "running" : String(h.ok) },
        el("td", {}, model), el("td", {}, hook),
        el("td", { class: result }, result === "failed" ? "exit " + h.exit_code : result),
        el("td", { class: "n" }, secs(h.secs), avg != null ? el("span", { class: "dim" }, " (" + secs(avg) + ")") : null)));
      if (h.error) hooks.push(el("tr", {}, el("td", { class: "err", colspan: 4 }, h.error)));
    }
  }
  $("hooks").replaceChildren(...rows(hooks, "no hook has run yet"));
  $("output").replaceChildren(...outputs.slice().reverse().map((o) => el("div", { class: o.stream },
    el("span", { class: "dim" }, clock(o.ts) + " " + o.model + " " + o.hook + ": "), o.text)));
  $("notices").replaceChildren(...notices.slice().reverse().map((n) =>
    el("li", { class: n.level }, el("span", { class: "dim" }, clock(n.ts) + " "), n.text)));
}

function renderModels(t) {
  const body = $("models"), names = Object.keys(S.models);
  if (body.dataset.names !== JSON.stringify(names)) {  // rows are kept, so a click is never lost to a redraw
    body.dataset.names = JSON.stringify(names);
    body.replaceChildren(...names.map((name) => {
      const buttons = ["wake", "sleep"].map((a) => el("button", { "data-action": a }, a));
      buttons.forEach((b) => b.addEventListener("click", () => control(name, b.dataset.action)));
      return el("tr", { "data-model": name }, el("td", {}, el("b", {}, name)), el("td", {}, el("span", {})),
        ...[0, 1, 2, 3, 4].map(() => el("td", { class: "n" })), el("td", {}, ...buttons));
    }));
  }
  for (const tr of body.children) {
    const name = tr.dataset.model, m = S.models[name], c = tr.children;
    tr.dataset.state = m.state;
    c[1].firstChild.className = "badge " + m.state;
    c[1].firstChild.textContent = m.state;
    c[2].textContent = secs(t - m.since);
    // Requests started and not yet answered, less those queued: llmux does not publish slots.
    c[3].textContent = Math.max(0, (pending[name] || 0) - m.queued) +
      (m.max_in_flight != null ? " / " + m.max_in_flight : "");
    c[4].textContent = m.queued;
    c[5].textContent = m.size + (S.capacity != null ? " / " + S.capacity : "");
    c[6].textContent = secs(left(m.eta_secs, m.eta_at));
    c[7].children[0].disabled = m.state === "active" || !!S.switching;
    c[7].children[1].disabled = m.state === "asleep" || !!S.switching;
  }
  if (S.capacity == null) return $("capacity").replaceChildren("capacity: one model at a time");
  $("capacity").replaceChildren("capacity: " + S.capacity_used + " of " + S.capacity + " in use",
    el("div", { class: "bar" }, ...names.filter((n) => S.models[n].state !== "asleep").map((n) => el("div",
      { class: S.models[n].state, style: "width:" + (100 * S.models[n].size / S.capacity) + "%" }, n))));
}

// Per model, the states it was in over the last minutes, from the timeline of changes.
function renderLanes(t) {
  const first = S.timeline.length ? S.timeline[0].at : t;
  const span = Math.min(900, Math.max(30, (t - first) * 1.05)), t0 = t - span;
  const lanes = [];
  for (const name of Object.keys(S.models)) {
    const lane = el("div", { class: "lane", "data-lane": name });
    const changes = S.timeline.filter((e) => e.model === name);
    let state = changes.length ? changes[0].from : S.models[name].state, start = t0;
    const add = (end, failed) => {
      if (!SHOWN.includes(state) || end < t0) return;
      const a = Math.max(start, t0);
      lane.append(el("div", { class: "seg " + state + (failed ? " failed" : ""), "data-state": state,
        title: name + " " + state + " at " + clock(start) + " for " + secs(end - start),
        style: "left:" + (100 * (a - t0) / span) + "%;width:" + (100 * (end - a) / span) + "%" }));
    };
    for (const e of changes) { add(e.at, FAILS.includes(e.on)); state = e.to; start = e.at; }
    add(t, false);
    lanes.push(el("span", {}, name), lane);
  }
  lanes.push(el("span"), el("div", { class: "axis" }, el("span", {}, "−" + secs(span)), el("span", {}, "now")));
  $("lanes").replaceChildren(...lanes);
}

setInterval(() => {
  schedule();
  if (stream && Date.now() - lastData > 45000) stream.abort();  // no ping for 45 s: the stream is dead
}, 1000);
connect();
</script>
</body></html>
"""


# ─────────────────────────────────────── simulator ──────────────────────────────────────
# `llmux.py simulate` runs the real Switcher and policy against a trace on a virtual
# clock: an event loop whose selector, when nothing is ready, moves time forward to the
# next timer instead of sleeping.  Hooks become durations.  An hour replays in seconds.


class _VirtualClock:
    def __init__(self) -> None:
        self.now = 0.0


class _VirtualSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    """Never blocks: with nothing ready it advances the clock by the timeout."""

    def __init__(self, clock: _VirtualClock) -> None:
        super().__init__()
        self.clock = clock

    def select(self, timeout: Optional[float] = None) -> Any:
        ready = super().select(0)
        if ready:
            return ready
        if timeout is None:
            raise RuntimeError("simulation stalled: nothing scheduled and nothing ready")
        self.clock.now += max(0.0, timeout)
        return []


class VirtualTimeLoop(asyncio.SelectorEventLoop):  # type: ignore[misc,valid-type]
    """An asyncio loop on virtual time, for code that only waits on timers."""

    def __init__(self) -> None:
        self._vclock = _VirtualClock()
        super().__init__(_VirtualSelector(self._vclock))

    def time(self) -> float:
        return self._vclock.now


class SimHooks:
    """Hooks as durations: ``wake[model]`` and ``sleep[model]`` seconds (defaults ``"*"``)."""

    def __init__(self, wake: Dict[str, float], sleep: Dict[str, float]) -> None:
        self.wake = wake
        self.sleep = sleep
        self.last: Dict[Tuple[str, str], HookResult] = {}
        self.timeout: Optional[float] = None

    async def run(self, model: ModelConfig, hook: str) -> HookResult:
        table = self.wake if hook == "wake" else self.sleep
        secs = table.get(model.name, table.get("*", 0.0))
        await asyncio.sleep(secs)
        result = HookResult(model.name, hook, 0, duration=secs)
        self.last[(model.name, hook)] = result
        return result

    async def alive(self, model: ModelConfig) -> Optional[bool]:
        return True

    # The rest of HookRunner's interface: no processes here.
    spawning = 0
    on_exit: Callable[[str, str], None] = staticmethod(lambda model, why: None)  # type: ignore[assignment]

    def own_pids(self) -> Set[int]:
        return set()

    async def stop_server(self, name: str) -> None:
        pass

    async def stop_servers(self) -> None:
        pass

    def close(self) -> None:
        pass


class TraceEntry(NamedTuple):
    t: float  # arrival, seconds from the start
    model: str
    service: float  # how long the request holds its slot once served


def load_trace(path: str, models: Iterable[str]) -> List[TraceEntry]:
    """A JSONL trace: one {"t": s, "model": name, "service": s} per line."""
    known = set(models)
    entries = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
                entry = TraceEntry(float(doc["t"]), str(doc["model"]), float(doc["service"]))
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError([f"{path}:{n}: expected {{\"t\": seconds, \"model\": name, "
                                   f"\"service\": seconds}}; got {line.strip()[:60]} ({e})"]) from None
            if entry.model not in known:
                raise ConfigError([f"{path}:{n}: model '{entry.model}' is not in the config"])
            entries.append(entry)
    return sorted(entries, key=lambda e: e.t)


def simulate(config: Config, trace: Sequence[TraceEntry], hooks: SimHooks,
             log: Optional[Log] = None, concurrency: Optional[int] = None) -> Dict[str, Any]:
    """Replay ``trace`` through the real Switcher on virtual time; return the figures.

    ``concurrency``: how many requests one backend serves at once (a GPU's batch); the
    others wait inside the backend, holding their slot, as they would for real."""
    loop = VirtualTimeLoop()
    try:
        return loop.run_until_complete(_simulate(config, trace, hooks, log or Log(open(os.devnull, "w")),
                                                 concurrency))
    finally:
        loop.close()


async def _simulate(config: Config, trace: Sequence[TraceEntry], hooks: SimHooks,
                    log: Log, concurrency: Optional[int]) -> Dict[str, Any]:
    loop = asyncio.get_running_loop()
    switcher = Switcher(config, hooks, POLICIES[config.policy.name](), log)  # type: ignore[arg-type]
    history: List[Dict[str, Any]] = []
    switcher.switch_log = history
    waits: List[float] = []
    errors: Dict[str, int] = {}
    tasks: List["asyncio.Task[None]"] = []
    seats = {name: asyncio.Semaphore(concurrency) for name in config.models} if concurrency else {}

    async def one(entry: TraceEntry) -> None:
        arrived = loop.time()
        try:
            slot = await switcher.acquire(entry.model)
        except LLMuxError as e:
            errors[str(e.status)] = errors.get(str(e.status), 0) + 1
            return
        waits.append(loop.time() - arrived)
        try:
            if seats:
                async with seats[entry.model]:
                    await asyncio.sleep(entry.service)
            else:
                await asyncio.sleep(entry.service)
        finally:
            slot.release()

    for entry in trace:
        delay = entry.t - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(loop.create_task(one(entry)))
    await asyncio.gather(*tasks)
    end = loop.time()
    await switcher.close()
    switching = sum(h["secs"] - h["drain_secs"] for h in history)  # sleep + wake: GPU unusable
    waits.sort()

    def pct(p: float) -> float:
        return waits[min(len(waits) - 1, int(p * len(waits)))] if waits else 0.0

    return {"requests": len(trace), "served": len(waits), "errors": errors,
            "wait_p50": pct(0.5), "wait_p99": pct(0.99), "wait_max": waits[-1] if waits else 0.0,
            "switches": sum(1 for h in history if h["result"] == "ok" and h["to"]),
            "switch_order": [[h["from"] or "", h["to"] or ""] for h in history if h["result"] == "ok"],
            "switching_share": switching / end if end else 0.0, "makespan": end,
            "served_per_hour": len(waits) / end * 3600 if end else 0.0}


def simulate_main(argv: Sequence[str]) -> int:
    """``llmux.py simulate``: try a policy on a trace of your own traffic."""
    ap = argparse.ArgumentParser(
        prog="llmux.py simulate",
        description="Replay a trace through llmux's real switcher and policy on a virtual clock.")
    ap.add_argument("--config", "-c", required=True, help="llmux config (its models and policy)")
    ap.add_argument("--trace", "-t", required=True,
                    help='JSONL, one {"t": seconds, "model": name, "service": seconds} per line')
    ap.add_argument("--policy", choices=sorted(POLICIES), help="override policy.name")
    ap.add_argument("--wake-secs", type=float, default=1.0, help="wake hook duration (default 1)")
    ap.add_argument("--sleep-secs", type=float, default=0.5, help="sleep hook duration (default 0.5)")
    ap.add_argument("--costs", help='JSON {"wake": {"model": secs, ...}, "sleep": {...}}, e.g. '
                                    "from llmux_hook_duration_seconds")
    ap.add_argument("--concurrency", type=int, help="requests one backend serves at once "
                                                    "(default: unlimited)")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ap.add_argument("-v", "--verbose", action="store_true", help="log every event (virtual time)")
    args = ap.parse_args(argv)
    try:
        config = load_config(args.config)
        if args.policy:
            config = dataclasses.replace(config, policy=dataclasses.replace(config.policy,
                                                                            name=args.policy))
        trace = load_trace(args.trace, config.models)
        wake: Dict[str, float] = {"*": args.wake_secs}
        sleep: Dict[str, float] = {"*": args.sleep_secs}
        if args.costs:
            with open(args.costs) as f:
                costs = json.load(f)
            wake.update(costs.get("wake", {}))
            sleep.update(costs.get("sleep", {}))
    except (ConfigError, OSError, ValueError) as e:
        for problem in getattr(e, "problems", [str(e)]):
            print(f"llmux simulate: {problem}", file=sys.stderr)
        return 2
    result = simulate(config, trace, SimHooks(wake, sleep),
                      Log(verbose=True) if args.verbose else None, args.concurrency)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"policy {config.policy.name}: {result['served']}/{result['requests']} served, "
          f"errors {result['errors'] or 'none'}")
    print(f"wait p50 {result['wait_p50']:.2f}s  p99 {result['wait_p99']:.2f}s  "
          f"max {result['wait_max']:.2f}s")
    print(f"switches {result['switches']}, {result['switching_share']:.1%} of the time switching, "
          f"{result['served_per_hour']:.0f} served per hour over {result['makespan']:.0f}s")
    return 0


# ─────────────────────────────── demo backend and probe ─────────────────────────────────
# `llmux.py demo-backend` is a small OpenAI-style server that needs no GPU: the example
# config wakes and sleeps two of them.  With --engine it stands in for a real engine's
# control API (routes, bodies and status codes as each engine documents them), so every
# README recipe runs, as written, in the test suite without a GPU.
# `llmux.py probe URL` is an alive/wake check for machines without curl, and
# `llmux.py stop --pidfile F` a sleep hook that works when nothing reaps the server.

# Which models an engine holds at start, and whether a completion for a model it has not
# loaded loads it (llama.cpp router mode's --models-autoload default, Ollama always).
#   engine: (loaded at start, a completion loads an unloaded model)
DEMO_ENGINES: Dict[str, Tuple[bool, bool]] = {
    "openai": (True, False),
    # llama-server, one model: tools/server/README.md (ggml-org/llama.cpp): /health is 503
    # {"error": {"code": 503, "message": "Loading model", ...}} until the model is loaded;
    # responses carry --alias as "model", else the model file's name.
    "llamacpp": (True, False),
    # vLLM, docs/features/sleep_mode.md (vllm-project/vllm): POST /sleep?level=1|2,
    # POST /wake_up[?tags=weights|kv_cache], GET /is_sleeping -> {"is_sleeping": bool};
    # /health stays 200 while asleep, the model endpoints answer 503.  A name not in
    # --served-model-name is 404 "The model `x` does not exist." (serving_engine.py).
    "vllm": (True, False),
    # SGLang, docs/basic_usage/native_api.md and srt/entrypoints/http_server.py
    # (sgl-project/sglang): POST /release_memory_occupation, /resume_memory_occupation,
    # GET /health, GET /get_model_info -> {"model_path", "is_generation", ...}.
    "sglang": (True, False),
    # llama-server router mode (started without -m), huggingface.co/blog/ggml-org/
    # model-management-in-llamacpp: GET /models -> {"data": [{"id", "status": {"value":
    # "loaded"|"unloaded"}}]}, POST /models/load and /models/unload {"model": NAME}.
    "llamacpp-router": (False, True),
    # Ollama, docs/api.md (ollama/ollama): /api/generate and /api/chat with no prompt
    # load a model ("keep_alive": -1 keeps it) and with "keep_alive": 0 unload it
    # ("done_reason": "unload"); GET /api/ps lists loaded models, /api/tags pulled ones;
    # an unknown model is 404 {"error": "model \"x\" not found, try pulling it first"}.
    "ollama": (False, True),
}


class DemoBackend:
    """A fake OpenAI server: chat and text completions, streamed or not; with ``engine``
    also that engine's control routes (see DEMO_ENGINES)."""

    def __init__(self, model: str, token_delay: float = 0.02, engine: str = "openai",
                 names: Sequence[str] = (), load_secs: float = 0.0) -> None:
        self.model = model
        self.token_delay = token_delay
        self.engine = engine
        self.names = list(names) or [model]
        at_start, self.autoload = DEMO_ENGINES[engine]
        self.loaded = {name: at_start for name in self.names}
        self.sleeping = False  # vLLM asleep, SGLang released
        self.ready_at = time.monotonic() + load_secs

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        parser = RequestParser()
        try:
            while True:
                request = await read_request(reader, writer, parser, HttpConfig())
                if request is None:
                    return
                head, body = request
                if not await self._answer(head, body, writer) or not head.keep_alive:
                    return
        except (HTTPError, _Idle, ConnectionError):
            pass
        finally:
            writer.close()

    def _control(self, method: str, path: str, doc: Dict[str, Any]) -> Optional[Tuple[int, Any]]:
        """The engine's own routes: (status, payload), or None when the path is not one."""
        e, name = self.engine, doc.get("model")
        route = (method, path)
        if route == ("GET", "/health"):
            if e == "llamacpp" and time.monotonic() < self.ready_at:
                return 503, {"error": {"code": 503, "message": "Loading model",
                                       "type": "unavailable_error"}}
            return 200, {"status": "ok"}
        if route == ("GET", "/v1/models"):
            return 200, {"object": "list", "data": [{"id": n, "object": "model", "owned_by": e}
                                                    for n in self.names]}
        if e == "vllm" and route == ("POST", "/sleep"):
            self.sleeping = True
            return 200, None
        if e == "vllm" and route == ("POST", "/wake_up"):
            self.sleeping = False  # ?tags=weights|kv_cache wakes a part; both end awake
            return 200, None
        if e == "vllm" and route == ("GET", "/is_sleeping"):
            return 200, {"is_sleeping": self.sleeping}
        if e == "sglang" and route in (("POST", "/release_memory_occupation"),
                                       ("POST", "/resume_memory_occupation")):
            self.sleeping = path.startswith("/release")
            return 200, None
        if e == "sglang" and route == ("GET", "/get_model_info"):
            return 200, {"model_path": self.model, "tokenizer_path": self.model,
                         "is_generation": True}
        if e == "llamacpp-router" and route == ("GET", "/models"):
            return 200, {"data": [{"id": n, "object": "model", "status": {
                "value": "loaded" if self.loaded[n] else "unloaded"}} for n in self.names]}
        if e == "llamacpp-router" and route in (("POST", "/models/load"), ("POST", "/models/unload")):
            if name not in self.loaded:
                return 400, {"error": {"code": 400, "message": f"model {name!r} not found",
                                       "type": "invalid_request_error"}}
            self.loaded[name] = path.endswith("/load")
            return 200, {"success": True}
        if e == "ollama" and route in (("POST", "/api/generate"), ("POST", "/api/chat")):
            if name not in self.loaded:
                return 404, {"error": f'model "{name}" not found, try pulling it first'}
            unload = doc.get("keep_alive") in (0, "0", "0s")
            self.loaded[name] = not unload
            reply = {"model": name, "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
                     "done": True, "done_reason": "unload" if unload else "load"}
            if path == "/api/chat":
                reply["message"] = {"role": "assistant", "content": ""}
            else:
                reply["response"] = ""
            return 200, reply
        if e == "ollama" and route in (("GET", "/api/ps"), ("GET", "/api/tags")):
            return 200, {"models": [{"name": n, "model": n} for n in self.names
                                    if self.loaded[n] or path == "/api/tags"]}
        return None

    def _refusal(self, requested: Any) -> Optional[Tuple[int, Any]]:
        """Why a completion for ``requested`` cannot run now, as the engine says it."""
        e = self.engine
        if e in ("vllm", "llamacpp-router", "ollama") and requested not in self.loaded:
            if e == "ollama":
                return 404, {"error": {"message": f'model "{requested}" not found, try pulling '
                                                  "it first", "type": "api_error", "param": None,
                                       "code": None}}
            return 404, {"error": {"message": f"The model `{requested}` does not exist.",
                                   "type": "NotFoundError", "param": "model", "code": 404}}
        if self.sleeping:
            return 503, {"error": {"message": "model is sleeping", "type": "server_error",
                                   "code": 503}}
        if requested in self.loaded and not self.loaded[requested]:
            if not self.autoload:
                return 400, {"error": {"message": f"model {requested!r} is not loaded",
                                       "type": "invalid_request_error", "code": 400}}
            self.loaded[requested] = True
        return None

    async def _answer(self, head: RequestHead, body: bytes, writer: asyncio.StreamWriter) -> bool:
        path = head.target.partition("?")[0]
        try:
            doc = json.loads(body or b"{}")
        except ValueError:
            doc = None
        status, payload = 404, {"error": {"message": f"no route {head.method} {path}",
                                          "type": "invalid_request_error", "code": "not_found"}}
        answer = self._control(head.method, path, doc if isinstance(doc, dict) else {})
        if answer is not None:
            status, payload = answer
        elif (head.method, path) in (("POST", "/v1/chat/completions"), ("POST", "/v1/completions")):
            if not isinstance(doc, dict):
                status, payload = 400, {"error": {"message": "body is not a JSON object",
                                                  "type": "invalid_request_error",
                                                  "code": "invalid_json"}}
            else:
                refusal = self._refusal(doc.get("model"))
                if refusal is None:
                    return await self._complete(doc, path.endswith("chat/completions"), writer,
                                                head.keep_alive)
                status, payload = refusal
        if payload is None:
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n"
                         + (b"" if head.keep_alive else b"connection: close\r\n") + b"\r\n")
        else:
            writer.write(json_response(status, payload, keep_alive=head.keep_alive))
        await writer.drain()
        return True

    def _words(self, doc: Dict[str, Any], chat: bool) -> List[str]:
        prompt = doc.get("prompt", "")
        if chat and isinstance(doc.get("messages"), list) and doc["messages"]:
            last = doc["messages"][-1]
            prompt = last.get("content", "") if isinstance(last, dict) else ""
        if not isinstance(prompt, str):
            prompt = json.dumps(prompt)[:200]
        words = f"Hello from {self.model}! You said: {prompt[:200]}".split()
        limit = doc.get("max_tokens")
        if isinstance(limit, int) and limit > 0:
            words = words[:limit]
        return words

    async def _complete(self, doc: Dict[str, Any], chat: bool, writer: asyncio.StreamWriter,
                        keep_alive: bool) -> bool:
        words = self._words(doc, chat)
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{os.urandom(6).hex()}"
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        # vLLM, a router and Ollama echo the name asked for; a one-model server its own.
        model = doc.get("model") if doc.get("model") in self.loaded and self.engine in (
            "vllm", "llamacpp-router", "ollama") else self.model
        usage = {"prompt_tokens": 0, "completion_tokens": len(words), "total_tokens": len(words)}
        if not doc.get("stream"):
            text = " ".join(words)
            choice = ({"index": 0, "message": {"role": "assistant", "content": text},
                       "finish_reason": "stop"} if chat else
                      {"index": 0, "text": text, "finish_reason": "stop"})
            writer.write(json_response(200, {"id": ident, "object": kind, "created": created,
                                             "model": model, "choices": [choice],
                                             "usage": usage}, keep_alive=keep_alive))
            await writer.drain()
            return True
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                     b"cache-control: no-cache\r\ntransfer-encoding: chunked\r\n\r\n")
        for i, word in enumerate(words + [None]):
            piece = (word if i == 0 else " " + word) if word is not None else None
            if chat:
                choice = {"index": 0, "delta": {"content": piece} if piece else {},
                          "finish_reason": None if piece else "stop"}
            else:
                choice = {"index": 0, "text": piece or "", "finish_reason": None if piece else "stop"}
            event = {"id": ident, "object": kind + ".chunk" if chat else kind,
                     "created": created, "model": model, "choices": [choice]}
            writer.write(encode_chunk(b"data: " + json.dumps(event).encode() + b"\n\n"))
            await writer.drain()
            if piece and self.token_delay:
                await asyncio.sleep(self.token_delay)
        writer.write(encode_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await writer.drain()
        return True


def demo_main(argv: Sequence[str]) -> int:
    """``llmux.py demo-backend``: run a fake OpenAI server (see --help)."""
    ap = argparse.ArgumentParser(prog="llmux.py demo-backend",
                                 description="A fake OpenAI-compatible model server (no GPU).")
    ap.add_argument("--model", default="demo", help="model name it answers as")
    ap.add_argument("--engine", choices=sorted(DEMO_ENGINES), default="openai",
                    help="also speak this engine's control API (default: plain OpenAI)")
    ap.add_argument("--served-model-name", "--models", nargs="+", dest="names", default=[],
                    help="the names it serves (vLLM's flag; a router's or Ollama's models)")
    # llama-server's own flags, so the llama.cpp recipe runs with this in its place.
    ap.add_argument("-m", "--model-file", help="exit 1 at start when this file is missing, "
                                               "as llama-server does")
    ap.add_argument("--alias", help="llama-server's --alias: the name responses carry")
    ap.add_argument("--load-secs", type=float, default=0.0,
                    help="answer /health 503 (loading) for this long (llamacpp)")
    ap.add_argument("--port", type=int, default=8001)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--fd", type=int, help="serve on this inherited listening socket")
    ap.add_argument("--token-delay", type=float, default=0.02, help="seconds between streamed tokens")
    ap.add_argument("--daemon", action="store_true",
                    help="bind, start the server in the background, and exit once it listens")
    ap.add_argument("--pidfile", help="with --daemon: write the server's pid here")
    ap.add_argument("--stop", action="store_true",
                    help="stop the server named by --pidfile and wait until it has exited")
    args, _ignored = ap.parse_known_args(argv)  # other llama-server flags: accepted, unused
    if args.stop:
        return _stop_pidfile(args.pidfile) if args.pidfile else ap.error("--stop needs --pidfile")
    if args.model_file is not None and not os.path.isfile(args.model_file):
        print(f"demo-backend: failed to load model '{args.model_file}': no such file",
              file=sys.stderr)
        return 1
    if args.alias or args.model_file:
        args.model = args.alias or os.path.basename(args.model_file)
    if args.daemon:
        try:
            sock = socket.create_server((args.host, args.port), backlog=1024)
        except OSError as e:
            if e.errno == errno.EADDRINUSE and probe_main([f"http://{args.host}:{args.port}/health"]) == 0:
                print(f"demo-backend: {args.host}:{args.port} is already serving")
                return 0  # wake hooks must be idempotent
            print(f"demo-backend: cannot listen on {args.host}:{args.port}: {e.strerror}", file=sys.stderr)
            return 1
        cmd = [sys.executable, os.path.abspath(__file__), "demo-backend", "--model", args.model,
               "--fd", str(sock.fileno()), "--token-delay", str(args.token_delay),
               "--engine", args.engine, "--load-secs", str(args.load_secs)]
        if args.names:
            cmd += ["--served-model-name", *args.names]
        child = subprocess.Popen(cmd, pass_fds=(sock.fileno(),), start_new_session=True,
                                 stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL)
        if args.pidfile:
            with open(args.pidfile, "w") as f:
                f.write(f"{child.pid}\n")
        print(f"demo-backend '{args.model}' listening on {args.host}:{args.port} (pid {child.pid})")
        return 0  # the socket listens already: clients queue in its backlog until it serves
    backend = DemoBackend(args.model, args.token_delay, args.engine, args.names, args.load_secs)

    async def run() -> None:
        if args.fd is not None:
            sock = socket.socket(fileno=args.fd)
            server = await asyncio.start_server(backend.serve, sock=sock, limit=STREAM_LIMIT)
        else:
            server = await asyncio.start_server(backend.serve, args.host, args.port,
                                                limit=STREAM_LIMIT, reuse_address=True)
        async with server:
            await server.serve_forever()

    try:
        asyncio.run(run())
    except KeyboardInterrupt:
        pass
    except OSError as e:  # the port is taken: exit 1 as a real server does
        print(f"demo-backend: cannot listen on {args.host}:{args.port}: {e.strerror}", file=sys.stderr)
        return 1
    return 0


_PROC_OURS: List[bool] = []


def _proc_ours() -> bool:
    """Whether /proc shows llmux's own pid namespace (not so in one entered without a
    /proc of its own mounted: there, /proc/PID is another process)."""
    if not _PROC_OURS:
        try:
            _PROC_OURS.append(os.readlink("/proc/self") == str(os.getpid()))
        except OSError:
            _PROC_OURS.append(False)
    return _PROC_OURS[0]


def _pid_running(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie waiting to be reaped.  A zombie
    main thread with other threads left is a process still running (or still exiting:
    under SIGKILL the main thread is often first to go), and they hold its files, port
    and GPU memory until the last one has gone."""
    try:
        if _proc_ours():
            with open(f"/proc/{pid}/stat") as f:
                if f.read().rpartition(")")[2].split()[0] != "Z":
                    return True
            return len(os.listdir(f"/proc/{pid}/task")) > 1
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def _read_pidfile(path: str) -> Optional[int]:
    """The pid in ``path``, or None when there is none (no file, or not a number)."""
    try:
        with open(path) as f:
            pid = int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    # 0 and negative pids name process groups (kill(0) is our own, kill(-1) everyone's),
    # and 1 is init: none is a server a pidfile may name.
    if pid <= 1:
        return None
    if _began_after(pid, path):
        print(f"llmux: pid {pid} began after {path} was written: not the process it names "
              "(that one is gone, its number reused); taken as no process", file=sys.stderr)
        return None
    return pid


PIDFILE_SLACK_SECS = 1.0  # a process that began this long after its pidfile was written is another


def _began_after(pid: int, path: str) -> bool:
    """Whether process ``pid`` began after ``path`` was last written: then the process
    the file named is gone and its number was reused (after a crash, or a reboot), by a
    stranger or by llmux itself.  A server begins before its pid is written."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
        ticks = int(stat[stat.rindex(b")") + 2:].split()[19])  # field 22: starttime
        written = os.stat(path).st_mtime
        boot_now = time.clock_gettime(time.CLOCK_BOOTTIME)
        began = ticks / os.sysconf("SC_CLK_TCK")  # seconds after boot
    except (OSError, ValueError, IndexError, AttributeError):
        return False  # no such process (its signal finds none), or no /proc: as before
    return began > boot_now - (time.time() - written) + PIDFILE_SLACK_SECS


def _stop_pidfile(path: str, grace: float = 10.0) -> int:
    """SIGTERM the pid in ``path``, SIGKILL after ``grace`` seconds; wait until it is gone.
    A zombie counts as gone: when llmux is PID 1 nothing reaps it, and `kill -0` would
    wait for it until the hook timed out."""
    pid = _read_pidfile(path)
    if pid is None:
        return 0  # nothing to stop: sleep hooks must be idempotent
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + grace
    while _pid_running(pid):
        if time.monotonic() > deadline:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            if time.monotonic() > deadline + 5:
                print(f"stop: pid {pid} did not exit", file=sys.stderr)
                return 1
        time.sleep(PROBE_INTERVAL)
    try:
        os.unlink(path)
    except OSError:
        pass
    return 0


def stop_main(argv: Sequence[str]) -> int:
    """``llmux.py stop --pidfile F``: a sleep hook that stops a server and waits for it."""
    ap = argparse.ArgumentParser(
        prog="llmux.py stop",
        description="SIGTERM the pid in --pidfile, SIGKILL after --grace seconds, exit once it "
                    "has exited (a zombie counts: this works when nothing reaps it); 0 when "
                    "there is nothing to stop.")
    ap.add_argument("--pidfile", required=True)
    ap.add_argument("--grace", type=float, default=10.0, help="seconds before SIGKILL (default 10)")
    args = ap.parse_args(argv)
    return _stop_pidfile(args.pidfile, args.grace)


# How often `probe --wait` asks: a fixed short period, because a switch waits for it (a
# growing backoff made wakes return up to a second after the server was ready).
PROBE_INTERVAL = 0.05


def probe_main(argv: Sequence[str]) -> int:
    """``llmux.py probe URL``: exit 0 when GET URL answers 2xx (an alive or wake hook)."""
    ap = argparse.ArgumentParser(prog="llmux.py probe",
                                 description="Exit 0 when GET URL answers 2xx; for alive hooks.")
    ap.add_argument("url")
    ap.add_argument("--wait", type=float, default=0.0,
                    help="keep trying for this many seconds (for wake hooks)")
    ap.add_argument("--timeout", type=float, default=5.0, help="seconds per attempt")
    ap.add_argument("--pid", type=int, help="give up at once when this process has exited")
    ap.add_argument("--pidfile", help="give up at once when the process named here has exited "
                                      "(or the file names none)")
    args = ap.parse_args(argv)
    match = re.match(r"http://([^/:]+|\[[^\]]+\])(?::(\d+))?(/.*)?$", args.url)
    if not match:
        print(f"probe: {args.url}: expected http://HOST[:PORT]/PATH", file=sys.stderr)
        return 2
    host, port, path = match.group(1).strip("[]"), int(match.group(2) or 80), match.group(3) or "/"
    deadline = time.monotonic() + args.wait
    while True:
        # The server's process is checked before each attempt: one that died (a wrong model
        # path exits in milliseconds) fails the wake now, not when --wait runs out.
        pid = _read_pidfile(args.pidfile) if args.pidfile else args.pid
        if args.pidfile and pid is None:
            print(f"probe: {args.url}: no server process; expected a pid in {args.pidfile}",
                  file=sys.stderr)
            return 1
        if pid is not None and not _pid_running(pid):
            src = f" (from {args.pidfile})" if args.pidfile else ""
            print(f"probe: {args.url}: server process exited; expected pid {pid}{src} running",
                  file=sys.stderr)
            return 1
        try:
            import http.client  # here: only this subcommand speaks HTTP as a client
            conn = http.client.HTTPConnection(host, port, timeout=args.timeout)
            conn.request("GET", path)
            status = conn.getresponse().status
            conn.close()
            if 200 <= status < 300:
                return 0
            reason = f"status {status}"
        except OSError as e:
            reason = e.strerror or str(e)
        if time.monotonic() + PROBE_INTERVAL > deadline:
            print(f"probe: {args.url}: {reason}", file=sys.stderr)
            return 1
        time.sleep(PROBE_INTERVAL)


# ────────────────────────────────────────── CLI ─────────────────────────────────────────

SUBCOMMANDS = {"demo-backend": demo_main, "probe": probe_main, "simulate": simulate_main,
               "stop": stop_main}


def _arg_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="llmux.py",
        description="OpenAI-compatible proxy that switches models on one GPU node with "
                    "wake/sleep shell hooks.",
        epilog="subcommands: 'llmux.py demo-backend -h' (a fake model server), "
               "'llmux.py probe -h' (an alive check), 'llmux.py stop -h' (a sleep hook), "
               "'llmux.py simulate -h' (try a policy on a trace)")
    ap.add_argument("-c", "--config", help="config file (.json, or .yaml with PyYAML)")
    ap.add_argument("-p", "--port", type=int, help="listen port (overrides the config; 0 = any)")
    ap.add_argument("--host", help=f"listen address (default: the config's, or {DEFAULT_HOST})")
    ap.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    ap.add_argument("--log-format", choices=("text", "json"), default="text")
    ap.add_argument("--check", action="store_true", help="validate the config and exit")
    ap.add_argument("--version", action="version", version=f"llmux.py {__version__}")
    return ap


async def serve(config: Config, log: Log, host: str, port: int) -> int:
    """Run the proxy until SIGINT or SIGTERM (SIGHUP reloads the config)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    # SIGHUP is ours from the first moment: its default action would kill llmux and
    # orphan a running hook.  One that comes before llmux listens runs after it does.
    reloads: List["asyncio.Task[bool]"] = []
    early_reload = asyncio.Event()
    loop.add_signal_handler(signal.SIGHUP, early_reload.set)
    server = Server(config, log)
    server.start_reaper()
    log.batch(loop)
    try:
        return await _serve(server, stop, early_reload, reloads, host, port)
    finally:
        log.batch(None)  # what is pending is written now, and the rest at once
        server.hooks.close()  # an exception on the way out leaves no hook or server behind
        # asyncio.run closes the loop's self-pipe before it removes its signal handlers:
        # a signal in between (a child's SIGCHLD, a second SIGTERM) printed "Exception
        # ignored ... signal wakeup fd ... Bad file descriptor".  They go now, while the
        # loop is open, and the rest of the way out ignores them.
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD):
            try:
                loop.remove_signal_handler(signum)
            except RuntimeError:  # uvloop: SIGCHLD is its own
                pass
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)


async def _serve(server: Server, stop: asyncio.Event, early_reload: asyncio.Event,
                 reloads: List["asyncio.Task[bool]"], host: str, port: int) -> int:
    loop = asyncio.get_running_loop()
    config, log = server.config, server.log
    # Start-up adoption runs hooks: a stop meanwhile cancels it, which kills them.
    adopting = loop.create_task(server.adopt())
    stopping = loop.create_task(stop.wait())
    await asyncio.wait([adopting, stopping], return_when=asyncio.FIRST_COMPLETED)
    if stop.is_set():
        adopting.cancel()
        await asyncio.gather(adopting, return_exceptions=True)
        await server.stop()
        log.info("shutdown", during="start-up")
        return 0
    stopping.cancel()
    adopting.result()
    try:
        bound = await server.start(host, port)
    except OSError as e:
        log.error("listen.failed", host=host, port=port, error=e.strerror or str(e))
        await server.stop()
        return 1
    log.info("listening", url=f"http://{host}:{bound}", models=",".join(config.models),
             policy=config.policy.name, version=__version__, pid=os.getpid(),
             loop=type(loop).__module__.split(".")[0])
    server.start_background()

    def reload() -> None:
        # A reload waiting for the running one reads the file when it starts: one is
        # enough for any number of SIGHUPs meanwhile (a storm of them is not a queue).
        reloads[:] = [t for t in reloads if not t.done()]
        if server.reload_waiting:
            log.info("reload.coalesced", reason="a reload is waiting to start; it reads the file then")
            return
        if server.reloading():
            log.info("reload.queued", reason="a reload is running; this one starts after it")
        server.reload_waiting = True
        reloads.append(loop.create_task(server.reload()))

    loop.add_signal_handler(signal.SIGHUP, reload)
    if early_reload.is_set():
        log.info("reload.deferred", reason="SIGHUP arrived during start-up")
        reload()
    await stop.wait()
    await server.shutdown()
    for task in reloads:
        task.cancel()
    await asyncio.gather(*reloads, return_exceptions=True)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; returns the exit status (2 for a bad config)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in SUBCOMMANDS:
        return SUBCOMMANDS[argv[0]](argv[1:])
    args = _arg_parser().parse_args(argv)
    if not args.config:
        _arg_parser().error("the following arguments are required: -c/--config")
    try:
        config = load_config(args.config)
    except ConfigError as e:
        for problem in e.problems:
            print(f"llmux: config error: {problem}", file=sys.stderr)
        return 2
    if args.port is not None and not 0 <= args.port <= 65535:
        print(f"llmux: -p/--port: expected a port number from 0 to 65535; got {args.port}",
              file=sys.stderr)
        return 2
    host = args.host or config.host
    port = config.port if args.port is None else args.port
    problems = _own_port_problems(config, port, host)
    if problems:
        for problem in problems:
            print(f"llmux: config error: {problem}", file=sys.stderr)
        return 2
    if args.check:
        print(f"config ok: {len(config.models)} models ({', '.join(config.models)}), "
              f"port {port}, policy {config.policy.name}")
        return 0
    log = Log(verbose=args.verbose, fmt=args.log_format)
    loop_name = os.environ.get("LLMUX_LOOP", "asyncio")
    if loop_name not in ("asyncio", "uvloop"):
        print(f"llmux: LLMUX_LOOP: expected asyncio or uvloop; got {loop_name!r}", file=sys.stderr)
        return 2
    if loop_name == "uvloop":
        try:  # optional, like PyYAML: only when asked for, and the default is the stdlib's
            import uvloop  # type: ignore
        except ImportError:
            print("llmux: LLMUX_LOOP=uvloop, but uvloop is not installed; expected it importable "
                  "(pip install uvloop), or LLMUX_LOOP unset", file=sys.stderr)
            return 2
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    else:
        _patient_child_watcher()  # (uvloop's own watcher does not block)
    _trim_heap()
    try:
        return asyncio.run(serve(config, log, host, port))
    except ConfigError as e:  # found once listening (-p 0 picked a model's port)
        for problem in e.problems:
            print(f"llmux: config error: {problem}", file=sys.stderr)
        return 2


CHILD_REAP_RETRY_SECS = (0.05, 1.0)  # a child that exited but cannot be reaped yet: first, last retry


def _patient_child_watcher() -> None:
    """On Python 3.12 and 3.13, asyncio's default child watcher reaps a child with a
    blocking waitpid(pid, 0) on the loop's thread as soon as its pidfd says it exited.
    A killed server that a tracer holds (a debugger left attached) has exited but cannot
    be reaped until the tracer lets go: the whole loop stopped.  This one asks with
    WNOHANG and, while the answer is "not yet", asks again later (from 50 ms, doubling, to
    every second), so only that child waits.  (3.8-3.11 reap in a thread of each child's
    own: nothing to do.)"""
    base = getattr(asyncio, "PidfdChildWatcher", None)
    if sys.version_info < (3, 12) or base is None or not hasattr(os, "pidfd_open"):
        return
    try:  # a kernel without pidfds (before 5.3), or a seccomp filter refusing them
        os.close(os.pidfd_open(os.getpid()))
    except OSError:
        return

    with warnings.catch_warnings():  # 3.12 deprecates child watchers; 3.14 drops them
        warnings.simplefilter("ignore", DeprecationWarning)  # (defining a subclass warns too)

        class Patient(base):  # type: ignore[misc,valid-type]
            def _do_wait(self, pid: int, pidfd: int, callback: Any, args: Any,
                         delay: float = 0.0) -> None:
                loop = asyncio.get_running_loop()
                if not delay:
                    loop._remove_reader(pidfd)  # type: ignore[attr-defined]
                try:
                    done, status = os.waitpid(pid, os.WNOHANG)
                except ChildProcessError:  # reaped elsewhere: asyncio's own answer
                    done, status = pid, 255 << 8
                if not done:  # exited, not reapable yet: only this child waits
                    delay = min(max(delay * 2, CHILD_REAP_RETRY_SECS[0]), CHILD_REAP_RETRY_SECS[1])
                    loop.call_later(delay, self._do_wait, pid, pidfd, callback, args, delay)
                    return
                os.close(pidfd)
                callback(pid, os.waitstatus_to_exitcode(status), *args)

        asyncio.get_event_loop_policy().set_child_watcher(Patient())


def _trim_heap() -> None:
    """Before serving: hand the C heap's free memory back to the system (what loading
    left), and take start-up's objects out of the collector's full passes."""
    gc.collect()
    gc.freeze()  # what start-up made lives for ever: full collections skip it (3.7+)
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)



if __name__ == "__main__":
    sys.exit(main())
