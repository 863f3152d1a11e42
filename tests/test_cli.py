"""`torchrec-mamba` end to end on a tiny SASRec-format file: metrics.json, the last stdout line,
bad-file errors, and a run killed with SIGKILL mid-epoch that resumes to the same test metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from torchrec_mamba.cli import main

KEYS = {f"{m}@{k}" for m in ("hr", "ndcg", "mrr") for k in (5, 10, 20)}


def write_tiny(path: Path, users: int = 40, items: int = 25) -> Path:
    rng = np.random.default_rng(0)
    lines = []
    for u in range(1, users + 1):
        start, n = int(rng.integers(1, items + 1)), int(rng.integers(4, 10))
        lines.append(" ".join(str(x) for x in [u] + [(start + i - 1) % items + 1 for i in range(n)]))
    path.write_text("\n".join(lines) + "\n")
    return path


def train_args(data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train", "--data", f"sasrec:{data}", "--output", str(out), "--epochs", "3",
        "--d-model", "8", "--d-state", "4", "--max-len", "6", "--batch-size", "8",
        "--dropout", "0.2", "--backend", "reference", "--seed", "3", "--no-progress", *extra,
    ]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("data") / "tiny.txt")


@pytest.fixture(scope="module")
def uninterrupted_dir(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert main(train_args(tiny, out)) == 0
    return out


@pytest.fixture(scope="module")
def uninterrupted(uninterrupted_dir: Path) -> dict[str, Any]:
    return json.loads((uninterrupted_dir / "metrics.json").read_text())


def _rebuilt_test_metrics(run_dir: Path) -> dict[str, float]:
    """The test metrics of ``run_dir``'s model.pt, rebuilt from its run_config / data_info."""
    import torch

    from torchrec_mamba.cli import _loaders
    from torchrec_mamba.data import load_sequences
    from torchrec_mamba.train.config import DataInfo, RunConfig, build_model
    from torchrec_mamba.train.distributed import DistributedContext
    from torchrec_mamba.train.loop import evaluate

    cfg = RunConfig.load(run_dir)
    model = build_model(cfg, DataInfo.load(run_dir))
    model.load_state_dict(torch.load(run_dir / "model.pt", weights_only=True))
    ctx = DistributedContext(0, 1, 0, torch.device("cpu"), None, False)
    _, _, _, test = _loaders(cfg, load_sequences(cfg.data), ctx)
    return evaluate(model, test, ctx)


def test_run_dir_rebuilds_the_best_model_without_training(
    uninterrupted_dir: Path, uninterrupted: dict[str, Any]
) -> None:
    """run_config.json + data_info.json + model.pt give back the best epoch's test metrics."""
    from torchrec_mamba.train.config import DataInfo, RunConfig

    cfg = RunConfig.load(uninterrupted_dir)
    assert cfg.dropout == 0.2 and cfg.seed == 3 and cfg.output == str(uninterrupted_dir)
    info = DataInfo.load(uninterrupted_dir)
    assert info.num_items == 25 and len(info.raw_item_ids or []) == 26
    assert _rebuilt_test_metrics(uninterrupted_dir) == uninterrupted["test"]


def test_train_writes_metrics_and_prints_them_last(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(train_args(tiny, tmp_path, "--epochs", "2", "--loss-positions", "last",
                           "--lr-schedule", "cosine", "--embedding-weight-decay", "0.001",
                           "--ema-decay", "0.9")) == 0
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert json.loads(last_line) == report
    assert set(report) >= {"valid", "test", "epochs_run", "best_epoch", "train_seconds_per_epoch",
                           "config", "history"}
    assert set(report["test"]) == KEYS and set(report["valid"]) == KEYS
    assert report["epochs_run"] == 2 and report["best_epoch"] in (1, 2)
    assert [h["epoch"] for h in report["history"]] == [1, 2]
    assert all(set(h["valid"]) == KEYS and h["loss"] > 0 for h in report["history"])
    assert report["config"]["loss_positions"] == "last" and report["config"]["num_items"] == 25
    assert report["config"]["lr_schedule"] == "cosine" and report["config"]["ema_decay"] == 0.9
    assert report["config"]["embedding_optimizer_resolved"] == {
        "name": "adam", "lr": 2e-3, "weight_decay": 0.001}
    assert report["train_seconds_per_epoch"] > 0
    # model.pt holds the weight average that was tested, not the last live weights
    assert _rebuilt_test_metrics(tmp_path) == report["test"]


def test_bad_file_names_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("1 2 3 4\n2 5 x 7\n3 1 2 3\n")
    code = main(train_args(bad, tmp_path / "out"))
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.startswith("torchrec-mamba: error")]
    assert len(lines) == 1, err
    assert f"{bad}:2" in lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "metrics.json").exists()


def test_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(train_args(tmp_path / "nope.txt", tmp_path)) == 2
    assert "nope.txt" in capsys.readouterr().err


_KILLED_RUN = """
import os, signal, sys
import torchrec_mamba.train.loop as loop
real_fit = loop.fit
def fit(*args, **kwargs):
    def hook(epoch, done):
        if (epoch, done) == (1, 2):          # 2 batches into the 2nd epoch
            os.kill(os.getpid(), signal.SIGKILL)
    kwargs["on_batch_end"] = hook
    return real_fit(*args, **kwargs)
loop.fit = fit
from torchrec_mamba.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_mid_epoch_then_resume_gives_same_test_metrics(
    tiny: Path, tmp_path: Path, uninterrupted: dict[str, Any]
) -> None:
    ckpt = tmp_path / "ckpt"
    args = train_args(tiny, tmp_path / "killed", "--checkpoint-dir", str(ckpt))
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_KILLED_RUN), *args],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert not (tmp_path / "killed" / "metrics.json").exists()
    assert (ckpt / "checkpoint.pt").is_file()  # epoch 1's checkpoint survived the kill

    resumed_out = tmp_path / "resumed"
    assert main(train_args(tiny, resumed_out, "--checkpoint-dir", str(ckpt), "--resume")) == 0
    resumed = json.loads((resumed_out / "metrics.json").read_text())
    assert resumed["test"] == uninterrupted["test"]  # exactly
    assert resumed["valid"] == uninterrupted["valid"]
    assert resumed["best_epoch"] == uninterrupted["best_epoch"]
    assert [h["loss"] for h in resumed["history"]] == [h["loss"] for h in uninterrupted["history"]]

    # `evaluate` reloads the last checkpoint and scores the test split again
    assert main(["evaluate", "--checkpoint-dir", str(ckpt), "--output", str(tmp_path / "ev")]) == 0
    ev = json.loads((tmp_path / "ev" / "eval_metrics.json").read_text())
    assert set(ev["test"]) == KEYS and ev["epoch"] == 3


def test_sampled_softmax_and_sasrec_options(tiny: Path, tmp_path: Path) -> None:
    args = train_args(tiny, tmp_path, "--epochs", "1", "--sampled-softmax", "5", "--model", "sasrec",
                      "--num-layers", "1")
    assert main(args) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert report["config"]["model"] == "sasrec" and report["config"]["sampled_softmax"] == 5
    assert set(report["test"]) == KEYS


def test_bad_options_exit_2(tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(train_args(tiny, tmp_path, "--resume")) == 2
    assert "resume=True needs a checkpoint_dir" in capsys.readouterr().err
    assert main(train_args(tiny, tmp_path, "--embedding-optimizer", "rowwise_adagrad")) == 2
    assert "only available for sharded tables" in capsys.readouterr().err


# --- evaluate --run ------------------------------------------------------------------------------
def _dense_reference(run: Path, mask_seen: bool) -> tuple[dict[str, float], int]:
    """Test HR/NDCG/MRR@K from the full (users, items) score matrix, ranked with numpy.

    Also returns how many users have a seen item (not their target) scoring above the target.
    """
    import torch

    from torchrec_mamba.cli import _loaders
    from torchrec_mamba.data import load_sequences
    from torchrec_mamba.train.config import DataInfo, RunConfig, build_model
    from torchrec_mamba.train.distributed import DistributedContext

    cfg = RunConfig.load(run)
    model = build_model(cfg, DataInfo.load(run))
    model.load_state_dict(torch.load(run / "model.pt", weights_only=True))
    model.eval()
    ctx = DistributedContext(0, 1, 0, torch.device("cpu"), None, False)
    _, _, _, test = _loaders(cfg, load_sequences(cfg.data), ctx)
    table = model.ec.embeddings["item"].weight.detach().numpy().astype(np.float64)  # (I + 1, D)
    ranks, seen_above = [], 0
    with torch.no_grad():
        for batch in test:
            user = model.user_representation(batch).numpy().astype(np.float64)  # (B, D)
            history = batch.padded("item")[0].numpy()  # (B, L)
            for u, hist, target in zip(user, history, batch.targets("item").numpy(), strict=True):
                scores = table @ u  # (I + 1,)
                scores[0] = -np.inf  # padding is never ranked
                seen = np.setdiff1d(hist[hist > 0], [target])
                seen_above += int((scores[seen] > scores[target]).any())
                if mask_seen:
                    scores[seen] = -np.inf
                assert (scores == scores[target]).sum() == 1  # no ties: the rank is unambiguous
                ranks.append(int((scores > scores[target]).sum()))
    r = np.array(ranks)
    out = {}
    for k in (5, 10, 20):
        hit = r < k
        out[f"hr@{k}"] = float(hit.mean())
        out[f"ndcg@{k}"] = float(np.where(hit, 1 / np.log2(r + 2), 0).mean())
        out[f"mrr@{k}"] = float(np.where(hit, 1 / (r + 1), 0).mean())
    return out, seen_above


def test_evaluate_run_reproduces_metrics_json_exactly(
    uninterrupted_dir: Path, uninterrupted: dict[str, Any], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "sub" / "unmasked.json"
    assert main(["evaluate", "--run", str(uninterrupted_dir), "--output", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed == json.loads(out.read_text())
    assert printed["test"] == uninterrupted["test"]  # exactly: the best epoch's model, same ranking
    assert printed["mask_seen"] is False and printed["run"] == str(uninterrupted_dir)
    assert main(["evaluate", "--run", str(uninterrupted_dir), "--split", "valid",
                 "--output", str(tmp_path / "dir")]) == 0
    valid = json.loads((tmp_path / "dir" / "eval_metrics.json").read_text())
    assert valid["valid"] == uninterrupted["valid"]


def test_evaluate_run_mask_seen_matches_a_dense_reference(
    uninterrupted_dir: Path, uninterrupted: dict[str, Any], tmp_path: Path
) -> None:
    out = tmp_path / "masked.json"
    assert main(["evaluate", "--run", str(uninterrupted_dir), "--mask-seen",
                 "--output", str(out)]) == 0
    masked = json.loads(out.read_text())
    assert masked["mask_seen"] is True
    reference, seen_above = _dense_reference(uninterrupted_dir, mask_seen=True)
    for key, value in reference.items():
        assert masked["test"][key] == pytest.approx(value, abs=1e-12), key
    unmasked_reference, _ = _dense_reference(uninterrupted_dir, mask_seen=False)
    for key, value in unmasked_reference.items():
        assert uninterrupted["test"][key] == pytest.approx(value, abs=1e-12), key
    # masking only removes competitors: never worse, and better where a seen item ranked above
    assert all(masked["test"][k] >= uninterrupted["test"][k] for k in KEYS)
    assert seen_above > 0
    assert masked["test"]["mrr@20"] > uninterrupted["test"]["mrr@20"]


def test_evaluate_run_errors(
    uninterrupted_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["evaluate", "--run", str(tmp_path / "absent")]) == 2
    assert "absent does not exist" in capsys.readouterr().err
    other = write_tiny(tmp_path / "other.txt", users=30, items=20)
    assert main(["evaluate", "--run", str(uninterrupted_dir), "--data", f"sasrec:{other}"]) == 2
    err = capsys.readouterr().err
    assert "the data has 20 items" in err and "another id mapping than the run (25" in err
    with pytest.raises(SystemExit):
        main(["evaluate", "--run", str(uninterrupted_dir), "--checkpoint-dir", str(tmp_path)])
    assert "not allowed with argument" in capsys.readouterr().err


@pytest.mark.parametrize("preset, expected", [(None, "1"), ("0", "0")])
def test_cli_turns_on_huge_pages_before_torch_unless_told_not_to(
    preset: str | None, expected: str
) -> None:
    """The CLI sets THP_MEM_ALLOC_ENABLE (and OMP_WAIT_POLICY) before torch is imported; a value
    the user set is kept."""
    env = {k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE", "OMP_WAIT_POLICY")}
    if preset is not None:
        env["THP_MEM_ALLOC_ENABLE"] = preset
    code = ("import sys, os, torchrec_mamba.cli; "
            "print(os.environ['THP_MEM_ALLOC_ENABLE'], os.environ['OMP_WAIT_POLICY'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120, check=True).stdout.split()
    assert out == [expected, "PASSIVE"]
