"""Inverted dropout from 16-bit uniforms: several times faster than ``F.dropout`` on CPU.

PyTorch's CPU dropout draws one ``bernoulli_`` float per element and keeps that float noise
tensor for the backward (4 bytes per element); this draws 16-bit uniforms, four per 64-bit
random word, and keeps those (2 bytes per element). The drop probability is ``p`` rounded to a
multiple of 1/65536.

Backends (through :func:`~torchrec_mamba.ops.registry.resolve_backend`, as for every op):
    "cpu":       the compiled kernel (``dropout.cpp``), fp32/fp64 CPU tensors: the words come from
                 a counter-based hash (splitmix64) of one seed and the element index, in the same
                 pass that applies the mask, so any thread count gives the same mask.
    "chunked":   the same 16-bit scheme in PyTorch (``Tensor.random_``), any device and dtype.
    "fused":     torch's own ``F.dropout`` kernel on CUDA.
    "reference": ``F.dropout``, any device.
The seed (or the words) comes from torch's default generator, so ``torch.manual_seed`` makes
every backend reproducible.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from torchrec_mamba.ops import _scan_cpu
from torchrec_mamba.ops.registry import resolve_backend

__all__ = ["dropout"]

_INT16_SPAN = 65536


def _apply_mask(x: Tensor, uniform16: Tensor, threshold: int, scale: float, kernel: bool) -> Tensor:
    """``(uniform16 >= threshold) * x * scale``: one pass in the compiled kernel, else the
    comparison written straight into an x-dtype buffer (several times faster on CPU than
    multiplying by a bool mask) and two in-place multiplies."""
    if kernel:
        return _scan_cpu.kernel_ops().dropout_apply(
            x.contiguous(), uniform16.contiguous(), threshold, scale
        )
    out = torch.ge(uniform16, threshold, out=torch.empty(x.shape, dtype=x.dtype, device=x.device))
    return out.mul_(x).mul_(scale)  # keep * x / (1 - p), in the mask's buffer


class _DropoutFunction(torch.autograd.Function):
    """Saves the 16-bit draws (2 bytes per element) and rebuilds the mask in the backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, p: float, kernel: bool) -> Tensor:  # type: ignore[override]
        threshold = round(p * _INT16_SPAN) - _INT16_SPAN // 2  # P(uniform16 >= threshold) = 1 - p
        scale = 1.0 / (1.0 - p)
        ctx.threshold, ctx.scale, ctx.kernel = threshold, scale, kernel
        if kernel:
            seed = int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64))
            out, uniform16 = _scan_cpu.kernel_ops().dropout_fwd(
                x.contiguous(), seed, threshold, scale
            )
            ctx.save_for_backward(uniform16)
            return out
        n = x.numel()
        # One 64-bit draw gives four 16-bit uniforms: 4x fewer RNG calls than bernoulli_.
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device)
        words.random_(-(2**63), 2**63 - 1)
        uniform16 = words.view(torch.int16)[:n].view(x.shape)  # uniform on [-32768, 32767]
        ctx.save_for_backward(uniform16)
        return _apply_mask(x, uniform16, threshold, scale, kernel=False)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        (uniform16,) = ctx.saved_tensors
        return _apply_mask(grad, uniform16, ctx.threshold, ctx.scale, ctx.kernel), None, None


def dropout(x: Tensor, p: float, *, backend: str = "auto") -> Tensor:
    """Training-mode inverted dropout: zero each element with probability ``p``, scale the rest.

    Args:
        x (Tensor): any shape, floating.
        p (float): drop probability in [0, 1).
        backend (str): "auto", "fused", "cpu", "chunked" or "reference". Default: "auto".

    Example::

        >>> y = dropout(torch.ones(1000), 0.5)
        >>> sorted(set(y.tolist()))  # dropped, or kept and scaled by 1 / (1 - p)
        [0.0, 2.0]

    Returns:
        Tensor: x's shape and dtype.

    Raises:
        TypeError: x is not a floating tensor.
        ValueError: p outside [0, 1).
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(
            f"dropout: x must be a floating torch.Tensor, got {getattr(x, 'dtype', type(x))}"
        )
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout: p must be in [0, 1), got {p}")
    unfit = (
        {}
        if x.dtype in (torch.float32, torch.float64)
        else {"cpu": f"dtype {x.dtype} (needs fp32/fp64)"}
    )
    choice = resolve_backend("dropout", backend, x.device, unfit)
    if choice in ("fused", "reference"):
        return F.dropout(x, p, training=True)
    return _DropoutFunction.apply(x, p, choice == "cpu")
