"""Advantage estimators and normalisation on every backend that runs here (torch, cpu, triton: compiled
on CUDA tensors where there is a GPU, else under the interpreter), against plain-Python float64 oracles
written from docs/methods.md, never from the code under test. Each backend runs on its device
(tests.conftest.device_of): inputs are drawn on CPU and moved for the op, and its outputs brought
back to CPU for the comparisons.

Tolerances: float64 inputs must match the oracle to 1e-10 of the output scale; float32 inputs to
1e-5 of the output scale (docs/design.md's fp32 bound).
"""

from __future__ import annotations

import math
import os
import socket
import tempfile

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import alignops as ao
from alignops import _backend
from tests.conftest import device_of, fast_backends

# the advantage ops have torch, cpu and triton kernels, no cuda kernel (a named "cuda" raises)
BACKENDS = ["torch"] + [b for b in fast_backends() if b in ("cpu", "triton")]
NAN = float("nan")


def to(device, *xs):
    """`xs` moved to `device` (None and other values as they are): inputs are drawn on CPU, then
    moved for the op; `to("cpu", ...)` brings outputs back."""
    out = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in xs)
    return out[0] if len(out) == 1 else out


# --------------------------------------------------------------------------------------------
# float64 oracles (plain Python loops)


def oracle_group(rewards, group_of, mode="scale", eps=1e-6, singleton="zero"):
    """mode: "scale" (GRPO), "center" (Dr.GRPO), "rloo". Returns advantages and per-group
    (mean, std, count) keyed by group id."""
    groups = {}
    for i, g in enumerate(group_of):
        groups.setdefault(g, []).append(i)
    adv = [0.0] * len(rewards)
    stats = {}
    for g, rows in groups.items():
        vals = [rewards[i] for i in rows if not math.isnan(rewards[i])]
        k = len(vals)
        mean = sum(vals) / k if k else 0.0
        if k >= 2 and max(vals) != min(vals):
            std = math.sqrt(sum((x - mean) ** 2 for x in vals) / (k - 1))
        else:
            std = 0.0
        stats[g] = (mean, std, k)
        for i in rows:
            x = rewards[i]
            if math.isnan(x):
                a = 0.0
            elif k == 1:
                a = x if singleton == "raw" else 0.0
            elif std == 0.0:
                a = 0.0
            elif mode == "scale":
                a = (x - mean) / (std + eps)
            elif mode == "rloo":
                a = x - (sum(vals) - x) / (k - 1)
            else:
                a = x - mean
            adv[i] = a
    return adv, stats


def oracle_gae(r, v, m, gamma, lam):
    """One row: backward over valid positions only; returns (adv, returns=GAE+V)."""
    T = len(r)
    adv, ret = [0.0] * T, [0.0] * T
    next_v, run = 0.0, 0.0
    for t in range(T - 1, -1, -1):
        if not m[t]:
            continue
        delta = r[t] + gamma * next_v - v[t]
        run = delta + gamma * lam * run
        adv[t], ret[t] = run, run + v[t]
        next_v = v[t]
    return adv, ret


def oracle_whiten(x, m, unbiased=True, eps=1e-8, eps_mode="add_inside", shift_mean=True):
    vals = [a for a, k in zip(x, m) if k]
    n = len(vals)
    mean = sum(vals) / n if n else 0.0
    if n <= 1:
        inv = 1.0
    else:
        var = sum((a - mean) ** 2 for a in vals) / ((n - 1) if unbiased else n)
        inv = 1 / math.sqrt(var + eps) if eps_mode == "add_inside" else 1 / math.sqrt(max(var, eps))
    return [((a - mean) * inv + (0 if shift_mean else mean)) if k else 0.0 for a, k in zip(x, m)]


def assert_close_scale(got, want, dtype, what="", cond=1.0):
    """cond: the problem's condition number (whitening 1000 +- 1e-3 amplifies the unavoidable
    rounding of x - mean by |x| / std); 1 for well-conditioned outputs."""
    got = torch.as_tensor(got, dtype=torch.float64).cpu().flatten()
    want = torch.as_tensor(want, dtype=torch.float64).cpu().flatten()
    assert got.shape == want.shape, what
    assert torch.isfinite(got).all(), f"{what}: non-finite output {got}"
    scale = max(1.0, want.abs().max().item() if want.numel() else 1.0)
    tol = (1e-10 if dtype == torch.float64 else 1e-5) * scale * max(1.0, cond)
    err = (got - want).abs().max().item() if want.numel() else 0.0
    assert err <= tol, f"{what}: max error {err:.3g} > {tol:.3g}\n got {got}\nwant {want}"


# --------------------------------------------------------------------------------------------
# hypothesis strategies


@st.composite
def grouped_rewards(draw, max_groups=12, max_size=64):
    sizes = draw(st.lists(st.integers(1, max_size), min_size=1, max_size=max_groups))
    kind = draw(st.sampled_from(["binary", "normal", "shifted", "constant", "tiny_spread"]))
    rewards = []
    for s in sizes:
        for _ in range(s):
            if kind == "binary":
                rewards.append(float(draw(st.integers(0, 1))))
            elif kind == "constant":
                rewards.append(0.1)
            else:
                x = draw(st.floats(-3, 3, allow_nan=False, allow_infinity=False, width=32))
                rewards.append({"normal": x, "shifted": 1000 + x, "tiny_spread": 0.5 + 1e-3 * x}[kind])
    nan_frac = draw(st.sampled_from([0.0, 0.0, 0.2]))
    if nan_frac:
        idx = draw(st.lists(st.integers(0, len(rewards) - 1), max_size=max(1, len(rewards) // 5)))
        for i in idx:
            rewards[i] = NAN
    group_of = [g for g, s in enumerate(sizes) for _ in range(s)]
    perm = draw(st.permutations(range(len(rewards))))
    # ragged, shuffled ids that are not 0..P-1
    ids = [7 * group_of[p] + 3 for p in perm]
    rewards = [rewards[p] for p in perm]
    return rewards, ids


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(data=grouped_rewards(), mode=st.sampled_from(["scale", "center", "rloo"]),
       singleton=st.sampled_from(["zero", "raw"]))
def test_group_estimators_match_oracle(backend, dtype, data, mode, singleton):
    rewards, ids = data
    r = torch.tensor(rewards, dtype=dtype)
    gid = torch.tensor(ids)
    rd = r.double().tolist()  # the oracle sees the same dtype-rounded rewards
    want, stats = oracle_group(rd, ids, mode, 1e-6, singleton)
    r, gid = to(device_of(backend), r, gid)
    if mode == "rloo":
        out = ao.rloo_advantages(r, group_ids=gid, singleton=singleton, return_stats=True, backend=backend)
    else:
        out = ao.grpo_advantages(r, group_ids=gid, scale="group" if mode == "scale" else "none",
                                 singleton=singleton, return_stats=True, backend=backend)
    assert out.advantages.dtype == dtype
    assert_close_scale(out.advantages, want, dtype, f"{mode} advantages")
    keys = sorted(stats)
    assert_close_scale(out.mean, [stats[k][0] for k in keys], dtype, "mean")
    assert_close_scale(out.std, [stats[k][1] for k in keys], dtype, "std")
    assert out.count.tolist() == [stats[k][2] for k in keys]
    assert out.zero_variance.tolist() == [stats[k][1] == 0.0 for k in keys]
    assert out.group_index.tolist() == [keys.index(i) for i in ids]
    # equal rewards give exactly zero, not eps-sized noise
    for i, g in enumerate(ids):
        if stats[g][1] == 0.0 and not (stats[g][2] == 1 and singleton == "raw"):
            assert out.advantages[i].item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_group_size_layout_and_num_groups_equal_group_ids(backend):
    g = torch.Generator().manual_seed(1)
    r = (torch.rand(96, generator=g) > 0.5).float()
    dev = device_of(backend)
    r = r.to(dev)
    a = ao.grpo_advantages(r, 8, backend=backend)
    ids = (torch.arange(96) // 8).to(dev)
    b = ao.grpo_advantages(r, group_ids=ids, backend=backend)
    c = ao.grpo_advantages(r, group_ids=ids, num_groups=12, backend=backend)
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp16_bf16_int_bool_rewards_computed_in_fp32(backend):
    r = torch.tensor([1, 0, 0, 0, 1, 1, 0, 1])
    want = ao.grpo_advantages(r.float(), 4, backend="torch")
    for x in (r, r.bool(), r.half(), r.bfloat16()):
        out = ao.grpo_advantages(x.to(device_of(backend)), 4, backend=backend)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.cpu(), want)


# --------------------------------------------------------------------------------------------
# worked vectors of docs/methods.md


@pytest.mark.parametrize("backend", BACKENDS)
def test_worked_vectors(backend):
    dev = device_of(backend)
    r = torch.tensor([1.0, 0, 0, 0], dtype=torch.float64).to(dev)
    s = 0.5 / (0.5 + 1e-6)  # unbiased sigma = 0.5, eps outside the root
    torch.testing.assert_close(ao.grpo_advantages(r, 4, backend=backend).cpu(),
                               torch.tensor([1.5, -0.5, -0.5, -0.5], dtype=torch.float64) * s)
    # the biased sigma would give 1.732: pin the unbiased one
    assert abs(ao.grpo_advantages(r, 4, backend=backend)[0].item() - 1.5) < 1e-5
    torch.testing.assert_close(ao.grpo_advantages(r, 4, scale="none", backend=backend).cpu(),
                               torch.tensor([0.75, -0.25, -0.25, -0.25], dtype=torch.float64))
    torch.testing.assert_close(ao.rloo_advantages(r, 4, backend=backend).cpu(),
                               torch.tensor([1, -1 / 3, -1 / 3, -1 / 3], dtype=torch.float64))
    r2 = torch.tensor([1.0, 0, 0, 0, 1, 1, 1, 1], dtype=torch.float64).to(dev)
    out = ao.gpg_advantages(r2, 4, return_stats=True, backend=backend)
    assert out.alpha.item() == 2.0
    torch.testing.assert_close(out.advantages.cpu(), torch.tensor([1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0],
                                                                  dtype=torch.float64))
    # verl's alpha counts rows with a non-zero reward: 8 / 5
    v = ao.gpg_advantages(r2, 4, alpha_mode="verl_nonzero", return_stats=True, backend=backend)
    assert abs(v.alpha.item() - 8 / 5) < 1e-12
    # GVPO centred rewards: [1, 0] -> [0.5, -0.5], loss at the anchor = sum^2 / (2 (k-1)) = 0.25
    c = ao.gvpo_centered_rewards(torch.tensor([1.0, 0.0]).to(dev), 2, backend=backend).cpu()
    assert c.tolist() == [0.5, -0.5] and (c ** 2).sum().item() / 2 == 0.25


def test_dapo_overlong_penalty():
    L = torch.tensor([100, 16384, 18432, 20480, 30000])
    out = ao.dapo_overlong_penalty(L, max_length=20480, cache_length=4096)
    assert out.tolist() == [0.0, 0.0, -0.5, -1.0, -1.0]  # capped at -kappa beyond max_length
    assert ao.dapo_overlong_penalty(L, 20480, 4096, penalty_factor=2.0)[2].item() == -1.0


def test_semantic_entropy_and_seed_grpo():
    clusters = torch.tensor([0, 0, 0, 0, 1, 1, 2, 3, 5, 5, 5, 5, 5, 5, 5, 5])
    se = ao.semantic_entropy(clusters, 8)
    assert abs(se[0].item() - 1.2130) < 1e-4 and se[1].item() == 0.0
    assert abs(se[0].item() / math.log(8) - 0.5833) < 1e-4
    r = torch.tensor([1.0, 0, 0, 1, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 0, 1])
    base = ao.grpo_advantages(r, 8, scale="none")
    out = ao.seed_grpo_advantages(r, se, 8, alpha=1.0)
    torch.testing.assert_close(out[:8], base[:8] * (1 - se[0] / math.log(8)))
    assert abs((1 - se[0].item() / math.log(8)) - 0.4167) < 1e-4
    torch.testing.assert_close(out[8:], base[8:])  # identical answers: scale 1
    # alpha > 1 would flip the sign without the clamp
    assert torch.all(ao.seed_grpo_advantages(r, se, 8, alpha=5.0)[:8] == 0)
    # per-row semantic entropy is accepted too
    torch.testing.assert_close(ao.seed_grpo_advantages(r, se.repeat_interleave(8), 8, alpha=1.0), out)


def test_vapo_lambda():
    lam = ao.vapo_lambda(torch.tensor([100, 1000, 20, 5, 0]))
    torch.testing.assert_close(lam, torch.tensor([0.8, 0.98, 0.0, 0.0, 0.0]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weighting", ["token", "row"])
def test_dler_batch_normalisation(backend, weighting):
    g = torch.Generator().manual_seed(3)
    B, G, T = 32, 4, 12
    r = (torch.rand(B, generator=g) > 0.4).double()
    truncated = torch.rand(B, generator=g) > 0.7
    mask = torch.arange(T)[None] < torch.randint(1, T + 1, (B,), generator=g)[:, None]
    dev = device_of(backend)
    A = ao.dler_advantages(r.to(dev), G, mask=mask.to(dev) if weighting == "token" else None,
                           truncated=truncated.to(dev), stat_weighting=weighting, backend=backend).cpu()
    r_eff = torch.where(truncated, 0.0, r)
    a = (r_eff.view(-1, G) - r_eff.view(-1, G).mean(1, keepdim=True)).flatten()
    w = mask.sum(-1).double() if weighting == "token" else torch.ones(B, dtype=torch.float64)
    mean = (w * a).sum() / w.sum()
    var = (w * (a - mean) ** 2).sum() / (w.sum() - 1)
    torch.testing.assert_close(A, (a - mean) / (var.sqrt() + 1e-6))
    # the oracle of docs/methods.md: weighted mean 0, weighted std 1 (up to eps)
    assert abs((w * A).sum().item() / w.sum().item()) < 1e-12
    assert abs(((w * A ** 2).sum() / (w.sum() - 1)).sqrt().item() - 1) < 1e-5


def test_dler_raw_equals_trl_batch_scaling():
    g = torch.Generator().manual_seed(4)
    r = torch.rand(24, generator=g, dtype=torch.float64)
    got = ao.dler_advantages(r, 6, stat_weighting="row", batch_std_of="raw")
    want = ao.grpo_advantages(r, 6, scale="batch")
    torch.testing.assert_close(got, want)
    trl = (r.view(-1, 6) - r.view(-1, 6).mean(1, keepdim=True)).flatten() / (r.std() + 1e-6)
    torch.testing.assert_close(want, trl)


@pytest.mark.parametrize("backend", BACKENDS)
def test_awpo(backend):
    g = torch.Generator().manual_seed(5)
    B, G = 40, 8
    r_out = (torch.rand(B, generator=g) > 0.5).double()
    r_out[:8] = 1.0  # a saturated group: the gate must stay shut
    r_rsn = torch.rand(B, generator=g, dtype=torch.float64)
    dev = device_of(backend)
    out = ao.awpo_advantages(r_out.to(dev), r_rsn.to(dev), G, backend=backend)
    out = type(out)(*to("cpu", *out))
    # oracle from the survey's equations
    ro, rm = r_out.view(-1, G), (r_out + r_rsn).view(-1, G)

    def norm(x):
        sd = x.std(1, keepdim=True)
        return torch.where(sd > 0, (x - x.mean(1, keepdim=True)) / (sd + 1e-6), 0.0), sd.squeeze(1)

    a_out, sd_out = norm(ro)
    a_mix, sd_mix = norm(rm)
    ratio = sd_mix / (sd_out + sd_mix + 1e-6)
    mean_out = ro.mean(1)
    w = torch.where((mean_out < 1.0) & (ratio < 0.6), ratio, 0.0)
    d = torch.where((mean_out > 0.2) & (mean_out < 0.8), 1.5, 1.0)
    want = (d[:, None] * ((1 - w[:, None]) * a_out + w[:, None] * a_mix)).flatten()
    torch.testing.assert_close(out.advantages, want)
    torch.testing.assert_close(out.gate, w)
    assert out.gate[0].item() == 0.0
    torch.testing.assert_close(out.clip_low, torch.tensor(0.1 + (1 - w.mean().item()) * 0.1, dtype=torch.float64))
    assert ((out.gate >= 0) & (out.gate < 1)).all()
    # reasoning reward off -> GRPO (with d = 1)
    plain = ao.awpo_advantages(r_out.to(dev), torch.zeros_like(r_out).to(dev), G, alpha_prio=1.0, backend=backend)
    torch.testing.assert_close(plain.advantages.cpu(), ao.grpo_advantages(r_out, G))


# --------------------------------------------------------------------------------------------
# group oracles (docs/methods.md 3.2.6) and dynamic sampling


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=grouped_rewards(max_groups=8, max_size=16))
# found by hypothesis in CI: a one-pass mean left the 1000 + 1e-6 group's centred sum at ~1e-13, 7.6e-8 once scaled
@example(data=([1000.0] * 10 + [1000.000001], [3, 10, 17, 24, 31, 38, 45, 52, 52, 52, 52]))
def test_group_sums_are_zero(backend, data):
    rewards, ids = data
    r = torch.tensor(rewards, dtype=torch.float64)
    gid = torch.tensor(ids)
    _, index = torch.unique(gid, return_inverse=True)
    r, gid = to(device_of(backend), r, gid)
    for name, adv in [
        ("grpo", ao.grpo_advantages(r, group_ids=gid, singleton="zero", backend=backend)),
        ("drgrpo", ao.grpo_advantages(r, group_ids=gid, scale="none", singleton="zero", backend=backend)),
        ("rloo", ao.rloo_advantages(r, group_ids=gid, singleton="zero", backend=backend)),
        ("gpg", ao.gpg_advantages(r, group_ids=gid, singleton="zero", backend=backend)),
    ]:
        adv = adv.cpu()
        sums = torch.zeros(int(index.max()) + 1, dtype=torch.float64).index_add_(0, index, adv)
        assert sums.abs().max().item() < 1e-8 * max(1.0, adv.abs().max().item()), name


@pytest.mark.parametrize("backend", BACKENDS)
def test_dynamic_sampling(backend):
    r = torch.tensor([1.0, 0, 1, 0, 1, 1, 1, 1, 0, 0, 0, 0, 0.3, NAN, NAN, NAN, 0.2, 0.2, 0.2, NAN])
    r = r.to(device_of(backend))
    ds = ao.dynamic_sampling_mask(r, 4, backend=backend)
    assert ds.group_keep.tolist() == [True, False, False, False, False]
    assert ds.row_keep.tolist() == [True] * 4 + [False] * 16
    assert ds.num_kept.item() == 1 and abs(ds.kept_fraction.item() - 0.2) < 1e-7
    st_ = ao.group_stats(r, 4, backend=backend)
    assert st_.zero_variance.tolist() == [False, True, True, True, True]
    assert st_.count.tolist() == [4, 4, 4, 1, 3]


# --------------------------------------------------------------------------------------------
# masked statistics and whitening


@st.composite
def masked_matrix(draw):
    B = draw(st.integers(1, 6))
    T = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, T, generator=g, dtype=torch.float64) * draw(st.sampled_from([1e-3, 1.0, 50.0]))
    x += draw(st.sampled_from([0.0, 1000.0, -1000.0]))
    density = draw(st.sampled_from([0.0, 0.05, 0.5, 1.0]))
    m = torch.rand(B, T, generator=g) < density
    if draw(st.booleans()):
        m[0] = False  # an empty row
    if draw(st.booleans()):
        x[~m] = NAN  # padding may hold garbage
    return x, m


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(data=masked_matrix(), var=st.sampled_from(["unbiased", "biased"]),
       eps_mode=st.sampled_from(["add_inside", "floor"]), shift_mean=st.booleans())
def test_masked_whiten_matches_oracle(backend, dtype, data, var, eps_mode, shift_mean):
    x, m = data
    x = x.to(dtype)
    xd, md = to(device_of(backend), x, m)
    out = ao.masked_whiten(xd, md, shift_mean, var=var, var_eps_mode=eps_mode, backend=backend)
    want = oracle_whiten(x.double().flatten().tolist(), m.flatten().tolist(), var == "unbiased", 1e-8,
                         eps_mode, shift_mean)
    assert out.dtype == dtype and out.shape == x.shape
    vals = [a for a, k in zip(x.double().flatten().tolist(), m.flatten().tolist()) if k]
    n = len(vals)
    mean = sum(vals) / n if n else 0.0
    spread = math.sqrt(sum((a - mean) ** 2 for a in vals) / n) if n > 1 else 0.0
    # x - mean carries a few float64 ulps of |x| (in the oracle as well as the kernel: the mean
    # itself is rounded), amplified by 1/std: allow 10 ulps, i.e. 1e-15 |x| / std.
    cond = max((abs(a) for a in vals), default=0.0) / spread * 1e-5 if spread > 0 else 1.0
    assert_close_scale(out, want, dtype, "whiten", cond=cond)
    assert_close_scale(ao.masked_mean(xd, md, backend=backend), [mean], dtype, "mean")
    denom = (n - 1) if var == "unbiased" else n
    v = sum((a - mean) ** 2 for a in vals) / denom if denom > 0 else 0.0
    got_v = ao.masked_var(xd, md, unbiased=var == "unbiased", backend=backend).item()
    # variance from (sum, sum of squares) in float64: error ~ 1e-16 * mean^2
    assert abs(got_v - v) <= 1e-10 * max(1.0, v) + 1e-15 * mean * mean + (1e-6 * v if dtype == torch.float32 else 0)


def test_masked_whiten_small_n_and_semantics():
    x = torch.tensor([[3.0, 5.0, NAN]])
    m = torch.tensor([[True, False, False]])
    assert ao.masked_whiten(x, m).tolist() == [[0.0, 0.0, 0.0]]  # N = 1: centred, no raise
    assert ao.masked_whiten(x, m, shift_mean=False).tolist() == [[3.0, 0.0, 0.0]]
    assert ao.masked_whiten(x, torch.zeros_like(m)).tolist() == [[0.0, 0.0, 0.0]]  # N = 0
    assert ao.masked_mean(x, torch.zeros_like(m)).item() == 0.0
    # per-row masked mean with an empty row gives 0, not NaN
    mm = ao.masked_mean(torch.tensor([[1.0, 3.0], [5.0, 7.0]]), torch.tensor([[1, 1], [0, 0]]), dim=-1)
    assert mm.tolist() == [2.0, 0.0]


# --------------------------------------------------------------------------------------------
# GAE


@st.composite
def gae_inputs(draw):
    B = draw(st.integers(1, 5))
    T = draw(st.integers(1, 150))
    seed = draw(st.integers(0, 2**31 - 1))
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(B, T, generator=g, dtype=torch.float64)
    v = torch.randn(B, T, generator=g, dtype=torch.float64)
    layout = draw(st.sampled_from(["right_pad", "holes", "all", "empty_row"]))
    if layout == "all":
        m = torch.ones(B, T, dtype=torch.bool)
    else:
        lengths = torch.randint(0, T + 1, (B,), generator=g)
        m = torch.arange(T)[None] < lengths[:, None]
        if layout == "holes":
            m &= torch.rand(B, T, generator=g) > 0.3
        if layout == "empty_row":
            m[0] = False
    r[~m] = 1e6  # masked rewards/values must never be read
    v[~m] = -1e6
    gamma = draw(st.sampled_from([1.0, 0.99, 0.5]))
    lam = draw(st.sampled_from([1.0, 0.95, 0.0]))
    critic_lam = draw(st.sampled_from([None, 1.0, 0.9]))
    return r, v, m, gamma, lam, critic_lam


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@given(data=gae_inputs(), packed=st.booleans())
def test_gae_matches_python_loop(backend, dtype, data, packed):
    r, v, m, gamma, lam, critic_lam = data
    r, v = r.to(dtype), v.to(dtype)
    if packed:
        lengths = torch.randint(0, r.shape[1] + 1, (r.shape[0],), generator=torch.Generator().manual_seed(0))
        keep = torch.arange(r.shape[1])[None] < lengths[:, None]
        cu = torch.zeros(r.shape[0] + 1, dtype=torch.int64)
        cu[1:] = lengths.cumsum(0)
        adv, ret = ao.gae_advantages(*to(device_of(backend), r[keep], v[keep], m[keep]), gamma, lam,
                                     critic_lam=critic_lam, cu_seqlens=cu.to(device_of(backend)), backend=backend)
        rows = [(r[b, :lengths[b]], v[b, :lengths[b]], m[b, :lengths[b]]) for b in range(r.shape[0])]
    else:
        adv, ret = ao.gae_advantages(*to(device_of(backend), r, v, m), gamma, lam, critic_lam=critic_lam,
                                     backend=backend)
        rows = [(r[b], v[b], m[b]) for b in range(r.shape[0])]
    want_a, want_r = [], []
    for rb, vb, mb in rows:
        a, _ = oracle_gae(rb.double().tolist(), vb.double().tolist(), mb.tolist(), gamma, lam)
        _, rt = oracle_gae(rb.double().tolist(), vb.double().tolist(), mb.tolist(), gamma,
                           lam if critic_lam is None else critic_lam)
        want_a += a
        want_r += rt
    assert adv.dtype == dtype
    assert_close_scale(adv, want_a, dtype, "gae advantages")
    assert_close_scale(ret, want_r, dtype, "gae returns")


@pytest.mark.parametrize("backend", BACKENDS)
def test_gae_oracles(backend):
    g = torch.Generator().manual_seed(7)
    B, T = 4, 33
    v = torch.randn(B, T, generator=g, dtype=torch.float64)
    R = torch.randn(B, generator=g, dtype=torch.float64)
    m = torch.rand(B, T, generator=g) > 0.25
    tr = ao.token_level_rewards(R, m)
    dev = device_of(backend)

    def gae(tr_, v_, m_, *args, **kw):
        """gae_advantages on `dev` (the inputs given on CPU), its outputs back on CPU."""
        return to("cpu", *ao.gae_advantages(*to(dev, tr_, v_, m_), *args, backend=backend, **kw))
    # lambda = gamma = 1: A_t = R - V_t on every valid token
    adv, ret = gae(tr, v, m, 1.0, 1.0)
    torch.testing.assert_close(adv, torch.where(m, R[:, None] - v, 0.0))
    torch.testing.assert_close(ret, torch.where(m, R[:, None].expand(B, T), 0.0))
    # lambda = 0: A_t = r_t + V_next(t) - V_t
    adv0, _ = gae(tr, v, m, 1.0, 0.0)
    for b in range(B):
        idx = torch.nonzero(m[b]).flatten().tolist()
        for j, t in enumerate(idx):
            nv = v[b, idx[j + 1]].item() if j + 1 < len(idx) else 0.0
            assert abs(adv0[b, t].item() - (tr[b, t].item() + nv - v[b, t].item())) < 1e-12
    # decoupled GAE with equal lambdas reproduces plain GAE bit for bit
    a1, r1 = gae(tr, v, m, 0.99, 0.95)
    a2, r2 = gae(tr, v, m, 0.99, 0.95, critic_lam=0.95)
    assert torch.equal(a1, a2) and torch.equal(r1, r2)
    # per-row (VAPO) lambda equals running each row with its own scalar lambda
    lam = ao.vapo_lambda(m.sum(-1)).double()
    a3, _ = gae(tr, v, m, 1.0, lam.to(dev), critic_lam=1.0)
    for b in range(B):
        ab, _ = gae(tr[b:b + 1], v[b:b + 1], m[b:b + 1], 1.0, float(lam[b]))
        torch.testing.assert_close(a3[b], ab[0])
    # whitening after GAE: returns untouched, advantages whitened over valid tokens
    aw, rw = gae(tr, v, m, 0.99, 0.95, whiten=True)
    torch.testing.assert_close(rw, r1)
    torch.testing.assert_close(aw, ao.masked_whiten(a1, m))


# --------------------------------------------------------------------------------------------
# REINFORCE++, KL in reward, ReMax


@pytest.mark.parametrize("backend", BACKENDS)
def test_reinforce_pp(backend):
    g = torch.Generator().manual_seed(8)
    B, T = 6, 20
    scores = torch.randn(B, generator=g, dtype=torch.float64)
    lengths = torch.tensor([20, 5, 0, 13, 1, 9])
    m = torch.arange(T)[None] < lengths[:, None]
    m[0, 3] = False  # a hole
    old = torch.randn(B, T, generator=g, dtype=torch.float64)
    ref = torch.randn(B, T, generator=g, dtype=torch.float64)
    beta, gamma = 0.1, 0.9
    dev = device_of(backend)
    out = ao.reinforce_pp_advantages(*to(dev, scores, m), old_logp=old.to(dev), ref_logp=ref.to(dev), kl_coef=beta,
                                     gamma=gamma, backend=backend)
    out = type(out)(*to("cpu", *out))
    want_ret = torch.zeros(B, T, dtype=torch.float64)
    for b in range(B):
        idx = torch.nonzero(m[b]).flatten().tolist()
        G = 0.0
        for j in reversed(range(len(idx))):
            t = idx[j]
            rt = -beta * (old[b, t] - ref[b, t]).item() + (scores[b].item() if j == len(idx) - 1 else 0.0)
            G = rt + gamma * G
            want_ret[b, t] = G
    torch.testing.assert_close(out.returns, want_ret)
    flat = oracle_whiten(want_ret.flatten().tolist(), m.flatten().tolist())
    torch.testing.assert_close(out.advantages.flatten(), torch.tensor(flat, dtype=torch.float64))
    # the oracle of docs/methods.md 2.5: token-weighted mean 0, std 1
    a = out.advantages[m]
    assert abs(a.mean().item()) < 1e-12 and abs(a.std().item() - 1) < 1e-6
    # OpenRLHF semantics: biased variance, floor
    o = ao.reinforce_pp_advantages(*to(dev, scores, m), old_logp=old.to(dev), ref_logp=ref.to(dev), kl_coef=beta,
                                   gamma=gamma, var="biased", var_eps_mode="floor", backend=backend)
    flat_b = oracle_whiten(want_ret.flatten().tolist(), m.flatten().tolist(), False, 1e-8, "floor")
    torch.testing.assert_close(o.advantages.cpu().flatten(), torch.tensor(flat_b, dtype=torch.float64))
    # packed layout gives the same
    cu = torch.zeros(B + 1, dtype=torch.int64)
    cu[1:] = lengths.cumsum(0)
    keep = torch.arange(T)[None] < lengths[:, None]
    p = ao.reinforce_pp_advantages(*to(dev, scores, m[keep]), cu_seqlens=cu.to(dev), old_logp=old[keep].to(dev),
                                   ref_logp=ref[keep].to(dev), kl_coef=beta, gamma=gamma, backend=backend)
    torch.testing.assert_close(p.advantages.cpu(), out.advantages[keep])


@pytest.mark.parametrize("backend", BACKENDS)
def test_reinforce_pp_baseline(backend):
    g = torch.Generator().manual_seed(9)
    B, G, T = 16, 4, 10
    scores = (torch.rand(B, generator=g) > 0.5).double()
    m = torch.ones(B, T, dtype=torch.bool)
    out = ao.reinforce_pp_baseline_advantages(*to(device_of(backend), scores, m), G, backend=backend)
    out = type(out)(*to("cpu", *out))
    c = (scores.view(-1, G) - scores.view(-1, G).mean(1, keepdim=True)).flatten()
    # equal lengths, no KL: (R - mean_g) / token-level std of (R - mean_g)
    tok = c[:, None].expand(B, T)
    want = (tok - tok.mean()) / (tok.std() ** 2 + 1e-8).sqrt()
    torch.testing.assert_close(out.advantages, want)
    torch.testing.assert_close(out.returns, tok.contiguous())


def test_kl_helpers():
    old = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -0.5]])
    ref = torch.tensor([[-1.5, -1.0, -3.0], [-0.5, -1.5, -9.0]])
    m = torch.tensor([[1, 1, 0], [1, 1, 1]])
    k1 = ao.k1_penalty(old, ref, m)
    assert k1.tolist() == [[0.5, -1.0, 0.0], [0.0, 1.0, 8.5]]
    tr = ao.token_level_rewards(torch.tensor([2.0, 3.0]), m, kl=k1, kl_coef=0.1)
    torch.testing.assert_close(tr, torch.tensor([[-0.05, 2.1, 0.0], [0.0, -0.1, 3.0 - 0.85]]))
    s = ao.kl_penalized_scores(torch.tensor([2.0, 3.0]), old, ref, m, kl_coef=0.1)
    torch.testing.assert_close(s, torch.tensor([2.0 + 0.05, 3.0 - 0.95]))


def test_adaptive_kl_controller():
    c = ao.AdaptiveKLController(0.1, target_kl=6.0, horizon=10000)
    assert abs(c.update(12.0, n_steps=100) - 0.1 * (1 + 0.2 * 100 / 10000)) < 1e-15  # clipped at +0.2
    v = c.value
    assert abs(c.update(torch.tensor(5.4, dtype=torch.float64), n_steps=256) - v * (1 - 0.1 * 256 / 10000)) < 1e-12
    assert ao.FixedKLController(0.05).update(100.0, 3) == 0.05
    with pytest.raises(ValueError, match="target_kl"):
        ao.AdaptiveKLController(0.1, target_kl=0.0, horizon=10)


def test_remax():
    r = torch.tensor([1.0, 0.5])
    b = torch.tensor([0.5, 0.5])
    assert ao.remax_advantages(r, b).tolist() == [0.5, 0.0]
    tr = torch.tensor([[0.0, 0.1, 1.0, 9.0], [0.2, 0.0, 0.3, 0.0]])
    m = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    out = ao.remax_advantages(tr, b, m)
    torch.testing.assert_close(out, torch.tensor([[0.6, 0.6, 0.5, 0.0], [0.0, -0.2, -0.2, -0.5]]))


# --------------------------------------------------------------------------------------------
# bad input


def test_bad_input():
    r = torch.tensor([1.0, 0.0, 1.0])
    with pytest.raises(ValueError, match="group_size=2 does not divide"):
        ao.grpo_advantages(r, 2)
    with pytest.raises(ValueError, match="single scorable reward"):
        ao.grpo_advantages(r, 1)
    with pytest.raises(ValueError, match="single scorable reward"):
        ao.rloo_advantages(torch.tensor([1.0, NAN, 0.0, 1.0]), 2)
    with pytest.raises(ValueError, match="single scorable reward"):
        ao.gvpo_centered_rewards(r, group_ids=torch.tensor([0, 0, 1]))
    with pytest.raises(ValueError, match="exactly one of group_size"):
        ao.grpo_advantages(r)
    with pytest.raises(ValueError, match="exactly one of group_size"):
        ao.grpo_advantages(r, 3, group_ids=torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="group_ids must have shape"):
        ao.grpo_advantages(r, group_ids=torch.zeros(4, dtype=torch.long))
    with pytest.raises(TypeError, match="group_ids must be an integer"):
        ao.grpo_advantages(r, group_ids=torch.zeros(3))
    with pytest.raises(ValueError, match=r"group_ids must lie in \[0, num_groups"):
        ao.grpo_advantages(r, group_ids=torch.tensor([0, 1, 5]), num_groups=2)
    with pytest.raises(ValueError, match="rewards contains infinite"):
        ao.grpo_advantages(torch.tensor([1.0, math.inf]), 2)
    with pytest.raises(ValueError, match="scores contains NaN"):
        ao.reinforce_pp_advantages(torch.tensor([NAN]), torch.ones(1, 3))
    with pytest.raises(ValueError, match="rewards must be a 1-d"):
        ao.grpo_advantages(torch.zeros(2, 2), 2)
    with pytest.raises(TypeError, match="rewards must be a torch.Tensor"):
        ao.grpo_advantages([1.0, 0.0], 2)
    with pytest.raises(ValueError, match="scale must be one of"):
        ao.grpo_advantages(r, 3, scale="global")
    with pytest.raises(ValueError, match="singleton must be one of"):
        ao.grpo_advantages(r, 3, singleton="ignore")
    with pytest.raises(ValueError, match="std_eps must be >= 0"):
        ao.grpo_advantages(r, 3, std_eps=-1.0)
    with pytest.raises(ValueError, match="values shape"):
        ao.gae_advantages(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="mask shape"):
        ao.gae_advantages(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(3, 2))
    with pytest.raises(ValueError, match="lam must be <= 1"):
        ao.gae_advantages(torch.zeros(2, 3), torch.zeros(2, 3), lam=1.5)
    with pytest.raises(ValueError, match=r"lam values must lie in \[0, 1\]"):
        ao.gae_advantages(torch.zeros(2, 3), torch.zeros(2, 3), lam=torch.tensor([0.5, -0.1]))
    with pytest.raises(ValueError, match="gamma must be"):
        ao.gae_advantages(torch.zeros(2, 3), torch.zeros(2, 3), gamma=math.nan)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0"):
        ao.gae_advantages(torch.zeros(5), torch.zeros(5), cu_seqlens=torch.tensor([0, 2, 4]))
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        ao.masked_whiten(torch.zeros(3), torch.tensor([0.0, 0.5, 1.0]))
    with pytest.raises(ValueError, match="var_eps_mode must be one of"):
        ao.masked_whiten(torch.zeros(3), var_eps_mode="outside")
    with pytest.raises(ValueError, match="semantic_entropy must be"):
        ao.seed_grpo_advantages(torch.zeros(4), torch.zeros(3), 2, alpha=1.0)
    with pytest.raises(ValueError, match="cache_length must lie"):
        ao.dapo_overlong_penalty(torch.tensor([1]), 100, 0)
    with pytest.raises(ValueError, match="stat_weighting='token' needs"):
        ao.dler_advantages(torch.zeros(4), 2)
    with pytest.raises(ValueError, match="process_group was given but torch.distributed"):
        ao.masked_whiten(torch.zeros(3), process_group=object())
    with pytest.raises(ValueError, match="backend must be one of"):
        ao.grpo_advantages(r, 3, backend="numpy")


@pytest.mark.parametrize("backend", BACKENDS)
def test_degenerate_inputs_are_finite(backend):
    dev = device_of(backend)
    empty = torch.zeros(0).to(dev)
    assert ao.grpo_advantages(empty, 4, backend=backend).numel() == 0
    assert ao.grpo_advantages(empty, group_ids=torch.zeros(0, dtype=torch.long).to(dev), backend=backend).numel() == 0
    allnan = torch.full((4,), NAN).to(dev)
    assert ao.grpo_advantages(allnan, 2, backend=backend).tolist() == [0.0] * 4
    assert ao.grpo_advantages(allnan, 2, scale="batch", backend=backend).tolist() == [0.0] * 4
    a, r = ao.gae_advantages(*to(dev, torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(2, 3)), whiten=True,
                             backend=backend)
    assert a.abs().sum().item() == 0 and r.abs().sum().item() == 0
    out = ao.reinforce_pp_advantages(*to(dev, torch.tensor([1.0, 2.0]), torch.zeros(2, 4)), backend=backend)
    assert torch.isfinite(out.advantages).all() and out.advantages.abs().sum().item() == 0
    assert ao.gpg_advantages(torch.ones(8).to(dev), 4, return_stats=True, backend=backend).alpha.item() == 0.0


@pytest.mark.skipif("triton" not in BACKENDS, reason="triton backend not available here")
def test_triton_long_rows_cross_tiles():
    # rows longer than the interpreter's 64-lane tile, with holes across tile boundaries; on
    # device_of("triton") (CUDA tensors where there is a GPU), the torch reference on CPU
    dev = device_of("triton")
    g = torch.Generator().manual_seed(11)
    B, T = 2, 300
    r = torch.randn(B, T, generator=g)
    v = torch.randn(B, T, generator=g)
    m = torch.rand(B, T, generator=g) > 0.5
    m[0, 60:200] = False  # a hole spanning whole tiles
    a_t, r_t = ao.gae_advantages(*to(dev, r, v, m), 0.99, 0.9, critic_lam=1.0, backend="triton")
    a_c, r_c = ao.gae_advantages(r.double(), v.double(), m, 0.99, 0.9, critic_lam=1.0, backend="torch")
    assert_close_scale(a_t, a_c, torch.float32, "triton gae")
    assert_close_scale(r_t, r_c, torch.float32, "triton returns")
    x = torch.randn(3000, generator=g) + 1000
    mx = torch.rand(3000, generator=g) > 0.1
    assert_close_scale(ao.masked_whiten(*to(dev, x, mx), backend="triton"),
                       oracle_whiten(x.double().tolist(), mx.tolist()), torch.float32, "triton whiten")
    big = torch.rand(200, generator=g)
    assert_close_scale(ao.grpo_advantages(big.to(dev), 100, backend="triton"),
                       oracle_group(big.double().tolist(), [i // 100 for i in range(200)])[0],
                       torch.float32, "triton group of 100")


# --------------------------------------------------------------------------------------------
# distributed: two CPU processes with gloo == one process with the whole batch


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dist_batch():
    g = torch.Generator().manual_seed(12)
    B, G, T = 16, 4, 9
    r = (torch.rand(B, generator=g) > 0.5).double() + 0.1 * torch.randn(B, generator=g, dtype=torch.float64)
    r[:4] = 1.0
    m = torch.rand(B, T, generator=g) > 0.3
    x = torch.randn(B, T, generator=g, dtype=torch.float64) + 3
    rsn = torch.rand(B, generator=g, dtype=torch.float64)
    return r, m, x, rsn, G


def _dist_stats(r, m, x, rsn, G, pg):
    out = {
        "grpo_batch": ao.grpo_advantages(r, G, scale="batch", process_group=pg, return_stats=True).batch_std,
        "whiten": ao.masked_whiten(x, m, process_group=pg),
        "mean": ao.masked_mean(x, m, process_group=pg),
        "var": ao.masked_var(x, m, process_group=pg),
        "dler": ao.dler_advantages(r, G, mask=m, process_group=pg),
        "gpg_alpha": ao.gpg_advantages(r, G, process_group=pg, return_stats=True).alpha,
        "awpo_clip": ao.awpo_advantages(r, rsn, G, process_group=pg).clip_low,
        "rpp": ao.reinforce_pp_advantages(r, m, process_group=pg).advantages,
    }
    return out


def _dist_worker(rank, world, port, outdir):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        r, m, x, rsn, G = _dist_batch()
        half = r.numel() // world
        sl = slice(rank * half, (rank + 1) * half)
        res = _dist_stats(r[sl], m[sl], x[sl], rsn[sl], G, dist.group.WORLD)
        torch.save(res, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_gloo_ranks_equal_one_process():
    import torch.multiprocessing as mp
    r, m, x, rsn, G = _dist_batch()
    whole = _dist_stats(r, m, x, rsn, G, None)
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_dist_worker, args=(2, _free_port(), d), nprocs=2, join=True)
        ranks = [torch.load(os.path.join(d, f"rank{k}.pt")) for k in range(2)]
    half = r.numel() // 2
    for key, want in whole.items():
        for k, got in enumerate(ranks):
            part = got[key]
            if want.dim() > 0:  # per-row outputs: this rank's rows of the whole-batch answer
                want_k = want[k * half:(k + 1) * half]
            else:  # global statistics: identical on every rank
                want_k = want
            torch.testing.assert_close(part, want_k, rtol=1e-12, atol=1e-12, msg=f"{key} rank {k}")


# --------------------------------------------------------------------------------------------
# OPO, GRPO pass@k, GDPO, the optimal token baseline (docs/methods.md §2.40-§2.43): float64
# oracles from the formulas there, plain Python loops


def _groups_of(group_of):
    groups = {}
    for i, g in enumerate(group_of):
        groups.setdefault(g, []).append(i)
    return groups


def oracle_opo(rewards, group_of, lengths, singleton):
    """A_i = R_i - sum_j L_j R_j / sum_j L_j over the group's scorable rows (§2.40)."""
    adv = [0.0] * len(rewards)
    for rows in _groups_of(group_of).values():
        ok = [i for i in rows if not math.isnan(rewards[i])]
        for i in ok:
            if len(ok) == 1:
                adv[i] = rewards[i] if singleton == "raw" else 0.0
                continue
            total = sum(lengths[j] for j in ok)
            if total > 0:
                b = sum(lengths[j] * rewards[j] for j in ok) / total
            else:  # no scorable row has a token: the plain mean
                b = sum(rewards[j] for j in ok) / len(ok)
            same = max(rewards[j] for j in ok) == min(rewards[j] for j in ok)
            adv[i] = 0.0 if same else rewards[i] - b
    return adv


def oracle_passk(rewards, group_of, scale, eps, singleton):
    """A_i = max_j R_j - max_{j != i} R_j (leave-one-out pass@k with k = the group), / (std_g + eps)
    with scale="group" (§2.41)."""
    adv = [0.0] * len(rewards)
    for rows in _groups_of(group_of).values():
        ok = [i for i in rows if not math.isnan(rewards[i])]
        vals = [rewards[i] for i in ok]
        k = len(vals)
        if k == 1:
            adv[ok[0]] = vals[0] if singleton == "raw" else 0.0
            continue
        mean = sum(vals) / k if k else 0.0
        std = math.sqrt(sum((x - mean) ** 2 for x in vals) / (k - 1)) if k > 1 else 0.0
        for n, i in enumerate(ok):
            a = max(vals) - max(vals[:n] + vals[n + 1:])
            adv[i] = a / (std + eps) if (scale == "group" and a != 0) else a
    return adv


def oracle_weighted_whiten(x, w, unbiased, eps, eps_mode):
    """(x - mean) / sqrt(var (+) eps) with per-row weights w (token counts); N = sum w <= 1 or a zero
    denominator centre only (§2.42, masked_whiten's rule on the broadcast tokens)."""
    n = sum(w)
    mean = sum(a * b for a, b in zip(x, w)) / n if n > 0 else 0.0
    m2 = sum(b * (a - mean) ** 2 for a, b in zip(x, w))
    d = (n - 1) if unbiased else n
    var = m2 / d if d > 0 else 0.0
    den = var + eps if eps_mode == "add_inside" else max(var, eps)
    inv = 1 / math.sqrt(den) if (n > 1 and den > 0) else 1.0
    return [(a - mean) * inv for a in x]


def oracle_gdpo(rewards, group_of, weights, lengths, scale, eps, singleton, var, var_eps, eps_mode):
    """sum_k w_k GRPO_k (each component normalised in its group on its own), then whitened over the
    batch, token-weighted by `lengths` (row-weighted when None); rows with every component NaN are
    left out and get 0 (§2.42)."""
    b, k = len(rewards), len(rewards[0])
    total = [0.0] * b
    for j in range(k):
        col, _ = oracle_group([row[j] for row in rewards], group_of, "scale" if scale == "group" else "center",
                              eps, singleton)
        total = [t + weights[j] * a for t, a in zip(total, col)]
    scorable = [not all(math.isnan(x) for x in row) for row in rewards]
    w = [(1.0 if lengths is None else lengths[i]) if scorable[i] else 0.0 for i in range(b)]
    out = oracle_weighted_whiten(total, w, var == "unbiased", var_eps, eps_mode)
    return [o if s else 0.0 for o, s in zip(out, scorable)], total, w


def oracle_otb(r, old, s2, rho, m, group_of, align, zero_tail, eps, singleton):
    """A_t = G_t - B_{g,t} (§2.43): G the return-to-go over valid tokens, W_t the running sum of
    max(1 - 2 exp(old) + s2, 0) rho^2 over valid tokens, B = (sum G W + eps Gbar) / (sum W + eps)
    over the group's rows valid at index t (column, or k-th valid token); zero tail: B = 0 where one
    row of a group with two or more rows with tokens reaches t; a group with one such row follows
    `singleton`. Returns (advantages, returns) as [B][T] lists."""
    b, t = len(r), len(r[0])
    ret = [[0.0] * t for _ in range(b)]
    cum = [[0.0] * t for _ in range(b)]
    at = [dict() for _ in range(b)]  # index -> column
    for i in range(b):
        run = 0.0
        for c in range(t - 1, -1, -1):
            if m[i][c]:
                run += r[i][c]
                ret[i][c] = run
        acc, k = 0.0, 0
        for c in range(t):
            if m[i][c]:
                w = max(1 - 2 * math.exp(old[i][c]) + s2[i][c], 0.0) * (1.0 if rho is None else rho[i][c] ** 2)
                acc += w
                cum[i][c] = acc
                at[i][c if align == "position" else k] = c
                k += 1
    adv = [[0.0] * t for _ in range(b)]
    for rows in _groups_of(group_of).values():
        members = [i for i in rows if at[i]]
        for idx in range(t):
            here = [i for i in members if idx in at[i]]
            if not here:
                continue
            gs = [ret[i][at[i][idx]] for i in here]
            ws = [cum[i][at[i][idx]] for i in here]
            if len(members) == 1:
                base = 0.0 if singleton == "raw" else gs[0]
            elif zero_tail and len(here) == 1:
                base = 0.0
            else:
                gbar = gs[0] if max(gs) == min(gs) else sum(gs) / len(gs)
                den = sum(ws) + eps
                base = (sum(g * w for g, w in zip(gs, ws)) + eps * gbar) / den if den > 0 else gbar
            for i, g in zip(here, gs):
                adv[i][at[i][idx]] = g - base
    return adv, ret


@st.composite
def rows_with_lengths(draw):
    rewards, ids = draw(grouped_rewards(max_groups=8, max_size=12))
    lengths = draw(st.lists(st.integers(0, 30), min_size=len(rewards), max_size=len(rewards)))
    if draw(st.booleans()):  # a group whose rows have no token at all
        lengths = [0 if g == ids[0] else n for n, g in zip(lengths, ids)]
    return rewards, ids, lengths


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=rows_with_lengths(), dtype=st.sampled_from([torch.float32, torch.float64]),
       singleton=st.sampled_from(["zero", "raw"]), as_mask=st.booleans())
@example(data=([0.11, 0.11, 0.11, 2.0, 1.0], [4, 4, 4, 9, 9], [3, 1, 7, 0, 0]), dtype=torch.float32,
         singleton="zero", as_mask=True)
def test_opo_matches_oracle(backend, data, dtype, singleton, as_mask):
    rewards, ids, lengths = data
    r = torch.tensor(rewards, dtype=dtype)
    want = oracle_opo(r.double().tolist(), ids, lengths, singleton)
    L = torch.tensor(lengths)
    kw = dict(mask=(torch.arange(31) < L[:, None])) if as_mask else dict(lengths=L.to(dtype))
    dev = device_of(backend)
    kw = {k: v.to(dev) for k, v in kw.items()}
    out = ao.opo_advantages(r.to(dev), group_ids=torch.tensor(ids).to(dev), singleton=singleton, backend=backend,
                            **kw)
    assert out.dtype == dtype
    assert_close_scale(out, want, dtype, "opo")
    # equal rewards (and NaN rows) give exactly 0, not rounding noise
    for i, a in enumerate(want):
        if a == 0.0:
            assert out[i].item() == 0.0, (i, out[i].item())


def test_opo_worked_vectors():
    # b = (1*1 + 3*0) / 4 = 0.25 with lengths [1, 3]: A = [0.75, -0.25]; equal lengths: RLOO's centring
    r = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    out = ao.opo_advantages(r, 2, lengths=torch.tensor([1, 3, 2, 2]))
    assert out.tolist() == [0.75, -0.25, 0.5, -0.5]
    with pytest.raises(ValueError, match="single scorable reward"):
        ao.opo_advantages(r, 1, lengths=torch.ones(4))
    assert ao.opo_advantages(r, 1, lengths=torch.ones(4), singleton="raw").tolist() == r.tolist()
    with pytest.raises(ValueError, match="exactly one of mask"):
        ao.opo_advantages(r, 2)
    with pytest.raises(ValueError, match="lengths must be >= 0"):
        ao.opo_advantages(r, 2, lengths=torch.tensor([1.0, -1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"mask must be \[B, T\]"):
        ao.opo_advantages(r, 2, mask=torch.ones(3, 5))


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=grouped_rewards(max_groups=8, max_size=12), dtype=st.sampled_from([torch.float32, torch.float64]),
       scale=st.sampled_from(["group", "none"]), singleton=st.sampled_from(["zero", "raw"]))
@example(data=([1.0, 1.0, 0.0, 0.3, 0.3, 0.3], [0, 0, 0, 1, 1, 1]), dtype=torch.float64, scale="group",
         singleton="zero")
def test_grpo_passk_matches_oracle(backend, data, dtype, scale, singleton):
    rewards, ids = data
    r = torch.tensor(rewards, dtype=dtype)
    want = oracle_passk(r.double().tolist(), ids, scale, 1e-6, singleton)
    dev = device_of(backend)
    out = ao.grpo_passk_advantages(r.to(dev), group_ids=torch.tensor(ids).to(dev), scale=scale, singleton=singleton,
                                   backend=backend)
    assert out.dtype == dtype
    assert_close_scale(out, want, dtype, "grpo_passk")
    for i, a in enumerate(want):  # every row but a group's unique best gets exactly 0
        if a == 0.0:
            assert out[i].item() == 0.0, (i, out[i].item())


def test_grpo_passk_worked_vectors():
    r = torch.tensor([0.2, 0.9, 0.9, 0.5, 1.0, 0.0], dtype=torch.float64)
    # group 0: a tied maximum -> all 0; group 1: only the best row, R_max - R_second = 1.0 - 0.5
    assert ao.grpo_passk_advantages(r, 3, scale="none").tolist() == [0.0, 0.0, 0.0, 0.0, 0.5, 0.0]
    # std of [0.5, 1, 0] is 0.5 (unbiased)
    assert ao.grpo_passk_advantages(r, 3)[4].item() == pytest.approx(0.5 / (0.5 + 1e-6), rel=1e-12)
    with pytest.raises(ValueError, match="single scorable reward"):
        ao.grpo_passk_advantages(r, 1)
    with pytest.raises(ValueError, match="scale must be one of"):
        ao.grpo_passk_advantages(r, 3, scale="batch")
    with pytest.raises(ValueError, match="std_eps must be >= 0"):
        ao.grpo_passk_advantages(r, 3, std_eps=-1.0)


@st.composite
def multi_rewards(draw):
    sizes = draw(st.lists(st.integers(1, 8), min_size=1, max_size=6))
    k = draw(st.integers(1, 3))
    b = sum(sizes)
    cols = []
    for _ in range(k):
        kind = draw(st.sampled_from(["binary", "normal", "constant", "shifted"]))
        col = []
        for _ in range(b):
            x = draw(st.floats(-3, 3, allow_nan=False, allow_infinity=False, width=32))
            col.append({"binary": float(x > 0), "normal": x, "constant": 0.1, "shifted": 1000 + x}[kind])
        if draw(st.booleans()):
            for i in draw(st.lists(st.integers(0, b - 1), max_size=max(1, b // 4))):
                col[i] = NAN
        cols.append(col)
    rewards = [[cols[j][i] for j in range(k)] for i in range(b)]
    group_of = [g for g, s in enumerate(sizes) for _ in range(s)]
    perm = draw(st.permutations(range(b)))
    rewards, ids = [rewards[p] for p in perm], [5 * group_of[p] + 1 for p in perm]
    weights = draw(st.sampled_from([None, [0.5, 2.0, 1.0][:k]]))
    lengths = draw(st.sampled_from([None, "mask", "lengths"]))
    lens = draw(st.lists(st.integers(0, 9), min_size=b, max_size=b))
    return rewards, ids, weights, lengths, lens


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=multi_rewards(), dtype=st.sampled_from([torch.float32, torch.float64]),
       scale=st.sampled_from(["group", "none"]), singleton=st.sampled_from(["zero", "raw"]),
       var=st.sampled_from(["unbiased", "biased"]), eps_mode=st.sampled_from(["add_inside", "floor"]))
@example(data=([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], [0, 0, 1, 1], None, "mask", [3, 1, 0, 2]),
         dtype=torch.float32, scale="group", singleton="zero", var="unbiased", eps_mode="add_inside")
def test_gdpo_matches_oracle(backend, data, dtype, scale, singleton, var, eps_mode):
    rewards, ids, weights, how, lens = data
    r = torch.tensor(rewards, dtype=dtype)
    rd = r.double().tolist()
    lengths = None if how is None else [float(x) for x in lens]
    want, total, w = oracle_gdpo(rd, ids, [1.0] * r.shape[1] if weights is None else weights, lengths, scale, 1e-6,
                                 singleton, var, 1e-8, eps_mode)
    dev = device_of(backend)
    kw = {}
    if how == "mask":
        kw["mask"] = (torch.arange(10) < torch.tensor(lens)[:, None]).to(dev)
    elif how == "lengths":
        kw["lengths"] = torch.tensor(lens).to(dev)
    out = ao.gdpo_advantages(r.to(dev), group_ids=torch.tensor(ids).to(dev), weights=weights, scale=scale,
                             singleton=singleton, var=var, var_eps_mode=eps_mode, backend=backend, **kw)
    assert out.dtype == dtype and out.shape == (r.shape[0],)
    # the whitening amplifies the float64 rounding of x - mean by |x| / spread (as masked_whiten's test)
    n = sum(w)
    mean = sum(a * b for a, b in zip(total, w)) / n if n > 0 else 0.0
    spread = math.sqrt(sum(b * (a - mean) ** 2 for a, b in zip(total, w)) / n) if n > 0 else 0.0
    cond = max((abs(a) for a, b in zip(total, w) if b > 0), default=0.0) / spread * 1e-5 if spread > 0 else 1.0
    assert_close_scale(out, want, dtype, "gdpo", cond=cond)
    if all(a == 0.0 for a in total):  # every component's rewards equal within its groups: exactly 0
        assert (out == 0).all()


def test_gdpo_worked_vectors():
    # one component: GRPO's advantages, then whitened (row-weighted here, as no mask is given)
    r = torch.tensor([1.0, 0, 0, 0, 1, 1, 0, 0], dtype=torch.float64)
    grpo = ao.grpo_advantages(r, 4)
    want = (grpo - grpo.mean()) / (grpo.var() + 1e-8).sqrt()
    torch.testing.assert_close(ao.gdpo_advantages(r, 4), want, rtol=1e-12, atol=1e-12)
    # two components normalised apart: [1, 0] and [10, 0] rewards weigh the same, where GRPO on the
    # summed reward [11, 0] would not tell them from [1, 0] alone
    two = torch.tensor([[1.0, 10.0], [0.0, 0.0], [1.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    a = ao.gdpo_advantages(two, 2)
    assert a[0].item() == pytest.approx(-a[1].item()) and a[2].item() == pytest.approx(-a[3].item())
    # rows 2, 3: +-0.5 / (0.707 + eps) from one component, -+5 / (7.07 + eps) from the other: 0 up to eps
    assert a[0].item() > 0 and a[2].item() == pytest.approx(0.0, abs=1e-5)
    # equal rewards everywhere: exactly 0
    assert ao.gdpo_advantages(torch.full((6, 2), 0.3), 3).tolist() == [0.0] * 6
    with pytest.raises(ValueError, match="weights must hold one weight per reward component"):
        ao.gdpo_advantages(two, 2, weights=[1.0])
    with pytest.raises(ValueError, match=r"rewards must be \[B, K\]"):
        ao.gdpo_advantages(torch.zeros(2, 2, 2), 2)
    with pytest.raises(ValueError, match="at least one component"):
        ao.gdpo_advantages(torch.zeros(4, 0), 2)
    with pytest.raises(ValueError, match="weights contains NaN"):
        ao.gdpo_advantages(two, 2, weights=[1.0, NAN])
    with pytest.raises(ValueError, match="not both"):
        ao.gdpo_advantages(two, 2, mask=torch.ones(4, 3), lengths=torch.ones(4))
    with pytest.raises(ValueError, match="var_eps_mode must be one of"):
        ao.gdpo_advantages(two, 2, var_eps_mode="outside")
    with pytest.raises(TypeError, match="'var_eps'"):
        ao.gdpo_advantages(two, 2, eps=1e-8)


@st.composite
def otb_inputs(draw):
    b = draw(st.integers(1, 10))
    t = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    ids = draw(st.lists(st.integers(0, 3), min_size=b, max_size=b))
    m = torch.rand(b, t, generator=gen) < draw(st.sampled_from([0.6, 1.0]))
    if draw(st.booleans()):  # right padding only
        m = torch.arange(t) < torch.randint(0, t + 1, (b, 1), generator=gen)
    kind = draw(st.sampled_from(["outcome", "dense", "equal"]))
    if kind == "equal":  # every row of a group gets the same reward on each of its last tokens
        r = torch.zeros(b, t, dtype=torch.float64)
        for i in range(b):
            valid = m[i].nonzero()
            if len(valid):
                r[i, valid[-1]] = 0.11 * (1 + ids[i])  # inexact in binary: a mean by sum / n would round
    else:
        r = torch.randn(b, t, generator=gen, dtype=torch.float64)
        if kind == "outcome":
            r = torch.where(torch.arange(t) == t - 1, r, 0.0)
    pi = torch.rand(b, t, generator=gen, dtype=torch.float64)
    pi = torch.where(torch.rand(b, t, generator=gen) < 0.2, 1.0, pi)  # deterministic tokens: w = 0
    old = pi.log()
    s2 = pi ** 2 + torch.rand(b, t, generator=gen, dtype=torch.float64) * (1 - pi) ** 2  # a distribution's sum p^2
    rho = torch.rand(b, t, generator=gen, dtype=torch.float64) * 2 if draw(st.booleans()) else None
    return r, old, s2, rho, m, ids, kind


@given(data=otb_inputs(), dtype=st.sampled_from([torch.float32, torch.float64]),
       align=st.sampled_from(["position", "valid"]), zero_tail=st.booleans(),
       weight_eps=st.sampled_from([1e-8, 0.0, 0.5]), singleton=st.sampled_from(["zero", "raw"]))
def test_optimal_token_baseline_matches_oracle(data, dtype, align, zero_tail, weight_eps, singleton):
    r, old, s2, rho, m, ids, kind = data
    r, old, s2 = r.to(dtype), old.to(dtype), s2.to(dtype)
    rho = None if rho is None else rho.to(dtype)
    want, want_ret = oracle_otb(r.double().tolist(), old.double().tolist(), s2.double().tolist(),
                                None if rho is None else rho.double().tolist(), m.tolist(), ids, align, zero_tail,
                                weight_eps, singleton)
    out = ao.optimal_token_baseline_advantages(r, old, s2, m, group_ids=torch.tensor(ids), rollout_is_weights=rho,
                                               align=align, zero_tail=zero_tail, weight_eps=weight_eps,
                                               singleton=singleton)
    assert out.advantages.dtype == dtype and out.returns.dtype == dtype
    assert_close_scale(out.advantages, want, dtype, "otb advantages")
    assert_close_scale(out.returns, want_ret, dtype, "otb returns")
    assert (out.advantages[~m] == 0).all() and (out.returns[~m] == 0).all()
    if kind == "equal" and not zero_tail and singleton == "zero":
        # every row of a group has the same return at every index: exactly 0, not eps-sized
        assert (out.advantages == 0).all(), out.advantages


def test_optimal_token_baseline_worked_vectors():
    # two rows, outcome 1 and 0, every token with w = 1 - 2 pi + sum pi^2 = 0.5 (pi = 0.5, sum pi^2 = 0.5):
    # W_t = 0.5 (t + 1) is the same for both, so B_t = 1/2 and A = +-1/2 (eps aside)
    r = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    old = torch.full((2, 3), math.log(0.5), dtype=torch.float64)
    s2 = torch.full((2, 3), 0.5, dtype=torch.float64)
    out = ao.optimal_token_baseline_advantages(r, old, s2, None, 2, weight_eps=0.0)
    assert out.advantages.tolist() == [[0.5] * 3, [-0.5] * 3]
    assert out.returns.tolist() == [[1.0] * 3, [0.0] * 3]
    # row 0 longer than row 1: its tail has no peer; with zero_tail its baseline there is 0 (A = G)
    m = torch.tensor([[1, 1, 1], [1, 0, 0]])
    a = ao.optimal_token_baseline_advantages(r, old, s2, m, 2, weight_eps=0.0).advantages
    assert a.tolist() == [[0.5, 1.0, 1.0], [-0.5, 0.0, 0.0]]
    a = ao.optimal_token_baseline_advantages(r, old, s2, m, 2, weight_eps=0.0, zero_tail=False).advantages
    assert a.tolist() == [[0.5, 0.0, 0.0], [-0.5, 0.0, 0.0]]
    # rollout IS weights scale w by rho^2: rho = [2, 1] weighs row 0 four times -> B = 4/5
    rho = torch.tensor([[2.0] * 3, [1.0] * 3], dtype=torch.float64)
    a = ao.optimal_token_baseline_advantages(r, old, s2, None, 2, weight_eps=0.0, rollout_is_weights=rho).advantages
    torch.testing.assert_close(a, torch.tensor([[0.2] * 3, [-0.8] * 3], dtype=torch.float64))
    # a masked span: align="position" compares columns, align="valid" the k-th valid tokens
    m = torch.tensor([[1, 0, 1], [1, 1, 0]])
    r2 = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    pos = ao.optimal_token_baseline_advantages(r2, old, s2, m, 2, weight_eps=0.0).advantages
    val = ao.optimal_token_baseline_advantages(r2, old, s2, m, 2, weight_eps=0.0, align="valid").advantages
    assert pos.tolist() == [[0.5, 0.0, 1.0], [-0.5, 0.0, 0.0]]  # column 1 and 2 have one row each
    assert val.tolist() == [[0.5, 0.0, 0.5], [-0.5, -0.5, 0.0]]
    # ten equal returns of 0.11 (their sum / 10 is 0.10999999999999999): exactly 0, not rounding noise
    tens = torch.zeros(10, 4, dtype=torch.float64)
    tens[:, -1] = 0.11
    g10 = torch.Generator().manual_seed(3)
    p10 = torch.rand(10, 4, generator=g10, dtype=torch.float64)
    a = ao.optimal_token_baseline_advantages(tens, p10.log(), p10 ** 2 + (1 - p10) ** 2 / 3, None, 10).advantages
    assert (a == 0).all(), a
    # all tokens deterministic (W = 0): the plain mean at every index, never 0 / eps
    one = torch.zeros(2, 3, dtype=torch.float64)
    a = ao.optimal_token_baseline_advantages(r, one, torch.ones(2, 3, dtype=torch.float64), None, 2).advantages
    assert a.tolist() == [[0.5] * 3, [-0.5] * 3]


def test_optimal_token_baseline_bad_input():
    r, old, s2 = torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 3)
    with pytest.raises(ValueError, match="single row with valid tokens"):
        ao.optimal_token_baseline_advantages(r, old, s2, torch.tensor([[1, 1, 0], [0, 0, 0]]), 2)
    with pytest.raises(ValueError, match="align must be one of"):
        ao.optimal_token_baseline_advantages(r, old, s2, None, 2, align="turn")
    with pytest.raises(ValueError, match="weight_eps must be >= 0"):
        ao.optimal_token_baseline_advantages(r, old, s2, None, 2, weight_eps=-1.0)
    with pytest.raises(TypeError, match="zero_tail must be a bool"):
        ao.optimal_token_baseline_advantages(r, old, s2, None, 2, zero_tail=1)
    with pytest.raises(ValueError, match="sum_pi_squared shape"):
        ao.optimal_token_baseline_advantages(r, old, torch.ones(2, 4), None, 2)
    with pytest.raises(ValueError, match=r"token_rewards must be \[B, T\]"):
        ao.optimal_token_baseline_advantages(torch.zeros(6), torch.zeros(6), torch.ones(6), None, 2)
    with pytest.raises(ValueError, match="sum_pi_squared must be >= 0"):
        ao.optimal_token_baseline_advantages(r, old, -s2, None, 2)
    with pytest.raises(ValueError, match="old_logp contains NaN"):
        ao.optimal_token_baseline_advantages(r, torch.full((2, 3), NAN), s2, None, 2)
    # NaN where the mask is 0 is never read
    out = ao.optimal_token_baseline_advantages(r, torch.tensor([[0.0, 0, NAN]] * 2), s2, torch.tensor([[1, 1, 0]] * 2),
                                               2)
    assert torch.isfinite(out.advantages).all()
    with pytest.raises(ValueError, match="rollout_is_weights shape"):
        ao.optimal_token_baseline_advantages(r, old, s2, None, 2, rollout_is_weights=torch.ones(3))
