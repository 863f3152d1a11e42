"""Compiled C++ CPU kernels (backend "cpu"): the loader, and the selective scan's autograd wrapper.

One C++ source per op lies beside its Python op (``selective_scan.cpp`` with its float32 half
``selective_scan_f32.cpp``, ``causal_conv1d.cpp``, ``state_update.cpp``, ``dropout.cpp``), with
the shared SIMD helpers and the forward recurrence in ``kernel_common.h``. They build into one extension, JIT-compiled with
:func:`torch.utils.cpp_extension.load` the first time it is needed (never at import time), cached
by torch under ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``), and reused by
later processes. If the build fails, a warning is logged once, :func:`is_available` returns
False, :func:`build_error` says why, and ``backend="auto"`` falls back to "chunked".

Set ``TORCHREC_MAMBA_NO_CPU_KERNEL=1`` to skip the build (the "cpu" backend then reports itself
unavailable).

The forward keeps a checkpoint of the state every 64 steps (when a gradient is needed); the
backward recomputes one chunk of states at a time from them into a cache-resident buffer, so
memory is linear in L and the backward's working set does not grow with L. Arguments are validated by
:func:`torchrec_mamba.ops.selective_scan.check_scan_args` before they reach :func:`selective_scan`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from torchrec_mamba.ops.selective_scan import accumulate_dtype

logger = logging.getLogger(__name__)

_HERE = Path(__file__).parent
SOURCES: tuple[Path, ...] = tuple(
    _HERE / name
    for name in (
        "selective_scan.cpp",
        "selective_scan_f32.cpp",
        "causal_conv1d.cpp",
        "state_update.cpp",
        "dropout.cpp",
    )
)
HEADERS: tuple[Path, ...] = (_HERE / "kernel_common.h", _HERE / "selective_scan.h")
DISABLE_ENV = "TORCHREC_MAMBA_NO_CPU_KERNEL"
ISA_ENV = "TORCHREC_MAMBA_CPU_ISA"


def _cpu_flags() -> set[str]:
    """The feature flags of the first CPU in /proc/cpuinfo (empty when unreadable)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _arch_flags() -> tuple[str, list[str]]:
    """A short ISA tag and the matching compiler flags for the CPU this runs on.

    AVX-512F (with AVX2 + FMA) when the CPU has it: 16-wide vectors, and the decay's 2^x uses
    ``vscalefps``; else AVX2 + FMA; else the compiler's baseline (the kernel's portable vector
    code). ``TORCHREC_MAMBA_CPU_ISA`` (``avx512``, ``avx2`` or ``generic``) caps the choice. The
    tag goes into the extension's name so that a cache shared between machines with different
    CPUs never hands code to a CPU that lacks its instructions.
    """
    flags = _cpu_flags()
    cap = os.environ.get(ISA_ENV, "").strip().lower()
    order = ("avx512", "avx2", "generic")
    allowed = order[order.index(cap) :] if cap in order else order
    if "avx512" in allowed and {"avx512f", "avx2", "fma"} <= flags:
        return "avx512", ["-mavx512f", "-mavx2", "-mfma", "-mprefer-vector-width=512"]
    if "avx2" in allowed and {"avx2", "fma"} <= flags:
        return "avx2", ["-mavx2", "-mfma"]
    return "generic", []


class KernelLoader:
    """Builds and loads the C++ extension once, lazily and thread-safely.

    Args:
        sources (Path | Sequence[Path]): the C++ source files. Default: :data:`SOURCES`.
        name (str): base name of the extension (an ISA tag is appended). Default:
            ``"torchrec_mamba_scan_cpu"``.

    Example::

        >>> loader = KernelLoader(Path("/nonexistent/scan.cpp"))
        >>> loader.is_available()
        False
        >>> "nonexistent" in loader.build_error()
        True
    """

    def __init__(
        self, sources: Path | Sequence[Path] = SOURCES, name: str = "torchrec_mamba_scan_cpu"
    ) -> None:
        self.sources = (sources,) if isinstance(sources, Path) else tuple(sources)
        self.name = name
        self._lock = threading.Lock()
        self._tried = False
        self._ops: Any = None
        self._error = ""

    def _build(self) -> Any:
        if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
            raise RuntimeError(f"disabled by the environment variable {DISABLE_ENV}")
        for source in self.sources:
            if not source.is_file():
                raise FileNotFoundError(f"kernel source {source} not found")
        from torch.utils.cpp_extension import load

        tag, arch = _arch_flags()
        # torch rebuilds when a source or a flag changes, not a header: put the header's hash
        # into the flags so that an edit to it rebuilds too.
        digest = hashlib.sha1(b"".join(h.read_bytes() for h in HEADERS)).hexdigest()[:12]
        load(
            name=f"{self.name}_{tag}",
            sources=[str(source) for source in self.sources],
            extra_include_paths=[str(_HERE)],
            extra_cflags=[
                "-O3",
                "-fopenmp",
                "-fno-trapping-math",
                "-DNDEBUG",
                f"-DTRM_HEADERS={digest}",
                *arch,
            ],  # fmt: skip
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
        ops = torch.ops.torchrec_mamba_scan
        # Raise now if an op is not registered.
        ops.selective_scan_fwd, ops.selective_scan_bwd  # noqa: B018
        ops.selective_scan_proj_fwd, ops.selective_scan_proj_bwd  # noqa: B018
        ops.causal_conv1d_fwd, ops.causal_conv1d_bwd, ops.dropout_seeded  # noqa: B018
        ops.gelu_dropout_fwd, ops.gelu_dropout_bwd  # noqa: B018
        ops.causal_conv1d_update_cpu, ops.selective_state_update_cpu  # noqa: B018
        return ops

    def get(self) -> Any:
        """The loaded ``torch.ops`` namespace, building it on the first call; None if it failed."""
        if self._tried:
            return self._ops
        with self._lock:
            if not self._tried:
                try:
                    self._ops = self._build()
                except Exception as exc:  # any build or load failure means "unavailable"
                    msg = str(exc).strip()
                    self._error = f"{type(exc).__name__}: {msg[-2000:]}"
                    logger.warning(
                        "selective_scan: the C++ CPU kernel is unavailable (%s); "
                        "backend 'auto' falls back to 'chunked'",
                        self._error,
                    )
                self._tried = True
        return self._ops

    def is_available(self) -> bool:
        """Whether the kernel built and loaded (builds it on the first call)."""
        return self.get() is not None

    def build_error(self) -> str:
        """Why the kernel is unavailable ("" when it built)."""
        self.get()
        return self._error


_LOADER = KernelLoader()


def is_available() -> bool:
    """Whether the compiled kernel can be used; compiles it on the first call (cached after)."""
    return _LOADER.is_available()


def build_error() -> str:
    """Why the compiled kernel is unavailable; "" when it built."""
    return _LOADER.build_error()


def kernel_ops() -> Any:
    """The compiled ``torch.ops`` namespace (scan, causal conv1d, dropout); None if unavailable.

    Builds the extension on the first call, as :func:`is_available` does.
    """
    return _LOADER.get()


class _SelectiveScanCPU(torch.autograd.Function):
    """Autograd wrapper: the C++ forward, and the C++ backward that recomputes the states.

    With ``dt_w`` (float32 only) ``delta`` is the (B, R, L) input of dt_proj and the kernels
    form the time step ``dt_w @ delta`` tile by tile (the ``selective_scan_proj_*`` ops).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        u: Tensor,  # (B, D, L)
        delta: Tensor,  # (B, D, L), or (B, R, L) with dt_w
        dt_w: Tensor | None,  # (D, R)
        A: Tensor,  # (D, N)
        Bt: Tensor,  # (B, L, N)
        Ct: Tensor,  # (B, L, N)
        D: Tensor | None,  # (D,)
        z: Tensor | None,  # (B, D, L)
        delta_bias: Tensor | None,  # (D,)
        delta_softplus: bool,
    ) -> tuple[Tensor, Tensor]:
        ops = _LOADER.get()
        grad = any(ctx.needs_input_grad)
        rest = (A, Bt, Ct, D, z, delta_bias, delta_softplus, grad)
        # ckpt: the state every 64 steps, for the backward's recompute
        if dt_w is None:
            y, last, ckpt = ops.selective_scan_fwd(u, delta, *rest)
        else:
            y, last, ckpt = ops.selective_scan_proj_fwd(u, delta, dt_w, *rest)
        ctx.save_for_backward(u, delta, dt_w, A, Bt, Ct, D, z, delta_bias, ckpt)
        ctx.delta_softplus = delta_softplus
        ctx.set_materialize_grads(False)
        return y, last  # (B, D, L), (B, D, N)

    @staticmethod
    @once_differentiable  # the C++ backward builds no graph: double backward raises, never lies
    def backward(  # type: ignore[override]
        ctx: Any, dy: Tensor | None, dlast: Tensor | None
    ) -> tuple[Tensor | None, ...]:
        u, delta, dt_w, A, Bt, Ct, D, z, delta_bias, ckpt = ctx.saved_tensors
        if dy is None:
            dy = torch.zeros_like(u)
        dy = dy.to(u.dtype)  # (B, D, L); float reads any layout, double needs contiguous
        if dy.dtype == torch.float64:
            dy = dy.contiguous()
        if dlast is not None:
            dlast = dlast.to(u.dtype).contiguous()  # (B, D, N)
        ops = _LOADER.get()
        rest = (A, Bt, Ct, D, z, delta_bias, ctx.delta_softplus, ckpt, dy, dlast)
        ddt_w = None
        if dt_w is None:
            du, ddelta, dA, dBt, dCt, dD, dz, dbias = ops.selective_scan_bwd(u, delta, *rest)
        else:
            du, ddelta, ddt_w, dA, dBt, dCt, dD, dz, dbias = ops.selective_scan_proj_bwd(
                u, delta, dt_w, *rest
            )
        need = ctx.needs_input_grad
        return (
            du if need[0] else None,
            ddelta if need[1] else None,
            ddt_w if need[2] else None,
            dA if need[3] else None,
            dBt if need[4] else None,
            dCt if need[5] else None,
            dD if D is not None and need[6] else None,
            dz if z is not None and need[7] else None,
            dbias if delta_bias is not None and need[8] else None,
            None,
        )


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
    delta_proj: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan on the compiled CPU kernel; arguments as in :func:`selective_scan`.

    Inputs are cast to the accumulate dtype (fp32, or fp64 for fp64 inputs); fp64 ones are made
    contiguous, fp32 activations (u, delta, z) are read in their own layout, and the outputs and
    their gradients come back in that layout (a channels-last view gives channels-last results).
    B and C are transposed to contiguous (B, L, N); autograd casts each gradient back to its
    input's dtype.

    With ``delta_proj`` (float32 only; the dispatcher composes the product for other dtypes),
    the time step is ``delta_proj @ delta`` for the (B, R, L) ``delta``, formed by the kernel
    tile by tile: neither that (B, D, L) product nor its gradient is ever written.

    Args:
        u (Tensor): (B, D, L) input.
        delta (Tensor): (B, D, L) time step before ``delta_bias`` and softplus; (B, R, L) with
            ``delta_proj``.
        A (Tensor): (D, N) state matrix.
        B (Tensor): (B, N, L) input matrix.
        C (Tensor): (B, N, L) output matrix.
        D (Tensor, optional): (D,) skip connection.
        z (Tensor, optional): (B, D, L) gate, applied as ``y * silu(z)``.
        delta_bias (Tensor, optional): (D,) added to delta.
        delta_softplus (bool): apply softplus to delta (after the bias).
        return_last_state (bool): also return the state after the last step.
        delta_proj (Tensor, optional): (D, R) dt_proj weight. Default: None.

    Example::

        >>> from torchrec_mamba.ops.selective_scan import selective_scan_ref
        >>> u = torch.randn(2, 4, 5); delta = torch.rand(2, 4, 5)
        >>> A = -torch.rand(4, 3); B = torch.randn(2, 3, 5); C = torch.randn(2, 3, 5)
        >>> y = selective_scan(u, delta, A, B, C, None, None, None, False, False)
        >>> torch.allclose(y, selective_scan_ref(u, delta, A, B, C), atol=1e-5)
        True

    Returns:
        Tensor: y, (B, D, L), in u's dtype; with ``return_last_state``, also the last state
        (B, D, N) in the accumulate dtype.

    Raises:
        RuntimeError: the kernel failed to build (see :func:`build_error`).
        TypeError: ``delta_proj`` with activations that are not float32.
    """
    if not is_available():
        raise RuntimeError(f"selective_scan: the C++ CPU kernel is unavailable: {build_error()}")
    acc = accumulate_dtype(u.dtype)
    if delta_proj is not None and u.dtype != torch.float32:
        raise TypeError(f"selective_scan (cpu): delta_proj needs float32 activations, got {u.dtype}")

    def prep(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(acc).contiguous()

    def prep_activation(t: Tensor | None) -> Tensor | None:
        # The float kernel reads (B, D, L) activations in any layout (the Mamba block passes
        # channels-last views of its (B, L, E) projections): no copy. Double: contiguous.
        if t is None or acc == torch.float32:
            return None if t is None else t.to(acc)
        return prep(t)

    Bt = B.to(acc).transpose(1, 2).contiguous()  # (B, L, N)
    Ct = C.to(acc).transpose(1, 2).contiguous()  # (B, L, N)
    y, last = _SelectiveScanCPU.apply(
        prep_activation(u),
        prep_activation(delta),
        prep(delta_proj),
        prep(A),
        Bt,
        Ct,
        prep(D),
        prep_activation(z),
        prep(delta_bias),
        delta_softplus,
    )
    y = y.to(u.dtype)  # (B, D, L)
    return (y, last) if return_last_state else y
