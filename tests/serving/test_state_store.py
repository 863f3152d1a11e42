"""UserStateStore: streaming equals re-encoding, isolation, atomic checksummed save / load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_mamba.data import SequenceBatch
from torchrec_mamba.models.mamba4rec import Mamba4Rec, Mamba4RecConfig
from torchrec_mamba.modules import MambaSequenceEncoder
from torchrec_mamba.serving import StateFileError, UserStateStore

NUM_ITEMS, NUM_CATS, DIM = 40, 6, 16


def _model(num_categories: int = 0, num_layers: int = 2) -> Mamba4Rec:
    torch.manual_seed(0)
    enc = MambaSequenceEncoder(d_model=DIM, num_layers=num_layers, d_state=4, backend="reference")
    cfg = Mamba4RecConfig(num_items=NUM_ITEMS, embedding_dim=DIM, num_categories=num_categories)
    return Mamba4Rec(cfg, enc).eval()


def _histories(seed: int = 0, users: int = 5) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    lengths = [1, 3, 7, 12, 20][:users]
    return [torch.randint(1, NUM_ITEMS + 1, (n,), generator=g).tolist() for n in lengths]


def _category_of(item: int) -> int:
    return 1 + item % NUM_CATS


def _batch(histories: list[list[int]], with_categories: bool) -> SequenceBatch:
    values = torch.tensor([i for h in histories for i in h])
    lengths = torch.tensor([len(h) for h in histories], dtype=torch.int32)
    keys, vals = ["item"], [values]
    if with_categories:
        keys.append("category")
        vals.append(torch.tensor([_category_of(int(i)) for i in values]))
    kjt = KeyedJaggedTensor(keys=keys, values=torch.cat(vals), lengths=lengths.repeat(len(keys)))
    return SequenceBatch(features=kjt, labels=kjt)


def _stream(
    store: UserStateStore, histories: list[list[int]], users: list[int], cats: bool,
    scramble: bool = False,
) -> None:
    """Feed every history event by event, batching the users that still have an event.

    ``scramble`` reverses the user order of every other call, so slots are not consecutive and
    the gather / scatter path runs (otherwise the in-place path for consecutive slots does).
    """
    for t in range(max(len(h) for h in histories)):
        active = [(u, h[t]) for u, h in zip(users, histories, strict=True) if t < len(h)]
        if scramble and t % 2:
            active = active[::-1]
        items = [i for _, i in active]
        store.update([u for u, _ in active], items, [_category_of(i) for i in items] if cats else None)


@pytest.mark.parametrize("scramble", [False, True])
@pytest.mark.parametrize("num_categories", [0, NUM_CATS])
def test_streaming_equals_reencoding(num_categories: int, scramble: bool) -> None:
    model = _model(num_categories)
    histories = _histories()
    users = [101, 7, 5_000_000_000, 3, 42]  # any int64 ids
    store = UserStateStore.from_model(model, capacity=2)  # grows while streaming
    _stream(store, histories, users, cats=num_categories > 0, scramble=scramble)
    batch = _batch(histories, with_categories=num_categories > 0)
    with torch.no_grad():
        want_vec = model.user_representation(batch)  # (B, D) re-encoding the whole history
        want_s, want_i = model.score(batch)[:, 1:].topk(10, dim=1)
    torch.testing.assert_close(store.user_vectors(users), want_vec, rtol=1e-4, atol=1e-5)
    ids, scores = store.recommend(users, k=10)
    assert torch.equal(ids, want_i + 1)
    torch.testing.assert_close(scores, want_s, rtol=1e-4, atol=1e-5)
    assert store.num_events(users).tolist() == [len(h) for h in histories]


def test_one_users_update_never_changes_another() -> None:
    store = UserStateStore.from_model(_model())
    _stream(store, _histories(), [1, 2, 3, 4, 5], cats=False)
    before = {u: store.state(u) for u in (1, 3, 4, 5)}
    vec_before = store.user_vectors([1, 3, 4, 5])
    store.update([2], [9])  # one slot: in place
    store.update([2, 99], [10, 11])  # slots 1 and 5: gather / scatter, and a new user
    for u, layers in before.items():
        for (c0, s0), (c1, s1) in zip(layers, store.state(u), strict=True):
            assert torch.equal(c0, c1) and torch.equal(s0, s1)
    assert torch.equal(store.user_vectors([1, 3, 4, 5]), vec_before)
    assert store.num_events([2, 99]).tolist() == [len(_histories()[1]) + 2, 1]
    before = {u: store.state(u) for u in (1, 4, 5)}
    store.update([2, 3], [1, 2])  # consecutive slots 1, 2: rows stepped in place
    for u, layers in before.items():
        for (c0, s0), (c1, s1) in zip(layers, store.state(u), strict=True):
            assert torch.equal(c0, c1) and torch.equal(s0, s1)


def test_save_load_roundtrip(tmp_path: Path) -> None:
    model = _model()
    store = UserStateStore.from_model(model)
    _stream(store, _histories(), [10, 20, 30, 40, 50], cats=False)
    path = store.save(tmp_path / "states.pt")
    loaded = UserStateStore.load(path, model.encoder, store.items, store.input_fn)
    assert loaded.user_ids == store.user_ids
    for u in store.user_ids:
        for a, b in zip(store.state(u), loaded.state(u), strict=True):
            assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    store.update([10, 60], [3, 4])
    loaded.update([10, 60], [3, 4])  # the loaded store keeps streaming identically
    assert torch.equal(store.recommend([10, 60])[0], loaded.recommend([10, 60])[0])
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary left behind


def _saved(tmp_path: Path) -> tuple[Path, UserStateStore]:
    store = UserStateStore.from_model(_model())
    _stream(store, _histories(), [1, 2, 3, 4, 5], cats=False)
    return store.save(tmp_path / "s.pt"), store


@pytest.mark.parametrize("keep", [0.999, 0.5, 0.01])
def test_truncated_file_is_refused(tmp_path: Path, keep: float) -> None:
    path, store = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])  # a write that died midway
    with pytest.raises(StateFileError, match="truncated"):
        UserStateStore.load(path, store.encoder, store.items)


def test_corrupted_and_foreign_files_are_refused(tmp_path: Path) -> None:
    path, store = _saved(tmp_path)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(StateFileError, match="sha256 checksum mismatch"):
        UserStateStore.load(path, store.encoder, store.items)
    torch.save({"x": 1}, path)
    with pytest.raises(StateFileError, match="bad magic"):
        UserStateStore.load(path, store.encoder, store.items)
    with pytest.raises(StateFileError, match="does not exist"):
        UserStateStore.load(tmp_path / "missing.pt", store.encoder, store.items)


def test_load_refuses_another_encoder_shape(tmp_path: Path) -> None:
    path, store = _saved(tmp_path)
    other = _model(num_layers=1)
    with pytest.raises(StateFileError, match="holds states of shape"):
        UserStateStore.load(path, other.encoder, store.items)


def test_bad_updates() -> None:
    store = UserStateStore.from_model(_model(NUM_CATS))
    with pytest.raises(ValueError, match="user id 3 appears twice"):
        store.update([3, 3], [1, 2], [1, 1])
    with pytest.raises(ValueError, match=r"item id 41 out of range \[1, 40\]"):
        store.update([1], [41], [1])
    with pytest.raises(ValueError, match="item id 0 out of range"):
        store.update([1], [0], [1])
    with pytest.raises(ValueError, match="differ in length"):
        store.update([1, 2], [1], [1])
    with pytest.raises(ValueError, match="pass category_ids"):
        store.update([1], [1])
    with pytest.raises(ValueError, match="unknown user id 77"):
        store.recommend([77])
    with pytest.raises(ValueError, match="1-D sequence of ints"):
        store.update([1.5], [1], [1])
    assert len(store) == 0  # nothing half-applied


def test_forget_resets_to_empty_history() -> None:
    model = _model()
    store = UserStateStore.from_model(model)
    store.update([1, 2], [5, 6])
    store.forget([1])
    store.update([1], [7])
    fresh = UserStateStore.from_model(model)
    fresh.update([1], [7])
    assert torch.equal(store.user_vectors([1]), fresh.user_vectors([1]))
    assert store.num_events([1, 2]).tolist() == [1, 1]


@pytest.mark.parametrize("num_categories", [0, NUM_CATS])
def test_fast_table_lookup_equals_ec_lookup(num_categories: int) -> None:
    from torchrec_mamba.serving.tables import table_lookup as _table_lookup

    model = _model(num_categories)
    ids = torch.tensor([1, 5, 5, 40])
    fast = _table_lookup(model, "item", "item_candidates")(ids)
    assert torch.equal(fast, model._lookup("item_candidates", ids))
    if num_categories:
        cats = torch.tensor([1, 6, 2])
        fast = _table_lookup(model, "category", "category_candidates")(cats)
        assert torch.equal(fast, model._lookup("category_candidates", cats))


@pytest.mark.parametrize("num_categories", [0, NUM_CATS])
def test_ingest_then_stream_equals_reencoding(num_categories: int) -> None:
    model = _model(num_categories)
    histories = _histories()
    users = [5, 6, 7, 8, 9]
    cut = [len(h) // 2 for h in histories]  # the first history is cut to length 0 (a cold user)
    cats = num_categories > 0
    store = UserStateStore.from_model(model)
    prefix = [h[:c] for h, c in zip(histories, cut, strict=True)]
    store.ingest(users, prefix, [[_category_of(i) for i in h] for h in prefix] if cats else None)
    assert store.num_events(users).tolist() == cut
    rest = [h[c:] for h, c in zip(histories, cut, strict=True)]
    _stream(store, rest, users, cats=cats, scramble=True)
    with torch.no_grad():
        want = model.user_representation(_batch(histories, with_categories=cats))
    torch.testing.assert_close(store.user_vectors(users), want, rtol=1e-4, atol=1e-5)


def test_ingest_bad_input() -> None:
    store = UserStateStore.from_model(_model())
    with pytest.raises(ValueError, match="distinct user ids and one history each"):
        store.ingest([1, 1], [[1], [2]])
    with pytest.raises(ValueError, match="distinct user ids and one history each"):
        store.ingest([1, 2], [[1]])
    with pytest.raises(ValueError, match=r"item id 99 out of range \[1, 40\]"):
        store.ingest([1], [[3, 99]])
    assert len(store) == 0


def test_from_model_refuses_what_it_cannot_stream() -> None:
    from torchrec_mamba.models.mamba4rec import SideFeature
    from torchrec_mamba.models.sasrec import SASRecEncoder

    enc = MambaSequenceEncoder(d_model=DIM, d_state=4, backend="reference")
    cfg = Mamba4RecConfig(num_items=NUM_ITEMS, embedding_dim=DIM,
                          side_features=(SideFeature("user", 10),))
    with pytest.raises(ValueError, match="side features"):
        UserStateStore.from_model(Mamba4Rec(cfg, enc))
    sasrec = Mamba4Rec(Mamba4RecConfig(num_items=NUM_ITEMS, embedding_dim=DIM),
                       SASRecEncoder(d_model=DIM, max_len=8))
    with pytest.raises(TypeError, match="needs a MambaSequenceEncoder"):
        UserStateStore.from_model(sasrec)
