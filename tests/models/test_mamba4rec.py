"""Mamba4Rec (TorchRec model): losses against a hand-written reference, tied head through the EC,
id checks, meta device, scores, sampled softmax, category head, side features, FX traceability."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_mamba.data.batch import SequenceBatch
from torchrec_mamba.models import (
    Mamba4Rec,
    Mamba4RecConfig,
    SampledSoftmaxConfig,
    SampledSoftmaxHead,
    SASRecEncoder,
    SideFeature,
)
from torchrec_mamba.models.heads import FullSoftmaxHead
from torchrec_mamba.models.mamba4rec import ITEM_CANDIDATES
from torchrec_mamba.modules import MambaSequenceEncoder

D = 8
N_ITEMS = 20


def encoder(dropout: float = 0.0) -> MambaSequenceEncoder:
    return MambaSequenceEncoder(d_model=D, d_state=4, dropout=dropout, backend="reference")


def make_model(seed: int = 0, dropout: float = 0.0, **cfg: object) -> Mamba4Rec:
    torch.manual_seed(seed)
    config = Mamba4RecConfig(num_items=N_ITEMS, embedding_dim=D, **cfg)  # type: ignore[arg-type]
    return Mamba4Rec(config, encoder(dropout))


def kjt(keys: list[str], rows: list[list[list[int]]]) -> KeyedJaggedTensor:
    """rows[k][b] = ids of key k in row b."""
    values = [v for key_rows in rows for row in key_rows for v in row]
    lengths = [len(row) for key_rows in rows for row in key_rows]
    return KeyedJaggedTensor.from_lengths_sync(
        keys, torch.tensor(values, dtype=torch.long), torch.tensor(lengths, dtype=torch.int32)
    )


def make_batch(
    inputs: list[list[int]] | None = None,
    labels: list[list[int]] | None = None,
    categories: tuple[list[list[int]], list[list[int]]] | None = None,
    side: KeyedJaggedTensor | None = None,
) -> SequenceBatch:
    inputs = inputs if inputs is not None else [[1, 2, 3, 4], [5, 6], [7, 8, 9]]
    labels = labels if labels is not None else [[2, 3, 4, 5], [6, 0], [8, 9, 10]]
    if categories is None:
        return SequenceBatch(features=kjt(["item"], [inputs]), labels=kjt(["item"], [labels]), side=side)
    return SequenceBatch(
        features=kjt(["item", "category"], [inputs, categories[0]]),
        labels=kjt(["item", "category"], [labels, categories[1]]),
        side=side,
    )


def reference_loss(model: Mamba4Rec, batch: SequenceBatch, last_only: bool) -> torch.Tensor:
    """Independent forward: table rows indexed directly, padding by hand, CE over weight[1:]."""
    table = model.ec.embeddings["item"].weight  # (I + 1, D)
    ids, lengths = batch.padded()  # (B, L), (B,)
    labels, _ = batch.padded_labels()  # (B, L)
    x = table[ids] * (ids > 0)[..., None]  # (B, L, D), zeros at padding
    h = model.encoder(x, lengths)  # (B, L, D)
    losses = []
    for b in range(ids.shape[0]):
        n = int(lengths[b])
        positions = [n - 1] if last_only else range(n)
        for t in positions:
            y = int(labels[b, t])
            if y > 0:
                logits = h[b, t] @ table[1:].T  # (I,)
                losses.append(F.cross_entropy(logits[None], torch.tensor([y - 1])))
    return torch.stack(losses).mean()


@pytest.mark.parametrize("positions", ["all", "last"])
def test_loss_matches_reference(positions: str) -> None:
    model = make_model(loss_positions=positions)
    batch = make_batch()
    loss, out = model(batch)
    assert_close(loss, reference_loss(model, batch, last_only=positions == "last"))
    expected_targets = 8 if positions == "all" else 2  # label 0 (row 1, last position) is ignored
    assert int(out.num_targets) == expected_targets
    assert not out.loss.requires_grad


def test_backward_reaches_encoder_and_every_candidate_row() -> None:
    model = make_model()
    loss, _ = model(make_batch())
    loss.backward()
    grad = model.ec.embeddings["item"].weight.grad  # (I + 1, D)
    assert grad is not None
    # the tied head looks up every item 1..I, so rows never seen in the batch get gradient too
    assert bool((grad[1:].abs().sum(1) > 0).all())
    assert float(grad[0].abs().sum()) == 0.0  # padding is never a candidate
    enc_grads = [p.grad for p in model.encoder.parameters() if p.requires_grad]
    assert all(g is not None for g in enc_grads)
    assert sum(float(g.abs().sum()) for g in enc_grads if g is not None) > 0


def test_all_and_last_losses_differ() -> None:
    batch = make_batch()
    loss_all, _ = make_model(loss_positions="all")(batch)
    loss_last, _ = make_model(loss_positions="last")(batch)
    assert not torch.allclose(loss_all, loss_last)


def test_training_reduces_loss() -> None:
    model = make_model(dropout=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = make_batch()
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss, _ = model(batch)
        loss.backward()
        opt.step()
        first = float(loss.detach()) if first is None else first
    assert float(loss.detach()) < 0.5 * first


def test_tied_head_reads_the_table_through_the_ec() -> None:
    model = make_model()
    assert_close(model.item_embeddings(), model.ec.embeddings["item"].weight[1:])
    prepared = model.prepare_batch(make_batch())
    assert prepared.features.keys() == ["item", ITEM_CANDIDATES]
    cand = prepared.features[ITEM_CANDIDATES]
    assert cand.values().tolist() == list(range(1, N_ITEMS + 1))
    assert cand.lengths().tolist() == [N_ITEMS, 0, 0]  # all candidates sit in row 0
    assert model.prepare_batch(prepared) is prepared  # idempotent


def test_small_candidate_chunks_give_the_same_table() -> None:
    model = make_model(candidate_chunk_size=3)
    assert_close(model.item_embeddings(), model.ec.embeddings["item"].weight[1:])


def test_score_shape_padding_column_and_values() -> None:
    model = make_model().eval()
    batch = make_batch()
    with torch.no_grad():
        scores = model.score(batch)  # (B, I + 1)
        user = model.user_representation(batch)  # (B, D)
        ids, lengths = batch.padded()
        table = model.ec.embeddings["item"].weight
        h = model.encoder(table[ids] * (ids > 0)[..., None], lengths)
        expected_user = h[torch.arange(3), lengths - 1]
    assert scores.shape == (3, N_ITEMS + 1)
    assert bool(torch.isneginf(scores[:, 0]).all())
    assert_close(user, expected_user)
    assert_close(scores[:, 1:], expected_user @ table[1:].T)
    assert_close(model.score(batch, item_embeddings=model.item_embeddings()), scores)


@pytest.mark.parametrize(
    ("where", "bad", "match"),
    [
        ("features", N_ITEMS + 1, r"features\['item'\] has id 21 outside \[0, 21\).*21 rows"),
        ("features", -3, r"features\['item'\] has id -3 outside \[0, 21\)"),
        ("labels", N_ITEMS + 5, r"labels\['item'\] has id 25 outside \[0, 21\)"),
    ],
)
def test_out_of_range_ids_raise_before_lookup(where: str, bad: int, match: str) -> None:
    model = make_model()

    def lookup_must_not_run(*_: object) -> None:
        raise AssertionError("embedding lookup ran before the id check")

    model.ec.forward = lookup_must_not_run  # type: ignore[method-assign]
    inputs, labels = [[1, 2], [3, 4]], [[2, 3], [4, 5]]
    (inputs if where == "features" else labels)[1][0] = bad
    with pytest.raises(ValueError, match=match):
        model(make_batch(inputs, labels))
    with pytest.raises(ValueError, match=match):
        model.score(make_batch(inputs, labels))


def test_missing_keys_and_side_raise() -> None:
    with pytest.raises(ValueError, match=r"batch.features lacks key 'category'"):
        make_model(num_categories=4)(make_batch())
    with pytest.raises(ValueError, match=r"side features \['user'\] but batch.side is None"):
        make_model(side_features=(SideFeature("user", 5),))(make_batch())
    with pytest.raises(TypeError, match="expected a SequenceBatch"):
        make_model().prepare_batch("not a batch")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_items": 0}, "num_items must be an int >= 1"),
        ({"num_items": 5, "loss_positions": "first"}, "loss_positions must be 'all' or 'last'"),
        ({"num_items": 5, "category_loss_weight": 1.0}, "needs num_categories > 0"),
        ({"num_items": 5, "item_loss_weight": 0.0}, "nothing to train"),
        ({"num_items": 5, "item_loss_weight": -1.0}, "item_loss_weight must be finite and >= 0"),
        ({"num_items": 5, "side_features": (SideFeature("u", 2), SideFeature("u", 3))}, "duplicate"),
    ],
)
def test_config_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Mamba4RecConfig(**kwargs)  # type: ignore[arg-type]


def test_encoder_width_must_match() -> None:
    with pytest.raises(ValueError, match="encoder d_model=8 differs from embedding_dim=16"):
        Mamba4Rec(Mamba4RecConfig(num_items=5, embedding_dim=16), encoder())


def test_meta_device_construction() -> None:
    enc = MambaSequenceEncoder(d_model=D, d_state=4, backend="reference", device="meta")
    model = Mamba4Rec(Mamba4RecConfig(num_items=1000, embedding_dim=D), enc, device="meta")
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert model.ec.embeddings["item"].weight.shape == (1001, D)


def test_sasrec_encoder_plugs_in() -> None:
    torch.manual_seed(0)
    enc = SASRecEncoder(d_model=D, num_layers=1, num_heads=2, max_len=8, dropout=0.0)
    model = Mamba4Rec(Mamba4RecConfig(num_items=N_ITEMS, embedding_dim=D), enc)
    batch = make_batch()
    loss, _ = model(batch)
    assert_close(loss, reference_loss(model, batch, last_only=False))


def test_category_head_and_fusion() -> None:
    cats = ([[1, 1, 2, 2], [3, 3], [1, 2, 3]], [[1, 2, 2, 3], [3, 0], [2, 3, 1]])
    batch = make_batch(categories=cats)
    model = make_model(num_categories=3, category_loss_weight=0.5, item_loss_weight=2.0)
    loss, out = model(batch)
    assert_close(loss, 2.0 * out.item_loss + 0.5 * out.category_loss)
    # reference: input = item + category embedding; category head tied to the category table
    item_t = model.ec.embeddings["item"].weight
    cat_t = model.ec.embeddings["category"].weight
    ids, lengths = batch.padded("item")
    cids, _ = batch.padded("category")
    x = (item_t[ids] + cat_t[cids]) * (ids > 0)[..., None]
    h = model.encoder(x, lengths)
    clabels, _ = batch.padded_labels("category")
    real = (torch.arange(ids.shape[1])[None] < lengths[:, None]) & (clabels > 0)
    ref = F.cross_entropy(h[real] @ cat_t[1:].T, clabels[real] - 1)
    assert_close(out.category_loss, ref)
    loss.backward()
    assert float(cat_t.grad[1:].abs().sum()) > 0  # type: ignore[union-attr]


def test_categories_as_input_only() -> None:
    cats = ([[1, 1, 2, 2], [3, 3], [1, 2, 3]], [[1, 2, 2, 3], [3, 0], [2, 3, 1]])
    model = make_model(num_categories=3)
    assert model.feature_keys == ["item", "category", ITEM_CANDIDATES, "category_candidates"]
    _, out = model(make_batch(categories=cats))
    assert float(out.category_loss) == 0.0


def test_side_features_add_to_user_representation() -> None:
    side = kjt(["user"], [[[1], [2], [3]]])
    model = make_model(side_features=(SideFeature("user", 4),)).eval()
    batch = make_batch(side=side)
    with torch.no_grad():
        with_side = model.user_representation(batch)
        user_table = model.ebc.embedding_bags["user"].weight  # type: ignore[union-attr]
        ids, lengths = batch.padded()
        table = model.ec.embeddings["item"].weight
        h = model.encoder(table[ids] * (ids > 0)[..., None], lengths)
        expected = h[torch.arange(3), lengths - 1] + user_table[torch.tensor([1, 2, 3])]
    assert_close(with_side, expected)
    bad_side = kjt(["user"], [[[1], [9], [3]]])
    with pytest.raises(ValueError, match=r"side\['user'\] has id 9 outside \[0, 4\)"):
        model(make_batch(side=bad_side))


def test_sampled_softmax_head_matches_formula() -> None:
    torch.manual_seed(0)
    head = SampledSoftmaxHead(SampledSoftmaxConfig(num_negatives=4))
    user, pos, neg = torch.randn(3, D), torch.randn(3, D), torch.randn(4, D)
    targets, negatives = torch.tensor([1, 2, 3]), torch.tensor([2, 5, 6, 7])
    log_q = torch.log(torch.rand(N_ITEMS + 1))
    loss = head(user, pos, neg, targets, negatives, log_q)
    expected = []
    for t in range(3):
        logits = [float(user[t] @ pos[t]) - math.log(4 * float(log_q[targets[t]].exp()))]
        for s in range(4):
            if int(negatives[s]) != int(targets[t]):  # accidental hit removed
                logits.append(float(user[t] @ neg[s]) - math.log(4 * float(log_q[negatives[s]].exp())))
        expected.append(-torch.log_softmax(torch.tensor(logits, dtype=torch.float64), 0)[0])
    assert_close(loss.double(), torch.stack(expected).mean(), rtol=1e-5, atol=1e-6)


def test_sampled_softmax_model() -> None:
    counts = torch.arange(N_ITEMS + 1).float()
    torch.manual_seed(0)
    config = Mamba4RecConfig(
        num_items=N_ITEMS, embedding_dim=D, sampled_softmax=SampledSoftmaxConfig(num_negatives=6)
    )
    model = Mamba4Rec(config, encoder(), item_counts=counts)
    prepared = model.prepare_batch(make_batch())
    cand = prepared.features[ITEM_CANDIDATES].values()
    assert cand.numel() == 8 + 6  # the 8 positive labels, then 6 negatives
    assert cand[:8].tolist() == [2, 3, 4, 5, 6, 8, 9, 10]
    assert int(cand[8:].min()) >= 1  # padding (q = 0) is never drawn
    loss, _ = model(prepared)
    loss.backward()
    assert math.isfinite(float(loss.detach()))
    with pytest.raises(ValueError, match=r"item_counts must have shape \(21,\)"):
        Mamba4Rec(config, encoder(), item_counts=torch.ones(5))


def test_full_softmax_scores_padding_column() -> None:
    s = FullSoftmaxHead.scores(torch.ones(2, 3), torch.ones(4, 3))
    assert s.shape == (2, 5)
    assert bool(torch.isneginf(s[:, 0]).all()) and bool((s[:, 1:] == 3).all())


def test_forward_is_fx_traceable_with_lookups_on_the_batch() -> None:
    """TrainPipelineSparseDist traces the model with the EC/EBC/tower as leaves and pipelines
    the EC only if its input is read straight off the batch."""

    class LeafTracer(torch.fx.Tracer):
        def is_leaf_module(self, m: torch.nn.Module, name: str) -> bool:
            return name in ("ec", "ebc", "tower") or super().is_leaf_module(m, name)

    model = make_model(side_features=(SideFeature("user", 4),))
    graph = LeafTracer().trace(model)
    calls = {n.target: n for n in graph.nodes if n.op == "call_module"}
    assert set(calls) == {"ec", "ebc", "tower"}
    for name, attr in (("ec", "features"), ("ebc", "side")):
        arg = calls[name].args[0]
        assert arg.op == "call_function" and arg.args[1] == attr  # getattr(batch, attr)
        assert arg.args[0].op == "placeholder"


CATS = ([[1, 1, 2, 2], [3, 3], [1, 2, 3]], [[1, 2, 2, 3], [3, 0], [2, 3, 1]])


@pytest.mark.parametrize("category_loss_weight", [0.0, 0.5])
def test_category_embeddings_and_scores(category_loss_weight: float) -> None:
    """Rows 1..C of the category table through the EC; scores = user @ table[1:].T, -inf at 0."""
    model = make_model(
        num_categories=3, category_loss_weight=category_loss_weight, candidate_chunk_size=2
    ).eval()
    batch = make_batch(categories=CATS)
    cat_t = model.ec.embeddings["category"].weight  # (C + 1, D)
    with torch.no_grad():
        emb = model.category_embeddings()  # (C, D)
        scores = model.category_scores(batch)  # (B, C + 1)
        # independent user vectors: fused input by direct indexing, last real position
        item_t = model.ec.embeddings["item"].weight
        ids, lengths = batch.padded("item")
        cids, _ = batch.padded("category")
        h = model.encoder((item_t[ids] + cat_t[cids]) * (ids > 0)[..., None], lengths)
        user = h[torch.arange(3), lengths - 1]  # (B, D)
        reused = model.category_scores(batch, category_embeddings=emb)
    assert_close(emb, cat_t[1:])
    assert scores.shape == (3, 4)
    assert bool(torch.isneginf(scores[:, 0]).all())
    assert_close(scores[:, 1:], user @ cat_t[1:].T)
    assert_close(reused, scores)


def test_category_api_needs_a_category_table() -> None:
    model = make_model().eval()
    need = r"\(\) needs a category table, but this model has num_categories=0"
    with pytest.raises(ValueError, match="category_embeddings" + need):
        model.category_embeddings()
    with pytest.raises(ValueError, match="category_scores" + need):
        model.category_scores(make_batch())
    with_table = make_model(num_categories=3).eval()
    with pytest.raises(ValueError, match="batch.features lacks key 'category'"):
        with_table.category_scores(make_batch())
