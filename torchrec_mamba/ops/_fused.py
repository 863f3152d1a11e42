"""Guarded imports of the optional CUDA kernels (mamba-ssm, causal-conv1d).

Both packages ship CUDA kernels only. On a CPU machine ``import mamba_ssm`` fails with an
ImportError (``selective_scan_cuda`` missing) or a RuntimeError raised while loading the
extension, so both are caught here, once, and the reason is kept for error messages.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import Tensor

logger = logging.getLogger(__name__)

selective_scan_fn: Any = None
selective_state_update_fn: Any = None
causal_conv1d_fn: Any = None
causal_conv1d_update_fn: Any = None
Mamba: Any = None
import_error: str = ""
conv_import_error: str = ""

try:  # pragma: no cover - needs a CUDA build of mamba-ssm
    from mamba_ssm import Mamba  # type: ignore[no-redef]  # noqa: F401 (re-exported)
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # type: ignore[no-redef]  # noqa: F401 (re-exported)
    from mamba_ssm.ops.triton.selective_state_update import (  # type: ignore[no-redef]  # noqa: F401 (re-exported)
        selective_state_update as selective_state_update_fn,
    )
except (ImportError, RuntimeError, OSError) as exc:
    import_error = f"{type(exc).__name__}: {exc}"

try:  # pragma: no cover - needs a CUDA build of causal-conv1d
    from causal_conv1d import causal_conv1d_fn  # type: ignore[no-redef]  # noqa: F401 (re-exported)
    from causal_conv1d import causal_conv1d_update as causal_conv1d_update_fn  # type: ignore[no-redef]  # noqa: F401 (re-exported)
except (ImportError, RuntimeError, OSError) as exc:
    conv_import_error = f"{type(exc).__name__}: {exc}"


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    return_last_state: bool,
) -> Tensor | tuple[Tensor, Tensor]:  # pragma: no cover - CUDA only
    """mamba-ssm's fused CUDA selective scan; arguments as in :func:`selective_scan`."""
    # mamba-ssm wants contiguous last dims and fp32 A.
    return selective_scan_fn(
        u.contiguous(),
        delta.contiguous(),
        A.float().contiguous(),
        B.contiguous(),
        C.contiguous(),
        None if D is None else D.float(),
        None if z is None else z.contiguous(),
        None if delta_bias is None else delta_bias.float(),
        delta_softplus,
        return_last_state,
    )
