"""Tasks: target selection, candidates (full / sampled), losses against direct formulas, checks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from torchrec_mamba.models import (
    NextCategoryTask,
    NextItemTask,
    SampledSoftmaxConfig,
    SequenceTables,
    SequentialRecommender,
)
from torchrec_mamba.models.tasks import select_targets
from torchrec_mamba.modules import MambaSequenceEncoder


def test_select_targets_all_and_last_against_loops() -> None:
    h = torch.randn(3, 4, 2)
    lengths = torch.tensor([2, 0, 4])
    labels = torch.tensor([5, 0, 1, 2, 3, 4])  # row 0: [5, 0], row 2: [1, 2, 3, 4]
    user, targets = select_targets(h, lengths, labels, "all")
    want_user = torch.stack([h[0, 0], h[2, 0], h[2, 1], h[2, 2], h[2, 3]])  # label 0 dropped
    assert_close(user, want_user)
    assert targets.tolist() == [5, 1, 2, 3, 4]
    user, targets = select_targets(h, lengths, labels, "last")
    assert targets.tolist() == [4]  # row 0's last label is 0, row 1 is empty
    assert_close(user, h[2, 3][None])


def test_full_candidates_and_loss() -> None:
    task = NextCategoryTask(num_categories=4)
    ids = task.candidate_ids(torch.tensor([1]), torch.tensor([1]), torch.device("cpu"))
    assert ids.tolist() == [1, 2, 3, 4]
    user, cand, targets = torch.randn(3, 5), torch.randn(4, 5), torch.tensor([4, 1, 2])
    assert_close(task.loss(user, targets, cand, ids), F.cross_entropy(user @ cand.T, targets - 1))


def test_sampled_candidates_are_positives_then_negatives() -> None:
    counts = torch.tensor([0.0, 0, 0, 5, 0])  # only item 3 has mass beyond the floor
    task = NextItemTask(4, sampled_softmax=SampledSoftmaxConfig(num_negatives=50), item_counts=counts)
    torch.manual_seed(0)
    ids = task.candidate_ids(torch.tensor([2, 0, 4]), torch.tensor([3]), torch.device("cpu"))
    assert ids[:2].tolist() == [2, 4] and ids.numel() == 52
    assert 0 not in ids[2:].tolist()
    assert (ids[2:] == 3).float().mean() > 0.4  # q(3) = 5/8


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_items": 0}, "num_ids must be an int >= 1, got 0"),
        ({"num_items": 3, "loss_weight": -1.0}, "loss_weight must be finite and >= 0, got -1.0"),
        ({"num_items": 3, "loss_positions": "first"}, "loss_positions must be 'all' or 'last'"),
    ],
)
def test_task_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        NextItemTask(**kwargs)  # type: ignore[arg-type]


def test_model_checks_tasks_against_tables() -> None:
    enc = MambaSequenceEncoder(d_model=4, d_state=2, backend="reference")
    tables = SequenceTables(num_items=5, embedding_dim=4)
    with pytest.raises(ValueError, match="needs at least one task"):
        SequentialRecommender(tables, enc, [])
    with pytest.raises(ValueError, match="task 'next_category' needs table 'category'"):
        SequentialRecommender(tables, enc, [NextCategoryTask(3)])
    with pytest.raises(ValueError, match="num_ids=6 but table 'item' has 5 ids"):
        SequentialRecommender(tables, enc, [NextItemTask(6)])
    with pytest.raises(ValueError, match="duplicate task names"):
        SequentialRecommender(tables, enc, [NextItemTask(5), NextItemTask(5)])
    with pytest.raises(ValueError, match="nothing to train"):
        SequentialRecommender(tables, enc, [NextItemTask(5, loss_weight=0.0)])
    model = SequentialRecommender(tables, enc, [NextItemTask(5)])
    with pytest.raises(ValueError, match="no task 'next_category'; this model has"):
        model.task("next_category")
    assert NextItemTask(5).metric_names((10,)) == [
        "next_item/hr@10", "next_item/ndcg@10", "next_item/mrr@10"
    ]


def test_old_sasrec_module_path_does_not_shadow_the_factory() -> None:
    import torchrec_mamba.models as models
    from torchrec_mamba.models.sasrec import SASRecEncoder as Old  # the pre-refactor path
    from torchrec_mamba.modules.sasrec import SASRecEncoder

    assert Old is SASRecEncoder
    assert callable(models.sasrec) and models.sasrec.__module__ == "torchrec_mamba.models.mamba4rec"
