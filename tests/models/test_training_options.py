"""Training-recipe options: bf16 softmax product, global loss normalisation, input scale."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_mamba.data import SequenceBatch
from torchrec_mamba.models import NextItemTask, mamba4rec, sasrec
from torchrec_mamba.models.heads import FullSoftmaxHead
from torchrec_mamba.train.config import DataInfo, RunConfig, build_model, targets_per_row


def _batch() -> SequenceBatch:
    f = KeyedJaggedTensor.from_lengths_sync(
        ["item"], torch.tensor([1, 2, 3, 4, 5, 6]), torch.tensor([3, 1, 2], dtype=torch.int32)
    )
    y = KeyedJaggedTensor.from_lengths_sync(
        ["item"], torch.tensor([2, 3, 4, 7, 6, 8]), torch.tensor([3, 1, 2], dtype=torch.int32)
    )
    return SequenceBatch(features=f, labels=y)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_match_float32(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    user = torch.randn(50, 16, requires_grad=True)
    cand = torch.randn(300, 16, requires_grad=True)
    targets = torch.randint(1, 301, (50,))
    loss = FullSoftmaxHead(dtype)(user, cand, targets)
    assert loss.dtype == torch.float32
    grads = torch.autograd.grad(loss, (user, cand))
    ref = F.cross_entropy(user.double() @ cand.double().T, targets - 1)  # independent fp64 oracle
    ref_grads = torch.autograd.grad(ref, (user, cand))
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=2e-2, atol=2e-2)
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g.double(), r.double(), rtol=5e-2, atol=5e-3)


def test_float32_logits_are_exact() -> None:
    torch.manual_seed(1)
    user, cand = torch.randn(7, 8), torch.randn(20, 8)
    targets = torch.randint(1, 21, (7,))
    ref = F.cross_entropy(user @ cand.T, targets - 1)
    assert torch.equal(FullSoftmaxHead(torch.float32)(user, cand, targets), ref)


def test_unsupported_logits_dtype_is_named() -> None:
    with pytest.raises(ValueError, match="unsupported logits_dtype torch.int64"):
        FullSoftmaxHead(torch.int64)


def test_global_normalisation_is_sum_over_rows_times_n() -> None:
    torch.manual_seed(0)
    user, cand = torch.randn(6, 8), torch.randn(10, 8)
    targets = torch.randint(1, 11, (6,))
    ids = torch.arange(1, 11)
    task = NextItemTask(num_items=10, targets_per_row=1.5)
    loss = task.loss(user, targets, cand, ids, num_rows=4)
    ref = F.cross_entropy(user @ cand.T, targets - 1, reduction="sum") / (4 * 1.5)
    torch.testing.assert_close(loss, ref)
    batch_mean = NextItemTask(num_items=10).loss(user, targets, cand, ids, num_rows=4)
    torch.testing.assert_close(batch_mean, F.cross_entropy(user @ cand.T, targets - 1))


def test_global_normalisation_errors() -> None:
    with pytest.raises(ValueError, match="targets_per_row must be finite and > 0, got 0"):
        NextItemTask(num_items=10, targets_per_row=0)
    task = NextItemTask(num_items=10, targets_per_row=2.0)
    with pytest.raises(ValueError, match="needs num_rows"):
        task.loss(torch.randn(2, 4), torch.tensor([1, 2]), torch.randn(10, 4), torch.arange(1, 11))


def test_model_loss_with_global_normalisation_scales_by_targets() -> None:
    batch = _batch()
    torch.manual_seed(0)
    plain = sasrec(num_items=10, embedding_dim=8, max_len=5, dropout=0.0).eval()
    torch.manual_seed(0)
    scaled = sasrec(num_items=10, embedding_dim=8, max_len=5, dropout=0.0,
                    targets_per_row=4.0).eval()
    mean_loss, _ = plain(batch)
    global_loss, _ = scaled(batch)
    # 6 targets in 3 rows: sum / (3 * 4) == mean * 6 / 12
    torch.testing.assert_close(global_loss, mean_loss * 6 / 12)


def test_input_scale_multiplies_the_encoder_input() -> None:
    batch = _batch()
    seen: list[torch.Tensor] = []
    torch.manual_seed(0)
    model = mamba4rec(num_items=10, embedding_dim=8, d_state=4, backend="reference",
                      input_scale=math.sqrt(8))
    model.encoder.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    model(batch)
    torch.manual_seed(0)
    ref = mamba4rec(num_items=10, embedding_dim=8, d_state=4, backend="reference")
    ref.encoder.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach()))
    ref(batch)
    torch.testing.assert_close(seen[0], seen[1] * math.sqrt(8))
    with pytest.raises(ValueError, match="input_scale must be finite and > 0, got -1"):
        mamba4rec(num_items=10, embedding_dim=8, input_scale=-1.0)


def test_run_config_options_reach_the_model() -> None:
    small = dict(d_model=8, d_state=4, num_layers=1, backend="reference")
    cfg = RunConfig(**small, head_dtype="bfloat16", loss_normalization="global",
                    embedding_scale="sqrt")
    model = build_model(cfg, DataInfo(num_items=10), targets_per_row=2.5)
    task = model.tasks[0]
    assert task.head.logits_dtype == torch.bfloat16
    assert task.targets_per_row == 2.5
    assert model.tower.input_scale == pytest.approx(math.sqrt(8))
    # without the constant the loss is the sum per row (same Adam updates, another scale)
    assert build_model(cfg, DataInfo(num_items=10)).tasks[0].targets_per_row == 1.0
    from_info = build_model(cfg, DataInfo(num_items=10, targets_per_row=3.0))
    assert from_info.tasks[0].targets_per_row == 3.0
    with pytest.raises(ValueError, match="head_dtype='float16'"):
        RunConfig(**small, head_dtype="float16")


def test_targets_per_row() -> None:
    assert targets_per_row([1, 2, 6]) == 3.0
    with pytest.raises(ValueError, match="no targets"):
        targets_per_row([])


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_label_smoothing_matches_the_mixture_of_targets_and_uniform(eps: float,
                                                                    dtype: torch.dtype) -> None:
    torch.manual_seed(2)
    user = torch.randn(9, 8, dtype=dtype, requires_grad=True)
    cand = torch.randn(30, 8, dtype=dtype, requires_grad=True)
    targets = torch.randint(1, 31, (9,))
    loss = FullSoftmaxHead(label_smoothing=eps)(user, cand, targets)
    # independent oracle: cross-entropy against q = (1 - eps) * onehot + eps / I
    logp = torch.log_softmax(user.double() @ cand.double().T, dim=1)  # (T, I)
    q = torch.full_like(logp, eps / 30)
    q[torch.arange(9), targets - 1] += 1.0 - eps
    ref = -(q * logp).sum(1).mean()
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(torch.autograd.grad(loss, (user, cand)), torch.autograd.grad(ref, (user, cand)),
                    strict=True):
        torch.testing.assert_close(g.double(), r.double(), rtol=1e-5, atol=1e-6)


def test_label_smoothing_errors_name_the_value() -> None:
    with pytest.raises(ValueError, match=r"label_smoothing must be in \[0, 1\), got 1.0"):
        FullSoftmaxHead(label_smoothing=1.0)
    with pytest.raises(ValueError, match=r"got -0.1"):
        NextItemTask(num_items=5, label_smoothing=-0.1)
    with pytest.raises(TypeError, match="got '0.1'"):
        FullSoftmaxHead(label_smoothing="0.1")  # type: ignore[arg-type]
    from torchrec_mamba.models import SampledSoftmaxConfig
    with pytest.raises(ValueError, match="label_smoothing=0.1 needs the full softmax"):
        NextItemTask(num_items=5, sampled_softmax=SampledSoftmaxConfig(3), label_smoothing=0.1)
    with pytest.raises(ValueError, match=r"RunConfig.label_smoothing must be in \[0, 1\), got 2"):
        RunConfig(label_smoothing=2)
    with pytest.raises(ValueError, match="label_smoothing=0.1 needs the full softmax, but "
                                         "sampled_softmax=64"):
        RunConfig(label_smoothing=0.1, sampled_softmax=64)


def test_label_smoothing_reaches_the_item_head_only() -> None:
    small = dict(d_model=8, d_state=4, num_layers=1, backend="reference")
    for model_name in ("mamba4rec", "sasrec"):
        cfg = RunConfig(**small, model=model_name, label_smoothing=0.2, category_loss_weight=0.5)
        model = build_model(cfg, DataInfo(num_items=10, num_categories=3))
        item, category = model.tasks
        assert item.head.label_smoothing == 0.2
        assert category.head.label_smoothing == 0.0
    assert build_model(RunConfig(**small), DataInfo(num_items=10)).tasks[0].head.label_smoothing == 0
