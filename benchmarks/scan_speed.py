"""Selective-scan speed and memory: every backend against a plain autograd loop, forward + backward.

The baseline ("plain loop") is :func:`selective_scan_ref` differentiated by autograd, i.e. the
sequential loop anyone would write first. Each (shape, backend) runs in its own subprocess so that
the peak-memory figure (``ru_maxrss`` growth during the first forward + backward, after the
inputs exist) belongs to that backend alone. Times are medians over repeats; a backend whose
single run would take longer than ``--budget-s`` is run fewer times, or skipped when even one run
(predicted from the previous length) would not fit.

Run::

    python benchmarks/scan_speed.py            # L in {50, 200, 1000} + the Mamba-layer shape
    python benchmarks/scan_speed.py --quick    # L in {50, 200}, fewer repeats

Prints a table, then one JSON line.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: libgomp spin-waits otherwise
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # huge pages for large torch buffers (fewer faults)

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import asdict, dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # this checkout's package, not an installed one
    sys.path.insert(0, str(REPO))

BACKENDS = ("plain", "cpu", "chunked", "reference")


@dataclass
class Shape:
    """One benchmark shape (B batch, D channels, L length, N state size)."""

    batch: int
    dim: int
    length: int
    nstate: int
    label: str = ""

    def size(self) -> int:
        return self.batch * self.dim * self.length * self.nstate


@dataclass
class Result:
    """Timings (ms, medians) and peak memory growth (MiB) of one backend at one shape."""

    shape: Shape
    backend: str
    fwd_ms: float | None = None
    bwd_ms: float | None = None
    total_ms: float | None = None
    runs: int = 0
    peak_mib: float | None = None
    note: str = ""
    speedup: float | None = field(default=None)


def _make_inputs(shape: Shape, requires_grad: bool = True) -> dict[str, Any]:
    """Mamba-like inputs: S4D-real A = -(1..N), dt around softplus(-2), all with gradients."""
    import torch

    g = torch.Generator().manual_seed(0)
    b, d, n, length = shape.batch, shape.dim, shape.nstate, shape.length

    def rnd(*s: int, scale: float = 1.0, shift: float = 0.0) -> torch.Tensor:
        return (torch.randn(*s, generator=g) * scale + shift).requires_grad_(requires_grad)

    A = -torch.arange(1, n + 1, dtype=torch.float32).repeat(d, 1)  # (D, N)
    return {
        "u": rnd(b, d, length),
        "delta": rnd(b, d, length, scale=0.5, shift=-2.0),
        "A": A.requires_grad_(requires_grad),
        "B": rnd(b, n, length),
        "C": rnd(b, n, length),
        "D": rnd(d),
        "z": rnd(b, d, length),
        "delta_bias": rnd(d, scale=0.1),
    }


def _max_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


def run_worker(shape: Shape, backend: str, repeats: int, budget_s: float, threads: int) -> dict:
    """Time forward + backward of one backend in this process; returns the measurements."""
    import torch

    from torchrec_mamba.ops import _scan_cpu, selective_scan, selective_scan_ref

    torch.set_num_threads(threads)
    if backend == "cpu" and not _scan_cpu.is_available():
        return {"note": f"cpu kernel unavailable: {_scan_cpu.build_error()[:200]}"}

    def scan(inputs: dict[str, Any]) -> torch.Tensor:
        if backend == "plain":
            return selective_scan_ref(**inputs, delta_softplus=True)  # type: ignore[return-value]
        return selective_scan(**inputs, delta_softplus=True, backend=backend)  # type: ignore[return-value]

    # Warm up on a tiny shape: loads the kernel, starts the thread pool and the autograd engine,
    # and triggers the lazy imports of the first `backward(grad)` (about 0.3 s) before measuring.
    tiny = _make_inputs(Shape(2, 4, 8, 4))
    y_tiny = scan(tiny)
    y_tiny.backward(torch.ones_like(y_tiny))
    inputs = _make_inputs(shape)
    grad_y = torch.randn(shape.batch, shape.dim, shape.length)  # (B, D, L)
    del tiny, y_tiny
    gc.collect()
    rss_before = _max_rss_mib()
    fwd: list[float] = []
    bwd: list[float] = []
    peak = 0.0
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        y = scan(inputs)
        t1 = time.perf_counter()
        y.backward(grad_y)
        t2 = time.perf_counter()
        del y
        for t in inputs.values():
            t.grad = None
        fwd.append(t1 - t0)
        bwd.append(t2 - t1)
        if len(fwd) == 1:
            peak = _max_rss_mib() - rss_before
        elapsed = time.perf_counter() - start
        if len(fwd) >= repeats or elapsed + (t2 - t0) > budget_s:
            break
    total = [f + b for f, b in zip(fwd, bwd, strict=True)]
    return {
        "fwd_ms": 1e3 * statistics.median(fwd),
        "bwd_ms": 1e3 * statistics.median(bwd),
        "total_ms": 1e3 * statistics.median(total),
        "runs": len(fwd),
        "peak_mib": peak,
    }


def _run_in_subprocess(
    shape: Shape, backend: str, repeats: int, budget_s: float, threads: int
) -> dict:
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        backend,
        "--worker-shape",
        f"{shape.batch},{shape.dim},{shape.length},{shape.nstate}",
        "--repeats",
        str(repeats),
        "--budget-s",
        str(budget_s),
        "--threads",
        str(threads),
    ]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=4 * budget_s + 120, check=False
        )
    except subprocess.TimeoutExpired:
        return {"note": "timed out"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"note": f"worker failed (rc={proc.returncode}): {proc.stderr.strip()[-300:]}"}
    return json.loads(lines[-1])


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def print_table(results: list[Result]) -> None:
    head = (
        f"{'shape (B,D,L,N)':<22}{'backend':<11}{'fwd ms':>10}{'bwd ms':>10}{'fwd+bwd ms':>12}"
        f"{'x plain':>9}{'runs':>6}{'peak MiB':>10}  note"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        s = r.shape
        name = f"{s.batch},{s.dim},{s.length},{s.nstate}" + (f" {s.label}" if s.label else "")
        print(
            f"{name:<22}{r.backend:<11}{_fmt(r.fwd_ms, '10.1f')}{_fmt(r.bwd_ms, '10.1f')}"
            f"{_fmt(r.total_ms, '12.1f')}{_fmt(r.speedup, '9.1f')}{r.runs:>6d}"
            f"{_fmt(r.peak_mib, '10.1f')}  {r.note}"
        )


def kernel_cpu_time(shapes: list[Shape], repeats: int) -> list[dict[str, Any]]:
    """Forward and backward of the compiled kernel alone, 1 thread, process CPU time.

    Calls the registered ops directly (no autograd, no casts), so it measures the kernel only,
    and CPU time does not grow when other jobs load the machine. The ISA is the one the loader
    picked (cap it with ``TORCHREC_MAMBA_CPU_ISA=avx2`` or ``generic`` to time a fallback).
    """
    import torch

    from torchrec_mamba.ops import _scan_cpu

    torch.set_num_threads(1)
    ops = _scan_cpu.kernel_ops()
    if ops is None:
        raise RuntimeError(f"the C++ CPU kernel is unavailable: {_scan_cpu.build_error()}")
    rows = []
    for shape in shapes:
        with torch.no_grad():
            t = _make_inputs(shape, requires_grad=False)
            bt = t["B"].transpose(1, 2).contiguous()  # (B, L, N)
            ct = t["C"].transpose(1, 2).contiguous()  # (B, L, N)
            dy = torch.randn_like(t["u"])  # (B, D, L)
            rest = (t["A"], bt, ct, t["D"], t["z"], t["delta_bias"], True)
            # The Mamba block's variant: dt_proj (rank 4, its d_model = 64 default) fused in.
            rank = 4
            dt_low = torch.randn(shape.batch, shape.length, rank).transpose(1, 2)  # (B, R, L)
            dt_w = torch.randn(shape.dim, rank) * 0.5  # (D, R)
            variants = {
                "": (ops.selective_scan_fwd, ops.selective_scan_bwd, (t["u"], t["delta"], *rest)),
                " dt_proj fused": (ops.selective_scan_proj_fwd, ops.selective_scan_proj_bwd,
                                   (t["u"], dt_low, dt_w, *rest)),
            }  # fmt: skip
            timings = {}
            for label, (fwd_op, bwd_op, args) in variants.items():
                ckpt = fwd_op(*args, True)[2]  # warm-up; state checkpoints
                bwd_op(*args, ckpt, dy, None)
                fwd, bwd = [], []
                for _ in range(repeats):
                    start = time.process_time()
                    ckpt = fwd_op(*args, True)[2]
                    mid = time.process_time()
                    bwd_op(*args, ckpt, dy, None)
                    fwd.append(mid - start)
                    bwd.append(time.process_time() - mid)
                timings[label] = (fwd, bwd)
        updates = shape.size()
        for label, (fwd, bwd) in timings.items():
            row = {
                "shape": f"{shape.batch},{shape.dim},{shape.length},{shape.nstate}{label}",
                "fwd_ms": statistics.median(fwd) * 1e3,
                "bwd_ms": statistics.median(bwd) * 1e3,
                "fwd_ns_per_update": statistics.median(fwd) / updates * 1e9,
                "bwd_ns_per_update": statistics.median(bwd) / updates * 1e9,
                "bwd_over_fwd": statistics.median(bwd) / statistics.median(fwd),
                "isa": _scan_cpu._arch_flags()[0],
            }
            print(
                f"[kernel] {row['shape']} ({row['isa']}): fwd {row['fwd_ms']:.1f} ms "
                f"({row['fwd_ns_per_update']:.2f} ns/update), bwd {row['bwd_ms']:.1f} ms "
                f"({row['bwd_ns_per_update']:.2f} ns/update), bwd/fwd {row['bwd_over_fwd']:.2f}"
            )
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="L in {50, 200}, 3 repeats, 20 s budget"
    )
    parser.add_argument("--lengths", type=int, nargs="+", default=None, help="default: 50 200 1000")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--nstate", type=int, default=32)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--budget-s", type=float, default=60.0, help="time budget per backend and shape"
    )
    parser.add_argument(
        "--max-mem-gib", type=float, default=8.0, help="skip runs predicted above this"
    )
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads (default: torch's)"
    )
    parser.add_argument("--no-layer", action="store_true", help="skip the Mamba-layer shape")
    parser.add_argument(
        "--kernel-cpu-time",
        action="store_true",
        help="only time the compiled kernel's fwd and bwd on 1 thread (process CPU time)",
    )
    parser.add_argument("--worker", choices=BACKENDS, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-shape", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    import torch

    threads = args.threads or torch.get_num_threads()
    if args.worker is not None:
        b, d, length, n = (int(x) for x in args.worker_shape.split(","))
        out = run_worker(Shape(b, d, length, n), args.worker, args.repeats, args.budget_s, threads)
        print(json.dumps(out))
        return 0

    if args.kernel_cpu_time:
        lengths = args.lengths or [200, 2000]
        batch_for = {200: 64, 2000: 16}
        shapes = [
            Shape(batch_for.get(length, args.batch), args.dim, length, args.nstate)
            for length in lengths
        ]
        rows = kernel_cpu_time(shapes, args.repeats)
        print(json.dumps({"benchmark": "scan_kernel_cpu_time", "results": rows}))
        return 0

    if args.quick:
        lengths = args.lengths or [50, 200]
        repeats, budget = min(args.repeats, 3), min(args.budget_s, 20.0)
    else:
        lengths = args.lengths or [50, 200, 1000]
        repeats, budget = args.repeats, args.budget_s
    shapes = [Shape(args.batch, args.dim, length, args.nstate) for length in sorted(lengths)]
    if not args.no_layer:
        shapes.append(Shape(256, 128, 200, 32, label="layer"))
    backends = ["plain", *[b for b in args.backends if b != "plain"]]

    # Per backend: seconds and MiB per element (B*D*L*N) of its largest finished run, to
    # predict whether the next shape fits the budget.
    rate: dict[str, tuple[float, float]] = {}
    results: list[Result] = []
    for shape in sorted(shapes, key=Shape.size):
        plain_ms: float | None = None
        for backend in backends:
            res = Result(shape, backend)
            if backend in rate:
                sec, mib = rate[backend][0] * shape.size(), rate[backend][1] * shape.size()
                if sec > budget or mib > 1024 * args.max_mem_gib:
                    res.note = f"skipped: predicted {sec:.0f} s, {mib / 1024:.1f} GiB per run"
                    results.append(res)
                    print(f"[scan_speed] {shape} {backend}: {res.note}", file=sys.stderr)
                    continue
            out = _run_in_subprocess(shape, backend, repeats, budget, threads)
            for key, value in out.items():
                setattr(res, key, value)
            if res.total_ms is not None:
                rate[backend] = (
                    res.total_ms / 1e3 / shape.size(),
                    max(res.peak_mib or 0.0, 1.0) / shape.size(),
                )
                if backend == "plain":
                    plain_ms = res.total_ms
                if plain_ms is not None:
                    res.speedup = plain_ms / res.total_ms
            print(
                f"[scan_speed] {shape.batch},{shape.dim},{shape.length},{shape.nstate} {backend}: "
                f"{_fmt(res.total_ms, '.1f')} ms over {res.runs} runs {res.note}",
                file=sys.stderr,
            )
            results.append(res)

    print(f"selective scan fwd+bwd, fp32, softplus + D + z + delta_bias, {threads} threads")
    print_table(results)
    at200 = [
        r for r in results if r.backend == "cpu" and r.shape.length == 200 and not r.shape.label
    ]
    goal = at200[0].speedup if at200 else None
    if goal is not None:
        print(f"cpu backend vs plain loop at L=200: {goal:.1f}x (goal >= 10x)")
    summary = {
        "benchmark": "scan_speed",
        "threads": threads,
        "cpu_speedup_at_L200": goal,
        "results": [asdict(r) for r in results],
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
