"""`benchmarks/quality.py` without training: aggregation, formatting, reuse of finished runs.

Fake run dirs hold a ``metrics.json`` (with the config the benchmark's own train command
resolves to) and a ``test_masked.json``, so ``main`` only reads them.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent

# (model, seed) -> test NDCG@10 unmasked; HR@10 = 2x, MRR@10 = x / 2, masked = +0.01
NDCG = {("mamba4rec", 0): 0.04, ("mamba4rec", 1): 0.05, ("mamba4rec", 2): 0.06,
        ("sasrec", 0): 0.03, ("sasrec", 1): 0.04, ("sasrec", 2): 0.05}


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("quality_bench", ROOT / "benchmarks" / "quality.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["quality_bench"] = module
    spec.loader.exec_module(module)
    return module


def _metrics(ndcg: float, offset: float = 0.0) -> dict[str, float]:
    return {"hr@10": 2 * ndcg + offset, "ndcg@10": ndcg + offset, "mrr@10": ndcg / 2 + offset}


def fake_runs(bench: ModuleType, out: Path, data_dir: Path, seeds: int = 3) -> None:
    for (model, seed), ndcg in NDCG.items():
        if seed >= seeds:
            continue
        run = out / f"beauty_{model}_seed{seed}"
        run.mkdir(parents=True)
        cmd = bench.train_command("beauty", model, seed, data_dir, run, [])
        history = [{"epoch": e, "valid": {"ndcg@10": ndcg * e / 3}} for e in (1, 2, 3 + seed)]
        (run / "metrics.json").write_text(json.dumps({
            "test": _metrics(ndcg), "valid": _metrics(ndcg), "epochs_run": 3 + seed,
            "best_epoch": 3 + seed, "history": history,
            "config": {**bench.expected_config(cmd), "num_items": 7},
        }))
        (run / bench.MASKED_FILE).write_text(json.dumps({"test": _metrics(ndcg, 0.01)}))


def test_mean_std_is_the_sample_std(bench: ModuleType) -> None:
    assert bench.mean_std([0.1, 0.2, 0.3]) == pytest.approx((0.2, 0.1))  # sqrt(0.02 / 2)
    mean, std = bench.mean_std([0.5])
    assert mean == 0.5 and math.isnan(std)
    with pytest.raises(ValueError, match="at least one value"):
        bench.mean_std([])
    assert bench.fmt(0.08461, 0.00123) == "0.0846 ± 0.0012"
    assert bench.fmt(0.08461, math.nan) == "0.0846"


def test_main_aggregates_finished_runs_without_training(
    bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, data = tmp_path / "out", tmp_path / "data"
    data.mkdir()
    fake_runs(bench, out, data)
    plot = tmp_path / "curves.png"
    assert bench.main(["--data-dir", str(data), "--out-dir", str(out), "--datasets", "beauty",
                       "--seeds", "3", "--plot", str(plot)]) == 0
    text = capsys.readouterr().out
    assert "$ " not in text  # nothing was trained or evaluated again
    assert text.count("reusing ") == 6 and plot.stat().st_size > 0
    summary = json.loads(text.strip().splitlines()[-1])
    mamba = summary["runs"]["beauty/mamba4rec"]
    assert mamba["seeds"] == [0, 1, 2] and mamba["epochs_run"] == [3, 4, 5]
    assert mamba["unmasked"]["ndcg@10"] == pytest.approx({"mean": 0.05, "std": 0.01})
    assert mamba["unmasked"]["hr@10"] == pytest.approx({"mean": 0.10, "std": 0.02})
    assert mamba["masked"]["mrr@10"] == pytest.approx({"mean": 0.035, "std": 0.005})
    ratios = summary["ratios"]["beauty"]
    assert ratios["unmasked"]["ndcg@10"] == pytest.approx(0.05 / 0.04)
    assert ratios["masked"]["ndcg@10"] == pytest.approx(0.06 / 0.05)
    assert "--seed 2" in summary["commands"]["beauty/sasrec/seed2"]
    # the markdown table: published rows, one row per model, the ratio row
    table = [line for line in text.splitlines() if line.startswith("| beauty")]
    assert table[0].startswith("| beauty | Mamba4Rec, 1 layer (published) | | 0.073 | 0.043")
    assert table[2] == ("| beauty | mamba4rec | 3 | 0.1000 ± 0.0200 | 0.0500 ± 0.0100 | "
                        "0.0250 ± 0.0050 | 0.1100 ± 0.0200 | 0.0600 ± 0.0100 | 0.0350 ± 0.0050 | "
                        "3 (3), 4 (4), 5 (5) |")
    # masked: HR 0.11 / 0.09, NDCG 0.06 / 0.05, MRR 0.035 / 0.03
    assert table[4] == ("| beauty | **mamba4rec / sasrec** | | 1.250 | 1.250 | 1.250 | 1.222 | "
                        "1.200 | 1.167 | |")
    assert "beauty/sasrec      unmasked (seeds 3)  hr@10 0.0800 ± 0.0200" in text


def test_one_seed_has_no_std_and_strict_json(
    bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, data = tmp_path / "out", tmp_path / "data"
    data.mkdir()
    fake_runs(bench, out, data, seeds=1)
    assert bench.main(["--data-dir", str(data), "--out-dir", str(out), "--datasets", "beauty",
                       "--seeds", "1", "--no-plot"]) == 0
    text = capsys.readouterr().out
    summary = json.loads(text.strip().splitlines()[-1])  # NaN would not parse as strict JSON
    assert summary["runs"]["beauty/sasrec"]["unmasked"]["ndcg@10"] == {"mean": 0.03, "std": None}
    assert "| beauty | sasrec | 1 | 0.0600 | 0.0300 | 0.0150 | 0.0700 |" in text


def test_a_run_with_another_config_is_not_reused(bench: ModuleType, tmp_path: Path) -> None:
    out, data = tmp_path / "out", tmp_path / "data"
    data.mkdir()
    fake_runs(bench, out, data, seeds=1)
    with pytest.raises(SystemExit, match=r"beauty_mamba4rec_seed0 was trained with another "
                                         r"config \(lr: 0\.\d+ -> 0\.5\)"):
        bench.main(["--data-dir", str(data), "--out-dir", str(out), "--datasets", "beauty",
                    "--seeds", "1", "--no-plot", "--extra-args", "--lr 0.5"])


def test_skips_without_data(bench: ModuleType, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    assert bench.main(["--data-dir", str(tmp_path / "absent")]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("SKIP: ") and json.loads(lines[-1])["skipped"] is True


def test_seed_ids_pick_exactly_those_runs(
    bench: ModuleType, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, data = tmp_path / "out", tmp_path / "data"
    data.mkdir()
    fake_runs(bench, out, data)
    assert bench.main(["--data-dir", str(data), "--out-dir", str(out), "--datasets", "beauty",
                       "--models", "sasrec", "--seed-ids", "2", "1", "2", "--no-plot"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["runs"]["beauty/sasrec"]["seeds"] == [2, 1]  # as given, duplicates dropped
    assert summary["runs"]["beauty/sasrec"]["unmasked"]["ndcg@10"]["mean"] == pytest.approx(0.045)
    with pytest.raises(SystemExit):
        bench.main(["--data-dir", str(data), "--seed-ids", "-1"])


def test_a_field_missing_from_an_old_run_counts_as_its_default(bench: ModuleType) -> None:
    cmd = bench.train_command("beauty", "mamba4rec", 0, Path("data"), Path("run"), [])
    expected = bench.expected_config(cmd)
    old = {k: v for k, v in expected.items() if k != "label_smoothing"}  # made before the field
    assert bench.config_mismatch(old, expected) == []
    smoothed = bench.expected_config(cmd + ["--label-smoothing", "0.1"])
    assert bench.config_mismatch(old, smoothed) == ["label_smoothing: 0.0 -> 0.1"]


def test_a_run_made_before_ema_decay_existed_had_no_weight_average(bench: ModuleType) -> None:
    cmd = bench.train_command("beauty", "sasrec", 0, Path("data"), Path("run"), [])
    expected = bench.expected_config(cmd)  # today's default: ema_decay 0.999
    old = {k: v for k, v in expected.items() if k != "ema_decay"}
    assert bench.config_mismatch(old, expected) == ["ema_decay: 0.0 -> 0.999"]
    live = bench.expected_config(cmd + ["--ema-decay", "0"])
    assert bench.config_mismatch(old, live) == []
