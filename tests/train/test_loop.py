"""fit / evaluate: full-ranking evaluation against the metric functions, early stopping, test at
the best epoch, and the plain loop against TorchRec's TrainPipelineBase."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import torchrec_mamba.train.loop as loop
from torchrec_mamba.data import SequenceData, SequenceLoader, leave_one_out
from torchrec_mamba.models import Mamba4Rec, Mamba4RecConfig
from torchrec_mamba.modules import MambaSequenceEncoder
from torchrec_mamba.train.distributed import (
    DistributedContext,
    EmbeddingOptimizerConfig,
    build_optimizer,
)
from torchrec_mamba.train.loop import FitConfig, evaluate, fit, train_one_epoch
from torchrec_mamba.train.metrics import ranking_metrics

CTX = DistributedContext(0, 1, 0, torch.device("cpu"), None, False)


def tiny_split(num_users: int = 40, num_items: int = 25):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(0)
    seqs = []
    for _ in range(num_users):
        start, n = int(rng.integers(1, num_items + 1)), int(rng.integers(4, 10))
        seqs.append([(start + i - 1) % num_items + 1 for i in range(n)])
    data = SequenceData.from_lists(seqs)
    return data, leave_one_out(data, max_len=6)


def build(num_items: int, dropout: float = 0.2, seed: int = 0):  # type: ignore[no-untyped-def]
    torch.manual_seed(seed)
    enc = MambaSequenceEncoder(d_model=8, d_state=4, dropout=dropout, backend="reference")
    model = Mamba4Rec(Mamba4RecConfig(num_items=num_items, embedding_dim=8), enc)
    opt = build_optimizer(model, 1e-2, 0.0, EmbeddingOptimizerConfig("adam", lr=1e-2))
    return model, opt


def test_evaluate_matches_ranking_metrics() -> None:
    data, split = tiny_split()
    model, _ = build(data.num_items)
    loader = SequenceLoader(split.test, batch_size=7, shuffle=False, seed=0)
    got = evaluate(model, loader, CTX, ks=(1, 5, 10))
    model.eval()
    whole = SequenceLoader(split.test, batch_size=len(split.test), shuffle=False, seed=0)
    batch = next(iter(whole))
    with torch.no_grad():
        expected = ranking_metrics(model.score(batch), batch.targets(), ks=(1, 5, 10))
    assert got.keys() == expected.keys()
    for k in got:
        assert got[k] == pytest.approx(expected[k], abs=1e-12), k
    assert model.training is False  # evaluate restores the previous mode


def test_evaluate_mask_seen_changes_ranks() -> None:
    data, split = tiny_split()
    model, _ = build(data.num_items)
    loader = SequenceLoader(split.test, batch_size=16, shuffle=False, seed=0)
    plain = evaluate(model, loader, CTX, ks=(10,))
    masked = evaluate(model, loader, CTX, ks=(10,), mask_seen=True)
    assert masked["mrr@10"] >= plain["mrr@10"]  # removing seen items can only lift the target
    assert masked != plain


def test_plain_loop_equals_train_pipeline_base() -> None:
    data, split = tiny_split()
    weights = []
    for pipeline in ("plain", "base"):
        model, opt = build(data.num_items)
        loader = SequenceLoader(split.train, batch_size=8, shuffle=True, seed=1)
        train_one_epoch(model, opt, loader, CTX, pipeline=pipeline, progress=False)  # type: ignore[arg-type]
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k


def test_fit_learns_and_reports_best_epoch() -> None:
    data, split = tiny_split()
    model, opt = build(data.num_items, dropout=0.0)
    train = SequenceLoader(split.train, batch_size=8, shuffle=True, seed=1)
    valid = SequenceLoader(split.valid, batch_size=16, shuffle=False, seed=0)
    test = SequenceLoader(split.test, batch_size=16, shuffle=False, seed=0)
    before = evaluate(model, valid, CTX)["ndcg@10"]
    result = fit(model, opt, train, valid, test, FitConfig(epochs=4, progress=False), CTX)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < losses[0]
    assert result.valid["ndcg@10"] > before + 0.1  # the cyclic pattern is easy to learn
    assert set(result.test) == {f"{m}@{k}" for m in ("hr", "ndcg", "mrr") for k in (5, 10, 20)}
    assert result.epochs_run == 4 and 1 <= result.best_epoch <= 4
    best = result.history[result.best_epoch - 1]["valid"]
    assert best == result.valid


def test_early_stopping_and_test_at_best_epoch(monkeypatch: pytest.MonkeyPatch) -> None:
    data, split = tiny_split()
    model, opt = build(data.num_items)
    valid_scores = iter([0.1, 0.3, 0.2, 0.25, 0.29, 0.5])
    calls: list[str] = []

    def fake_evaluate(model, loader, ctx, ks, mask_seen):  # type: ignore[no-untyped-def]
        if loader.part.name == "valid":
            calls.append("valid")
            return {"ndcg@10": next(valid_scores), "hr@10": 0.0}
        calls.append("test")
        return {"ndcg@10": 100.0 + len(calls), "hr@10": 0.0}

    monkeypatch.setattr(loop, "evaluate", fake_evaluate)
    train = SequenceLoader(split.train, batch_size=16, shuffle=True, seed=1)
    valid = SequenceLoader(split.valid, batch_size=16, shuffle=False, seed=0)
    test = SequenceLoader(split.test, batch_size=16, shuffle=False, seed=0)
    result = fit(model, opt, train, valid, test, FitConfig(epochs=10, patience=3, progress=False), CTX)
    assert result.best_epoch == 2 and result.epochs_run == 5 and result.stopped_early
    assert result.valid["ndcg@10"] == 0.3
    # test is evaluated only when validation improves (epochs 1 and 2); the epoch-2 one is kept
    assert calls == ["valid", "test", "valid", "test", "valid", "valid", "valid"]
    assert result.test["ndcg@10"] == 104.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"epochs": 0}, "epochs must be an int >= 1"),
        ({"patience": 0}, "patience must be an int >= 1"),
        ({"resume": True}, "resume=True needs a checkpoint_dir"),
        ({"monitor": "ndcg@7"}, "monitor 'ndcg@7' must be"),
        ({"pipeline": "fast"}, "unknown pipeline 'fast'"),
        ({"lr_schedule": "linear"}, r"lr_schedule must be one of \('constant', 'cosine'\), got 'linear'"),
    ],
)
def test_fit_config_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        FitConfig(**kwargs)  # type: ignore[arg-type]


def test_lr_factor_values_and_unknown_schedule() -> None:
    assert [loop.lr_factor("constant", e, 5) for e in range(5)] == [1.0] * 5
    cosine = [loop.lr_factor("cosine", e, 5) for e in range(5)]
    assert cosine[0] == 1.0 and cosine[2] == pytest.approx((1 + np.cos(np.pi * 2 / 5)) / 2)
    assert all(a > b > 0 for a, b in zip(cosine, cosine[1:], strict=False))  # decreasing, never 0
    with pytest.raises(ValueError, match="unknown lr schedule 'step'"):
        loop.lr_factor("step", 0, 5)


@pytest.mark.parametrize("lr_schedule", ["constant", "cosine"])
def test_fit_sets_every_param_groups_lr_from_the_schedule_each_epoch(lr_schedule: str) -> None:
    data, split = tiny_split()
    torch.manual_seed(0)
    enc = MambaSequenceEncoder(d_model=8, d_state=4, dropout=0.0, backend="reference")
    model = Mamba4Rec(Mamba4RecConfig(num_items=data.num_items, embedding_dim=8), enc)
    # decayed and undecayed dense groups plus the table's own optimizer and lr
    opt = build_optimizer(model, 1e-2, 0.1, EmbeddingOptimizerConfig("adagrad", lr=0.05))
    base = [g["lr"] for g in opt.param_groups]
    assert len(base) >= 3 and 0.05 in base and 1e-2 in base
    seen: dict[int, list[float]] = {}

    def hook(epoch: int, done: int) -> None:
        seen.setdefault(epoch, [g["lr"] for g in opt.param_groups])

    train = SequenceLoader(split.train, batch_size=16, shuffle=True, seed=1)
    valid = SequenceLoader(split.valid, batch_size=16, shuffle=False, seed=0)
    config = FitConfig(epochs=4, patience=4, progress=False, lr_schedule=lr_schedule)
    fit(model, opt, train, valid, valid, config, CTX, on_batch_end=hook)
    assert sorted(seen) == [0, 1, 2, 3]
    for epoch, lrs in seen.items():
        factor = loop.lr_factor(lr_schedule, epoch, 4)
        assert lrs == pytest.approx([b * factor for b in base]), epoch


def test_sparse_dist_needs_dmp() -> None:
    data, split = tiny_split()
    model, opt = build(data.num_items)
    loader = SequenceLoader(split.train, batch_size=8, shuffle=True, seed=1)
    with pytest.raises(ValueError, match="'sparse_dist' needs a DistributedModelParallel"):
        train_one_epoch(model, opt, loader, CTX, pipeline="sparse_dist", progress=False)


# --- parquet: any Loader, every task, checkpoint + exact resume ---------------------------------
def _parquet_splits(tmp_path):  # type: ignore[no-untyped-def]
    import pandas as pd

    from torchrec_mamba.data import ParquetSequenceLoader

    rng = np.random.default_rng(0)
    for name, rows in (("train", 60), ("valid", 12), ("test", 12)):
        items = [list(rng.integers(1, 21, int(rng.integers(2, 8)))) for _ in range(rows)]
        cats = [[int(i) % 4 + 1 for i in row] for row in items]
        (tmp_path / name).mkdir(exist_ok=True)
        pd.DataFrame({"item_list": items, "category_list": cats}).to_parquet(
            tmp_path / name / "part_0.parquet")
    return tuple(ParquetSequenceLoader(tmp_path / n, batch_size=8, mode="train" if n == "train"
                                       else "eval", seed=3, bucket=2 if n == "train" else 0)
                 for n in ("train", "valid", "test"))


def _parquet_run(tmp_path, ckpt, hook=None, resume=False, lr_schedule="constant", ema_decay=0.0):  # type: ignore[no-untyped-def]
    from torchrec_mamba.train.config import DataInfo, RunConfig, build_model

    train, valid, test = _parquet_splits(tmp_path)
    torch.manual_seed(0)
    cfg = RunConfig(d_model=8, d_state=4, num_layers=1, backend="reference", dropout=0.2,
                    category_loss_weight=0.5)
    model = build_model(cfg, DataInfo(num_items=20, num_categories=4))
    opt = build_optimizer(model, 1e-2, 0.0, EmbeddingOptimizerConfig("adam", lr=1e-2))
    config = FitConfig(epochs=3, patience=3, progress=False, all_tasks=True,
                       checkpoint_dir=str(ckpt), resume=resume,
                       best_model_path=str(ckpt / "model.pt"), lr_schedule=lr_schedule,
                       ema_decay=ema_decay)
    return fit(model, opt, train, valid, test, config, CTX, on_batch_end=hook), model


class _Crash(Exception):
    pass


@pytest.mark.parametrize(("lr_schedule", "ema_decay"), [("constant", 0.0), ("cosine", 0.0), ("constant", 0.8)])
def test_parquet_training_resumes_exactly_after_a_crash(tmp_path, lr_schedule, ema_decay) -> None:  # type: ignore[no-untyped-def]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    whole, model = _parquet_run(tmp_path / "a", tmp_path / "a" / "ckpt", lr_schedule=lr_schedule,
                                ema_decay=ema_decay)
    assert set(whole.test_tasks) == {"next_item", "next_category"}
    assert whole.test == whole.test_tasks["next_item"]
    assert all(set(h["tasks"]) == {"next_item", "next_category"} for h in whole.history)
    best = torch.load(tmp_path / "a" / "ckpt" / "model.pt", weights_only=True)
    assert best.keys() == model.state_dict().keys()

    def crash(epoch: int, done: int) -> None:
        if (epoch, done) == (1, 3):  # mid-way through the 2nd epoch, after epoch 1's checkpoint
            raise _Crash

    ckpt = tmp_path / "b" / "ckpt"
    with pytest.raises(_Crash):
        _parquet_run(tmp_path / "b", ckpt, hook=crash, lr_schedule=lr_schedule, ema_decay=ema_decay)
    # the resumed run continues the schedule at epoch 2 (its loaded param groups hold epoch 1's
    # lr) and the weight average where epoch 1 left it (it is in the checkpoint)
    resumed, _ = _parquet_run(tmp_path / "b", ckpt, resume=True, lr_schedule=lr_schedule,
                              ema_decay=ema_decay)
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in whole.history]
    assert [h["valid"] for h in resumed.history] == [h["valid"] for h in whole.history]
    assert resumed.test_tasks == whole.test_tasks and resumed.valid == whole.valid
    assert resumed.best_epoch == whole.best_epoch
    resumed_best = torch.load(ckpt / "model.pt", weights_only=True)
    assert all(torch.equal(resumed_best[k], v) for k, v in best.items())


def test_parquet_loader_state_mismatch_is_refused(tmp_path) -> None:  # type: ignore[no-untyped-def]
    train, _, _ = _parquet_splits(tmp_path)
    state = {**train.state_dict(), "batch_size": 99}
    with pytest.raises(ValueError, match="cannot resume: saved batch_size=99 but this loader has"):
        train.load_state_dict(state)
