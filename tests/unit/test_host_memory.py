"""keep_freed_memory: a freed large tensor's memory is reused by the next one instead of being
mapped and zeroed again by the kernel (counted as minor page faults, in a fresh process each)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

CHILD = """
import json, resource, sys, torch
from mechscope.models.host_memory import keep_freed_memory
applied = keep_freed_memory()
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB: above glibc's largest default mmap threshold
    del x
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "faults": faults}))
"""


def run_child(keep: str) -> dict:
    env = {**os.environ, "MECHSCOPE_KEEP_FREED_MEMORY": keep}
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt thresholds are glibc's")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    kept, default = run_child("1"), run_child("0")
    assert kept["applied"] and not default["applied"]
    # glibc's defaults: every 64 MiB tensor is a fresh mapping, every page faulted in again
    assert min(default["faults"][1:]) > pages // 2
    # kept: the first allocations fault their pages in (glibc's aligned allocation may place the
    # next one or two past the first); from then on the freed memory is reused
    assert kept["faults"][0] > pages // 2
    assert max(kept["faults"][4:]) < pages // 100
