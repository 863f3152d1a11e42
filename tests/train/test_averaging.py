"""WeightAverage: the moving average against a hand-written one, the swap in and out, tied and
integer tensors, checkpoint state and its errors, and fit evaluating and saving the average."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.train.test_loop import CTX, build, tiny_split
from torchrec_mamba.data import SequenceLoader
from torchrec_mamba.train.averaging import WeightAverage
from torchrec_mamba.train.loop import FitConfig, evaluate, fit


class _Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(3, 4)
        self.b.weight = self.a.weight  # one storage under two names
        self.register_buffer("count", torch.zeros(2, dtype=torch.long))


def test_tied_weights_are_averaged_once_and_integer_buffers_not_at_all() -> None:
    model = _Tied()
    assert len(model.state_dict()) == 5
    avg = WeightAverage(model, 0.9)
    shapes = sorted(tuple(t.shape) for t in avg.shadow)
    assert shapes == [(4,), (4,), (4, 3)]  # a.weight (= b.weight), a.bias, b.bias; no "count"


def _check_against_hand_average(model: nn.Module, decay: float, steps: int, step, tol) -> None:  # type: ignore[no-untyped-def]
    """Run ``step`` ``steps`` times, updating a WeightAverage and the average written out."""
    names = [k for k, v in model.state_dict().items() if v.is_floating_point()]
    expected = {k: model.state_dict()[k].double() for k in names}  # the reference in float64
    avg = WeightAverage(model, decay)
    for n in range(steps):
        step(n)
        d = min(decay, (1 + n) / (10 + n))
        live = model.state_dict()
        for k in names:
            expected[k] = d * expected[k] + (1 - d) * live[k].double()
        avg.update()
    assert avg.updates == steps
    live = {k: v.clone() for k, v in model.state_dict().items()}
    with avg.applied():
        inside = model.state_dict()
        for k in names:
            torch.testing.assert_close(inside[k], expected[k].to(inside[k].dtype), **tol)
        assert all(not torch.equal(inside[k], live[k]) for k in names)
    for k, v in model.state_dict().items():  # the live weights come back bit for bit
        assert torch.equal(v, live[k]), k


@pytest.mark.parametrize("decay", [0.5, 0.9, 0.999])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_update_matches_a_hand_written_average(decay: float, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), nn.GELU(), nn.Linear(7, 3)).to(dtype)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    x, y = torch.randn(16, 5, dtype=dtype), torch.randn(16, 3, dtype=dtype)

    def step(n: int) -> None:
        opt.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        opt.step()

    # float64: torch's lerp rounds its scalar weight to float32 (relative 1e-8 on the step);
    # bf16: the average is kept in float32, so only the final rounding to bf16 differs
    tol = {torch.float32: {"atol": 1e-6, "rtol": 1e-5}, torch.float64: {"atol": 1e-12, "rtol": 1e-7},
           torch.bfloat16: {"atol": 0.0, "rtol": 0.0}}[dtype]
    _check_against_hand_average(model, decay, 40, step, tol)


@pytest.mark.parametrize("decay", [0.5, 0.99])
def test_update_matches_a_hand_written_average_over_recommender_training(decay: float) -> None:
    data, split = tiny_split()
    model, opt = build(data.num_items)  # an item table, a tied head, the Mamba block's parameters
    loader = SequenceLoader(split.train, batch_size=8, shuffle=True, seed=1)
    batches = [b for epoch in range(2) for b in (loader.set_epoch(epoch), list(loader))[1]]

    def step(n: int) -> None:
        opt.zero_grad()
        model(model.prepare_batch(batches[n]))[0].backward()
        opt.step()

    _check_against_hand_average(model, decay, len(batches), step, {"atol": 1e-6, "rtol": 1e-5})


def test_applied_restores_the_live_weights_after_an_exception() -> None:
    model = nn.Linear(3, 2)
    avg = WeightAverage(model, 0.9)
    with torch.no_grad():
        model.weight.add_(1.0)
    live = model.weight.detach().clone()
    with pytest.raises(KeyError), avg.applied():
        assert not torch.equal(model.weight, live)
        raise KeyError("boom")
    assert torch.equal(model.weight.detach(), live)


def test_current_decay_warms_up_to_the_decay() -> None:
    avg = WeightAverage(nn.Linear(2, 2), 0.99)
    seen = []
    for _ in range(1000):
        seen.append(avg.current_decay())
        avg.update()
    assert seen[0] == pytest.approx(0.1) and seen[1] == pytest.approx(2 / 11)
    assert all(a <= b for a, b in zip(seen, seen[1:], strict=False)) and seen[-1] == 0.99


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 1.5, True, "0.9", None])
def test_decay_outside_zero_one_is_refused(decay: object) -> None:
    with pytest.raises(ValueError, match=r"weight-average decay must be in \(0, 1\), got"):
        WeightAverage(nn.Linear(2, 2), decay)  # type: ignore[arg-type]


def test_state_dict_round_trip_and_its_errors() -> None:
    model = nn.Linear(3, 2)
    avg = WeightAverage(model, 0.9)
    with torch.no_grad():
        model.weight.add_(1.0)
    avg.update()
    avg.update()
    state = avg.state_dict()
    other = WeightAverage(nn.Linear(3, 2), 0.9)
    other.load_state_dict(state)
    assert other.updates == 2 and all(torch.equal(a, b) for a, b in zip(other.shadow, avg.shadow, strict=True))
    with pytest.raises(ValueError, match="holds 2 tensors, this model 1: was it saved from the same"):
        WeightAverage(nn.Linear(3, 2, bias=False), 0.9).load_state_dict(state)
    with pytest.raises(ValueError, match=r"tensor 0 has shape \(2, 3\), this model's \(4, 3\)"):
        WeightAverage(nn.Linear(3, 4), 0.9).load_state_dict(state)
    with pytest.raises(ValueError, match="averaged weights with decay 0.9, this run asks for 0.99"):
        WeightAverage(nn.Linear(3, 2), 0.99).load_state_dict(state)


def _loaders(split):  # type: ignore[no-untyped-def]
    return (SequenceLoader(split.train, batch_size=8, shuffle=True, seed=1),
            SequenceLoader(split.valid, batch_size=16, shuffle=False, seed=0),
            SequenceLoader(split.test, batch_size=16, shuffle=False, seed=0))


def test_fit_validates_tests_and_saves_the_average_and_trains_the_live_weights(  # type: ignore[no-untyped-def]
    tmp_path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    data, split = tiny_split()
    train, valid, test = _loaders(split)
    plain_model, plain_opt = build(data.num_items)
    plain = fit(plain_model, plain_opt, train, valid, test, FitConfig(epochs=3, progress=False), CTX)

    model, opt = build(data.num_items)
    seen: list[dict[str, float]] = []
    average: list[WeightAverage] = []
    original_init = WeightAverage.__init__

    def spy(self: WeightAverage, *args: object) -> None:
        original_init(self, *args)  # type: ignore[arg-type]
        average.append(self)

    def check(epoch: int, done: int) -> None:  # at each epoch's end: the average's valid score
        if done == len(train):
            with average[0].applied():
                seen.append(evaluate(model, valid, CTX))

    monkeypatch.setattr(WeightAverage, "__init__", spy)
    config = FitConfig(epochs=3, patience=3, progress=False, ema_decay=0.8,
                       best_model_path=str(tmp_path / "model.pt"))
    result = fit(model, opt, train, valid, test, config, CTX, on_batch_end=check)
    # training itself is untouched: the same losses as without the average
    assert [h["loss"] for h in result.history] == [h["loss"] for h in plain.history]
    # validation scored the average, not the live weights
    assert [h["valid"] for h in result.history] == seen
    assert [h["valid"] for h in result.history] != [h["valid"] for h in plain.history]
    # the saved best model is the average of the best epoch: it reproduces the test metrics
    single, _ = build(data.num_items)
    single.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True))
    assert evaluate(single, test, CTX) == result.test


def test_fit_refuses_to_resume_with_another_averaging_setting(tmp_path) -> None:  # type: ignore[no-untyped-def]
    data, split = tiny_split()
    train, valid, test = _loaders(split)
    model, opt = build(data.num_items)
    fit(model, opt, train, valid, test,
        FitConfig(epochs=1, progress=False, checkpoint_dir=str(tmp_path)), CTX)
    model, opt = build(data.num_items)
    config = FitConfig(epochs=2, progress=False, checkpoint_dir=str(tmp_path), resume=True,
                       ema_decay=0.9)
    with pytest.raises(ValueError, match=r"was written without a weight average, but this run has "
                                         r"ema_decay=0.9; resume with the run's own setting \(--ema-decay 0\)"):
        fit(model, opt, train, valid, test, config, CTX)
    # and the other way round: a checkpoint with an average resumed without one
    model, opt = build(data.num_items)
    fit(model, opt, train, valid, test,
        FitConfig(epochs=1, progress=False, checkpoint_dir=str(tmp_path / "avg"), ema_decay=0.9), CTX)
    model, opt = build(data.num_items)
    config = FitConfig(epochs=2, progress=False, checkpoint_dir=str(tmp_path / "avg"), resume=True)
    with pytest.raises(ValueError, match=r"was written with a weight average, but this run has "
                                         r"ema_decay=0.0; resume with the run's own setting \(--ema-decay 0.9\)"):
        fit(model, opt, train, valid, test, config, CTX)


@pytest.mark.parametrize("ema_decay", [-0.1, 1.0, True])
def test_fit_config_refuses_a_bad_ema_decay(ema_decay: object) -> None:
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\), got"):
        FitConfig(ema_decay=ema_decay)  # type: ignore[arg-type]
