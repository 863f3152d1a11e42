"""Checkpoints: RNG capture, atomic writes, and bit-exact resume after a crash mid-epoch."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from torchrec_mamba.data import SequenceData, SequenceLoader, leave_one_out
from torchrec_mamba.models import Mamba4Rec, Mamba4RecConfig
from torchrec_mamba.modules import MambaSequenceEncoder
from torchrec_mamba.train.checkpoint import (
    CorruptCheckpointError,
    capture_rng,
    has_checkpoint,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from torchrec_mamba.train.distributed import (
    DistributedContext,
    EmbeddingOptimizerConfig,
    build_optimizer,
)
from torchrec_mamba.train.loop import FitConfig, FitResult, fit

CTX = DistributedContext(0, 1, 0, torch.device("cpu"), None, False)


def tiny_data(num_users: int = 40, num_items: int = 25, seed: int = 0) -> SequenceData:
    rng = np.random.default_rng(seed)
    seqs = []
    for _ in range(num_users):
        start, n = int(rng.integers(1, num_items + 1)), int(rng.integers(4, 10))
        seqs.append([(start + i - 1) % num_items + 1 for i in range(n)])
    return SequenceData.from_lists(seqs)


class Crash(RuntimeError):
    """Stands in for the process being killed."""


def run(ckpt: Path | None, resume: bool = False, crash_at: tuple[int, int] | None = None) -> FitResult:
    torch.manual_seed(0)
    data = tiny_data()
    split = leave_one_out(data, max_len=6)
    enc = MambaSequenceEncoder(d_model=8, d_state=4, dropout=0.3, backend="reference")
    model = Mamba4Rec(Mamba4RecConfig(num_items=data.num_items, embedding_dim=8), enc)
    emb = EmbeddingOptimizerConfig("adam", lr=1e-2)
    opt = build_optimizer(model, 1e-2, 0.01, emb)
    train = SequenceLoader(split.train, batch_size=8, shuffle=True, seed=3)
    valid = SequenceLoader(split.valid, batch_size=16, shuffle=False, seed=0)
    test = SequenceLoader(split.test, batch_size=16, shuffle=False, seed=0)

    def hook(epoch: int, done: int) -> None:
        if crash_at is not None and (epoch, done) == crash_at:
            raise Crash(f"killed in epoch {epoch} after {done} batches")

    config = FitConfig(
        epochs=3, patience=5, checkpoint_dir=None if ckpt is None else str(ckpt),
        resume=resume, progress=False,
    )
    return fit(model, opt, train, valid, test, config, CTX, on_batch_end=hook)


def test_resume_after_crash_is_bit_exact(tmp_path: Path) -> None:
    full = run(tmp_path / "full")
    with pytest.raises(Crash):
        run(tmp_path / "crashed", crash_at=(2, 2))  # in the 3rd (last) epoch
    assert has_checkpoint(tmp_path / "crashed")
    resumed = run(tmp_path / "crashed", resume=True)
    assert resumed.test == full.test  # exact, not approximately
    assert resumed.valid == full.valid
    assert resumed.best_epoch == full.best_epoch and resumed.epochs_run == full.epochs_run == 3
    assert [h["loss"] for h in resumed.history] == [h["loss"] for h in full.history]
    assert not list((tmp_path / "crashed").glob("*.tmp"))  # atomic writes leave no temp files


def test_resume_without_checkpoint_starts_fresh(tmp_path: Path) -> None:
    a = run(None)
    b = run(tmp_path / "empty", resume=True)
    assert a.test == b.test


def test_rng_roundtrip() -> None:
    state = capture_rng()
    a = (torch.rand(3), np.random.rand(3), __import__("random").random())
    restore_rng(state)
    b = (torch.rand(3), np.random.rand(3), __import__("random").random())
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def _model_and_opt() -> tuple[Mamba4Rec, torch.optim.Optimizer]:
    torch.manual_seed(0)
    enc = MambaSequenceEncoder(d_model=8, d_state=4, backend="reference")
    model = Mamba4Rec(Mamba4RecConfig(num_items=5, embedding_dim=8), enc)
    return model, build_optimizer(model, 1e-3, 0.0, EmbeddingOptimizerConfig("adam", lr=1e-3))


def test_save_load_roundtrip_restores_weights_optimizer_and_rng(tmp_path: Path) -> None:
    model, opt = _model_and_opt()
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    progress = {"epoch": 1, "history": []}
    loader_state = {"epoch": 1, "batch_index": 0}
    save_checkpoint(tmp_path, model, opt, progress, loader_state, CTX)
    expected_next = torch.rand(4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt_state = opt.state_dict()["state"]

    model2, opt2 = _model_and_opt()
    restored = load_checkpoint(tmp_path, model2, opt2, CTX)
    assert restored == (progress, loader_state)
    for k, v in model2.state_dict().items():
        assert torch.equal(v, state[k]), k
    for key, value in opt2.state_dict()["state"].items():
        for name, tensor in value.items():
            assert torch.equal(tensor, opt_state[key][name]), (key, name)
    assert torch.equal(torch.rand(4), expected_next)


def test_load_rejects_wrong_version_and_layout(tmp_path: Path) -> None:
    model, opt = _model_and_opt()
    assert load_checkpoint(tmp_path, model, opt, CTX) is None
    torch.save({"version": 99}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="checkpoint version 99, expected 1"):
        load_checkpoint(tmp_path, model, opt, CTX)
    other = tmp_path / "sharded"
    other.mkdir()
    (other / "latest").write_text("epoch_0001\n")
    with pytest.raises(ValueError, match="holds a sharded checkpoint"):
        load_checkpoint(other, model, opt, CTX)


# --- rotation, corrupt files and the fallback ------------------------------------------------
def _save_epochs(d: Path, epochs: int) -> list[dict[str, torch.Tensor]]:
    """Save after each of ``epochs`` fake epochs; return the model state of each save."""
    model, opt = _model_and_opt()
    states = []
    for epoch in range(1, epochs + 1):
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        save_checkpoint(d, model, opt, {"epoch": epoch}, {"epoch": epoch, "batch_index": 0}, CTX)
        states.append({k: v.clone() for k, v in model.state_dict().items()})
    return states


def test_every_save_keeps_the_previous_checkpoint(tmp_path: Path) -> None:
    states = _save_epochs(tmp_path, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt"]
    for name, epoch in (("checkpoint.pt", 3), ("checkpoint.prev.pt", 2)):
        saved = torch.load(tmp_path / name, weights_only=True)  # plain tensors and containers only
        assert saved["progress"]["epoch"] == epoch
        for k, v in saved["model"].items():
            assert torch.equal(v, states[epoch - 1][k]), (name, k)


@pytest.mark.parametrize("damage", ["half", "empty", "garbage"])
def test_corrupt_checkpoint_falls_back_to_the_previous_one(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    states = _save_epochs(tmp_path, 2)
    current = tmp_path / "checkpoint.pt"
    blob = current.read_bytes()
    current.write_bytes({"half": blob[: len(blob) // 2], "empty": b"", "garbage": b"\x00" * 64}[damage])
    model, opt = _model_and_opt()
    with caplog.at_level("WARNING", logger="torchrec_mamba.train.checkpoint"):
        restored = load_checkpoint(tmp_path, model, opt, CTX)
    assert restored is not None and restored[0]["epoch"] == 1
    for k, v in model.state_dict().items():
        assert torch.equal(v, states[0][k]), k
    warning = " ".join(r.getMessage() for r in caplog.records)
    assert f"{current}: checkpoint is unreadable" in warning
    assert f"resuming from the previous checkpoint {tmp_path / 'checkpoint.prev.pt'} (epoch 1)" in warning


def test_corrupt_checkpoint_without_a_good_previous_names_the_files(tmp_path: Path) -> None:
    _save_epochs(tmp_path, 1)
    current = tmp_path / "checkpoint.pt"
    current.write_bytes(current.read_bytes()[:1000])
    model, opt = _model_and_opt()
    with pytest.raises(
        CorruptCheckpointError,
        match=re.escape(f"{current}: checkpoint is unreadable (cut short or not a checkpoint)")
        + r".*there is no checkpoint\.prev\.pt to fall back to",
    ):
        load_checkpoint(tmp_path, model, opt, CTX)
    (tmp_path / "checkpoint.prev.pt").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"the previous checkpoint is unreadable too: .*checkpoint\.prev\.pt"):
        load_checkpoint(tmp_path, model, opt, CTX)


def test_missing_current_checkpoint_uses_the_previous_one(tmp_path: Path) -> None:
    # the moment between the two renames where links are impossible
    _save_epochs(tmp_path, 2)
    (tmp_path / "checkpoint.pt").unlink()
    assert has_checkpoint(tmp_path)
    model, opt = _model_and_opt()
    restored = load_checkpoint(tmp_path, model, opt, CTX)
    assert restored is not None and restored[0]["epoch"] == 1


def test_a_file_that_is_no_checkpoint_is_refused(tmp_path: Path) -> None:
    torch.save({"model": {}}, tmp_path / "checkpoint.pt")
    model, opt = _model_and_opt()
    with pytest.raises(ValueError, match=r"checkpoint\.pt: checkpoint version None, expected 1"):
        load_checkpoint(tmp_path, model, opt, CTX)
