"""The rows of docs/reliability.md that the CLI owns: one clear line (exit 2), never a traceback,
never a silent fresh start or a silently overwritten result."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from tests.test_cli import train_args, write_tiny
from torchrec_mamba.cli import main


def _run(capsys: pytest.CaptureFixture[str], args: list[str]) -> tuple[int, str]:
    code = main(args)
    err = capsys.readouterr().err
    return code, err


def _error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("torchrec-mamba: error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture(autouse=True)
def _quiet_stale_log_streams(monkeypatch: pytest.MonkeyPatch) -> None:
    # each main() rebinds logging to the current sys.stderr; a handler left on a stream that
    # pytest closed would print a "Logging error" traceback that is not the CLI's
    monkeypatch.setattr(logging, "raiseExceptions", False)


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    return write_tiny(tmp_path / "tiny.txt")


def test_every_user_too_short_says_how_many(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "short.txt"
    data.write_text("1 1 2\n2 3\n3 4 5\n")
    code, err = _run(capsys, train_args(data, tmp_path / "out", "--epochs", "1"))
    assert code == 2
    assert "all 3 users have fewer than 3 events" in _error_line(err)


def test_non_utf8_line_names_file_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "bad.txt"
    data.write_bytes(b"1 1 2 3\n2 4 5 \xff 6\n")
    code, err = _run(capsys, train_args(data, tmp_path / "out"))
    assert code == 2
    assert f"{data}:2: not valid UTF-8" in _error_line(err)


def test_output_with_results_is_refused_unless_overwrite(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert main(train_args(tiny, out, "--epochs", "1")) == 0
    first = (out / "metrics.json").read_text()
    code, err = _run(capsys, train_args(tiny, out, "--epochs", "1", "--seed", "4"))
    assert code == 2
    assert "already holds results" in _error_line(err) and "--overwrite" in err
    assert (out / "metrics.json").read_text() == first  # untouched
    assert main(train_args(tiny, out, "--epochs", "1", "--seed", "4", "--overwrite")) == 0
    assert json.loads((out / "metrics.json").read_text())["config"]["seed"] == 4


def test_resume_without_checkpoint_is_an_error_unless_if_exists(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "ckpt-typo"
    code, err = _run(capsys, train_args(tiny, tmp_path / "a", "--checkpoint-dir", str(missing),
                                        "--resume"))
    assert code == 2
    line = _error_line(err)
    assert f"no checkpoint in {missing}" in line and "--resume-if-exists" in line
    assert not (tmp_path / "a" / "metrics.json").exists()
    assert main(train_args(tiny, tmp_path / "b", "--epochs", "1", "--checkpoint-dir",
                           str(missing), "--resume-if-exists")) == 0
    assert (missing / "checkpoint.pt").is_file()


def test_resume_against_another_run_names_each_difference(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "ckpt"
    assert main(train_args(tiny, tmp_path / "a", "--epochs", "1", "--checkpoint-dir",
                           str(ckpt))) == 0
    other = write_tiny(tmp_path / "other.txt", users=30, items=40)
    code, err = _run(capsys, train_args(other, tmp_path / "b", "--epochs", "2", "--checkpoint-dir",
                                        str(ckpt), "--resume", "--d-model", "16"))
    assert code == 2
    line = _error_line(err)
    for key in ("data:", "data_fingerprint:", "num_items: 25 in the checkpoint, 40 now",
                "d_model: 8 in the checkpoint, 16 now"):
        assert key in line, line


def test_corrupt_checkpoint_falls_back_to_the_previous_one(
    tiny: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt = tmp_path / "ckpt"
    assert main(train_args(tiny, tmp_path / "a", "--epochs", "2", "--checkpoint-dir",
                           str(ckpt))) == 0
    latest = ckpt / "checkpoint.pt"
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 2])  # cut in half
    code, err = _run(capsys, train_args(tiny, tmp_path / "b", "--epochs", "3", "--checkpoint-dir",
                                        str(ckpt), "--resume"))
    assert code == 0
    assert "resuming from the previous checkpoint" in err and "checkpoint.prev.pt (epoch 1)" in err
    report = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert report["epochs_run"] == 3
    # both files damaged: one line naming the file, no traceback
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (ckpt / name).write_bytes(b"not a checkpoint")
    code, err = _run(capsys, train_args(tiny, tmp_path / "c", "--epochs", "4", "--checkpoint-dir",
                                        str(ckpt), "--resume"))
    assert code == 2
    assert "checkpoint.pt" in _error_line(err)
