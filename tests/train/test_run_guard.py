"""Run guards: resume only the same run, never clobber results; every message is checked."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from torchrec_mamba.train.run_guard import (
    check_output_dir,
    check_resume_config,
    compare_run_configs,
    data_fingerprint,
    resolve_resume,
)

SAVED = {
    "data": "sasrec:a.txt", "data_fingerprint": "6:aa", "num_items": 12101, "model": "mamba4rec",
    "d_model": 64, "num_layers": 2, "d_state": 32, "d_conv": 4, "expand": 2, "num_heads": 2,
    "max_len": 50, "num_categories": 0, "lr": 1e-3, "epochs": 60,
}


def test_data_fingerprint_is_size_and_head_tail_hash(tmp_path: Path) -> None:
    small = tmp_path / "s.txt"
    small.write_bytes(b"1 2 3\n")
    expected = hashlib.sha256((6).to_bytes(8, "little") + b"1 2 3\n").hexdigest()[:16]
    assert data_fingerprint(small) == f"6:{expected}"
    big = tmp_path / "b.bin"
    blob = bytes(range(256)) * (3 * 4096 + 7)  # 3 MiB + 1792 bytes
    big.write_bytes(blob)
    mib = 1 << 20
    h = hashlib.sha256(len(blob).to_bytes(8, "little") + blob[:mib] + blob[-mib:])
    assert data_fingerprint(big) == f"{len(blob)}:{h.hexdigest()[:16]}"
    # the middle is not read (documented); the head, the tail and the size are
    middle = bytearray(blob)
    middle[len(blob) // 2] ^= 1
    big.write_bytes(bytes(middle))
    assert data_fingerprint(big) == f"{len(blob)}:{h.hexdigest()[:16]}"
    tail = bytearray(blob)
    tail[-1] ^= 1
    big.write_bytes(bytes(tail))
    assert data_fingerprint(big) != f"{len(blob)}:{h.hexdigest()[:16]}"
    with pytest.raises(ValueError, match=re.escape(f"cannot fingerprint {tmp_path}: not a file")):
        data_fingerprint(tmp_path)


def test_compare_run_configs_names_each_difference() -> None:
    assert compare_run_configs(SAVED, {**SAVED, "lr": 5e-4, "epochs": 10}) == []
    new = {**SAVED, "data": "sasrec:b.txt", "data_fingerprint": "7:bb", "num_items": 57289,
           "d_model": 32, "num_layers": 1}
    assert compare_run_configs(SAVED, new) == [
        "data: 'sasrec:a.txt' in the checkpoint, 'sasrec:b.txt' now",
        "data_fingerprint: '6:aa' in the checkpoint, '7:bb' now",
        "num_items: 12101 in the checkpoint, 57289 now",
        "d_model: 64 in the checkpoint, 32 now",
        "num_layers: 2 in the checkpoint, 1 now",
    ]
    old = {k: v for k, v in SAVED.items() if k != "data_fingerprint"}  # older run_config.json
    assert compare_run_configs(old, {**SAVED, "data_fingerprint": "9:zz"}) == []
    assert compare_run_configs(SAVED, {**SAVED, "num_layers": None}) == [
        "num_layers: 2 in the checkpoint, None now"
    ]


def test_check_resume_config(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'run_config.json'} not found")):
        check_resume_config(tmp_path, SAVED)
    (tmp_path / "run_config.json").write_text(json.dumps(SAVED))
    check_resume_config(tmp_path, {**SAVED, "lr": 0.1})
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"cannot resume from {tmp_path}: it was trained with other settings (num_items: 12101 "
            "in the checkpoint, 57289 now); use another --checkpoint-dir to start a new run"
        ),
    ):
        check_resume_config(tmp_path, {**SAVED, "num_items": 57289})
    (tmp_path / "run_config.json").write_text('{"d_model": ')
    with pytest.raises(ValueError, match=r"run_config\.json: not a readable run config"):
        check_resume_config(tmp_path, SAVED)


@pytest.mark.parametrize("name", ["metrics.json", "run_config.json", "checkpoint.pt", "model.pt"])
def test_output_dir_with_results_is_refused_unless_overwrite(
    tmp_path: Path, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    check_output_dir(tmp_path / "new", overwrite=False)  # not there yet: fine
    check_output_dir(tmp_path, overwrite=False)  # empty: fine
    (tmp_path / "notes.txt").write_text("x")
    check_output_dir(tmp_path, overwrite=False)  # unrelated files: fine
    (tmp_path / name).write_text("{}")
    with pytest.raises(
        ValueError,
        match=re.escape(f"output folder {tmp_path} already holds results ({name}); pass --overwrite"),
    ):
        check_output_dir(tmp_path, overwrite=False)
    with caplog.at_level("WARNING", logger="torchrec_mamba.train.run_guard"):
        check_output_dir(tmp_path, overwrite=True)
    assert f"--overwrite: replacing the results in {tmp_path} ({name})" in caplog.text
    with pytest.raises(ValueError, match=r"notes\.txt exists and is not a folder"):
        check_output_dir(tmp_path / "notes.txt", overwrite=True)


def test_resolve_resume(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    typo = tmp_path / "ckpt_typo"
    assert resolve_resume(None, resume=False, resume_if_exists=False) == "fresh"
    assert resolve_resume(typo, resume=False, resume_if_exists=False) == "fresh"
    with pytest.raises(
        ValueError,
        match=re.escape(
            f"--resume: no checkpoint in {typo} (the folder does not exist); check the path, "
            "or pass --resume-if-exists to start from scratch when there is none"
        ),
    ):
        resolve_resume(typo, resume=True, resume_if_exists=False)
    typo.mkdir()
    with pytest.raises(ValueError, match=r"\(no checkpoint\.pt or latest in it\)"):
        resolve_resume(typo, resume=True, resume_if_exists=False)
    with caplog.at_level("INFO", logger="torchrec_mamba.train.run_guard"):
        assert resolve_resume(typo, resume=True, resume_if_exists=True) == "fresh"
    assert "starting from scratch (--resume-if-exists)" in caplog.text
    (typo / "checkpoint.prev.pt").write_bytes(b"")
    assert resolve_resume(typo, resume=True, resume_if_exists=False) == "resume"
    with pytest.raises(ValueError, match="--resume-if-exists needs --checkpoint-dir"):
        resolve_resume(None, resume=False, resume_if_exists=True)
