"""A plain, self-contained SASRec: the reference our trainer must match (issue 10).

Nothing from ``torchrec_mamba.models``/``modules``/``train`` is used for the model or the loop:
pure PyTorch, left-padded sequences, pre-LayerNorm blocks, item embeddings scaled by sqrt(d) plus
learned positions, dropout everywhere, tied output with a full softmax and cross-entropy at every
non-padding position, Adam, no early stopping. Only the data protocol is shared with the library
(reader and leave-one-out split) so the numbers are comparable; metrics are computed here too.

Protocol: leave-one-out, full ranking over all items, seen items not masked; the reported test
metrics are those of the epoch with the best validation NDCG@10 (it trains every epoch; the
selection never looks at test).

Example::

    python benchmarks/plain_sasrec.py --data ../shared/data/amazon-beauty/Beauty.txt --epochs 80
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # huge pages for large torch buffers (fewer faults)

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from torchrec_mamba.data import leave_one_out, load_sequences  # noqa: E402


def left_padded(part, rows: np.ndarray, max_len: int) -> tuple[Tensor, Tensor]:  # type: ignore[no-untyped-def]
    """Inputs (B, L) and next-item labels (B, L) of window rows, right-aligned (0 = padding)."""
    x = np.zeros((len(rows), max_len), dtype=np.int64)
    y = np.zeros((len(rows), max_len), dtype=np.int64)
    for i, r in enumerate(rows):
        w = part.row(int(r))
        n = len(w) - 1
        x[i, max_len - n:] = w[:-1]
        y[i, max_len - n:] = w[1:]
    return torch.from_numpy(x), torch.from_numpy(y)


class Block(nn.Module):
    def __init__(self, d: int, heads: int, p: float) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=p, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Dropout(p), nn.Linear(4 * d, d))
        self.drop = nn.Dropout(p)

    def forward(self, h: Tensor, causal: Tensor) -> Tensor:
        q = self.ln1(h)
        h = h + self.drop(self.attn(q, q, q, attn_mask=causal, need_weights=False)[0])
        return h + self.drop(self.ffn(self.ln2(h)))


class PlainSASRec(nn.Module):
    def __init__(self, num_items: int, d: int, layers: int, heads: int, max_len: int, p: float) -> None:
        super().__init__()
        self.item = nn.Embedding(num_items + 1, d, padding_idx=0)
        self.pos = nn.Embedding(max_len, d)
        self.blocks = nn.ModuleList(Block(d, heads, p) for _ in range(layers))
        self.drop, self.ln = nn.Dropout(p), nn.LayerNorm(d)
        nn.init.normal_(self.item.weight, std=0.02)
        with torch.no_grad():
            self.item.weight[0].zero_()
        self.d = d

    def forward(self, x: Tensor) -> Tensor:
        length = x.shape[1]
        h = self.item(x) * math.sqrt(self.d) + self.pos.weight[None, :length]  # (B, L, D)
        h = self.drop(h) * (x > 0)[..., None]
        causal = torch.ones(length, length, dtype=torch.bool).triu(1)  # True = masked
        for block in self.blocks:
            h = block(h, causal) * (x > 0)[..., None]
        return self.ln(h)  # (B, L, D)

    def logits(self, h: Tensor) -> Tensor:
        return h @ self.item.weight[1:].T  # (T, I): item ids 1..I


@torch.no_grad()
def evaluate(model: PlainSASRec, part, max_len: int, batch: int = 1024) -> dict[str, float]:  # type: ignore[no-untyped-def]
    model.eval()
    sums = {f"{m}@{k}": 0.0 for m in ("hr", "ndcg", "mrr") for k in (5, 10, 20)}
    n = len(part)
    for start in range(0, n, batch):
        rows = np.arange(start, min(start + batch, n))
        x, y = left_padded(part, rows, max_len)
        scores = model.logits(model(x)[:, -1])  # (B, I)
        target = y[:, -1] - 1  # (B,)
        t_score = scores.gather(1, target[:, None])
        rank = (scores > t_score).sum(1)  # 0-based, ties optimistic
        for k in (5, 10, 20):
            hit = (rank < k).double()
            sums[f"hr@{k}"] += float(hit.sum())
            sums[f"ndcg@{k}"] += float((hit / torch.log2(rank.double() + 2)).sum())
            sums[f"mrr@{k}"] += float((hit / (rank.double() + 1)).sum())
    model.train()
    return {key: v / n for key, v in sums.items()}


def main(argv: list[str] | None = None) -> dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="../shared/data/amazon-beauty/Beauty.txt")
    parser.add_argument("--epochs", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--dropout", type=float, default=0.5)
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="write the JSON summary here too")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    split = leave_one_out(load_sequences(f"sasrec:{args.data}"), max_len=args.max_len)
    model = PlainSASRec(split.train.num_items, args.d_model, args.layers, args.heads, args.max_len,
                        args.dropout)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    best: dict[str, object] = {"valid": {"ndcg@10": -1.0}}
    history = []
    for epoch in range(args.epochs):
        start = time.perf_counter()
        order = rng.permutation(len(split.train))
        total = 0.0
        for b in range(0, len(order), args.batch_size):
            x, y = left_padded(split.train, order[b:b + args.batch_size], args.max_len)
            h = model(x)  # (B, L, D)
            real = y > 0
            loss = F.cross_entropy(model.logits(h[real]), y[real] - 1)
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss)
        seconds = time.perf_counter() - start
        valid = evaluate(model, split.valid, args.max_len)
        history.append({"epoch": epoch + 1, "loss": total, "valid_ndcg@10": valid["ndcg@10"],
                        "train_seconds": seconds})
        improved = valid["ndcg@10"] > best["valid"]["ndcg@10"]  # type: ignore[index]
        if improved:
            best = {"valid": valid, "test": evaluate(model, split.test, args.max_len),
                    "best_epoch": epoch + 1}
        print(f"epoch {epoch + 1}: valid ndcg@10 {valid['ndcg@10']:.4f}{' *' if improved else ''} "
              f"({seconds:.1f}s)", file=sys.stderr, flush=True)
    report = {**best, "epochs_run": args.epochs, "history": history, "config": vars(args)}
    text = json.dumps(report)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    print(text, flush=True)
    return report


if __name__ == "__main__":
    main()
