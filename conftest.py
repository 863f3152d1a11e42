"""Repository-wide pytest setup.

OMP_WAIT_POLICY must be set before torch is imported: on 2-vCPU machines libgomp's spin-waiting
makes every small parallel op cost milliseconds.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The CLI keeps freed memory in the heap (torchrec_mamba.runtime); tests that call it in-process
# leave pytest's allocator alone. tests/test_runtime.py checks the setting in subprocesses.
os.environ.setdefault("TORCHREC_MAMBA_KEEP_FREED_MEMORY", "0")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = Path(os.environ.get("TORCHREC_MAMBA_SHARED_DATA", Path(__file__).parent / ".." / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only public datasets beside the checkout; skips the test when they are absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"public datasets not found at {SHARED_DATA}")
    return SHARED_DATA.resolve()
