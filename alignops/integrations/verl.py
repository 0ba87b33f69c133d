"""alignops inside verl 0.9: every alignops method as a verl policy loss, alignops's advantage
estimators as verl estimators, and the fused lm_head pass in verl's fused-kernel path.

Installing alignops is enough: verl imports this module through the `verl.plugins` entry point
when `verl` itself is imported (in the driver and in every Ray worker), and the import registers
`alignops_<method>` policy losses and `alignops_<estimator>` advantage estimators:

    actor_rollout_ref.actor.policy_loss.loss_mode=alignops_dapo   # any ao.policy.registry method
    algorithm.adv_estimator=alignops_grpo                         # grpo, rloo, gpg, remax, opo, gdpo, ...

`alignops_<method>` is that method, with its own defaults: a verl field the loss reads
(clip_ratio_low/high, clip_ratio_c, loss_agg_mode) that is at verl's default counts as unset, and the
method's own default applies where it has one (alignops_gspo: 3e-4/4e-4 and seq-mean-token-mean;
alignops_dapo: clip high 0.28; alignops_cispo: no lower bound). A field set to any other value is
used as verl's own losses use it (see policy_loss_kwargs). loss_scale_factor, tau_pos/tau_neg and
the global batch normalisers of `global_batch_info` keep verl's meaning. alignops-only options, and
values that must win even when they equal verl's defaults (clip_low, clip_high, clip_ratio_c, agg),
go in a `policy_loss.alignops` mapping, which verl's structured config accepts once
`policy_loss._target_` names `AlignopsPolicyLossConfig`:

    actor_rollout_ref.actor.policy_loss._target_=alignops.integrations.verl.AlignopsPolicyLossConfig
    +actor_rollout_ref.actor.policy_loss.alignops.gppo_beta1=0.25

verl adds the KL loss itself, with its own `kl_loss_type`: verl's "k3" and "low_var_kl" are both the
clamped k3, alignops's "low_var_kl" (`kl_estimator_from_verl` translates verl's names).

The fused forward: `install_fused_forward()` (or ALIGNOPS_VERL_FUSED_FORWARD=1 in the workers'
environment) makes verl's `linear_cross_entropy` and `FusedLinearForPPO` compute log-probs and
entropy from the hidden states with `ao.fused_linear_token_logprobs` (verl's
`actor_rollout_ref.model.use_fused_kernels=True` selects that path).

    import alignops.integrations.verl as aov
    loss, metrics = aov.policy_loss_fn("dapo")(old_logp, logp, adv, mask, "token-mean", actor_config)
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
from collections.abc import Mapping
from typing import Any, Callable

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

import alignops as ao
from alignops.policy.registry import SHARED_DEFAULTS, get_method, method_names
from alignops.policy.math import VERL_KL_LOSS_TYPES, kl_estimator_from_verl  # noqa: F401 - re-exported

PREFIX = "alignops_"
FUSED_FORWARD_ENV = "ALIGNOPS_VERL_FUSED_FORWARD"

# verl applies its dual clip (clip_ratio_c, default 3.0) only in its PPO surrogate ("vanilla");
# these alignops methods are that surrogate, so they take it (at verl's default, gppo_klear keeps
# its own 10). The others keep alignops's default (off) unless policy_loss.alignops.clip_ratio_c sets it.
DUAL_CLIP_METHODS = frozenset({"ppo", "grpo", "dapo", "dr_grpo", "ecpo", "bapo", "gppo", "gppo_klear"})
# Methods whose "actor/pg_clipfrac" is verl's: the share of tokens where the PPO clip is active.
CLIPFRAC_METHODS = DUAL_CLIP_METHODS | {"gspo", "gspo-token"}
# verl's policy_loss_fn adds the KL and entropy terms itself, and the normaliser comes from
# global_batch_info: these policy_loss arguments are not options here. (`agg` is an option: it sets the
# policy term's aggregation whatever loss_agg_mode says, e.g. token-mean for alignops_gspo.)
_VERL_OWNED = {
    "kl_coef": "actor.use_kl_loss / kl_loss_coef",
    "kl_estimator": "actor.kl_loss_type, in verl's names: verl computes the KL loss itself, and its 'k3' and "
                    "'low_var_kl' are both alignops's low_var_kl (alignops.integrations.verl.kl_estimator_from_verl)",
    "ref_logp": "actor.use_kl_loss", "entropy": "actor.entropy_coeff", "entropy_coef": "actor.entropy_coeff",
    "normalizer": "the global batch info verl sets",
    "max_len": "actor.loss_scale_factor", "rollout_is_weights": "algorithm.rollout_correction",
    "cu_seqlens": "verl's padded [B, T] layout", "method": "policy_loss.loss_mode",
}
_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")

# verl's ActorConfig defaults of the fields an alignops loss reads (verl 0.9.1's, read from the
# installed verl where it is there). A field at its default counts as unset (policy_loss_kwargs).
_VERL_0_9_DEFAULTS = {"clip_ratio": 0.2, "clip_ratio_low": 0.2, "clip_ratio_high": 0.2, "clip_ratio_c": 3.0,
                      "loss_agg_mode": "token-mean"}


def _verl_defaults() -> dict:
    try:
        from verl.workers.config import ActorConfig  # noqa: PLC0415
    except ImportError:
        return dict(_VERL_0_9_DEFAULTS)
    fields = {f.name: f.default for f in dataclasses.fields(ActorConfig)}
    return {k: v if fields.get(k, dataclasses.MISSING) is dataclasses.MISSING else fields[k]
            for k, v in _VERL_0_9_DEFAULTS.items()}


VERL_DEFAULTS = _verl_defaults()

try:
    from verl.workers.config import PolicyLossConfig as _VerlPolicyLossConfig
except ImportError:  # an older verl: the alignops mapping is then read from a DictConfig only
    _VerlPolicyLossConfig = None

if _VerlPolicyLossConfig is not None:
    @dataclasses.dataclass
    class AlignopsPolicyLossConfig(_VerlPolicyLossConfig):
        """verl's PolicyLossConfig plus `alignops`: options passed to ao.policy_loss (method options,
        clip_low/clip_high/clip_ratio_c/ratio_log_clamp overrides)."""
        alignops: dict = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# policy losses


def _cfg_get(cfg, key, default=None):
    """A field of a verl config: a BaseConfig dataclass, an OmegaConf DictConfig or a dict."""
    if cfg is None:
        return default
    getter = getattr(cfg, "get", None)
    return getter(key, default) if callable(getter) else getattr(cfg, key, default)


def alignops_options(config) -> dict:
    """The `policy_loss.alignops` mapping of a verl actor config, checked ({} when absent)."""
    opts = _cfg_get(_cfg_get(config, "policy_loss"), "alignops")
    if opts is None:
        return {}
    if not isinstance(opts, Mapping):
        raise TypeError(f"policy_loss.alignops must be a mapping of ao.policy_loss options, got {type(opts).__name__}")
    if isinstance(opts, DictConfig):
        opts = OmegaConf.to_container(opts, resolve=True)
    opts = dict(opts)
    owned = sorted(set(opts) & set(_VERL_OWNED))
    if owned:
        raise ValueError(f"policy_loss.alignops sets {owned}, which verl owns: use "
                         + "; ".join(f"{k!r} -> {_VERL_OWNED[k]}" for k in owned))
    return opts


def _global_count(name: str, value, dp_size: int):
    if value is None:
        if dp_size > 1:
            raise ValueError(f"global_batch_info[{name!r}] is required when dp_size={dp_size} > 1")
        return None
    return value / dp_size


def aggregation(loss_agg_mode: str, response_mask: Tensor, global_batch_info: Mapping | None) -> dict:
    """verl's agg_loss(loss_agg_mode, dp_size, batch_num_tokens, global_batch_size,
    loss_scale_factor) as ao.policy_loss's `agg=`, `normalizer=` (and `max_len=`).

    verl scales each rank's loss by dp_size because the data-parallel gradient is averaged: the
    rank's normaliser is the global count divided by dp_size. Without global counts (one rank)
    the counts are this micro-batch's, which is also alignops's default normaliser.
    """
    if loss_agg_mode not in _AGG_MODES:
        raise ValueError(f"loss_agg_mode must be one of {_AGG_MODES}, got {loss_agg_mode!r}")
    info = dict(global_batch_info or {})
    dp_size = info.get("dp_size") or 1
    if isinstance(dp_size, Tensor) and dp_size.numel() == 1 and not dp_size.dtype.is_floating_point:
        dp_size = int(dp_size)
    if isinstance(dp_size, bool) or not isinstance(dp_size, int) or dp_size < 1:
        raise ValueError(f"global_batch_info['dp_size'] must be a positive int, got {dp_size!r}")
    if loss_agg_mode == "token-mean":
        return {"agg": "token-mean", "normalizer": _global_count("batch_num_tokens", info.get("batch_num_tokens"),
                                                                 dp_size)}
    if loss_agg_mode == "token-sum":
        return {"agg": "token-mean", "normalizer": 1.0 / dp_size}
    rows = _global_count("global_batch_size", info.get("global_batch_size"), dp_size)
    if loss_agg_mode != "seq-mean-token-sum-norm":
        return {"agg": loss_agg_mode, "normalizer": rows}
    # verl's constant C: loss_scale_factor, else the padded response length
    scale = info.get("loss_scale_factor")
    scale = response_mask.shape[-1] if scale is None else scale
    if rows is None:
        return {"agg": loss_agg_mode, "normalizer": None, "max_len": scale}
    return {"agg": loss_agg_mode, "normalizer": rows * scale}


def own_default(method: str, knob: str):
    """`method`'s own default of a shared knob (clip_low, clip_high, clip_ratio_c, agg): its
    registry default where that differs from the shared one (ppo's), else None."""
    value = get_method(method).defaults[knob]
    return None if value == SHARED_DEFAULTS[knob] else value


def _from_verl(method: str, knob: str, field: str, value):
    """verl's `field` (value None: absent) as alignops's `knob` for `method`: at verl's default it
    counts as unset and gives way to the method's own default, where the method has one."""
    if value is None or value == VERL_DEFAULTS[field]:
        own = own_default(method, knob)
        if own is not None:
            return own
    return value


def policy_loss_kwargs(method: str, config, loss_agg_mode: str, response_mask: Tensor) -> dict:
    """ao.policy_loss keywords for `method` from a verl actor config.

    Each of verl's clip_ratio_low, clip_ratio_high (clip_ratio where they are null), clip_ratio_c
    and loss_agg_mode is used as verl's own losses use it, unless it equals verl's default: then
    the method's own default applies where it has one (gspo 3e-4/4e-4 and seq-mean-token-mean, dapo
    and gppo 0.28, cispo no lower bound, gppo_klear dual clip 10, dr_grpo seq-mean-token-sum-norm,
    ...), and verl's default where it has none. The `policy_loss.alignops` mapping comes last and
    always wins (clip_low, clip_high, clip_ratio_c and agg included)."""
    if config is None:
        raise ValueError("config must be verl's actor config (ActorConfig or its DictConfig), got None")
    options = alignops_options(config)
    mode = options.pop("agg", None)
    if mode is None:
        mode = _from_verl(method, "agg", "loss_agg_mode", loss_agg_mode)
    elif mode not in _AGG_MODES:
        raise ValueError(f"policy_loss.alignops.agg must be one of {_AGG_MODES}, got {mode!r}")
    kwargs = aggregation(mode, response_mask, _cfg_get(config, "global_batch_info"))
    clip = _cfg_get(config, "clip_ratio")
    low, high = _cfg_get(config, "clip_ratio_low"), _cfg_get(config, "clip_ratio_high")
    low = _from_verl(method, "clip_low", "clip_ratio_low", clip if low is None else low)
    high = _from_verl(method, "clip_high", "clip_ratio_high", clip if high is None else high)
    # A lower bound 1 - clip_low <= 0 never binds (ratios are positive): verl's CISPO example writes
    # "no lower bound" as clip_ratio_low=10, alignops as clip_low=1.
    if low is not None:
        kwargs["clip_low"] = min(low, 1.0)
    if high is not None:
        kwargs["clip_high"] = high
    if method in DUAL_CLIP_METHODS:
        c = _from_verl(method, "clip_ratio_c", "clip_ratio_c", _cfg_get(config, "clip_ratio_c"))
        kwargs["clip_ratio_c"] = VERL_DEFAULTS["clip_ratio_c"] if c is None else c
    if method in ("dppo_tv", "dppo_kl"):
        # verl's DPPO reads clip_ratio_c as its truncated-IS cap: at verl's default (3.0) the method's own
        # 20 applies (the cap verl's code falls back to and the paper recommends large)
        c = _cfg_get(config, "clip_ratio_c")
        if c is not None and c != VERL_DEFAULTS["clip_ratio_c"]:
            kwargs["dppo_is_cap"] = c
    if method == "sapo":  # alignops's defaults are verl's (1.0, 1.05)
        kwargs["sapo_tau_pos"] = _cfg_get(config, "tau_pos", 1.0)
        kwargs["sapo_tau_neg"] = _cfg_get(config, "tau_neg", 1.05)
    kwargs.update(_policy_loss_fields(method, _cfg_get(config, "policy_loss"), options))
    kwargs.update(options)
    return kwargs


# verl's PolicyLossConfig fields of the methods that read them: alignops option <- (verl field, the fallback
# verl's loss uses when the field is None). alignops's own defaults are verl's PolicyLossConfig defaults.
POLICY_LOSS_FIELDS = {
    "clip_cov": {"clip_cov_ratio": ("clip_cov_ratio", 2e-4), "clip_cov_lb": ("clip_cov_lb", 1.0),
                 "clip_cov_ub": ("clip_cov_ub", 5.0)},
    "kl_cov": {"kl_cov_ratio": ("kl_cov_ratio", 2e-4), "kl_cov_coef": ("ppo_kl_coef", 1.0)},
    "dro": {"dro_beta": ("dro_beta", None)},
}


def _policy_loss_fields(method: str, policy_loss, options: Mapping) -> dict:
    """The method's options read from verl's policy_loss node (clip_cov_*, kl_cov_ratio, ppo_kl_coef,
    dro_beta), as verl's own clip_cov / kl_cov / dro read them."""
    out = {}
    for option, (field, fallback) in POLICY_LOSS_FIELDS.get(method, {}).items():
        value = _cfg_get(policy_loss, field)
        out[option] = fallback if value is None else value
    if method == "dro" and out["dro_beta"] is None and options.get("dro_beta") is None:
        raise ValueError("alignops_dro needs actor.policy_loss.dro_beta > 0 (the weight of DRO's quadratic "
                         "log-ratio penalty), which has no default, as verl's own dro requires it")
    return out


def verl_metrics(method: str, metrics: Mapping[str, Tensor]) -> dict[str, float]:
    """alignops metrics under verl's names where the definitions agree (actor/ppo_kl, and
    actor/pg_clipfrac for the PPO clip), every one under actor/alignops/<name>."""
    out = {f"actor/alignops/{k}": float(v) for k, v in metrics.items() if k != "pg_loss"}
    if "approx_kl" in metrics:
        out["actor/ppo_kl"] = float(metrics["approx_kl"])
    if method in CLIPFRAC_METHODS and "clip_ratio/region" in metrics:
        out["actor/pg_clipfrac"] = float(metrics["clip_ratio/region"])
    if "dppo/outside" in metrics:  # verl's DPPO: the share outside the trust region, and of the truncated
        out["actor/pg_clipfrac"] = float(metrics["dppo/outside"])
        out["actor/pg_clipfrac_lower"] = float(metrics["dppo/truncated"])
    if "clip_cov/clipped" in metrics:  # verl's clip_cov: the share of the tokens its covariance rule took out
        out["actor/pg_clipfrac"] = float(metrics["clip_cov/clipped"])
    if "kl_cov/abs_kl" in metrics:  # verl's kl_cov reports mean |log r| as its ppo_kl
        out["actor/ppo_kl"] = float(metrics["kl_cov/abs_kl"])
    # the rollout correction's metrics also under verl's own names (verl's bypass_mode returns them so)
    out.update({k: float(v) for k, v in metrics.items() if k.startswith("rollout_corr/")})
    return out


_POLICY_LOSS_FNS: dict[str, Callable] = {}


def policy_loss_fn(method: str) -> Callable:
    """The verl policy loss of alignops `method`: fn(old_log_prob, log_prob, advantages,
    response_mask, loss_agg_mode, config, rollout_is_weights) -> (pg_loss, metrics)."""
    if method not in method_names():
        raise ValueError(f"unknown method {method!r}; known methods: {method_names()}")
    if method in _POLICY_LOSS_FNS:
        return _POLICY_LOSS_FNS[method]

    def loss_fn(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                loss_agg_mode: str = "token-mean", config=None,
                rollout_is_weights: Tensor | None = None) -> tuple[Tensor, dict[str, Any]]:
        kwargs = policy_loss_kwargs(method, config, loss_agg_mode, response_mask)
        rc = bypass_config(config)
        if rc is not None:   # verl's bypass mode: old_log_prob holds the rollout engine's log-probs
            return bypass_loss(method, rc, old_log_prob, log_prob, advantages, response_mask, kwargs)
        out = ao.policy_loss(log_prob, old_log_prob, advantages, response_mask, method=method,
                             rollout_is_weights=rollout_is_weights, **kwargs)
        return out.loss, verl_metrics(method, out.metrics)

    loss_fn.__name__ = loss_fn.__qualname__ = f"{PREFIX}{method}".replace("-", "_")
    loss_fn.__doc__ = f"alignops method {method!r} as a verl policy loss (alignops.integrations.verl)."
    _POLICY_LOSS_FNS[method] = loss_fn
    return loss_fn


# --------------------------------------------------------------------------------------------
# rollout correction: verl's bypass mode through alignops's rollout_logp= route (docs/methods.md §1.15)

BYPASS_ENV = "ALIGNOPS_VERL_BYPASS_MODE"
BYPASS_LOSS_TYPES = {"ppo_clip": "ppo", "reinforce": "reinforce"}
_RS_CRITERIA = ("token_k1", "token_k2", "token_k3", "seq_sum_k1", "seq_sum_k2", "seq_sum_k3", "seq_mean_k1",
                "seq_mean_k2", "seq_mean_k3", "seq_max_k2", "seq_max_k3")


def _number(what: str, text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number, got {text!r}") from None


def rollout_correction_options(rollout_correction) -> dict:
    """verl's RolloutCorrectionConfig (algorithm.rollout_correction, a dataclass, DictConfig or dict) as
    the options of ao.rollout_correction / policy_loss's `rollout_correction=`:

        rollout_is ("token" | "sequence" | None)      -> level
        rollout_is_threshold 2.0 (a float: truncate)   -> threshold=2.0, mode="truncate"
        rollout_is_threshold "0.5_5.0" (IcePop)         -> threshold=(0.5, 5.0), mode="mask"
        rollout_is_batch_normalize                     -> batch_normalize
        rollout_rs "a,b" with rollout_rs_threshold "x,y" (one value: shared by all; a k1's "lo_hi" or one
        number u, the ratio bounds (1/u, u))          -> rejection={"a": x, "b": y}

    Each unknown or malformed value is an error naming verl's field."""
    if rollout_correction is None:
        raise ValueError("rollout_correction is None: verl's rollout correction config is needed")
    level = _cfg_get(rollout_correction, "rollout_is")
    if level not in ("token", "sequence", None):
        raise ValueError(f"rollout_correction.rollout_is must be 'token', 'sequence' or None, got {level!r}")
    spec = _cfg_get(rollout_correction, "rollout_is_threshold", 2.0)
    if isinstance(spec, bool) or not isinstance(spec, (int, float, str)):
        raise TypeError(f"rollout_correction.rollout_is_threshold must be a float or a 'lower_upper' string, "
                        f"got {spec!r}")
    mode, threshold = "truncate", spec
    if isinstance(spec, str):
        if "_" in spec:
            lo, hi = spec.strip().split("_", 1)
            mode = "mask"
            threshold = (_number("rollout_correction.rollout_is_threshold (lower)", lo),
                         _number("rollout_correction.rollout_is_threshold (upper)", hi))
        else:
            threshold = _number("rollout_correction.rollout_is_threshold", spec)
    opts = {"level": level, "mode": mode, "threshold": float(threshold) if mode == "truncate" else threshold,
            "batch_normalize": bool(_cfg_get(rollout_correction, "rollout_is_batch_normalize", False))}
    rs = _cfg_get(rollout_correction, "rollout_rs")
    if rs is not None:
        names = list(dict.fromkeys(part.strip() for part in str(rs).split(",") if part.strip()))
        bad = [n for n in names if n not in _RS_CRITERIA]
        if not names or bad:
            raise ValueError(f"rollout_correction.rollout_rs names unknown criteria {bad or [rs]}; "
                             f"verl's criteria: {_RS_CRITERIA}")
        raw = _cfg_get(rollout_correction, "rollout_rs_threshold")
        if raw is None:
            raise ValueError("rollout_correction.rollout_rs_threshold is required with rollout_rs")
        specs = [str(raw)] if isinstance(raw, (int, float)) else [p.strip() for p in str(raw).split(",") if p.strip()]
        if len(specs) not in (1, len(names)):
            raise ValueError(f"rollout_correction.rollout_rs_threshold must give one value, or one per criterion "
                             f"of rollout_rs ({len(names)}), got {raw!r}")
        specs = specs * len(names) if len(specs) == 1 else specs
        rejection = {}
        for name, text in zip(names, specs):
            what = f"rollout_correction.rollout_rs_threshold for {name!r}"
            if name.endswith("k1") and "_" in text:
                lo, hi = text.split("_", 1)
                rejection[name] = (_number(what, lo), _number(what, hi))
            elif "_" in text:
                raise ValueError(f"{what} takes one upper bound (no 'lower_upper'), got {text!r}")
            else:
                rejection[name] = _number(what, text)
        opts["rejection"] = rejection
    return opts


def bypass_config(config):
    """verl's rollout correction config when verl runs its bypass mode (algorithm.rollout_correction.bypass_mode:
    verl's apply_bypass_mode puts it at actor.policy_loss.rollout_correction and old_log_prob is then the
    rollout engine's log-probs), else None."""
    rc = _cfg_get(_cfg_get(config, "policy_loss"), "rollout_correction")
    return rc if rc is not None and bool(_cfg_get(rc, "bypass_mode", False)) else None


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    m = mask.to(torch.bool)
    return torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device)).sum() / m.sum().clamp(min=1)


def bypass_loss(method: str, rollout_correction, rollout_log_prob: Tensor, log_prob: Tensor, advantages: Tensor,
                response_mask: Tensor, kwargs: dict) -> tuple[Tensor, dict[str, Any]]:
    """alignops `method` in verl's bypass mode (old_log_prob = the rollout log-probs), as verl's bypass_mode
    treats its two losses, by rollout_correction.loss_type:

    - "ppo_clip": the method against the rollout policy (old_logp = rollout_log_prob), on the mask that
      ao.rollout_correction(sg(logp), rollout_log_prob) leaves after rejection; its IS weights are not
      applied (the ratio is already pi / pi_rollout), only reported;
    - "reinforce": the method on-policy (old_logp None) with the rollout_logp= route: the weights and
      the rejection mask of ao.rollout_correction(sg(logp), rollout_log_prob).

    `rollout_correction` is verl's RolloutCorrectionConfig; verl's rollout_is_weights argument is not used
    in bypass mode (verl's ignores it too)."""
    opts = rollout_correction_options(rollout_correction)
    loss_type = _cfg_get(rollout_correction, "loss_type", "ppo_clip")
    if loss_type not in BYPASS_LOSS_TYPES:
        raise ValueError(f"rollout_correction.loss_type must be one of {sorted(BYPASS_LOSS_TYPES)}, got {loss_type!r}")
    if loss_type == "ppo_clip":
        with torch.no_grad():
            rc = ao.rollout_correction(log_prob.detach(), rollout_log_prob, response_mask, **opts)
        out = ao.policy_loss(log_prob, rollout_log_prob, advantages, rc.mask, method=method, **kwargs)
        metrics = verl_metrics(method, {**out.metrics, **rc.metrics})
        kept = rc.mask
    else:
        out = ao.policy_loss(log_prob, None, advantages, response_mask, method=method, rollout_logp=rollout_log_prob,
                             rollout_correction=opts, **kwargs)
        metrics = verl_metrics(method, out.metrics)
        with torch.no_grad():   # the route's mask, for verl's ppo_kl (pi_rollout against pi over the kept tokens)
            kept = ao.rollout_correction(log_prob.detach(), rollout_log_prob, response_mask, level=None,
                                         rejection=opts.get("rejection")).mask
    with torch.no_grad():
        metrics["actor/ppo_kl"] = float(_masked_mean((rollout_log_prob - log_prob.detach()).float(), kept))
    return out.loss, metrics


def bypass_mode_loss_fn(old_log_prob: Tensor, log_prob: Tensor, advantages: Tensor, response_mask: Tensor,
                        loss_agg_mode: str = "token-mean", config=None,
                        rollout_is_weights: Tensor | None = None) -> tuple[Tensor, dict[str, Any]]:
    """verl's `bypass_mode` loss through alignops (registered as `alignops_bypass_mode`): loss_type
    "ppo_clip" is alignops's ppo (verl's vanilla: clip_ratio_low/high, dual clip clip_ratio_c) and
    "reinforce" alignops's reinforce, each as bypass_loss runs it, aggregated by loss_agg_mode as given
    (verl's bypass passes it to both). policy_loss.rollout_correction is required, as in verl."""
    if config is None:
        raise ValueError("config must be verl's actor config (ActorConfig or its DictConfig), got None")
    rc = _cfg_get(_cfg_get(config, "policy_loss"), "rollout_correction")
    if rc is None:
        raise ValueError("alignops_bypass_mode needs actor.policy_loss.rollout_correction (verl's "
                         "apply_bypass_mode puts algorithm.rollout_correction there)")
    loss_type = _cfg_get(rc, "loss_type", "ppo_clip")
    if loss_type not in BYPASS_LOSS_TYPES:
        raise ValueError(f"rollout_correction.loss_type must be one of {sorted(BYPASS_LOSS_TYPES)}, got {loss_type!r}")
    method = BYPASS_LOSS_TYPES[loss_type]
    kwargs = policy_loss_kwargs(method, config, loss_agg_mode, response_mask)
    if "agg" not in alignops_options(config):   # verl's loss_agg_mode as given, even at verl's default
        kwargs.pop("max_len", None)
        kwargs.update(aggregation(loss_agg_mode, response_mask, _cfg_get(config, "global_batch_info")))
    return bypass_loss(method, rc, old_log_prob, log_prob, advantages, response_mask, kwargs)


_BYPASS_ORIGINAL: dict[str, Callable] = {}


def install_bypass_mode() -> None:
    """verl's trainer sets policy_loss.loss_mode="bypass_mode" itself whenever
    algorithm.rollout_correction.bypass_mode=True (rollout_corr_helper.apply_bypass_mode), so no
    alignops_<name> can be chosen there: this puts alignops_bypass_mode under verl's name "bypass_mode"
    (ALIGNOPS_VERL_BYPASS_MODE=1 in the workers' environment does it at import)."""
    from verl.trainer.ppo import core_algos  # noqa: PLC0415

    current = core_algos.POLICY_LOSS_REGISTRY.get("bypass_mode")
    if current is not bypass_mode_loss_fn:
        _BYPASS_ORIGINAL.setdefault("bypass_mode", current)
    core_algos.register_policy_loss("bypass_mode")(bypass_mode_loss_fn)


def uninstall_bypass_mode() -> None:
    """Puts verl's own bypass_mode back."""
    from verl.trainer.ppo import core_algos  # noqa: PLC0415

    if "bypass_mode" in _BYPASS_ORIGINAL:
        original = _BYPASS_ORIGINAL.pop("bypass_mode")
        if original is None:
            core_algos.POLICY_LOSS_REGISTRY.pop("bypass_mode", None)
        else:
            core_algos.register_policy_loss("bypass_mode")(original)


# --------------------------------------------------------------------------------------------
# advantage estimators (verl's call: token_level_rewards, response_mask, config, index, ...)


def _group_ids(index, batch_size: int, device) -> tuple[Tensor, int]:
    """verl's `index` (uids, any hashable values, usually an object ndarray of strings) as group
    ids in [0, P) and P."""
    if index is None:
        raise ValueError("index (verl's per-row prompt uid) is required by a group estimator")
    if isinstance(index, Tensor):
        index = index.detach().cpu().numpy()
    values = np.asarray(index)
    if values.shape != (batch_size,):
        raise ValueError(f"index must hold one uid per row ({batch_size}), got shape {values.shape}")
    uniques, inverse = np.unique(values, return_inverse=True)
    return torch.from_numpy(inverse.reshape(-1).astype(np.int64)).to(device), len(uniques)


def _scores(token_level_rewards: Tensor, response_mask: Tensor) -> Tensor:
    if not isinstance(token_level_rewards, Tensor) or token_level_rewards.dim() != 2:
        raise ValueError("token_level_rewards must be a [B, T] tensor")
    if not isinstance(response_mask, Tensor) or response_mask.shape != token_level_rewards.shape:
        raise ValueError(f"response_mask must be shaped like token_level_rewards {tuple(token_level_rewards.shape)}")
    # verl's outcome estimators take the row's total reward (the score sits on the last valid token)
    return token_level_rewards.sum(-1)


def _per_token(adv: Tensor, token_level_rewards: Tensor, response_mask: Tensor) -> Tensor:
    return (adv.unsqueeze(-1) * response_mask).to(token_level_rewards.dtype)


def grpo(token_level_rewards: Tensor, response_mask: Tensor, index=None, epsilon: float = 1e-6,
         norm_adv_by_std_in_grpo: bool = True, config=None, **kwargs) -> tuple[Tensor, Tensor]:
    """verl `grpo`: (R - mean_g) / (std_g + epsilon), or R - mean_g (Dr.GRPO) when
    algorithm.norm_adv_by_std_in_grpo is False. A prompt with one response keeps its raw score."""
    norm = _cfg_get(config, "norm_adv_by_std_in_grpo", norm_adv_by_std_in_grpo)
    scores = _scores(token_level_rewards, response_mask)
    gid, p = _group_ids(index, scores.shape[0], scores.device)
    adv = ao.grpo_advantages(scores, group_ids=gid, num_groups=p, scale="group" if norm else "none",
                             std_eps=epsilon, singleton="raw")
    adv = _per_token(adv, token_level_rewards, response_mask)
    return adv, adv


def rloo(token_level_rewards: Tensor, response_mask: Tensor, index=None, epsilon: float = 1e-6, config=None,
         **kwargs) -> tuple[Tensor, Tensor]:
    """verl `rloo` / `rloo_vectorized`: R minus the mean of the group's other rewards."""
    scores = _scores(token_level_rewards, response_mask)
    gid, p = _group_ids(index, scores.shape[0], scores.device)
    adv = _per_token(ao.rloo_advantages(scores, group_ids=gid, num_groups=p, singleton="raw"),
                     token_level_rewards, response_mask)
    return adv, adv


def gpg(token_level_rewards: Tensor, response_mask: Tensor, index=None, epsilon: float = 1e-6, f_norm: float = 1.0,
        alpha: float = 1.0, config=None, **kwargs) -> tuple[Tensor, Tensor]:
    """verl `gpg`: alpha (R - mean_g) / f_norm with alpha = B / #rows with a non-zero reward
    (verl recomputes alpha from the batch; its `alpha` argument is ignored, as here)."""
    scores = _scores(token_level_rewards, response_mask)
    gid, p = _group_ids(index, scores.shape[0], scores.device)
    adv = ao.gpg_advantages(scores, group_ids=gid, num_groups=p, alpha_mode="verl_nonzero", f_norm="none",
                            singleton="raw")
    adv = _per_token(adv / f_norm, token_level_rewards, response_mask)
    return adv, adv


def reinforce_plus_plus(token_level_rewards: Tensor, response_mask: Tensor, config=None,
                        **kwargs) -> tuple[Tensor, Tensor]:
    """verl `reinforce_plus_plus`: discounted returns (gamma = algorithm.gamma) over the valid
    tokens, whitened over the batch's valid tokens."""
    if config is None:
        raise ValueError("config (verl's AlgoConfig, for gamma) is required by reinforce_plus_plus")
    # returns of REINFORCE++ are GAE's with V = 0 and lambda = 1
    out = ao.gae_advantages(token_level_rewards, torch.zeros_like(token_level_rewards), response_mask,
                            gamma=float(_cfg_get(config, "gamma", 1.0)), lam=1.0, whiten=True)
    return out.advantages.to(token_level_rewards.dtype), out.returns.to(token_level_rewards.dtype)


def reinforce_plus_plus_baseline(token_level_rewards: Tensor, response_mask: Tensor, index=None,
                                 epsilon: float = 1e-6, config=None, **kwargs) -> tuple[Tensor, Tensor]:
    """verl `reinforce_plus_plus_baseline`: R - mean_g on every valid token, whitened over the batch."""
    scores = _scores(token_level_rewards, response_mask)
    gid, p = _group_ids(index, scores.shape[0], scores.device)
    out = ao.reinforce_pp_baseline_advantages(scores, response_mask, group_ids=gid, num_groups=p, singleton="raw")
    adv = out.advantages.to(token_level_rewards.dtype)
    return adv, adv


def remax(token_level_rewards: Tensor, reward_baselines: Tensor | None = None, response_mask: Tensor | None = None,
          config=None, **kwargs) -> tuple[Tensor, Tensor]:
    """verl `remax`: return-to-go minus the greedy decode's reward (`reward_baselines` [B])."""
    if reward_baselines is None:
        raise ValueError("reward_baselines (the greedy decode's rewards, [B]) is required by remax")
    if response_mask is None:
        raise ValueError("response_mask is required by remax")
    adv = ao.remax_advantages(token_level_rewards, reward_baselines, response_mask)
    m = response_mask != 0
    returns = torch.where(m, adv + reward_baselines.to(adv.dtype).unsqueeze(-1), 0.0)
    return adv.to(token_level_rewards.dtype), returns.to(token_level_rewards.dtype)


def gae(token_level_rewards: Tensor, values: Tensor | None = None, response_mask: Tensor | None = None,
        gamma: float | None = None, lam: float | None = None, config=None, **kwargs) -> tuple[Tensor, Tensor]:
    """verl `gae`: GAE(gamma, lam) over the valid tokens (masked ones transparent), whitened;
    returns = GAE + V. 0 at masked positions (verl leaves carried values there).

    verl's compute_advantage passes `values` only to its built-in `gae`; this entry serves
    callers that pass them (recipes, custom trainers)."""
    if values is None:
        raise ValueError("values (the critic's [B, T] values) are required by gae; verl's compute_advantage "
                         "passes them only to its built-in 'gae' estimator")
    gamma = _cfg_get(config, "gamma", 1.0) if gamma is None else gamma
    lam = _cfg_get(config, "lam", 1.0) if lam is None else lam
    out = ao.gae_advantages(token_level_rewards, values, response_mask, gamma=float(gamma), lam=float(lam),
                            whiten=True)
    return out.advantages.to(token_level_rewards.dtype), out.returns.to(token_level_rewards.dtype)


def opo(token_level_rewards: Tensor, response_mask: Tensor, index=None, epsilon: float = 1e-6, config=None,
        **kwargs) -> tuple[Tensor, Tensor]:
    """verl `opo`: R minus the group's length-weighted mean reward, sum_j L_j R_j / sum_j L_j
    (L = the rows' valid tokens). A prompt with one response keeps its raw score."""
    scores = _scores(token_level_rewards, response_mask)
    gid, p = _group_ids(index, scores.shape[0], scores.device)
    adv = ao.opo_advantages(scores, group_ids=gid, num_groups=p, mask=response_mask, singleton="raw")
    adv = _per_token(adv, token_level_rewards, response_mask)
    return adv, adv


def grpo_passk(token_level_rewards: Tensor, response_mask: Tensor, index=None, epsilon: float = 1e-6,
               norm_adv_by_std_in_grpo: bool = True, config=None, **kwargs) -> tuple[Tensor, Tensor]:
    """verl `grpo_passk`: only the best row of each group gets an advantage, R_max - R_second,
    divided by std_g + epsilon unless algorithm.norm_adv_by_std_in_grpo is False (the config wins
    over the argument, as in verl). A prompt with one response is an error, as in verl."""
    norm = _cfg_get(config, "norm_adv_by_std_in_grpo", norm_adv_by_std_in_grpo)
    scores = _scores(token_level_rewards, response_mask)
    gid, p = _group_ids(index, scores.shape[0], scores.device)
    adv = ao.grpo_passk_advantages(scores, group_ids=gid, num_groups=p, scale="group" if norm else "none",
                                   std_eps=epsilon)
    adv = _per_token(adv, token_level_rewards, response_mask)
    return adv, adv


def _gdpo_components(non_tensor_batch, keys, device, dtype) -> Tensor:
    if non_tensor_batch is None:
        raise ValueError("algorithm.gdpo_reward_keys is set but non_tensor_batch (where the reward components "
                         "are) was not passed: verl 0.9.1's compute_advantage passes it only to the estimator "
                         "named exactly 'gdpo', not to 'alignops_gdpo'; call alignops_gdpo with "
                         "non_tensor_batch=data.non_tensor_batch, or leave gdpo_reward_keys unset (one reward)")
    cols = []
    for key in keys:
        if key not in non_tensor_batch:
            raise ValueError(f"gdpo_reward_keys names {key!r}, which is not in non_tensor_batch "
                             f"(keys: {sorted(non_tensor_batch)}); compute_score must return it")
        cols.append(torch.as_tensor(np.asarray(non_tensor_batch[key], dtype=np.float64).reshape(-1)))
    return torch.stack(cols, -1).to(device=device, dtype=dtype)


def gdpo(token_level_rewards: Tensor, response_mask: Tensor, index=None, epsilon: float = 1e-6,
         norm_adv_by_std_in_grpo: bool = True, config=None, non_tensor_batch=None, batch=None,
         **kwargs) -> tuple[Tensor, Tensor]:
    """verl `gdpo`: each reward component of algorithm.gdpo_reward_keys (read from
    non_tensor_batch, one value per row) group-normalised as GRPO, summed with
    algorithm.gdpo_reward_weights (default 1 each), then whitened over the valid tokens. Without
    gdpo_reward_keys the one component is the row's total reward. algorithm.norm_adv_by_std_in_grpo
    is read from the config (verl's gdpo ignores it). A prompt with one response keeps its raw
    component scores."""
    norm = _cfg_get(config, "norm_adv_by_std_in_grpo", norm_adv_by_std_in_grpo)
    scores = _scores(token_level_rewards, response_mask)
    gid, p = _group_ids(index, scores.shape[0], scores.device)
    keys = _cfg_get(config, "gdpo_reward_keys")
    weights = None
    if keys:
        rewards = _gdpo_components(non_tensor_batch, list(keys), scores.device, scores.dtype)
        weights = _cfg_get(config, "gdpo_reward_weights")
        weights = None if weights is None else [float(x) for x in weights]
    elif non_tensor_batch is not None and batch is not None and config is not None:
        raise ValueError("GDPO needs algorithm.gdpo_reward_keys, the reward component keys compute_score returns "
                         "(e.g. ['format_reward', 'accuracy_reward']), as verl's gdpo asserts")
    else:
        rewards = scores
    adv = ao.gdpo_advantages(rewards, group_ids=gid, num_groups=p, weights=weights, mask=response_mask,
                             scale="group" if norm else "none", std_eps=epsilon, singleton="raw")
    adv = _per_token(adv, token_level_rewards, response_mask)
    return adv, adv


def _optimal_token_baseline(align: str, name: str, token_level_rewards: Tensor, response_mask: Tensor, index,
                            old_log_probs, sum_pi_squared, rollout_is_weights, handle_zero_tail: bool,
                            epsilon: float) -> tuple[Tensor, Tensor]:
    if old_log_probs is None or sum_pi_squared is None:
        raise ValueError(f"old_log_probs and sum_pi_squared (actor.calculate_sum_pi_squared=True) are required by "
                         f"{name}; verl 0.9.1's compute_advantage passes them only to its built-in '{name}' "
                         f"estimator, not to 'alignops_{name}'")
    if not isinstance(token_level_rewards, Tensor) or token_level_rewards.dim() != 2:
        raise ValueError("token_level_rewards must be a [B, T] tensor")
    gid, p = _group_ids(index, token_level_rewards.shape[0], token_level_rewards.device)
    out = ao.optimal_token_baseline_advantages(token_level_rewards, old_log_probs, sum_pi_squared, response_mask,
                                               group_ids=gid, num_groups=p, rollout_is_weights=rollout_is_weights,
                                               align=align, zero_tail=bool(handle_zero_tail), weight_eps=float(epsilon),
                                               singleton="raw")
    return out.advantages.to(token_level_rewards.dtype), out.returns.to(token_level_rewards.dtype)


def optimal_token_baseline(token_level_rewards: Tensor, response_mask: Tensor, index=None,
                           old_log_probs: Tensor | None = None, sum_pi_squared: Tensor | None = None,
                           rollout_is_weights: Tensor | None = None, handle_zero_tail: bool = True,
                           epsilon: float = 1e-8, config=None, **kwargs) -> tuple[Tensor, Tensor]:
    """verl `optimal_token_baseline`: return-to-go minus the group's per-position baseline
    sum G W / sum W (W: the cumulative 1 - 2 pi + sum pi^2, times rollout_is_weights^2), index t the
    padded column. A prompt with one response keeps its returns."""
    return _optimal_token_baseline("position", "optimal_token_baseline", token_level_rewards, response_mask, index,
                                   old_log_probs, sum_pi_squared, rollout_is_weights, handle_zero_tail, epsilon)


def tir_optimal_token_baseline(token_level_rewards: Tensor, response_mask: Tensor, index=None,
                               old_log_probs: Tensor | None = None, sum_pi_squared: Tensor | None = None,
                               rollout_is_weights: Tensor | None = None, handle_zero_tail: bool = True,
                               epsilon: float = 1e-8, config=None, **kwargs) -> tuple[Tensor, Tensor]:
    """verl `tir_optimal_token_baseline`: optimal_token_baseline with index t the row's t-th valid
    token (tool-integrated, multi-turn responses whose observation tokens are masked)."""
    return _optimal_token_baseline("valid", "tir_optimal_token_baseline", token_level_rewards, response_mask, index,
                                   old_log_probs, sum_pi_squared, rollout_is_weights, handle_zero_tail, epsilon)


ADVANTAGE_ESTIMATORS: dict[str, Callable] = {
    "grpo": grpo, "rloo": rloo, "gpg": gpg, "reinforce_plus_plus": reinforce_plus_plus,
    "reinforce_plus_plus_baseline": reinforce_plus_plus_baseline, "remax": remax, "gae": gae,
    "opo": opo, "grpo_passk": grpo_passk, "gdpo": gdpo, "optimal_token_baseline": optimal_token_baseline,
    "tir_optimal_token_baseline": tir_optimal_token_baseline,
}


# --------------------------------------------------------------------------------------------
# registration


def register() -> dict[str, list[str]]:
    """Registers `alignops_<method>` for every alignops method in verl's POLICY_LOSS_REGISTRY and
    `alignops_<estimator>` in its ADV_ESTIMATOR_REGISTRY; idempotent. Returns the names."""
    from verl.trainer.ppo import core_algos  # noqa: PLC0415 - verl is imported only when asked for

    losses = []
    for method in method_names():
        core_algos.register_policy_loss(PREFIX + method)(policy_loss_fn(method))
        losses.append(PREFIX + method)
    core_algos.register_policy_loss(PREFIX + "bypass_mode")(bypass_mode_loss_fn)
    losses.append(PREFIX + "bypass_mode")
    estimators = []
    for name, fn in ADVANTAGE_ESTIMATORS.items():
        core_algos.register_adv_est(PREFIX + name)(fn)
        estimators.append(PREFIX + name)
    return {"policy_losses": losses, "adv_estimators": estimators}


# --------------------------------------------------------------------------------------------
# fused forward: log-probs and entropy from hidden states


_REDUCTIONS = ("none", "sum", "mean")


def _fused_logprobs(hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float,
                    vocab_process_group=None, chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    fn = ao.fused_linear_token_logprobs
    kwargs = {}
    if vocab_process_group is not None and not (torch.distributed.is_available()
                                                and torch.distributed.is_initialized()):
        raise ValueError("dist_process_group is given but torch.distributed is not initialized")
    # Megatron passes its tensor-parallel group even at TP = 1, where nothing is sharded
    if vocab_process_group is not None and torch.distributed.get_world_size(vocab_process_group) == 1:
        vocab_process_group = None
    if vocab_process_group is not None:
        params = inspect.signature(fn).parameters
        if "vocab_process_group" not in params:
            raise NotImplementedError(
                "dist_process_group (a vocabulary sharded across ranks, verl's Megatron tensor-parallel lm_head) "
                "needs ao.fused_linear_token_logprobs(vocab_process_group=...), which this alignops lacks")
        kwargs["vocab_process_group"] = vocab_process_group
        if "vocab_start" in params:
            # verl's kernel takes equal shards in rank order (Megatron pads the vocabulary to a multiple of TP)
            kwargs["vocab_start"] = torch.distributed.get_rank(vocab_process_group) * weight.shape[0]
        # verl's kernel returns each rank's partial dhidden (its own vocabulary rows) and leaves the
        # sum to its caller: with sequence parallel on, the backward of Megatron's sequence-parallel
        # gather reduce-scatters it; with it off, verl's fused forward has no region that sums it
        # (docs/vocab_parallel.md, "Inside Megatron's tensor-parallel layout"). The drop-in keeps
        # that contract exactly.
        kwargs["reduce_hidden_grad"] = False
    return fn(hidden, weight, labels, temperature=temperature, compute_entropy=True, chunk_size=chunk_size, **kwargs)


def linear_cross_entropy(hidden: Tensor, weight: Tensor, labels: Tensor, temperature: float = 1.0,
                         reduction: str = "none", dist_process_group=None) -> tuple[Tensor, Tensor]:
    """verl's `linear_cross_entropy` contract through ao.fused_linear_token_logprobs.

    hidden `[..., H]`, weight `[V, H]` (or this rank's `[V / tp, H]` rows with
    `dist_process_group`), labels: one id per token, in hidden's flattened order. Returns fp32
    token log-probs (flattened to `[N]`, or their sum / mean with reduction="sum" / "mean") and
    the per-token entropy `[N]`.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not isinstance(hidden, Tensor) or hidden.dim() < 2:
        raise ValueError("hidden must be a [..., H] tensor")
    h = hidden.reshape(-1, hidden.shape[-1])
    # Token counts, not shapes, must agree: Megatron's packed forward gives hidden [N, 1, H] and
    # labels [1, N], which verl's kernel flattens alike.
    if not isinstance(labels, Tensor) or labels.numel() != h.shape[0]:
        raise ValueError(f"labels must hold one id per token of hidden ({h.shape[0]}), "
                         f"got {None if not isinstance(labels, Tensor) else tuple(labels.shape)}")
    logp, entropy = _fused_logprobs(h, weight, labels.reshape(-1).to(torch.int64), float(temperature),
                                    dist_process_group)
    if reduction == "sum":
        logp = logp.sum()
    elif reduction == "mean":
        logp = logp.mean()
    return logp, entropy


class AlignopsFusedLinearForPPO(torch.nn.Module):
    """verl's FusedLinearForPPO (`forward(hidden_states, vocab_weights, input_ids, temperature)`
    -> fp32 log-probs and entropy in the hidden dtype, shaped like input_ids) on
    ao.fused_linear_token_logprobs. `chunk_size` is alignops's rows per tile."""

    def __init__(self, chunk_size: int = 512, impl_backend: str = "torch"):
        super().__init__()
        if impl_backend not in ("torch", "liger"):
            raise ValueError(f"impl_backend must be 'torch' or 'liger' (verl's names; alignops computes both), "
                             f"got {impl_backend!r}")
        self.chunk_size = chunk_size
        self.impl_backend = impl_backend

    def forward(self, hidden_states: Tensor, vocab_weights: Tensor, input_ids: Tensor,
                temperature: float = 1.0) -> tuple[Tensor, Tensor]:
        if hidden_states.dim() not in (2, 3):
            raise ValueError(f"hidden_states must be [N, H] or [B, T, H], got shape {tuple(hidden_states.shape)}")
        logp, entropy = _fused_logprobs(hidden_states, vocab_weights, input_ids.to(torch.int64), float(temperature),
                                        chunk_size=self.chunk_size)
        return logp, entropy.to(hidden_states.dtype)


_ORIGINALS: dict[tuple[str, str], Any] = {}
# verl modules that bind linear_cross_entropy at import (`from ... import linear_cross_entropy`);
# the HF forwards import it inside the function, so patching its home module covers them.
_BINDERS = ("verl.models.mcore.model_forward_fused", "verl.models.mcore.model_forward_1f1b_overlap")


def _patch(module_name: str, attr: str, value) -> None:
    module = sys.modules[module_name]
    _ORIGINALS.setdefault((module_name, attr), getattr(module, attr))
    setattr(module, attr, value)


def install_fused_forward() -> None:
    """Routes verl's fused-kernel path through alignops: verl.utils.kernel.linear_cross_entropy
    (the "triton" fused backend, FSDP and Megatron forwards) and
    verl.utils.experimental.torch_functional.FusedLinearForPPO (the "torch"/"liger" backends).
    Call it before verl builds the models (or set ALIGNOPS_VERL_FUSED_FORWARD=1)."""
    import verl.utils.experimental.torch_functional  # noqa: F401, PLC0415
    import verl.utils.kernel.linear_cross_entropy  # noqa: F401, PLC0415

    _patch("verl.utils.kernel.linear_cross_entropy", "linear_cross_entropy", linear_cross_entropy)
    _patch("verl.utils.experimental.torch_functional", "FusedLinearForPPO", AlignopsFusedLinearForPPO)
    for name in _BINDERS:
        if name in sys.modules:
            _patch(name, "linear_cross_entropy", linear_cross_entropy)


def uninstall_fused_forward() -> None:
    """Puts back what install_fused_forward replaced."""
    while _ORIGINALS:
        (module_name, attr), value = _ORIGINALS.popitem()
        setattr(sys.modules[module_name], attr, value)


register()
if os.environ.get(FUSED_FORWARD_ENV, "0").strip().lower() in ("1", "true", "yes"):
    install_fused_forward()
if os.environ.get(BYPASS_ENV, "0").strip().lower() in ("1", "true", "yes"):
    install_bypass_mode()
