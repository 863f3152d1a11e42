"""The Mamba (v1) selective-SSM mixer with a batched forward and a one-event ``step``.

Shape letters: B batch, L sequence length, D model width (``d_model``), E inner width
(``expand * d_model``), N state size (``d_state``), W conv width (``d_conv``), R ``dt_rank``.

Parameter names, shapes and initialisation follow ``mamba_ssm.modules.mamba_simple.Mamba``, so a
mamba-ssm ``Mamba`` state_dict loads with ``load_state_dict`` unchanged.
"""

from __future__ import annotations

import logging
import math
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torchrec_mamba.ops import (
    causal_conv1d,
    causal_conv1d_update,
    selective_scan,
    selective_state_update,
)

logger = logging.getLogger(__name__)

__all__ = ["MambaBlock", "MambaState", "check_lengths", "check_padded"]


class MambaState(NamedTuple):
    """Recurrent state of one :class:`MambaBlock` for a batch of sequences.

    Attributes:
        conv_state (Tensor): (B, E, W) the last W pre-convolution inputs, oldest first.
        ssm_state (Tensor): (B, E, N) the selective-SSM state.
    """

    conv_state: Tensor
    ssm_state: Tensor


def check_padded(x: object, d_model: int, owner: str) -> Tensor:
    """Check that ``x`` is a (B, L, D) floating tensor with D == ``d_model``; return it.

    Raises:
        TypeError: ``x`` is not a floating tensor.
        ValueError: ``x`` has the wrong rank or width.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{owner}: x must be a torch.Tensor (B, L, D), got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{owner}: x must be a floating tensor, got dtype {x.dtype}")
    if x.dim() != 3:
        raise ValueError(
            f"{owner}: x must be (B, L, D) with D={d_model}, got shape {tuple(x.shape)}"
        )
    if x.shape[-1] != d_model:
        raise ValueError(
            f"{owner}: x has width {x.shape[-1]} but d_model={d_model}; x shape {tuple(x.shape)}"
        )
    return x


def check_lengths(lengths: object, batch: int, length: int, owner: str) -> Tensor:
    """Check that ``lengths`` is a (B,) integer tensor with 0 <= lengths <= L; return it.

    Raises:
        TypeError: ``lengths`` is not an integer tensor.
        ValueError: wrong shape, or a value outside [0, L].
    """
    if not isinstance(lengths, Tensor):
        raise TypeError(
            f"{owner}: lengths must be a torch.Tensor of ints, got {type(lengths).__name__}"
        )
    if lengths.dtype.is_floating_point or lengths.dtype.is_complex or lengths.dtype == torch.bool:
        raise TypeError(f"{owner}: lengths must be an integer tensor, got dtype {lengths.dtype}")
    if tuple(lengths.shape) != (batch,):
        raise ValueError(
            f"{owner}: lengths must have shape (B,) = ({batch},), got shape {tuple(lengths.shape)}"
        )
    if batch > 0:
        lo, hi = int(lengths.min()), int(lengths.max())
        if lo < 0:
            raise ValueError(f"{owner}: lengths must be >= 0, got min(lengths)={lo}")
        if hi > length:
            raise ValueError(f"{owner}: lengths must be <= L={length}, got max(lengths)={hi}")
    return lengths


class _ThinLinear(torch.autograd.Function):
    """``x @ weight.T`` for a thin input (R = ``dt_rank`` columns, e.g. 4): dt_proj.

    PyTorch's backward computes the weight gradient as ``grad.T @ x``, an (E, B*L) @ (B*L, R)
    product with R = 4 output columns that runs about 8x slower on CPU than the same sums as
    ``(x.T @ grad).T``; this computes it that way (and reads x contiguous in the forward).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor) -> Tensor:  # type: ignore[override]
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # (B * L, R): small
        ctx.save_for_backward(x2, weight)
        ctx.shape = x.shape
        return (x2 @ weight.t()).view(*x.shape[:-1], weight.shape[0])  # (..., E)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:  # type: ignore[override]
        x2, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])  # (B * L, E)
        dx = (g2 @ weight).view(ctx.shape) if ctx.needs_input_grad[0] else None
        dw = (x2.t() @ g2).t() if ctx.needs_input_grad[1] else None  # (E, R)
        return dx, dw


class MambaBlock(nn.Module):
    """Mamba selective-SSM mixer: (B, L, D) -> (B, L, D), with an O(1)-per-event ``step``.

    in_proj -> (x, z); x -> causal depthwise conv -> SiLU -> x_proj -> (dt, B, C); dt -> dt_proj;
    y = selective_scan(x, softplus(dt + dt_bias), A=-exp(A_log), B, C, D, gate z) -> out_proj.

    Args:
        d_model (int): model width D.
        d_state (int): SSM state size N. Default: 32 (Mamba4Rec).
        d_conv (int): causal conv width W. Default: 4.
        expand (int): inner width E = expand * d_model. Default: 2.
        dt_rank (int | str): rank R of the dt projection; "auto" is ceil(d_model / 16).
            Default: "auto".
        dt_min (float): smallest initial time step. Default: 0.001.
        dt_max (float): largest initial time step. Default: 0.1.
        dt_init_floor (float): floor on the initial time step. Default: 1e-4.
        conv_bias (bool): bias in the depthwise conv. Default: True.
        bias (bool): bias in in_proj and out_proj. Default: False.
        backend (str): selective-scan backend, passed to :func:`~torchrec_mamba.ops.selective_scan`:
            "auto", "fused", "cpu", "chunked" or "reference". Default: "auto".
        device (torch.device, optional): parameter device ("meta" works). Default: None.
        dtype (torch.dtype, optional): parameter dtype. ``A_log`` and ``D`` stay fp32 (fp64 when
            dtype is fp64), as in mamba-ssm. Default: None.

    Example::

        >>> block = MambaBlock(d_model=16, d_state=4, backend="reference")
        >>> x = torch.randn(2, 5, 16)
        >>> y, states = block(x, lengths=torch.tensor([5, 3]), return_state=True)
        >>> y.shape, states.conv_state.shape, states.ssm_state.shape
        (torch.Size([2, 5, 16]), torch.Size([2, 32, 4]), torch.Size([2, 32, 4]))
        >>> y_t, _ = block.step(torch.randn(2, 16), states)
        >>> y_t.shape
        torch.Size([2, 16])
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 32,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | str = "auto",
        dt_min: float = 0.001,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        conv_bias: bool = True,
        bias: bool = False,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (
            ("d_model", d_model),
            ("d_state", d_state),
            ("d_conv", d_conv),
            ("expand", expand),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MambaBlock: {name} must be a positive int, got {value!r}")
        if dt_rank != "auto" and (
            not isinstance(dt_rank, int) or isinstance(dt_rank, bool) or dt_rank < 1
        ):
            raise ValueError(
                f"MambaBlock: dt_rank must be 'auto' or a positive int, got {dt_rank!r}"
            )
        if not 0 < dt_min <= dt_max:
            raise ValueError(
                f"MambaBlock: need 0 < dt_min <= dt_max, got dt_min={dt_min}, dt_max={dt_max}"
            )
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16) if dt_rank == "auto" else int(dt_rank)
        self.dt_min, self.dt_max, self.dt_init_floor = dt_min, dt_max, dt_init_floor
        self.backend = backend

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        # Same module and padding as mamba-ssm so its state_dict loads; forward uses causal_conv1d.
        self.conv1d = nn.Conv1d(
            self.d_inner,
            self.d_inner,
            kernel_size=d_conv,
            groups=self.d_inner,
            padding=d_conv - 1,
            bias=conv_bias,
            **factory,
        )
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
        # mamba-ssm keeps the SSM parameters in fp32 whatever the module dtype.
        ssm_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        self.A_log = nn.Parameter(
            torch.empty(self.d_inner, d_state, device=device, dtype=ssm_dtype)
        )
        self.D = nn.Parameter(torch.empty(self.d_inner, device=device, dtype=ssm_dtype))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)
        self.A_log._no_weight_decay = True  # type: ignore[attr-defined]
        self.D._no_weight_decay = True  # type: ignore[attr-defined]
        self.dt_proj.bias._no_weight_decay = True  # type: ignore[attr-defined]
        self.dt_proj.bias._no_reinit = True  # type: ignore[attr-defined]
        self._init_ssm_parameters()

    @torch.no_grad()
    def _init_ssm_parameters(self) -> None:
        """mamba-ssm's init of dt_proj, A_log and D (the Linear/Conv layers keep PyTorch's)."""
        std = self.dt_rank**-0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        device = self.dt_proj.bias.device
        log_lo, log_hi = math.log(self.dt_min), math.log(self.dt_max)
        dt = torch.exp(torch.rand(self.d_inner, device=device) * (log_hi - log_lo) + log_lo)  # (E,)
        dt = dt.clamp(min=self.dt_init_floor)
        inv_softplus_dt = dt + torch.log(-torch.expm1(-dt))  # softplus(inv_softplus_dt) == dt
        self.dt_proj.bias.copy_(inv_softplus_dt)
        a = torch.arange(1, self.d_state + 1, dtype=torch.float32, device=device)  # (N,)
        self.A_log.copy_(torch.log(a).expand(self.d_inner, -1))  # (E, N): A = -[1..N] per channel
        self.D.fill_(1.0)

    def reset_parameters(self) -> None:
        """Re-initialise every parameter as mamba-ssm does (used after meta-device construction)."""
        self.in_proj.reset_parameters()
        self.conv1d.reset_parameters()
        self.x_proj.reset_parameters()
        self.out_proj.reset_parameters()
        self.dt_proj.reset_parameters()
        self._init_ssm_parameters()

    def _acc_dtype(self) -> torch.dtype:
        return torch.float64 if self.A_log.dtype == torch.float64 else torch.float32

    def _check_x(self, x: Tensor, lengths: Tensor | None) -> None:
        check_padded(x, self.d_model, "MambaBlock")
        if x.shape[1] == 0:
            raise ValueError("MambaBlock: sequence length L must be >= 1, got L=0")
        if lengths is not None:
            check_lengths(lengths, x.shape[0], x.shape[1], "MambaBlock")

    def forward(
        self, x: Tensor, lengths: Tensor | None = None, return_state: bool = False
    ) -> Tensor | tuple[Tensor, MambaState]:
        """Mix a right-padded batch of sequences causally.

        Args:
            x (Tensor): (B, L, D) right-padded inputs.
            lengths (Tensor, optional): (B,) integer real lengths in [0, L]; only used for the
                returned state (outputs at real positions never see later positions anyway).
                Default: None (every row has length L).
            return_state (bool): also return the state at each row's last real position, ready
                for :meth:`step`. Default: False.

        Returns:
            Tensor: (B, L, D) outputs (values at padded positions are meaningless); with
            ``return_state``, also a :class:`MambaState` with conv_state (B, E, W) and ssm_state
            (B, E, N) after position ``lengths - 1`` (the empty-history state for length 0).
        """
        self._check_x(x, lengths)
        batch, length, _ = x.shape
        acc = self._acc_dtype()
        # Channels-last throughout: every projection is one GEMM on contiguous (B * L, .)
        # operands (no broadcast weight, no strided batch), and the conv and the scan read and
        # write the (B, L, E) memory through (B, E, L) views (the CPU kernels take that layout).
        w_u, w_z = self.in_proj.weight.chunk(2, dim=0)  # (E, D) each
        b_u, b_z = (None, None) if self.in_proj.bias is None else self.in_proj.bias.chunk(2)
        u_pre = F.linear(x, w_u, b_u)  # (B, L, E)
        z = F.linear(x, w_z, b_z)  # (B, L, E)
        conv_weight = self.conv1d.weight.squeeze(1)  # (E, W)
        u = causal_conv1d(u_pre.transpose(1, 2), conv_weight, self.conv1d.bias, activation="silu")
        u = u.transpose(1, 2)  # (B, L, E)
        x_dbl = F.linear(u, self.x_proj.weight)  # (B, L, R + 2N)
        dt_low, b_mat, c_mat = torch.split(
            x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1
        )  # fmt: skip
        A = -torch.exp(self.A_log.to(acc))  # (E, N)
        D = self.D.to(acc)  # (E,)
        dt_bias = self.dt_proj.bias.to(acc)  # (E,)
        # (B, E, L) and (B, N, L) views for the scan's signature; nothing is copied.
        u_cf, z_cf, b_cf, c_cf = (t.transpose(1, 2) for t in (u, z, b_mat, c_mat))
        if not return_state:
            # dt_proj, its bias and the softplus happen inside the scan (fused on the CPU
            # kernel: the (B, L, E) time step is never stored).
            y = selective_scan(
                u_cf, dt_low.transpose(1, 2), A, b_cf, c_cf, D, z_cf, dt_bias,
                delta_softplus=True, backend=self.backend, delta_proj=self.dt_proj.weight,
            )  # fmt: skip
            return self.out_proj(y.transpose(1, 2))  # (B, L, D)
        dt = _ThinLinear.apply(dt_low, self.dt_proj.weight)  # (B, L, E)

        if lengths is None:
            lengths = torch.full((batch,), length, dtype=torch.long, device=x.device)
        real = torch.arange(length, device=x.device) < lengths[:, None].to(x.device)  # (B, L)
        # Zero the discretised step at padded positions: exp(0 * A) = 1 and 0 * B * u = 0, so the
        # SSM state is frozen through the padding and the scan's last state is the state at
        # lengths - 1. Real positions get exactly softplus(dt + bias), as with delta_softplus.
        delta = F.softplus(dt.to(acc) + dt_bias) * real[:, :, None]  # (B, L, E)
        delta = delta.to(u.dtype)
        y, ssm_state = selective_scan(
            u_cf,
            delta.transpose(1, 2),
            A,
            b_cf,
            c_cf,
            D,
            z_cf,
            None,
            delta_softplus=False,
            return_last_state=True,
            backend=self.backend,
        )
        out = self.out_proj(y.transpose(1, 2))  # (B, L, D)
        # The conv state is the last W pre-conv inputs ending at lengths - 1, zeros before t = 0.
        width = self.d_conv
        padded = F.pad(u_pre.transpose(1, 2), (width, 0))  # (B, E, W + L): index j is t = j - W
        idx = lengths.to(x.device, torch.long)[:, None] + torch.arange(
            width, device=x.device
        )  # (B, W)
        conv_state = padded.gather(
            2, idx[:, None, :].expand(batch, self.d_inner, width)
        )  # (B, E, W)
        return out, MambaState(conv_state, ssm_state)

    def allocate_state(
        self,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> MambaState:
        """The empty-history state (zeros) for ``batch_size`` sequences.

        Args:
            batch_size (int): number of sequences B.
            device (torch.device, optional): Default: the parameters' device.
            dtype (torch.dtype, optional): dtype of the conv state. Default: the parameters' dtype.
                The SSM state is fp32 (fp64 for an fp64 module), as the scan accumulates in it.

        Returns:
            MambaState: conv_state (B, E, W) and ssm_state (B, E, N), all zeros.
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 0:
            raise ValueError(
                f"MambaBlock.allocate_state: batch_size must be an int >= 0, got {batch_size!r}"
            )
        device = self.in_proj.weight.device if device is None else device
        dtype = self.in_proj.weight.dtype if dtype is None else dtype
        conv_state = torch.zeros(batch_size, self.d_inner, self.d_conv, device=device, dtype=dtype)
        ssm_state = torch.zeros(
            batch_size, self.d_inner, self.d_state, device=device, dtype=self._acc_dtype()
        )
        return MambaState(conv_state, ssm_state)

    def check_state(self, state: object, batch: int, owner: str = "MambaBlock.step") -> MambaState:
        """Check that ``state`` is a (conv_state, ssm_state) pair shaped for ``batch`` rows."""
        if (
            not isinstance(state, tuple)
            or len(state) != 2
            or not all(isinstance(s, Tensor) for s in state)
        ):
            raise TypeError(
                f"{owner}: state must be a MambaState (conv_state, ssm_state) from allocate_state or "
                f"forward(return_state=True), got {type(state).__name__}"
            )
        conv_state, ssm_state = state
        want_conv = (batch, self.d_inner, self.d_conv)
        want_ssm = (batch, self.d_inner, self.d_state)
        if tuple(conv_state.shape) != want_conv:
            raise ValueError(
                f"{owner}: conv_state must be (B, E, W) = {want_conv}, got {tuple(conv_state.shape)}"
            )
        if tuple(ssm_state.shape) != want_ssm:
            raise ValueError(
                f"{owner}: ssm_state must be (B, E, N) = {want_ssm}, got {tuple(ssm_state.shape)}"
            )
        return MambaState(conv_state, ssm_state)

    def step(self, x_t: Tensor, state: MambaState) -> tuple[Tensor, MambaState]:
        """Advance every sequence by one event, updating ``state`` in place.

        Args:
            x_t (Tensor): (B, D) the new event of each sequence.
            state (MambaState): from :meth:`allocate_state` or ``forward(..., return_state=True)``;
                updated in place (clone it first to keep the old one).

        Returns:
            tuple: y_t (B, D) and the (same, updated) state.
        """
        if not isinstance(x_t, Tensor) or x_t.dim() != 2 or x_t.shape[-1] != self.d_model:
            shape = tuple(x_t.shape) if isinstance(x_t, Tensor) else type(x_t).__name__
            raise ValueError(
                f"MambaBlock.step: x_t must be (B, D) with D={self.d_model}, got {shape}"
            )
        conv_state, ssm_state = self.check_state(state, x_t.shape[0])
        xz = self.in_proj(x_t)  # (B, 2E)
        u, z = xz.chunk(2, dim=-1)  # (B, E) each
        conv_weight = self.conv1d.weight.squeeze(1)  # (E, W)
        u = causal_conv1d_update(
            u, conv_state, conv_weight, self.conv1d.bias, activation="silu"
        )  # (B, E)
        x_dbl = self.x_proj(u)  # (B, R + 2N)
        dt, b_t, c_t = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.linear(dt, self.dt_proj.weight)  # (B, E)
        acc = self._acc_dtype()
        A = self._step_A(acc)  # (E, N)
        y = selective_state_update(
            ssm_state,
            u,
            dt,
            A,
            b_t,
            c_t,
            self.D.to(acc),
            z=z,
            dt_bias=self.dt_proj.bias.to(acc),
            dt_softplus=True,
        )  # (B, E)
        return self.out_proj(y), MambaState(conv_state, ssm_state)

    def _step_A(self, acc: torch.dtype) -> Tensor:
        """A = -exp(A_log) for :meth:`step`; cached while no gradient is recorded.

        The cache is keyed on the parameter's storage, version counter and dtype, so an
        optimizer step or ``load_state_dict`` (both bump the version) invalidates it.
        """
        if torch.is_grad_enabled() and self.A_log.requires_grad:
            return -torch.exp(self.A_log.to(acc))  # (E, N)
        key = (self.A_log.data_ptr(), self.A_log._version, acc, self.A_log.device)
        cached = getattr(self, "_A_cache", None)
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, -torch.exp(self.A_log.to(acc)))
            self._A_cache = cached
        return cached[1]  # (E, N)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_state={self.d_state}, d_conv={self.d_conv}, "
            f"expand={self.expand}, dt_rank={self.dt_rank}, backend={self.backend!r}"
        )
