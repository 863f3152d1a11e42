"""SequenceBatch: the Pipelineable contract, padding and targets."""

from __future__ import annotations

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from torchrec_mamba.data.batch import SequenceBatch, jagged_to_padded

ROWS = [[3, 1, 4], [], [1, 5, 9, 2, 6], [5]]
NEXT = [[1, 4, 7], [], [5, 9, 2, 6, 8], [3]]


def _kjt(keys: list[str], rows_per_key: list[list[list[int]]]) -> KeyedJaggedTensor:
    values = [v for rows in rows_per_key for r in rows for v in r]
    lengths = [len(r) for rows in rows_per_key for r in rows]
    return KeyedJaggedTensor.from_lengths_sync(
        keys, torch.tensor(values, dtype=torch.long), torch.tensor(lengths, dtype=torch.int32)
    )


def _batch(with_side: bool = True) -> SequenceBatch:
    cats = [[r_i % 3 + 1 for r_i in r] for r in ROWS]
    next_cats = [[r_i % 3 + 1 for r_i in r] for r in NEXT]
    return SequenceBatch(
        features=_kjt(["item", "category"], [ROWS, cats]),
        labels=_kjt(["item", "category"], [NEXT, next_cats]),
        side=_kjt(["user"], [[[10], [11], [12], [13]]]) if with_side else None,
        user=torch.tensor([10, 11, 12, 13]),
    )


def _padded_reference(rows: list[list[int]], max_len: int | None) -> torch.Tensor:
    width = max_len if max_len is not None else max(max(len(r) for r in rows), 1)
    out = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        kept = r[-width:] if r else []
        out[b, : len(kept)] = torch.tensor(kept, dtype=torch.long)
    return out


def _assert_batches_equal(a: SequenceBatch, b: SequenceBatch) -> None:
    for x, y in ((a.features, b.features), (a.labels, b.labels), (a.side, b.side)):
        assert x is not None and y is not None
        assert x.keys() == y.keys()
        torch.testing.assert_close(x.values(), y.values())
        torch.testing.assert_close(x.lengths(), y.lengths())
    assert a.user is not None and b.user is not None
    torch.testing.assert_close(a.user, b.user)


def test_is_pipelineable() -> None:
    assert isinstance(_batch(), Pipelineable)


def test_batch_size_lengths_targets() -> None:
    batch = _batch()
    assert batch.batch_size == 4
    torch.testing.assert_close(batch.lengths().long(), torch.tensor([3, 0, 5, 1]))
    torch.testing.assert_close(batch.lengths("category").long(), torch.tensor([3, 0, 5, 1]))
    # last label per row; the empty row has no target and gives 0
    torch.testing.assert_close(batch.targets(), torch.tensor([7, 0, 8, 3]))
    torch.testing.assert_close(batch.targets("category"), torch.tensor([2, 0, 3, 1]))


@pytest.mark.parametrize("max_len", [None, 1, 2, 5, 7])
def test_padded_matches_reference(max_len: int | None) -> None:
    batch = _batch()
    ids, lengths = batch.padded(max_len=max_len)
    expected = _padded_reference(ROWS, max_len)
    torch.testing.assert_close(ids, expected)
    torch.testing.assert_close(
        lengths, torch.tensor([min(len(r), expected.shape[1]) for r in ROWS])
    )
    labels, _ = batch.padded_labels(max_len=max_len)
    torch.testing.assert_close(labels, _padded_reference(NEXT, max_len))


def test_padded_category_and_all_empty() -> None:
    batch = _batch()
    cats, _ = batch.padded("category")
    torch.testing.assert_close(
        cats, _padded_reference([[v % 3 + 1 for v in r] for r in ROWS], None)
    )
    empty = jagged_to_padded(torch.zeros(0, dtype=torch.long), torch.zeros(3, dtype=torch.int32))
    torch.testing.assert_close(empty, torch.zeros(3, 1, dtype=torch.long))


def test_padded_rejects_bad_max_len_and_key() -> None:
    batch = _batch()
    with pytest.raises(ValueError, match="max_len must be >= 1, got 0"):
        batch.padded(max_len=0)
    with pytest.raises(KeyError, match="'brand' not in batch"):
        batch.padded("brand")


def test_to_cpu_copies_everything() -> None:
    batch = _batch()
    moved = batch.to(torch.device("cpu"), non_blocking=True)
    assert isinstance(moved, SequenceBatch) and moved is not batch
    _assert_batches_equal(moved, batch)
    assert moved.device == torch.device("cpu")
    no_side = _batch(with_side=False).to("cpu")
    assert no_side.side is None and no_side.mask is None


def test_pin_memory() -> None:
    batch = _batch()
    try:
        pinned = batch.pin_memory()
    except RuntimeError as err:  # CPU-only builds cannot pin memory
        pytest.skip(f"pinning unsupported here: {err}")
    assert pinned.features.values().is_pinned() and pinned.labels.lengths().is_pinned()
    _assert_batches_equal(pinned, batch)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_cuda_and_record_stream() -> None:
    batch = _batch().pin_memory()
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        moved = batch.to(torch.device("cuda"), non_blocking=True)
    moved.record_stream(torch.cuda.current_stream())
    torch.cuda.current_stream().wait_stream(stream)
    _assert_batches_equal(moved.to("cpu"), batch)
    torch.testing.assert_close(moved.targets().cpu(), torch.tensor([7, 0, 8, 3]))


def test_validate_accepts_good_batch() -> None:
    _batch().validate(num_items=9, num_categories=3)


def test_validate_errors() -> None:
    good = _batch()
    with pytest.raises(ValueError, match=r"id 9 > 8 \(out of range\)"):
        good.validate(num_items=8)
    with pytest.raises(ValueError, match=r"features\['category'\] has id 3 > 2"):
        good.validate(num_categories=2)
    zero = SequenceBatch(features=_kjt(["item"], [[[0, 1]]]), labels=_kjt(["item"], [[[1, 2]]]))
    with pytest.raises(ValueError, match="has id 0; ids must be >= 1"):
        zero.validate()
    uneven = SequenceBatch(features=_kjt(["item"], [[[1, 2]]]), labels=_kjt(["item"], [[[1]]]))
    with pytest.raises(ValueError, match="labels lengths differ"):
        uneven.validate()
    keys = SequenceBatch(features=_kjt(["item"], [[[1]]]), labels=_kjt(["cat"], [[[1]]]))
    with pytest.raises(ValueError, match="labels keys"):
        keys.validate()
    bad_user = SequenceBatch(
        features=_kjt(["item"], [[[1]]]), labels=_kjt(["item"], [[[2]]]), user=torch.zeros(2)
    )
    with pytest.raises(ValueError, match=r"user has shape \(2,\), expected \(1,\)"):
        bad_user.validate()


def test_train_pipeline_base_runs_a_step() -> None:
    """TorchRec's pipeline moves the batch with .to() and feeds it to the model unchanged."""
    from torchrec.distributed.train_pipeline import TrainPipelineBase
    from torchrec.modules.embedding_configs import EmbeddingConfig
    from torchrec.modules.embedding_modules import EmbeddingCollection

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ec = EmbeddingCollection(
                tables=[
                    EmbeddingConfig(
                        name="t", embedding_dim=4, num_embeddings=10, feature_names=["item"]
                    )
                ]
            )

        def forward(self, batch: SequenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
            emb = self.ec(batch.features)["item"].values()  # (T, 4)
            return emb.pow(2).sum(), batch.targets()

    torch.manual_seed(0)
    model = Tiny()
    before = model.ec.embeddings["t"].weight.detach().clone()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pipeline = TrainPipelineBase(model, opt, torch.device("cpu"))
    batch = SequenceBatch(features=_kjt(["item"], [ROWS]), labels=_kjt(["item"], [NEXT]))
    targets = pipeline.progress(iter([batch]))
    torch.testing.assert_close(targets, torch.tensor([7, 0, 8, 3]))
    after = model.ec.embeddings["t"].weight.detach()
    used = sorted({v for r in ROWS for v in r})
    # SGD on sum(e^2): every used row shrinks by (1 - 2 * lr * count); unused rows stay
    unused = [i for i in range(10) if i not in used]
    torch.testing.assert_close(after[unused], before[unused])
    counts = torch.zeros(10)
    for r in ROWS:
        for v in r:
            counts[v] += 1
    torch.testing.assert_close(after[used], before[used] * (1 - 0.2 * counts[used])[:, None])
