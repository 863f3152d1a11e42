"""Recommender: load a run dir (errors name the file), raw ids both ways, top-K equal to the
full score matrix's, history truncation, seen-item exclusion, the category head."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from torchrec_mamba import Recommender
from torchrec_mamba.data import SequenceBatch
from torchrec_mamba.serving import IdVocab
from torchrec_mamba.serving.vocab import ITEM_CATEGORIES
from torchrec_mamba.train.config import DataInfo, RunConfig, build_model

NUM_ITEMS, NUM_CATS, MAX_LEN = 30, 4, 5
RAW = [-1] + [1000 + 7 * i for i in range(NUM_ITEMS)][::-1]  # dense i -> raw RAW[i]
CFG = RunConfig(data="sasrec:x.txt", output="x", d_model=8, d_state=4, num_layers=2,
                max_len=MAX_LEN, backend="reference", dropout=0.0)


def _write_run(path: Path, cfg: RunConfig = CFG, info: DataInfo | None = None) -> Path:
    info = info or DataInfo(num_items=NUM_ITEMS, raw_item_ids=RAW)
    torch.manual_seed(1)
    model = build_model(cfg, info, targets_per_row=1.0)
    with torch.no_grad():  # a distinct, non-default table so a wrong load would show
        model.ec.embeddings["item"].weight.normal_()
    cfg.save(path)
    info.save(path)
    torch.save(model.state_dict(), path / "model.pt")
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _write_run(tmp_path_factory.mktemp("run"))


def _dense_batch(histories: list[list[int]]) -> SequenceBatch:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    values = torch.tensor([i for h in histories for i in h])
    lengths = torch.tensor([len(h) for h in histories], dtype=torch.int32)
    kjt = KeyedJaggedTensor(keys=["item"], values=values, lengths=lengths)
    return SequenceBatch(features=kjt, labels=kjt)


def test_recommend_matches_the_full_score_matrix_in_raw_ids(run_dir: Path) -> None:
    rec = Recommender.load(run_dir, chunk_size=7)  # several chunks, one partial
    dense = [[3, 9, 9, 1], [30], [5, 6, 7, 8, 2]]
    raw = [[RAW[i] for i in h] for h in dense]
    ids, scores = rec.recommend(raw, k=6)
    full = rec.model.score(_dense_batch(dense))  # (B, I + 1), column 0 -inf: the reference
    ref_scores, ref_ids = full.topk(6, dim=1)
    assert ids.tolist() == [[RAW[i] for i in row] for row in ref_ids.tolist()]
    torch.testing.assert_close(scores, ref_scores, rtol=1e-6, atol=1e-6)
    assert scores.dtype == torch.float32 and ids.dtype == torch.int64


def test_long_histories_keep_the_last_max_len(run_dir: Path) -> None:
    rec = Recommender.load(run_dir)
    long = [RAW[i] for i in range(1, 13)]
    a = rec.recommend([long], k=5)
    b = rec.recommend([long[-MAX_LEN:]], k=5)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(rec.user_vectors([long]), rec.user_vectors([long[-MAX_LEN - 1:-1]]))


def test_exclude_seen_drops_the_history(run_dir: Path) -> None:
    rec = Recommender.load(run_dir)
    history = [RAW[i] for i in (2, 4, 6)]
    top_all = rec.recommend([history], k=NUM_ITEMS)[0][0].tolist()
    top_new, scores = rec.recommend([history], k=NUM_ITEMS, exclude_seen=True)
    assert set(top_new[0].tolist()[:NUM_ITEMS - 3]) == set(top_all) - set(history)
    assert top_new[0].tolist()[-3:] == [-1, -1, -1] and torch.isinf(scores[0, -3:]).all()
    assert [i for i in top_all if i not in history] == top_new[0].tolist()[:NUM_ITEMS - 3]


def test_bad_histories_raise_naming_the_row_or_id(run_dir: Path) -> None:
    rec = Recommender.load(run_dir)
    with pytest.raises(ValueError, match=r"history 1: unknown item id 3 "):
        rec.recommend([[RAW[1]], [3]])
    with pytest.raises(ValueError, match=r"history 1 is empty"):
        rec.recommend([[RAW[1]], []])
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 30\].*got 31"):
        rec.recommend([[RAW[1]]], k=31)
    with pytest.raises(TypeError, match="history 0: item id 1.5 is not an int"):
        rec.recommend([[1.5]])
    with pytest.raises(ValueError, match="without categories"):
        rec.recommend_categories([[RAW[1]]])


@pytest.mark.parametrize("victim, message", [
    ("model.pt", r"model\.pt is missing"),
    ("run_config.json", r"run_config\.json is missing"),
    ("data_info.json", r"data_info\.json is missing"),
])
def test_missing_files_are_named(run_dir: Path, tmp_path: Path, victim: str, message: str) -> None:
    run = _write_run(tmp_path)
    (run / victim).unlink()
    with pytest.raises(ValueError, match=message):
        Recommender.load(run)


def test_corrupt_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        Recommender.load(tmp_path / "nowhere")
    run = _write_run(tmp_path / "a")
    data = (run / "model.pt").read_bytes()
    (run / "model.pt").write_bytes(data[: len(data) // 2])  # truncated mid-write
    with pytest.raises(ValueError, match=r"model\.pt is corrupt"):
        Recommender.load(run)
    run = _write_run(tmp_path / "b")
    (run / "data_info.json").write_text('{"num_items": 30, "bogus": 1}')
    with pytest.raises(ValueError, match=r"data_info\.json is corrupt.*bogus"):
        Recommender.load(run)
    run = _write_run(tmp_path / "c")
    (run / "run_config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"run_config\.json is corrupt"):
        Recommender.load(run)
    run = _write_run(tmp_path / "d")
    (run / "data_info.json").write_text(json.dumps({"num_items": 31}))  # table of another size
    with pytest.raises(ValueError, match=r"model\.pt does not fit"):
        Recommender.load(run)


class _Payload:
    """A pickled object a weights_only load must refuse (it could run code when unpickled)."""


def test_model_pt_with_a_pickled_object_is_refused(tmp_path: Path) -> None:
    run = _write_run(tmp_path)
    state = torch.load(run / "model.pt", weights_only=True)
    torch.save({**state, "extra": _Payload()}, run / "model.pt")
    with pytest.raises(ValueError, match=r"model\.pt is corrupt or not a weights-only state_dict"):
        Recommender.load(run)


def test_loading_leaves_the_global_rng_alone(run_dir: Path) -> None:
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    Recommender.load(run_dir)
    assert torch.equal(torch.rand(3), expected)


def test_category_run_recommends_items_and_categories(tmp_path: Path) -> None:
    """An NVTabular-style run dir: vocabs/item.csv, vocabs/category.csv, item_categories.json."""
    cfg = dataclasses.replace(CFG, category_loss_weight=0.5)
    run = _write_run(tmp_path, cfg, DataInfo(num_items=NUM_ITEMS, num_categories=NUM_CATS))
    (run / "vocabs").mkdir()
    # ids 1, 2 are NVTabular's null / OOV rows: no raw id
    lines = ["raw,id,count"] + [f"{500 + i},{i},1" for i in range(3, NUM_ITEMS + 1)]
    (run / "vocabs" / "item.csv").write_text("\n".join(lines) + "\n")
    lines = ["raw,id,count"] + [f"{90 + c},{c},1" for c in range(3, NUM_CATS + 1)]
    (run / "vocabs" / "category.csv").write_text("\n".join(lines) + "\n")
    item_cat = [0] + [1 + i % NUM_CATS for i in range(1, NUM_ITEMS + 1)]
    (run / ITEM_CATEGORIES).write_text(json.dumps(item_cat))
    rec = Recommender.load(run)
    dense = [[3, 4, 5], [10]]
    ids, _ = rec.recommend([[500 + i for i in h] for h in dense], k=NUM_ITEMS - 2)
    assert sorted(ids[0].tolist()) == [500 + i for i in range(3, NUM_ITEMS + 1)]  # never 1, 2

    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    values = torch.tensor([i for h in dense for i in h])
    lengths = torch.tensor([3, 1], dtype=torch.int32)
    cats = torch.tensor([item_cat[i] for i in values.tolist()])
    kjt = KeyedJaggedTensor(keys=["item", "category"], values=torch.cat([values, cats]),
                            lengths=lengths.repeat(2))
    full = rec.model.category_scores(SequenceBatch(features=kjt, labels=kjt))  # (B, C + 1)
    cat_ids, cat_scores = rec.recommend_categories([[500 + i for i in h] for h in dense], k=2)
    full[:, :3] = -torch.inf  # padding and the null / OOV rows 1, 2 are never recommended
    ref_scores, ref_ids = full.topk(2, dim=1)
    decode = {3: 93, 4: 94}
    assert cat_ids.tolist() == [[decode[c] for c in row] for row in ref_ids.tolist()]
    torch.testing.assert_close(cat_scores, ref_scores, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 2\] \(the run's rankable categories\), got 3"):
        rec.recommend_categories([[503]], k=3)
    with pytest.raises(ValueError, match="unknown item id 1 "):
        rec.recommend([[1]])


def test_id_vocab_round_trip() -> None:
    v = IdVocab.from_raw_ids(RAW, NUM_ITEMS)
    dense = v.encode([RAW[1:]])[0]
    assert dense == list(range(1, NUM_ITEMS + 1))
    assert v.decode(torch.tensor(dense)).tolist() == RAW[1:]
    with pytest.raises(ValueError, match="has 3 entries, expected 31"):
        IdVocab.from_raw_ids([-1, 1, 2], NUM_ITEMS)


def test_faiss_index_of_a_run_recommends_like_the_run(tmp_path: Path) -> None:
    """With every list probed the index gives recommend()'s raw ids, never null / OOV rows."""
    pytest.importorskip("faiss")
    from torchrec_mamba.serving import FaissItemIndex

    run = _write_run(tmp_path, CFG, DataInfo(num_items=NUM_ITEMS))
    (run / "vocabs").mkdir()
    lines = ["raw,id,count"] + [f"{500 + i},{i},1" for i in range(3, NUM_ITEMS + 1)]
    (run / "vocabs" / "item.csv").write_text("\n".join(lines) + "\n")
    rec = Recommender.load(run)
    histories = [[503, 504, 505], [510], [520, 521]]
    index = FaissItemIndex.from_recommender(rec, nlist=4, nprobe=4)
    assert index.num_indexed == NUM_ITEMS - 2
    ids, scores = index.recommend(rec, histories, k=5)
    want_ids, want_scores = rec.recommend(histories, k=5)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(scores, want_scores, rtol=1e-5, atol=1e-5)
