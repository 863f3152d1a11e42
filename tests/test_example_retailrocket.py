"""The RetailRocket example end to end on a tiny synthetic log, and the real-sessions benchmark's
skip path, readers and length-bucketed loader.

The end-to-end run is checked against an independent popularity computation read straight from
the ETL's parquet shards with pandas, so the example's metric plumbing (labels, targets, masks,
tie-breaking) is tested and not only its output format.
"""

from __future__ import annotations

import doctest
import gzip
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "examples" / "retailrocket" / "run.py"
BENCH = ROOT / "benchmarks" / "retailrocket_real.py"
KS = (1, 10, 20)
METRIC_KEYS = {f"{m}@{k}" for m in ("hr", "ndcg", "mrr") for k in KS}
# the script must import this checkout's package, not whatever the venv has installed
ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE",
       "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def example() -> ModuleType:
    return _load(RUN, "retailrocket_example_run")


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _load(BENCH, "retailrocket_real_bench")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path, Path]:
    """One run of the script on 5,000 synthetic events, 1 epoch, small models."""
    tmp = tmp_path_factory.mktemp("rr_example")
    work, out = tmp / "work", tmp / "out"
    cmd = [
        sys.executable, str(RUN), "--events", "5000", "--epochs", "1", "--d-model", "16",
        "--d-state", "8", "--batch-size", "128", "--work-dir", str(work), "--output-dir",
        str(out), "--no-progress",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    return json.loads(last), work, out


def _check_metrics(metrics: dict[str, float], where: str) -> None:
    assert set(metrics) == METRIC_KEYS, where
    for key, value in metrics.items():
        assert 0.0 <= value <= 1.0, f"{where} {key} = {value}"
    for k in KS:  # the three metrics agree on a hit at rank 0 and shrink in this order
        assert metrics[f"mrr@{k}"] <= metrics[f"ndcg@{k}"] + 1e-12 <= metrics[f"hr@{k}"] + 2e-12
    assert metrics["hr@1"] == pytest.approx(metrics["ndcg@1"]) == pytest.approx(metrics["mrr@1"])
    assert metrics["hr@1"] <= metrics["hr@10"] <= metrics["hr@20"], where


def test_example_json_line(tiny_run: tuple[dict[str, Any], Path, Path]) -> None:
    out, _, out_dir = tiny_run
    assert {"next_item", "next_category", "popularity", "sasrec", "etl", "seconds"} <= set(out)
    _check_metrics(out["next_item"], "mamba4rec next_item")
    _check_metrics(out["next_category"], "mamba4rec next_category")
    for model in ("popularity", "sasrec"):
        assert set(out[model]) == {"next_item", "next_category"}
        for task, metrics in out[model].items():
            _check_metrics(metrics, f"{model} {task}")
    etl = out["etl"]
    assert etl["events_read"] == 5000
    assert min(etl["rows"][s] for s in ("train", "valid", "test")) > 0
    assert out["data"] == "synthetic" and out["seconds"] > 0
    assert out["best_epoch"] == {"mamba4rec": 1, "sasrec": 1}
    assert (out_dir / "curves.png").stat().st_size > 1000
    saved = json.loads((out_dir / "results.json").read_text())
    assert saved["next_item"] == out["next_item"] and len(saved["history"]["sasrec"]) == 1
    for kind in ("mamba4rec", "sasrec"):  # trained by train.fit: resumable checkpoint + run dir
        assert (out_dir / "checkpoints" / kind / "checkpoint.pt").is_file()
        assert {p.name for p in (out_dir / kind).iterdir()} >= {
            "run_config.json", "data_info.json", "model.pt"}
        state = torch.load(out_dir / kind / "model.pt", weights_only=True)
        assert state["ec.embeddings.category.weight"].shape[0] == out["etl"]["vocab_sizes"]["category"]


def _popularity_reference(processed: Path, key: str) -> dict[str, float]:
    """Popularity by train-label count (ties: smaller id first), ranks of the test targets."""
    def column(split: str) -> pd.Series:
        files = sorted((processed / split).glob("part_*.parquet"))
        return pd.concat([pd.read_parquet(f, columns=[f"{key}_list"]) for f in files])[f"{key}_list"]

    train, test = column("train"), column("test")
    labels = np.concatenate([np.asarray(s)[1:] for s in train])
    targets = np.array([np.asarray(s)[-1] for s in test])
    size = int(max(labels.max(), targets.max(), np.concatenate(list(test)).max()))
    counts = np.bincount(labels, minlength=size + 1)
    order = sorted(range(1, size + 1), key=lambda i: (-counts[i], i))
    rank = {item: r for r, item in enumerate(order)}
    ranks = np.array([rank[t] for t in targets], dtype=np.float64)
    out = {}
    for k in KS:
        hit = ranks < k
        out[f"hr@{k}"] = hit.mean()
        out[f"ndcg@{k}"] = (hit / np.log2(ranks + 2)).mean()
        out[f"mrr@{k}"] = (hit / (ranks + 1)).mean()
    return out


@pytest.mark.parametrize(("task", "key"), [("next_item", "item"), ("next_category", "category")])
def test_example_popularity_matches_reference(
    tiny_run: tuple[dict[str, Any], Path, Path], task: str, key: str
) -> None:
    out, work, _ = tiny_run
    ref = _popularity_reference(work / "processed", key)
    got = out["popularity"][task]
    torch.testing.assert_close(
        torch.tensor([got[k] for k in sorted(ref)], dtype=torch.float64),
        torch.tensor([ref[k] for k in sorted(ref)], dtype=torch.float64),
    )


def test_example_buckets_only_the_training_loader(
    example: ModuleType, tiny_run: tuple[dict[str, Any], Path, Path]
) -> None:
    _, work, _ = tiny_run
    splits = example.make_splits(work / "processed", 32, 64, seed=0, bucket=4)
    assert (splits.train.bucket, splits.train.shuffle) == (4, True)
    assert not splits.valid.shuffle and not splits.test.shuffle
    plain = example.make_splits(work / "processed", 32, 64, seed=0).train
    rows_b, _ = splits.train.epoch_rows(0)
    rows_p, _ = plain.epoch_rows(0)
    assert sorted(rows_b.tolist()) == sorted(rows_p.tolist()) and len(splits.train) == len(plain)
    def mean_spread(loader: Any, rows: np.ndarray) -> float:
        lens = loader.input_lengths(rows)  # (R,)
        return float(np.mean([np.ptp(lens[i : i + 32]) for i in range(0, len(lens), 32)]))

    assert mean_spread(splits.train, rows_b) < 0.5 * mean_spread(plain, rows_p)
    assert example.build_parser().parse_args([]).bucket == example.BUCKET > 0


def test_example_doctests(example: ModuleType) -> None:
    result = doctest.testmod(example, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 1 and result.failed == 0


def test_example_missing_kaggle_files(example: ModuleType, tmp_path: Path) -> None:
    (tmp_path / "events.csv").write_text("timestamp,visitorid,event,itemid,transactionid\n")
    with pytest.raises(FileNotFoundError, match=r"lacks \['item_properties_part1.csv'"):
        example.prepare_raw(tmp_path, tmp_path / "work", events=100, seed=0)


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--models", "mamba4rec,gru4rec"], "--models must name some of"),
        (["--epochs", "0"], "--epochs must be >= 1, got 0"),
        (["--bucket", "-1"], "--bucket must be >= 0, got -1"),
    ],
)
def test_example_bad_arguments(example: ModuleType, argv: list[str], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        example.main(argv)


def test_example_popularity_scores_total_order(example: ModuleType) -> None:
    counts = torch.tensor([0.0, 3.0, 1.0, 3.0, 0.0, 7.0])
    scores = example.popularity_scores(counts)
    assert scores[0] == -math.inf
    assert scores[1:].argsort(descending=True).add(1).tolist() == [5, 1, 3, 2, 4]
    assert len(set(scores[1:].tolist())) == 5  # no ties, so no optimistic tie credit


# --- benchmarks/retailrocket_real.py ---------------------------------------------------------------
def test_bench_skips_without_data(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--data-dir", str(tmp_path / "absent")],
        capture_output=True, text=True, env=ENV, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("SKIP: ") and "train_sessions.txt.gz" in lines[0]
    out = json.loads(lines[-1])
    assert out["skipped"] is True and out["benchmark"] == "retailrocket_real"


def test_bench_readers(bench: ModuleType, tmp_path: Path) -> None:
    sessions = tmp_path / "s.txt.gz"
    with gzip.open(sessions, "wt") as f:
        f.write("1 2 3\n4 5\n")
    assert [s.tolist() for s in bench.read_sessions(sessions)] == [[1, 2, 3], [4, 5]]
    pairs = tmp_path / "p.tsv.gz"
    with gzip.open(pairs, "wt") as f:
        f.write("1 2\t3\n4\t4\n")
    assert [s.tolist() for s in bench.read_prefix_target(pairs)] == [[1, 2, 3], [4, 4]]


@pytest.mark.parametrize(
    ("reader", "text", "match"),
    [
        ("read_sessions", "1 2\n3 x 4\n", r"s\.gz:2: not an integer item id in '3 x 4'"),
        ("read_sessions", "1 0 2\n", r"s\.gz:1: item id 0 < 1"),
        ("read_prefix_target", "1 2\t3\n1 2 3\n", r"s\.gz:2: expected 'prefix ids<TAB>target id'"),
        ("read_prefix_target", "1\t2 3\n", r"s\.gz:1: expected 'prefix ids<TAB>target id'"),
    ],
)
def test_bench_reader_errors(bench: ModuleType, tmp_path: Path, reader: str, text: str,
                             match: str) -> None:
    path = tmp_path / "s.gz"
    with gzip.open(path, "wt") as f:
        f.write(text)
    with pytest.raises(ValueError, match=match):
        getattr(bench, reader)(path)


def test_bench_by_length_keeps_rows(bench: ModuleType) -> None:
    rows = [np.array([5, 6, 7]), np.array([1, 2]), np.array([3, 4, 8, 9]), np.array([2, 1])]
    out = bench.by_length(rows)
    assert [r.tolist() for r in out] == [[1, 2], [2, 1], [5, 6, 7], [3, 4, 8, 9]]


def test_bench_popularity_metrics(bench: ModuleType) -> None:
    counts = np.array([0, 5, 9, 5, 0])  # order 2, 1, 3, 4 (ties by id)
    got = bench.popularity_metrics(counts, np.array([2, 3, 4]))  # ranks 0, 2, 3
    assert got["hr@10"] == pytest.approx(1.0)
    assert got["mrr@10"] == pytest.approx((1 + 1 / 3 + 1 / 4) / 3)
    assert got["ndcg@10"] == pytest.approx((1 + 1 / math.log2(4) + 1 / math.log2(5)) / 3)


def test_example_run_dir_serves_raw_ids(tiny_run: tuple[dict[str, Any], Path, Path]) -> None:
    """Recommender.load(OUTPUT/mamba4rec) maps raw RetailRocket ids through the saved vocabs."""
    from torchrec_mamba import Recommender

    _, _, out_dir = tiny_run
    run = out_dir / "mamba4rec"
    vocab = pd.read_csv(run / "vocabs" / "item.csv")
    cat_vocab = set(pd.read_csv(run / "vocabs" / "category.csv")["raw"].tolist())
    rec = Recommender.load(run)
    raw = vocab["raw"].tolist()
    histories = [raw[:3], raw[5:6], raw[10:20]]
    ids, scores = rec.recommend(histories, k=10, exclude_seen=True)
    assert ids.shape == scores.shape == (3, 10)
    assert set(ids.flatten().tolist()) <= set(raw)  # raw ids, never NVTabular's null / OOV rows
    assert not set(ids[0].tolist()) & set(raw[:3])
    cats, _ = rec.recommend_categories(histories, k=1)
    assert set(cats.flatten().tolist()) <= cat_vocab | {-1}
    with pytest.raises(ValueError, match="unknown item id -5"):
        rec.recommend([[-5]])


def _fake_rr_log(bench: ModuleType, path: Path, seed: int, ndcg: float, **override: Any) -> Path:
    args = bench.build_parser().parse_args(["--seed", str(seed)])
    out = {
        "benchmark": "retailrocket_real", "seed": seed,
        "settings": {**bench.settings(args), **override},
        "mamba4rec": {"test": {k: ndcg for k in bench.AGG_METRICS}, "best_epoch": 8,
                      "epochs_run": 8},
        "sasrec": {"test": {k: ndcg / 2 for k in bench.AGG_METRICS}, "best_epoch": 7,
                   "epochs_run": 8},
        "popularity": {k: 0.01 for k in bench.AGG_METRICS},
    }
    path.write_text("INFO training...\n{\"benchmark\": \"other\"}\n" + json.dumps(out) + "\n")
    return path


def test_bench_aggregate_means_and_sample_std(bench: ModuleType, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    logs = [_fake_rr_log(bench, tmp_path / f"s{s}.log", s, v)
            for s, v in [(0, 0.2), (1, 0.3), (2, 0.4)]]
    out = bench.main(["--aggregate", *map(str, logs)])
    assert out["seeds"] == [0, 1, 2]
    assert out["mamba4rec"]["ndcg@10"]["mean"] == pytest.approx(0.3)
    assert out["mamba4rec"]["ndcg@10"]["std"] == pytest.approx(0.1)  # sample std (n - 1)
    assert out["sasrec"]["hr@20"]["mean"] == pytest.approx(0.15)
    assert out["ratio_mamba4rec_over_sasrec"]["mrr@10"] == 2.0
    assert out["mamba4rec"]["best_epochs"] == [8, 8, 8]
    text = capsys.readouterr().out
    assert "| mamba4rec | 0.3000 ± 0.1000 |" in text and "| mamba4rec / sasrec | 2.0 |" in text


def test_bench_aggregate_refuses_mixed_runs(bench: ModuleType, tmp_path: Path) -> None:
    a = _fake_rr_log(bench, tmp_path / "a.log", 0, 0.2)
    with pytest.raises(ValueError, match="seed 0 appears twice"):
        bench.main(["--aggregate", str(a), str(_fake_rr_log(bench, tmp_path / "b.log", 0, 0.3))])
    other = _fake_rr_log(bench, tmp_path / "c.log", 1, 0.3, lr=0.01)
    with pytest.raises(ValueError, match=r"c.log and .*a.log differ in \['lr'\]"):
        bench.main(["--aggregate", str(a), str(other)])
    empty = tmp_path / "empty.log"
    empty.write_text("Traceback ...\n")
    with pytest.raises(ValueError, match="empty.log: no final JSON line of retailrocket_real"):
        bench.main(["--aggregate", str(empty)])
    skipped = tmp_path / "skipped.log"
    skipped.write_text(json.dumps({"benchmark": "retailrocket_real", "skipped": True,
                                   "reason": "no data"}) + "\n")
    with pytest.raises(ValueError, match=r"skipped.log: that run was skipped \(no data\)"):
        bench.main(["--aggregate", str(skipped)])
