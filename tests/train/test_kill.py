"""Crash safety under a real SIGKILL: mid-checkpoint-write, and one rank of a torchrun job.

(a) A subprocess trains a tiny model with a checkpoint after every epoch. Its checkpoint writer
    is slowed (``checkpoint._write_payload`` patched in the child only) so that the second
    epoch's checkpoint is half written when the test sends SIGKILL. Resuming from the folder
    continues from epoch 1, the last complete one, and ends exactly where an uninterrupted
    2-epoch run ends.
(b) A 2-process ``torchrun`` (gloo) where rank 1 is SIGKILLed, or stopped with SIGSTOP (a hang:
    its sockets stay open), while rank 0 waits in an all-reduce. Rank 0 exits by itself with
    the clear :class:`~torchrec_mamba.train.distributed.CollectiveFailure` message within the
    process-group timeout (``TORCHREC_MAMBA_PG_TIMEOUT_S=4``), instead of hanging. torchrun's
    own monitor is slowed down so that the survivor, not torchrun, ends the job.
"""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

ENV = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
ROOT = str(Path(__file__).resolve().parents[2])


def _fit(ckpt: Path, resume: bool, epochs: int = 2) -> dict[str, Any]:
    """A tiny deterministic training run (1 thread, so child and parent agree bit for bit)."""
    from torchrec_mamba.data import SequenceData, SequenceLoader, leave_one_out
    from torchrec_mamba.models import Mamba4Rec, Mamba4RecConfig
    from torchrec_mamba.modules import MambaSequenceEncoder
    from torchrec_mamba.train.distributed import (
        DistributedContext,
        EmbeddingOptimizerConfig,
        build_optimizer,
    )
    from torchrec_mamba.train.loop import FitConfig, fit

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        seqs = [[(int(s) + i) % 20 + 1 for i in range(int(n))]
                for s, n in zip(rng.integers(0, 20, 30), rng.integers(4, 9, 30), strict=True)]
        split = leave_one_out(SequenceData.from_lists(seqs), max_len=6)
        enc = MambaSequenceEncoder(d_model=8, d_state=4, dropout=0.3, backend="reference")
        model = Mamba4Rec(Mamba4RecConfig(num_items=20, embedding_dim=8), enc)
        opt = build_optimizer(model, 1e-2, 0.0, EmbeddingOptimizerConfig("adam", lr=1e-2))
        ctx = DistributedContext(0, 1, 0, torch.device("cpu"), None, False)
        loaders = [SequenceLoader(split.train, batch_size=8, shuffle=True, seed=3)] + [
            SequenceLoader(part, batch_size=16, shuffle=False, seed=0) for part in (split.valid, split.test)
        ]
        config = FitConfig(epochs=epochs, patience=10, checkpoint_dir=str(ckpt), resume=resume, progress=False)
        result = fit(model, opt, *loaders, config, ctx)
        return {"test": result.test, "losses": [h["loss"] for h in result.history],
                "weights": {k: v.clone() for k, v in model.state_dict().items()}}
    finally:
        torch.set_num_threads(threads)


def _killed_mid_write(ckpt: Path) -> None:  # pragma: no cover - runs in the child
    from torchrec_mamba.train import checkpoint

    write = checkpoint._write_payload

    def slow_write(obj: Any, f: Any) -> None:
        if obj["progress"]["epoch"] == 2:  # the second checkpoint: write half, then stall
            buf = io.BytesIO()
            write(obj, buf)
            data = buf.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            (ckpt / "MID_WRITE").touch()
            time.sleep(120)
        write(obj, f)

    checkpoint._write_payload = slow_write  # type: ignore[assignment]
    _fit(ckpt, resume=False)


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"child ended ({proc.returncode}) before {path.name}:\n{proc.communicate()[1][-4000:]}")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"{path.name} did not appear within {timeout} s")
        time.sleep(0.05)


def test_sigkill_during_checkpoint_write_resumes_from_last_complete_epoch(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    child = subprocess.Popen(
        [sys.executable, __file__, "mid_write", str(ckpt)], cwd=ROOT, env=ENV, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )
    _wait_for(ckpt / "MID_WRITE", child, timeout=60)
    os.killpg(child.pid, signal.SIGKILL)
    child.communicate(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert (ckpt / "checkpoint.pt.tmp").is_file()  # the half-written file is still there
    saved = torch.load(ckpt / "checkpoint.pt", weights_only=True)
    assert saved["progress"]["epoch"] == 1  # what is in place is the last complete epoch

    resumed = _fit(ckpt, resume=True)
    full = _fit(tmp_path / "full", resume=False)
    assert resumed["losses"] == full["losses"]  # epoch 1's loss comes from the checkpoint
    assert resumed["test"] == full["test"]
    for k, v in full["weights"].items():
        assert torch.equal(resumed["weights"][k], v), k


# --- (b) one rank of a torchrun job dies or hangs --------------------------------------------
def _rank_worker(mode: str, out: Path) -> None:  # pragma: no cover - runs under torchrun
    from torchrec_mamba.train.distributed import (
        CollectiveFailure,
        collective_errors,
        destroy_distributed,
        init_distributed,
    )

    ctx = init_distributed(device="cpu")
    x = torch.ones(1)
    torch.distributed.all_reduce(x)  # both ranks are up and connected
    if ctx.rank == 1:
        (out / "rank1.pid").write_text(str(os.getpid()))  # torchrun's workers have own sessions
        os.kill(os.getpid(), signal.SIGKILL if mode == "kill" else signal.SIGSTOP)
    time.sleep(0.5)  # rank 1 is gone (or frozen) before rank 0 enters the collective
    start = time.monotonic()
    try:
        with collective_errors(ctx):
            torch.distributed.all_reduce(x)
    except CollectiveFailure as e:
        (out / "rank0.json").write_text(json.dumps({"message": str(e), "waited": time.monotonic() - start}))
        print(f"torchrec-mamba: error: {e}", file=sys.stderr, flush=True)
        os._exit(1)  # the group cannot be destroyed cleanly with a dead peer
    destroy_distributed(ctx)


@pytest.mark.parametrize("mode", ["kill", "stop"])
def test_survivor_of_a_dead_or_hung_rank_exits_with_a_clear_error(tmp_path: Path, mode: str) -> None:
    env = {**ENV, "TORCHREC_MAMBA_PG_TIMEOUT_S": "4", "PYTHONPATH": ROOT}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--monitor-interval=60", __file__, f"rank_{mode}", str(tmp_path)]
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = start + 60
    while not (tmp_path / "rank0.json").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    found = (tmp_path / "rank0.json").exists()
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun itself would wait a monitor interval more
    if mode == "stop" and (tmp_path / "rank1.pid").exists():
        try:  # the frozen rank: it is not in torchrun's process group
            os.kill(int((tmp_path / "rank1.pid").read_text()), signal.SIGKILL)
        except ProcessLookupError:
            pass
    _, stderr = proc.communicate(timeout=30)
    assert found, f"rank 0 did not report within 60 s:\n{stderr[-4000:]}"
    report = json.loads((tmp_path / "rank0.json").read_text())
    assert report["message"].startswith("rank 0 of 2: a collective failed (")
    assert "another rank has probably died or hangs" in report["message"]
    assert "the process-group timeout is 4 s ($TORCHREC_MAMBA_PG_TIMEOUT_S)" in report["message"]
    assert "torchrec-mamba: error: rank 0 of 2: a collective failed" in stderr
    # a dead peer is noticed at once; a frozen one after the 4 s timeout, not torch's 30 min
    assert report["waited"] < 20, report
    if mode == "stop":
        assert report["waited"] > 3, report


if __name__ == "__main__":  # pragma: no cover
    sys.path.insert(0, ROOT)
    if sys.argv[1] == "mid_write":
        _killed_mid_write(Path(sys.argv[2]))
    else:
        _rank_worker(sys.argv[1].removeprefix("rank_"), Path(sys.argv[2]))
