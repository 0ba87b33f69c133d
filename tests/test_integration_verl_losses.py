"""verl 0.9.1's DPPO (dppo_tv, dppo_kl), GMPO (geo_mean), Clip-Cov, KL-Cov, DRO and bypass_mode losses against
alignops_<name> through verl's own call, at every loss_agg_mode where verl honours it, with the differences
that are verl's stated and asserted (docs/methods.md §1.15, §2.35, §2.36, §2.44, §2.45;
docs/integrations/verl.md)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import require_framework

require_framework("verl", "verl")

from verl.trainer.ppo import core_algos  # noqa: E402

from alignops.integrations import verl as aov  # noqa: E402
from tests.test_integration_verl import (AGG_MODES, actor_config, agg_as_given, global_info,  # noqa: E402
                                         policy_inputs, run_loss)


def _probability_inputs(seed=0):
    """policy_inputs with log-probs near 0 (probabilities 0.3-1) so that the TV and binary-KL regions
    bind: DPPO's bounds are on the sampled token's probability, which the default inputs keep tiny."""
    logp, old, adv, mask, isw = policy_inputs(seed)
    g = torch.Generator().manual_seed(seed + 1)
    logp = torch.where(mask, -torch.rand(logp.shape, generator=g) * 1.2, logp)
    old = torch.where(mask, (logp - 0.6 * torch.randn(logp.shape, generator=g)).clamp(max=-1e-3), old)
    return logp, old, adv, mask, isw


@pytest.mark.parametrize("info", ["local", "global"])
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("name", ["dppo_tv", "dppo_kl"])
def test_dppo_equals_verl(name, mode, info):
    """verl's fields set away from their defaults (the divergence bounds, the IS cap clip_ratio_c) reach
    alignops_<name> as they reach verl's loss: value, gradient, ppo_kl and both clip fractions."""
    inputs = logp, old, adv, mask, _ = _probability_inputs()
    cfg = actor_config(mode, clip_ratio_low=0.1, clip_ratio_high=0.21, clip_ratio_c=1.6,
                       policy_loss=agg_as_given(name, mode))
    cfg.global_batch_info.update(global_info(info, mask))
    _, ref_m = _assert_equals_verl(name, inputs, mode, cfg, ("actor/ppo_kl", "actor/pg_clipfrac",
                                                              "actor/pg_clipfrac_lower"), abs_tol=1e-7)
    # the inputs reach both sides of the region and the cap, and tell the lower bound from the upper
    assert 0.1 < ref_m["actor/pg_clipfrac"] < 0.9 and ref_m["actor/pg_clipfrac_lower"] > 0
    swapped = actor_config(mode, clip_ratio_low=0.21, clip_ratio_high=0.1, clip_ratio_c=1.6,
                           policy_loss=agg_as_given(name, mode))
    swapped.global_batch_info.update(global_info(info, mask))
    other = run_loss(core_algos.get_policy_loss_fn(name), logp, old, adv, mask, mode, swapped, None)
    assert not torch.allclose(other[1], run_loss(core_algos.get_policy_loss_fn(name), logp, old, adv, mask, mode,
                                                 cfg, None)[1])


@pytest.mark.parametrize("name", ["dppo_tv", "dppo_kl"])
def test_dppo_cap_at_verls_default(name):
    """At verl's default clip_ratio_c (3.0, an ActorConfig field, so verl's own fallback of 20 never applies)
    alignops_<name> keeps the method's cap 20: equal to verl's loss given clip_ratio_c=20, not to verl's at 3."""
    logp, old, adv, mask, _ = policy_inputs()
    # ratios e^1.5 ~ 4.5 > 3 on tokens of probability < 0.26, where the TV bound 0.2 lets them through
    old = torch.where(mask & (adv > 0), logp - 1.5, old)
    assert (mask & (adv > 0) & (logp < -1.5)).any()
    cfg = actor_config()
    got = run_loss(core_algos.get_policy_loss_fn("alignops_" + name), logp, old, adv, mask, "token-mean", cfg, None)
    at_3 = run_loss(core_algos.get_policy_loss_fn(name), logp, old, adv, mask, "token-mean", cfg, None)
    at_20 = run_loss(core_algos.get_policy_loss_fn(name), logp, old, adv, mask, "token-mean",
                     actor_config(clip_ratio_c=20.0), None)
    torch.testing.assert_close(got[0], at_20[0])
    torch.testing.assert_close(got[1], at_20[1])
    assert not torch.allclose(got[0], at_3[0])


@pytest.mark.parametrize("clip", [None, (0.1, 0.3)])
def test_geo_mean_equals_verl_over_nonempty_rows(clip):
    """verl's geo_mean is the mean over all B rows of -mean(A) s_i whatever loss_agg_mode says; alignops's
    geo_mean aggregates seq-mean-token-mean over the non-empty rows. Without empty rows they are equal; with
    them verl's is alignops's times (non-empty rows / B)."""
    logp, old, adv, mask, _ = policy_inputs()
    fields = {} if clip is None else dict(clip_ratio_low=clip[0], clip_ratio_high=clip[1])
    cfg = actor_config(**fields)
    full = mask.any(1)
    ref_loss, ref_grad, ref_m = run_loss(core_algos.get_policy_loss_fn("geo_mean"), logp[full], old[full],
                                         adv[full], mask[full], "token-mean", cfg, None)
    loss, grad, m = run_loss(core_algos.get_policy_loss_fn("alignops_geo_mean"), logp[full], old[full], adv[full],
                             mask[full], "token-mean", cfg, None)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)
    assert m["actor/ppo_kl"] == pytest.approx(ref_m["actor/ppo_kl"], rel=1e-6)
    assert m["actor/alignops/gmpo/clipped_pos"] == pytest.approx(ref_m["actor/pg_clipfrac"], abs=1e-7)
    assert m["actor/alignops/gmpo/clipped_neg"] == pytest.approx(ref_m["actor/pg_clipfrac_lower"], abs=1e-7)
    assert ref_m["actor/pg_clipfrac"] > 0 and ref_m["actor/pg_clipfrac_lower"] > 0

    assert not full.all()
    ref_all, ref_grad_all, _ = run_loss(core_algos.get_policy_loss_fn("geo_mean"), logp, old, adv, mask,
                                        "token-mean", cfg, None)
    ours_all, grad_all, _ = run_loss(core_algos.get_policy_loss_fn("alignops_geo_mean"), logp, old, adv, mask,
                                     "token-mean", cfg, None)
    share = full.sum() / len(full)
    torch.testing.assert_close(ref_all, ours_all * share)
    torch.testing.assert_close(ref_grad_all, grad_all * share)
    torch.testing.assert_close(ours_all, loss)


def test_geo_mean_rollout_weights_differ_from_verl():
    """verl folds rollout IS weights into a row's geometric mean; alignops multiplies each token's term
    (the arithmetic mean of the weights per row under seq-mean-token-mean): equal only for weights constant
    per row."""
    logp, old, adv, mask, isw = policy_inputs()
    full = mask.any(1)
    logp, old, adv, mask, isw = logp[full], old[full], adv[full], mask[full], isw[full]
    row_const = isw[:, :1].expand_as(isw).contiguous()
    cfg = actor_config()

    def both(w):
        return [run_loss(core_algos.get_policy_loss_fn(n), logp, old, adv, mask, "token-mean", cfg, w)[0]
                for n in ("geo_mean", "alignops_geo_mean")]
    ref, ours = both(row_const)
    torch.testing.assert_close(ours, ref)
    ref, ours = both(isw)
    assert not torch.allclose(ours, ref)


def test_registered_in_verl():
    for name in ("dppo_tv", "dppo_kl", "geo_mean", "clip_cov", "kl_cov", "dro"):
        assert core_algos.get_policy_loss_fn("alignops_" + name) is aov.policy_loss_fn(name)
    assert core_algos.get_policy_loss_fn("alignops_bypass_mode") is aov.bypass_mode_loss_fn



# --------------------------------------------------------------------------------------------
# Clip-Cov, KL-Cov, DRO (docs/methods.md §2.44, §2.45)

from verl.trainer.config.algorithm import RolloutCorrectionConfig  # noqa: E402
from verl.trainer.ppo import rollout_corr_helper  # noqa: E402

import alignops as ao  # noqa: E402


def _cov_inputs(seed=0, dtype=torch.float32):
    """policy_inputs with the padding finite (verl reads it in the covariance's masked means only through
    the mask) and covariances without ties (continuous draws)."""
    logp, old, adv, mask, isw = policy_inputs(seed)
    return logp.to(dtype), old.to(dtype), adv.to(dtype), mask, isw.to(dtype)


def _policy_loss(name, **fields):
    """verl's policy_loss node for `name` (clip_cov, kl_cov and dro have no aggregation of their own, so
    loss_agg_mode reaches them as given)."""
    return aov.AlignopsPolicyLossConfig(loss_mode=name, **fields)


def _both(name, logp, old, adv, mask, mode, cfg, weights, seed=None):
    out = []
    for fn in (core_algos.get_policy_loss_fn(name), core_algos.get_policy_loss_fn("alignops_" + name)):
        if seed is not None:
            torch.manual_seed(seed)
        out.append(run_loss(fn, logp, old, adv, mask, mode, cfg, weights))
    return out


def _assert_equals_verl(name, inputs, mode, cfg, keys, seed=None, abs_tol=None):
    """verl's `name` and alignops_<name>, without and with IS weights: the same value and gradient, and the
    metrics `keys` to rel 1e-6 (abs_tol besides). Returns verl's (loss, metrics) of the last call."""
    logp, old, adv, mask, isw = inputs
    for weights in (None, isw):
        (ref_loss, ref_grad, ref_m), (loss, grad, m) = _both(name, logp, old, adv, mask, mode, cfg, weights, seed)
        torch.testing.assert_close(loss, ref_loss)
        torch.testing.assert_close(grad, ref_grad)
        for key in keys:
            assert m[key] == pytest.approx(ref_m[key], rel=1e-6, abs=abs_tol), key
    return ref_loss, ref_m


@pytest.mark.parametrize("info", ["local", "global"])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_clip_cov_equals_verl(mode, info):
    """verl draws the tokens it takes out with torch.randperm on torch's default generator; alignops_clip_cov
    (clip_cov_seed None) draws from the same generator in the same order (the candidates row-major), so
    from the same seed the two take out the same tokens: value, gradient and both metrics are equal."""
    inputs = logp, old, adv, mask, _ = _cov_inputs()
    cfg = actor_config(mode, clip_ratio_low=0.15, clip_ratio_high=0.25,
                       policy_loss=_policy_loss("clip_cov", clip_cov_ratio=0.2, clip_cov_lb=-0.3, clip_cov_ub=0.6))
    cfg.global_batch_info.update(global_info(info, mask))
    for seed in (0, 1):
        _, ref_m = _assert_equals_verl("clip_cov", inputs, mode, cfg, ("actor/ppo_kl", "actor/pg_clipfrac"), seed,
                                       abs_tol=1e-7)
    # the rule takes int(0.2 * 25) = 5 tokens out (the data have more candidates than that), and the two
    # seeds take out different ones
    assert int(mask.sum()) == 25 and ref_m["actor/pg_clipfrac"] == pytest.approx(5 / 25)
    grads = [_both("clip_cov", logp, old, adv, mask, mode, cfg, None, seed)[1][1] for seed in (0, 1)]
    assert not torch.equal(grads[0], grads[1])


def test_clip_cov_selection_property():
    """Whatever the draw: exactly max(int(ratio N), 1) tokens (or all candidates, when fewer) lose their
    gradient, all of them candidates: masked-in, not clipped by PPO, covariance strictly inside (lb, ub);
    every other token keeps PPO's gradient. A private seed reproduces its own draw."""
    logp, old, adv, mask, _ = _cov_inputs()
    adv = torch.where(adv == 0, 0.3, adv)    # a token with A = 0 has no gradient to lose
    lb, ub = -0.3, 0.6
    d = logp - old
    r = torch.exp(d)
    n = int(mask.sum())
    ppo_clipped = (-adv * r.clamp(0.8, 1.2)) > (-adv * r)
    mean_a, mean_l = adv[mask].double().mean(), logp[mask].double().mean()
    cov = (adv.double() - mean_a) * (logp.double() - mean_l)
    candidate = mask & ~ppo_clipped & (cov > lb) & (cov < ub)
    assert ((cov - lb).abs()[mask].min() > 1e-4) and ((cov - ub).abs()[mask].min() > 1e-4)
    for ratio in (1e-4, 0.1, 1.0):
        want = min(max(int(ratio * n), 1), int(candidate.sum()))
        for seed in (0, 5):
            kw = dict(method="clip_cov", clip_cov_ratio=ratio, clip_cov_lb=lb, clip_cov_ub=ub, clip_cov_seed=seed)
            x = logp.double().clone().requires_grad_()
            out = ao.policy_loss(x, old.double(), adv.double(), mask, **kw)
            (g,) = torch.autograd.grad(out.loss, x)
            _, ppo_g, _ = run_loss(lambda o, lp, *a: (ao.policy_loss(lp, o, adv.double(), mask, method="ppo").loss, {}),
                                   logp.double(), old.double(), adv, mask, "token-mean", None, None)
            dropped = mask & (g == 0) & (ppo_g != 0)
            assert int(dropped.sum()) == want and bool((dropped <= candidate).all())
            assert torch.equal(g[~dropped], ppo_g[~dropped])
            assert out.metrics["clip_cov/clipped"].item() == pytest.approx(want / n)
            x2 = logp.double().clone().requires_grad_()
            (g2,) = torch.autograd.grad(ao.policy_loss(x2, old.double(), adv.double(), mask, **kw).loss, x2)
            assert torch.equal(g, g2)


@pytest.mark.parametrize("info", ["local", "global"])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_kl_cov_equals_verl(mode, info):
    """On fp32 inputs without ties in the covariance, verl's topk and alignops's stable ranking pick the same
    tokens: value, gradient and ppo_kl (verl's: mean |log r|) are equal; kl_cov_ratio and ppo_kl_coef reach
    alignops_kl_cov as they reach verl's."""
    inputs = logp, old, adv, mask, _ = _cov_inputs()
    cov = ((adv - adv[mask].mean()) * (logp - logp[mask].mean()))[mask]
    assert cov.unique().numel() == cov.numel()
    cfg = actor_config(mode, policy_loss=_policy_loss("kl_cov", kl_cov_ratio=0.25, ppo_kl_coef=0.7))
    cfg.global_batch_info.update(global_info(info, mask))
    ref_loss, _ = _assert_equals_verl("kl_cov", inputs, mode, cfg, ("actor/ppo_kl",))
    # the penalty binds: without it (coef 0) both change
    cfg = actor_config(mode, policy_loss=_policy_loss("kl_cov", kl_cov_ratio=0.25, ppo_kl_coef=0.0))
    cfg.global_batch_info.update(global_info(info, mask))
    (ref0, _, _), (ours0, _, _) = _both("kl_cov", logp, old, adv, mask, mode, cfg, None)
    torch.testing.assert_close(ours0, ref0)
    assert not torch.allclose(ref0, ref_loss)


def test_kl_cov_at_verls_defaults():
    """verl's PolicyLossConfig defaults (kl_cov_ratio 2e-4: one token here, ppo_kl_coef 0.1) are alignops's."""
    logp, old, adv, mask, _ = _cov_inputs()
    cfg = actor_config(policy_loss=aov.AlignopsPolicyLossConfig(loss_mode="kl_cov"))
    (ref_loss, ref_grad, _), (loss, grad, _) = _both("kl_cov", logp, old, adv, mask, "token-mean", cfg, None)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)
    x = logp.clone().requires_grad_()
    out = ao.policy_loss(x, old, adv, mask, method="kl_cov")
    torch.testing.assert_close(out.loss.detach(), ref_loss)
    assert out.metrics["kl_cov/selected"].item() == pytest.approx(1 / int(mask.sum()))


def test_kl_cov_tie_rule():
    """Equal covariances: alignops takes the earlier tokens (row-major, the packed order). Here every
    advantage is equal, so every covariance is 0: the first k masked-in tokens get the penalty. verl's topk
    leaves the choice among ties to the implementation, so only the count is compared with verl's there."""
    logp, old, _, mask, _ = _cov_inputs()
    adv = torch.full_like(logp, 0.5)
    k = int(0.25 * int(mask.sum()))
    x = logp.double().clone().requires_grad_()
    out = ao.policy_loss(x, old.double(), adv.double(), mask, method="kl_cov", kl_cov_ratio=0.25, kl_cov_coef=1.0)
    (g,) = torch.autograd.grad(out.loss, x)
    first = torch.zeros(mask.numel(), dtype=torch.bool)
    first[mask.reshape(-1).nonzero().squeeze(1)[:k]] = True
    first = first.view_as(mask)
    n = int(mask.sum())
    d = logp.double() - old.double()
    want = torch.where(mask, -0.5 * torch.exp(d) + torch.where(first, torch.sign(d), 0.0), 0.0) / n
    torch.testing.assert_close(g, want, rtol=1e-12, atol=1e-15)
    assert out.metrics["kl_cov/selected"].item() == pytest.approx(k / n)
    cfg = actor_config(policy_loss=aov.AlignopsPolicyLossConfig(loss_mode="kl_cov", kl_cov_ratio=0.25,
                                                                 ppo_kl_coef=1.0))
    ref_grad = run_loss(core_algos.get_policy_loss_fn("kl_cov"), logp, old, adv, mask, "token-mean", cfg, None)[1]
    penalised = ((ref_grad * n + 0.5 * torch.exp(logp - old)).abs() > 0.5) & mask
    assert int(penalised.sum()) == k


@pytest.mark.parametrize("info", ["local", "global"])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_dro_equals_verl(mode, info):
    inputs = _cov_inputs()
    cfg = actor_config(mode, policy_loss=_policy_loss("dro", dro_beta=0.4))
    cfg.global_batch_info.update(global_info(info, mask=inputs[3]))
    _assert_equals_verl("dro", inputs, mode, cfg, ("actor/ppo_kl",))


def test_dro_beta_is_required():
    """verl's dro raises without policy_loss.dro_beta; so does alignops_dro, naming the field, and
    ao.policy_loss(method='dro') without dro_beta names the option."""
    logp, old, adv, mask, _ = _cov_inputs()
    cfg = actor_config(policy_loss=aov.AlignopsPolicyLossConfig(loss_mode="dro"))
    with pytest.raises(ValueError, match="dro_beta"):
        run_loss(core_algos.get_policy_loss_fn("dro"), logp, old, adv, mask, "token-mean", cfg, None)
    with pytest.raises(ValueError, match="policy_loss.dro_beta"):
        run_loss(core_algos.get_policy_loss_fn("alignops_dro"), logp, old, adv, mask, "token-mean", cfg, None)
    with pytest.raises(ValueError, match="dro_beta"):
        ao.policy_loss(logp, old, adv, mask, method="dro")
    with pytest.raises(ValueError, match="dro_beta"):
        ao.policy_loss(logp, old, adv, mask, method="dro", dro_beta=-1.0)
    ref = run_loss(core_algos.get_policy_loss_fn("dro"), logp, old, adv, mask, "token-mean",
                   actor_config(policy_loss=_policy_loss("dro", dro_beta=0.3)), None)
    # the alignops mapping may give it instead
    cfg = actor_config(policy_loss=_policy_loss("dro", alignops={"dro_beta": 0.3}))
    got = run_loss(core_algos.get_policy_loss_fn("alignops_dro"), logp, old, adv, mask, "token-mean", cfg, None)
    torch.testing.assert_close(got[0], ref[0])


# --------------------------------------------------------------------------------------------
# bypass mode and the rollout_logp= route (docs/methods.md §1.15, docs/integrations/verl.md)

BYPASS_PRESETS = ["bypass_ppo_clip", "bypass_ppo_clip_geo_rs", "bypass_ppo_clip_k3_rs", "bypass_pg_is",
                  "bypass_pg_token_icepop", "bypass_pg_geo_rs", "bypass_pg_geo_rs_seq_tis",
                  "bypass_pg_geo_rs_token_tis"]


def _rollout_inputs(scale, seed=0):
    logp, _, adv, mask, _ = policy_inputs(seed)
    g = torch.Generator().manual_seed(seed + 7)
    roll = logp + scale * torch.randn(logp.shape, generator=g)
    return logp, roll, adv, mask


def _bypass_config(preset, mode, **fields):
    rc = getattr(RolloutCorrectionConfig, preset)()
    return actor_config(mode, policy_loss=aov.AlignopsPolicyLossConfig(loss_mode="bypass_mode", rollout_correction=rc),
                        **fields)


@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("preset", BYPASS_PRESETS)
def test_bypass_mode_equals_verl(preset, mode):
    """alignops_bypass_mode against verl's bypass_mode at each of verl's bypass presets: loss, gradient, ppo_kl
    and every rollout_corr/ metric verl reports. The rejection presets get data that they neither keep whole nor
    reject whole (the geometric ones reject rows whose mean log-ratio leaves (0.999, 1.001), the k3 one rows whose
    mean k3 exceeds 0.01)."""
    scale = 0.0015 if "geo" in preset else 0.2 if "k3" in preset else 0.3
    logp, roll, adv, mask = _rollout_inputs(scale)
    cfg = _bypass_config(preset, mode, clip_ratio_low=0.15, clip_ratio_high=0.25)

    def both(*data):
        return [run_loss(fn, *data, mode, cfg, None)
                for fn in (core_algos.get_policy_loss_fn("bypass_mode"),
                           core_algos.get_policy_loss_fn("alignops_bypass_mode"))]
    (ref_loss, ref_grad, _), (loss, grad, _) = both(logp, roll, adv, mask)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)
    # verl counts empty rows in several rollout_corr/ row means (docs/methods.md §1.15): without them
    full = mask.any(1)
    assert not full.all()
    (ref_loss, _, ref_m), (loss, _, m) = both(logp[full], roll[full], adv[full], mask[full])
    torch.testing.assert_close(loss, ref_loss)
    keys = {k for k in ref_m if k.startswith("rollout_corr/")} | {"actor/ppo_kl"}
    assert keys <= set(m)
    for k in keys:
        assert m[k] == pytest.approx(ref_m[k], rel=2e-5, abs=1e-6), k
    if "rs" in preset:   # rejection keeps some rows and removes some
        assert 0 < ref_m["rollout_corr/rollout_rs_masked_fraction"] < 1


def test_bypass_through_alignops_route():
    """verl's bypass REINFORCE is ao.policy_loss(old_logp=None, rollout_logp=, rollout_correction=) on the
    options rollout_correction_options translates, and its PPO-clip ao.policy_loss against the rollout's
    log-probs on ao.rollout_correction's mask, its weights unused; each alignops_<method> runs its own math
    this way when verl's config is in bypass mode."""
    logp, roll, adv, mask = _rollout_inputs(0.3)
    cfg = _bypass_config("bypass_pg_is", "token-mean")
    opts = aov.rollout_correction_options(cfg.policy_loss.rollout_correction)
    assert opts == {"level": "sequence", "mode": "truncate", "threshold": 2.0, "batch_normalize": False}
    x = logp.clone().requires_grad_()
    want = ao.policy_loss(x, None, adv, mask, method="reinforce", agg="token-mean", rollout_logp=roll,
                          rollout_correction=opts).loss
    torch.testing.assert_close(run_loss(aov.bypass_mode_loss_fn, logp, roll, adv, mask, "token-mean", cfg, None)[0],
                               want.detach())
    # any alignops method in bypass mode: e.g. alignops_cispo, against the route by hand
    got = run_loss(core_algos.get_policy_loss_fn("alignops_cispo"), logp, roll, adv, mask, "token-mean", cfg, None)
    x = logp.clone().requires_grad_()
    want = ao.policy_loss(x, None, adv, mask, method="cispo", rollout_logp=roll, rollout_correction=opts)
    torch.testing.assert_close(got[0], want.loss.detach())
    assert got[2]["rollout_corr/rollout_is_mean"] == pytest.approx(float(want.metrics["rollout_corr/rollout_is_mean"]))
    logp, roll, adv, mask = _rollout_inputs(0.2)   # the k3 rejection keeps some rows, not all
    cfg = _bypass_config("bypass_ppo_clip_k3_rs", "token-mean")
    opts = aov.rollout_correction_options(cfg.policy_loss.rollout_correction)
    rc = ao.rollout_correction(logp, roll, mask, **opts)
    assert 0 < int(rc.mask.sum()) < int(mask.sum())
    got = run_loss(core_algos.get_policy_loss_fn("alignops_dapo"), logp, roll, adv, mask, "token-mean", cfg, None)
    x = logp.clone().requires_grad_()
    want = ao.policy_loss(x, roll, adv, rc.mask, method="dapo", clip_ratio_c=3.0).loss
    torch.testing.assert_close(got[0], want.detach())
    # not in bypass mode (verl's default config): the ordinary loss, old_log_prob the trainer's
    plain = run_loss(core_algos.get_policy_loss_fn("alignops_dapo"), logp, roll, adv, mask, "token-mean",
                     actor_config(), None)
    x = logp.clone().requires_grad_()
    torch.testing.assert_close(plain[0], ao.policy_loss(x, roll, adv, mask, method="dapo", clip_ratio_c=3.0).loss.detach())


RC_CASES = [
    dict(rollout_is="token", rollout_is_threshold=2.0),
    dict(rollout_is="sequence", rollout_is_threshold="0.5_3.0", rollout_is_batch_normalize=True),
    dict(rollout_is="token", rollout_is_threshold="1.5", rollout_rs="token_k1,seq_max_k3", rollout_rs_threshold="1.4,0.3"),
    dict(rollout_is=None, rollout_rs="seq_sum_k1,token_k2", rollout_rs_threshold="0.3_3.0,0.2"),
    dict(rollout_is="token", rollout_rs="seq_mean_k1", rollout_rs_threshold=1.05),
]


@pytest.mark.parametrize("case", RC_CASES, ids=range(len(RC_CASES)))
def test_rollout_correction_options_equal_verls_helper(case):
    """The translated options give ao.rollout_correction verl's own weights, mask and metrics
    (rollout_corr_helper.compute_rollout_correction_and_rejection_mask on the same tensors)."""
    logp, roll, _, mask = _rollout_inputs(0.3)
    rows = mask.any(1)      # verl counts empty rows in several metrics' row means (docs/methods.md §1.15)
    logp, roll, mask = logp[rows], roll[rows], mask[rows]
    full = dict(rollout_is=None, rollout_is_threshold=2.0, rollout_is_batch_normalize=False, rollout_rs=None,
                rollout_rs_threshold=None)
    full.update(case)
    w, v_mask, v_metrics = rollout_corr_helper.compute_rollout_correction_and_rejection_mask(
        logp, roll, mask.float(), **full)
    rc = ao.rollout_correction(logp, roll, mask, **aov.rollout_correction_options(RolloutCorrectionConfig(**full)))
    if full["rollout_is"] is None:
        assert w is None and rc.rollout_is_weights is None
    else:
        torch.testing.assert_close(torch.where(mask, rc.rollout_is_weights, 0.0),
                                   torch.where(mask, w.batch["rollout_is_weights"], 0.0))
    assert torch.equal(rc.mask, v_mask.bool())
    if full["rollout_rs"] is not None:
        assert 0 < int(rc.mask.sum()) < int(mask.sum()), "the criteria should reject some tokens and keep some"
    for k, v in v_metrics.items():
        assert float(rc.metrics[k]) == pytest.approx(v, rel=2e-5, abs=1e-6), k


def test_bad_rollout_correction_is_named():
    bad = [(dict(rollout_is="geometric"), "rollout_is"), (dict(rollout_is_threshold="a_b"), "rollout_is_threshold"),
           (dict(rollout_rs="token_k9", rollout_rs_threshold=1.0), "rollout_rs"),
           (dict(rollout_rs="token_k2"), "rollout_rs_threshold"),
           (dict(rollout_rs="token_k2,token_k3", rollout_rs_threshold="1,2,3"), "rollout_rs_threshold"),
           (dict(rollout_rs="token_k2", rollout_rs_threshold="0.1_2"), "rollout_rs_threshold")]
    for fields, name in bad:
        with pytest.raises((ValueError, TypeError), match=name):
            aov.rollout_correction_options(fields)
    logp, roll, adv, mask = _rollout_inputs(0.3)
    rc = RolloutCorrectionConfig(bypass_mode=True, loss_type="ppo")
    cfg = actor_config(policy_loss=aov.AlignopsPolicyLossConfig(loss_mode="bypass_mode", rollout_correction=rc))
    with pytest.raises(ValueError, match="loss_type"):
        run_loss(aov.bypass_mode_loss_fn, logp, roll, adv, mask, "token-mean", cfg, None)


def test_fully_rejected_batch_is_zero_where_verl_is_nan():
    """Every row rejected (the geometric presets on a far rollout): verl's bypass loss is 0/0 = NaN, alignops's 0
    with a zero gradient (docs/methods.md §00.2)."""
    logp, roll, adv, mask = _rollout_inputs(0.3)
    cfg = _bypass_config("bypass_pg_geo_rs", "token-mean")
    ref = run_loss(core_algos.get_policy_loss_fn("bypass_mode"), logp, roll, adv, mask, "token-mean", cfg, None)
    got = run_loss(aov.bypass_mode_loss_fn, logp, roll, adv, mask, "token-mean", cfg, None)
    assert torch.isnan(ref[0])
    assert got[0] == 0 and (got[1] == 0).all()


def test_install_bypass_mode():
    """verl's trainer hard-codes loss_mode='bypass_mode' in bypass mode: install_bypass_mode puts alignops's
    under that name; uninstall_bypass_mode puts verl's back."""
    original = core_algos.get_policy_loss_fn("bypass_mode")
    assert original is not aov.bypass_mode_loss_fn
    try:
        aov.install_bypass_mode()
        aov.install_bypass_mode()   # idempotent
        assert core_algos.get_policy_loss_fn("bypass_mode") is aov.bypass_mode_loss_fn
    finally:
        aov.uninstall_bypass_mode()
    assert core_algos.get_policy_loss_fn("bypass_mode") is original
