"""alignops.integrations.verl against the installed verl 0.9.1, called as the oracle.

Policy losses: every verl loss whose math alignops has (vanilla, gspo, cispo, gpg, sapo) against
the alignops entries it maps to, for every loss_agg_mode, with and without global_batch_info:
values, gradients w.r.t. log_prob and the metrics both compute. At verl's config defaults each
`alignops_<method>` is ao.policy_loss(method=...) at the method's own defaults; verl's fields set
away from their defaults win. verl's kl_loss_type names against verl's kl_penalty. Advantage estimators against
verl's own. The fused forward against verl's CPU path FusedLinearForPPO(impl_backend="torch"),
and through verl's patched HF forwards. Registration through the `verl.plugins` entry point in a
fresh interpreter.
"""

import copy
import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np
import pytest
import torch

from tests import policy_oracle  # noqa: E402
from tests.conftest import require_framework  # noqa: E402

require_framework("verl", "verl")

from omegaconf import OmegaConf  # noqa: E402
from verl.trainer.config import AlgoConfig  # noqa: E402
from verl.trainer.ppo import core_algos  # noqa: E402
from verl.workers.config import ActorConfig  # noqa: E402

import alignops as ao  # noqa: E402
import alignops.integrations.verl as aov  # noqa: E402
from alignops.policy import math as pmath  # noqa: E402
from alignops.policy.registry import method_names  # noqa: E402
from alignops.policy.math import VERL_KL_LOSS_TYPES  # noqa: E402
from alignops.train.presets import make_config  # noqa: E402

AGG_MODES = ["token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
B, T = 6, 9


def actor_config(loss_agg_mode="token-mean", **fields):
    # the shape verl's policy losses are called with (gspo and cispo assert an ActorConfig)
    return ActorConfig(strategy="fsdp", rollout_n=1, ppo_micro_batch_size_per_gpu=1, loss_agg_mode=loss_agg_mode,
                       **fields)


def policy_inputs(seed=0, row_advantages=False):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([9, 5, 0, 7, 1, 3])          # row 2 fully masked, row 4 one token
    mask = torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)
    logp = -torch.rand(B, T, generator=g) * 3
    # peaked log-ratios: whole rows shifted by +-1.5 (sequence ratios beyond any clip, token
    # ratios beyond the dual clip 3), plus token noise that crosses the PPO bounds
    shift = torch.tensor([0.0, 1.5, 0.0, -1.5, 0.3, 0.0]).unsqueeze(1)
    old = logp - shift - 0.4 * torch.randn(B, T, generator=g)
    logp = torch.where(mask, logp, torch.full_like(logp, -50.0))    # padding that must not matter
    adv = torch.randn(B, T, generator=g)
    adv[0, :3] = 0.0
    adv[1, :2] = adv[1, :2].abs()    # high ratios: positive advantages meet the upper clip,
    adv[1, 2:] = -adv[1, 2:].abs()   # negative ones the dual clip
    adv[3] = -adv[3].abs()           # low ratios, negative advantages: the lower clip
    if row_advantages:
        adv = torch.tensor([0.0, 1.2, -0.7, -0.9, 0.4, 1.1]).unsqueeze(1).expand(B, T).clone()
    is_weights = torch.rand(B, T, generator=g) + 0.5
    return logp, old, adv, mask, is_weights


def global_info(kind, mask):
    if kind == "local":
        return {}
    return {"dp_size": 2, "batch_num_tokens": int(mask.sum()) * 2 + 5, "global_batch_size": 2 * B + 1,
            "loss_scale_factor": 12}


# (verl loss_mode, alignops method with the same math under verl's config fields)
PAIRS = [("vanilla", "ppo"), ("vanilla", "grpo"), ("vanilla", "dapo"), ("vanilla", "dr_grpo"),
         ("gspo", "gspo-token"), ("gspo", "gspo"), ("cispo", "cispo"), ("cispo", "cispo_scalerl"),
         ("gpg", "gpg"), ("gpg", "reinforce")]


def run_loss(fn, logp, old, adv, mask, mode, config, is_weights):
    x = logp.clone().requires_grad_()
    loss, metrics = fn(old, x, adv, mask, mode, config, is_weights)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad, metrics


def agg_as_given(method, mode, loss_mode=None):
    """The policy_loss node that makes alignops `method` aggregate by `mode` even where `mode` is
    verl's default (token-mean), which gives way to the method's own aggregation (gspo, dr_grpo,
    reinforce) unless policy_loss.alignops.agg says otherwise."""
    kw = {} if loss_mode is None else {"loss_mode": loss_mode}
    if mode == aov.VERL_DEFAULTS["loss_agg_mode"] and aov.own_default(method, "agg") is not None:
        kw["alignops"] = {"agg": mode}
    return aov.AlignopsPolicyLossConfig(**kw)


@pytest.mark.parametrize("info", ["local", "global"])
@pytest.mark.parametrize("mode", AGG_MODES)
@pytest.mark.parametrize("verl_name,method", PAIRS)
def test_policy_loss_equals_verl(verl_name, method, mode, info):
    """verl's fields set away from their defaults reach alignops as they reach verl's losses
    (at verl's defaults the methods keep their own: test_methods_keep_their_defaults_in_verl)."""
    logp, old, adv, mask, isw = policy_inputs(row_advantages=method == "gspo")
    cfg = actor_config(mode, clip_ratio_low=0.15, clip_ratio_high=0.28, clip_ratio_c=3.0,
                       policy_loss=agg_as_given(method, mode))
    cfg.global_batch_info.update(global_info(info, mask))
    # GSPO's sequence form equals verl's token form only for sequence-level advantages and weights
    for weights in (None,) if method == "gspo" else (None, isw):
        ref_loss, ref_grad, ref_m = run_loss(core_algos.get_policy_loss_fn(verl_name), logp, old, adv, mask, mode,
                                             cfg, weights)
        loss, grad, m = run_loss(core_algos.get_policy_loss_fn("alignops_" + method), logp, old, adv, mask, mode,
                                 cfg, weights)
        torch.testing.assert_close(loss, ref_loss)
        torch.testing.assert_close(grad, ref_grad)
        assert torch.isfinite(loss)
        if "actor/ppo_kl" in ref_m:
            assert m["actor/ppo_kl"] == pytest.approx(ref_m["actor/ppo_kl"], rel=1e-6)
        if verl_name in ("vanilla", "gspo"):
            assert m["actor/pg_clipfrac"] == pytest.approx(ref_m["actor/pg_clipfrac"], abs=1e-7)
    if verl_name == "vanilla":
        # the inputs do reach the PPO clip and the dual clip
        assert ref_m["actor/pg_clipfrac"] > 0.1 and ref_m["actor/pg_clipfrac_lower"] > 0
    if verl_name == "gspo":
        assert ref_m["actor/pg_clipfrac"] > 0.1


def test_cispo_without_lower_bound_equals_verl():
    """verl's CISPO example writes "no lower bound" as clip_ratio_low=10 (1 - 10 < 0 never binds)."""
    logp, old, adv, mask, _ = policy_inputs()
    cfg = actor_config(clip_ratio_low=10.0, clip_ratio_high=0.2)
    ref_loss, ref_grad, _ = run_loss(core_algos.get_policy_loss_fn("cispo"), logp, old, adv, mask, "token-mean", cfg,
                                     None)
    loss, grad, _ = run_loss(core_algos.get_policy_loss_fn("alignops_cispo"), logp, old, adv, mask, "token-mean", cfg,
                             None)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)


def verl_sapo_per_token(logp, old, adv, mask, cfg):
    """verl's SAPO phi_it and d phi_it / d logp, one token at a time: verl's sapo aggregates with
    seq-mean-token-mean whatever loss_agg_mode says, which for a one-token mask is that token's phi."""
    phi = torch.zeros(B, T)
    dphi = torch.zeros(B, T)
    fn = core_algos.get_policy_loss_fn("sapo")
    for i, t in mask.nonzero().tolist():
        one = torch.zeros(B, T, dtype=torch.bool)
        one[i, t] = True
        x = logp.clone().requires_grad_()
        loss, _ = fn(old, x, adv, one, "token-mean", cfg, None)
        (g,) = torch.autograd.grad(loss, x)
        phi[i, t], dphi[i, t] = loss.detach(), g[i, t]
    return phi, dphi


@pytest.mark.parametrize("info", ["local", "global"])
@pytest.mark.parametrize("mode", AGG_MODES)
def test_sapo_equals_verl(mode, info):
    logp, old, adv, mask, _ = policy_inputs()
    cfg = actor_config(mode, tau_pos=0.8, tau_neg=1.6)
    gbi = global_info(info, mask)
    cfg.global_batch_info.update(gbi)
    loss, grad, _ = run_loss(core_algos.get_policy_loss_fn("alignops_sapo"), logp, old, adv, mask, mode, cfg, None)
    if mode == "seq-mean-token-mean":
        ref_loss, ref_grad, _ = run_loss(core_algos.get_policy_loss_fn("sapo"), logp, old, adv, mask, mode, cfg, None)
    else:
        # verl's sapo ignores loss_agg_mode; alignops honours it: the oracle is verl's own
        # per-token SAPO aggregated by verl's agg_loss in that mode
        phi, dphi = verl_sapo_per_token(logp, old, adv, mask, actor_config(tau_pos=0.8, tau_neg=1.6))
        w = phi.clone().requires_grad_()
        ref_loss = core_algos.agg_loss(w, mask, mode, **gbi)
        (dagg,) = torch.autograd.grad(ref_loss, w)
        ref_loss, ref_grad = ref_loss.detach(), dagg * dphi
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("mode", AGG_MODES)
def test_normalizers_follow_agg_loss(mode):
    """The agg=/normalizer= mapping equals verl's agg_loss on any per-token matrix."""
    _, _, _, mask, _ = policy_inputs()
    x = torch.randn(B, T, generator=torch.Generator().manual_seed(3))
    for gbi in ({}, {"dp_size": 4, "batch_num_tokens": 101, "global_batch_size": 17},
                {"dp_size": torch.tensor(2), "batch_num_tokens": torch.tensor(77), "global_batch_size": 9,
                 "loss_scale_factor": 5}):
        ref = core_algos.agg_loss(x, mask, mode, **gbi)
        kwargs = aov.aggregation(mode, mask, gbi)
        rows = ao.layout.Rows(mask.shape, mask.device)
        norm = kwargs["normalizer"]
        if norm is None:
            norm = ao.layout.default_normalizer(kwargs["agg"], mask, rows, kwargs.get("max_len"), torch.float32)
        got = ao.layout.aggregate(x, mask, rows, kwargs["agg"], norm)
        torch.testing.assert_close(got, ref)


# What each token-level method runs with through verl at verl's config defaults, written out here
# from docs/methods.md and docs/integrations/verl.md: the method's own defaults
# (tests/policy_oracle.py's table), verl's dual clip 3.0 on the PPO surrogates that have none of
# their own (gppo_klear keeps its 10), and dr_grpo's constant the padded response length.
AT_VERL_DEFAULTS = {"ppo": {"clip_ratio_c": 3.0}, "grpo": {"clip_ratio_c": 3.0}, "dapo": {"clip_ratio_c": 3.0},
                    "dr_grpo": {"clip_ratio_c": 3.0, "max_len": T}, "ecpo": {"clip_ratio_c": 3.0},
                    "gppo": {"clip_ratio_c": 3.0}, "gppo_klear": {}, "cispo": {}, "cispo_scalerl": {},
                    "reinforce": {}, "gpg": {}, "sapo": {}}
# methods with an option verl has no default for: (verl's policy_loss fields, the same as alignops options)
REQUIRED = {"dro": ({"dro_beta": 0.3}, {"dro_beta": 0.3})}


def default_config(method):
    """verl's config at its defaults, plus the fields `method` cannot run without."""
    fields = REQUIRED.get(method, ({}, {}))[0]
    return actor_config(policy_loss=aov.AlignopsPolicyLossConfig(**fields)) if fields else actor_config()


def test_every_method_is_registered_and_runs():
    """Every method is registered under alignops_<method>; the token-level ones (among them ecpo and
    gppo_klear, which verl does not have) equal a float64 oracle of the method through verl's call."""
    logp, old, adv, mask, _ = policy_inputs()
    assert set(AT_VERL_DEFAULTS) <= set(method_names())
    for method in method_names():
        fn = core_algos.get_policy_loss_fn("alignops_" + method)
        assert fn is aov.policy_loss_fn(method)
        loss, grad, metrics = run_loss(fn, logp, old, adv, mask, "token-mean", default_config(method), None)
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), method
        assert (grad[~mask] == 0).all(), method
        assert all(isinstance(v, float) for v in metrics.values())
        if method not in AT_VERL_DEFAULTS:
            continue
        want, want_grad, scale = policy_oracle.policy_loss_from_logp(logp, old, adv, mask, method=method,
                                                                     **AT_VERL_DEFAULTS[method])
        assert abs(loss.double().item() - want.item()) <= 1e-5 * max(scale.item(), 1e-2), \
            (method, loss.item(), want.item())
        gmax = want_grad.abs().max().item()
        assert gmax > 0, method
        torch.testing.assert_close(grad.double(), want_grad, rtol=1e-5, atol=1e-5 * gmax, msg=method)


def test_all_masked_batch_is_finite():
    logp, old, adv, _, _ = policy_inputs()
    mask = torch.zeros(B, T, dtype=torch.bool)
    for mode in AGG_MODES:
        loss, grad, _ = run_loss(aov.policy_loss_fn("grpo"), logp, old, adv, mask, mode, actor_config(mode), None)
        assert loss == 0 and (grad == 0).all()


def test_verl_defaults_are_the_installed_verls():
    """The values that count as "unset" are verl 0.9.1's ActorConfig defaults."""
    assert aov.VERL_DEFAULTS == {"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.2,
                                 "clip_ratio_c": 3.0, "loss_agg_mode": "token-mean"}
    cfg = actor_config()
    assert {k: getattr(cfg, k) for k in aov.VERL_DEFAULTS} == aov.VERL_DEFAULTS


def at_own_defaults(method):
    """ao.policy_loss keywords beyond `method`'s own defaults that alignops_<method> takes from verl at
    verl's defaults: verl's dual clip 3.0 on the PPO surrogates without one of their own, and for
    seq-mean-token-sum-norm verl's constant C (the padded response length without loss_scale_factor)."""
    kw = {}
    if method in aov.DUAL_CLIP_METHODS and aov.own_default(method, "clip_ratio_c") is None:
        kw["clip_ratio_c"] = 3.0
    if aov.own_default(method, "agg") == "seq-mean-token-sum-norm":
        kw["max_len"] = T
    return kw


def test_methods_keep_their_defaults_in_verl():
    """At verl's config defaults (clip_ratio_low/high 0.2/0.2, clip_ratio_c 3.0, loss_agg_mode
    token-mean) `alignops_<method>` is ao.policy_loss(method=...) at the method's own defaults:
    alignops_dapo is not verl's plain PPO, alignops_gspo runs at 3e-4/4e-4 seq-mean-token-mean."""
    logp, old, adv, mask, _ = policy_inputs()
    cfg = actor_config()
    for method in method_names():
        torch.manual_seed(0)    # clip_cov draws from torch's default generator, as verl's
        loss, grad, _ = run_loss(core_algos.get_policy_loss_fn("alignops_" + method), logp, old, adv, mask,
                                 "token-mean", default_config(method), None)
        x = logp.clone().requires_grad_()
        torch.manual_seed(0)
        ref = ao.policy_loss(x, old, adv, mask, method=method, **at_own_defaults(method),
                             **REQUIRED.get(method, ({}, {}))[1]).loss
        (ref_grad,) = torch.autograd.grad(ref, x)
        torch.testing.assert_close(loss, ref.detach(), msg=method)
        torch.testing.assert_close(grad, ref_grad, msg=method)
    kw = {m: aov.policy_loss_kwargs(m, default_config(m), "token-mean", mask) for m in method_names()}
    assert (kw["dapo"]["clip_low"], kw["dapo"]["clip_high"]) == (0.2, 0.28)
    assert (kw["gspo"]["clip_low"], kw["gspo"]["clip_high"], kw["gspo"]["agg"]) == (3e-4, 4e-4, "seq-mean-token-mean")
    assert (kw["cispo"]["clip_low"], kw["cispo"]["clip_high"]) == (1.0, 0.2)
    assert (kw["cispo_scalerl"]["clip_low"], kw["cispo_scalerl"]["clip_high"]) == (1.0, 4.0)
    assert kw["gppo_klear"]["clip_ratio_c"] == 10.0 and kw["dapo"]["clip_ratio_c"] == 3.0
    assert kw["dr_grpo"]["agg"] == "seq-mean-token-sum-norm" and kw["reinforce"]["agg"] == "seq-mean-token-sum"
    # verl's PolicyLossConfig defaults reach clip_cov and kl_cov (ppo_kl_coef 0.1, not its loss's fallback 1.0)
    assert {k: kw["clip_cov"][k] for k in ("clip_cov_ratio", "clip_cov_lb", "clip_cov_ub")} == \
        {"clip_cov_ratio": 2e-4, "clip_cov_lb": 1.0, "clip_cov_ub": 5.0}
    assert (kw["kl_cov"]["kl_cov_ratio"], kw["kl_cov"]["kl_cov_coef"]) == (2e-4, 0.1)
    assert "clip_ratio_c" not in kw["clip_cov"]    # verl's clip_cov has no dual clip

    def verl(name, method):
        a = run_loss(core_algos.get_policy_loss_fn(name), logp, old, adv, mask, "token-mean", cfg, None)
        b = run_loss(core_algos.get_policy_loss_fn("alignops_" + method), logp, old, adv, mask, "token-mean", cfg,
                     None)
        return torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])
    # alignops's PPO is verl's vanilla at verl's defaults; the presets are other methods (these inputs tell)
    assert verl("vanilla", "ppo") and verl("vanilla", "grpo")
    for name, method in (("vanilla", "dapo"), ("vanilla", "dr_grpo"), ("gspo", "gspo-token"), ("cispo", "cispo"),
                         ("vanilla", "gppo_klear")):
        assert not verl(name, method), method


def test_verl_fields_set_away_from_defaults_win():
    logp, old, adv, mask, _ = policy_inputs()

    def check(method, cfg, mode="token-mean", **ref_kw):
        loss, grad, _ = run_loss(core_algos.get_policy_loss_fn("alignops_" + method), logp, old, adv, mask, mode,
                                 cfg, None)
        x = logp.clone().requires_grad_()
        ref = ao.policy_loss(x, old, adv, mask, method=method, **ref_kw).loss
        (ref_grad,) = torch.autograd.grad(ref, x)
        torch.testing.assert_close(loss, ref.detach(), msg=method)
        torch.testing.assert_close(grad, ref_grad, msg=method)

    high = actor_config(clip_ratio_high=0.35)
    # the user's upper bound; the lower one, left at verl's default, is the method's own
    check("dapo", high, clip_high=0.35, clip_ratio_c=3.0)
    check("gspo", high, clip_high=0.35)
    check("cispo", high, clip_high=0.35)
    check("gspo-token", actor_config("seq-mean-token-sum", clip_ratio_low=0.1), "seq-mean-token-sum",
          clip_low=0.1, agg="seq-mean-token-sum")
    check("gppo_klear", actor_config(clip_ratio_c=5.0), clip_ratio_c=5.0)
    check("dr_grpo", actor_config("seq-mean-token-mean"), "seq-mean-token-mean", agg="seq-mean-token-mean",
          clip_ratio_c=3.0)
    # verl's numbers on purpose, though they are verl's defaults: policy_loss.alignops always wins
    verl_numbers = actor_config(policy_loss=aov.AlignopsPolicyLossConfig(
        alignops={"clip_low": 0.2, "clip_high": 0.2, "agg": "token-mean"}))
    ref = run_loss(core_algos.get_policy_loss_fn("gspo"), logp, old, adv, mask, "token-mean", actor_config(), None)
    got = run_loss(core_algos.get_policy_loss_fn("alignops_gspo-token"), logp, old, adv, mask, "token-mean",
                   verl_numbers, None)
    torch.testing.assert_close(got[0], ref[0])
    torch.testing.assert_close(got[1], ref[1])
    bad = actor_config(policy_loss=aov.AlignopsPolicyLossConfig(alignops={"agg": "sum"}))
    with pytest.raises(ValueError, match="policy_loss.alignops.agg"):
        aov.policy_loss_fn("gspo")(old, logp, adv, mask, "token-mean", bad, None)


def test_alignops_options_from_config():
    logp, old, adv, mask, _ = policy_inputs()
    plain = actor_config(clip_ratio_high=0.28)
    opts = actor_config(clip_ratio_high=0.28, policy_loss=aov.AlignopsPolicyLossConfig(
        loss_mode="alignops_gppo", alignops={"gppo_beta1": 0.5, "clip_ratio_c": 10.0}))
    fn = core_algos.get_policy_loss_fn("alignops_gppo")
    loss, grad, _ = run_loss(fn, logp, old, adv, mask, "token-mean", opts, None)
    ref = ao.policy_loss(logp.clone().requires_grad_(), old, adv, mask, method="gppo", clip_low=0.2, clip_high=0.28,
                         clip_ratio_c=10.0, gppo_beta1=0.5)
    torch.testing.assert_close(loss, ref.loss.detach())
    loss_plain, grad_plain, _ = run_loss(fn, logp, old, adv, mask, "token-mean", plain, None)
    assert not torch.allclose(grad, grad_plain)  # the options took effect
    # the same through verl's structured config (policy_loss._target_) and a plain DictConfig
    from verl.utils.config import omega_conf_to_dataclass
    node = omega_conf_to_dataclass(OmegaConf.create({
        "_target_": "alignops.integrations.verl.AlignopsPolicyLossConfig", "loss_mode": "alignops_gppo",
        "alignops": {"gppo_beta1": 0.5}}))
    assert isinstance(node, aov.AlignopsPolicyLossConfig) and node.alignops == {"gppo_beta1": 0.5}
    dict_cfg = OmegaConf.create({"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.28,
                                 "clip_ratio_c": 10.0,
                                 "policy_loss": {"alignops": {"gppo_beta1": 0.5}}, "global_batch_info": {}})
    loss_dict, _, _ = run_loss(fn, logp, old, adv, mask, "token-mean", dict_cfg, None)
    torch.testing.assert_close(loss_dict, loss)
    # list-valued options arrive as OmegaConf ListConfig from a DictConfig
    bapo_cfg = OmegaConf.create({"clip_ratio": 0.2, "policy_loss": {"alignops": {"bapo_bounds": [0.7, 1.3]}}})
    bapo, _, _ = run_loss(core_algos.get_policy_loss_fn("alignops_bapo"), logp, old, adv, mask, "token-mean",
                          bapo_cfg, None)
    ref = ao.policy_loss(logp, old, adv, mask, method="bapo", clip_ratio_c=3.0, bapo_bounds=(0.7, 1.3))
    torch.testing.assert_close(bapo, ref.loss)


def test_bad_config_is_named():
    logp, old, adv, mask, _ = policy_inputs()
    fn = aov.policy_loss_fn("grpo")
    with pytest.raises(ValueError, match="config"):
        fn(old, logp, adv, mask, "token-mean", None, None)
    with pytest.raises(ValueError, match="loss_agg_mode"):
        fn(old, logp, adv, mask, "sum", actor_config(), None)
    cfg = actor_config()
    cfg.global_batch_info.update({"dp_size": 2})
    with pytest.raises(ValueError, match="batch_num_tokens"):
        fn(old, logp, adv, mask, "token-mean", cfg, None)
    with pytest.raises(ValueError, match="global_batch_size"):
        fn(old, logp, adv, mask, "seq-mean-token-mean", cfg, None)
    owned = actor_config(policy_loss=aov.AlignopsPolicyLossConfig(alignops={"kl_coef": 0.1}))
    with pytest.raises(ValueError, match="kl_coef"):
        fn(old, logp, adv, mask, "token-mean", owned, None)
    unknown = actor_config(policy_loss=aov.AlignopsPolicyLossConfig(alignops={"gppo_beta1": 0.5}))
    with pytest.raises(TypeError, match="gppo_beta1"):
        fn(old, logp, adv, mask, "token-mean", unknown, None)
    with pytest.raises(ValueError, match="unknown method"):
        aov.policy_loss_fn("vanilla")


# --------------------------------------------------------------------------------------------
# verl's kl_loss_type names: the trainer's --kl_loss_type and the integration translate them


def kl_inputs():
    """float64 log-probs whose u = ref - logp spans |u| > 20 (verl clamps u) and k3 > 10 (verl clamps
    the value) as well as ordinary values."""
    g = torch.Generator().manual_seed(11)
    logp = -torch.rand(64, generator=g, dtype=torch.float64) * 4
    u = torch.randn(64, generator=g, dtype=torch.float64) * 2
    u[:6] = torch.tensor([25.0, -25.0, 13.0, -13.0, 3.0, 1e-9], dtype=torch.float64)
    return logp, logp + u


@pytest.mark.parametrize("kl_loss_type", sorted(VERL_KL_LOSS_TYPES))
def test_kl_loss_type_means_verls(kl_loss_type):
    """verl's kl_loss_type value, through the integration's and the trainer's translation, computes
    what verl's kl_penalty computes: values and gradients, to float64 tolerance."""
    logp, ref = kl_inputs()
    estimator = aov.kl_estimator_from_verl(kl_loss_type)
    assert make_config("grpo", {"kl_loss_type": kl_loss_type}).kl_estimator == estimator
    x, y = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    want = core_algos.kl_penalty(x, ref, kl_loss_type)
    got = pmath.kl_penalty(y, ref, estimator)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn(logp.shape, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    (dwant,) = torch.autograd.grad((want * g).sum(), x)
    (dgot,) = torch.autograd.grad((got * g).sum(), y)
    torch.testing.assert_close(dgot, dwant, rtol=1e-12, atol=1e-12)
    # and as the KL term of ao.policy_loss against verl's KL loss (token-mean)
    mask = torch.ones(4, 16, dtype=torch.bool)
    mask[1, 9:] = False
    z = logp.reshape(4, 16).clone().requires_grad_()
    out = ao.policy_loss(z, None, torch.zeros(4), mask, method="ppo", ref_logp=ref.reshape(4, 16), kl_coef=1.0,
                         kl_estimator=estimator)
    verl_kl = core_algos.agg_loss(core_algos.kl_penalty(logp.reshape(4, 16), ref.reshape(4, 16), kl_loss_type),
                                  mask, "token-mean")
    torch.testing.assert_close(out.loss.detach(), verl_kl, rtol=1e-12, atol=1e-12)


def test_alignops_k3_is_not_verls_k3():
    """alignops's kl_estimator 'k3' is the exact k3; verl's 'k3' clamps (and is alignops's low_var_kl)."""
    logp, ref = kl_inputs()
    assert aov.kl_estimator_from_verl("k3") == "low_var_kl"
    assert not torch.allclose(pmath.kl_penalty(logp, ref, "k3"), core_algos.kl_penalty(logp, ref, "k3"))
    assert make_config("grpo", {"kl_estimator": "k3"}).kl_estimator == "k3"


@pytest.mark.parametrize("kl_loss_type", ["abs", "full", "kl+", "k1+", "k3+", "low_var_kl+", "abs+", "k4", "K3"])
def test_kl_loss_type_without_an_alignops_estimator_is_refused(kl_loss_type):
    logp, ref = kl_inputs()
    if kl_loss_type in ("full", "k4", "K3"):   # verl itself has none
        with pytest.raises(NotImplementedError):
            core_algos.kl_penalty(logp, ref, kl_loss_type)
    else:                                      # verl computes these; alignops has no estimator for them
        assert torch.isfinite(core_algos.kl_penalty(logp, ref, kl_loss_type)).all()
    for translate in (aov.kl_estimator_from_verl, lambda v: make_config("grpo", {"kl_loss_type": v})):
        with pytest.raises(ValueError, match=re.escape(repr(kl_loss_type))):
            translate(kl_loss_type)


def test_kl_estimator_is_not_an_alignops_option():
    logp, old, adv, mask, _ = policy_inputs()
    owned = actor_config(policy_loss=aov.AlignopsPolicyLossConfig(alignops={"kl_estimator": "k3"}))
    with pytest.raises(ValueError, match="kl_loss_type.*low_var_kl"):
        aov.policy_loss_fn("grpo")(old, logp, adv, mask, "token-mean", owned, None)


def verl_engine_batch(logp, old, adv, mask):
    """The TensorDict verl's engine workers hand to workers/utils/losses.py::ppo_loss: padded
    prompts and responses, log-probs and entropy packed [total_nnz] (shifted by one token), and
    the mini-batch's global counts for two data-parallel ranks."""
    from tensordict import TensorDict
    from verl.utils import tensordict_utils as tu
    prompt_lens = torch.tensor([1, 3, 2, 3, 1, 2])
    response_lens = mask.sum(-1)
    p = int(prompt_lens.max())
    prompt_mask = torch.arange(p).flip(0).unsqueeze(0) < prompt_lens.unsqueeze(1)   # left-padded prompts
    data = TensorDict({"prompts": torch.zeros(B, p, dtype=torch.long), "responses": torch.zeros(B, T, dtype=torch.long),
                       "attention_mask": torch.cat([prompt_mask, mask], 1).long(), "response_mask": mask.long(),
                       "old_log_probs": old, "advantages": adv, "ref_log_prob": old - 0.1}, batch_size=[B])
    tu.assign_non_tensor(data, dp_size=2, batch_num_tokens=int(mask.sum()) * 2 + 5, global_batch_size=2 * B + 1)

    def packed(x):
        rows = []
        for i in range(B):
            seq = torch.zeros(int(prompt_lens[i] + response_lens[i]))
            seq[int(prompt_lens[i]) - 1:int(prompt_lens[i]) - 1 + int(response_lens[i])] = x[i, :int(response_lens[i])]
            rows.append(seq)
        return torch.cat(rows)
    return data, packed


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-sum-norm"])
@pytest.mark.parametrize("verl_name,method", [("vanilla", "ppo"), ("gspo", "gspo-token")])
def test_through_verl_ppo_loss(verl_name, method, mode):
    """verl's own actor loss (KL loss, entropy bonus, global_batch_info filled in by verl) with the
    alignops policy loss plugged in equals it with verl's."""
    from verl.workers.config import PolicyLossConfig
    from verl.workers.utils.losses import ppo_loss
    logp, old, adv, mask, _ = policy_inputs()
    data, packed = verl_engine_batch(logp, old, adv, mask)
    entropy = torch.rand(B, T, generator=torch.Generator().manual_seed(8))
    results = []
    for loss_mode in (verl_name, "alignops_" + method):
        policy = agg_as_given(method, mode, loss_mode) if loss_mode.startswith("alignops_") \
            else PolicyLossConfig(loss_mode=loss_mode)
        cfg = actor_config(mode, clip_ratio_low=0.15, clip_ratio_high=0.28, use_kl_loss=True, entropy_coeff=0.01,
                           loss_scale_factor=11, policy_loss=policy)
        flat_logp, flat_ent = packed(logp).requires_grad_(), packed(entropy).requires_grad_()
        loss, metrics = ppo_loss(cfg, {"log_probs": flat_logp, "entropy": flat_ent}, data)
        results.append((loss.detach(), *torch.autograd.grad(loss, (flat_logp, flat_ent)),
                        metrics["actor/pg_loss"].values, metrics["actor/ppo_kl"].values))
    for a, b in zip(*results):
        torch.testing.assert_close(torch.as_tensor(a), torch.as_tensor(b))


# --------------------------------------------------------------------------------------------
# advantage estimators


def outcome_batch(seed=0):
    """Four prompts (uids shuffled across rows), one of them with equal rewards; scores on the
    last valid token as verl's reward managers place them; one row with no valid token."""
    g = torch.Generator().manual_seed(seed)
    uid = np.array(["p3", "p1", "p0", "p3", "p1", "p2", "p0", "p2", "p1", "p3", "p0", "p2", "p1", "p0"], dtype=object)
    n = len(uid)
    scores = torch.randn(n, generator=g)
    scores[uid == "p2"] = 1.0                       # an equal-reward group
    scores[[1, 6]] = 0.0                            # zero rewards (GPG's alpha counts the non-zero ones)
    lengths = torch.randint(1, T + 1, (n,), generator=g)
    lengths[4] = 0
    mask = (torch.arange(T).unsqueeze(0) < lengths.unsqueeze(1)).float()
    rewards = torch.zeros(n, T)
    rows = torch.arange(n)[lengths > 0]
    rewards[rows, lengths[lengths > 0] - 1] = scores[lengths > 0]
    return rewards, mask, uid


def assert_pair(got, ref, mask=None):
    for a, b in zip(got, ref):
        if mask is not None:
            a, b = a[mask.bool()], b[mask.bool()]
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("norm", [True, False])
def test_grpo_equals_verl(norm):
    rewards, mask, uid = outcome_batch()
    ref = core_algos.compute_grpo_outcome_advantage(rewards, mask, uid, norm_adv_by_std_in_grpo=norm)
    # verl's own driver passes norm_adv_by_std_in_grpo; its generic path passes the AlgoConfig
    assert_pair(aov.grpo(rewards, mask, uid, norm_adv_by_std_in_grpo=norm), ref)
    fn = core_algos.get_adv_estimator_fn("alignops_grpo")
    assert_pair(fn(token_level_rewards=rewards, response_mask=mask, index=uid,
                   config=AlgoConfig(norm_adv_by_std_in_grpo=norm)), ref)
    ref_vec = core_algos.get_adv_estimator_fn("grpo_vectorized")(rewards, mask, uid, norm_adv_by_std_in_grpo=norm)
    assert_pair(aov.grpo(rewards, mask, uid, norm_adv_by_std_in_grpo=norm), ref_vec)
    assert (ref[0][torch.from_numpy(uid == "p2")] == 0).all()


@pytest.mark.parametrize("verl_name", ["rloo", "rloo_vectorized", "gpg", "reinforce_plus_plus_baseline"])
def test_group_estimators_equal_verl(verl_name):
    rewards, mask, uid = outcome_batch(1)
    cfg = AlgoConfig()
    ref = core_algos.get_adv_estimator_fn(verl_name)(token_level_rewards=rewards, response_mask=mask, index=uid,
                                                     config=cfg)
    name = "alignops_" + verl_name.replace("_vectorized", "")
    got = core_algos.get_adv_estimator_fn(name)(token_level_rewards=rewards, response_mask=mask, index=uid, config=cfg)
    assert_pair(got, ref)


@pytest.mark.parametrize("gamma", [1.0, 0.9])
def test_reinforce_plus_plus_equals_verl(gamma):
    rewards, mask, _ = outcome_batch(2)
    rewards = rewards - 0.05 * torch.rand(rewards.shape, generator=torch.Generator().manual_seed(5))  # KL-in-reward
    mask[3, 2:4] = 0                                  # a masked span inside a row (multi-turn observations)
    cfg = AlgoConfig(gamma=gamma)
    ref = core_algos.compute_reinforce_plus_plus_outcome_advantage(rewards, mask, config=cfg)
    got = core_algos.get_adv_estimator_fn("alignops_reinforce_plus_plus")(
        token_level_rewards=rewards, response_mask=mask, config=cfg)
    assert_pair(got, ref)


def test_remax_equals_verl():
    rewards, mask, _ = outcome_batch(3)
    baselines = torch.randn(rewards.shape[0], generator=torch.Generator().manual_seed(4))
    ref = core_algos.compute_remax_outcome_advantage(rewards, baselines, mask, config=AlgoConfig())
    got = core_algos.get_adv_estimator_fn("alignops_remax")(token_level_rewards=rewards, reward_baselines=baselines,
                                                            response_mask=mask, config=AlgoConfig())
    assert_pair(got, ref)


def test_gae_equals_verl_on_valid_tokens():
    rewards, mask, _ = outcome_batch(4)
    mask[3, 2:4] = 0
    g = torch.Generator().manual_seed(6)
    rewards = rewards + 0.1 * torch.randn(rewards.shape, generator=g) * mask
    values = torch.randn(rewards.shape, generator=g)
    ref = core_algos.compute_gae_advantage_return(rewards, values, mask, gamma=0.95, lam=0.9)
    got = aov.gae(rewards, values, mask, gamma=0.95, lam=0.9)
    # verl leaves carried values at masked positions; alignops writes 0 there
    assert_pair(got, ref, mask)
    assert (got[0][mask == 0] == 0).all()
    with pytest.raises(ValueError, match="values"):
        core_algos.get_adv_estimator_fn("alignops_gae")(token_level_rewards=rewards, response_mask=mask,
                                                        config=AlgoConfig())


def test_group_estimator_differences_from_verl():
    """Where verl and alignops differ on purpose (docs/methods.md §1.7): an equal-reward group whose
    mean is inexact in fp32 gets verl's rounding noise divided by epsilon, alignops's exact 0; a
    prompt with one response gets R / (1 + epsilon) from verl's GRPO (mean 0, std 1), R here."""
    rewards = torch.zeros(4, T)
    rewards[:3, -1] = 0.11
    rewards[3, -1] = 2.0
    mask = torch.ones(4, T)
    uid = np.array(["a", "a", "a", "b"], dtype=object)
    ref, _ = core_algos.compute_grpo_outcome_advantage(rewards, mask, uid)
    got, _ = aov.grpo(rewards, mask, uid)
    assert (got[:3] == 0).all() and (ref[:3, -1].abs() > 1e-3).all()
    assert got[3, -1] == 2.0 and ref[3, -1] == pytest.approx(2.0 / (1 + 1e-6), rel=1e-7)


def test_estimator_bad_input_is_named():
    rewards, mask, uid = outcome_batch()
    with pytest.raises(ValueError, match="index"):
        aov.grpo(rewards, mask, None)
    with pytest.raises(ValueError, match="index"):
        aov.rloo(rewards, mask, uid[:-1])
    with pytest.raises(ValueError, match="response_mask"):
        aov.grpo(rewards, mask[:, :-1], uid)
    with pytest.raises(ValueError, match="reward_baselines"):
        aov.remax(rewards, None, mask)
    with pytest.raises(ValueError, match="config"):
        aov.reinforce_plus_plus(rewards, mask)


# --------------------------------------------------------------------------------------------
# fused forward


def fused_inputs(shape=(2, 5), hidden_size=16, vocab=37, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, hidden_size, generator=g, dtype=dtype)
    weight = torch.randn(vocab, hidden_size, generator=g, dtype=dtype) / 2
    weight[7] *= 12                                   # a peaked vocabulary row
    labels = torch.randint(0, vocab, shape, generator=g)
    labels.view(-1)[::3] = 7
    cot_logp = torch.randn(shape, generator=g)
    cot_ent = torch.randn(shape, generator=g)
    return hidden, weight, labels, cot_logp, cot_ent


def grads_of(fn, hidden, weight, labels, cot_logp, cot_ent):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    logp, ent = fn(h, w, labels)
    logp, ent = logp.reshape(labels.shape), ent.reshape(labels.shape)
    dh, dw = torch.autograd.grad((logp * cot_logp).sum() + (ent * cot_ent).sum(), (h, w))
    return logp.detach(), ent.detach(), dh, dw


def float64_head(logits, labels):
    lp = logits.log_softmax(-1)
    return lp.gather(-1, labels.unsqueeze(-1)).squeeze(-1), -(lp.exp() * lp).sum(-1)


def assert_matches_verl(got, ref, truth):
    """Values equal verl's. Gradients are fp32 GEMM sums over the vocabulary whose rounding differs
    between the two implementations by a few ulps of the gradient's largest entry (elementwise
    tolerances fail on cancelled small entries), so both are held to the float64 truth within
    8 ulps of that scale: verl's own gradient passes the same bound."""
    for a, b in zip(got[:2], ref[:2]):
        torch.testing.assert_close(a, b)
    for a, b, t in zip(got[2:], ref[2:], truth[2:]):
        bound = 8 * torch.finfo(torch.float32).eps * float(t.abs().max())
        assert float((b.double() - t).abs().max()) <= bound
        assert float((a.double() - t).abs().max()) <= bound


def truth_of(hidden, weight, labels, cot_logp, cot_ent, temperature):
    h, w = hidden.double().requires_grad_(), weight.double().requires_grad_()
    logp, ent = float64_head(h @ w.T / temperature, labels)
    return [logp, ent, *torch.autograd.grad((logp * cot_logp).sum() + (ent * cot_ent).sum(), (h, w))]


def verl_torch_path(temperature):
    from verl.utils.experimental.torch_functional import FusedLinearForPPO
    module = FusedLinearForPPO(impl_backend="torch")
    return lambda h, w, y: module(h, w, y, temperature)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("shape", [(2, 5), (9,)])
def test_linear_cross_entropy_equals_verl_torch_path(temperature, shape):
    args = fused_inputs(shape)
    ref = grads_of(verl_torch_path(temperature), *args)
    truth = truth_of(*args, temperature)
    got = grads_of(lambda h, w, y: aov.linear_cross_entropy(h, w, y, temperature, "none"), *args)
    assert_matches_verl(got, ref, truth)
    module = aov.AlignopsFusedLinearForPPO()
    got = grads_of(lambda h, w, y: module(h, w, y, temperature), *args)
    assert_matches_verl(got, ref, truth)


def test_linear_cross_entropy_contract():
    hidden, weight, labels, _, _ = fused_inputs()
    logp, ent = aov.linear_cross_entropy(hidden, weight, labels, 0.7, "none")
    assert logp.shape == ent.shape == (labels.numel(),) and logp.dtype == ent.dtype == torch.float32
    ref, _ = verl_torch_path(0.7)(hidden, weight, labels)
    for reduction, reduce in (("sum", torch.sum), ("mean", torch.mean)):
        total, ent_r = aov.linear_cross_entropy(hidden, weight, labels, 0.7, reduction)
        torch.testing.assert_close(total, reduce(ref))
        torch.testing.assert_close(ent_r, ent)
    with pytest.raises(ValueError, match="reduction"):
        aov.linear_cross_entropy(hidden, weight, labels, 0.7, "max")
    with pytest.raises(TypeError, match="temperature"):
        aov.linear_cross_entropy(hidden, weight, labels, "0.7")
    with pytest.raises(ValueError, match="labels"):
        aov.linear_cross_entropy(hidden, weight, labels[:, :-1])
    # Megatron's packed layout: hidden [N, 1, H], labels [1, N]
    packed_logp, _ = aov.linear_cross_entropy(hidden.reshape(-1, 1, hidden.shape[-1]), weight,
                                              labels.reshape(1, -1), 0.7, "none")
    torch.testing.assert_close(packed_logp, logp)
    with pytest.raises(ValueError, match="impl_backend"):
        aov.AlignopsFusedLinearForPPO(impl_backend="triton")
    # bf16 hidden: entropy in the hidden dtype, as verl's FusedLinearForPPO returns it
    _, ent16 = aov.AlignopsFusedLinearForPPO()(hidden.bfloat16(), weight.bfloat16(), labels)
    assert ent16.dtype == torch.bfloat16


def test_dist_process_group_goes_to_vocab_process_group(monkeypatch):
    """The plumbing with a stand-in group (the real two-rank run is in the plugin test below)."""
    hidden, weight, labels, _, _ = fused_inputs()
    group = object()
    seen = {}

    def with_keyword(hidden, weight, labels, *, temperature, compute_entropy, chunk_size, vocab_process_group=None,
                     vocab_start=None, reduce_hidden_grad=True):
        seen.update(group=vocab_process_group, start=vocab_start, reduce=reduce_hidden_grad)
        # a stand-in whose dhidden is all ones: the drop-in must pass it back untouched
        return hidden.sum(-1), torch.zeros(labels.numel())

    def without_keyword(hidden, weight, labels, *, temperature, compute_entropy, chunk_size):
        raise AssertionError("must not be called with a process group it cannot take")

    with pytest.raises(ValueError, match="torch.distributed"):
        aov.linear_cross_entropy(hidden, weight, labels, 1.0, "none", group)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda g=None: 4 if g is group else 1)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda g=None: 3 if g is group else 0)
    monkeypatch.setattr(ao, "fused_linear_token_logprobs", with_keyword)
    h = hidden.clone().requires_grad_()
    logp, _ = aov.linear_cross_entropy(h, weight, labels, 1.0, "none", group)
    logp.sum().backward()
    # this rank's rows start at rank * V_r; its dhidden is this rank's partial, as verl's kernel returns
    # it (the sum is its caller's: tests/test_tensor_parallel.py runs it at 2 ranks)
    assert seen == {"group": group, "start": 3 * weight.shape[0], "reduce": False}
    torch.testing.assert_close(h.grad, torch.ones_like(h))
    aov.linear_cross_entropy(hidden, weight, labels, 1.0, "none", None)
    assert seen["group"] is None
    monkeypatch.setattr(ao, "fused_linear_token_logprobs", without_keyword)
    with pytest.raises(NotImplementedError, match="vocab_process_group"):
        aov.linear_cross_entropy(hidden, weight, labels, 1.0, "none", group)
    # a one-rank group (Megatron at TP = 1) shards nothing: the plain path
    one_rank = object()
    monkeypatch.setattr(ao, "fused_linear_token_logprobs", ao.fused_linear.fused_linear_token_logprobs)
    logp, _ = aov.linear_cross_entropy(hidden, weight, labels, 1.0, "none", one_rank)
    torch.testing.assert_close(logp, verl_torch_path(1.0)(hidden, weight, labels)[0].reshape(-1))


def tiny_causal_lm():
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return Qwen2ForCausalLM(cfg).float()


def hf_forward(forward, model, input_ids):
    model.zero_grad()
    if forward is None:   # the float64 truth: the model's own logits, rolled labels as verl's forwards
        out = model(input_ids=input_ids)
        logp, ent = float64_head(out.logits / 0.7, torch.roll(input_ids, shifts=-1, dims=-1))
    else:
        out = forward(model, input_ids=input_ids, return_dict=True, temperature=0.7)
        logp, ent = out.log_probs.reshape(input_ids.shape), out.entropy.reshape(input_ids.shape)
    g = torch.Generator().manual_seed(9)
    ((logp * torch.randn(logp.shape, generator=g)).sum() + (ent * torch.randn(ent.shape, generator=g)).sum()).backward()
    return [logp.detach(), ent.detach(), model.lm_head.weight.grad.clone(),
            model.model.embed_tokens.weight.grad.clone()]


def test_install_fused_forward_in_verl_hf_forwards():
    """verl's patched HF forwards (use_fused_kernels, backends "triton" and "torch") run alignops
    after install_fused_forward and equal verl's own CPU path."""
    import verl.utils.experimental.torch_functional as tf
    import verl.utils.kernel.linear_cross_entropy as lce
    from verl.models.transformers import dense_common

    model = tiny_causal_lm()
    input_ids = torch.randint(0, 61, (2, 7), generator=torch.Generator().manual_seed(1))
    original_lce, original_cls = lce.linear_cross_entropy, tf.FusedLinearForPPO
    ref = hf_forward(dense_common.forward_with_torch_backend, model, input_ids)
    truth = hf_forward(None, copy.deepcopy(model).double(), input_ids)
    aov.install_fused_forward()
    try:
        assert lce.linear_cross_entropy is aov.linear_cross_entropy
        assert tf.FusedLinearForPPO is aov.AlignopsFusedLinearForPPO
        for forward in (dense_common.forward_with_triton_backend, dense_common.forward_with_torch_backend):
            assert_matches_verl(hf_forward(forward, model, input_ids), ref, truth)
    finally:
        aov.uninstall_fused_forward()
    assert lce.linear_cross_entropy is original_lce and tf.FusedLinearForPPO is original_cls


# --------------------------------------------------------------------------------------------
# registration through verl's plugin loader


PROBE = """
import datetime, json, sys
import torch
import verl
from verl.trainer.ppo import core_algos
import verl.utils.kernel.linear_cross_entropy as lce
out = {
    "loaded": "alignops.integrations.verl" in sys.modules,
    "policy_losses": sorted(k for k in core_algos.POLICY_LOSS_REGISTRY if k.startswith("alignops_")),
    "adv_estimators": sorted(k for k in core_algos.ADV_ESTIMATOR_REGISTRY if k.startswith("alignops_")),
    "fused": getattr(lce.linear_cross_entropy, "__module__", None),
}
if len(sys.argv) > 1:
    # one of two tensor-parallel ranks: verl's linear_cross_entropy (now alignops's) on this rank's
    # half of the lm_head rows, against verl's torch path on the whole vocabulary
    import torch.distributed as dist
    from verl.utils.experimental.torch_functional import FusedLinearForPPOFunction
    rank = int(sys.argv[1])
    # a rank that fails leaves the other in a collective: a short timeout ends it too
    dist.init_process_group("gloo", init_method="file://" + sys.argv[2], rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    g = torch.Generator().manual_seed(0)
    n, h, v = 10, 16, 38
    hidden, weight = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) / 2
    labels = torch.randint(0, v, (n,), generator=g)
    cot_logp, cot_ent = torch.randn(n, generator=g), torch.randn(n, generator=g)
    rows = slice(rank * v // 2, (rank + 1) * v // 2)
    hid, w = hidden.clone().requires_grad_(), weight[rows].clone().requires_grad_()
    logp, ent = lce.linear_cross_entropy(hid, w, labels, 0.7, "none", dist.group.WORLD)
    ((logp * cot_logp).sum() + (ent * cot_ent).sum()).backward()
    dh = hid.grad.clone()
    dist.all_reduce(dh)  # what the backward of Megatron's sequence-parallel gather sums
    ref_logp, ref_ent = FusedLinearForPPOFunction.apply(hidden, weight, labels, 0.7, 512)
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    lp = (h64 @ w64.T / 0.7).log_softmax(-1)
    t_logp, t_ent = lp.gather(-1, labels[:, None]).squeeze(-1), -(lp.exp() * lp).sum(-1)
    t_dh, t_dw = torch.autograd.grad((t_logp * cot_logp).sum() + (t_ent * cot_ent).sum(), (h64, w64))
    eps = torch.finfo(torch.float32).eps
    out["tp"] = {"logp": float((logp - ref_logp).abs().max()), "entropy": float((ent - ref_ent).abs().max()),
                 "dh": float((dh.double() - t_dh).abs().max()), "dh_bound": 8 * eps * float(t_dh.abs().max()),
                 "dw": float((w.grad.double() - t_dw[rows]).abs().max()),
                 "dw_bound": 8 * eps * float(t_dw.abs().max())}
    dist.destroy_process_group()
print(json.dumps(out))
"""


def probe_env(**env):
    full_env = {k: v for k, v in os.environ.items() if k not in ("VERL_USE_EXTERNAL_PLUGINS", aov.FUSED_FORWARD_ENV)}
    full_env.update(env)
    return full_env


def probe_result(proc):
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    return json.loads(stdout.strip().splitlines()[-1])


def probe_verl(*args, **env):
    return subprocess.Popen([sys.executable, "-c", PROBE, *args], env=probe_env(**env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_entry_point_is_declared():
    from importlib.metadata import entry_points
    eps = {ep.name: ep.value for ep in entry_points(group="verl.plugins")}
    assert eps.get("alignops") == "alignops.integrations.verl"


def test_plain_import_verl_registers_everything():
    """verl imports the plugin while verl/__init__.py runs and swallows its errors at DEBUG level:
    only the registries after a plain `import verl` in a fresh interpreter show it worked."""
    store = tempfile.mkdtemp() + "/store"
    ranks = [probe_verl(str(rank), store, **{aov.FUSED_FORWARD_ENV: "1"}) for rank in (0, 1)]
    try:
        results = [probe_result(p) for p in ranks]
    finally:
        for p in ranks:
            if p.poll() is None:
                p.kill()
                p.wait()
    for got in results:
        assert got["loaded"]
        assert got["policy_losses"] == sorted(["alignops_" + m for m in method_names()] + ["alignops_bypass_mode"])
        assert {"alignops_clip_cov", "alignops_kl_cov", "alignops_dro", "alignops_bypass_mode"} <= set(
            got["policy_losses"])
        assert got["adv_estimators"] == sorted("alignops_" + e for e in aov.ADVANTAGE_ESTIMATORS)
        assert got["fused"] == "alignops.integrations.verl"
        # the vocabulary split over two ranks, as Megatron's TP group hands it to linear_cross_entropy
        # (the probe fails, and with it this test, if the tensor-parallel path is refused or gone)
        tp = got["tp"]
        assert tp["logp"] <= 1e-5 and tp["entropy"] <= 1e-5
        assert tp["dh"] <= tp["dh_bound"] and tp["dw"] <= tp["dw_bound"]
    # control: with verl's plugin discovery off, nothing of alignops is there
    off = probe_result(probe_verl(VERL_USE_EXTERNAL_PLUGINS="none"))
    assert not off["loaded"] and off["policy_losses"] == [] and off["adv_estimators"] == []
    assert off["fused"] != "alignops.integrations.verl"


def test_register_is_idempotent():
    before = dict(core_algos.ADV_ESTIMATOR_REGISTRY)
    names = aov.register()
    assert dict(core_algos.ADV_ESTIMATOR_REGISTRY) == before
    assert set(names["policy_losses"]) <= set(core_algos.POLICY_LOSS_REGISTRY)


# --------------------------------------------------------------------------------------------
# advantage estimators: opo, grpo_passk, gdpo, optimal_token_baseline, tir_optimal_token_baseline


def with_singleton(rewards, mask, uid, score=0.7):
    """outcome_batch plus a prompt with a single response (its score on its last valid token)."""
    row = torch.zeros(1, T)
    row[0, 4] = score
    m = (torch.arange(T) < 5).float().unsqueeze(0)
    return torch.cat([rewards, row]), torch.cat([mask, m]), np.append(uid, np.array(["solo"], dtype=object))


def test_opo_equals_verl():
    rewards, mask, uid = with_singleton(*outcome_batch(5))
    cfg = AlgoConfig()
    ref = core_algos.get_adv_estimator_fn("opo")(token_level_rewards=rewards, response_mask=mask, index=uid, config=cfg)
    got = core_algos.get_adv_estimator_fn("alignops_opo")(token_level_rewards=rewards, response_mask=mask, index=uid,
                                                          config=cfg)
    assert_pair(got, ref)
    assert (got[0][-1, :5] == 0.7).all()  # the prompt with one response keeps its score (baseline 0), as in verl


def test_opo_differences_from_verl():
    """A prompt whose responses have no valid token: verl's baseline is 0 / 0, and its NaN reaches every
    position of those rows (NaN * 0 = NaN); alignops uses the plain mean, and masked positions hold 0."""
    rewards, mask, uid = outcome_batch(5)
    mask[torch.from_numpy(uid == "p2")] = 0
    rewards = rewards * mask
    ref, _ = core_algos.compute_opo_outcome_advantage(rewards, mask, uid)
    got, _ = aov.opo(rewards, mask, uid)
    assert torch.isnan(ref[torch.from_numpy(uid == "p2")]).all()
    assert torch.isfinite(got).all() and (got[mask == 0] == 0).all()
    keep = torch.from_numpy(uid != "p2")
    torch.testing.assert_close(got[keep], ref[keep])


@pytest.mark.parametrize("norm", [True, False])
def test_grpo_passk_equals_verl(norm):
    rewards, mask, uid = outcome_batch(6)
    cfg = AlgoConfig(norm_adv_by_std_in_grpo=norm)
    ref = core_algos.get_adv_estimator_fn("grpo_passk")(token_level_rewards=rewards, response_mask=mask, index=uid,
                                                        config=cfg)
    got = core_algos.get_adv_estimator_fn("alignops_grpo_passk")(token_level_rewards=rewards, response_mask=mask,
                                                                 index=uid, config=cfg)
    assert_pair(got, ref)
    # one non-zero row in each group of distinct rewards (p2's rewards are equal: none there)
    assert int((got[0].abs().sum(-1) > 0).sum()) == 3
    # a prompt with one response is an error in both
    one = with_singleton(rewards, mask, uid)
    with pytest.raises(ValueError, match="at least 2 samples"):
        core_algos.compute_grpo_passk_outcome_advantage(*one, config=cfg)
    with pytest.raises(ValueError, match="single scorable reward"):
        aov.grpo_passk(*one, config=cfg)


def test_grpo_passk_without_config():
    """verl's grpo_passk asserts a config and reads norm_adv_by_std_in_grpo from it only (its own
    argument is ignored); alignops_grpo_passk takes the argument when there is no config."""
    rewards, mask, uid = outcome_batch(6)
    with pytest.raises(AssertionError):
        core_algos.compute_grpo_passk_outcome_advantage(rewards, mask, uid)
    ref = core_algos.compute_grpo_passk_outcome_advantage(rewards, mask, uid,
                                                          config=AlgoConfig(norm_adv_by_std_in_grpo=False))
    assert_pair(aov.grpo_passk(rewards, mask, uid, norm_adv_by_std_in_grpo=False), ref)


def gdpo_batch(seed=7):
    """outcome_batch with two reward components per row in non_tensor_batch, as compute_score returns
    them, and the prompts / attention_mask verl's gdpo reads the response lengths from."""
    rewards, mask, uid = outcome_batch(seed)
    g = torch.Generator().manual_seed(seed)
    n = len(uid)
    acc = (torch.rand(n, generator=g) > 0.5).double().numpy()
    fmt = torch.rand(n, generator=g).double().numpy().round(1)
    acc[uid == "p2"] = 1.0                                   # a component equal within a group
    batch = {"prompts": torch.zeros(n, 3, dtype=torch.long),
             "attention_mask": torch.cat([torch.ones(n, 3), mask], -1).long()}
    return rewards, mask, uid, {"uid": uid, "acc": acc, "fmt": fmt}, batch


@pytest.mark.parametrize("weights", [None, [1.0, 0.5]])
def test_gdpo_equals_verl(weights):
    rewards, mask, uid, ntb, batch = gdpo_batch()
    cfg = AlgoConfig(gdpo_reward_keys=["acc", "fmt"], gdpo_reward_weights=weights)
    kw = dict(token_level_rewards=rewards, response_mask=mask, index=uid, config=cfg, non_tensor_batch=ntb,
              batch=batch)
    ref = core_algos.get_adv_estimator_fn("gdpo")(**kw)
    got = core_algos.get_adv_estimator_fn("alignops_gdpo")(**kw)
    assert_pair(got, ref)
    # without gdpo_reward_keys the one component is the row's reward: GRPO, then whitened
    cfg1 = AlgoConfig()
    ref1 = core_algos.get_adv_estimator_fn("gdpo")(token_level_rewards=rewards, response_mask=mask, index=uid,
                                                   config=cfg1)
    got1 = core_algos.get_adv_estimator_fn("alignops_gdpo")(token_level_rewards=rewards, response_mask=mask,
                                                            index=uid, config=cfg1)
    assert_pair(got1, ref1)


def test_gdpo_differences_from_verl():
    """verl's gdpo ignores algorithm.norm_adv_by_std_in_grpo (it hands its own argument, default True, to
    its GRPO), and with gdpo_reward_keys set but no non_tensor_batch it silently falls back to the one
    summed reward; alignops_gdpo reads the config and refuses the second case (verl 0.9.1's
    compute_advantage passes non_tensor_batch only to the estimator named "gdpo")."""
    rewards, mask, uid, ntb, batch = gdpo_batch()
    off = AlgoConfig(gdpo_reward_keys=["acc", "fmt"], norm_adv_by_std_in_grpo=False)
    kw = dict(token_level_rewards=rewards, response_mask=mask, index=uid, non_tensor_batch=ntb, batch=batch)
    verl_default = core_algos.compute_gdpo_outcome_advantage(config=off, **kw)
    verl_off = core_algos.compute_gdpo_outcome_advantage(config=off, norm_adv_by_std_in_grpo=False, **kw)
    got = aov.gdpo(config=off, **kw)
    assert_pair(got, verl_off)
    assert (got[0] - verl_default[0]).abs().max() > 1e-2
    with pytest.raises(ValueError, match="non_tensor_batch"):
        aov.gdpo(rewards, mask, uid, config=off)
    fallback = core_algos.compute_gdpo_outcome_advantage(rewards, mask, uid, config=off)
    assert_pair(aov.gdpo(rewards, mask, uid), fallback)
    with pytest.raises(ValueError, match="'speed'"):
        aov.gdpo(rewards, mask, uid, config=AlgoConfig(gdpo_reward_keys=["acc", "speed"]), non_tensor_batch=ntb,
                 batch=batch)


# uids of with_singleton(outcome_batch()): p0 rows 2, 6, 10, 13; p1 rows 1, 4, 8, 12; p2 rows 5, 7, 11;
# p3 rows 0, 3, 9; solo row 14. p0's longest row (2) is unique (a zero tail from its 5th token on), p1,
# p2 and p3 have two rows of their longest length, row 4 is empty.
OTB_LENGTHS = [9, 6, 9, 7, 0, 4, 3, 7, 2, 9, 5, 7, 6, 1, 5]


def otb_batch(seed=8, holes=False, dtype=torch.float32):
    """Token rewards (an outcome plus a small per-token term) and old_log_probs / sum_pi_squared of a
    distribution (sum pi^2 >= pi^2). holes: masked spans inside rows 0, 3 and 10 (tool outputs)."""
    _, _, uid = with_singleton(*outcome_batch(seed))
    g = torch.Generator().manual_seed(seed)
    n = len(uid)
    lengths = torch.tensor(OTB_LENGTHS)
    mask = (torch.arange(T)[None] < lengths[:, None]).to(dtype)
    if holes:
        mask[0, 2:4] = mask[3, 2:4] = mask[10, 1:3] = 0
    rewards = (0.02 * torch.randn(n, T, generator=g, dtype=dtype)) * mask
    last = torch.arange(n)[lengths > 0]
    rewards[last, lengths[last] - 1] += torch.randn(len(last), generator=g, dtype=dtype)
    pi = torch.rand(n, T, generator=g, dtype=dtype) * 0.9 + 0.05
    s2 = pi ** 2 + torch.rand(n, T, generator=g, dtype=dtype) * (1 - pi) ** 2
    return rewards, mask, uid, pi.log(), s2


@pytest.mark.parametrize("zero_tail", [True, False])
@pytest.mark.parametrize("is_weights", [False, True])
@pytest.mark.parametrize("name,holes", [("optimal_token_baseline", False), ("tir_optimal_token_baseline", False),
                                        ("tir_optimal_token_baseline", True)])
def test_optimal_token_baseline_equals_verl(name, holes, is_weights, zero_tail):
    rewards, mask, uid, old, s2 = otb_batch(holes=holes)
    rho = torch.rand(rewards.shape, generator=torch.Generator().manual_seed(9)) * 2 if is_weights else None
    kw = dict(token_level_rewards=rewards, response_mask=mask, index=uid, old_log_probs=old, sum_pi_squared=s2,
              rollout_is_weights=rho, handle_zero_tail=zero_tail)
    ref = core_algos.get_adv_estimator_fn(name)(**kw)
    got = core_algos.get_adv_estimator_fn("alignops_" + name)(config=AlgoConfig(), **kw)
    # verl's returns carry the return-to-go across masked positions; alignops writes 0 there
    assert_pair(got, ref, mask)
    assert (got[0][mask == 0] == 0).all() and (got[1][mask == 0] == 0).all()
    assert torch.equal(got[0][14], got[1][14])  # the prompt with one response: no baseline, A = G
    if zero_tail:  # p0's row 2 alone beyond p0's second-longest row (5 tokens): baseline 0 there
        assert torch.equal(got[0][2, 5:], got[1][2, 5:])


def test_optimal_token_baseline_with_masked_spans_equals_verl_without_zero_tail():
    rewards, mask, uid, old, s2 = otb_batch(holes=True)
    kw = dict(token_level_rewards=rewards, response_mask=mask, index=uid, old_log_probs=old, sum_pi_squared=s2,
              handle_zero_tail=False)
    assert_pair(aov.optimal_token_baseline(**kw), core_algos.compute_optimal_token_baseline_advantage(**kw), mask)


def test_optimal_token_baseline_differences_from_verl():
    """Where alignops departs from verl on purpose (docs/methods.md §2.43)."""
    otb = core_algos.compute_optimal_token_baseline_advantage
    tir = core_algos.compute_multi_turn_optimal_token_baseline_advantage
    # 1. The zero tail of optimal_token_baseline with masked spans: verl zeroes the unique longest row's
    # baseline from the column equal to the second-longest row's token count, alignops where that row is
    # the only one of its group valid at the column. p0: row 10 (5 columns, 1-2 masked: 3 tokens) is
    # valid at columns 3 and 4 beside row 2; p3: row 0 (9 columns, 7 tokens) is valid at columns 7
    # and 8 beside row 9, while at columns 2 and 3 row 9 is alone (rows 0 and 3 masked there).
    rewards, mask, uid, old, s2 = otb_batch(holes=True)
    kw = dict(token_level_rewards=rewards, response_mask=mask, index=uid, old_log_probs=old, sum_pi_squared=s2)
    ref, ref_ret = otb(**kw)
    got, ret = aov.optimal_token_baseline(**kw)
    verl_zero, ours_zero = torch.zeros_like(mask, dtype=torch.bool), torch.zeros_like(mask, dtype=torch.bool)
    verl_zero[2, 3:5] = verl_zero[9, 7:9] = ours_zero[9, 2:4] = True
    assert torch.equal(ref[verl_zero], ref_ret[verl_zero]) and (got[verl_zero] - ret[verl_zero]).abs().min() > 1e-3
    assert torch.equal(got[ours_zero], ret[ours_zero]) and (ref[ours_zero] - ret[ours_zero]).abs().min() > 1e-3
    same = ~verl_zero & ~ours_zero & (mask > 0)
    torch.testing.assert_close(got[same], ref[same])
    # 2. An index where every row of the group has W = 0 (deterministic tokens, pi = 1, sum pi^2 = 1):
    # verl's baseline is 0 / (0 + eps) = 0, alignops's the plain mean of the returns there.
    rewards, mask, uid, old, s2 = otb_batch()
    p1 = torch.from_numpy(uid == "p1")
    old[p1, 0], s2[p1, 0] = 0.0, 1.0
    kw = dict(token_level_rewards=rewards, response_mask=mask, index=uid, old_log_probs=old, sum_pi_squared=s2)
    ref, _ = otb(**kw)
    got, ret = aov.optimal_token_baseline(**kw)
    rows = torch.nonzero(p1 & (mask[:, 0] > 0)).flatten()
    torch.testing.assert_close(ref[rows, 0], ret[rows, 0])
    torch.testing.assert_close(got[rows, 0], ret[rows, 0] - ret[rows, 0].mean())
    # 3. Equal returns in a group: verl leaves G eps / (sum W + eps), alignops exactly 0 (float64 here,
    # where verl's eps = 1e-8 is not lost in the rounding)
    rewards, mask, uid, old, s2 = otb_batch(dtype=torch.float64)
    rewards = torch.where(mask > 0, 0.0, rewards)
    rewards[torch.arange(len(uid)), (mask.sum(-1).long() - 1).clamp_min(0)] = 0.3 * mask.amax(-1)
    kw = dict(token_level_rewards=rewards, response_mask=mask, index=uid, old_log_probs=old, sum_pi_squared=s2,
              handle_zero_tail=False)
    ref, _ = otb(**kw)
    got, _ = aov.optimal_token_baseline(**kw)
    group = torch.from_numpy(uid != "solo").unsqueeze(-1) & (mask > 0)
    assert (got[group] == 0).all() and (ref[group] != 0).any() and ref[group].abs().max() < 1e-7
    # 4. A group with one row that has tokens and one empty row, without the zero tail: verl's
    # optimal_token_baseline counts the empty row (two rows: A = G eps / (W + eps), ~0), its
    # tir_optimal_token_baseline does not (one row: A = G); alignops counts rows with tokens in both.
    r = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    m = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    kw = dict(token_level_rewards=r, response_mask=m, index=np.array(["a", "a"], dtype=object),
              old_log_probs=torch.full((2, 3), -0.7), sum_pi_squared=torch.full((2, 3), 0.4), handle_zero_tail=False)
    assert otb(**kw)[0].abs().max() < 1e-6
    assert torch.equal(tir(**kw)[0], r.flip(-1).cumsum(-1).flip(-1) * m)
    for fn in (aov.optimal_token_baseline, aov.tir_optimal_token_baseline):
        assert torch.equal(fn(**kw)[0], tir(**kw)[0])


def test_new_estimator_bad_input_is_named():
    rewards, mask, uid, old, s2 = otb_batch()
    for fn in (aov.optimal_token_baseline, aov.tir_optimal_token_baseline):
        with pytest.raises(ValueError, match="old_log_probs and sum_pi_squared"):
            fn(rewards, mask, uid, config=AlgoConfig())
        with pytest.raises(ValueError, match="index"):
            fn(rewards, mask, None, old_log_probs=old, sum_pi_squared=s2)
    with pytest.raises(ValueError, match="response_mask"):
        aov.opo(rewards, mask[:, :-1], uid)
    with pytest.raises(ValueError, match="index"):
        aov.grpo_passk(rewards, mask, uid[:-1], config=AlgoConfig())
    with pytest.raises(ValueError, match="gdpo_reward_keys"):
        aov.gdpo(rewards, mask, uid, config=AlgoConfig(), non_tensor_batch={"uid": uid}, batch={})
