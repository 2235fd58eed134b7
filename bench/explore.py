#!/usr/bin/env python3
"""Long run of the switcher explorer: many more seeded scenarios than the suite runs.

    python3 bench/explore.py [--scenarios 100000] [--start N] [--jobs 2]
    python3 bench/explore.py --seed N        # replay one scenario, with its trace

Each scenario drives the real Switcher and policy on a virtual clock (test_llmux.explore):
random arrivals, clients leaving at every phase, hook failures of every kind, control
wake/sleep, liveness failures, reloads, capacity configs, both policies, with every
switcher invariant of DESIGN.md checked after every event-loop step.  Prints the rate,
the totals, and the first failing seed with the command that replays it.  Exit status 0
when every scenario passed.  The start seed defaults to one drawn at random (printed),
so each run explores new ground; the suite always runs seeds 0..1999.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import random
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _batch(seeds: Tuple[int, int]) -> Tuple[Dict[str, int], Optional[str]]:
    import test_llmux  # noqa: WPS433 - imported in the worker, after the path is set
    total: Dict[str, int] = {}
    for seed in range(*seeds):
        try:
            counts = test_llmux.explore(seed)
        except BaseException as e:  # noqa: B902 - reported with its seed
            return total, f"seed {seed}: {type(e).__name__}: {e}"
        counts["scenarios"] = 1
        for k, v in counts.items():
            total[k] = total.get(k, 0) + v
    return total, None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--scenarios", type=int, default=100_000)
    ap.add_argument("--start", type=int, help="first seed (default: random)")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--seed", type=int, help="replay this one scenario with its trace")
    args = ap.parse_args()
    if args.seed is not None:
        import test_llmux
        print(test_llmux.explore(args.seed, verbose=True))
        return 0
    start = args.start if args.start is not None else random.randrange(10**9)
    step = 500
    batches: List[Tuple[int, int]] = [(s, min(s + step, start + args.scenarios))
                                      for s in range(start, start + args.scenarios, step)]
    print(f"exploring seeds {start}..{start + args.scenarios - 1} on {args.jobs} processes")
    began = time.monotonic()
    total: Dict[str, int] = {}
    failures: List[str] = []
    with multiprocessing.Pool(args.jobs) as pool:
        for counts, failure in pool.imap_unordered(_batch, batches):
            for k, v in counts.items():
                total[k] = total.get(k, 0) + v
            if failure:
                failures.append(failure)
    secs = time.monotonic() - began
    done = total.get("scenarios", 0)
    print(f"| scenarios | requests | served | errors | left | cut | reloads | controls | "
          f"loop steps | secs | scenarios/s |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {done} | {total.get('requests', 0)} | {total.get('served', 0)} | "
          f"{total.get('errors', 0)} | {total.get('left', 0)} | {total.get('cut', 0)} | "
          f"{total.get('reloads', 0)} | {total.get('controls', 0)} | {total.get('steps', 0)} | "
          f"{secs:.0f} | {done / secs:.0f} |")
    for failure in sorted(failures):
        seed = failure.split()[1].rstrip(":")
        print(f"FAILED {failure}\n  replay: python3 bench/explore.py --seed {seed}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
