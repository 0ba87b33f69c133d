"""Triton backend of the token-statistics op: tile boundaries and Triton-specific cases.

Runs on CUDA tensors where a GPU exists, else on CPU tensors under TRITON_INTERPRET=1 (set by
conftest), where the launcher uses 256-wide vocabulary tiles so small V crosses many tiles.
The generic cross-backend suite is tests/test_token_logprobs.py.

Error rule (docs/design.md "Tests"): against float64 math on the *same* dtype-rounded inputs, the
kernel's error may not exceed twice the error of eager torch computing in that dtype, plus 1e-5
of the output's natural scale (which is also the fp32 bound).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import alignops as ao
from alignops import _backend
from alignops.reference.token_stats import token_stats as oracle_token_stats
from tests.conftest import HAS_CUDA
from tests.conftest import make_logits as shared_make_logits

DEVICE = "cuda" if HAS_CUDA else "cpu"
pytestmark = pytest.mark.skipif(
    "triton" not in _backend.available_backends(DEVICE),
    reason=f"triton backend cannot run on {DEVICE}: {_backend.why_unavailable('triton', torch.device(DEVICE))}")

TILE = 256  # the interpreter's BLOCK_V (kernels/token_stats.py); the V list straddles it
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# 1 and 2: degenerate rows; 7: one partial tile; 256/512: exact tile multiples (no tail);
# 255/257: one short of / one past a tile; 769: a prime spanning four tiles.
VOCABS = [1, 2, 7, 255, 256, 257, 512, 769]
PATTERNS = ["normal", "peaked", "shifted_up", "shifted_down", "neginf", "neginf_first_tile"]


def triton_kernels():
    """The token-stats kernels, looked up through the registry as the op does."""
    return (_backend.kernel("token_stats_fwd", "triton"), _backend.kernel("token_stats_bwd", "triton"))


def make_logits(n: int, v: int, dtype: torch.dtype, pattern: str, gen: torch.Generator) -> torch.Tensor:
    return shared_make_logits(n, v, dtype, pattern, gen, neginf_frac=0.4, first_tile=TILE)


def make_labels(x: torch.Tensor, gen: torch.Generator, ignore_frac: float, ignore_index: int = -100):
    """Random labels on finite logits (a label on -inf has logp = -inf; tested separately)."""
    shape, v = x.shape[:-1], x.shape[-1]
    labels = torch.randint(0, v, shape, generator=gen)
    finite = torch.isfinite(x)
    on_inf = ~finite.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    labels[on_inf] = finite[on_inf].float().argmax(-1)
    labels[torch.rand(shape, generator=gen) < ignore_frac] = ignore_index
    return labels


def eager_in_dtype(x: torch.Tensor, labels: torch.Tensor, temperature: float, ignore_index: int):
    """What a trainer computes without upcasting: log_softmax and entropy in the input dtype."""
    x = x.detach().clone().requires_grad_(True)
    logp_all = torch.log_softmax(x / temperature, -1)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    logp = torch.where(valid, logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1), 0)
    p = logp_all.exp()
    ent = torch.where(valid, -(p * torch.where(p > 0, logp_all, 0)).sum(-1), 0)
    return x, logp, ent


def half_ulp(ref: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Half the spacing of `dtype` at |ref|: the error of the exact answer once stored in dtype."""
    info = torch.finfo(dtype)
    mag = ref.abs().clamp_min(info.smallest_normal)
    return torch.exp2(torch.floor(torch.log2(mag))) * info.eps / 2


def assert_close_to_oracle(name, got, ref, eager, scale=None):
    """Elementwise |got - ref| <= 2 * (eager's max error) + 1e-5 * scale, plus, for outputs stored
    in a low-precision dtype (the gradient), the half-ulp rounding that even the exact answer
    suffers when stored: eager's own max error can miss it by luck on a few entries."""
    stored_dtype = got.dtype
    got, ref, eager = got.detach().double().cpu(), ref.detach().double().cpu(), eager.detach().double().cpu()
    assert torch.equal(torch.isfinite(got), torch.isfinite(ref)), \
        f"{name}: non-finite entries differ: got {got[~torch.isfinite(got)]}, oracle {ref[~torch.isfinite(ref)]}"
    nonfinite = ~torch.isfinite(ref)
    assert torch.equal(got[nonfinite].isnan(), ref[nonfinite].isnan()), f"{name}: NaN vs inf mismatch"
    assert torch.equal(got[nonfinite & ~ref.isnan()], ref[nonfinite & ~ref.isnan()]), f"{name}: inf sign"
    finite = ~nonfinite
    if not finite.any():
        return
    err_each = (got - ref)[finite].abs()
    err = err_each.max().item()
    usable = finite & torch.isfinite(eager)  # eager may be NaN where the oracle is not
    eager_err = (eager - ref)[usable].abs().max().item() if usable.any() else 0.0
    if scale is None:
        scale = max(1.0, ref[finite].abs().max().item())
    bound = 2 * eager_err + 1e-5 * scale
    rounding = half_ulp(ref[finite], stored_dtype) if stored_dtype != torch.float32 else 0.0
    excess = (err_each - rounding).max().item()
    assert excess <= bound, (f"{name}: error {err:.3g} (beyond storage rounding {excess:.3g}) > bound "
                             f"{bound:.3g} (eager error {eager_err:.3g})")


def check_op(x, labels, temperature, *, ignore_index=-100, with_entropy=True, gen):
    """token_logprobs(backend="triton") vs the float64 oracle: values and the logits gradient for
    random upstream gradients. x: in its final dtype and layout (moved to DEVICE here only if it
    is elsewhere, so pass layout-sensitive views already on DEVICE); labels: on the CPU."""
    dtype = x.dtype
    xk = x.detach().to(DEVICE).requires_grad_(True)
    x = x.detach().cpu()
    labels_d = labels.to(DEVICE)
    out = ao.token_logprobs(xk, labels_d, temperature=temperature, ignore_index=ignore_index,
                            compute_entropy=with_entropy, backend="triton")
    logp, ent = out if with_entropy else (out, None)
    assert logp.dtype == torch.float32 and logp.shape == labels.shape
    ga = torch.randn(labels.shape, generator=gen, dtype=torch.float64)
    gb = torch.randn(labels.shape, generator=gen, dtype=torch.float64)
    if not with_entropy:
        gb.zero_()
    loss = (logp.double().cpu() * ga).sum()
    if with_entropy:
        loss = loss + (ent.double().cpu() * gb).sum()
    loss.backward()
    assert xk.grad is not None and xk.grad.dtype == dtype and xk.grad.shape == x.shape

    xo = x.detach().double().requires_grad_(True)
    ref_logp, _, ref_ent = oracle_token_stats(xo, labels, temperature, ignore_index)
    (ref_logp * ga + ref_ent * gb).sum().backward()

    xe, eager_logp, eager_ent = eager_in_dtype(x, labels, temperature, ignore_index)
    (eager_logp.double() * ga + eager_ent.double() * gb).sum().backward()

    assert_close_to_oracle("logp", logp, ref_logp, eager_logp)
    if with_entropy:
        assert_close_to_oracle("entropy", ent, ref_ent, eager_ent)
    # A gradient entry is a*(1[v=y] - p) - b*p*(log p + H) over T: its scale is the upstream
    # gradient over the temperature even where the terms cancel (V = 1 gives exactly 0).
    grad_scale = (ga.abs() + gb.abs()).max().item() / temperature
    assert_close_to_oracle("grad", xk.grad, xo.grad, xe.grad, scale=grad_scale)
    ignored = labels == ignore_index
    assert (logp.cpu()[ignored] == 0).all()
    assert (xk.grad.cpu()[ignored] == 0).all(), "ignored rows must get exactly zero gradient"
    return logp, ent


# --------------------------------------------------------------------------------------------
# oracle comparisons across tile boundaries


@pytest.mark.parametrize("v", VOCABS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("pattern", PATTERNS)
def test_tile_boundaries(v, dtype, pattern):
    gen = torch.Generator().manual_seed(1000 * v + 10 * DTYPES.index(dtype) + PATTERNS.index(pattern))
    temperature = (0.5, 1.0, 1.7)[(v + PATTERNS.index(pattern)) % 3]
    x = make_logits(4, v, dtype, pattern, gen)
    labels = make_labels(x, gen, ignore_frac=0.25)
    labels[0] = v - 1 if torch.isfinite(x[0, v - 1]) else labels[0]  # the last column, in the tail
    check_op(x, labels, temperature, gen=gen)


@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 4), v=st.integers(1, 3 * TILE + 5),
       dtype=st.sampled_from(DTYPES), temperature=st.sampled_from([0.5, 1.7, 1.0, 0.3, 2.3]),
       pattern=st.sampled_from(PATTERNS), ignore_frac=st.sampled_from([0.0, 0.4, 1.0]),
       with_entropy=st.booleans())
def test_random_against_oracle(seed, n, v, dtype, temperature, pattern, ignore_frac, with_entropy):
    gen = torch.Generator().manual_seed(seed)
    x = make_logits(n, v, dtype, pattern, gen)
    labels = make_labels(x, gen, ignore_frac)
    check_op(x, labels, temperature, with_entropy=with_entropy, gen=gen)


@pytest.mark.parametrize("v,dtype", [(151936, torch.bfloat16), (129920, torch.float32)], ids=str)
def test_real_vocabularies(v, dtype):
    """Vocabulary sizes of real tokenizers (not powers of two) on two peaked rows."""
    gen = torch.Generator().manual_seed(v)
    x = make_logits(2, v, dtype, "peaked", gen)
    labels = torch.tensor([v - 1, int(x[1].float().argmax())])
    check_op(x, labels, 0.7, gen=gen)


def test_label_on_neginf_logit():
    """logp = -inf exactly, and the gradient (which falls back to z - lse) stays finite."""
    gen = torch.Generator().manual_seed(11)
    x = make_logits(3, 300, torch.float32, "normal", gen)
    x[:, 17] = -math.inf
    x[1, 280:] = -math.inf
    labels = torch.tensor([17, 17, 3])
    logp, _ = check_op(x, labels, 1.7, gen=gen)
    assert torch.isneginf(logp[:2].cpu()).all()


# --------------------------------------------------------------------------------------------
# layouts and strides


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_shifted_slice_noncontiguous(dtype):
    """logits[:, :-1] as trainers shift them: a [B, T-1, V] view that is not viewable as [N, V]."""
    gen = torch.Generator().manual_seed(21)
    B, T, V = 3, 6, 263
    full = make_logits(B * T, V, dtype, "normal", gen).view(B, T, V).to(DEVICE)
    x = full[:, :-1, :]
    assert not x.is_contiguous() and x.stride(2) == 1
    labels = make_labels(x.cpu(), gen, ignore_frac=0.2)
    check_op(x, labels, 0.5, gen=gen)


def test_grad_logits_with_its_own_strides():
    """The backward writes through grad_logits' strides and nowhere else."""
    fwd, bwd = triton_kernels()
    gen = torch.Generator().manual_seed(22)
    B, T, V = 2, 5, 300
    x = make_logits(B * T, V, torch.float32, "normal", gen).view(B, T, V).to(DEVICE)
    labels = make_labels(x.cpu(), gen, 0.3).reshape(-1).to(DEVICE)
    n = B * T
    logp, lse, ent = (torch.empty(n, device=DEVICE) for _ in range(3))
    fwd(x, labels, 1.0 / 1.7, -100, True, logp, lse, ent)
    ga, gb = (torch.randn(n, generator=gen).to(DEVICE) for _ in range(2))
    dense = torch.empty_like(x)
    bwd(x, labels, logp, lse, ent, ga, gb, 1.0 / 1.7, -100, True, dense)
    canvas = torch.full((B + 1, T + 2, V + 9), 7.0, device=DEVICE)
    strided = canvas[1:, 1:-1, 4:-5]
    assert strided.stride() != dense.stride() and strided.stride(2) == 1
    bwd(x, labels, logp, lse, ent, ga, gb, 1.0 / 1.7, -100, True, strided)
    torch.testing.assert_close(strided, dense, rtol=0, atol=0)
    untouched = torch.ones_like(canvas, dtype=torch.bool)
    untouched[1:, 1:-1, 4:-5] = False
    assert (canvas[untouched] == 7.0).all(), "backward wrote outside grad_logits"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_inplace_backward(dtype):
    """grad_logits aliasing logits (in-place backward) gives the same bits as a separate buffer,
    and those match the oracle."""
    fwd, bwd = triton_kernels()
    gen = torch.Generator().manual_seed(23)
    B, T, V = 2, 3, 3 * TILE + 11
    x = make_logits(B * T, V, dtype, "shifted_up", gen).view(B, T, V)
    labels = make_labels(x, gen, 0.2).reshape(-1)
    temperature = 0.5
    xd, ld = x.to(DEVICE), labels.to(DEVICE)
    n = B * T
    logp, lse, ent = (torch.empty(n, device=DEVICE) for _ in range(3))
    fwd(xd, ld, 1.0 / temperature, -100, True, logp, lse, ent)
    ga, gb = (torch.randn(n, generator=gen) for _ in range(2))
    separate = torch.empty_like(xd)
    bwd(xd, ld, logp, lse, ent, ga.to(DEVICE), gb.to(DEVICE), 1.0 / temperature, -100, True, separate)
    inplace = xd.clone()
    bwd(inplace, ld, logp, lse, ent, ga.to(DEVICE), gb.to(DEVICE), 1.0 / temperature, -100, True, inplace)
    torch.testing.assert_close(inplace, separate, rtol=0, atol=0)

    xo = x.double().requires_grad_(True)
    rl, _, re = oracle_token_stats(xo.view(n, V), labels, temperature)
    (rl * ga.double() + re * gb.double()).sum().backward()
    xe, el, ee = eager_in_dtype(x.view(n, V), labels, temperature, -100)
    (el.double() * ga.double() + ee.double() * gb.double()).sum().backward()
    scale = (ga.abs() + gb.abs()).max().item() / temperature
    assert_close_to_oracle("in-place grad", inplace.view(n, V), xo.grad.view(n, V), xe.grad, scale=scale)


# --------------------------------------------------------------------------------------------
# ignored rows, out-of-range labels, flags


def test_ignored_rows_are_not_read():
    """Ignored rows may hold NaN or all -inf: outputs and gradients are exactly 0 there."""
    fwd, bwd = triton_kernels()
    gen = torch.Generator().manual_seed(31)
    x = make_logits(4, 2 * TILE + 1, torch.float32, "normal", gen)
    x[1] = float("nan")
    x[3] = -math.inf
    for ignore_index in (-100, 0, 5):
        labels = torch.tensor([2, ignore_index, 7, ignore_index])
        xd = x.to(DEVICE).unsqueeze(0)
        logp, lse, ent = (torch.full((4,), 123.0, device=DEVICE) for _ in range(3))
        fwd(xd, labels.to(DEVICE), 1.0, ignore_index, True, logp, lse, ent)
        for out in (logp, lse, ent):
            assert (out.cpu()[[1, 3]] == 0).all() and torch.isfinite(out.cpu()[[0, 2]]).all()
        grad = torch.full_like(xd, 5.0)
        ones = torch.ones(4, device=DEVICE)
        bwd(xd, labels.to(DEVICE), logp, lse, ent, ones, ones, 1.0, ignore_index, True, grad)
        assert (grad[0, [1, 3]] == 0).all()
        assert torch.isfinite(grad[0, [0, 2]]).all()
        # the same rows through the op, against the oracle, with this ignore_index
        check_op(x, labels, 1.3, ignore_index=ignore_index, gen=gen)


def test_all_rows_ignored_and_empty():
    gen = torch.Generator().manual_seed(32)
    x = make_logits(3, 40, torch.bfloat16, "normal", gen).to(DEVICE).requires_grad_(True)
    logp, ent = ao.token_logprobs(x, torch.full((3,), -100, device=DEVICE), compute_entropy=True, backend="triton")
    assert (logp == 0).all() and (ent == 0).all()
    (logp + ent).sum().backward()
    assert (x.grad == 0).all()
    empty = torch.randn(0, 40, device=DEVICE, requires_grad=True)
    lp = ao.token_logprobs(empty, torch.zeros(0, dtype=torch.long, device=DEVICE), backend="triton")
    lp.sum().backward()
    assert lp.shape == (0,) and empty.grad.shape == (0, 40)


@pytest.mark.parametrize("bad_label", [-1, "V", 2**40, -(2**40)])
def test_out_of_range_label_gives_nan_without_reading_out_of_bounds(bad_label):
    fwd, bwd = triton_kernels()
    gen = torch.Generator().manual_seed(33)
    V = TILE + 9
    x = make_logits(3, V, torch.float32, "normal", gen).to(DEVICE).unsqueeze(0)
    bad = V if bad_label == "V" else bad_label
    labels = torch.tensor([4, bad, V - 1], device=DEVICE)
    logp, lse, ent = (torch.empty(3, device=DEVICE) for _ in range(3))
    fwd(x, labels, 1.0, -100, True, logp, lse, ent)
    assert torch.isnan(logp[1]) and torch.isfinite(logp[[0, 2]]).all()
    # lse and entropy do not depend on the label
    ref_lse = torch.logsumexp(x[0, 1].double(), -1)
    assert abs(lse[1].item() - ref_lse.item()) <= 1e-5 * max(1.0, abs(ref_lse.item()))
    grad = torch.full_like(x, 5.0)
    ones = torch.ones(3, device=DEVICE)
    bwd(x, labels, logp, lse, ent, ones, ones, 1.0, -100, True, grad)
    assert (grad[0, 1] == 0).all() and torch.isfinite(grad[0, [0, 2]]).all()


def test_entropy_flags():
    """compute_entropy=False writes entropy 0 and leaves logp/lse bit-identical; with
    has_entropy_grad=False the entropy upstream (even NaN) is ignored."""
    fwd, bwd = triton_kernels()
    gen = torch.Generator().manual_seed(34)
    x = make_logits(5, 2 * TILE + 3, torch.bfloat16, "peaked", gen).to(DEVICE).unsqueeze(0)
    labels = make_labels(x[0].cpu(), gen, 0.2).to(DEVICE)
    with_h = [torch.empty(5, device=DEVICE) for _ in range(3)]
    without_h = [torch.full((5,), 9.0, device=DEVICE) for _ in range(3)]
    fwd(x, labels, 1.0 / 0.8, -100, True, *with_h)
    fwd(x, labels, 1.0 / 0.8, -100, False, *without_h)
    assert torch.equal(with_h[0], without_h[0]) and torch.equal(with_h[1], without_h[1])
    assert (without_h[2] == 0).all()
    ga = torch.randn(5, generator=gen).to(DEVICE)
    g_ignored, g_zero = torch.empty_like(x), torch.empty_like(x)
    bwd(x, labels, *with_h, ga, torch.full((5,), float("nan"), device=DEVICE), 1.0 / 0.8, -100, False, g_ignored)
    bwd(x, labels, *with_h, ga, torch.zeros(5, device=DEVICE), 1.0 / 0.8, -100, True, g_zero)
    torch.testing.assert_close(g_ignored, g_zero, rtol=0, atol=0)


# --------------------------------------------------------------------------------------------
# grid, determinism, launch configuration, errors


def test_rows_loop_when_grid_is_capped(monkeypatch):
    """With fewer programs than rows, each program loops over rows: same bits as one row each."""
    from alignops.kernels import token_stats as ktoken

    gen = torch.Generator().manual_seed(41)
    x = make_logits(7, TILE + 40, torch.float16, "shifted_down", gen).to(DEVICE).view(1, 7, -1)
    labels = make_labels(x[0].cpu(), gen, 0.3).to(DEVICE)

    def run():
        outs = [torch.empty(7, device=DEVICE) for _ in range(3)]
        ktoken.token_stats_fwd(x, labels, 1.0 / 1.7, -100, True, *outs)
        grad = torch.empty_like(x)
        ga = torch.linspace(-1, 1, 7, device=DEVICE)
        ktoken.token_stats_bwd(x, labels, *outs, ga, ga.flip(0), 1.0 / 1.7, -100, True, grad)
        return outs + [grad]

    one_row_each = run()
    assert all(torch.equal(a, b) for a, b in zip(one_row_each, run())), "not deterministic"
    monkeypatch.setattr(ktoken, "_MAX_PROGRAMS", 3)
    looped = run()
    for a, b in zip(one_row_each, looped):
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.nan_to_num(), b.nan_to_num())


def test_launch_config_heuristic(monkeypatch):
    from alignops.kernels import token_stats as ktoken

    monkeypatch.setattr(ktoken, "_interpreted", lambda: False)
    for v in (1, 7, 1000, 4096, 32000, 128256, 151936):
        block_v, num_warps = ktoken._launch_config(v)
        assert block_v & (block_v - 1) == 0 and block_v <= 8192 and (block_v >= v or block_v == 8192)
        assert num_warps in (1, 2, 4, 8, 16)
    monkeypatch.setattr(ktoken, "_interpreted", lambda: True)
    assert ktoken._launch_config(151936)[0] == TILE


def test_launcher_rejects_bad_arguments():
    fwd, bwd = triton_kernels()
    n, V = 2, 9
    labels = torch.tensor([1, 2], device=DEVICE)
    outs = [torch.empty(n, device=DEVICE) for _ in range(3)]
    with pytest.raises(TypeError, match="logits"):
        fwd(torch.randn(1, n, V, dtype=torch.float64, device=DEVICE), labels, 1.0, -100, True, *outs)
    with pytest.raises(TypeError, match="logits"):
        fwd(torch.ones(1, n, V, dtype=torch.int32, device=DEVICE), labels, 1.0, -100, True, *outs)
    with pytest.raises(ValueError, match="logits"):
        fwd(torch.randn(n, V, device=DEVICE), labels, 1.0, -100, True, *outs)
    with pytest.raises(ValueError, match="logits"):
        fwd(torch.randn(1, V, n, device=DEVICE).transpose(1, 2), labels, 1.0, -100, True, *outs)
    x = torch.randn(1, n, V, device=DEVICE)
    with pytest.raises(TypeError, match="labels"):
        fwd(x, labels.int(), 1.0, -100, True, *outs)
    with pytest.raises(TypeError, match="logp"):
        fwd(x, labels, 1.0, -100, True, outs[0].double(), outs[1], outs[2])
    with pytest.raises(ValueError, match="entropy"):
        fwd(x, labels, 1.0, -100, True, outs[0], outs[1], torch.empty(n + 1, device=DEVICE))
    with pytest.raises(ValueError, match="inv_temperature"):
        fwd(x, labels, 0.0, -100, True, *outs)
    with pytest.raises(TypeError, match="inv_temperature"):
        fwd(x, labels, torch.tensor(1.0), -100, True, *outs)
    with pytest.raises(ValueError, match="grad_logits"):
        bwd(x, labels, *outs, outs[0], outs[0], 1.0, -100, True, torch.empty(1, n, V + 1, device=DEVICE))
    with pytest.raises(ValueError, match="grad_logits"):
        bwd(x, labels, *outs, outs[0], outs[0], 1.0, -100, True, torch.empty_like(x).bfloat16())
    with pytest.raises(TypeError, match="logits"):
        ao.token_logprobs(torch.randn(2, V, dtype=torch.float64, device=DEVICE), labels, backend="triton")
