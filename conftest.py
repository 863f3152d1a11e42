"""Repository-wide pytest setup.

OMP_WAIT_POLICY must be set before torch is imported: on 2-vCPU machines libgomp's spin-waiting
makes every small parallel op cost milliseconds.
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

SHARED_DATA = Path(os.environ.get("TORCHREC_MAMBA_SHARED_DATA", Path(__file__).parent / ".." / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only public datasets beside the checkout; skips the test when they are absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"public datasets not found at {SHARED_DATA}")
    return SHARED_DATA.resolve()
