"""Depthwise causal conv1d (Mamba's short convolution) and its one-step update.

Shape letters: B batch, D channels, L sequence length, W kernel width.

Position ``t`` of the output sees inputs ``t - W + 1 .. t`` of its own channel only::

    y[b, d, t] = act(bias[d] + sum_k weight[d, k] * x[b, d, t - (W - 1) + k])   (x[.., < 0] = 0)

Dispatch (through :func:`~torchrec_mamba.ops.registry.resolve_backend`, as for every op):
causal-conv1d's CUDA kernels when importable, on CUDA, and the dtypes fit them
(fp16/bf16/fp32, weight in x's dtype, 2 <= W <= 4); on CPU with fp32 or fp64 tensors of one
dtype, the compiled kernel of :mod:`._scan_cpu` (a fused conv + SiLU forward and a hand-written
backward that recomputes the pre-activation; about 3x faster than ``F.conv1d`` at Mamba's
shapes); otherwise PyTorch, which computes in fp32 (fp64 for fp64 input) and returns x's dtype.
Weights may be fp32 master weights for half inputs.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from torchrec_mamba.ops import _scan_cpu
from torchrec_mamba.ops.registry import resolve_backend
from torchrec_mamba.ops.selective_scan import accumulate_dtype

logger = logging.getLogger(__name__)

ACTIVATIONS: tuple[str | None, ...] = (None, "silu", "swish")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_KERNEL_WIDTHS = (2, 3, 4)


def _check_tensor(op: str, name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}"
        )
    return t


def _check_weights(op: str, x: Tensor, weight: object, bias: object, activation: object) -> int:
    """Validate weight (D, W), bias (D,) and activation against x (B, D, ...); return W."""
    dim = x.shape[1]
    w = _check_tensor(op, "weight", weight)
    if w.dim() != 2 or w.shape[0] != dim or w.shape[1] < 1:
        raise ValueError(
            f"{op}: weight must be (D={dim}, W) with W >= 1, got shape {tuple(w.shape)}"
        )
    named = {"weight": w}
    if bias is not None:
        b = _check_tensor(op, "bias", bias)
        if tuple(b.shape) != (dim,):
            raise ValueError(f"{op}: bias must be (D,) = ({dim},), got shape {tuple(b.shape)}")
        named["bias"] = b
    for name, t in named.items():
        if t.dtype not in (x.dtype, torch.float32):
            raise TypeError(
                f"{op}: {name} has dtype {t.dtype}; weights must be float32 or x's dtype {x.dtype}"
            )
        if t.device != x.device:
            raise ValueError(
                f"{op}: {name} is on {t.device} but x is on {x.device}; move all to one device"
            )
    if activation not in ACTIVATIONS:
        raise ValueError(f"{op}: unknown activation {activation!r}; choose one of {ACTIVATIONS}")
    return w.shape[1]


def check_conv_args(x: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None) -> None:
    """Validate :func:`causal_conv1d` arguments; raise a clear TypeError / ValueError."""
    _check_tensor("causal_conv1d", "x", x)
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d: x must be (B, D, L), got shape {tuple(x.shape)}")
    if x.shape[-1] == 0:
        raise ValueError("causal_conv1d: sequence length L must be >= 1, got L=0")
    _check_weights("causal_conv1d", x, weight, bias, activation)


def check_conv_update_args(
    x: Tensor, conv_state: Tensor, weight: Tensor, bias: Tensor | None, activation: str | None
) -> None:
    """Validate :func:`causal_conv1d_update` arguments; raise a clear TypeError / ValueError."""
    op = "causal_conv1d_update"
    _check_tensor(op, "x", x)
    if x.dim() != 2:
        raise ValueError(f"{op}: x must be (B, D), one step, got shape {tuple(x.shape)}")
    width = _check_weights(op, x, weight, bias, activation)
    _check_tensor(op, "conv_state", conv_state)
    expected = (x.shape[0], x.shape[1], width)
    if tuple(conv_state.shape) != expected:
        raise ValueError(
            f"{op}: conv_state must be (B, D, W) = {expected} to match x {tuple(x.shape)} and weight "
            f"{tuple(weight.shape)}, got shape {tuple(conv_state.shape)}"
        )
    if conv_state.dtype not in (x.dtype, accumulate_dtype(x.dtype)):
        raise TypeError(
            f"{op}: conv_state has dtype {conv_state.dtype}; it must be x's dtype {x.dtype} or "
            f"{accumulate_dtype(x.dtype)} so the cached inputs are stored without loss"
        )
    if conv_state.device != x.device:
        raise ValueError(f"{op}: conv_state is on {conv_state.device} but x is on {x.device}")


def _activate(y: Tensor, activation: str | None) -> Tensor:
    return F.silu(y) if activation in ("silu", "swish") else y


class _CausalConv1dCLCPU(torch.autograd.Function):
    """The compiled CPU conv on channels-last (B, L, D) memory, vectorised over channels."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x_cl: Tensor, weight: Tensor, bias: Tensor | None, silu: bool
    ) -> Tensor:
        ctx.save_for_backward(x_cl, weight, bias)
        ctx.silu = silu
        return _scan_cpu.kernel_ops().causal_conv1d_cl_fwd(x_cl, weight, bias, silu)  # (B, L, D)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x_cl, weight, bias = ctx.saved_tensors
        dx, dw, db = _scan_cpu.kernel_ops().causal_conv1d_cl_bwd(
            x_cl, weight, bias, ctx.silu, dy.contiguous()
        )
        need = ctx.needs_input_grad
        return (
            dx if need[0] else None,
            dw if need[1] else None,
            db if bias is not None and need[2] else None,
            None,
        )


def _channels_last(x: Tensor) -> bool:
    """Whether x (B, D, L) is a view of contiguous (B, L, D) memory (and not also contiguous)."""
    return x.shape[1] > 1 and x.shape[2] > 1 and x.transpose(1, 2).is_contiguous()


def _unfit(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    conv_state: Tensor | None = None,
    needs_grad: bool = False,
) -> dict[str, str]:
    """Why the fused (CUDA) and cpu kernels cannot run these tensors, for the registry."""
    one_dtype = all(t.dtype == x.dtype for t in (weight, bias, conv_state) if t is not None)
    unfit: dict[str, str] = {}
    fused = []
    if x.dtype not in _KERNEL_DTYPES:
        fused.append(f"x dtype {x.dtype} (needs fp16/bf16/fp32)")
    if weight.shape[1] not in _KERNEL_WIDTHS:
        fused.append(f"width W={weight.shape[1]} (needs 2 <= W <= 4)")
    cpu = (
        []
        if x.dtype in (torch.float32, torch.float64)
        else [f"x dtype {x.dtype} (needs fp32/fp64)"]
    )
    if not one_dtype:
        fused.append("weights, bias or conv_state of another dtype than x")
        cpu.append("weights, bias or conv_state of another dtype than x")
    if needs_grad:  # the one-step kernels have no backward
        fused.append("a gradient is needed and the kernel has no backward")
        cpu.append("a gradient is needed and the kernel has no backward")
    if conv_state is not None and not conv_state.is_contiguous():
        cpu.append("a non-contiguous conv_state")
    if fused:
        unfit["fused"] = ", ".join(fused)
    if cpu:
        unfit["cpu"] = ", ".join(cpu)
    return unfit


class _CausalConv1dCPU(torch.autograd.Function):
    """The compiled CPU conv: fused conv + SiLU forward, backward recomputing the pre-activation."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, silu: bool
    ) -> Tensor:
        ctx.save_for_backward(x, weight, bias)
        ctx.silu = silu
        return _scan_cpu.kernel_ops().causal_conv1d_fwd(x, weight, bias, silu)  # (B, D, L)

    @staticmethod
    @once_differentiable  # the C++ backward builds no graph: double backward raises, never lies
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight, bias = ctx.saved_tensors
        dx, dw, db = _scan_cpu.kernel_ops().causal_conv1d_bwd(
            x, weight, bias, ctx.silu, dy.contiguous()
        )
        need = ctx.needs_input_grad
        return (
            dx if need[0] else None,
            dw if need[1] else None,
            db if bias is not None and need[2] else None,
            None,
        )


def causal_conv1d_ref(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, activation: str | None = None
) -> Tensor:
    """Readable causal conv1d: an explicit sum over the W taps, fp32 (fp64) accumulate.

    The oracle for :func:`causal_conv1d`; never calls a fast kernel or ``F.conv1d``.

    Args:
        x (Tensor): (B, D, L) input.
        weight (Tensor): (D, W) per-channel taps; ``weight[:, -1]`` multiplies the current step.
        bias (Tensor, optional): (D,) bias. Default: None.
        activation (str, optional): None, "silu" or "swish" (the same). Default: None.

    Example::

        >>> x = torch.arange(4.0).view(1, 1, 4); w = torch.tensor([[1.0, 10.0]])
        >>> causal_conv1d_ref(x, w).tolist()
        [[[0.0, 10.0, 21.0, 32.0]]]

    Returns:
        Tensor: (B, D, L) in x's dtype.
    """
    check_conv_args(x, weight, bias, activation)
    acc = accumulate_dtype(x.dtype)
    width, length = weight.shape[1], x.shape[-1]
    x_pad = F.pad(x.to(acc), (width - 1, 0))  # (B, D, W - 1 + L)
    w = weight.to(acc)
    y = torch.zeros_like(x_pad[..., width - 1 :])  # (B, D, L)
    for k in range(width):
        y = y + w[:, k, None] * x_pad[..., k : k + length]
    if bias is not None:
        y = y + bias.to(acc)[:, None]
    return _activate(y, activation).to(x.dtype)


def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """Depthwise causal conv1d with an optional SiLU, same semantics as ``causal_conv1d_fn``.

    Args:
        x (Tensor): (B, D, L) input.
        weight (Tensor): (D, W) per-channel taps; ``weight[:, -1]`` multiplies the current step.
        bias (Tensor, optional): (D,) bias. Default: None.
        activation (str, optional): None, "silu" or "swish" (the same). Default: None.
        backend (str): "auto", "fused", "cpu", "chunked" (``F.conv1d``) or "reference"; see
            :mod:`~torchrec_mamba.ops.registry`. Default: "auto".

    Example::

        >>> x = torch.randn(2, 3, 5); w = torch.randn(3, 4); b = torch.randn(3)
        >>> y = causal_conv1d(x, w, b, activation="silu")
        >>> y.shape, torch.allclose(y, causal_conv1d_ref(x, w, b, "silu"), atol=1e-6)
        (torch.Size([2, 3, 5]), True)

    Returns:
        Tensor: (B, D, L) in x's dtype.
    """
    check_conv_args(x, weight, bias, activation)
    choice = resolve_backend("causal_conv1d", backend, x.device, _unfit(x, weight, bias))
    if choice == "reference":
        return causal_conv1d_ref(x, weight, bias, activation)
    if choice == "fused":  # pragma: no cover - CUDA only
        from torchrec_mamba.ops import _fused

        if x.stride(2) != 1 and x.stride(1) != 1:
            x = x.contiguous()
        return _fused.causal_conv1d_fn(x, weight, bias, activation=activation)
    if choice == "cpu":
        silu = activation in ("silu", "swish")
        if _channels_last(x):  # the layout of the Mamba block's projections: no transposes
            b = None if bias is None else bias.contiguous()
            y_cl = _CausalConv1dCLCPU.apply(x.transpose(1, 2), weight.contiguous(), b, silu)
            return y_cl.transpose(1, 2)  # (B, D, L) view of (B, L, D) memory
        return _CausalConv1dCPU.apply(
            x.contiguous(),
            weight.contiguous(),
            None if bias is None else bias.contiguous(),
            activation in ("silu", "swish"),
        )
    acc = accumulate_dtype(x.dtype)
    width = weight.shape[1]
    x_ = x.to(acc)  # (B, D, L)
    w = weight.to(acc)[:, None, :]  # (D, 1, W)
    b = None if bias is None else bias.to(acc)
    y = F.conv1d(F.pad(x_, (width - 1, 0)), w, b, groups=x.shape[1])  # (B, D, L)
    return _activate(y, activation).to(x.dtype)


def causal_conv1d_update_ref(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
) -> Tensor:
    """Readable one-step causal conv1d; shifts ``conv_state`` in place. Oracle of the fast one.

    Args:
        x (Tensor): (B, D) the new step's input.
        conv_state (Tensor): (B, D, W) the last W inputs, oldest first; updated in place so that
            it ends with ``x``.
        weight (Tensor): (D, W) per-channel taps.
        bias (Tensor, optional): (D,) bias. Default: None.
        activation (str, optional): None, "silu" or "swish". Default: None.

    Example::

        >>> state = torch.zeros(1, 1, 2); w = torch.tensor([[1.0, 10.0]])
        >>> [causal_conv1d_update_ref(torch.tensor([[v]]), state, w).item() for v in (0.0, 1.0, 2.0)]
        [0.0, 10.0, 21.0]
        >>> state.tolist()
        [[[1.0, 2.0]]]

    Returns:
        Tensor: (B, D) output for this step, in x's dtype.
    """
    check_conv_update_args(x, conv_state, weight, bias, activation)
    acc = accumulate_dtype(x.dtype)
    window = torch.cat([conv_state[..., 1:].to(acc), x.to(acc)[..., None]], dim=-1)  # (B, D, W)
    conv_state.copy_(window)  # autograd-aware, so gradients can flow across steps
    w = weight.to(acc)
    y = torch.zeros_like(window[..., 0])  # (B, D)
    for k in range(weight.shape[1]):
        y = y + w[:, k] * window[..., k]
    if bias is not None:
        y = y + bias.to(acc)
    return _activate(y, activation).to(x.dtype)


def causal_conv1d_update(
    x: Tensor,
    conv_state: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: str | None = None,
    *,
    backend: str = "auto",
) -> Tensor:
    """One step of :func:`causal_conv1d` for streaming inference; updates ``conv_state`` in place.

    Running a prefix through :func:`causal_conv1d`, keeping its last W inputs as ``conv_state``,
    then calling this once per new step gives the same outputs as the full convolution.
    When no gradient is needed it uses causal-conv1d's CUDA kernel on CUDA, and on CPU the
    compiled one-pass kernel for fp32/fp64 (contiguous conv_state of x's dtype); neither has
    a backward.

    Args:
        x (Tensor): (B, D) the new step's input.
        conv_state (Tensor): (B, D, W) the last W inputs, oldest first (zeros for a new
            sequence); in place it drops the oldest and appends ``x``. x's dtype or fp32.
        weight (Tensor): (D, W) per-channel taps.
        bias (Tensor, optional): (D,) bias. Default: None.
        activation (str, optional): None, "silu" or "swish". Default: None.
        backend (str): "auto", "fused", "cpu", "chunked" or "reference"; "fused" and "cpu"
            have no backward, so "auto" skips them when a gradient is needed. Default: "auto".

    Example::

        >>> x = torch.randn(2, 3, 6); w = torch.randn(3, 4)
        >>> state = torch.zeros(2, 3, 4)
        >>> steps = torch.stack([causal_conv1d_update(x[..., t], state, w) for t in range(6)], -1)
        >>> torch.allclose(steps, causal_conv1d(x, w), atol=1e-6)
        True

    Returns:
        Tensor: (B, D) output for this step, in x's dtype.
    """
    check_conv_update_args(x, conv_state, weight, bias, activation)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, conv_state, weight, bias)
    )
    unfit = _unfit(x, weight, bias, conv_state, needs_grad)
    choice = resolve_backend("causal_conv1d_update", backend, x.device, unfit)
    if choice == "reference":
        return causal_conv1d_update_ref(x, conv_state, weight, bias, activation)
    if choice == "fused":  # pragma: no cover - CUDA only
        from torchrec_mamba.ops import _fused

        return _fused.causal_conv1d_update_fn(x, conv_state, weight, bias, activation)
    if choice == "cpu":
        return _scan_cpu.kernel_ops().causal_conv1d_update_cpu(
            x.contiguous(),
            conv_state,
            weight.contiguous(),
            None if bias is None else bias.contiguous(),
            activation in ("silu", "swish"),
        )
    acc = accumulate_dtype(x.dtype)
    window = torch.cat([conv_state[..., 1:].to(acc), x.to(acc)[..., None]], dim=-1)  # (B, D, W)
    conv_state.copy_(window)  # autograd-aware, so gradients can flow across steps
    y = torch.einsum("bdw,dw->bd", window, weight.to(acc))  # (B, D)
    if bias is not None:
        y = y + bias.to(acc)
    return _activate(y, activation).to(x.dtype)
