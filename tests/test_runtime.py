"""keep_freed_memory: freed blocks are reused instead of faulted in again; opt-outs are honoured.

Each case runs in a fresh interpreter: the setting is process-wide and cannot be undone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from torchrec_mamba.runtime import KEEP_FREED_MEMORY_ENV

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")

# Allocate and free a 64 MiB buffer (zero-filled, so every page is touched) six times; report the
# minor page faults of the last five rounds.
_PROBE = """
import json, resource, sys
from torchrec_mamba.runtime import keep_freed_memory
status = keep_freed_memory() if sys.argv[1] == "call" else "not called"
again = keep_freed_memory() if sys.argv[1] == "call" else ""
buf = bytearray(64 << 20); del buf
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    buf = bytearray(64 << 20); del buf
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"status": status, "again": again, "faults": faults}))
"""


def probe(mode: str, **env: str) -> dict[str, object]:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("MALLOC_") and k not in (KEEP_FREED_MEMORY_ENV, "GLIBC_TUNABLES")}  # fmt: skip
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], env={**clean, **env}, capture_output=True,
        text=True, check=True, timeout=120,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_instead_of_faulted_in_again() -> None:
    kept = probe("call")
    plain = probe("plain")
    assert kept["status"] == "on" and kept["again"] == "already on"
    # Without it each round maps 16k fresh 4 KiB pages; with it the same pages come back.
    assert int(plain["faults"]) > 5 * 8000
    assert int(kept["faults"]) < int(plain["faults"]) / 20


@pytest.mark.parametrize(
    ("env", "reason"),
    [
        ({KEEP_FREED_MEMORY_ENV: "0"}, f"off: {KEEP_FREED_MEMORY_ENV}=0"),
        ({"MALLOC_MMAP_MAX_": "65536"}, "off: the environment already tunes the allocator (MALLOC_MMAP_MAX_)"),
        ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}, "off: the environment already tunes the allocator (GLIBC_TUNABLES)"),
    ],
)  # fmt: skip
def test_opt_outs_leave_the_allocator_alone(env: dict[str, str], reason: str) -> None:
    result = probe("call", **env)
    assert result["status"] == reason
