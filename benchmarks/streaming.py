"""Streaming serving: events/s of ``UserStateStore.update`` vs re-encoding each user's history.

For each history length L it fills a store with ``--users`` users of L events, then times

* **stream**: one batched ``store.update(users, items)`` folding one new event into every user
  (table lookup, one ``encoder.step`` on the users' rows in place: they hold consecutive slots);
* **shuffled users**: the same with the users in a random order, so the store gathers their
  states, steps the copies and scatters them back;
* **re-encode**: what a server without states does for the same new event: look up and encode
  the (users, L + 1) histories with ``Mamba4Rec.user_representation``.

events/s = users / median seconds of one call; the ratio is stream / re-encode, same run. Then the
latency of a single user's update (``store.update([u], [i])``) and, for the overhead of the store
itself, a bare ``encoder.step`` on one pre-made state.

Model: Mamba4Rec as in the paper (d_model 64, d_state 32, expand 2; ``--layers``, default 1),
``--items`` items, the CPU scan kernel (backend "auto").

Usage::

    python benchmarks/streaming.py                       # L = 50, 200, 1000; 256 users
    python benchmarks/streaming.py --lengths 200 --repeats 5

Prints a table and one JSON line.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: libgomp spin-waits otherwise
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # huge pages for large torch buffers (fewer faults)

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from torchrec_mamba.data import SequenceBatch  # noqa: E402
from torchrec_mamba.models.mamba4rec import Mamba4Rec, Mamba4RecConfig  # noqa: E402
from torchrec_mamba.modules import MambaSequenceEncoder  # noqa: E402
from torchrec_mamba.serving import UserStateStore  # noqa: E402


def timed(fn: Any, repeats: int) -> float:
    """Median seconds of ``repeats`` calls after one warm-up."""
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def build(args: argparse.Namespace) -> Mamba4Rec:
    torch.manual_seed(0)
    enc = MambaSequenceEncoder(d_model=64, num_layers=args.layers, d_state=32, expand=2)
    return Mamba4Rec(Mamba4RecConfig(num_items=args.items, embedding_dim=64), enc).eval()


def batch_of(histories: torch.Tensor) -> SequenceBatch:
    """(B, L) full histories -> a SequenceBatch."""
    b, length = histories.shape
    kjt = KeyedJaggedTensor(
        keys=["item"], values=histories.reshape(-1), lengths=torch.full((b,), length, dtype=torch.int32)
    )
    return SequenceBatch(features=kjt, labels=kjt)


def one_length(model: Mamba4Rec, args: argparse.Namespace, length: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(length)
    users = torch.arange(args.users)
    hist = torch.randint(1, args.items + 1, (args.users, length + 1), generator=g)
    store = UserStateStore.from_model(model, capacity=args.users)
    for t in range(length):  # fill the states by streaming (not timed)
        store.update(users, hist[:, t])
    new = hist[:, length]
    stream_s = timed(lambda: store.update(users, new), args.repeats)  # consecutive slots: in place
    perm = torch.randperm(args.users, generator=g)
    scattered_s = timed(lambda: store.update(users[perm], new[perm]), args.repeats)  # gather/scatter
    batch = batch_of(hist)
    with torch.inference_mode():
        reencode_s = timed(lambda: model.user_representation(batch), max(2, args.repeats // 5))
    return {
        "length": length,
        "stream_events_s": args.users / stream_s,
        "reencode_events_s": args.users / reencode_s,
        "speedup": reencode_s / stream_s,
        "scattered_events_s": args.users / scattered_s,
        "scattered_speedup": reencode_s / scattered_s,
        "stream_ms": stream_s * 1e3,
        "reencode_ms": reencode_s * 1e3,
    }


def single_user(model: Mamba4Rec, args: argparse.Namespace) -> dict[str, float]:
    store = UserStateStore.from_model(model)
    store.update([0], [1])
    item = torch.tensor([2])
    store_s = timed(lambda: store.update([0], item), args.repeats * 10)
    enc = model.encoder
    state = enc.allocate_state(1)
    x = torch.randn(1, 64)
    with torch.inference_mode():
        step_s = timed(lambda: enc.step(x, state), args.repeats * 10)
        state256 = enc.allocate_state(args.users)
        x256 = torch.randn(args.users, 64)
        step256_s = timed(lambda: enc.step(x256, state256), args.repeats * 2)
    return {
        "single_user_update_us": store_s * 1e6,
        "bare_step_b1_us": step_s * 1e6,
        "bare_step_b256_us_per_user": step256_s * 1e6 / args.users,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[50, 200, 1000])
    p.add_argument("--users", type=int, default=256)
    p.add_argument("--items", type=int, default=100_000)
    p.add_argument("--layers", type=int, default=1, help="Mamba layers (default 1, as encoder_speed.py)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (default: torch's)")
    p.add_argument("--repeats", type=int, default=20)
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build(args)
    rows = []
    print(f"{'L':>5} {'stream ev/s':>12} {'re-encode ev/s':>15} {'speedup':>8} "
          f"{'shuffled-users ev/s':>20} {'speedup':>8}")
    for length in args.lengths:
        row = one_length(model, args, length)
        rows.append(row)
        print(f"{length:>5} {row['stream_events_s']:>12.0f} {row['reencode_events_s']:>15.0f} "
              f"{row['speedup']:>7.0f}x {row['scattered_events_s']:>20.0f} "
              f"{row['scattered_speedup']:>7.0f}x", flush=True)
    single = single_user(model, args)
    print(f"single-user update {single['single_user_update_us']:.0f} us (bare encoder.step at B=1 "
          f"{single['bare_step_b1_us']:.0f} us; at B={args.users}: "
          f"{single['bare_step_b256_us_per_user']:.1f} us per user)")
    print(json.dumps({"rows": rows, "single": single, "users": args.users, "layers": args.layers,
                      "threads": torch.get_num_threads()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
