"""Pure-PyTorch chunked parallel selective scan (placeholder: being written)."""

from __future__ import annotations

from torch import Tensor


def selective_scan(
    u: Tensor, delta: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Tensor | None, z: Tensor | None, delta_bias: Tensor | None,
    delta_softplus: bool, return_last_state: bool,
) -> Tensor | tuple[Tensor, Tensor]:
    from torchrec_mamba.ops.selective_scan import selective_scan_ref

    return selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
