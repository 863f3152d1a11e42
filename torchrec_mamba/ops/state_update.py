"""One-step selective-state update for streaming inference (placeholder: being written)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def selective_state_update_ref(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor,
    D: Tensor | None = None, z: Tensor | None = None, dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
) -> Tensor:
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    decay = torch.exp(dt[:, :, None] * A.float())
    state.copy_(decay * state + (dt * x.float())[:, :, None] * B.float()[:, None, :])
    y = torch.einsum("bdn,bn->bd", state.float(), C.float())
    if D is not None:
        y = y + x.float() * D.float()
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)


selective_state_update = selective_state_update_ref
