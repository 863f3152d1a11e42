"""UserStateStore.from_recommender: streaming in the run's raw ids equals Recommender.recommend
on the whole history (the default recipe's sqrt(d) input scale included), one user's update
leaves the others alone, and save / load(path, recommender) round-trips or refuses a cut file."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from torchrec_mamba import Recommender
from torchrec_mamba.serving import StateFileError, UserStateStore
from torchrec_mamba.train.config import DataInfo, RunConfig, build_model

NUM_ITEMS = 25
RAW = [-1] + [300 + 11 * i for i in range(NUM_ITEMS)]
# the default recipe (embedding_scale="sqrt", head_dtype="bfloat16"), a small model
CFG = RunConfig(data="sasrec:x.txt", output="x", d_model=8, d_state=4, num_layers=2,
                backend="reference")


@pytest.fixture(scope="module")
def rec(tmp_path_factory: pytest.TempPathFactory) -> Recommender:
    run = tmp_path_factory.mktemp("run")
    info = DataInfo(num_items=NUM_ITEMS, raw_item_ids=RAW)
    torch.manual_seed(2)
    model = build_model(CFG, info, targets_per_row=1.0)
    with torch.no_grad():
        model.ec.embeddings["item"].weight.normal_()
    CFG.save(run)
    info.save(run)
    torch.save(model.state_dict(), run / "model.pt")
    return Recommender.load(run)


def _histories() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [[RAW[i] for i in torch.randint(1, NUM_ITEMS + 1, (n,), generator=g).tolist()]
            for n in (1, 4, 9, 17)]


def _stream(store: UserStateStore, users: list[int], histories: list[list[int]]) -> None:
    for t in range(max(map(len, histories))):
        active = [(u, h[t]) for u, h in zip(users, histories, strict=True) if t < len(h)]
        if t % 2:  # non-consecutive slots: the gather / scatter path
            active = active[::-1]
        store.update([u for u, _ in active], [i for _, i in active])


def test_streamed_raw_events_equal_recommend_on_the_history(rec: Recommender) -> None:
    assert rec.model.tower.input_scale == pytest.approx(8 ** 0.5)  # the scale path is exercised
    users, histories = [10, 20, 30, 40], _histories()
    store = UserStateStore.from_recommender(rec, chunk_size=6)
    _stream(store, users, histories)
    ids, scores = store.recommend(users, k=7)
    ref_ids, ref_scores = rec.recommend(histories, k=7)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(scores, ref_scores, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(store.user_vectors(users), rec.user_vectors(histories),
                               rtol=1e-5, atol=1e-5)
    assert ids.min() >= RAW[1]  # raw ids out
    warm = UserStateStore.from_recommender(rec)
    warm.ingest(users, histories)  # the batched warm start agrees too
    assert torch.equal(warm.recommend(users, k=7)[0], ref_ids)


def test_one_users_update_leaves_the_others_alone(rec: Recommender) -> None:
    users, histories = [1, 2, 3], _histories()[:3]
    store = UserStateStore.from_recommender(rec)
    _stream(store, users, histories)
    before = {u: store.state(u) for u in (1, 3)}
    store.update([2], [RAW[5]])
    for u in (1, 3):
        for (c0, s0), (c1, s1) in zip(before[u], store.state(u), strict=True):
            assert torch.equal(c0, c1) and torch.equal(s0, s1)
    with pytest.raises(ValueError, match="history 0: unknown item id 5 "):
        store.update([1], [5])  # a dense id is not a raw id of this run


def test_save_load_with_the_recommender(rec: Recommender, tmp_path: Path) -> None:
    users, histories = [7, 8], _histories()[1:3]
    store = UserStateStore.from_recommender(rec)
    _stream(store, users, histories)
    path = store.save(tmp_path / "states.pt")
    back = UserStateStore.load(path, rec)
    assert torch.equal(back.recommend(users, k=5)[0], store.recommend(users, k=5)[0])
    back.update([7], [RAW[3]])  # still speaks raw ids
    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) - 10])
    with pytest.raises(StateFileError, match="truncated"):
        UserStateStore.load(tmp_path / "cut.pt", rec)


def test_sasrec_runs_cannot_stream() -> None:
    cfg = RunConfig(model="sasrec", d_model=8, num_layers=1, loss_normalization="batch")
    sas = Recommender(build_model(cfg, DataInfo(num_items=5)), max_len=50)
    with pytest.raises(TypeError, match="streaming needs a MambaSequenceEncoder.*SASRecEncoder"):
        UserStateStore.from_recommender(sas)
