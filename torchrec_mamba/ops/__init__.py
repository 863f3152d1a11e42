"""Selective-SSM ops: the selective scan, its one-step update, causal conv1d, dropout and
GELU + dropout.

Every op picks its backend (fused / cpu / chunked / reference) through one function,
:func:`~torchrec_mamba.ops.registry.resolve_backend`, by the same rules; see :mod:`.registry`.
"""

from torchrec_mamba.ops.causal_conv1d import causal_conv1d, causal_conv1d_update
from torchrec_mamba.ops.dropout import dropout, gelu_dropout
from torchrec_mamba.ops.registry import BACKENDS, OP_BACKENDS, OVERRIDE_ENV, resolve_backend
from torchrec_mamba.ops.selective_scan import selective_scan, selective_scan_ref
from torchrec_mamba.ops.state_update import selective_state_update, selective_state_update_ref

__all__ = [
    "BACKENDS",
    "OP_BACKENDS",
    "OVERRIDE_ENV",
    "causal_conv1d",
    "causal_conv1d_update",
    "dropout",
    "gelu_dropout",
    "resolve_backend",
    "selective_scan",
    "selective_scan_ref",
    "selective_state_update",
    "selective_state_update_ref",
]
