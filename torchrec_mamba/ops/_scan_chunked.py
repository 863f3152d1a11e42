"""Pure-PyTorch chunked selective scan: any device, hand-written backward, numerically stable.

The S6 recurrence ``h[t] = a[t] * h[t-1] + b[t]`` (``a = exp(dt * A)``, ``b = dt * u * B``) is a
first-order linear recurrence per (batch, channel, state) lane. Mamba-1's decay depends on the
state index n as well as on time, so Mamba-2's SSD trick (a (T, T) decay matrix per chunk) would
need a (B, D, N, T, T) tensor; instead this module splits the sequence into ``nc`` chunks of ``T``
steps and runs a two-level scan:

1. every chunk, all in parallel, scans its ``T`` steps from a zero state (``T`` batched steps);
2. a short sequential pass over the ``nc`` chunk ends carries the true start state into each chunk;
3. every chunk, in parallel again, rescans its steps from its true start state.

With ``T ~ sqrt(L)`` that is about ``3 * sqrt(L)`` batched kernels instead of ``L`` sequential
steps. Stability: only products of decays ``a = exp(dt * A)`` are formed, never divisions by them
or ``exp`` of positive cumulative sums, so nothing overflows (with ``A <= 0`` and ``dt >= 0`` every
factor lies in [0, 1] and a long product just underflows to an exact 0).

Memory: the forward and backward build a few (L, B, D, N) temporaries but autograd keeps only the
small inputs (u, dt, A, B, C); the backward recomputes the states. The backward is the adjoint
recurrence ``lam[t] = a[t+1] * lam[t+1] + C[t] * gy[t]``, run with the same two-level scan in
reverse.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from torchrec_mamba.ops.selective_scan import accumulate_dtype

logger = logging.getLogger(__name__)

MAX_CHUNK: int = 64
# Batch rows are scanned in blocks whose (L, B_blk, D, N) temporaries hold at most this many
# elements. That bounds the transient memory of long or wide inputs; on CPU, blocks of 4 MiB
# (fp32) also stay closer to the caches and measured faster than one big block.
BLOCK_ELEMENTS: dict[str, int] = {"cpu": 1 << 20, "cuda": 1 << 28}
DEFAULT_BLOCK_ELEMENTS: int = 1 << 26


def default_chunk_size(length: int) -> int:
    """Chunk length ``T`` for a sequence of ``length`` steps: about sqrt(L), in [1, MAX_CHUNK].

    ``T + L / T`` sequential batched steps is smallest at ``T = sqrt(L)``.

    Example::

        >>> default_chunk_size(1), default_chunk_size(50), default_chunk_size(200)
        (1, 7, 14)
    """
    return max(1, min(MAX_CHUNK, round(math.sqrt(length))))


def _time_major(x: Tensor, padded_length: int) -> Tensor:
    """(B, X, L) -> (Lp, B, X) contiguous, zero-padded at the end of time to ``padded_length``."""
    length = x.shape[-1]
    out = x.new_zeros(padded_length, x.shape[0], x.shape[1])  # (Lp, B, X)
    out[:length] = x.permute(2, 0, 1)
    return out


def _batch_major(x: Tensor, length: int) -> Tensor:
    """(Lp, B, X) -> (B, X, L) contiguous, dropping the padded steps."""
    return x[:length].permute(1, 2, 0).contiguous()


def linear_scan_(
    a: Tensor,
    x: Tensor,
    chunk: int,
    init: Tensor | None = None,
    reverse: bool = False,
    chunk_decay: Tensor | None = None,
) -> None:
    """Solve a first-order linear recurrence along dim 0 in place, chunk-parallel.

    Forward: ``x[i] <- a[i] * x[i-1] + x[i]`` with ``x[-1] = init``.
    Reverse: ``x[i] <- a[i+1] * x[i+1] + x[i]`` with ``init`` added to ``x[Lp-1]`` (the adjoint).

    Only products of ``a`` are formed, so with ``0 <= a <= 1`` nothing overflows.

    Args:
        a (Tensor): (Lp, ...) multipliers; ``Lp`` a multiple of ``chunk``. Not modified.
        x (Tensor): (Lp, ...) contiguous drive, overwritten with the solution.
        chunk (int): chunk length ``T``.
        init (Tensor, optional): (...) state before the first (forward) or after the last
            (reverse) step. Default: None (zeros).
        reverse (bool): run the adjoint recurrence from the end. Default: False.
        chunk_decay (Tensor, optional): (nc, ...) product of ``a`` over each chunk, when the
            caller has it cheaper than a product over ``a``. Default: None (computed).

    Example::

        >>> a = torch.full((6, 1), 0.5); x = torch.ones(6, 1)
        >>> linear_scan_(a, x, chunk=2)
        >>> x.squeeze(1).tolist()
        [1.0, 1.5, 1.75, 1.875, 1.9375, 1.96875]
    """
    nc = x.shape[0] // chunk
    rest = x.shape[1:]
    a_c = a.view(nc, chunk, *rest)  # (nc, T, ...)
    x_c = x.view(nc, chunk, *rest)  # (nc, T, ...)
    if not reverse:
        starts: list[Tensor] = [] if init is None else [init]
        if nc > 1:
            # Pass 1: the end state of chunks 0..nc-2 when each starts from zero.
            end = x_c[:-1, 0].clone()  # (nc-1, ...)
            for t in range(1, chunk):
                end = torch.addcmul(x_c[:-1, t], a_c[:-1, t], end)
            # Whole-chunk decay, in [0, 1].
            decay = (
                torch.prod(a_c[:-1], dim=1) if chunk_decay is None else chunk_decay[:-1]
            )  # (nc-1, ...)
            state = init
            for c in range(nc - 1):  # carry the true state across chunk boundaries
                state = end[c] if state is None else torch.addcmul(end[c], decay[c], state)
                starts.append(state)
        if starts:
            first = 0 if init is not None else 1
            x_c[first:, 0].addcmul_(a_c[first:, 0], torch.stack(starts))
        # Pass 2: every chunk from its true start.
        for t in range(1, chunk):
            x_c[:, t].addcmul_(a_c[:, t], x_c[:, t - 1])
        return
    carries: list[Tensor] = [] if init is None else [init]
    if nc > 1:
        # Pass 1: the value at step 0 of chunks 1..nc-1 when each starts from zero at its end.
        head = x_c[1:, chunk - 1].clone()  # (nc-1, ...)
        for t in range(chunk - 2, -1, -1):
            head = torch.addcmul(x_c[1:, t], a_c[1:, t + 1], head)
        head = head.mul_(a_c[1:, 0])  # what chunk c hands to the end of chunk c-1
        decay = (
            torch.prod(a_c[1:], dim=1) if chunk_decay is None else chunk_decay[1:]
        )  # (nc-1, ...)
        carry = init
        for c in range(nc - 2, -1, -1):
            carry = head[c] if carry is None else torch.addcmul(head[c], decay[c], carry)
            carries.append(carry)
    if carries:
        last = nc if init is not None else nc - 1
        x_c[:last, chunk - 1].add_(torch.stack(carries[::-1]))
    for t in range(chunk - 2, -1, -1):
        x_c[:, t].addcmul_(a_c[:, t + 1], x_c[:, t + 1])


def _decay_and_drive(
    u_t: Tensor, dt_t: Tensor, A: Tensor, B_t: Tensor, chunk: int, out: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-step decay ``exp(dt * A)`` and drive ``dt * u * B`` (Lp, B, D, N); chunk decay (nc, B, D, N)."""
    a = torch.mul(dt_t[..., None], A).exp_()  # (Lp, B, D, N)
    b = torch.mul((dt_t * u_t)[..., None], B_t[:, :, None, :], out=out)  # (Lp, B, D, N)
    dt_sum = dt_t.view(-1, chunk, *dt_t.shape[1:]).sum(1)  # (nc, B, D)
    decay = torch.mul(dt_sum[..., None], A).exp_()  # (nc, B, D, N) exp of a sum, not a product
    return a, b, decay


def _forward_block(
    u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int
) -> tuple[Tensor, Tensor]:
    """Scan one batch block: y (B, D, L) and the last state (B, D, N)."""
    length = u.shape[-1]
    padded = -(-length // chunk) * chunk
    u_t, dt_t = _time_major(u, padded), _time_major(dt, padded)  # (Lp, B, D)
    B_t, C_t = _time_major(B, padded), _time_major(C, padded)  # (Lp, B, N)
    # Padded steps have dt = 0: decay 1, drive 0, so the state rides through unchanged.
    a, h, decay = _decay_and_drive(u_t, dt_t, A, B_t, chunk)  # (Lp, B, D, N), (nc, B, D, N)
    linear_scan_(a, h, chunk, chunk_decay=decay)
    del a
    y_t = torch.einsum("lbdn,lbn->lbd", h, C_t)  # (Lp, B, D)
    return _batch_major(y_t, length), h[-1].clone()


def _backward_block(
    u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, gy: Tensor, glast: Tensor, chunk: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of one batch block: (g_u, g_dt, g_A, g_B, g_C), shaped like the inputs."""
    batch, dim, length = u.shape
    padded = -(-length // chunk) * chunk
    u_t, dt_t = _time_major(u, padded), _time_major(dt, padded)  # (Lp, B, D)
    B_t, C_t = _time_major(B, padded), _time_major(C, padded)  # (Lp, B, N)
    gy_t = _time_major(gy, padded)  # (Lp, B, D)
    # Recompute the states; h_prev is the same buffer shifted by one step (h[-1] = 0).
    h_all = u.new_zeros(padded + 1, batch, dim, A.shape[1])  # (Lp + 1, B, D, N)
    h, h_prev = h_all[1:], h_all[:-1]
    a, _, decay = _decay_and_drive(u_t, dt_t, A, B_t, chunk, out=h)
    linear_scan_(a, h, chunk, chunk_decay=decay)
    g_C = torch.matmul(gy_t[:, :, None, :], h).squeeze(-2)  # (Lp, B, N)
    del h
    # Adjoint: lam[t] = dLoss/dh[t] = a[t+1] * lam[t+1] + gy[t] * C[t]; glast enters at the end.
    lam = torch.mul(gy_t[..., None], C_t[:, :, None, :])  # (Lp, B, D, N)
    linear_scan_(a, lam, chunk, init=glast, reverse=True, chunk_decay=decay)
    lam_b = torch.einsum("lbdn,lbn->lbd", lam, B_t)  # (Lp, B, D)
    g_B = torch.matmul((dt_t * u_t)[:, :, None, :], lam).squeeze(-2)  # (Lp, B, N)
    q = lam.mul_(a).mul_(h_prev)  # (Lp, B, D, N) dLoss/d(dt * A)
    del a, h_all
    g_u = lam_b * dt_t  # (Lp, B, D)
    g_dt = lam_b * u_t + torch.einsum("lbdn,dn->lbd", q, A)  # (Lp, B, D)
    # A sum over (l, b) with einsum would permute-copy q; an in-place product is cheaper.
    g_A = q.mul_(dt_t[..., None]).sum((0, 1))  # (D, N)
    return (
        _batch_major(g_u, length),
        _batch_major(g_dt, length),
        g_A,
        _batch_major(g_B, length),
        _batch_major(g_C, length),
    )


def _batch_blocks(u: Tensor, nstate: int, chunk: int) -> list[slice]:
    """Batch slices whose (Lp, B_blk, D, N) temporaries hold at most BLOCK_ELEMENTS elements."""
    batch, dim, length = u.shape
    per_row = -(-length // chunk) * chunk * dim * nstate
    budget = BLOCK_ELEMENTS.get(u.device.type, DEFAULT_BLOCK_ELEMENTS)
    rows = max(1, budget // max(per_row, 1))
    return [slice(i, min(i + rows, batch)) for i in range(0, batch, rows)]


class _ChunkedScan(torch.autograd.Function):
    """y, h_last = scan(u, dt, A, B, C) for final (biased, softplused) dt; fp32/fp64 inputs."""

    @staticmethod
    def forward(
        ctx: Any, u: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk: int
    ) -> tuple[Tensor, Tensor]:
        blocks = _batch_blocks(u, A.shape[1], chunk)
        outs = [_forward_block(u[s], dt[s], A, B[s], C[s], chunk) for s in blocks]
        ctx.save_for_backward(u, dt, A, B, C)
        ctx.chunk = chunk
        if len(outs) == 1:
            return outs[0]
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gy: Tensor, glast: Tensor) -> tuple[Tensor | None, ...]:
        u, dt, A, B, C = ctx.saved_tensors
        chunk: int = ctx.chunk
        gy, glast = gy.to(u.dtype), glast.to(u.dtype)
        blocks = _batch_blocks(u, A.shape[1], chunk)
        grads = [
            _backward_block(u[s], dt[s], A, B[s], C[s], gy[s], glast[s], chunk) for s in blocks
        ]
        if len(grads) == 1:
            g_u, g_dt, g_A, g_B, g_C = grads[0]
        else:
            g_u, g_dt, g_B, g_C = (torch.cat([g[i] for g in grads]) for i in (0, 1, 3, 4))
            g_A = torch.stack([g[2] for g in grads]).sum(0)
        return g_u, g_dt, g_A, g_B, g_C, None


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
    chunk_size: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Chunked selective scan; arguments (pre-validated) and results as in :func:`selective_scan`.

    Args:
        u (Tensor): (B, D, L) input.
        delta (Tensor): (B, D, L) time step before ``delta_bias`` and softplus.
        A (Tensor): (D, N) state matrix.
        B (Tensor): (B, N, L) input matrix.
        C (Tensor): (B, N, L) output matrix.
        D (Tensor, optional): (D,) skip connection.
        z (Tensor, optional): (B, D, L) gate, applied as ``y * silu(z)``.
        delta_bias (Tensor, optional): (D,) added to delta.
        delta_softplus (bool): apply softplus to delta (after the bias).
        return_last_state (bool): also return the state after the last step.
        chunk_size (int, optional): steps per chunk. Default: None (:func:`default_chunk_size`).

    Example::

        >>> from torchrec_mamba.ops.selective_scan import selective_scan_ref
        >>> u = torch.randn(2, 4, 9); delta = torch.rand(2, 4, 9)
        >>> A = -torch.rand(4, 3); B = torch.randn(2, 3, 9); C = torch.randn(2, 3, 9)
        >>> y, h = selective_scan(u, delta, A, B, C, None, None, None, False, True, chunk_size=4)
        >>> y_ref, h_ref = selective_scan_ref(u, delta, A, B, C, return_last_state=True)
        >>> torch.allclose(y, y_ref, atol=1e-5), torch.allclose(h, h_ref, atol=1e-5)
        (True, True)

    Returns:
        Tensor: y, (B, D, L), in u's dtype; with ``return_last_state``, also the last state
        (B, D, N) in the accumulate dtype (fp32, or fp64 for fp64 inputs).
    """
    length = u.shape[-1]
    chunk = default_chunk_size(length) if chunk_size is None else chunk_size
    if chunk < 1:
        raise ValueError(f"selective_scan (chunked): chunk_size must be >= 1, got {chunk}")
    if u.numel() == 0 or A.numel() == 0:
        # Empty batch, channels or state: nothing to parallelise, and the chunk reshapes below
        # cannot infer a size from zero elements. The sequential form handles it exactly.
        from torchrec_mamba.ops.selective_scan import selective_scan_ref

        return selective_scan_ref(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state
        )
    acc = accumulate_dtype(u.dtype)
    u_, dt, A_, B_, C_ = (t.to(acc) for t in (u, delta, A, B, C))
    if delta_bias is not None:
        dt = dt + delta_bias.to(acc)[:, None]  # (B, D, L)
    if delta_softplus:
        dt = F.softplus(dt)
    y, last = _ChunkedScan.apply(u_, dt, A_, B_, C_, chunk)  # (B, D, L), (B, D, N)
    if D is not None:
        y = y + u_ * D.to(acc)[:, None]
    if z is not None:
        y = y * F.silu(z.to(acc))
    y = y.to(u.dtype)
    return (y, last) if return_last_state else y
