"""Inverted dropout from 16-bit uniforms, several times faster than ``F.dropout`` on CPU, and
the FFN's GELU fused with its dropout.

PyTorch's CPU dropout draws one ``bernoulli_`` float per element and keeps that float noise
tensor for the backward (4 bytes per element). Here each element gets a 16-bit uniform, four per
64-bit random word; the drop probability is ``p`` rounded to a multiple of 1/65536.

Backends (through :func:`~torchrec_mamba.ops.registry.resolve_backend`, as for every op):
    "cpu":       the compiled kernels (``dropout.cpp``), fp32/fp64 CPU tensors. The words come
                 from a counter-based hash (splitmix64) of one seed and the element index, in the
                 same pass that applies the mask, so any thread count gives the same mask; the
                 backward regenerates the mask from the seed, so nothing per element is kept.
                 ``gelu_dropout`` computes GELU, the mask and its backward in one pass each.
    "chunked":   the same 16-bit scheme in PyTorch (``Tensor.random_``), any device and dtype;
                 it keeps the draws (2 bytes per element) for the backward.
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
from torch.autograd.function import once_differentiable

from torchrec_mamba.ops import _scan_cpu
from torchrec_mamba.ops.registry import resolve_backend

__all__ = ["dropout", "gelu_dropout"]

_INT16_SPAN = 65536


def _threshold_scale(p: float) -> tuple[int, float]:
    """The int16 threshold with P(uniform16 >= threshold) = 1 - p, and the keep scale 1/(1-p)."""
    return round(p * _INT16_SPAN) - _INT16_SPAN // 2, 1.0 / (1.0 - p)


def _draw_seed() -> int:
    """One 64-bit seed from torch's default generator (``torch.manual_seed`` fixes it)."""
    return int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64))


def _apply_mask(x: Tensor, uniform16: Tensor, threshold: int, scale: float) -> Tensor:
    """``(uniform16 >= threshold) * x * scale``: the comparison written straight into an x-dtype
    buffer (several times faster on CPU than multiplying by a bool mask), two in-place multiplies."""
    out = torch.ge(uniform16, threshold, out=torch.empty(x.shape, dtype=x.dtype, device=x.device))
    return out.mul_(x).mul_(scale)  # keep * x / (1 - p), in the mask's buffer


class _SeededDropout(torch.autograd.Function):
    """The compiled kernel: keeps only the seed; the backward regenerates the same mask."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, p: float) -> Tensor:  # type: ignore[override]
        ctx.threshold, ctx.scale = _threshold_scale(p)
        ctx.seed = _draw_seed()
        return _scan_cpu.kernel_ops().dropout_seeded(
            x.contiguous(), ctx.seed, ctx.threshold, ctx.scale
        )

    @staticmethod
    @once_differentiable  # the kernel's backward has no backward of its own
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        dx = _scan_cpu.kernel_ops().dropout_seeded(
            grad.contiguous(), ctx.seed, ctx.threshold, ctx.scale
        )
        return dx, None


class _DropoutFunction(torch.autograd.Function):
    """PyTorch form: saves the 16-bit draws (2 bytes per element) for the backward."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, p: float) -> Tensor:  # type: ignore[override]
        ctx.threshold, ctx.scale = _threshold_scale(p)
        n = x.numel()
        # One 64-bit draw gives four 16-bit uniforms: 4x fewer RNG calls than bernoulli_.
        words = torch.empty((n + 3) // 4, dtype=torch.int64, device=x.device)
        words.random_(-(2**63), 2**63 - 1)
        uniform16 = words.view(torch.int16)[:n].view(x.shape)  # uniform on [-32768, 32767]
        ctx.save_for_backward(uniform16)
        return _apply_mask(x, uniform16, ctx.threshold, ctx.scale)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (uniform16,) = ctx.saved_tensors
        return _apply_mask(grad, uniform16, ctx.threshold, ctx.scale), None


class _GeluDropout(torch.autograd.Function):
    """``dropout(GELU(h))`` in one compiled pass; keeps h (GELU's backward needs it) and the seed."""

    @staticmethod
    def forward(ctx: Any, h: Tensor, p: float) -> Tensor:  # type: ignore[override]
        h = h.contiguous()
        ctx.threshold, ctx.scale = _threshold_scale(p)
        ctx.seed = _draw_seed()
        ctx.save_for_backward(h)
        return _scan_cpu.kernel_ops().gelu_dropout_fwd(h, ctx.seed, ctx.threshold, ctx.scale)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        (h,) = ctx.saved_tensors
        dh = _scan_cpu.kernel_ops().gelu_dropout_bwd(
            grad.contiguous(), h, ctx.seed, ctx.threshold, ctx.scale
        )
        return dh, None


def _check(x: object, p: float, owner: str) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(
            f"{owner}: x must be a floating torch.Tensor, got {getattr(x, 'dtype', type(x))}"
        )
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{owner}: p must be in [0, 1), got {p}")


def _choose(op: str, x: Tensor, backend: str) -> str:
    unfit = (
        {}
        if x.dtype in (torch.float32, torch.float64)
        else {"cpu": f"dtype {x.dtype} (needs fp32/fp64)"}
    )
    return resolve_backend(op, backend, x.device, unfit)


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
    _check(x, p, "dropout")
    choice = _choose("dropout", x, backend)
    if choice in ("fused", "reference"):
        return F.dropout(x, p, training=True)
    if choice == "cpu":
        return _SeededDropout.apply(x, p)
    return _DropoutFunction.apply(x, p)


def gelu_dropout(x: Tensor, p: float, *, backend: str = "auto") -> Tensor:
    """Training-mode ``dropout(GELU(x), p)``, exact (erf) GELU as ``nn.GELU()``.

    The "cpu" backend computes it, and its backward, in one pass each with the masks of
    :func:`dropout` (same seed, same mask); the others call ``F.gelu`` then :func:`dropout`.

    Args:
        x (Tensor): any shape, floating: the pre-activation.
        p (float): drop probability in [0, 1).
        backend (str): "auto", "fused", "cpu", "chunked" or "reference". Default: "auto".

    Example::

        >>> x = torch.randn(1000)
        >>> y = gelu_dropout(x, 0.5)
        >>> bool(((y == 0) | torch.isclose(y, 2 * F.gelu(x), atol=1e-6)).all())
        True

    Returns:
        Tensor: x's shape and dtype.

    Raises:
        TypeError: x is not a floating tensor.
        ValueError: p outside [0, 1).
    """
    _check(x, p, "gelu_dropout")
    choice = _choose("gelu_dropout", x, backend)
    if choice == "cpu":
        return _GeluDropout.apply(x, p)
    return dropout(F.gelu(x), p, backend=choice)
