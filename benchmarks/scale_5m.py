"""5,000,000-item Mamba4Rec on two processes: row-wise sharded table, sampled softmax, chunked eval.

Run it under torchrun (two CPU processes, gloo)::

    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 benchmarks/scale_5m.py --train-seconds 120

What it does, on every rank:

1. makes a seeded synthetic catalogue in memory (nothing on disk): ``--users`` sequences over
   ``--items`` items; a sequence starts at one of ``--anchors`` popular items (Zipf) and walks
   forward by +1..+3 ids, so the next item is learnable from the current one;
2. builds Mamba4Rec with its tables on the meta device and shards the item table row-wise with
   DMP (each rank materialises only its half, with the fused row-wise Adagrad);
3. trains with the sampled-softmax head (``--negatives`` shared negatives drawn from the
   training popularity, log-Q corrected, plus the batch's own positives) for ``--train-seconds``
   (rank 0 decides when to stop; both ranks run the same number of steps);
4. evaluates the held-out last item of ``--eval-users`` users with the chunked full ranking:
   every rank streams the whole item table through the sharded EC in ``--chunk-size`` chunks
   (:func:`torchrec_mamba.serving.chunked_topk`); no (B, N) matrix is built anywhere;
5. reports per-rank table bytes (local shards), per-rank peak RSS, sequences/s and the metrics as
   one JSON line from rank 0.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: libgomp spin-waits otherwise
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # huge pages for large torch buffers (fewer faults)

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO))

from torchrec_mamba.data.loader import SequenceLoader  # noqa: E402
from torchrec_mamba.data.split import windows_from_sequences  # noqa: E402
from torchrec_mamba.models.mamba4rec import ITEM_CANDIDATES  # noqa: E402
from torchrec_mamba.serving.topk import ItemSource, chunked_topk  # noqa: E402
from torchrec_mamba.train.config import DataInfo, RunConfig, build_model, targets_per_row  # noqa: E402
from torchrec_mamba.train.distributed import (  # noqa: E402
    EmbeddingOptimizerConfig,
    build_optimizer,
    destroy_distributed,
    init_distributed,
    shard_model,
)
from torchrec_mamba.train.loop import train_one_epoch  # noqa: E402
from torchrec_mamba.train.metrics import RankingMetrics  # noqa: E402


def make_sequences(args: argparse.Namespace) -> list[np.ndarray]:
    """Seeded synthetic sessions: Zipf-popular anchors, then forward walks of +1..+3 ids."""
    rng = np.random.default_rng(args.seed)
    anchors = rng.choice(args.items - 4 * args.max_len, size=args.anchors, replace=False) + 1
    weights = 1.0 / np.arange(1, args.anchors + 1) ** 1.1
    starts = anchors[rng.choice(args.anchors, size=args.users, p=weights / weights.sum())]
    lengths = rng.integers(args.min_len, args.max_len + 2, size=args.users)
    return [s + np.concatenate([[0], np.cumsum(rng.integers(1, 4, size=n - 1))])
            for s, n in zip(starts, lengths, strict=True)]


def table_bytes(model: torch.nn.Module) -> int:
    """Bytes of the embedding rows this rank holds (local shards of the sharded tables)."""
    total = 0
    for name, value in model.state_dict().items():
        if ".ec." not in f".{name}" and not name.startswith("ec."):
            continue
        shards = value.local_shards() if hasattr(value, "local_shards") else None
        if shards is not None:
            total += sum(s.tensor.numel() * s.tensor.element_size() for s in shards)
    return total


class _TimeUp(Exception):
    """Raised from the batch hook when rank 0's clock says the training time is over."""


def train(model: Any, optimizer: Any, loader: SequenceLoader, args: argparse.Namespace,
          ctx: Any) -> dict[str, float]:
    """Time-bounded training through the library's ``train_one_epoch`` (sparse-dist pipeline);
    rank 0's clock decides the stop for both ranks (checked after every step)."""
    t0, stop, steps = time.perf_counter(), torch.zeros(1), [0]
    losses: list[float] = []

    def hook(epoch: int, done: int) -> None:
        steps[0] += 1
        stop.fill_(float(time.perf_counter() - t0 > args.train_seconds))
        dist.broadcast(stop, src=0)
        if stop.item():
            raise _TimeUp
        if ctx.is_main and steps[0] % 10 == 0:
            rate = steps[0] * args.batch_size * ctx.world_size / (time.perf_counter() - t0)
            print(f"step {steps[0]}: {rate:.0f} seq/s", flush=True)

    epoch = 0
    try:
        while True:
            loader.set_epoch(epoch)
            losses.append(train_one_epoch(model, optimizer, loader, ctx, progress=False,
                                          epoch=epoch, on_batch_end=hook))
            epoch += 1
    except _TimeUp:
        pass
    seconds = time.perf_counter() - t0
    return {"steps": steps[0], "seconds": seconds,
            "seq_per_s": steps[0] * args.batch_size * ctx.world_size / seconds,
            "epoch_losses": losses}


@torch.no_grad()
def evaluate(model: Any, loader: SequenceLoader, args: argparse.Namespace) -> dict[str, float]:
    """Chunked full ranking: the sharded table is streamed through the EC, chunk by chunk."""
    inner = model.module
    model.eval()
    items = ItemSource.from_lookup(lambda ids: inner._lookup(ITEM_CANDIDATES, ids), args.items)
    metrics = RankingMetrics(ks=(10, 20), device="cpu")
    pessimistic = RankingMetrics(ks=(10, 20), ties="pessimistic", device="cpu")
    for batch in loader:
        user = inner.user_representation(batch)  # (B, D)
        out = chunked_topk(user, items, k=10, targets=batch.targets(), chunk_size=args.chunk_size)
        metrics.update_counts(out.above, out.tied, out.nan, mask=batch.mask)
        pessimistic.update_counts(out.above, out.tied, out.nan, mask=batch.mask)
    first = inner._lookup(ITEM_CANDIDATES, torch.arange(1, 1001))  # (1000, D) a sample of rows
    zero_rows = float((first.abs().sum(1) == 0).double().mean())
    return {**metrics.compute(), "pessimistic": pessimistic.compute(), "zero_rows_sample": zero_rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=5_000_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--users", type=int, default=200_000)
    p.add_argument("--anchors", type=int, default=2000)
    p.add_argument("--min-len", type=int, default=5)
    p.add_argument("--max-len", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=256, help="rows per rank per step")
    p.add_argument("--negatives", type=int, default=2048)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--table-lr", type=float, default=0.05)
    p.add_argument("--train-seconds", type=float, default=120.0)
    p.add_argument("--eval-users", type=int, default=2048)
    p.add_argument("--chunk-size", type=int, default=65_536)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    ctx = init_distributed(device="cpu")
    if ctx.world_size < 2:
        print("run under torchrun --nproc_per_node=2 (row-wise sharding needs two ranks)")
    torch.manual_seed(args.seed)
    seqs = make_sequences(args)
    train_part = windows_from_sequences("train", [s[:-1] for s in seqs], args.items, args.max_len)
    test_part = windows_from_sequences("test", seqs[: args.eval_users], args.items, args.max_len)
    counts = torch.from_numpy(np.bincount(train_part.values, minlength=args.items + 1))
    cfg = RunConfig(d_model=args.dim, num_layers=1, d_state=32, dropout=0.2,
                    max_len=args.max_len, sampled_softmax=args.negatives)
    info = DataInfo(num_items=args.items,
                    targets_per_row=targets_per_row(np.diff(train_part.offsets) - 1))
    # tables on meta: DMP materialises only each rank's shard
    model = build_model(cfg, info, device="meta", item_counts=counts)
    emb_opt = EmbeddingOptimizerConfig("rowwise_adagrad", lr=args.table_lr)
    dmp = shard_model(model, "row_wise", ctx, emb_opt)
    optimizer = build_optimizer(dmp, args.lr, 0.0, emb_opt)
    loader = SequenceLoader(train_part, args.batch_size, shuffle=True, seed=args.seed,
                            drop_last=True, rank=ctx.rank, world_size=ctx.world_size)
    test_loader = SequenceLoader(test_part, 1024, shuffle=False, seed=0, rank=ctx.rank,
                                 world_size=ctx.world_size, sort_by_length=True)
    local = torch.tensor([table_bytes(dmp)], dtype=torch.float64)
    gathered = [torch.zeros_like(local) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, local)
    trained = train(dmp, optimizer, loader, args, ctx)
    t0 = time.perf_counter()
    test = evaluate(dmp, test_loader, args)
    eval_s = time.perf_counter() - t0
    rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024], dtype=torch.float64)
    rss_all = [torch.zeros_like(rss) for _ in range(ctx.world_size)]
    dist.all_gather(rss_all, rss)
    if ctx.is_main:
        full = (args.items + 1) * args.dim * 4
        print(json.dumps({
            "items": args.items, "dim": args.dim, "world_size": ctx.world_size,
            "table_bytes_per_rank": [int(t) for t in gathered], "table_bytes_full": full,
            "peak_rss_mb_per_rank": [round(float(r), 1) for r in rss_all],
            "train": trained, "test": test, "eval_seconds": eval_s,
            "eval_users": len(test_part), "train_rows": len(train_part),
            "negatives": args.negatives, "threads": torch.get_num_threads(),
        }), flush=True)
    destroy_distributed(ctx)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
