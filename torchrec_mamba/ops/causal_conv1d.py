"""Depthwise causal conv1d and its one-step update (placeholder: being written)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def causal_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None) -> Tensor:
    width = weight.shape[1]
    y = F.conv1d(F.pad(x, (width - 1, 0)), weight[:, None, :], bias, groups=x.shape[1])
    return F.silu(y) if activation in ("silu", "swish") else y


def causal_conv1d_update(
    x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None
) -> Tensor:
    conv_state.copy_(conv_state.roll(-1, dims=-1))
    conv_state[:, :, -1] = x
    y = (conv_state * weight).sum(-1)
    if bias is not None:
        y = y + bias
    return F.silu(y) if activation in ("silu", "swish") else y
