"""One step of the selective scan for streaming inference: O(1) per new event.

Shape letters: B batch, D channels, N state size. For one new step with input x::

    dt       = softplus(dt + dt_bias)                       (bias and softplus optional)
    state    = exp(dt * A) * state + (dt * x) * B           (in place)
    y        = sum_n state * C + D * x,   y *= silu(z)      (skip and gate optional)

Same semantics as mamba-ssm's ``selective_state_update``. Running it over the L steps of a
sequence from a zero state gives :func:`selective_scan_ref`'s outputs and last state.
Dispatch (through :func:`~torchrec_mamba.ops.registry.resolve_backend`, as for every op), when
no gradient is needed (neither kernel has a backward): mamba-ssm's Triton kernel
on CUDA when importable and the inputs are not fp64; on CPU, the compiled one-pass kernel of
:mod:`._scan_cpu` when every tensor is fp32 (or every one fp64). Otherwise PyTorch, which
accumulates in fp32 (fp64 for fp64 input).
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from torchrec_mamba.ops import _scan_cpu
from torchrec_mamba.ops.registry import resolve_backend
from torchrec_mamba.ops.selective_scan import accumulate_dtype

logger = logging.getLogger(__name__)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_OP = "selective_state_update"


def check_state_update_args(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    dt_bias: Tensor | None,
) -> None:
    """Validate :func:`selective_state_update` arguments; raise a clear TypeError / ValueError.

    Raises:
        TypeError: a non-tensor, a non-floating dtype, or dtypes that do not fit together.
        ValueError: a shape that does not fit, or tensors on different devices.
    """
    named = {"state": state, "x": x, "dt": dt, "A": A, "B": B, "C": C}
    optional = {"D": D, "z": z, "dt_bias": dt_bias}
    given: dict[str, Tensor] = {**named, **{k: v for k, v in optional.items() if v is not None}}
    for name, t in given.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in _FLOAT_DTYPES:
            raise TypeError(
                f"{_OP}: {name} must be a floating tensor (fp16/bf16/fp32/fp64), got {t.dtype}"
            )
    if x.dim() != 2:
        raise ValueError(f"{_OP}: x must be (B, D), one step, got shape {tuple(x.shape)}")
    batch, dim = x.shape
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"{_OP}: A must be (D={dim}, N), got shape {tuple(A.shape)}")
    nstate = A.shape[1]
    expected = {
        "state": ("(B, D, N)", (batch, dim, nstate)),
        "dt": ("(B, D)", (batch, dim)),
        "B": ("(B, N)", (batch, nstate)),
        "C": ("(B, N)", (batch, nstate)),
        "z": ("(B, D)", (batch, dim)),
        "D": ("(D,)", (dim,)),
        "dt_bias": ("(D,)", (dim,)),
    }
    for name, (letters, shape) in expected.items():
        got = given.get(name)
        if got is not None and tuple(got.shape) != shape:
            raise ValueError(
                f"{_OP}: {name} must be {letters} = {shape} to match x {tuple(x.shape)} and "
                f"A {tuple(A.shape)}, got shape {tuple(got.shape)}"
            )
    for name in ("dt", "B", "C", "z"):
        got = given.get(name)
        if got is not None and got.dtype != x.dtype:
            raise TypeError(
                f"{_OP}: {name} has dtype {got.dtype} but x has {x.dtype}; x, dt, B, C and z must share one dtype"
            )
    for name in ("A", "D", "dt_bias"):
        got = given.get(name)
        if got is not None and got.dtype not in (x.dtype, torch.float32):
            raise TypeError(
                f"{_OP}: {name} has dtype {got.dtype}; weights must be float32 or x's dtype {x.dtype}"
            )
    acc = accumulate_dtype(x.dtype)
    if state.dtype not in (x.dtype, acc):
        raise TypeError(
            f"{_OP}: state has dtype {state.dtype}; it must be {acc} (the accumulate dtype) or x's dtype {x.dtype}"
        )
    for name, t in given.items():
        if t.device != x.device:
            raise ValueError(
                f"{_OP}: {name} is on {t.device} but x is on {x.device}; move all to one device"
            )


def _unfit(x: Tensor, tensors: list[Tensor]) -> dict[str, str]:
    """Why the fused (Triton) and cpu kernels cannot run these tensors, for the registry."""
    unfit: dict[str, list[str]] = {"fused": [], "cpu": []}
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        for reasons in unfit.values():  # neither kernel has a backward
            reasons.append("a gradient is needed and the kernel has no backward")
    if any(t.dtype == torch.float64 for t in tensors):
        unfit["fused"].append("fp64 tensors")
    if x.dtype not in (torch.float32, torch.float64) or any(t.dtype != x.dtype for t in tensors):
        unfit["cpu"].append("needs fp32 or fp64 tensors of one dtype")
    if not tensors[0].is_contiguous():
        unfit["cpu"].append("a non-contiguous state")
    return {k: ", ".join(v) for k, v in unfit.items() if v}


def _step(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    dt_bias: Tensor | None,
    dt_softplus: bool,
) -> Tensor:
    """The PyTorch step shared by the reference and the fallback (they are the same math)."""
    acc = accumulate_dtype(x.dtype)
    x_, dt_ = x.to(acc), dt.to(acc)  # (B, D)
    if dt_bias is not None:
        dt_ = dt_ + dt_bias.to(acc)
    if dt_softplus:
        dt_ = F.softplus(dt_)
    # A copy of the old state, so the in-place write below cannot corrupt saved autograd inputs.
    old = state.to(acc, copy=True)  # (B, D, N)
    decay = torch.exp(dt_[:, :, None] * A.to(acc))  # (B, D, N)
    new = decay * old + (dt_ * x_)[:, :, None] * B.to(acc)[:, None, :]  # (B, D, N)
    state.copy_(new)  # autograd-aware, so gradients can flow across steps
    y = torch.einsum("bdn,bn->bd", new, C.to(acc))  # (B, D) from the unrounded new state
    if D is not None:
        y = y + x_ * D.to(acc)
    if z is not None:
        y = y * F.silu(z.to(acc))
    return y.to(x.dtype)


def selective_state_update_ref(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
) -> Tensor:
    """Readable one-step selective scan in pure PyTorch; updates ``state`` in place.

    The oracle for :func:`selective_state_update`; never calls the Triton kernel.

    Args:
        state (Tensor): (B, D, N) SSM state, fp32 (fp64 for fp64 input) or x's dtype.
        x (Tensor): (B, D) input of this step.
        dt (Tensor): (B, D) time step before ``dt_bias`` and softplus.
        A (Tensor): (D, N) state matrix.
        B (Tensor): (B, N) input matrix of this step.
        C (Tensor): (B, N) output matrix of this step.
        D (Tensor, optional): (D,) skip connection. Default: None.
        z (Tensor, optional): (B, D) gate, applied as ``y * silu(z)``. Default: None.
        dt_bias (Tensor, optional): (D,) added to dt. Default: None.
        dt_softplus (bool): apply softplus to dt (after the bias). Default: False.

    Example::

        >>> state = torch.zeros(1, 1, 1); A = torch.tensor([[-1.0]])
        >>> one = torch.ones(1, 1)
        >>> selective_state_update_ref(state, one, one, A, one, one).item()
        1.0
        >>> round(selective_state_update_ref(state, one, one, A, one, one).item(), 4)  # e^-1 + 1
        1.3679

    Returns:
        Tensor: (B, D) output of this step, in x's dtype.
    """
    check_state_update_args(state, x, dt, A, B, C, D, z, dt_bias)
    return _step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)


def selective_state_update(
    state: Tensor,
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    dt_bias: Tensor | None = None,
    dt_softplus: bool = False,
    *,
    backend: str = "auto",
) -> Tensor:
    """One selective-scan step for streaming inference; updates ``state`` in place.

    Same semantics as mamba-ssm's ``selective_state_update``: stepping over a sequence from a
    zero state reproduces ``selective_scan(..., return_last_state=True)``.

    Args:
        state (Tensor): (B, D, N) SSM state, fp32 (fp64 for fp64 input) or x's dtype.
        x (Tensor): (B, D) input of this step.
        dt (Tensor): (B, D) time step before ``dt_bias`` and softplus.
        A (Tensor): (D, N) state matrix.
        B (Tensor): (B, N) input matrix of this step.
        C (Tensor): (B, N) output matrix of this step.
        D (Tensor, optional): (D,) skip connection. Default: None.
        z (Tensor, optional): (B, D) gate, applied as ``y * silu(z)``. Default: None.
        dt_bias (Tensor, optional): (D,) added to dt. Default: None.
        dt_softplus (bool): apply softplus to dt (after the bias). Default: False.
        backend (str): "auto", "fused", "cpu", "chunked" or "reference" ("chunked" and
            "reference" are the same PyTorch step); "fused" and "cpu" have no backward, so
            "auto" skips them when a gradient is needed. Default: "auto".

    Example::

        >>> from torchrec_mamba.ops.selective_scan import selective_scan_ref
        >>> u = torch.randn(2, 4, 5); delta = torch.rand(2, 4, 5)
        >>> A = -torch.rand(4, 3); B = torch.randn(2, 3, 5); C = torch.randn(2, 3, 5)
        >>> state = torch.zeros(2, 4, 3)
        >>> ys = [selective_state_update(state, u[..., t], delta[..., t], A, B[..., t], C[..., t])
        ...       for t in range(5)]
        >>> y_ref, h_ref = selective_scan_ref(u, delta, A, B, C, return_last_state=True)
        >>> torch.allclose(torch.stack(ys, -1), y_ref, atol=1e-5), torch.allclose(state, h_ref, atol=1e-5)
        (True, True)

    Returns:
        Tensor: (B, D) output of this step, in x's dtype.
    """
    check_state_update_args(state, x, dt, A, B, C, D, z, dt_bias)
    tensors = [t for t in (state, x, dt, A, B, C, D, z, dt_bias) if t is not None]
    choice = resolve_backend("selective_state_update", backend, x.device, _unfit(x, tensors))
    if choice == "fused":  # pragma: no cover - CUDA only
        from torchrec_mamba.ops import _fused

        return _fused.selective_state_update_fn(
            state, x, dt, A, B, C, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus
        )
    if choice == "cpu":
        # One fused pass over the state; the other tensors are small (B, D), (B, N) or (D, N).
        return _scan_cpu.kernel_ops().selective_state_update_cpu(
            state,
            x.contiguous(),
            dt.contiguous(),
            A.contiguous(),
            B.contiguous(),
            C.contiguous(),
            None if D is None else D.contiguous(),
            None if z is None else z.contiguous(),
            None if dt_bias is None else dt_bias.contiguous(),
            dt_softplus,
        )
    # "chunked" and "reference" are the same PyTorch step.
    return _step(state, x, dt, A, B, C, D, z, dt_bias, dt_softplus)
