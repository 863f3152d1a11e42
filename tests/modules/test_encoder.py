"""MambaSequenceEncoder: Mamba4Rec wiring, the step contract, padding, jagged input, misuse."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from torchrec.sparse.jagged_tensor import JaggedTensor

from torchrec_mamba.modules import FastDropout, FeedForward, MambaSequenceEncoder

D = 8
TOL = {"atol": 2e-5, "rtol": 2e-4}


def make_encoder(
    num_layers: int = 1, backend: str = "reference", seed: int = 0, **kw: object
) -> MambaSequenceEncoder:
    torch.manual_seed(seed)
    enc = MambaSequenceEncoder(D, num_layers=num_layers, d_state=4, backend=backend, **kw)  # type: ignore[arg-type]
    with torch.no_grad():  # move LayerNorm affine params off (1, 0) so they matter in the checks
        for m in enc.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.1)
    return enc


def padded_batch(
    lengths: list[int], length: int | None = None, seed: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    length = max(lengths) if length is None else length
    x = torch.randn(len(lengths), length, D, generator=gen)
    lens = torch.tensor(lengths)
    x[torch.arange(length) >= lens[:, None]] = 0.0
    return x, lens


@pytest.mark.parametrize("num_layers", [1, 2])
def test_wiring_is_mamba4rec(num_layers: int) -> None:
    """Rebuild the forward from the submodules, following the Mamba4Rec paper's code."""
    enc = make_encoder(num_layers).eval()
    x = torch.randn(2, 5, D)
    h = enc.input_norm(x)  # dropout is the identity in eval
    for layer in enc.layers:
        mixed = layer.mamba(h)
        h = layer.layer_norm(mixed + h) if num_layers > 1 else layer.layer_norm(mixed)
        ffn = layer.ffn
        h = ffn.layer_norm(ffn.w_2(torch.nn.functional.gelu(ffn.w_1(h))) + h)
    assert_close(enc(x), h)


@pytest.mark.parametrize("backend", ["reference", "chunked", "auto"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_prefix_then_steps_equals_forward(backend: str, num_layers: int) -> None:
    enc = make_encoder(num_layers, backend).eval()
    prefix = torch.tensor([4, 1, 0])
    steps = 3
    seqs = torch.randn(3, int(prefix.max()) + steps, D)
    with torch.no_grad():
        full = enc(seqs)
        prefix_x = seqs[:, : int(prefix.max())].clone()
        prefix_x[torch.arange(prefix_x.shape[1]) >= prefix[:, None]] = float(
            "nan"
        )  # padding never leaks
        _, state = enc(prefix_x, prefix, return_state=True)
        assert len(state) == num_layers
        for k in range(steps):
            rows = torch.arange(3)
            y_t, state = enc.step(seqs[rows, prefix + k], state)
            assert_close(y_t, full[rows, prefix + k], **TOL)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_steps_from_empty_state_equal_forward(num_layers: int) -> None:
    enc = make_encoder(num_layers).eval()
    x = torch.randn(2, 6, D)
    with torch.no_grad():
        full = enc(x)
        state = enc.allocate_state(2)
        outs = [enc.step(x[:, t], state)[0] for t in range(6)]
    assert_close(torch.stack(outs, dim=1), full, **TOL)


def test_padding_values_do_not_change_real_outputs() -> None:
    enc = make_encoder(2).eval()
    x, lengths = padded_batch([5, 2, 3], length=7)
    out = enc(x, lengths)
    garbage = x.clone()
    pad = torch.arange(7) >= lengths[:, None]
    garbage[pad] = torch.randn(int(pad.sum()), D) * 100
    garbage[0, 6, 0] = float("nan")
    out2 = enc(garbage, lengths)
    assert_close(out, out2)
    assert not out[pad].any()  # documented: exactly zero at padded positions
    # Longer padding changes nothing either.
    x_long = torch.cat([x, torch.randn(3, 4, D)], dim=1)
    assert_close(enc(x_long, lengths)[:, :7], out)


def test_jagged_equals_padded_forward_and_gradients() -> None:
    enc = make_encoder(2).eval()
    lengths = torch.tensor([3, 0, 5, 1])
    values = torch.randn(int(lengths.sum()), D, requires_grad=True)
    jt = JaggedTensor(values=values, lengths=lengths)
    out_j = enc(jt)
    out_j.square().sum().backward()
    grad_j = values.grad.clone()  # type: ignore[union-attr]

    values_p = values.detach().clone().requires_grad_(True)
    padded = torch.zeros(4, 5, D)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    rows = [values_p[offsets[b] : offsets[b + 1]] for b in range(4)]
    padded = torch.stack([torch.cat([r, torch.zeros(5 - r.shape[0], D)]) for r in rows])
    out_p = enc(padded, lengths)
    out_p.square().sum().backward()
    assert_close(out_j, out_p)
    assert_close(grad_j, values_p.grad)
    assert_close(enc.last_state(jt), enc.last_state(padded, lengths))


def test_jagged_all_empty_is_finite() -> None:
    enc = make_encoder()
    jt = JaggedTensor(values=torch.zeros(0, D), lengths=torch.tensor([0, 0]))
    assert enc(jt).shape == (2, 0, D)
    assert_close(enc.last_state(jt), torch.zeros(2, D))
    out, state = enc(jt, return_state=True)
    assert len(state) == 1 and not state[0].ssm_state.any()


def test_last_state_gathers_last_real_position_and_cold_users_are_zero() -> None:
    enc = make_encoder(2).eval()
    x, lengths = padded_batch([4, 0, 1, 6])
    out = enc(x, lengths)
    last = enc.last_state(x, lengths)
    assert torch.isfinite(last).all()
    for b, n in enumerate(lengths.tolist()):
        assert_close(last[b], out[b, n - 1] if n > 0 else torch.zeros(D))
    assert_close(enc.last_state(x), enc(x)[:, -1])  # no lengths: the last position


def test_gradients_reach_every_parameter() -> None:
    enc = make_encoder(2, dropout=0.1).train()
    x, lengths = padded_batch([5, 3])
    enc.last_state(x, lengths).square().sum().backward()
    for name, p in enc.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_dropout_only_in_training() -> None:
    enc = make_encoder(1, dropout=0.3)
    x, lengths = padded_batch([5, 4])
    enc.eval()
    assert_close(enc(x, lengths), enc(x, lengths))
    enc.train()
    assert not torch.allclose(enc(x, lengths), enc(x, lengths))


def test_meta_construction_then_materialise() -> None:
    enc = MambaSequenceEncoder(D, num_layers=2, d_state=4, device="meta")
    assert all(p.is_meta for p in enc.parameters())
    enc.to_empty(device="cpu")
    enc.reset_parameters()
    enc.backend = "reference"
    x, lengths = padded_batch([3, 2])
    assert torch.isfinite(enc(x, lengths)).all()
    assert set(enc.state_dict()) == set(make_encoder(2).state_dict())


def test_init_modes() -> None:
    paper = MambaSequenceEncoder(64, d_state=4)
    std = paper.layers[0].mamba.in_proj.weight.std().item()
    assert 0.018 < std < 0.022
    assert not paper.layers[0].mamba.dt_proj.bias.any()  # the paper zeroes every Linear bias
    standard = MambaSequenceEncoder(64, d_state=4, init="mamba")
    dt = torch.nn.functional.softplus(standard.layers[0].mamba.dt_proj.bias.detach())
    assert dt.min() >= 0.001 * (1 - 1e-4) and dt.max() <= 0.1 * (1 + 1e-4)
    for enc in (paper, standard):
        assert 0.018 < enc.layers[0].ffn.w_1.weight.std().item() < 0.022
        assert_close(enc.layers[0].mamba.A_log[0], torch.log(torch.arange(1.0, 5.0)))


def test_backend_setter_reaches_every_block() -> None:
    enc = make_encoder(2, backend="reference")
    enc.backend = "chunked"
    assert [layer.mamba.backend for layer in enc.layers] == ["chunked", "chunked"]


def test_feed_forward_is_mamba4rec() -> None:
    torch.manual_seed(0)
    ffn = FeedForward(D, dropout=0.0)
    x = torch.randn(3, D)
    h = ffn.w_2(torch.nn.functional.gelu(ffn.w_1(x)))
    assert ffn.w_1.out_features == 4 * D
    assert_close(ffn(x), torch.nn.functional.layer_norm(h + x, (D,), eps=1e-12))
    with pytest.raises(ValueError, match="dropout must be in"):
        FeedForward(D, dropout=1.5)


def test_fast_dropout_rate_scale_gradient_and_seed() -> None:
    drop = FastDropout(0.2)
    x = torch.randn(400, 500, requires_grad=True)
    torch.manual_seed(3)
    y = drop(x)
    kept = y != 0
    rate = 1 - kept.float().mean().item()
    assert abs(rate - 0.2) < 0.005  # 200k draws: std of the rate is ~0.0009
    assert_close(y[kept], x[kept] / 0.8)
    g = torch.randn_like(x)
    y.backward(g)
    assert_close(x.grad, g * kept / 0.8)
    torch.manual_seed(3)
    assert torch.equal(drop(x) != 0, kept)  # reproducible under torch.manual_seed
    assert drop(torch.zeros(0, 3)).shape == (0, 3)
    assert drop.eval()(x) is x
    assert FastDropout(0.0)(x) is x
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\), got 1.0"):
        FastDropout(1.0)


def test_errors_name_the_bad_value() -> None:
    enc = make_encoder()
    x, lengths = padded_batch([3, 2])
    with pytest.raises(ValueError, match=r"max\(lengths\)=4"):
        enc(x, torch.tensor([4, 1]))
    with pytest.raises(ValueError, match=r"min\(lengths\)=-2"):
        enc(x, torch.tensor([-2, 1]))
    with pytest.raises(TypeError, match="integer tensor.*float"):
        enc(x, lengths.float())
    with pytest.raises(TypeError, match="lengths must be a torch.Tensor of ints, got list"):
        enc(x, [3, 2])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"shape \(B,\) = \(2,\), got shape \(2, 1\)"):
        enc(x, lengths[:, None])
    with pytest.raises(ValueError, match="width 5 but d_model=8"):
        enc(torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"got shape \(3, 8\)"):
        enc(torch.randn(3, D))
    with pytest.raises(TypeError, match="Tensor or a torchrec JaggedTensor, got ndarray"):
        enc(x.numpy())  # type: ignore[arg-type]
    jt = JaggedTensor(values=torch.randn(5, D), lengths=lengths)
    with pytest.raises(ValueError, match="a JaggedTensor carries its own"):
        enc(jt, lengths)
    with pytest.raises(ValueError, match=r"\(total, D\) with D=8, got shape \(5, 3\)"):
        enc(JaggedTensor(values=torch.randn(5, 3), lengths=lengths))
    with pytest.raises(ValueError, match=r"x_t must be \(B, D\) with D=8, got \(2, 3\)"):
        enc.step(torch.randn(2, 3), enc.allocate_state(2))
    with pytest.raises(ValueError, match="list of num_layers=1 MambaState, got 2"):
        enc.step(torch.randn(2, D), enc.allocate_state(2) * 2)
    with pytest.raises(ValueError, match="num_layers must be a positive int, got 0"):
        MambaSequenceEncoder(D, num_layers=0)
    with pytest.raises(ValueError, match="dropout must be in"):
        MambaSequenceEncoder(D, dropout=1.0)
    with pytest.raises(ValueError, match="init must be 'mamba4rec' or 'mamba', got 'xavier'"):
        MambaSequenceEncoder(D, init="xavier")  # type: ignore[arg-type]


def test_fast_dropout_fallback_matches_kernel_semantics(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the compiled kernel FastDropout still drops at rate p and masks the gradient."""
    from torchrec_mamba.modules import feed_forward

    monkeypatch.setattr(feed_forward._scan_cpu, "kernel_ops", lambda: None)
    x = torch.randn(300, 400, requires_grad=True)
    y = FastDropout(0.3)(x)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - 0.3) < 0.006
    assert_close(y[kept], x[kept] / 0.7)
    g = torch.randn_like(x)
    y.backward(g)
    assert_close(x.grad, g * kept / 0.7)


def test_fast_dropout_kernel_is_thread_count_independent() -> None:
    """The kernel's counter-based draws depend on the seed only, not on the thread count."""
    drop = FastDropout(0.5)
    x = torch.randn(1000, 257)
    old = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            torch.manual_seed(11)
            outs.append(drop(x))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(outs[0], outs[1])
