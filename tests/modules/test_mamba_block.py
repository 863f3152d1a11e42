"""MambaBlock: against an independent oracle, the step contract, padding, init, and misuse."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

from torchrec_mamba.modules.mamba_block import MambaBlock, MambaState
from torchrec_mamba.ops import _fused, selective_scan_ref

D_MODEL, D_STATE = 8, 4
TOL = {"atol": 2e-5, "rtol": 2e-4}
BACKENDS = ["reference", "chunked", "auto"]


def make_block(backend: str = "reference", seed: int = 0, **kwargs: object) -> MambaBlock:
    torch.manual_seed(seed)
    block = MambaBlock(D_MODEL, d_state=D_STATE, backend=backend, **kwargs)  # type: ignore[arg-type]
    with torch.no_grad():  # non-trivial D and biases so every term is exercised
        block.D.uniform_(0.5, 1.5)
        block.conv1d.bias.normal_(0.0, 0.1)
    return block


def oracle(block: MambaBlock, x: torch.Tensor) -> torch.Tensor:
    """The Mamba forward written out in fp64 with F.conv1d and selective_scan_ref."""
    p = {k: v.detach().double() for k, v in block.state_dict().items()}
    x = x.double()
    length = x.shape[1]
    xz = F.linear(x, p["in_proj.weight"], p.get("in_proj.bias")).transpose(1, 2)  # (B, 2E, L)
    u, z = xz.chunk(2, dim=1)
    u = F.conv1d(
        u, p["conv1d.weight"], p["conv1d.bias"], padding=block.d_conv - 1, groups=block.d_inner
    )
    u = F.silu(u[..., :length])  # (B, E, L)
    x_dbl = F.linear(u.transpose(1, 2), p["x_proj.weight"])  # (B, L, R + 2N)
    dt, b_mat, c_mat = x_dbl.split([block.dt_rank, block.d_state, block.d_state], dim=-1)
    delta = F.softplus(F.linear(dt, p["dt_proj.weight"], p["dt_proj.bias"])).transpose(
        1, 2
    )  # (B, E, L)
    A = -torch.exp(p["A_log"])
    y = selective_scan_ref(u, delta, A, b_mat.transpose(1, 2), c_mat.transpose(1, 2), D=p["D"], z=z)
    return F.linear(y.transpose(1, 2), p["out_proj.weight"], p.get("out_proj.bias")).float()  # type: ignore[union-attr]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("length", [1, 3, 11])
def test_forward_matches_oracle(backend: str, length: int) -> None:
    block = make_block(backend)
    x = torch.randn(3, length, D_MODEL)
    assert_close(block(x), oracle(block, x), **TOL)


def test_forward_with_projection_biases_matches_oracle() -> None:
    block = make_block("reference", bias=True)
    with torch.no_grad():
        block.in_proj.bias.normal_(0.0, 0.5)
        block.out_proj.bias.normal_(0.0, 0.5)
    x = torch.randn(2, 6, D_MODEL)
    assert_close(block(x), oracle(block, x), **TOL)


def test_parameters_match_mamba_ssm_layout() -> None:
    block = MambaBlock(32, d_state=16, d_conv=4, expand=2)
    e, r, n = 64, 2, 16  # d_inner, ceil(32 / 16), d_state
    expected = {
        "in_proj.weight": (2 * e, 32),
        "conv1d.weight": (e, 1, 4),
        "conv1d.bias": (e,),
        "x_proj.weight": (r + 2 * n, e),
        "dt_proj.weight": (e, r),
        "dt_proj.bias": (e,),
        "A_log": (e, n),
        "D": (e,),
        "out_proj.weight": (32, e),
    }
    assert {k: tuple(v.shape) for k, v in block.state_dict().items()} == expected


def test_init_follows_mamba() -> None:
    block = MambaBlock(16, d_state=6, dt_min=0.002, dt_max=0.05)
    assert_close(block.A_log, torch.log(torch.arange(1.0, 7.0)).expand(32, 6))
    assert_close(block.D, torch.ones(32))
    dt = F.softplus(block.dt_proj.bias.detach())
    assert dt.min() >= 0.002 * (1 - 1e-4) and dt.max() <= 0.05 * (1 + 1e-4)
    assert block.dt_proj.weight.abs().max() <= block.dt_rank**-0.5
    for p in (block.A_log, block.D, block.dt_proj.bias):
        assert getattr(p, "_no_weight_decay", False)
    assert block.A_log.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefix_with_lengths_then_steps_equals_forward(backend: str) -> None:
    block = make_block(backend).eval()
    prefix = torch.tensor([5, 2, 0, 1])  # includes an empty history and one shorter than d_conv
    steps = 4
    full_len = int(prefix.max()) + steps
    seqs = torch.randn(4, full_len, D_MODEL)
    with torch.no_grad():
        full = block(seqs)  # (B, L, D); row b's outputs at t < prefix[b] + steps are what we need
        padded = seqs[:, : int(prefix.max())].clone()
        padded[torch.arange(padded.shape[1]) >= prefix[:, None]] = 1e3  # garbage in the padding
        _, state = block(padded, prefix, return_state=True)
        for k in range(steps):
            x_t = seqs[torch.arange(4), prefix + k]  # (B, D): each row's next event
            y_t, state = block.step(x_t, state)
            assert_close(y_t, full[torch.arange(4), prefix + k], **TOL)


@pytest.mark.parametrize("backend", BACKENDS)
def test_steps_from_allocated_state_equal_forward(backend: str) -> None:
    block = make_block(backend).eval()
    x = torch.randn(2, 7, D_MODEL)
    with torch.no_grad():
        full = block(x)
        state = block.allocate_state(2)
        outs = [block.step(x[:, t], state)[0] for t in range(7)]
    assert_close(torch.stack(outs, dim=1), full, **TOL)


def test_state_of_padded_row_equals_state_of_unpadded_prefix() -> None:
    block = make_block("reference")
    x = torch.randn(3, 6, D_MODEL)
    lengths = torch.tensor([6, 3, 0])
    _, state = block(x, lengths, return_state=True)
    _, ref6 = block(x[:1], return_state=True)
    _, ref3 = block(x[1:2, :3], return_state=True)
    assert_close(state.ssm_state[0], ref6.ssm_state[0])
    assert_close(state.conv_state[0], ref6.conv_state[0])
    assert_close(state.ssm_state[1], ref3.ssm_state[0])
    assert_close(state.conv_state[1], ref3.conv_state[0])
    empty = block.allocate_state(1)
    assert_close(state.ssm_state[2], empty.ssm_state[0])
    assert_close(state.conv_state[2], empty.conv_state[0])
    # A length-3 conv state with W=4 holds one zero (before t = 0) then the 3 pre-conv inputs.
    u_pre = block.in_proj(x[1, :3])[:, : block.d_inner].t()  # (E, 3)
    assert_close(state.conv_state[1], F.pad(u_pre, (1, 0)))


def test_padding_does_not_change_real_outputs() -> None:
    block = make_block("reference")
    x = torch.randn(2, 6, D_MODEL)
    lengths = torch.tensor([4, 2])
    y1, s1 = block(x, lengths, return_state=True)
    x2 = x.clone()
    x2[torch.arange(6) >= lengths[:, None]] = torch.randn(6, D_MODEL) * 50
    y2, s2 = block(x2, lengths, return_state=True)
    real = torch.arange(6) < lengths[:, None]
    assert_close(y1[real], y2[real])
    assert_close(s1.ssm_state, s2.ssm_state)
    assert_close(s1.conv_state, s2.conv_state)


def test_gradients_reach_every_parameter() -> None:
    block = make_block("reference")
    x = torch.randn(2, 5, D_MODEL, requires_grad=True)
    block(x).square().sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_meta_device_then_materialise() -> None:
    block = MambaBlock(D_MODEL, d_state=D_STATE, device="meta")
    assert all(p.is_meta for p in block.parameters())
    block.to_empty(device="cpu")
    block.reset_parameters()
    assert_close(
        block.A_log, torch.log(torch.arange(1.0, D_STATE + 1)).expand(2 * D_MODEL, D_STATE)
    )
    y = block(torch.randn(1, 3, D_MODEL))
    assert torch.isfinite(y).all()


def test_bfloat16_module_keeps_fp32_ssm_parameters() -> None:
    block = make_block("reference")
    x = torch.randn(2, 5, D_MODEL)
    expected = block(x)
    half = make_block("reference").to(torch.bfloat16)
    with torch.no_grad():  # bf16 activations, fp32 A_log / D as mamba-ssm keeps them
        half.A_log.data = block.A_log.data.clone()
        half.D.data = block.D.data.clone()
    got, state = half(x.bfloat16(), return_state=True)
    assert got.dtype == torch.bfloat16 and state.ssm_state.dtype == torch.float32
    assert_close(got.float(), expected, atol=0.05, rtol=0.05)


@pytest.mark.gpu
@pytest.mark.skipif(
    _fused.Mamba is None or not torch.cuda.is_available(), reason="mamba-ssm (CUDA) not installed"
)
def test_equals_mamba_ssm_with_same_weights() -> None:  # pragma: no cover - needs CUDA mamba-ssm
    torch.manual_seed(0)
    theirs = _fused.Mamba(d_model=16, d_state=8, d_conv=4, expand=2).cuda()
    ours = MambaBlock(16, d_state=8, backend="fused").cuda()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 33, 16, device="cuda")
    assert_close(ours(x), theirs(x), atol=1e-4, rtol=1e-3)
    ours.backend = "chunked"
    assert_close(ours(x), theirs(x), atol=1e-4, rtol=1e-3)


def test_errors_name_the_bad_value() -> None:
    block = make_block("reference")
    x = torch.randn(2, 4, D_MODEL)
    with pytest.raises(ValueError, match=r"\(B, L, D\).*got shape \(2, 8\)"):
        block(torch.randn(2, D_MODEL))
    with pytest.raises(ValueError, match="width 5 but d_model=8"):
        block(torch.randn(2, 4, 5))
    with pytest.raises(TypeError, match="floating"):
        block(torch.ones(2, 4, D_MODEL, dtype=torch.long))
    with pytest.raises(ValueError, match="L=0"):
        block(torch.randn(2, 0, D_MODEL))
    with pytest.raises(ValueError, match=r"max\(lengths\)=5"):
        block(x, torch.tensor([5, 1]))
    with pytest.raises(ValueError, match=r"min\(lengths\)=-1"):
        block(x, torch.tensor([-1, 1]))
    with pytest.raises(TypeError, match="integer tensor.*float32"):
        block(x, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"shape \(B,\) = \(2,\), got shape \(3,\)"):
        block(x, torch.tensor([1, 2, 3]))
    state = block.allocate_state(2)
    with pytest.raises(ValueError, match=r"x_t must be \(B, D\) with D=8, got \(2, 1, 8\)"):
        block.step(torch.randn(2, 1, D_MODEL), state)
    with pytest.raises(ValueError, match=r"conv_state must be \(B, E, W\) = \(3, 16, 4\)"):
        block.step(torch.randn(3, D_MODEL), state)
    with pytest.raises(TypeError, match="MambaState"):
        block.step(torch.randn(2, D_MODEL), [state.conv_state])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size must be an int >= 0, got -1"):
        block.allocate_state(-1)
    with pytest.raises(ValueError, match="d_state must be a positive int, got 0"):
        MambaBlock(8, d_state=0)
    with pytest.raises(ValueError, match="dt_rank must be 'auto' or a positive int, got 'big'"):
        MambaBlock(8, dt_rank="big")
    with pytest.raises(ValueError, match="dt_min=0.5, dt_max=0.1"):
        MambaBlock(8, dt_min=0.5, dt_max=0.1)
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        MambaBlock(8, backend="fast")(x)


def test_allocate_state_shapes_and_dtypes() -> None:
    block = MambaBlock(8, d_state=3, d_conv=5, expand=3)
    state = block.allocate_state(4)
    assert isinstance(state, MambaState)
    assert state.conv_state.shape == (4, 24, 5) and state.ssm_state.shape == (4, 24, 3)
    assert state.ssm_state.dtype == torch.float32
    assert not state.conv_state.any() and not state.ssm_state.any()
    assert block.dt_rank == math.ceil(8 / 16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("length", [2, 70])
def test_channels_last_layout_keeps_outputs_and_gradients(dtype: torch.dtype, length: int) -> None:
    """The channels-last block (plain GEMMs, kernels on (B, L, E) memory) against the fp64
    oracle: the output and the gradient of the input and of every parameter."""
    block = make_block("auto").to(dtype)
    oracle_block = make_block("reference").double()
    x = torch.randn(3, length, D_MODEL, dtype=dtype, requires_grad=True)
    x_ref = x.detach().double().requires_grad_()
    gy = torch.randn(3, length, D_MODEL, dtype=torch.float64)
    y = block(x)
    (y.double() * gy).sum().backward()
    y_ref = oracle_with_grad(oracle_block, x_ref)
    (y_ref * gy).sum().backward()
    tol = TOL if dtype == torch.float32 else {"atol": 1e-9, "rtol": 1e-8}
    assert_close(y.double(), y_ref, **tol)
    assert_close(x.grad.double(), x_ref.grad, **tol)
    ref_params = dict(oracle_block.named_parameters())
    for name, p in block.named_parameters():
        assert p.grad is not None, name
        assert_close(p.grad.double(), ref_params[name].grad, **tol, msg=name)


def oracle_with_grad(block: MambaBlock, x: torch.Tensor) -> torch.Tensor:
    """:func:`oracle`'s fp64 math on the block's own parameters, so autograd reaches them."""
    p = dict(block.named_parameters())
    length = x.shape[1]
    xz = F.linear(x, p["in_proj.weight"]).transpose(1, 2)  # (B, 2E, L)
    u, z = xz.chunk(2, dim=1)
    u = F.conv1d(
        u, p["conv1d.weight"], p["conv1d.bias"], padding=block.d_conv - 1, groups=block.d_inner
    )
    u = F.silu(u[..., :length])  # (B, E, L)
    x_dbl = F.linear(u.transpose(1, 2), p["x_proj.weight"])  # (B, L, R + 2N)
    dt, b_mat, c_mat = x_dbl.split([block.dt_rank, block.d_state, block.d_state], dim=-1)
    delta = F.softplus(F.linear(dt, p["dt_proj.weight"], p["dt_proj.bias"])).transpose(1, 2)
    A = -torch.exp(p["A_log"])
    y = selective_scan_ref(u, delta, A, b_mat.transpose(1, 2), c_mat.transpose(1, 2), D=p["D"], z=z)
    return F.linear(y.transpose(1, 2), p["out_proj.weight"])  # (B, L, D)
