"""rollout_correction (docs/methods.md §1.15): a float64 oracle written here from the math, parity with
verl 0.9.1's rollout_corr_helper (called directly) and with TRL 1.16's GRPOTrainer formula, the
rollout_logp= route of the three policy losses, and the nasty inputs (sequence products that
overflow in linear space, empty rows, a fully masked batch, equal log-probs)."""

from __future__ import annotations

import math

import pytest
import torch

import alignops as ao
from alignops.rollout_correction import REJECTION_CRITERIA
from tests.conftest import require_framework

F64 = torch.float64


def _data(B=6, T=9, *, seed=0, scale=0.3, dtype=F64, empty_rows=(), p_masked=0.2, spikes=0):
    """old, rollout log-probs and a mask with a masked-in first token in every row but `empty_rows`;
    `spikes` first tokens of the first rows get log-ratios 1.5 and -1.5 (the bounds are reached)."""
    g = torch.Generator().manual_seed(seed)
    old = -torch.rand(B, T, generator=g, dtype=F64) * 3
    roll = old + torch.randn(B, T, generator=g, dtype=F64) * scale
    roll[:spikes, 0] = old[:spikes, 0] - 1.5 * (1 - 2 * (torch.arange(spikes) % 2))
    mask = torch.rand(B, T, generator=g) > p_masked
    mask[:, 0] = True
    for i in empty_rows:
        mask[i] = False
    # garbage where masked out: it must never reach a weight or a metric
    old = torch.where(mask, old, torch.full_like(old, float("nan")))
    roll = torch.where(mask, roll, torch.full_like(roll, -1e30))
    return old.to(dtype), roll.to(dtype), mask


def _packed(old, roll, mask, seed=1):
    """The rows of padded [B, T] cut to random lengths and concatenated: (old, roll, mask, cu_seqlens)."""
    g = torch.Generator().manual_seed(seed)
    B, T = old.shape
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0] = T
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    cut = lambda x: torch.cat([x[i, :n] for i, n in enumerate(lengths.tolist())])  # noqa: E731
    return cut(old), cut(roll), cut(mask), cu


# --------------------------------------------------------------------------------------------
# the float64 oracle: plain Python over each row's tokens


def _rows(old, roll, mask, cu=None):
    """[(o, r, m) per token] per row, as Python floats."""
    o, r, m = old.double().tolist(), roll.double().tolist(), mask.tolist()
    if cu is None:
        return [list(zip(*row)) for row in zip(o, r, m)]
    bounds = cu.tolist()
    return [list(zip(o[a:b], r[a:b], m[a:b])) for a, b in zip(bounds, bounds[1:])]


def _exp(x):
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def _clamp(x, c):
    return x if c is None else min(max(x, -c), c)


def oracle_weights(rows, level, mode, low, high, clamp=20.0):
    """Per row, per token: the weight (0 where masked out)."""
    out = []
    for row in rows:
        d = [o - r if m else 0.0 for o, r, m in row]
        L = sum(1 for _, _, m in row if m)
        S = sum(d)
        row_w = []
        for t, (_, _, m) in enumerate(row):
            if not m:
                row_w.append(0.0)
                continue
            lw = {"token": d[t], "sequence": S, "geometric": S / L if L else 0.0}[level]
            raw = _exp(_clamp(lw, clamp))
            if mode == "truncate":
                w = raw if low is None else max(raw, low)
                w = w if high is None else min(w, high)
            else:
                inside = (low is None or raw >= low) and (high is None or raw <= high)
                w = raw if inside else 0.0
            row_w.append(w)
        out.append(row_w)
    return out


def oracle_keep(rows, criteria, clamp=20.0):
    """Per row, per token: kept by every rejection criterion (and masked in)."""
    out = []
    for row in rows:
        toks = [(_clamp(o - r, clamp), m) for o, r, m in row]
        keep = [bool(m) for _, m in toks]
        for name, spec in criteria.items():
            agg, est = name.rsplit("_", 1)
            stat = {"k1": lambda x: -x, "k2": lambda x: 0.5 * x * x, "k3": lambda x: math.expm1(x) - x}[est]
            if est == "k1":
                lo, hi = (1.0 / spec, spec) if isinstance(spec, float) else spec
                ok = lambda s: math.log(lo) <= s <= math.log(hi)  # noqa: E731
            else:
                ok = lambda s: s <= spec  # noqa: E731
            vals = [stat(x) for x, m in toks if m]
            if agg == "token":
                it = iter(vals)
                keep = [k and ok(next(it)) if m else k for k, (_, m) in zip(keep, toks)]
                continue
            if agg == "seq_sum":
                s = sum(vals)
            elif agg == "seq_mean":
                s = sum(vals) / len(vals) if vals else 0.0
            else:
                s = max(vals) if vals else 0.0
            if not ok(s):
                keep = [False] * len(keep)
        out.append(keep)
    return out


def _unpad(x, rows_like):
    """A padded [B, T] or packed [N] result as per-row lists of the rows' lengths."""
    flat = x.reshape(-1).tolist()
    out, i = [], 0
    for row in rows_like:
        if x.dim() == 2:
            out.append(x[len(out)].tolist()[:len(row)])
        else:
            out.append(flat[i:i + len(row)])
            i += len(row)
    return out


THRESHOLDS = [2.0, (0.5, 1.5), (0.8, None), (None, 1.2), None]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
@pytest.mark.parametrize("mode", ["truncate", "mask"])
@pytest.mark.parametrize("level", ["token", "sequence", "geometric"])
def test_weights_equal_the_float64_oracle(level, mode, packed):
    old, roll, mask = _data(empty_rows=(3,))
    cu = None
    if packed:
        old, roll, mask, cu = _packed(old, roll, mask)
    rows = _rows(old, roll, mask, cu)
    for threshold in THRESHOLDS:
        low, high = (None, threshold) if not isinstance(threshold, tuple) else threshold
        rc = ao.rollout_correction(old, roll, mask, level=level, mode=mode, threshold=threshold, cu_seqlens=cu)
        assert rc.rollout_is_weights.dtype == F64 and not rc.rollout_is_weights.requires_grad
        want = oracle_weights(rows, level, mode, low, high)
        got = _unpad(rc.rollout_is_weights, rows)
        for g_row, w_row in zip(got, want):
            assert g_row == pytest.approx(w_row, rel=1e-12, abs=0), (threshold, g_row, w_row)
        # the oracle's weights are not all at one bound: the data exercises the bounds it tests
        flat = [w for r, row in zip(want, rows) for w, (_, _, m) in zip(r, row) if m]
        if threshold is not None and level != "sequence":
            assert len(set(flat)) > 3
        assert rc.mask is mask or torch.equal(rc.mask, mask)


def test_fp32_and_bf16_inputs_compute_in_fp32():
    old, roll, mask = _data(dtype=torch.bfloat16)
    rows = _rows(old, roll, mask)
    for level in ("token", "sequence", "geometric"):
        rc = ao.rollout_correction(old, roll, mask, level=level, threshold=(0.7, 1.6))
        assert rc.rollout_is_weights.dtype == torch.float32
        want = oracle_weights(rows, level, "truncate", 0.7, 1.6)
        for g_row, w_row in zip(_unpad(rc.rollout_is_weights, rows), want):
            assert g_row == pytest.approx(w_row, rel=2e-6, abs=0)
        assert all(v.dtype == torch.float32 and v.dim() == 0 for v in rc.metrics.values())


REJECTIONS = [
    {"token_k1": 1.25},
    {"token_k2": 0.02, "seq_mean_k3": 0.03},
    {"seq_sum_k1": (0.4, 1.8)},
    {"seq_mean_k1": (0.9, 1.15), "token_k3": 0.05},
    {"seq_sum_k2": 0.1, "seq_max_k3": 0.06},
    {"seq_max_k2": 0.05, "seq_sum_k3": 0.15, "seq_mean_k2": 0.02},
]


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_rejection_mask_equals_the_oracle(packed):
    old, roll, mask = _data(B=10, scale=0.25, empty_rows=(2,))
    cu = None
    if packed:
        old, roll, mask, cu = _packed(old, roll, mask)
    rows = _rows(old, roll, mask, cu)
    seen = set()
    for rejection in REJECTIONS:
        rc = ao.rollout_correction(old, roll, mask, level=None, rejection=rejection, cu_seqlens=cu)
        assert rc.rollout_is_weights is None
        want = oracle_keep(rows, rejection)
        assert _unpad(rc.mask, rows) == want, rejection
        kept = sum(map(sum, want))
        assert 0 < kept < int(mask.sum()), f"{rejection}: the data keeps all or nothing ({kept})"
        seen.update(rejection)
    assert seen == set(REJECTION_CRITERIA)


def test_metrics_against_the_oracle():
    """A few metrics by hand, at the geometric level (which verl has no weights for)."""
    old, roll, mask = _data(B=5, scale=0.2)
    rows = _rows(old, roll, mask)
    rc = ao.rollout_correction(old, roll, mask, level="geometric", threshold=1.05)
    w = [x for r, row in zip(oracle_weights(rows, "geometric", "truncate", None, 1.05), rows)
         for x, (_, _, m) in zip(r, row) if m]
    d = [o - r for row in rows for o, r, m in row if m]
    geo = [sum(o - r for o, r, m in row if m) / sum(m for *_, m in row) for row in rows]
    want = {"rollout_is_mean": sum(w) / len(w),
            "rollout_is_ratio_fraction_high": sum(g > math.log(1.05) for g in geo) / len(geo),
            "rollout_is_ratio_fraction_low": sum(g < -math.log(1.05) for g in geo) / len(geo),
            "kl": -sum(d) / len(d),
            "k3_kl": sum(math.expm1(x) - x for x in d) / len(d),
            "chi2_token": sum(math.exp(2 * x) for x in d) / len(d) - 1,
            "chi2_seq": sum(math.exp(2 * sum(o - r for o, r, m in row if m)) for row in rows) / len(rows) - 1}
    for k, v in want.items():
        assert float(rc.metrics["rollout_corr/" + k]) == pytest.approx(v, rel=1e-6, abs=1e-7), k
    assert 0 < want["rollout_is_ratio_fraction_high"] < 1


# --------------------------------------------------------------------------------------------
# verl 0.9.1: verl/trainer/ppo/rollout_corr_helper.py, called on the same tensors


@pytest.fixture(scope="module")
def verl_rc():
    helper = require_framework("verl", "verl.trainer.ppo.rollout_corr_helper")
    from verl.trainer.config.algorithm import RolloutCorrectionConfig  # noqa: PLC0415
    return helper, RolloutCorrectionConfig


def _preset(cfg):
    return dict(rollout_is=cfg.rollout_is, rollout_is_threshold=cfg.rollout_is_threshold,
                rollout_is_batch_normalize=cfg.rollout_is_batch_normalize, rollout_rs=cfg.rollout_rs,
                rollout_rs_threshold=cfg.rollout_rs_threshold)


# (id, alignops options, verl: a RolloutCorrectionConfig preset name (with its defaults) or keywords,
#  noise scale of the data)
VERL_CASES = [
    ("config_defaults", dict(level="sequence"), "__init__", 0.1),
    ("weights_fn_defaults", dict(), dict(rollout_is="token"), 0.3),
    ("decoupled_token_is", dict(), "decoupled_token_is", 0.3),
    ("decoupled_seq_is", dict(level="sequence"), "decoupled_seq_is", 0.1),
    ("decoupled_token_icepop", dict(mode="mask", threshold=(0.5, 5.0)), "decoupled_token_icepop", 1.0),
    ("decoupled_seq_is_rs", dict(level="sequence", rejection={"seq_sum_k1": (0.5, 2.0)}), "decoupled_seq_is_rs", 0.1),
    ("decoupled_geo_rs", dict(level=None, rejection={"seq_mean_k1": (0.999, 1.001)}), "decoupled_geo_rs", 0.004),
    ("decoupled_k3_rs_token_tis", dict(rejection={"seq_mean_k3": 0.01}), "decoupled_k3_rs_token_tis", 0.15),
    ("decoupled_geo_rs_seq_tis", dict(level="sequence", rejection={"seq_mean_k1": (0.999, 1.001)}),
     "decoupled_geo_rs_seq_tis", 0.001),
    ("token_tis_5_batch_norm", dict(threshold=5.0, batch_normalize=True),
     dict(rollout_is="token", rollout_is_threshold=5.0, rollout_is_batch_normalize=True), 0.5),
    ("seq_icepop_batch_norm", dict(level="sequence", mode="mask", threshold=(0.6, 1.8), batch_normalize=True),
     dict(rollout_is="sequence", rollout_is_threshold="0.6_1.8", rollout_is_batch_normalize=True), 0.1),
    ("every_criterion", dict(threshold=1.5, rejection={
        "token_k1": 1.6, "token_k2": 0.2, "token_k3": 0.25, "seq_sum_k1": (0.2, 3.0), "seq_sum_k2": 0.8,
        "seq_sum_k3": 1.0, "seq_mean_k1": 1.3, "seq_mean_k2": 0.08, "seq_mean_k3": 0.09, "seq_max_k2": 0.3,
        "seq_max_k3": 0.35}),
     dict(rollout_is="token", rollout_is_threshold=1.5,
          rollout_rs="token_k1,token_k2,token_k3,seq_sum_k1,seq_sum_k2,seq_sum_k3,seq_mean_k1,seq_mean_k2,"
                     "seq_mean_k3,seq_max_k2,seq_max_k3",
          rollout_rs_threshold="1.6,0.2,0.25,0.2_3.0,0.8,1.0,1.3,0.08,0.09,0.3,0.35"), 0.3),
]


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("case", VERL_CASES, ids=[c[0] for c in VERL_CASES])
def test_equals_verl(verl_rc, case, dtype):
    helper, Config = verl_rc
    _, ours, theirs, scale = case
    if isinstance(theirs, str):
        theirs = _preset(Config() if theirs == "__init__" else getattr(Config, theirs)())
    old, roll, mask = _data(B=12, T=10, scale=scale, dtype=dtype, seed=3, spikes=4)
    old, roll = old.nan_to_num(0.0), roll.clamp(min=-50)  # verl reads the padding: keep it finite
    rc = ao.rollout_correction(old, roll, mask, **ours)
    w_proto, v_mask, v_metrics = helper.compute_rollout_correction_and_rejection_mask(
        old, roll, mask.to(dtype), **theirs)
    tol = dict(rtol=1e-12, atol=1e-14) if dtype == F64 else dict(rtol=2e-6, atol=1e-7)
    if theirs["rollout_is"] is None:
        assert w_proto is None and rc.rollout_is_weights is None
    else:
        torch.testing.assert_close(rc.rollout_is_weights, w_proto.batch["rollout_is_weights"].to(rc.rollout_is_weights.dtype),
                                   **(tol if dtype == torch.float32 else dict(rtol=1e-8, atol=1e-12)))
        w = rc.rollout_is_weights[mask]
        threshold = ours.get("threshold", 2.0)
        high = threshold[1] if isinstance(threshold, tuple) else threshold
        factor = float(v_metrics.get("rollout_corr/rollout_is_batch_norm_factor", 1.0))
        at = (w == 0) if ours.get("mode") == "mask" else torch.isclose(w, w.new_tensor(high / factor), rtol=1e-5)
        assert at.any() and not at.all(), "the data should reach the bound, and not only it"
    assert torch.equal(rc.mask, v_mask.bool())
    if theirs.get("rollout_rs") is not None:
        assert 0 < int(rc.mask.sum()) < int(mask.sum()), "the data should reject some tokens and keep some"
    assert set(rc.metrics) == set(v_metrics)
    for k, v in v_metrics.items():
        got = float(rc.metrics[k])
        assert got == pytest.approx(v, rel=2e-5 if dtype == torch.float32 else 1e-7, abs=1e-6), k


def test_verl_sequence_weight_overflow_matches(verl_rc):
    """Sequence products far beyond exp(88): verl clamps the log at 20, as alignops does by default."""
    helper, _ = verl_rc
    old, roll, mask = _data(B=4, T=50, scale=0.0, dtype=torch.float32)
    old = old.nan_to_num(0.0)
    roll = old - 4.0 * torch.tensor([1.0, -1.0, 0.0, 0.01])[:, None]
    for level, spec in (("sequence", 2.0), ("token", 2.0)):
        rc = ao.rollout_correction(old, roll, mask, level=level, threshold=spec)
        w, _ = helper.compute_rollout_correction_weights(old - roll, mask.float(), rollout_is=level,
                                                         rollout_is_threshold=spec)
        torch.testing.assert_close(rc.rollout_is_weights, w)
        assert torch.isfinite(rc.rollout_is_weights).all()


# --------------------------------------------------------------------------------------------
# TRL 1.16: GRPOTrainer's vLLM importance-sampling correction


def trl_importance_sampling_ratio(old, sampling, mask, mode, clip_min, clip_max):
    """TRL's formula, restated from trl/trainer/grpo_trainer.py (trl 1.16.0, lines 2660-2705, in
    GRPOTrainer._generate_and_score_completions; not callable on its own): the masked log-ratio,
    summed per row for sequence_* modes, exponentiated without a clamp, then clamped to
    [clip_min, clip_max] (*_truncate) or set to 0 outside it (*_mask)."""
    diff = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff)
    if mode.endswith("truncate"):
        ratio = torch.clamp(ratio, min=clip_min, max=clip_max)
    else:
        lo = clip_min if clip_min is not None else -math.inf
        hi = clip_max if clip_max is not None else math.inf
        ratio = ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)
    return ratio.expand_as(old)


# TRL's GRPOConfig defaults: vllm_importance_sampling_mode="sequence_mask", clip_max=3.0, clip_min=None
TRL_MODES = {"token_truncate": ("token", "truncate"), "token_mask": ("token", "mask"),
             "sequence_truncate": ("sequence", "truncate"), "sequence_mask": ("sequence", "mask")}


@pytest.mark.parametrize("clip", [(None, 3.0), (0.5, 3.0), (0.5, None)], ids=["trl_defaults", "min_max", "min_only"])
@pytest.mark.parametrize("trl_mode", list(TRL_MODES))
def test_equals_trl(trl_mode, clip):
    level, mode = TRL_MODES[trl_mode]
    old, roll, mask = _data(B=8, T=7, scale=0.6 if level == "token" else 0.35, dtype=torch.float32, seed=5)
    old, roll = old.nan_to_num(0.0), roll.clamp(min=-50)
    roll[-1] = old[-1] - 30.0  # a row whose product overflows exp in float32 (TRL: inf)
    roll[-2] = old[-2] + 30.0  # and one that underflows
    m = mask.float()
    want = trl_importance_sampling_ratio(old, roll, m, trl_mode, *clip)
    rc = ao.rollout_correction(old, roll, mask, level=level, mode=mode, threshold=clip, ratio_log_clamp=None)
    torch.testing.assert_close(rc.rollout_is_weights[mask], want[mask], rtol=2e-6, atol=0)
    assert torch.isfinite(rc.rollout_is_weights).all() or clip[1] is None
    w = want[mask]
    assert (w == 0).any() or mode == "truncate"
    assert len(w.unique()) > 3


# --------------------------------------------------------------------------------------------
# the rollout_logp= route of the policy losses


def _policy_inputs(seed=0, dtype=F64, B=4, T=6, V=11, H=5):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, H, generator=g, dtype=dtype)
    weight = torch.randn(V, H, generator=g, dtype=dtype)
    labels = torch.randint(0, V, (B, T), generator=g)
    logp0 = ao.token_logprobs(hidden @ weight.T, labels)
    old = logp0 + 0.1 * torch.randn(B, T, generator=g, dtype=dtype)
    roll = old + 0.3 * torch.randn(B, T, generator=g, dtype=dtype)
    adv = torch.randn(B, generator=g, dtype=dtype)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, 1] = False
    return hidden, weight, labels, logp0, old, roll, adv, mask


ROUTE_OPTIONS = [None, dict(level="sequence", threshold=1.5, rejection={"token_k2": 0.05}),
                 dict(level="geometric", mode="mask", threshold=(0.9, 1.1), batch_normalize=True)]


def _route_pair(fn, on_policy, options, grad_in_forward, backend="torch", dtype=F64, **kw):
    """(route output, manual output, route grads, manual grads, the correction)."""
    hidden, weight, labels, logp0, old, roll, adv, mask = _policy_inputs(dtype=dtype)
    o = None if on_policy else old
    trainer = logp0 if on_policy else old
    rc = ao.rollout_correction(trainer, roll, mask, **(options or {}))

    def run(**extra):
        if fn == "policy_loss":
            leaves = [logp0.clone().requires_grad_()]
            out = ao.policy_loss(leaves[0], o, adv, **extra, **kw)
        elif fn == "fused_policy_loss":
            leaves = [(hidden @ weight.T).requires_grad_()]
            out = ao.fused_policy_loss(leaves[0], labels, o, adv, grad_in_forward=grad_in_forward, backend=backend,
                                       **extra, **kw)
        else:
            leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_()]
            out = ao.fused_linear_policy_loss(*leaves, labels, o, adv, grad_in_forward=grad_in_forward,
                                              backend=backend, **extra, **kw)
        return out, torch.autograd.grad(out.loss, leaves)

    route, g_route = run(mask=mask, rollout_logp=roll, rollout_correction=options)
    manual, g_manual = run(mask=rc.mask, rollout_is_weights=rc.rollout_is_weights)
    return route, manual, g_route, g_manual, rc


ROUTES = [("policy_loss", False)] + [(fn, gif) for fn in ("fused_policy_loss", "fused_linear_policy_loss")
                                     for gif in (False, True)]


@pytest.mark.parametrize("on_policy", [False, True], ids=["old_logp", "on_policy"])
@pytest.mark.parametrize("fn,grad_in_forward", ROUTES, ids=[f"{fn}{'-grad_in_forward' * g}" for fn, g in ROUTES])
def test_route_equals_the_weights_passed_in(fn, on_policy, grad_in_forward):
    for options in ROUTE_OPTIONS:
        route, manual, g_route, g_manual, rc = _route_pair(fn, on_policy, options, grad_in_forward)
        torch.testing.assert_close(route.loss, manual.loss, rtol=1e-12, atol=1e-14)
        for a, b in zip(g_route, g_manual):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        assert set(route.metrics) == set(manual.metrics) | set(rc.metrics)
        for k, v in {**manual.metrics, **rc.metrics}.items():
            torch.testing.assert_close(route.metrics[k], v, rtol=1e-6, atol=1e-7)
        if options and "rejection" in options:
            assert 0 < int(rc.mask.sum()) < 20  # of the 20 masked-in tokens: some rejected, some kept
        # the route does change the loss: the weights are not all 1
        assert (rc.rollout_is_weights[rc.mask] != 1).any()


def test_route_one_launch_kernel(monkeypatch):
    """grad_in_forward on the cpu backend: the one-launch kernel takes the route's weights and mask."""
    if "cpu" not in ao.available_backends("cpu"):
        pytest.skip("the cpu backend is not built")
    from alignops.policy import fused  # noqa: PLC0415
    launches = []
    real = fused.terminal_one_launch
    monkeypatch.setattr(fused, "terminal_one_launch", lambda *a: launches.append(1) or real(*a))
    for fn in ("fused_policy_loss", "fused_linear_policy_loss"):
        route, manual, g_route, g_manual, _ = _route_pair(fn, False, ROUTE_OPTIONS[1], True, backend="cpu",
                                                          dtype=torch.float32, method="dapo")
        torch.testing.assert_close(route.loss, manual.loss)
        for a, b in zip(g_route, g_manual):
            torch.testing.assert_close(a, b)
    assert len(launches) == 4, "both calls of both functions run the one-launch kernel"


def test_route_packed_layout_and_all_masked():
    hidden, weight, labels, logp0, old, roll, adv, mask = _policy_inputs()
    cu = torch.tensor([0, 6, 9, 15, 24])
    flat = lambda x: x.reshape(-1)  # noqa: E731
    opts = dict(level="sequence", threshold=1.5, rejection={"token_k2": 0.05})
    rc = ao.rollout_correction(flat(old), flat(roll), flat(mask), cu_seqlens=cu, **opts)
    lp = flat(logp0).clone().requires_grad_()
    a = ao.policy_loss(lp, flat(old), adv, flat(mask), cu_seqlens=cu, rollout_logp=flat(roll), rollout_correction=opts)
    b = ao.policy_loss(lp, flat(old), adv, rc.mask, cu_seqlens=cu, rollout_is_weights=rc.rollout_is_weights)
    torch.testing.assert_close(a.loss, b.loss, rtol=1e-12, atol=0)
    none = torch.zeros_like(mask)
    out = ao.policy_loss(lp.view(4, 6), old, adv, none, rollout_logp=roll, rollout_correction=opts)
    (g,) = torch.autograd.grad(out.loss, lp)
    assert out.loss.item() == 0 and (g == 0).all()
    assert all(torch.isfinite(v) and v == 0 for k, v in out.metrics.items() if k.startswith("rollout_corr/"))


def test_route_errors():
    _, _, _, logp0, old, roll, adv, mask = _policy_inputs()
    with pytest.raises(ValueError, match="rollout_is_weights"):
        ao.policy_loss(logp0, old, adv, mask, rollout_logp=roll, rollout_is_weights=torch.ones_like(old))
    with pytest.raises(ValueError, match="rollout_logp"):
        ao.policy_loss(logp0, old, adv, mask, rollout_correction={"level": "token"})
    with pytest.raises(TypeError, match="rollout_correction.*bogus"):
        ao.policy_loss(logp0, old, adv, mask, rollout_logp=roll, rollout_correction={"bogus": 1})
    with pytest.raises(ValueError, match="level"):
        ao.fused_policy_loss(logp0[..., None].expand(4, 6, 3).contiguous(), torch.zeros(4, 6, dtype=torch.long), old,
                             adv, rollout_logp=roll, rollout_correction={"level": "row"})
    with pytest.raises(ValueError, match="rollout_logp"):
        ao.policy_loss(logp0, old, adv, mask, rollout_logp=roll[:, :-1])


# --------------------------------------------------------------------------------------------
# nasty inputs


def _all_finite(rc):
    bad = {k: float(v) for k, v in rc.metrics.items() if not torch.isfinite(v)}
    assert not bad, bad
    if rc.rollout_is_weights is not None:
        assert torch.isfinite(rc.rollout_is_weights).all()


@pytest.mark.parametrize("clamp", [20.0, None])
def test_sequence_products_that_overflow_in_linear_space(clamp):
    B, T = 4, 200
    old = torch.full((B, T), -1.0)
    roll = old - torch.tensor([5.0, -5.0, 0.5, -0.5])[:, None]  # row log-products +1000, -1000, +100, -100
    mask = torch.ones(B, T, dtype=torch.bool)
    assert torch.exp(torch.tensor(1000.0)).isinf()  # the products overflow float32 in linear space
    for mode in ("truncate", "mask"):
        rc = ao.rollout_correction(old, roll, mask, level="sequence", mode=mode, threshold=2.0, ratio_log_clamp=clamp)
        _all_finite(rc)
        w = rc.rollout_is_weights[:, 0]
        big = 2.0 if mode == "truncate" else 0.0
        assert w[0] == big and w[2] == big
        # exp(clamp(-1000)), exp(clamp(-100)) in float32 (without the clamp: 0 and a subnormal)
        small = torch.exp(torch.tensor([-1000.0, -100.0]).clamp(min=-clamp if clamp else -math.inf))
        torch.testing.assert_close(w[[1, 3]], small, rtol=1e-6, atol=0)
    rc = ao.rollout_correction(old, roll, mask, level="geometric", threshold=(0.1, 100.0), ratio_log_clamp=clamp)
    torch.testing.assert_close(rc.rollout_is_weights[:, 0], torch.tensor([100.0, 0.1, math.exp(0.5), math.exp(-0.5)]))
    rc = ao.rollout_correction(old, roll, mask, level="token", threshold=None,
                               rejection={"seq_sum_k1": 2.0, "seq_max_k3": 1.0})
    _all_finite(rc)
    assert rc.mask.sum() == 0  # every row is far out


def test_empty_rows_change_nothing():
    old, roll, mask = _data(B=5, T=8, scale=0.3, seed=7)
    opts = dict(level="sequence", threshold=1.5, rejection={"seq_mean_k1": 1.2, "token_k3": 0.05},
                batch_normalize=True)
    base = ao.rollout_correction(old, roll, mask, **opts)
    pad = lambda x, v: torch.cat([x[:2], torch.full_like(x[:2], v), x[2:]])  # noqa: E731
    more = ao.rollout_correction(pad(old, float("nan")), pad(roll, 7.0), pad(mask, False), **opts)
    assert set(base.metrics) == set(more.metrics)
    for k in base.metrics:
        torch.testing.assert_close(more.metrics[k], base.metrics[k], rtol=1e-6, atol=1e-7, msg=k)
    keep = torch.tensor([1, 1, 0, 0, 1, 1, 1], dtype=torch.bool)
    torch.testing.assert_close(more.rollout_is_weights[keep], base.rollout_is_weights)
    assert (more.rollout_is_weights[~keep] == 0).all() and not more.mask[~keep].any()
    _all_finite(more)


@pytest.mark.parametrize("level", ["token", "sequence", "geometric", None])
def test_all_masked_and_empty_batches(level):
    for shape in ((3, 4), (0, 4), (3, 0)):
        old, roll = -torch.rand(shape), -torch.rand(shape)
        mask = torch.zeros(shape, dtype=torch.bool)
        rc = ao.rollout_correction(old, roll, mask, level=level, threshold=(0.5, 2.0), mode="mask",
                                   rejection={"seq_max_k2": 0.1, "token_k1": 2.0}, batch_normalize=level is not None)
        _all_finite(rc)
        assert not rc.mask.any()
        if level is not None:
            assert (rc.rollout_is_weights == 0).all()
        assert all(v == (1.0 if k.endswith("batch_norm_factor") else 0.0) for k, v in rc.metrics.items()), rc.metrics


@pytest.mark.parametrize("packed", [False, True])
def test_equal_logps_give_weights_exactly_one(packed):
    old, _, mask = _data(B=5, T=7, dtype=torch.float32, empty_rows=(1,))
    old = old.nan_to_num(-2.0)
    cu = None
    if packed:
        old, _, mask, cu = _packed(old, old, mask)
    for level in ("token", "sequence", "geometric"):
        for mode, threshold in (("truncate", 2.0), ("mask", (0.5, 2.0)), ("truncate", None), ("mask", (1.0, 1.0))):
            rc = ao.rollout_correction(old, old.clone(), mask, level=level, mode=mode, threshold=threshold,
                                       rejection={"token_k1": 1.0, "seq_max_k3": 1e-12}, cu_seqlens=cu)
            assert (rc.rollout_is_weights[mask] == 1).all() and (rc.rollout_is_weights[~mask] == 0).all()
            assert torch.equal(rc.mask, mask)
            for k in ("kl", "k3_kl", "chi2_token", "chi2_seq", "log_ppl_diff", "rollout_rs_masked_fraction",
                      "rollout_is_ratio_fraction_high", "rollout_is_ratio_fraction_low", "rollout_is_std"):
                assert rc.metrics["rollout_corr/" + k] == 0, k
            for k in ("rollout_is_mean", "rollout_is_eff_sample_size", "ppl_ratio", "rollout_is_seq_mean"):
                assert rc.metrics["rollout_corr/" + k] == 1, k


def test_inputs_with_grad_give_detached_weights():
    old, roll, mask = _data(dtype=torch.float32)
    old = old.nan_to_num(0.0).requires_grad_()
    rc = ao.rollout_correction(old, roll, mask, level="sequence")
    assert not rc.rollout_is_weights.requires_grad and all(not v.requires_grad for v in rc.metrics.values())
    w, m, metrics = rc  # unpacks as a triple
    assert w is rc.rollout_is_weights and isinstance(rc, ao.RolloutCorrection)
