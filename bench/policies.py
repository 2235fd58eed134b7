#!/usr/bin/env python3
"""fifo against the cost-aware policy, on synthetic traces, through the real switcher.

    python3 bench/policies.py [--hours 1] [--seed 7]

Each trace is an hour of traffic replayed by llmux's simulator (the real Switcher and
policy code on a virtual clock, hooks replaced by durations), once per policy.  Every
switch costs 10 s (sleep 3 s + wake 7 s).  Clients give up after max_wait_secs (their
request_timeout_secs), so a policy that lets requests wait too long serves fewer.

  interleaved-2  two models, requests alternating every 2 s, service 1.5 s, a backend
                 serving 1 request at a time; max_wait_secs 60
  poisson-3      three models, Poisson arrivals (0.5/s), service 1 s (the switch costs
                 10x), 1 at a time; max_wait_secs 120
  one-hot        one model gets 97% of Poisson arrivals (1/s), the other 3%, service 1 s,
                 2 at a time; max_wait_secs 60

Prints one table: requests served, waits, switches, time spent switching (sleep+wake),
served per hour.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import llmux  # noqa: E402







def poisson(hours: float, rng: random.Random, rate: float, weights: Dict[str, float],
            service: float) -> List[llmux.TraceEntry]:
    t, out = 0.0, []
    names, w = list(weights), list(weights.values())
    while True:
        t += rng.expovariate(rate)
        if t > hours * 3600:
            return out
        out.append(llmux.TraceEntry(t, rng.choices(names, w)[0], service))


def config(policy: str, models: List[str], max_wait: float) -> llmux.Config:
    return llmux.parse_config({
        "models": {m: {"port": 8001 + i} for i, m in enumerate(models)},
        "policy": {"name": policy, "max_wait_secs": max_wait, "request_timeout_secs": max_wait}})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hours", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    traces = [  # name, models, trace, backend concurrency, max_wait_secs
        ("interleaved-2", ["a", "b"], [llmux.TraceEntry(i * 2.0, "ab"[i % 2], 1.5)
                                       for i in range(int(args.hours * 1800))], 1, 60.0),
        ("poisson-3", ["a", "b", "c"], poisson(args.hours, rng, 0.5, {"a": 1, "b": 1, "c": 1}, 1.0), 1, 120.0),
        ("one-hot", ["a", "b"], poisson(args.hours, rng, 1.0, {"a": 97, "b": 3}, 1.0), 2, 60.0),
    ]
    print(f"policies on {args.hours:g} h synthetic traces, switch = sleep 3 s + wake 7 s, seed {args.seed}\n")
    print("| trace | max wait | policy | requests | served | switches | wait p50 | wait p99 "
          "| wait max | switching | served/hour |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, models, trace, concurrency, max_wait in traces:
        for policy in ("fifo", "cost"):
            r = llmux.simulate(config(policy, models, max_wait), trace,
                               llmux.SimHooks({"*": 7.0}, {"*": 3.0}), concurrency=concurrency)
            print(f"| {name} | {max_wait:g}s | {policy} | {r['requests']} | {r['served']} | {r['switches']} "
                  f"| {r['wait_p50']:.1f}s | {r['wait_p99']:.1f}s | {r['wait_max']:.1f}s "
                  f"| {r['switching_share']:.0%} | {r['served_per_hour']:.0f} |")


if __name__ == "__main__":
    main()
