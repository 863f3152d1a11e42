"""torchrec-mamba: Mamba4Rec selective state space sequence encoders for TorchRec and Merlin.

Importing the package is cheap: the public classes below load on first access, and the C++ scan
kernel compiles only when a scan first asks for the "cpu" backend.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "MambaSequenceEncoder": "torchrec_mamba.modules.encoder",
    "MambaBlock": "torchrec_mamba.modules.mamba_block",
}

__all__ = ["MambaBlock", "MambaSequenceEncoder", "__version__"]

if TYPE_CHECKING:
    from torchrec_mamba.modules.encoder import MambaSequenceEncoder
    from torchrec_mamba.modules.mamba_block import MambaBlock


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'torchrec_mamba' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
