"""verl 0.9.1's DPPO (dppo_tv, dppo_kl) and GMPO (geo_mean) losses against alignops_<name> through verl's
own call, at every loss_agg_mode where verl honours it, with the differences that are verl's stated and
asserted (docs/methods.md §2.35, §2.36; docs/integrations/verl.md)."""

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
    logp, old, adv, mask, isw = _probability_inputs()
    cfg = actor_config(mode, clip_ratio_low=0.1, clip_ratio_high=0.21, clip_ratio_c=1.6,
                       policy_loss=agg_as_given(name, mode))
    cfg.global_batch_info.update(global_info(info, mask))
    for weights in (None, isw):
        ref_loss, ref_grad, ref_m = run_loss(core_algos.get_policy_loss_fn(name), logp, old, adv, mask, mode, cfg,
                                             weights)
        loss, grad, m = run_loss(core_algos.get_policy_loss_fn("alignops_" + name), logp, old, adv, mask, mode, cfg,
                                 weights)
        torch.testing.assert_close(loss, ref_loss)
        torch.testing.assert_close(grad, ref_grad)
        for key in ("actor/ppo_kl", "actor/pg_clipfrac", "actor/pg_clipfrac_lower"):
            assert m[key] == pytest.approx(ref_m[key], rel=1e-6, abs=1e-7), key
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
    for name in ("dppo_tv", "dppo_kl", "geo_mean"):
        assert core_algos.get_policy_loss_fn("alignops_" + name) is aov.policy_loss_fn(name)
