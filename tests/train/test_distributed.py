"""DMP + planner + fused optimizer + TrainPipelineSparseDist, with two gloo ranks.

One ``torchrun --nproc_per_node=2`` run of this file (the ``__main__`` block below is the worker)
checks, with row-wise sharded tables:

* training through ``TrainPipelineSparseDist`` matches a single-process reference that applies
  the same updates by hand (torch Adam on dense weights, torch Adagrad on the table, the loss of
  each rank's half-batch averaged as DDP does), so the sharded lookups, the tied head through the
  EC and the fused optimizer are all exercised and checked numerically;
* the loss decreases and both ranks report identical validation metrics;
* a sharded run (DCP checkpoints) that crashes mid-epoch and resumes ends with exactly the test
  metrics of the uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from torchrec_mamba.models import Mamba4Rec, Mamba4RecConfig
from torchrec_mamba.modules import MambaSequenceEncoder
from torchrec_mamba.train.averaging import WeightAverage
from torchrec_mamba.train.distributed import (
    DistributedContext,
    EmbeddingOptimizerConfig,
    build_optimizer,
    init_distributed,
    resolve_embedding_optimizer,
    shard_model,
)

CPU = torch.device("cpu")


# --- single-process checks --------------------------------------------------------------------
def test_init_distributed_without_torchrun_starts_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    ctx = init_distributed(device="cpu")
    assert (ctx.rank, ctx.world_size, ctx.distributed, ctx.is_main) == (0, 1, False, True)
    assert not torch.distributed.is_initialized()


def test_process_group_timeout_from_argument_or_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from torchrec_mamba.train.distributed import resolve_timeout

    monkeypatch.delenv("TORCHREC_MAMBA_PG_TIMEOUT_S", raising=False)
    assert resolve_timeout() == 600.0
    monkeypatch.setenv("TORCHREC_MAMBA_PG_TIMEOUT_S", "12.5")
    assert resolve_timeout() == 12.5 and resolve_timeout(3) == 3.0
    assert init_distributed(device="cpu").timeout_s == 12.5
    monkeypatch.setenv("TORCHREC_MAMBA_PG_TIMEOUT_S", "soon")
    with pytest.raises(
        ValueError,
        match=r"timeout must be a number of seconds > 0, got 'soon' \(from \$TORCHREC_MAMBA_PG_TIMEOUT_S\)",
    ):
        resolve_timeout()
    for bad in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="timeout must be a number of seconds > 0"):
            resolve_timeout(bad)


def test_collective_errors_names_the_rank_and_the_timeout() -> None:
    from torchrec_mamba.train.distributed import CollectiveFailure, collective_errors

    alone = DistributedContext(0, 1, 0, CPU, None, False)
    with pytest.raises(RuntimeError, match="^boom$"):  # no group: nothing to explain
        with collective_errors(alone):
            raise RuntimeError("boom")
    ranked = DistributedContext(1, 2, 1, CPU, object(), True, 7.0)  # type: ignore[arg-type]
    with pytest.raises(
        CollectiveFailure,
        match=r"^rank 1 of 2: a collective failed \(Connection closed by peer \[::1\]:5\); another "
        r"rank has probably died or hangs .* timeout is 7 s \(\$TORCHREC_MAMBA_PG_TIMEOUT_S\)$",
    ):
        with collective_errors(ranked):
            raise RuntimeError("Connection closed by peer\n[::1]:5")
    with pytest.raises(ValueError, match="not a collective"):  # other errors pass through
        with collective_errors(ranked):
            raise ValueError("not a collective")


def test_embedding_optimizer_resolution() -> None:
    assert resolve_embedding_optimizer("auto", None, 1e-3, False, CPU) == EmbeddingOptimizerConfig("adam", 1e-3)
    sharded_cpu = resolve_embedding_optimizer("auto", None, 1e-3, True, CPU)
    assert (sharded_cpu.name, sharded_cpu.lr) == ("adagrad", 0.05)
    assert resolve_embedding_optimizer("auto", None, 1e-3, True, torch.device("cuda")).name == "adam"
    assert resolve_embedding_optimizer("sgd", 0.5, 1e-3, True, CPU).lr == 0.5
    with pytest.raises(ValueError, match="CPU embedding kernels have no fused Adam"):
        resolve_embedding_optimizer("adam", None, 1e-3, True, CPU)
    with pytest.raises(ValueError, match="rowwise_adagrad is only available for sharded tables"):
        resolve_embedding_optimizer("rowwise_adagrad", None, 1e-3, False, CPU)
    with pytest.raises(ValueError, match="embedding optimizer must be one of"):
        EmbeddingOptimizerConfig("lamb", 1e-3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="embedding lr must be > 0"):
        EmbeddingOptimizerConfig("adam", 0.0)
    decayed = resolve_embedding_optimizer("auto", None, 1e-3, False, CPU, weight_decay=0.01)
    assert decayed.weight_decay == 0.01
    table_opt = decayed.torch_optimizer([torch.nn.Parameter(torch.zeros(3, 2))])
    assert table_opt.param_groups[0]["weight_decay"] == 0.01
    assert resolve_embedding_optimizer("auto", None, 1e-3, True, CPU, 0.02).fused_params()["weight_decay"] == 0.02
    with pytest.raises(ValueError, match="embedding weight_decay must be >= 0, got -1"):
        EmbeddingOptimizerConfig("adam", 1e-3, weight_decay=-1)


def test_fused_params_carry_the_optimizer() -> None:
    from fbgemm_gpu.split_embedding_configs import EmbOptimType

    fused = EmbeddingOptimizerConfig("adam", lr=3e-3, beta2=0.98).fused_params()
    assert fused["optimizer"] == EmbOptimType.ADAM
    assert (fused["learning_rate"], fused["beta2"]) == (3e-3, 0.98)
    assert EmbeddingOptimizerConfig("adagrad", lr=0.1).fused_params()["optimizer"] == EmbOptimType.EXACT_ADAGRAD


def _tiny_model(dropout: float = 0.0) -> Mamba4Rec:
    torch.manual_seed(0)
    enc = MambaSequenceEncoder(d_model=8, d_state=4, dropout=dropout, backend="reference")
    return Mamba4Rec(Mamba4RecConfig(num_items=9, embedding_dim=8), enc)


def test_build_optimizer_groups_and_no_weight_decay() -> None:
    model = _tiny_model()
    opt = build_optimizer(model, 1e-3, 0.1, EmbeddingOptimizerConfig("adagrad", lr=0.05))
    parts = dict(opt.optimizers)
    assert set(parts["embeddings"].params) == {"ec.embeddings.item.weight"}
    assert isinstance(parts["embeddings"]._optimizer, torch.optim.Adagrad)  # type: ignore[attr-defined]
    dense = parts["dense"]._optimizer  # type: ignore[attr-defined]
    assert isinstance(dense, torch.optim.AdamW)
    name_of = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = ({name_of[id(p)] for p in g["params"]} for g in dense.param_groups)
    assert dense.param_groups[1]["weight_decay"] == 0.0
    for tagged in ("A_log", "D", "dt_proj.bias", "norm.weight"):
        assert any(n.endswith(tagged) for n in no_decay), tagged
        assert not any(n.endswith(tagged) for n in decay), tagged
    assert any(n.endswith("in_proj.weight") for n in decay)
    plain = build_optimizer(model, 1e-3, 0.0, EmbeddingOptimizerConfig("adam", lr=1e-3))
    assert isinstance(dict(plain.optimizers)["dense"]._optimizer, torch.optim.Adam)  # type: ignore[attr-defined]


def test_shard_model_refuses_cpu_adam() -> None:
    ctx = DistributedContext(0, 1, 0, CPU, None, False)
    with pytest.raises(ValueError, match="no fused Adam"):
        shard_model(_tiny_model(), "row_wise", ctx, EmbeddingOptimizerConfig("adam", 1e-3))
    with pytest.raises(ValueError, match="sharding must be one of"):
        shard_model(_tiny_model(), "grid", ctx, EmbeddingOptimizerConfig("adagrad", 0.1))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sharding needs a process group"):
        shard_model(_tiny_model(), "row_wise", ctx, EmbeddingOptimizerConfig("adagrad", 0.1))


# --- two ranks --------------------------------------------------------------------------------
_TEARDOWN_ABORT = "terminate called without an active exception"


def _torchrun(cmd: list[str], env: dict[str, str]) -> tuple[str, str, int]:
    """Run ``cmd`` in its own session (a hang kills torchrun and both workers); its outputs."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun timed out:\n{stderr[-6000:]}")
    return stdout, stderr, proc.returncode


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    root = str(Path(__file__).resolve().parents[2])  # this checkout's code, not the installed one
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", "PYTHONPATH": root}
    for attempt in (1, 2):
        out = tmp_path_factory.mktemp("two_ranks")  # a fresh folder: no checkpoint of attempt 1
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               __file__, str(out)]
        stdout, stderr, code = _torchrun(cmd, env)
        # A worker can abort with "terminate called without an active exception" (SIGABRT: a
        # native std::thread destroyed while joinable, in torch / gloo, not in our Python code);
        # seen once in about a dozen runs on a loaded 2-core machine, after the checkpoint
        # fallback of step 4. Run it once more then; any other failure, or the same abort
        # twice, fails the test with the logs.
        if code == 0 or attempt == 2 or _TEARDOWN_ABORT not in stderr:
            break
        warnings.warn(f"torchrun worker aborted in teardown; rerunning once:\n{stderr[-2000:]}",
                      stacklevel=1)
    if code != 0:
        pytest.fail(f"torchrun failed ({code}):\n{stdout[-3000:]}\n{stderr[-6000:]}")
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_row_wise_sparse_dist_matches_single_process_reference(two_ranks: list[dict[str, Any]]) -> None:
    r0 = two_ranks[0]
    assert r0["plan_types"] == ["row_wise"]
    assert r0["max_table_diff"] < 1e-5, r0["max_table_diff"]
    assert r0["max_dense_diff"] < 1e-5, r0["max_dense_diff"]
    assert r0["max_score_diff"] < 1e-4, r0["max_score_diff"]


def test_sharded_weight_average_matches_a_hand_written_one(two_ranks: list[dict[str, Any]]) -> None:
    r0 = two_ranks[0]
    assert r0["average_updates"] == r0["reference_steps"] > 3
    assert r0["max_average_table_diff"] < 1e-5, r0["max_average_table_diff"]
    assert r0["max_average_dense_diff"] < 1e-5, r0["max_average_dense_diff"]
    assert r0["average_moved_the_table"] and r0["live_table_restored"]


def test_sharded_training_learns_and_ranks_agree(two_ranks: list[dict[str, Any]]) -> None:
    r0, r1 = two_ranks
    assert r0["epoch_losses"][-1] < r0["epoch_losses"][0]
    assert r0["valid"] == r1["valid"]  # all-reduced: identical on both ranks
    assert r0["valid"]["ndcg@10"] > r0["valid_before"]["ndcg@10"]
    for k, v in r0["reference_valid"].items():
        assert r0["valid"][k] == pytest.approx(v, abs=0.02), k


def test_sharded_checkpoint_keeps_the_previous_folder_and_falls_back_on_every_rank(
    two_ranks: list[dict[str, Any]],
) -> None:
    for r in two_ranks:
        assert r["dcp_folders"] == ["epoch_0001", "epoch_0002"]
        assert r["fallback_epoch"] == 1  # rank 0 could read epoch 2, but follows rank 1


def test_sharded_run_writes_a_whole_model_pt_that_reproduces_its_test_metrics(
    two_ranks: list[dict[str, Any]],
) -> None:
    r0 = two_ranks[0]
    assert r0["model_pt_keys_match"] and r0["unsharded_export_is_state_dict"]
    assert r0["model_pt_test"] == pytest.approx(r0["full_test"], abs=1e-6)


def test_sharded_resume_after_crash_is_exact(two_ranks: list[dict[str, Any]]) -> None:
    for r in two_ranks:
        assert r["crashed"]
        assert r["resumed_test"] == r["full_test"]
        assert r["resumed_history_losses"] == r["full_history_losses"]
    assert two_ranks[0]["full_test"] == two_ranks[1]["full_test"]


# --- the worker (run by torchrun) -------------------------------------------------------------
def _worker(out: Path) -> None:  # pragma: no cover - runs in the torchrun subprocesses
    import numpy as np
    from torchrec.distributed.types import ShardedTensor

    from torchrec_mamba.data import SequenceData, SequenceLoader, leave_one_out
    from torchrec_mamba.train.distributed import destroy_distributed, unwrap
    from torchrec_mamba.train.loop import FitConfig, evaluate, fit, lr_factor, train_one_epoch
    from torchrec_mamba.train.metrics import ranking_metrics

    ctx = init_distributed(device="cpu")
    rank, world = ctx.rank, ctx.world_size
    rng = np.random.default_rng(0)
    seqs = []
    for _ in range(48):
        start, n = int(rng.integers(1, 31)), int(rng.integers(4, 10))
        seqs.append([(start + i - 1) % 30 + 1 for i in range(n)])
    data = SequenceData.from_lists(seqs)
    split = leave_one_out(data, max_len=6)
    emb = EmbeddingOptimizerConfig("adagrad", lr=0.05)

    def build(dropout: float) -> Mamba4Rec:
        torch.manual_seed(0)
        enc = MambaSequenceEncoder(d_model=8, d_state=4, dropout=dropout, backend="reference")
        return Mamba4Rec(Mamba4RecConfig(num_items=data.num_items, embedding_dim=8), enc)

    def loader(part: Any, r: int, w: int, bs: int = 8, shuffle: bool = True) -> SequenceLoader:
        return SequenceLoader(part, batch_size=bs, shuffle=shuffle, seed=5, rank=r, world_size=w)

    result: dict[str, Any] = {}
    # 1) row-wise sharded training through TrainPipelineSparseDist
    dmp = shard_model(build(0.0), "row_wise", ctx, emb)
    result["plan_types"] = sorted({ps.sharding_type for m in dmp.plan.plan.values() for ps in m.values()})  # type: ignore[attr-defined]
    opt = build_optimizer(dmp, 1e-2, 0.0, emb)
    valid = loader(split.valid, rank, world, 16, False)
    result["valid_before"] = evaluate(dmp, valid, ctx)
    train = loader(split.train, rank, world)
    losses = []
    # A weight average of the sharded model: each rank averages its local table shards in place.
    average = WeightAverage(dmp, 0.9)
    # A cosine lr, as fit's --lr-schedule sets it: the fused table optimizer must follow it
    # (FBGEMM reads param_groups' lr at zero_grad/step) for the reference below to match.
    base_lrs = [g["lr"] for g in opt.param_groups]
    for epoch in range(3):
        for group, base in zip(opt.param_groups, base_lrs, strict=True):
            group["lr"] = base * lr_factor("cosine", epoch, 3)
        train.set_epoch(epoch)
        losses.append(train_one_epoch(dmp, opt, train, ctx, progress=False, epoch=epoch,
                                      on_batch_end=lambda e, d: average.update()))
    result["epoch_losses"] = losses
    result["valid"] = evaluate(dmp, valid, ctx)
    state = dmp.state_dict()
    table = state["ec.embeddings.item.weight"]
    assert isinstance(table, ShardedTensor)
    full = torch.zeros(table.size()) if rank == 0 else None
    table.gather(0, full)
    with average.applied():  # the averaged weights, gathered like the live ones
        avg_state = {k: v.clone() for k, v in dmp.state_dict().items() if not isinstance(v, ShardedTensor)}
        avg_full = torch.zeros(table.size()) if rank == 0 else None
        dmp.state_dict()["ec.embeddings.item.weight"].gather(0, avg_full)
    back = torch.zeros(table.size()) if rank == 0 else None
    dmp.state_dict()["ec.embeddings.item.weight"].gather(0, back)
    result["average_updates"] = average.updates
    eval_batch = next(iter(loader(split.valid, 0, 1, 64, False)))
    with torch.no_grad():
        unwrap(dmp).eval()
        sharded_scores = unwrap(dmp).score(eval_batch)  # collective: both ranks score it
    if rank == 0:
        # 2) the reference: the same updates by hand in one process
        ref = build(0.0)
        dense = [p for n, p in ref.named_parameters() if not n.startswith("ec.")]
        ref_dense = torch.optim.Adam(dense, lr=1e-2)
        ref_table = torch.optim.Adagrad(ref.ec.parameters(), lr=0.05, eps=1e-8)
        halves = [loader(split.train, r, world) for r in range(world)]
        ref_avg = {k: v.clone().double() for k, v in ref.state_dict().items()}
        steps = 0
        for epoch in range(3):
            for ref_opt, base in ((ref_dense, 1e-2), (ref_table, 0.05)):
                ref_opt.param_groups[0]["lr"] = base * lr_factor("cosine", epoch, 3)
            for h in halves:
                h.set_epoch(epoch)
            for b0, b1 in zip(*halves, strict=True):
                ref_dense.zero_grad()
                ref_table.zero_grad()
                loss = (ref(b0)[0] + ref(b1)[0]) / 2  # DDP averages the ranks' mean losses
                loss.backward()
                ref_dense.step()
                ref_table.step()
                d = min(0.9, (1 + steps) / (10 + steps))  # the average, written out
                ref_avg = {k: d * v + (1 - d) * ref.state_dict()[k].double() for k, v in ref_avg.items()}
                steps += 1
        ref_state = ref.state_dict()
        result["reference_steps"] = steps
        result["max_average_table_diff"] = float(
            (avg_full - ref_avg["ec.embeddings.item.weight"]).abs().max())  # type: ignore[operator]
        result["max_average_dense_diff"] = max(
            float((avg_state[k] - v).abs().max()) for k, v in ref_avg.items() if not k.startswith("ec."))
        result["average_moved_the_table"] = float((avg_full - full).abs().max()) > 1e-3  # type: ignore[operator]
        result["live_table_restored"] = bool(torch.equal(back, full))  # type: ignore[arg-type]
        result["max_table_diff"] = float((full - ref_state["ec.embeddings.item.weight"]).abs().max())  # type: ignore[operator]
        result["max_dense_diff"] = max(
            float((state[k] - v).abs().max()) for k, v in ref_state.items() if not k.startswith("ec.")
        )
        ref.eval()
        whole = next(iter(loader(split.valid, 0, 1, len(split.valid), False)))
        with torch.no_grad():  # metrics by hand: evaluate() would all-reduce with rank 1
            result["reference_valid"] = ranking_metrics(ref.score(whole), whole.targets())
            ref_scores = ref.score(eval_batch)
        finite = torch.isfinite(ref_scores)
        result["max_score_diff"] = float((sharded_scores[finite] - ref_scores[finite]).abs().max())

    # 3) crash mid-epoch and resume from the DCP checkpoint
    class Crash(RuntimeError):
        pass

    def run(ckpt: Path, resume: bool = False, crash: bool = False, best_model: Path | None = None) -> Any:
        model = shard_model(build(0.3), "row_wise", ctx, emb)
        optimizer = build_optimizer(model, 1e-2, 0.0, emb)

        def hook(epoch: int, done: int) -> None:
            if crash and (epoch, done) == (1, 2):
                raise Crash

        config = FitConfig(epochs=2, patience=5, checkpoint_dir=str(ckpt), resume=resume, progress=False,
                           best_model_path=None if best_model is None else str(best_model),
                           ema_decay=0.9)  # the average's shards must come back on resume too
        return fit(
            model, optimizer, loader(split.train, rank, world), loader(split.valid, rank, world, 16, False),
            loader(split.test, rank, world, 16, False), config, ctx, on_batch_end=hook,
        )

    full_run = run(out / "ckpt_full", best_model=out / "model.pt")
    # 3b) the sharded run's model.pt is whole: it loads into the unsharded model and reproduces
    # the run's test metrics in one process (what Recommender.load serves)
    if rank == 0:
        from torchrec_mamba.train.sharding import full_state_dict

        single = build(0.3)
        state = torch.load(out / "model.pt", weights_only=True)
        result["model_pt_keys_match"] = sorted(state) == sorted(single.state_dict())
        single.load_state_dict(state, strict=True)
        single.eval()
        whole_test = next(iter(loader(split.test, 0, 1, len(split.test), False)))
        with torch.no_grad():
            result["model_pt_test"] = ranking_metrics(single.score(whole_test), whole_test.targets())
        result["unsharded_export_is_state_dict"] = all(
            torch.equal(v, single.state_dict()[k])
            for k, v in full_state_dict(single, ctx).items()  # type: ignore[union-attr]
        )
    try:
        run(out / "ckpt_crash", crash=True)
        result["crashed"] = False
    except Crash:
        result["crashed"] = True
    resumed = run(out / "ckpt_crash", resume=True)
    result["full_test"] = full_run.test
    result["resumed_test"] = resumed.test
    result["full_history_losses"] = [h["loss"] for h in full_run.history]
    result["resumed_history_losses"] = [h["loss"] for h in resumed.history]

    # 4) rank 1 cannot read its part of the latest DCP folder: both ranks fall back together
    from torchrec_mamba.train.checkpoint import load_checkpoint

    crash_dir = out / "ckpt_crash"
    result["dcp_folders"] = sorted(p.name for p in crash_dir.glob("epoch_*"))
    torch.distributed.barrier()
    if rank == 1:
        (crash_dir / "epoch_0002" / "rank_1.pt").write_bytes(b"cut")
    torch.distributed.barrier()
    model = shard_model(build(0.3), "row_wise", ctx, emb)
    restored = load_checkpoint(crash_dir, model, build_optimizer(model, 1e-2, 0.0, emb), ctx)
    result["fallback_epoch"] = None if restored is None else restored[0]["epoch"]
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    destroy_distributed(ctx)


if __name__ == "__main__":  # pragma: no cover
    _worker(Path(sys.argv[1]))
