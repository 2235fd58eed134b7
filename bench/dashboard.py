#!/usr/bin/env python3
"""Take the README's screenshot of the dashboard: bench/dashboard.png.

    python3 bench/dashboard.py [--out bench/dashboard.png]

Starts four demo backends and llmux (child processes; traffic on 127.0.0.1 only) with a
capacity of 44 and hooks that take a second or two, opens /llmux/ui in headless
Chromium, and drives switches with real requests: two small models wake side by side,
a large one evicts both, a wake fails (out of memory), the small ones come back with
long streams in flight, then requests for the large one wait while the small ones
drain.  The screenshot (1200x800) is taken during that drain.  Needs chromium (or
chromium-browser) on PATH, and pytest: the browser client is the one test_llmux.py uses.
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from test_llmux import Chromium  # noqa: E402  (DevTools over a pipe, stdlib only)

LLMUX = str(ROOT / "llmux.py")
# name: (size in GiB, wake seconds; None: its wake fails)
MODELS = {"llama-8b": (16, 1.2), "qwen-7b": (15, 1.0), "llama-70b-awq": (40, 2.5), "gemma-27b": (20, None)}
PROMPT = "Summarise the design of a proxy that puts models to sleep and wakes them on demand."


def chat(port: int, model: str, stream: bool = False) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(
            {"model": model, "stream": stream, "messages": [{"role": "user", "content": PROMPT}]}),
            {"content-type": "application/json"})
        resp = conn.getresponse()
        resp.read()
        return resp.status
    finally:
        conn.close()


def in_background(port: int, model: str, stream: bool = False) -> threading.Thread:
    t = threading.Thread(target=chat, args=(port, model, stream), daemon=True)
    t.start()
    return t


def config(procs: List[subprocess.Popen]) -> Dict[str, Any]:
    models: Dict[str, Any] = {}
    for name, (size, wake) in MODELS.items():
        sock = socket.create_server(("127.0.0.1", 0))
        procs.append(subprocess.Popen([sys.executable, LLMUX, "demo-backend", "--model", name, "--fd",
                                       str(sock.fileno()), "--token-delay", "0.25"],
                                      pass_fds=(sock.fileno(),)))
        models[name] = {"port": sock.getsockname()[1], "size": size,
                        "sleep": "sleep 0.4; echo unloaded"}
        sock.close()
        if wake is None:
            models[name]["wake"] = (f"echo 'loading weights ({size} GiB)'; sleep 0.8; "
                                    "echo 'CUDA error: out of memory (tried to allocate 2.50 GiB; "
                                    "1.12 GiB free)' >&2; exit 1")
        else:
            models[name]["wake"] = f"echo 'loading weights ({size} GiB)'; sleep {wake}; echo ready"
    return {"models": models, "policy": {"capacity": 44, "wake_backoff_secs": 0}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=str(ROOT / "bench" / "dashboard.png"))
    args = ap.parse_args()
    procs: List[subprocess.Popen] = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "config.json").write_text(json.dumps(config(procs)))
        log = open(tmp / "llmux.log", "w")
        procs.append(subprocess.Popen([sys.executable, LLMUX, "-c", str(tmp / "config.json"), "-p", "0",
                                       "--host", "127.0.0.1"], stdout=log, stderr=subprocess.STDOUT))
        try:
            deadline = time.monotonic() + 15
            while True:
                listening = re.search(r"listening url=http://127\.0\.0\.1:(\d+)", (tmp / "llmux.log").read_text())
                if listening:
                    break
                assert time.monotonic() < deadline, "llmux did not start"
                time.sleep(0.05)
            port = int(listening.group(1))
            with Chromium(tmp) as page:
                page.open(f"http://127.0.0.1:{port}/llmux/ui")
                page.wait('document.querySelector("[data-model]")')
                for model in ("llama-8b", "qwen-7b", "llama-70b-awq"):
                    assert chat(port, model) == 200
                assert chat(port, "gemma-27b") == 503  # its wake fails
                streams = [in_background(port, "llama-8b", True) for _ in range(2)]
                streams.append(in_background(port, "qwen-7b", True))
                page.wait('document.querySelector(\'[data-model="qwen-7b"][data-state="active"]\') && '
                          'document.querySelector(\'[data-model="llama-8b"] td:nth-child(4)\').textContent == "2"', 30)
                time.sleep(1.5)  # let the streams run a while: the drain below then has them in flight
                waiting = [in_background(port, "llama-70b-awq") for _ in range(3)]
                page.wait('document.querySelector(\'[data-model="llama-8b"][data-state="draining"]\') && '
                          'document.querySelector(\'[data-model="llama-70b-awq"] td:nth-child(5)\').textContent == "3"')
                time.sleep(1.0)  # the lanes show the drain as a band, not a line
                page.screenshot(Path(args.out))
                for t in streams + waiting:
                    t.join(60)
        finally:
            for p in procs:
                p.terminate()
            for p in procs:
                p.wait(10)
            log.close()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
