"""Process-level settings that make CPU training faster; the CLI, the example and the benchmarks
apply them, and a user's own training script can call :func:`keep_freed_memory` too.

Why: a training step allocates and frees the same large activations (tens of MB each) every
step. glibc serves blocks above its mmap threshold (at most 32 MiB) with a fresh ``mmap`` and
returns them with ``munmap`` when freed, and it trims the top of the heap back to the kernel, so
each step writes to memory the kernel has to fault in and zero again. On the 2-vCPU development
machine that cost about a fifth of the Beauty training epoch (paired, same code, 2 threads:
15.0 s -> 12.0 s for the first epoch, 14.2 s -> 10.5 s for the second; docs/benchmarks.md). Keeping freed memory in the heap
costs resident memory instead: the process keeps its peak (1.6 GB -> 2.1 GB on Beauty).

The ``OMP_WAIT_POLICY=PASSIVE`` and ``THP_MEM_ALLOC_ENABLE=1`` environment variables must be set
before torch is imported, so the entry points set those themselves (see ``cli.py``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import platform

logger = logging.getLogger(__name__)

__all__ = ["KEEP_FREED_MEMORY_ENV", "keep_freed_memory"]

KEEP_FREED_MEMORY_ENV = "TORCHREC_MAMBA_KEEP_FREED_MEMORY"

# mallopt parameters (glibc <malloc.h>).
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_MAX = -4
_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes a C int: give the heap's top back only past 2 GiB
_TOP_PAD = 64 << 20  # grow the heap 64 MiB at a time


def _user_tuned_malloc() -> str:
    """The name of a malloc setting the user made in the environment ("" when none)."""
    for name in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_",
                 "MALLOC_MMAP_THRESHOLD_"):  # fmt: skip
        if name in os.environ:
            return name
    if "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    if "LD_PRELOAD" in os.environ and any(
        lib in os.environ["LD_PRELOAD"] for lib in ("jemalloc", "tcmalloc", "mimalloc")
    ):
        return "LD_PRELOAD"
    return ""


def keep_freed_memory() -> str:
    """Keep freed memory in this process's heap instead of returning it to the kernel (glibc).

    Serves every allocation from the heap (no per-block ``mmap``) and trims the heap only when
    more than 2 GiB at its top are free, so a training loop reuses pages already mapped. Does nothing, and says why, when
    ``TORCHREC_MAMBA_KEEP_FREED_MEMORY=0``, when the user set glibc malloc options or preloaded
    another allocator, or off glibc.

    Example::

        >>> keep_freed_memory().split(":")[0] in ("on", "already on", "off")
        True

    Returns:
        str: "on", "already on", or "off: <reason>".
    """
    if getattr(keep_freed_memory, "_done", False):
        return "already on"
    if os.environ.get(KEEP_FREED_MEMORY_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return f"off: {KEEP_FREED_MEMORY_ENV}={os.environ[KEEP_FREED_MEMORY_ENV]}"
    user = _user_tuned_malloc()
    if user:
        return f"off: the environment already tunes the allocator ({user})"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return f"off: needs glibc, this is {platform.system()} {platform.libc_ver()[0] or ''}".rstrip()
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = all(
            libc.mallopt(param, value) == 1
            for param, value in (
                (_M_MMAP_MAX, 0),
                (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD),
                (_M_TOP_PAD, _TOP_PAD),
            )
        )
    except (OSError, AttributeError, ctypes.ArgumentError) as exc:
        return f"off: mallopt is not callable ({exc})"
    if not ok:
        return "off: mallopt refused a setting"
    keep_freed_memory._done = True  # type: ignore[attr-defined]
    logger.debug("keep_freed_memory: glibc keeps freed memory in the heap")
    return "on"
