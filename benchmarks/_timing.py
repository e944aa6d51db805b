"""Shared by the benchmark scripts: interleaved timing of two callables, and the machine facts.

Plain Python and torch only, so that it also runs in the peers' virtual environment.
"""

from __future__ import annotations

import gc
import os
import platform
import random
import statistics
import time
from collections.abc import Callable


def compare(
    plain: Callable,
    cand: Callable,
    repeats: int,
    warmup: int,
    seed: int = 0,
    cand_setup: Callable[[], Callable[[], None]] | None = None,
) -> dict:
    """Time ``plain`` and ``cand`` alternately; ``ratio = median(cand) / median(plain)`` (wall time).

    ``cand_setup``, if given, runs untimed right before each ``cand`` call and returns the function
    that undoes it, run untimed right after (e.g. hooks registered only while ``cand`` runs).

    The order within each pair flips every repeat so that drift hits both sides alike. The garbage
    collector runs before each pair and is off inside it, so no collection pause lands in a
    timing. Besides wall time, the process' CPU time (``process_time``, user + system) is kept, and
    its system part (``os.times``, 10 ms ticks): that is where the kernel's page faults for
    freshly allocated memory show up. ``ci95`` is a bootstrap
    interval of the ratio (each side resampled on its own).
    """

    def run_cand():
        undo = cand_setup() if cand_setup else None
        try:
            return cand()
        finally:
            if undo is not None:
                undo()

    for _ in range(warmup):
        plain()
        run_cand()
    wall: dict[str, list[float]] = {"plain": [], "cand": []}
    cpu: dict[str, list[float]] = {"plain": [], "cand": []}
    sys_: dict[str, list[float]] = {"plain": [], "cand": []}
    for i in range(repeats):
        order = [("plain", plain), ("cand", cand)]
        gc.collect()
        gc.disable()
        try:
            for key, fn in order if i % 2 == 0 else reversed(order):
                undo = cand_setup() if key == "cand" and cand_setup else None
                s0, c0, t0 = os.times().system, time.process_time(), time.perf_counter()
                out = fn()
                t1, c1, s1 = time.perf_counter(), time.process_time(), os.times().system
                del out
                if undo is not None:  # untimed, like the setup
                    undo()
                wall[key].append(t1 - t0)
                cpu[key].append(c1 - c0)
                sys_[key].append(s1 - s0)
        finally:
            gc.enable()
    med = statistics.median
    rng = random.Random(seed)
    boot = sorted(
        med(rng.choices(wall["cand"], k=repeats)) / med(rng.choices(wall["plain"], k=repeats))
        for _ in range(2000)
    )
    return {
        "plain_median_s": med(wall["plain"]),
        "cand_median_s": med(wall["cand"]),
        "ratio": med(wall["cand"]) / med(wall["plain"]),
        "ci95": (boot[50], boot[1949]),
        "ratio_of_mins": min(wall["cand"]) / min(wall["plain"]),
        "cpu_ratio": med(cpu["cand"]) / med(cpu["plain"]),
        "plain_sys_median_s": med(sys_["plain"]),
        "cand_sys_median_s": med(sys_["cand"]),
        "repeats": repeats,
        "plain_s": wall["plain"],
        "cand_s": wall["cand"],
        "plain_cpu_s": cpu["plain"],
        "cand_cpu_s": cpu["cand"],
        "plain_sys_s": sys_["plain"],
        "cand_sys_s": sys_["cand"],
    }


def describe(r: dict) -> str:
    """One line for a :func:`compare` result."""
    lo, hi = r["ci95"]
    return (
        f"plain {r['plain_median_s'] * 1e3:8.1f} ms  other {r['cand_median_s'] * 1e3:8.1f} ms  "
        f"ratio {r['ratio']:.3f} [{lo:.3f}, {hi:.3f}]  min/min {r['ratio_of_mins']:.3f}  "
        f"CPU ratio {r['cpu_ratio']:.3f}  sys {r['plain_sys_median_s'] * 1e3:.0f}/"
        f"{r['cand_sys_median_s'] * 1e3:.0f} ms  (n={r['repeats']})"
    )


def machine() -> dict:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    import torch
    import transformers

    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg_at_start": os.getloadavg(),
    }
