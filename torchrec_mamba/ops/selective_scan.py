"""Selective scan (the S6 recurrence of Mamba) with one backend dispatcher.

Shape letters, used in every docstring of this package:
    B batch, D channels (model width inside the mixer), L sequence length, N state size.

The recurrence, for every batch row b, channel d and state index n::

    dt[b, d, t]  = softplus(delta[b, d, t] + delta_bias[d])        (bias and softplus optional)
    h[b, d, n]   = exp(dt * A[d, n]) * h[b, d, n] + dt * B[b, n, t] * u[b, d, t]
    y[b, d, t]   = sum_n C[b, n, t] * h[b, d, n] + D[d] * u[b, d, t]
    y[b, d, t]  *= silu(z[b, d, t])                                  (gate optional)

Backends (chosen by :func:`~torchrec_mamba.ops.registry.resolve_backend`, as for every op):
    "reference": a sequential loop in pure PyTorch, fp32 (or fp64) accumulate. The oracle in tests.
    "cpu":       our compiled C++ kernel with a hand-written backward (the CPU default).
    "chunked":   a pure-PyTorch chunked parallel scan, for any device.
    "fused":     mamba-ssm's CUDA kernel, when importable and the tensors are on CUDA.
    "auto":      fused on CUDA when available, cpu on CPU when it builds, otherwise chunked.
"""

from __future__ import annotations

import logging
from typing import Literal, overload

import torch
import torch.nn.functional as F
from torch import Tensor

from torchrec_mamba.ops.registry import BACKENDS, resolve_backend

logger = logging.getLogger(__name__)

__all__ = [
    "BACKENDS",
    "accumulate_dtype",
    "resolve_backend",
    "selective_scan",
    "selective_scan_ref",
]

Backend = Literal["auto", "fused", "cpu", "chunked", "reference"]

_ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype every backend accumulates the state in: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_scan_args(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_proj: Tensor | None = None,
) -> None:
    """Validate shapes, dtypes and devices of selective-scan arguments; raise a clear error.

    Args:
        u (Tensor): (B, D, L) input.
        delta (Tensor): (B, D, L) time step before bias and softplus.
        A (Tensor): (D, N) state matrix (negative for a stable decay).
        B (Tensor): (B, N, L) input-dependent input matrix.
        C (Tensor): (B, N, L) input-dependent output matrix.
        D (Tensor, optional): (D,) skip connection.
        z (Tensor, optional): (B, D, L) gate.
        delta_bias (Tensor, optional): (D,) bias added to delta.
        delta_proj (Tensor, optional): (D, R) dt_proj weight; delta is then (B, R, L).

    Raises:
        TypeError: a non-tensor argument or a non-floating / mismatched dtype.
        ValueError: a shape that does not fit, or tensors on different devices.
    """
    named = {"u": u, "delta": delta, "A": A, "B": B, "C": C}
    optional = {"D": D, "z": z, "delta_bias": delta_bias, "delta_proj": delta_proj}
    for name, t in {**named, **optional}.items():
        if t is None and name in optional:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(
                f"selective_scan: {name} must be a torch.Tensor, got {type(t).__name__}"
            )
        if t.dtype not in _ACTIVATION_DTYPES:
            raise TypeError(
                f"selective_scan: {name} must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}"
            )
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (B, D, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if length == 0:
        raise ValueError("selective_scan: sequence length L must be >= 1, got L=0")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"selective_scan: A must be (D={dim}, N), got shape {tuple(A.shape)}")
    nstate = A.shape[1]
    if delta_proj is not None and (delta_proj.dim() != 2 or delta_proj.shape[0] != dim
                                   or delta_proj.shape[1] < 1):
        raise ValueError(
            f"selective_scan: delta_proj must be (D={dim}, R) with R >= 1, got shape "
            f"{tuple(delta_proj.shape)}"
        )
    rank = None if delta_proj is None else delta_proj.shape[1]
    expected = {
        "delta": (batch, dim if rank is None else rank, length),
        "B": (batch, nstate, length),
        "C": (batch, nstate, length),
        "z": (batch, dim, length),
        "D": (dim,),
        "delta_bias": (dim,),
    }
    for name, shape in expected.items():
        t = named.get(name, optional.get(name))
        if t is not None and tuple(t.shape) != shape:
            letters = {
                "delta": "(B, D, L)" if rank is None else "(B, R, L) with delta_proj (D, R)",
                "B": "(B, N, L)",
                "C": "(B, N, L)",
                "z": "(B, D, L)",
                "D": "(D,)",
                "delta_bias": "(D,)",
            }[name]
            raise ValueError(
                f"selective_scan: {name} must be {letters} = {shape} to match u {tuple(u.shape)} "
                f"and A {tuple(A.shape)}, got shape {tuple(t.shape)}"
            )
    # Activations share one dtype; weights (A, D, delta_bias) may be fp32 master weights.
    for name in ("delta", "B", "C", "z"):
        t = named.get(name, optional.get(name))
        if t is not None and t.dtype != u.dtype:
            raise TypeError(
                f"selective_scan: {name} has dtype {t.dtype} but u has {u.dtype}; "
                "u, delta, B, C and z must share one dtype"
            )
    for name in ("A", "D", "delta_bias", "delta_proj"):
        t = named.get(name, optional.get(name))
        if t is not None and t.dtype not in (u.dtype, torch.float32):
            raise TypeError(
                f"selective_scan: {name} has dtype {t.dtype}; weights must be float32 or u's dtype {u.dtype}"
            )
    for name, t in {**named, **optional}.items():
        if t is not None and t.device != u.device:
            raise ValueError(
                f"selective_scan: {name} is on {t.device} but u is on {u.device}; move all to one device"
            )


def selective_scan_ref(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Sequential selective scan: readable, pure PyTorch, fp32 (fp64 for fp64 inputs) accumulate.

    Same signature and semantics as :func:`selective_scan`; never calls a fast kernel.

    Args:
        u (Tensor): (B, D, L) input.
        delta (Tensor): (B, D, L) time step before ``delta_bias`` and softplus.
        A (Tensor): (D, N) state matrix.
        B (Tensor): (B, N, L) input matrix.
        C (Tensor): (B, N, L) output matrix.
        D (Tensor, optional): (D,) skip connection. Default: None.
        z (Tensor, optional): (B, D, L) gate, applied as ``y * silu(z)``. Default: None.
        delta_bias (Tensor, optional): (D,) added to delta. Default: None.
        delta_softplus (bool): apply softplus to delta (after the bias). Default: False.
        return_last_state (bool): also return the state after the last step. Default: False.

    Example::

        >>> u = torch.randn(2, 4, 5); delta = torch.rand(2, 4, 5)
        >>> A = -torch.rand(4, 3); B = torch.randn(2, 3, 5); C = torch.randn(2, 3, 5)
        >>> y, h = selective_scan_ref(u, delta, A, B, C, return_last_state=True)
        >>> y.shape, h.shape
        (torch.Size([2, 4, 5]), torch.Size([2, 4, 3]))

    Returns:
        Tensor: y, (B, D, L), in u's dtype; with ``return_last_state``, also the last state
        (B, D, N) in the accumulate dtype (fp32, or fp64 for fp64 inputs).
    """
    acc = accumulate_dtype(u.dtype)
    u_, dt, A_, B_, C_ = (t.to(acc) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        dt = dt + delta_bias.to(acc)[:, None]  # (B, D, L)
    if delta_softplus:
        dt = F.softplus(dt)
    batch, dim, length = u.shape
    h = u_.new_zeros(batch, dim, A.shape[1])  # (B, D, N)
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, :, t, None] * A_)  # (B, D, N)
        drive = (dt[:, :, t] * u_[:, :, t])[:, :, None] * B_[:, None, :, t]  # (B, D, N)
        h = decay * h + drive
        ys.append(torch.einsum("bdn,bn->bd", h, C_[:, :, t]))  # (B, D)
    y = torch.stack(ys, dim=-1)  # (B, D, L)
    if D is not None:
        y = y + u_ * D.to(acc)[:, None]
    if z is not None:
        y = y * F.silu(z.to(acc))
    y = y.to(u.dtype)
    return (y, h) if return_last_state else y


@overload
def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = ...,
    z: Tensor | None = ...,
    delta_bias: Tensor | None = ...,
    delta_softplus: bool = ...,
    return_last_state: Literal[False] = ...,
    backend: str = ...,
    delta_proj: Tensor | None = ...,
) -> Tensor: ...


@overload
def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = ...,
    z: Tensor | None = ...,
    delta_bias: Tensor | None = ...,
    delta_softplus: bool = ...,
    *,
    return_last_state: Literal[True],
    backend: str = ...,
    delta_proj: Tensor | None = ...,
) -> tuple[Tensor, Tensor]: ...


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    backend: str = "auto",
    delta_proj: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan with backend dispatch; same semantics as ``mamba_ssm.selective_scan_fn``.

    Args:
        u (Tensor): (B, D, L) input.
        delta (Tensor): (B, D, L) time step before ``delta_bias`` and softplus.
        A (Tensor): (D, N) state matrix.
        B (Tensor): (B, N, L) input matrix.
        C (Tensor): (B, N, L) output matrix.
        D (Tensor, optional): (D,) skip connection. Default: None.
        z (Tensor, optional): (B, D, L) gate, applied as ``y * silu(z)``. Default: None.
        delta_bias (Tensor, optional): (D,) added to delta. Default: None.
        delta_softplus (bool): apply softplus to delta (after the bias). Default: False.
        return_last_state (bool): also return the state after the last step. Default: False.
        backend (str): "auto", "fused", "cpu", "chunked" or "reference". Default: "auto".
        delta_proj (Tensor, optional): (D, R) weight of Mamba's ``dt_proj``. When given, delta
            is its (B, R, L) low-rank input and the time step is ``delta_proj @ delta`` (before
            ``delta_bias`` and softplus). The "cpu" backend fuses the product into the float32
            kernel, so the (B, D, L) time step and its gradient are never stored; the other
            backends (and float64) compute the product first. Default: None.

    Example::

        >>> u = torch.randn(2, 4, 5); delta = torch.rand(2, 4, 5)
        >>> A = -torch.rand(4, 3); B = torch.randn(2, 3, 5); C = torch.randn(2, 3, 5)
        >>> y = selective_scan(u, delta, A, B, C, backend="reference")
        >>> torch.allclose(y, selective_scan(u, delta, A, B, C, backend="chunked"), atol=1e-5)
        True

    Returns:
        Tensor: y, (B, D, L), in u's dtype; with ``return_last_state``, also the last state
        (B, D, N) in the accumulate dtype (fp32, or fp64 for fp64 inputs).
    """
    check_scan_args(u, delta, A, B, C, D, z, delta_bias, delta_proj)
    choice = resolve_backend("selective_scan", backend, u.device)
    if delta_proj is not None:
        if choice == "cpu" and u.dtype == torch.float32:
            from torchrec_mamba.ops import _scan_cpu

            return _scan_cpu.selective_scan(
                u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state,
                delta_proj=delta_proj,
            )  # fmt: skip
        # (B, R, L) -> (B, D, L) in channels-last memory, as a Mamba block's projections are.
        delta = F.linear(delta.transpose(1, 2), delta_proj.to(delta.dtype)).transpose(1, 2)
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if choice == "reference":
        return selective_scan_ref(*args)
    if choice == "fused":
        from torchrec_mamba.ops import _fused

        return _fused.selective_scan(*args)
    if choice == "cpu":
        from torchrec_mamba.ops import _scan_cpu

        return _scan_cpu.selective_scan(*args)
    from torchrec_mamba.ops import _scan_chunked

    return _scan_chunked.selective_scan(*args)
