#!/usr/bin/env python3
"""Long model loads against client read timeouts: what clients see while llmux holds a stream.

    python3 bench/loading.py [--wake-secs 30] [--switches 40] [--seed 1] [--parts 1,2,3,4]
    /tmp/llmux-real/venv/bin/python bench/loading.py     # with the openai client and httpx

Starts llmux (`python3 llmux.py --log-format json`, child processes, 127.0.0.1 only) and
its demo backends, then prints one table per part:

  1. a switch to a model whose wake hook takes --wake-secs (30), longer than every
     client's read timeout (--read-timeout, 20 s): streaming chat requests from the
     openai client, httpx, curl and http.client wait on the same switch, once with
     stream_progress "comments" (llmux sends its 200 head and a comment every
     progress_interval_secs) and once with "off" (nothing until the backend answers);
     per client: outcome, time to first byte, to first content token, total, and
     whether the text is the model's;
  2. a wake hook that fails (exit 3 after 3 s) while those clients wait: what each
     one raises or reads (an SSE error event with "comments", a 503 with "off");
  3. ETA error over a seeded run of --switches requests across three models whose
     wake hooks take random times: llmux's predicted eta_secs (logged when the request
     queued) against its waited_secs, for requests that waited for a switch;
  4. the ETA in three small cases worked out by hand (every hook 1 s), beside the
     actual wait and what a fifo reading of the queues predicts.

The openai client and httpx are optional: without them (plain `python3`) those rows are
skipped with a note.  curl's closest thing to a read timeout is --speed-time 20
--speed-limit 1 (abort when under 1 byte/s for 20 s; curl averages over its last ~5 s,
so it fires about 5 s later than a socket read timeout would).  Nothing is asserted.
"""

from __future__ import annotations

import argparse
import calendar
import http.client
import json
import os
import random
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

try:  # optional clients: the rows that need them are skipped without them
    import httpx
except ImportError:
    httpx = None  # type: ignore[assignment]
try:
    import openai
except ImportError:
    openai = None  # type: ignore[assignment]

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from overhead import pct  # noqa: E402  (bench/ is on the path when run as a script)

LLMUX = str(ROOT / "llmux.py")
PY = sys.executable
CURL = shutil.which("curl")
SCRATCH: List[str] = []  # temp dirs (configs, llmux logs): removed at exit unless --keep



def stop_all(lx: Any, backends: List["subprocess.Popen[Any]"]) -> None:
    """Stop llmux, then the backends (TERM, then KILL after 10 s)."""
    if lx is not None:
        lx.stop()
    for p in backends:
        p.terminate()
    for p in backends:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()

def scratch(prefix: str) -> str:
    SCRATCH.append(tempfile.mkdtemp(prefix=prefix))
    return SCRATCH[-1]


# ─────────────────────────────────────── processes ──────────────────────────────────────


def reserve_port() -> int:
    """A port for a demo backend that a wake hook starts later.  Reserve-then-reuse can
    race with another process on the host; tests must not do it, a bench run on an
    otherwise quiet loopback can (the hook binds it seconds later)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def demo_hooks(name: str, port: int, tmp: str, delay: str = "") -> Dict[str, str]:
    """wake/sleep hooks that start and stop a demo backend, as example-config.json does."""
    pidfile = os.path.join(tmp, f"{name}.pid")
    return {"port": port,  # type: ignore[dict-item]
            "wake": f"{delay}{PY} {LLMUX} demo-backend --model {name} --port {port} "
                    f"--daemon --pidfile {pidfile}",
            "sleep": f"{PY} {LLMUX} demo-backend --stop --pidfile {pidfile}"}


class Llmux:
    """One llmux child with a JSON log, and the demo daemons its hooks left behind."""

    def __init__(self, config: Dict[str, Any], tmp: str) -> None:
        self.tmp = tmp
        path = os.path.join(tmp, "config.json")
        with open(path, "w") as f:
            json.dump(config, f)
        self.log_path = os.path.join(tmp, "llmux.log")
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen([PY, LLMUX, "-c", path, "-p", "0", "--host", "127.0.0.1",
                                      "--log-format", "json"], stdout=self._log, stderr=self._log)
        self.port = 0
        try:
            line = self.wait(lambda e: e.get("event") == "listening", 10)
            self.port = int(line["url"].rsplit(":", 1)[1])
        except BaseException:
            self.stop()
            raise

    def lines(self) -> List[Dict[str, Any]]:
        out = []
        with open(self.log_path) as f:
            for text in f:
                try:
                    out.append(json.loads(text))
                except ValueError:
                    out.append({"event": "raw", "text": text.rstrip()})  # e.g. a traceback
        return out

    def wait(self, pred: Callable[[Dict[str, Any]], bool], timeout: float,
             count: int = 1) -> Dict[str, Any]:
        """The count-th log line matching pred (polls the file; raises after timeout)."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.lines() if pred(e)]
            if len(found) >= count:
                return found[count - 1]
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = open(self.log_path).read()[-2000:]
                raise RuntimeError(f"llmux: no log line as expected within {timeout}s:\n{tail}")
            time.sleep(0.05)

    def get(self, path: str) -> str:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            conn.request("GET", path)
            return conn.getresponse().read().decode()
        finally:
            conn.close()

    def stop(self) -> None:
        """Stop llmux (it kills a hook still running), then every demo daemon by pidfile."""
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._log.close()
        for pidfile in Path(self.tmp).glob("*.pid"):
            subprocess.run([PY, LLMUX, "demo-backend", "--stop", "--pidfile", str(pidfile)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=30)


def post_json(port: int, body: Dict[str, Any], timeout: float = 60) -> Tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body),
                     {"content-type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# ─────────────────────────────────────── clients ────────────────────────────────────────


@dataclass
class Result:
    """What one client saw of one streaming request (times in seconds from its start)."""

    client: str
    outcome: str = "?"
    detail: str = ""
    ttfb: Optional[float] = None
    ttft: Optional[float] = None
    total: Optional[float] = None
    text: str = ""
    comments: Optional[int] = None  # ": llmux: ..." lines seen (None: the client hides them)
    first_comment: str = ""
    last_comment: str = ""


class Sse:
    """Just enough of an SSE reader for the raw clients: comments, content, an error."""

    def __init__(self, result: Result, t0: float) -> None:
        self.r = result
        self.t0 = t0
        self.r.comments = 0
        self.done = False
        self.error: Optional[Dict[str, Any]] = None

    def line(self, line: str) -> None:
        now = time.perf_counter() - self.t0
        if line.startswith(":"):
            self.r.comments = (self.r.comments or 0) + 1
            self.r.first_comment = self.r.first_comment or line
            self.r.last_comment = line
        elif line.startswith("data: [DONE]"):
            self.done = True
        elif line.startswith("data: "):
            event = json.loads(line[6:])
            if "error" in event:
                self.error = event["error"]
                return
            piece = (event.get("choices") or [{}])[0].get("delta", {}).get("content")
            if piece:
                if self.r.ttft is None:
                    self.r.ttft = now
                self.r.text += piece

    def finish(self) -> None:
        if self.error is not None:
            self.r.outcome = "SSE error event"
            self.r.detail = f"{self.error.get('code')}: {self.error.get('message')}"
        elif self.done:
            self.r.outcome = "ok"
        else:
            self.r.outcome = "incomplete stream"


def chat_body(model: str, prompt: str) -> Dict[str, Any]:
    return {"model": model, "stream": True, "messages": [{"role": "user", "content": prompt}]}


def run_openai(port: int, model: str, prompt: str, read: float) -> Result:
    r = Result("openai " + openai.__version__)
    t0 = time.perf_counter()

    def on_response(_: Any) -> None:  # httpx calls it once the response head is in
        r.ttfb = time.perf_counter() - t0

    timeout = httpx.Timeout(connect=5, read=read, write=20, pool=5)
    with httpx.Client(timeout=timeout, event_hooks={"response": [on_response]}) as http_client:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                               timeout=timeout, max_retries=0, http_client=http_client)
        try:
            stream = client.chat.completions.create(
                model=model, stream=True, messages=[{"role": "user", "content": prompt}])
            for chunk in stream:
                piece = chunk.choices[0].delta.content if chunk.choices else None
                if piece:
                    if r.ttft is None:
                        r.ttft = time.perf_counter() - t0
                    r.text += piece
            r.outcome = "ok"
        except Exception as e:
            r.outcome = f"{type(e).__module__.split('.')[0]}.{type(e).__name__}"
            code = getattr(e, "code", None)
            r.detail = str(e) + (f" (.code={code!r})" if code else "")
    r.total = time.perf_counter() - t0
    return r


def run_httpx(port: int, model: str, prompt: str, read: float) -> Result:
    r = Result("httpx " + httpx.__version__)
    t0 = time.perf_counter()
    sse = Sse(r, t0)
    timeout = httpx.Timeout(connect=5, read=read, write=20, pool=5)
    try:
        with httpx.Client(timeout=timeout) as client:
            with client.stream("POST", f"http://127.0.0.1:{port}/v1/chat/completions",
                               json=chat_body(model, prompt)) as resp:
                r.ttfb = time.perf_counter() - t0
                if resp.status_code != 200:
                    r.outcome = f"HTTP {resp.status_code}"
                    r.detail = resp.read().decode(errors="replace")
                else:
                    for line in resp.iter_lines():
                        sse.line(line)
                    sse.finish()
    except Exception as e:
        r.outcome = f"httpx.{type(e).__name__}"
        r.detail = str(e)
    r.total = time.perf_counter() - t0
    return r


def run_stdlib(port: int, model: str, prompt: str, read: float) -> Result:
    """http.client with a socket timeout: the read timeout of urllib and most stdlib code."""
    r = Result("http.client (stdlib)")
    t0 = time.perf_counter()
    sse = Sse(r, t0)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=read)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(chat_body(model, prompt)),
                     {"content-type": "application/json"})
        resp = conn.getresponse()
        r.ttfb = time.perf_counter() - t0
        if resp.status != 200:
            r.outcome = f"HTTP {resp.status}"
            r.detail = resp.read().decode(errors="replace")
        else:
            while True:
                line = resp.readline()
                if not line:
                    break
                sse.line(line.decode().rstrip("\r\n"))
            sse.finish()
    except Exception as e:
        r.outcome = type(e).__name__
        r.detail = str(e)
    finally:
        conn.close()
    r.total = time.perf_counter() - t0
    return r


def run_curl(port: int, model: str, prompt: str, read: float) -> Result:
    """curl -N; --speed-time/--speed-limit stand in for a read timeout (see the docstring)."""
    assert CURL is not None
    r = Result("curl " + subprocess.run([CURL, "--version"], capture_output=True,
                                        text=True).stdout.split()[1])
    t0 = time.perf_counter()
    sse = Sse(r, t0)
    proc = subprocess.Popen([CURL, "-sS", "-N", "-i", "--speed-time", str(int(read)),
                             "--speed-limit", "1", "-H", "content-type: application/json",
                             "--data-binary", json.dumps(chat_body(model, prompt)),
                             f"http://127.0.0.1:{port}/v1/chat/completions"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stderr is not None
        status = 0
        in_head = True
        for raw in proc.stdout:  # -i: the head first, so its first line is the first byte
            line = raw.decode(errors="replace").rstrip("\r\n")
            if r.ttfb is None:
                r.ttfb = time.perf_counter() - t0
                status = int(line.split()[1])
            if in_head:
                in_head = line != ""
                continue
            if status == 200:
                sse.line(line)
            else:
                r.detail += line
        rc = proc.wait(60)
        err = proc.stderr.read().decode(errors="replace").strip()
        if rc != 0:
            r.outcome = f"curl exit {rc}"
            r.detail = err
        elif status != 200:
            r.outcome = f"HTTP {status}"
        else:
            sse.finish()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    r.total = time.perf_counter() - t0
    return r


def clients(notes: List[str]) -> List[Tuple[str, Callable[[int, str, str, float], Result]]]:
    """The clients this Python can run; a note for each one it cannot."""
    out: List[Tuple[str, Callable[[int, str, str, float], Result]]] = []
    if openai is not None and httpx is not None:
        out.append(("openai", run_openai))
    else:
        notes.append("openai client skipped: `import openai` failed (run with a python that has it)")
    if httpx is not None:
        out.append(("httpx", run_httpx))
    else:
        notes.append("httpx skipped: `import httpx` failed")
    if CURL:
        out.append(("curl", run_curl))
    else:
        notes.append("curl skipped: not on PATH")
    out.append(("stdlib", run_stdlib))
    return out


def concurrently(port: int, model: str, read: float,
                 which: List[Tuple[str, Callable[[int, str, str, float], Result]]],
                 deadline: float) -> List[Result]:
    """Every client's request for ``model`` at once (one thread each); each its own prompt,
    so a reply that reached the wrong client shows as wrong text."""
    results: List[Optional[Result]] = [None] * len(which)
    gate = threading.Barrier(len(which))

    def one(i: int, name: str, fn: Callable[[int, str, str, float], Result]) -> None:
        gate.wait()
        try:
            results[i] = fn(port, model, f"loading test from {name}", read)
        except Exception as e:  # a bug in this file: show it in the table
            results[i] = Result(name, outcome=f"bench error {type(e).__name__}", detail=str(e))

    threads = [threading.Thread(target=one, args=(i, n, f), daemon=True)
               for i, (n, f) in enumerate(which)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    return [r if r is not None else Result(which[i][0], outcome="hung (bench deadline)")
            for i, r in enumerate(results)]


def expected_text(model: str, client: str) -> str:
    name = client.split()[0]
    return f"Hello from {model}! You said: loading test from {'stdlib' if name == 'http.client' else name}"


def secs(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.2f}"


def cut(text: str, n: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= n else text[:n - 1] + "…"


def request_lines(lx: Llmux, model: str) -> List[Dict[str, Any]]:
    return [e for e in lx.lines() if e.get("event") == "request" and e.get("model") == model]


def describe(lines: List[Dict[str, Any]]) -> str:
    """llmux's own request log lines, grouped: the outcome it logged for each."""
    groups: Dict[str, int] = {}
    for e in lines:
        key = f"status={e['status']}" + (" held=true" if e.get("held") else "")
        if e.get("waited_secs") is not None:
            key += f" waited_secs≈{e['waited_secs']:.1f}"
        key += f" eta_secs={e['eta_secs']}" if "eta_secs" in e else " (no eta)"
        groups[key] = groups.get(key, 0) + 1
    return "; ".join(f"{n}× {k}" for k, n in groups.items()) or "none"


# ────────────────────────────────── part 1: long switch ─────────────────────────────────


def part1(args: argparse.Namespace, which: List[Tuple[str, Callable[[int, str, str, float], Result]]],
          notes: List[str]) -> Dict[str, List[Result]]:
    out: Dict[str, List[Result]] = {}
    etas: List[Tuple[float, float]] = []  # (waited, eta) of b's requests that got b
    footer: List[str] = []
    for mode in args.modes.split(","):
        tmp = scratch(f"llmux-loading-1-{mode}-")
        models = {"a": demo_hooks("a", reserve_port(), tmp),
                  "b": demo_hooks("b", reserve_port(), tmp, f"sleep {args.wake_secs}; ")}
        lx = Llmux({"models": models, "policy": {"stream_progress": mode,
                                                  "request_timeout_secs": args.wake_secs * 3 + 30}},
                   tmp)
        try:
            status, _ = post_json(lx.port, {"model": "a", "messages": [{"role": "user", "content": "x"}]})
            assert status == 200, status
            t0 = time.monotonic()
            results = concurrently(lx.port, "b", args.read_timeout, which,
                                   time.monotonic() + args.wake_secs + 90)
            lx.wait(lambda e: e.get("event") == "switch.end" and e.get("to") == "b",
                    args.wake_secs + 60)
            ready = time.monotonic() - t0
            lx.wait(lambda e: e.get("event") == "request" and e.get("model") == "b", 30,
                    count=len(which))
            out[mode] = results
            etas += [(e["waited_secs"], e["eta_secs"]) for e in request_lines(lx, "b")
                     if e.get("eta_secs") is not None and e.get("waited_secs") is not None]
            seen = next((r for r in results if r.first_comment), None)
            footer.append(f"- {mode}: b ready after {ready:.1f}s; llmux logged for b: "
                          f"{describe(request_lines(lx, 'b'))}")
            if seen is not None:
                footer.append(f"  - first comment {seen.client.split()[0]} read: `{seen.first_comment}`"
                              f"\n  - last: `{seen.last_comment}`")
        finally:
            lx.stop()
    print(f"## 1. A {args.wake_secs:g}s switch a->b against {args.read_timeout:g}s client read "
          f"timeouts ({len(which)} clients at once, one switch per mode)\n")
    print("| stream_progress | client | outcome | first byte s | first token s | total s "
          "| text | comments read | detail |")
    print("|---|---|---|---:|---:|---:|---|---:|---|")
    for mode, results in out.items():
        for r in results:
            text = "-" if not r.text else ("right" if r.text == expected_text("b", r.client) else "WRONG")
            print(f"| {mode} | {r.client} | {r.outcome} | {secs(r.ttfb)} | {secs(r.ttft)} | "
                  f"{secs(r.total)} | {text} | {'n/a' if r.comments is None else r.comments} | "
                  f"{cut(r.detail, 90)} |")
    print("\n" + "\n".join(footer) + "\n")
    if etas:
        line = (f"part 1: llmux's ETA for b when its requests queued was "
                f"{min(e for _, e in etas):.2f}-{max(e for _, e in etas):.2f}s, the wait "
                f"{min(w for w, _ in etas):.1f}-{max(w for w, _ in etas):.1f}s")
        if max(e for _, e in etas) < 0.5 * min(w for w, _ in etas):
            line += (": b's wake had never been measured, so its ETA is a's switch cost "
                     "(cost_estimate's last fallback: any switch measured), and once that has "
                     "passed the comments say 'eta any moment (later than measured)'")
        notes.append(line)
    return out


# ──────────────────────────────── part 2: a failed wake ─────────────────────────────────


def part2(args: argparse.Namespace,
          which: List[Tuple[str, Callable[[int, str, str, float], Result]]]) -> Dict[str, List[Result]]:
    out: Dict[str, List[Result]] = {}
    footer: List[str] = []
    wake = ("sleep 3; echo 'loading /models/c.gguf' >&2; "
            "echo 'error: cuda out of memory (needed 21.3 GiB, 20.0 GiB free)' >&2; exit 3")
    for mode in args.modes.split(","):
        tmp = scratch(f"llmux-loading-2-{mode}-")
        models = {"a": demo_hooks("a", reserve_port(), tmp),
                  "c": {"port": reserve_port(), "wake": wake, "sleep": "true"}}
        lx = Llmux({"models": models, "policy": {"stream_progress": mode}}, tmp)
        try:
            status, _ = post_json(lx.port, {"model": "a", "messages": [{"role": "user", "content": "x"}]})
            assert status == 200, status
            out[mode] = concurrently(lx.port, "c", args.read_timeout, which, time.monotonic() + 60)
            lx.wait(lambda e: e.get("event") == "request" and e.get("model") == "c", 30,
                    count=len(which))
            footer.append(f"- {mode}: llmux logged for c: {describe(request_lines(lx, 'c'))}")
        finally:
            lx.stop()
    print("## 2. A wake hook that fails (c: exit 3 after 3s, two lines on stderr) under a "
          "held stream\n")
    print("| stream_progress | client | outcome | first byte s | total s | what it raised or read |")
    print("|---|---|---|---:|---:|---|")
    for mode, results in out.items():
        for r in results:
            print(f"| {mode} | {r.client} | {r.outcome} | {secs(r.ttfb)} | {secs(r.total)} | "
                  f"{cut(r.detail, 200)} |")
    print("\n" + "\n".join(footer) + "\n")
    return out


# ───────────────────────────────── part 3: ETA error ────────────────────────────────────


ETA_MODELS = ("m1", "m2", "m3")


def part3(args: argparse.Namespace) -> Dict[str, Any]:
    rng = random.Random(args.seed)
    tmp = scratch("llmux-loading-3-")
    means = {m: round(rng.uniform(0.5, 2.0), 2) for m in ETA_MODELS}
    backends: List[subprocess.Popen] = []
    models: Dict[str, Any] = {}
    lx: Optional[Llmux] = None
    try:
        for name in ETA_MODELS:
            durations = os.path.join(tmp, f"{name}.wake")
            with open(durations, "w") as f:  # more than any run can use
                f.write("\n".join(f"{means[name] * rng.uniform(0.8, 1.2):.3f}"
                                  for _ in range(args.switches + 5)))
            sock = socket.create_server(("127.0.0.1", 0))
            backends.append(subprocess.Popen(
                [PY, LLMUX, "demo-backend", "--model", name, "--fd", str(sock.fileno()),
                 "--token-delay", "0.03"], pass_fds=(sock.fileno(),)))
            # The next seeded duration, dropped from the file (one model's hooks never
            # overlap); plain sh, so the hook costs what it sleeps.
            models[name] = {"port": sock.getsockname()[1], "sleep": "sleep 0.2",
                            "wake": f"d=$(head -n1 {durations}); sed -i 1d {durations}; sleep $d"}
            sock.close()
        lx = Llmux({"models": models, "policy": {"request_timeout_secs": 300}}, tmp)
        # Arrivals: most for another model than the one before (a switch each), a fifth
        # of them in bursts (several models waiting at once, queued behind a switch).
        plan: List[Tuple[float, str, int]] = []
        t, last = 0.0, ""
        for _ in range(args.switches):
            t += rng.uniform(0.0, 0.3) if rng.random() < 0.2 else rng.expovariate(1 / 2.0)
            model = rng.choice([m for m in ETA_MODELS if m != last] if rng.random() < 0.9
                               else list(ETA_MODELS))
            plan.append((t, model, rng.randint(2, 10)))
            last = model
        waits: List[Tuple[str, float, float]] = []  # (model, sent, first content) per request
        lock = threading.Lock()
        start = time.monotonic() + 0.2

        def one(at: float, model: str, tokens: int) -> None:
            time.sleep(max(0.0, start + at - time.monotonic()))
            sent = time.monotonic()
            served: Optional[float] = None
            r = Result("stdlib")
            body = dict(chat_body(model, "eta"), max_tokens=tokens)
            conn = http.client.HTTPConnection("127.0.0.1", lx.port, timeout=120)  # type: ignore[union-attr]
            try:
                conn.request("POST", "/v1/chat/completions", json.dumps(body),
                             {"content-type": "application/json"})
                resp = conn.getresponse()
                sse = Sse(r, time.perf_counter())
                while True:
                    line = resp.readline()
                    if not line:
                        break
                    sse.line(line.decode().rstrip("\r\n"))
                    if r.ttft is not None and served is None:
                        served = time.monotonic()
            finally:
                conn.close()
            with lock:
                waits.append((model, sent, served or time.monotonic()))

        threads = [threading.Thread(target=one, args=p, daemon=True) for p in plan]
        began = time.monotonic()
        for th in threads:
            th.start()
        for th in threads:
            th.join(max(1.0, start + plan[-1][0] + 120 - time.monotonic()))
        elapsed = time.monotonic() - began
        lx.wait(lambda e: e.get("event") == "request" and e.get("model") in ETA_MODELS, 30,
                count=len(plan))
        metrics = lx.get("/metrics")
        log = lx.lines()
    finally:
        stop_all(lx, backends)
    return analyse3(args, means, plan, waits, log, metrics, elapsed)


def _ts(e: Dict[str, Any]) -> float:
    """A log line's wall-clock time (the JSON log has milliseconds, UTC)."""
    t = time.strptime(e["ts"][:19], "%Y-%m-%dT%H:%M:%S")
    return calendar.timegm(t) + float("0." + e["ts"][20:23])


def stats_row(label: str, rows: List[Tuple[float, float]]) -> str:
    """rows: (waited, eta) pairs."""
    if not rows:
        return f"| {label} | 0 | - | - | - | - | - | - | - |"
    errs = sorted(abs(w - e) for w, e in rows)
    bias = statistics.mean(w - e for w, e in rows)
    wait = statistics.mean(w for w, _ in rows)
    return (f"| {label} | {len(rows)} | {statistics.mean(errs):.2f} | {pct(errs, 50):.2f} | "
            f"{pct(errs, 90):.2f} | "
            f"{errs[-1]:.2f} | {wait:.2f} | {statistics.mean(errs) / wait:.0%} | {bias:+.2f} |")


def analyse3(args: argparse.Namespace, means: Dict[str, float], plan: List[Tuple[float, str, int]],
             waits: List[Tuple[str, float, float]], log: List[Dict[str, Any]], metrics: str,
             elapsed: float) -> Dict[str, Any]:
    # When each model's wake was first measured: before that its ETA is borrowed from
    # other models' costs (cost_estimate's "any switch" fallback).
    first_wake: Dict[str, float] = {}
    for e in log:
        if e.get("event") == "hook.exit" and e.get("hook") == "wake" and e.get("code") == 0:
            first_wake.setdefault(e["model"], _ts(e))
    own: List[Tuple[float, float]] = []
    borrowed: List[Tuple[float, float]] = []
    no_eta = other = 0
    worst: Optional[Dict[str, Any]] = None
    requests = [e for e in log if e.get("event") == "request" and e.get("model") in ETA_MODELS]
    for e in requests:
        if not str(e.get("waited_for") or "").startswith("switch"):
            other += 1
            continue
        if e.get("eta_secs") is None:
            no_eta += 1
            continue
        queued_at = _ts(e) - e["secs"]
        pair = (e["waited_secs"], e["eta_secs"])
        known = first_wake.get(e["model"], float("inf")) < queued_at
        (own if known else borrowed).append(pair)
        if known and (worst is None or abs(pair[0] - pair[1]) >
                      abs(worst["waited_secs"] - worst["eta_secs"])):
            worst = e
    switches = sum(1 for e in log if e.get("event") == "switch.end" and e.get("result") == "ok")
    # Several models waiting at once: from the clients' side, sent -> first content.
    overlap = 0
    most = 0
    for model, sent, served in waits:
        others = {m for m, s, f in waits if m != model and s < served and f > sent}
        overlap += bool(others)
        most = max(most, 1 + len({m for m, s, f in waits if m != model and s <= sent < f}))
    msum = sum(float(v) for v in re.findall(r"^llmux_eta_error_seconds_sum\S* (\S+)$", metrics, re.M))
    mcount = sum(float(v) for v in re.findall(r"^llmux_eta_error_seconds_count\S* (\S+)$", metrics, re.M))
    print(f"## 3. ETA error over {len(plan)} seeded requests (seed {args.seed}), models "
          + ", ".join(f"{m} wake {means[m]:.2f}s ±20%" for m in ETA_MODELS)
          + f", sleep 0.2s; {elapsed:.0f}s, {switches} switches\n")
    print("| requests that waited for a switch | n | mean abs err s | p50 | p90 | max "
          "| mean wait s | mean err / mean wait | bias (actual-eta) s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(stats_row("ETA from the model's own measured costs", own))
    print(stats_row("ETA borrowed (its wake not yet measured)", borrowed))
    print(stats_row("all with an ETA", own + borrowed))
    print(f"| no ETA (no switch measured yet) | {no_eta} | | | | | | | |")
    print(f"| (did not wait for a switch: {other}) | | | | | | | | |")
    print(f"\n- models waiting at once (client side): up to {most}; {overlap} of {len(waits)} "
          f"requests waited while another model also had waiters")
    print(f"- /metrics llmux_eta_error_seconds: count {mcount:.0f}, mean "
          f"{msum / mcount if mcount else float('nan'):.2f}s")
    if worst is not None:
        print(f"- worst own-cost ETA: {worst['model']} {worst['waited_for']}, "
              f"eta {worst['eta_secs']}s, waited {worst['waited_secs']}s")
    print()
    return {"own": own, "borrowed": borrowed, "no_eta": no_eta, "other": other}


# ───────────────────── part 4 (optional): ETA in three hand-checked cases ─────────────────


# (what it shows, [(at secs, model)], index of the judged request, the ETA a fifo reading
# gives).  Every hook takes 1 s, so each switch costs 2 s (sleep 1 + wake 1); w is up.
ETA_CASES: List[Tuple[str, List[Tuple[float, str]], int, float]] = [
    ("the target of the switch in progress counted again while its victim sleeps",
     [(0.0, "x"), (0.3, "y")], 1, (2.0 - 0.3) + 2.0),
    ("the victim of the switch in progress left out, though it has an older waiter",
     [(0.0, "x"), (1.3, "w"), (1.5, "y")], 2, (2.0 - 1.5) + 2.0 + 2.0),
    ("a model's second waiter ranked by its own arrival, not its model's oldest",
     [(0.0, "x"), (1.2, "y"), (1.3, "z"), (1.4, "y")], 3, (2.0 - 1.4) + 2.0),
]


def part4(args: argparse.Namespace) -> List[Tuple[str, float, float, float]]:
    tmp = scratch("llmux-loading-4-")
    backends: List[subprocess.Popen] = []
    models: Dict[str, Any] = {}
    lx: Optional[Llmux] = None
    rows: List[Tuple[str, float, float, float]] = []
    try:
        for name in ("w", "x", "y", "z"):
            sock = socket.create_server(("127.0.0.1", 0))
            backends.append(subprocess.Popen([PY, LLMUX, "demo-backend", "--model", name, "--fd",
                                              str(sock.fileno())], pass_fds=(sock.fileno(),)))
            models[name] = {"port": sock.getsockname()[1], "wake": "sleep 1", "sleep": "sleep 1"}
            sock.close()
        lx = Llmux({"models": models}, tmp)
        ask = {"messages": [{"role": "user", "content": "eta"}]}
        for name in ("w", "x", "y", "z", "w"):  # every hook measured once; w is up
            post_json(lx.port, dict(ask, model=name))
        for _, steps, judged, expected in ETA_CASES:
            before = len(lx.lines())
            start = time.monotonic() + 0.1

            def one(at: float, model: str) -> None:
                time.sleep(max(0.0, start + at - time.monotonic()))
                post_json(lx.port, dict(ask, model=model))  # type: ignore[union-attr]

            threads = [threading.Thread(target=one, args=step, daemon=True) for step in steps]
            for th in threads:
                th.start()
            for th in threads:
                th.join(60)
            # The judged request's line: its model's, and of two the one that waited less
            # (they are served together, so the later arrival waited less).
            model = steps[judged][1]
            later = sum(1 for at, m in steps[:judged] if m == model)
            mine = sorted((e for e in lx.lines()[before:] if e.get("event") == "request"
                           and e.get("model") == model), key=lambda e: -e["waited_secs"])
            e = mine[later]
            rows.append((f"{model} at {steps[judged][0]:.1f}s", e.get("eta_secs", float("nan")),
                         e["waited_secs"], expected))
            post_json(lx.port, dict(ask, model="w"))  # w up again for the next case
    finally:
        stop_all(lx, backends)
    print("## 4. ETA in three hand-checked cases (policy fifo; every hook 1s, so a switch "
          "costs 2s; w active)\n")
    print("| case | requests (s: model) | judged | llmux eta s | actual wait s | fifo reading s |")
    print("|---|---|---|---:|---:|---:|")
    for (what, steps, _, _), (label, eta, waited, expected) in zip(ETA_CASES, rows):
        plan = ", ".join(f"{at:.1f}: {m}" for at, m in steps)
        print(f"| {what} | {plan} | {label} | {eta:.2f} | {waited:.2f} | {expected:.2f} |")
    print()
    return rows


# ───────────────────────────────────────── main ─────────────────────────────────────────


def summary(args: argparse.Namespace, p1: Optional[Dict[str, List[Result]]],
            p2: Optional[Dict[str, List[Result]]], p3: Optional[Dict[str, Any]],
            p4: Optional[List[Tuple[str, float, float, float]]], notes: List[str]) -> None:
    print("## Summary\n")
    for mode, results in (p1 or {}).items():
        ok = [r for r in results if r.outcome == "ok" and r.text == expected_text("b", r.client)]
        failed = ", ".join(f"{r.client.split()[0]}: {r.outcome} after {secs(r.total)}s"
                           for r in results if r not in ok)
        print(f"- part 1, {mode}: {len(ok)} of {len(results)} clients got the whole answer"
              + (f"; failed: {failed}" if failed else ""))
    for mode, results in (p2 or {}).items():
        for r in results:
            if r.client.startswith("openai"):
                print(f"- part 2, {mode}: the openai client raised {r.outcome}: {cut(r.detail, 160)}")
    if p3 is not None:
        rows = p3["own"] + p3["borrowed"]
        if rows:
            err = statistics.mean(abs(w - e) for w, e in rows)
            wait = statistics.mean(w for w, _ in rows)
            print(f"- part 3: mean |actual - eta| {err:.2f}s over {len(rows)} requests that waited "
                  f"for a switch ({err / wait:.0%} of their mean wait {wait:.2f}s); "
                  f"{p3['no_eta']} had no ETA")
    if p4 is not None:
        print("- part 4: llmux's ETA minus the actual wait, per case: "
              + ", ".join(f"{eta - waited:+.2f}s" for _, eta, waited, _ in p4))
    for note in notes:
        print(f"- note: {note}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wake-secs", type=float, default=30.0, help="part 1: b's wake hook time")
    ap.add_argument("--read-timeout", type=float, default=20.0, help="every client's read timeout")
    ap.add_argument("--modes", default="comments,off", help="stream_progress values (parts 1, 2)")
    ap.add_argument("--switches", type=int, default=40, help="part 3: requests, most of them a switch")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--parts", default="1,2,3,4")
    ap.add_argument("--keep", action="store_true", help="keep the temp dirs with llmux's logs")
    args = ap.parse_args()
    parts = set(args.parts.split(","))
    notes: List[str] = []
    print(f"llmux.py loading bench, Python {sys.version.split()[0]} ({PY}), {os.cpu_count()} cores\n")
    try:
        which = clients(notes)
        p1 = part1(args, which, notes) if "1" in parts else None
        p2 = part2(args, which) if "2" in parts else None
        p3 = part3(args) if "3" in parts else None
        p4 = part4(args) if "4" in parts else None
        summary(args, p1, p2, p3, p4, notes)
    finally:
        if args.keep:
            print("\nconfigs and llmux logs kept in: " + " ".join(SCRATCH))
        else:
            for path in SCRATCH:
                shutil.rmtree(path, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
