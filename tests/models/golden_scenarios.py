"""Seeded training scenarios whose losses were recorded with the pre-refactor ``Mamba4Rec``.

``golden_losses.json`` holds, per scenario, the loss of three Adam steps, the item / category
losses of the first step and checksums of the evaluation scores, produced by
``python -m tests.models.golden_scenarios`` on the commit before the model was split into tables,
encoder and tasks (``c453c82``). ``test_golden.py`` reruns the scenarios with today's code and
requires the same numbers: the refactor must not change training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_mamba.data.batch import SequenceBatch
from torchrec_mamba.models import (
    Mamba4Rec,
    Mamba4RecConfig,
    SampledSoftmaxConfig,
    SASRecEncoder,
    SideFeature,
)
from torchrec_mamba.modules import MambaSequenceEncoder

GOLDEN = Path(__file__).with_name("golden_losses.json")
D, ITEMS, CATS, USERS = 8, 30, 6, 5

SCENARIOS: dict[str, dict[str, Any]] = {
    "mamba_full_all": {"encoder": "mamba"},
    "mamba_sampled_last": {"encoder": "mamba", "sampled": 7, "loss_positions": "last"},
    "mamba_category_side": {"encoder": "mamba", "categories": True, "category_loss_weight": 0.5,
                            "side": True},
    "sasrec_category_input": {"encoder": "sasrec", "categories": True},
    "mamba_sampled_category": {"encoder": "mamba", "categories": True, "sampled": 5,
                               "category_loss_weight": 0.3, "item_loss_weight": 0.7},
}


def _batch(gen: torch.Generator, categories: bool, side: bool) -> SequenceBatch:
    lengths = torch.randint(1, 7, (4,), generator=gen).to(torch.int32)  # (B,)
    total = int(lengths.sum())
    items = torch.randint(1, ITEMS + 1, (total + 4,), generator=gen)
    starts = torch.cumsum(lengths, 0) - lengths
    idx = torch.cat([torch.arange(int(s), int(s) + int(n)) + i for i, (s, n) in enumerate(zip(starts, lengths, strict=True))])
    inputs, labels = items[idx], items[idx + 1]
    keys, lens = ["item"], [lengths]
    in_vals, lab_vals = [inputs], [labels]
    if categories:
        item_cat = torch.randint(1, CATS + 1, (ITEMS + 1,), generator=gen)
        keys.append("category")
        lens.append(lengths)
        in_vals.append(item_cat[inputs])
        lab_vals.append(item_cat[labels])
    f = KeyedJaggedTensor.from_lengths_sync(keys, torch.cat(in_vals), torch.cat(lens))
    y = KeyedJaggedTensor.from_lengths_sync(keys, torch.cat(lab_vals), torch.cat(lens))
    s = None
    if side:
        s = KeyedJaggedTensor.from_lengths_sync(
            ["user"], torch.randint(0, USERS, (4,), generator=gen), torch.ones(4, dtype=torch.int32))
    return SequenceBatch(features=f, labels=y, side=s)


def build_legacy(spec: dict[str, Any]) -> Mamba4Rec:
    """The scenario's model through the documented ``Mamba4Rec(config, encoder)`` constructor."""
    torch.manual_seed(0)
    if spec["encoder"] == "mamba":
        enc: torch.nn.Module = MambaSequenceEncoder(d_model=D, d_state=4, dropout=0.1, backend="reference")
    else:
        enc = SASRecEncoder(d_model=D, max_len=8, dropout=0.1)
    sampled = SampledSoftmaxConfig(num_negatives=spec["sampled"]) if spec.get("sampled") else None
    config = Mamba4RecConfig(
        num_items=ITEMS, embedding_dim=D,
        num_categories=CATS if spec.get("categories") else 0,
        category_loss_weight=spec.get("category_loss_weight", 0.0),
        item_loss_weight=spec.get("item_loss_weight", 1.0),
        loss_positions=spec.get("loss_positions", "all"),
        sampled_softmax=sampled,
        side_features=(SideFeature("user", USERS),) if spec.get("side") else (),
    )
    counts = torch.arange(ITEMS + 1, dtype=torch.float32) if sampled else None
    return Mamba4Rec(config, enc, item_counts=counts)


def run(spec: dict[str, Any], model: torch.nn.Module | None = None) -> dict[str, Any]:
    """Three seeded Adam steps, then evaluation scores; returns the numbers to compare."""
    model = build_legacy(spec) if model is None else model
    gen = torch.Generator().manual_seed(1)
    batches = [_batch(gen, bool(spec.get("categories")), bool(spec.get("side"))) for _ in range(3)]
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(2)
    losses, first = [], None
    for batch in batches:
        opt.zero_grad()
        loss, out = model(batch)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if first is None:
            first = [float(out.item_loss), float(out.category_loss), int(out.num_targets)]
    model.eval()
    with torch.no_grad():
        scores = model.score(batches[0])[:, 1:]
        result = {"losses": losses, "first": first, "score_sum": float(scores.sum()),
                  "score_abs": float(scores.abs().sum())}
        if spec.get("categories"):
            result["category_score_sum"] = float(model.category_scores(batches[0])[:, 1:].sum())
    return result


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps({k: run(v) for k, v in SCENARIOS.items()}, indent=1) + "\n")
    print(GOLDEN.read_text())
