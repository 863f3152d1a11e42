"""Selective-SSM ops: the selective scan, its one-step update, and causal conv1d.

Each public op dispatches between backends in one place; see :mod:`.selective_scan`.
"""

from torchrec_mamba.ops.causal_conv1d import causal_conv1d, causal_conv1d_update
from torchrec_mamba.ops.selective_scan import (
    BACKENDS,
    resolve_backend,
    selective_scan,
    selective_scan_ref,
)
from torchrec_mamba.ops.state_update import selective_state_update, selective_state_update_ref

__all__ = [
    "BACKENDS",
    "causal_conv1d",
    "causal_conv1d_update",
    "resolve_backend",
    "selective_scan",
    "selective_scan_ref",
    "selective_state_update",
    "selective_state_update_ref",
]
