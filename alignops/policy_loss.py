"""The policy-loss family: every clipping and weighting method, from log-probs and fused from logits.

    out = ao.policy_loss(logp, old_logp, advantages, mask, method="grpo", ...)
    out = ao.fused_policy_loss(logits, labels, old_logp, advantages, mask, method="grpo", ...)
    out.loss, out.metrics

The total loss (docs/methods.md §00.18) is

    L = Agg(rollout_is_weights * phi) + kl_coef * Agg(KL(logp, ref_logp)) - entropy_coef * Agg(H)

with phi the method's per-token loss (alignops/reference/policy_loss.py) and Agg one of the four
aggregation modes, divided by `normalizer` (the whole optimiser step's count, docs/methods.md §00.2).

Methods live in one registry: `register_method(name, token_loss, defaults=..., options=...)`.
A method is a per-token loss plus its defaults for the shared knobs (clip_low, clip_high, agg, ...)
and its own options; presets (dapo, dr_grpo, ...) are registry entries that reuse a loss with
other defaults.

fused_policy_loss runs the logits pass of alignops.token_stats (one read of the logits
forward; one read and one write backward, for every method, since the per-token math only changes
the coefficients a = dL/dlogp and b = dL/dH that the backward consumes). Options:
    inplace_grad=True      the gradient is written into the logits buffer (the logits are destroyed).
    grad_in_forward=True   the loss is terminal: a and b are computed during forward and the
                           backward kernel runs at once; no logits are kept for backward, and
                           backward only scales the stored gradient by grad_output.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
from torch import Tensor

from alignops import _backend
from alignops.reference import policy_loss as ref
from alignops.reference.policy_loss import AGG_MODES, KL_ESTIMATORS, bapo_search
from alignops.token_stats import (
    LOGITS_OPS, as_rows, check_label_range, check_logits_labels, check_temperature, token_logprobs)

__all__ = ["policy_loss", "fused_policy_loss", "value_loss", "PolicyLossOutput", "register_method", "METHODS",
           "method_names", "bapo_search", "AGG_MODES", "KL_ESTIMATORS"]


@dataclasses.dataclass
class PolicyLossOutput:
    """`loss`: scalar tensor with autograd. `metrics`: detached fp32 scalar tensors (no host sync)."""
    loss: Tensor
    metrics: dict[str, Tensor]


# --------------------------------------------------------------------------------------------
# the method registry


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    token_loss: Callable    # (TokenInputs, **options) -> TokenLoss
    defaults: dict          # defaults of the shared knobs (clip_low, clip_high, agg, clip_ratio_c)
    options: dict           # the method's own options and their defaults
    doc: str = ""


METHODS: dict[str, Method] = {}

_SHARED_DEFAULTS = {"clip_low": 0.2, "clip_high": None, "clip_ratio_c": None, "agg": "token-mean"}


def register_method(name: str, token_loss: Callable, *, defaults: dict | None = None,
                    options: dict | None = None, doc: str = "") -> Method:
    """Adds a method. `token_loss(t: TokenInputs, **options) -> TokenLoss` computes phi per token;
    `defaults` overrides the shared knobs' defaults; `options` names the method's own keyword
    options with their defaults (anything else passed to policy_loss is rejected)."""
    unknown = set(defaults or {}) - set(_SHARED_DEFAULTS)
    if unknown:
        raise ValueError(f"register_method: unknown shared defaults {sorted(unknown)}")
    m = Method(name, token_loss, {**_SHARED_DEFAULTS, **(defaults or {})}, dict(options or {}), doc)
    METHODS[name] = m
    return m


def method_names() -> list[str]:
    return sorted(METHODS)


def _bapo_loss(t, *, bapo_mode, bapo_target, bapo_low_range, bapo_high_range, bapo_low_step,
               bapo_high_step, bapo_bounds, process_group):
    if bapo_bounds is not None:
        c_low = torch.as_tensor(float(bapo_bounds[0]), dtype=torch.float64, device=t.logp.device)
        c_high = torch.as_tensor(float(bapo_bounds[1]), dtype=torch.float64, device=t.logp.device)
        metrics = {}
    else:
        official = bapo_mode == "official_code"
        target = bapo_target if bapo_target is not None else (1.0 if official else 0.4)
        low_range = bapo_low_range or ((0.6, 0.8) if official else (0.6, 0.9))
        high_range = bapo_high_range or ((1.2, 2.0) if official else (1.2, 3.0))
        low_step = bapo_low_step or (0.05 if official else 0.02)
        high_step = bapo_high_step or 0.05
        with torch.no_grad():
            ratio = torch.exp(ref.log_ratio(t.logp.detach(), t.old_logp, t.ratio_log_clamp))
            c_low, c_high, rho = bapo_search(
                ratio, t.adv, t.mask, mode=bapo_mode, target=target, low_range=low_range,
                high_range=high_range, low_step=low_step, high_step=high_step, process_group=process_group)
        metrics = {"bapo/rho": rho}
    tl = ref.bapo_token_loss(t, c_low, c_high)
    tl.metrics.update(metrics, **{"bapo/clip_low": c_low, "bapo/clip_high": c_high})
    return tl


def _gpg_loss(t, *, gpg_alpha, gpg_alpha_mode, group_size, group_ids, rewards, process_group):
    if gpg_alpha is not None:
        alpha = torch.as_tensor(float(gpg_alpha), dtype=t.logp.dtype, device=t.logp.device)
    elif group_size is not None or group_ids is not None or gpg_alpha_mode == "verl_nonzero":
        alpha = ref.gpg_alpha(t.rows, t.adv, t.mask, group_size=group_size, group_ids=group_ids,
                              rewards=rewards, mode=gpg_alpha_mode, process_group=process_group)
        alpha = alpha.to(t.logp.dtype)
    else:
        alpha = torch.ones((), dtype=t.logp.dtype, device=t.logp.device)
    tl = ref.reinforce_token_loss(t, alpha)
    tl.metrics["gpg/alpha"] = alpha
    return tl


_BAPO_OPTIONS = {"bapo_mode": "paper", "bapo_target": None, "bapo_low_range": None,
                 "bapo_high_range": None, "bapo_low_step": None, "bapo_high_step": None,
                 "bapo_bounds": None, "process_group": None}
_GPG_OPTIONS = {"gpg_alpha": None, "gpg_alpha_mode": "zero_variance", "group_size": None,
                "group_ids": None, "rewards": None, "process_group": None}

register_method("ppo", ref.ppo_token_loss,
                doc="clipped surrogate; clip_low/clip_high (clip-higher), dual clip clip_ratio_c")
register_method("grpo", ref.ppo_token_loss,
                doc="PPO surrogate on group-normalised advantages; the DeepSeekMath form is "
                    "agg='seq-mean-token-mean' with kl_coef=0.04, kl_estimator='k3'")
register_method("dapo", ref.ppo_token_loss, defaults={"clip_low": 0.2, "clip_high": 0.28},
                doc="clip-higher 0.2/0.28, token-mean over the global batch")
register_method("dr_grpo", ref.ppo_token_loss, defaults={"agg": "seq-mean-token-sum-norm"},
                doc="PPO surrogate, constant normaliser B * max_len (pass max_len)")
register_method("gppo", lambda t, gppo_beta1, gppo_beta2: ref.gppo_token_loss(t, gppo_beta1, gppo_beta2),
                defaults={"clip_low": 0.2, "clip_high": 0.28},
                options={"gppo_beta1": 1.0, "gppo_beta2": 1.0},
                doc="clip-higher value, clipped tokens keep gradient -beta*bound*A")
register_method("gppo_klear", lambda t, gppo_beta1, gppo_beta2: ref.gppo_token_loss(t, gppo_beta1, gppo_beta2),
                defaults={"clip_low": 0.2, "clip_high": 0.28, "clip_ratio_c": 10.0},
                options={"gppo_beta1": 0.25, "gppo_beta2": 1.0},
                doc="Klear-Reasoner script values (beta1=0.25, beta2=1, dual clip 10)")
register_method("cispo", ref.cispo_token_loss, defaults={"clip_low": 1.0, "clip_high": 0.2},
                doc="-sg(clip(r, 1-clip_low, 1+clip_high)) A logp; default: no lower bound, upper 1.2 (verl)")
register_method("cispo_scalerl", ref.cispo_token_loss, defaults={"clip_low": 1.0, "clip_high": 4.0},
                doc="TRL/ScaleRL: absolute upper bound 5.0 (epsilon_high=5.0)")
register_method("ecpo", lambda t, ecpo_delta, ratio_level: ref.ecpo_token_loss(t, ecpo_delta, ratio_level),
                options={"ecpo_delta": 0.1, "ratio_level": "token"},
                doc="early-clipped pi_old for large ratios: bounded, non-zero gradient")
register_method("gspo", lambda t: ref.gspo_token_loss(t, token_form=False),
                defaults={"clip_low": 3e-4, "clip_high": 4e-4, "agg": "seq-mean-token-mean"},
                doc="sequence ratio exp(mean log-ratio), clipped per sequence")
register_method("gspo-token", lambda t: ref.gspo_token_loss(t, token_form=True),
                defaults={"clip_low": 3e-4, "clip_high": 4e-4, "agg": "seq-mean-token-mean"},
                doc="GSPO with token-level advantages: sg(s_i) * exp(logp - sg(logp))")
register_method("reinforce", lambda t: ref.reinforce_token_loss(t), defaults={"agg": "seq-mean-token-sum"},
                doc="-A logp")
register_method("gpg", _gpg_loss, options=_GPG_OPTIONS,
                doc="-alpha A logp, alpha = #groups / #groups with signal (or gpg_alpha)")
register_method("bapo", _bapo_loss, options=_BAPO_OPTIONS,
                doc="PPO with absolute bounds searched per call (bapo_mode='paper'|'official_code')")


# --------------------------------------------------------------------------------------------
# argument checks


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_float(name, value, *, lo=None, hi=None, lo_open=True, allow_none=False):
    if value is None:
        if allow_none:
            return None
        raise TypeError(f"{name} must be a float, got None")
    if not _is_number(value):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if lo is not None and (value <= lo if lo_open else value < lo):
        raise ValueError(f"{name} must be {'>' if lo_open else '>='} {lo}, got {value}")
    if hi is not None and value > hi:
        raise ValueError(f"{name} must be <= {hi}, got {value}")
    return value


def _check_token_tensor(name, x, like, *, floating=True):
    if x is None:
        return None
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if tuple(x.shape) != tuple(like.shape):
        raise ValueError(f"{name} must have the token shape {tuple(like.shape)}, got {tuple(x.shape)}")
    if x.device != like.device:
        raise ValueError(f"{name} is on {x.device} but logp is on {like.device}")
    if floating and not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
    return x


def _check_mask(mask, logp):
    if mask is None:
        return torch.ones(logp.shape, dtype=torch.bool, device=logp.device)
    _check_token_tensor("mask", mask, logp, floating=False)
    if mask.dtype.is_complex:
        raise TypeError(f"mask must be bool or 0/1, got {mask.dtype}")
    return mask if mask.dtype == torch.bool else mask != 0


def _check_cu_seqlens(cu_seqlens, logp):
    if not isinstance(cu_seqlens, Tensor):
        raise TypeError(f"cu_seqlens must be a torch.Tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be a 1-D [B + 1] tensor, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype.is_floating_point or cu_seqlens.dtype == torch.bool:
        raise TypeError(f"cu_seqlens must be an integer tensor, got {cu_seqlens.dtype}")
    if cu_seqlens.device != logp.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but logp is on {logp.device}")
    if cu_seqlens.device.type == "cpu" and not torch.compiler.is_compiling():
        cu = cu_seqlens.tolist()
        if cu[0] != 0 or cu[-1] != logp.shape[0] or any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"cu_seqlens must start at 0, never decrease and end at N={logp.shape[0]}; "
                             f"got {cu[:8]}{'...' if len(cu) > 8 else ''}")


def _check_advantages(advantages, logp, rows):
    if not isinstance(advantages, Tensor):
        raise TypeError(f"advantages must be a torch.Tensor, got {type(advantages).__name__}")
    if not advantages.dtype.is_floating_point:
        raise TypeError(f"advantages must be a floating-point tensor, got {advantages.dtype}")
    if advantages.device != logp.device:
        raise ValueError(f"advantages is on {advantages.device} but logp is on {logp.device}")
    if tuple(advantages.shape) == tuple(logp.shape):
        return advantages
    if tuple(advantages.shape) == (rows.num_rows,):
        return rows.to_tokens(advantages)
    raise ValueError(f"advantages must be per sequence [{rows.num_rows}] or per token {tuple(logp.shape)}, "
                     f"got {tuple(advantages.shape)}")


def _resolve_options(method: Method, kwargs: dict) -> dict:
    unknown = sorted(set(kwargs) - set(method.options))
    if unknown:
        owners = {k: [m.name for m in METHODS.values() if k in m.options] for k in unknown}
        hints = "; ".join(f"{k!r} belongs to {v}" if v else f"{k!r} is not an option of any method"
                          for k, v in owners.items())
        raise TypeError(f"unknown option(s) {unknown} for method={method.name!r} "
                        f"(its options: {sorted(method.options) or 'none'}); {hints}")
    opts = {**method.options, **kwargs}
    if "gppo_beta1" in opts:
        for k in ("gppo_beta1", "gppo_beta2"):
            opts[k] = _check_float(k, opts[k], lo=0.0, lo_open=False)
    if "ecpo_delta" in opts:
        opts["ecpo_delta"] = _check_float("ecpo_delta", opts["ecpo_delta"], lo=0.0, lo_open=False)
        if opts["ratio_level"] not in ("token", "sequence"):
            raise ValueError(f"ratio_level must be 'token' or 'sequence', got {opts['ratio_level']!r}")
    if "bapo_mode" in opts:
        if opts["bapo_mode"] not in ("paper", "official_code"):
            raise ValueError(f"bapo_mode must be 'paper' or 'official_code', got {opts['bapo_mode']!r}")
        for k in ("bapo_low_step", "bapo_high_step"):
            if opts[k] is not None:
                opts[k] = _check_float(k, opts[k], lo=0.0)
        if opts["bapo_target"] is not None:
            opts["bapo_target"] = _check_float("bapo_target", opts["bapo_target"], lo=0.0, lo_open=False)
        for k in ("bapo_low_range", "bapo_high_range", "bapo_bounds"):
            v = opts[k]
            if v is None:
                continue
            if not (isinstance(v, (tuple, list)) and len(v) == 2 and all(_is_number(x) for x in v)):
                raise TypeError(f"{k} must be a pair of floats, got {v!r}")
            if not (0 < v[0] <= v[1]):
                raise ValueError(f"{k} must satisfy 0 < {k}[0] <= {k}[1], got {tuple(v)}")
    if "gpg_alpha_mode" in opts:
        if opts["gpg_alpha_mode"] not in ("zero_variance", "verl_nonzero"):
            raise ValueError(f"gpg_alpha_mode must be 'zero_variance' or 'verl_nonzero', "
                             f"got {opts['gpg_alpha_mode']!r}")
        if opts["gpg_alpha"] is not None:
            opts["gpg_alpha"] = _check_float("gpg_alpha", opts["gpg_alpha"], lo=0.0, lo_open=False)
        if opts["gpg_alpha_mode"] == "verl_nonzero" and opts["rewards"] is None and opts["gpg_alpha"] is None:
            raise ValueError("gpg_alpha_mode='verl_nonzero' needs rewards=[B]")
        gs, gid = opts["group_size"], opts["group_ids"]
        if gs is not None and gid is not None:
            raise ValueError("give group_size or group_ids, not both")
        if gs is not None and (isinstance(gs, bool) or not isinstance(gs, int) or gs < 1):
            raise ValueError(f"group_size must be a positive int, got {gs!r}")
    return opts


# --------------------------------------------------------------------------------------------
# policy_loss


def policy_loss(logp: Tensor, old_logp: Tensor | None, advantages: Tensor, mask: Tensor | None = None, *,
                method: str = "grpo", clip_low: float | None = None, clip_high: float | None = None,
                clip_ratio_c: float | None = None, ref_logp: Tensor | None = None, kl_coef: float = 0.0,
                kl_estimator: str = "k3", entropy: Tensor | None = None, entropy_coef: float = 0.0,
                agg: str | None = None, normalizer=None, max_len: int | None = None,
                rollout_is_weights: Tensor | None = None, ratio_log_clamp: float | None = 20.0,
                cu_seqlens: Tensor | None = None, **method_options) -> PolicyLossOutput:
    """Policy-gradient loss from per-token log-probs (pure PyTorch; composable, compile-traceable).

    Args:
        logp: `[B, T]` (or packed `[N]` with `cu_seqlens`) log-probs of the sampled tokens, with autograd.
        old_logp: behaviour-policy log-probs, same shape; None = on-policy (old = sg(logp)).
        advantages: `[B]` per sequence (broadcast over T) or per token like `logp`; detached.
        mask: bool or 0/1 like `logp`; only masked-in tokens count anywhere. None = all tokens.
        method: a registry name (see `method_names()`).
        clip_low, clip_high: relative bounds 1 - clip_low, 1 + clip_high (clip_high None = clip_low);
            None takes the method's default (0.2; dapo/gppo 0.2/0.28; gspo 3e-4/4e-4; cispo 1.0/0.2).
        clip_ratio_c: dual-clip constant c > 1 for A < 0 (off by default).
        ref_logp, kl_coef, kl_estimator: KL-as-loss term ("k1", "k2", "k3", "low_var_kl").
        entropy, entropy_coef: entropy bonus -entropy_coef * Agg(H); entropy is per-token H.
        agg: aggregation mode (None: the method's default; token-mean except gspo:
            seq-mean-token-mean, reinforce: seq-mean-token-sum, dr_grpo: seq-mean-token-sum-norm).
        normalizer: the aggregation's denominator over the whole optimiser step (global token count,
            global non-empty row count, or B'_glob * max_len); None = computed from this call's mask.
        max_len: the constant C of seq-mean-token-sum-norm.
        rollout_is_weights: detached per-token weights multiplied into the policy term (truncated IS).
        ratio_log_clamp: log-ratios are clamped to +-this before exp (None disables; GSPO: +10 above).
        cu_seqlens: `[B + 1]` row offsets of the packed layout.
        **method_options: the method's own options (ecpo_delta, ratio_level, gppo_beta1/2, gpg_alpha,
            group_size, group_ids, rewards, bapo_*, process_group).

    Returns:
        PolicyLossOutput(loss, metrics), loss in fp32 (fp64 for fp64 logp).
    """
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known methods: {method_names()}")
    m = METHODS[method]
    if not isinstance(logp, Tensor):
        raise TypeError(f"logp must be a torch.Tensor, got {type(logp).__name__}")
    if not logp.dtype.is_floating_point:
        raise TypeError(f"logp must be a floating-point tensor, got {logp.dtype}")
    if cu_seqlens is None:
        if logp.dim() != 2:
            raise ValueError(f"logp must be [B, T] (or packed [N] with cu_seqlens), got shape {tuple(logp.shape)}")
    else:
        if logp.dim() != 1:
            raise ValueError(f"with cu_seqlens, logp must be packed [N], got shape {tuple(logp.shape)}")
        _check_cu_seqlens(cu_seqlens, logp)
    opts = _resolve_options(m, method_options)

    # shared knobs
    clip_low = m.defaults["clip_low"] if clip_low is None else clip_low
    clip_low = _check_float("clip_low", clip_low, lo=0.0, hi=1.0)
    clip_high = clip_low if (clip_high is None and m.defaults["clip_high"] is None) else (
        m.defaults["clip_high"] if clip_high is None else clip_high)
    clip_high = _check_float("clip_high", clip_high, lo=0.0)
    clip_ratio_c = m.defaults["clip_ratio_c"] if clip_ratio_c is None else clip_ratio_c
    clip_ratio_c = _check_float("clip_ratio_c", clip_ratio_c, lo=1.0, allow_none=True)
    ratio_log_clamp = _check_float("ratio_log_clamp", ratio_log_clamp, lo=0.0, allow_none=True)
    kl_coef = _check_float("kl_coef", kl_coef, lo=0.0, lo_open=False)
    entropy_coef = _check_float("entropy_coef", entropy_coef)
    agg = m.defaults["agg"] if agg is None else agg
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if kl_coef > 0 and ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp (the reference policy's log-probs)")
    if entropy_coef != 0 and entropy is None:
        raise ValueError("entropy_coef != 0 needs entropy (per-token entropy; fused_policy_loss computes it)")
    if agg == "seq-mean-token-sum-norm" and normalizer is None:
        if max_len is None:
            raise ValueError("agg='seq-mean-token-sum-norm' needs max_len (the constant C, e.g. the maximum "
                             "response length) or an explicit normalizer")
        max_len = _check_float("max_len", max_len, lo=0.0)
    if normalizer is not None:
        if isinstance(normalizer, Tensor):
            if normalizer.numel() != 1:
                raise ValueError(f"normalizer must be a scalar, got shape {tuple(normalizer.shape)}")
            normalizer = normalizer.reshape(()).to(logp.device)
        else:
            normalizer = _check_float("normalizer", normalizer, lo=0.0, lo_open=False)

    mask = _check_mask(mask, logp)
    for name, x in (("old_logp", old_logp), ("ref_logp", ref_logp), ("entropy", entropy),
                    ("rollout_is_weights", rollout_is_weights)):
        _check_token_tensor(name, x, logp)
    rows = ref.Rows(logp.shape, logp.device, cu_seqlens)
    advantages = _check_advantages(advantages, logp, rows)
    for k in ("group_ids", "rewards"):
        v = opts.get(k)
        if v is not None and (not isinstance(v, Tensor) or tuple(v.shape) != (rows.num_rows,)):
            raise ValueError(f"{k} must be a [{rows.num_rows}] tensor (one entry per sequence)")
    if opts.get("group_size") is not None and rows.num_rows % opts["group_size"]:
        raise ValueError(f"group_size={opts['group_size']} does not divide the number of sequences {rows.num_rows}")

    # per-token math in fp32 (fp64 for fp64 logp); padding zeroed before any exp
    dtype = ref.compute_dtype(logp.dtype)
    logp_c = ref.sanitize(logp, mask, dtype)
    old_c = logp_c.detach() if old_logp is None else ref.sanitize(old_logp.detach(), mask, dtype)
    adv_c = ref.sanitize(advantages.detach(), mask, dtype)
    t = ref.TokenInputs(logp_c, old_c, adv_c, mask, rows, clip_low, clip_high, clip_ratio_c, ratio_log_clamp)
    tl = m.token_loss(t, **opts)
    phi = tl.phi
    if rollout_is_weights is not None:
        phi = phi * ref.sanitize(rollout_is_weights.detach(), mask, dtype)

    norm = normalizer if normalizer is not None else ref.default_normalizer(agg, mask, rows, max_len, dtype)
    pg_loss = ref.aggregate(phi, mask, rows, agg, norm)
    loss = pg_loss
    metrics = {"pg_loss": pg_loss}
    if ref_logp is not None:
        kl = ref.kl_penalty(logp_c, ref.sanitize(ref_logp.detach(), mask, dtype), kl_estimator)
        if kl_coef > 0:
            loss = loss + kl_coef * ref.aggregate(kl, mask, rows, agg, norm)
        metrics["kl"] = ref.masked_mean(kl.detach(), mask)
    if entropy is not None:
        ent = ref.sanitize(entropy, mask, dtype)
        if entropy_coef != 0:
            loss = loss - entropy_coef * ref.aggregate(ent, mask, rows, agg, norm)
        metrics["entropy"] = ref.masked_mean(ent.detach(), mask)

    with torch.no_grad():
        metrics.update(ref.ratio_metrics(tl, adv_c, mask))
        metrics["approx_kl"] = ref.masked_mean(old_c - logp_c.detach(), mask)
        metrics.update(tl.metrics)
    return PolicyLossOutput(loss, ref.finalize_metrics(metrics))


# --------------------------------------------------------------------------------------------
# fused_policy_loss


def _torch_stats(logits3, labels, temperature, ignore_index):
    """The torch backend's fwd/bwd for the two options below, in the kernel contract's terms."""
    from alignops.reference.token_stats import token_stats  # noqa: PLC0415
    with torch.no_grad():
        logp, lse, entropy = token_stats(logits3.reshape(-1, logits3.shape[-1]), labels, temperature, ignore_index)
    return logp, lse, entropy


def _torch_backward(logits3, labels, logp, lse, entropy, a, b, temperature, ignore_index, out):
    """dL/dz_v = a (1[v=y] - p_v) - b p_v (log p_v + H), divided by T; written into `out`."""
    dtype = ref.compute_dtype(logits3.dtype)
    z = logits3.reshape(-1, logits3.shape[-1]).to(dtype) / temperature
    valid = labels != ignore_index
    z = torch.where(valid.unsqueeze(-1), z, torch.zeros((), dtype=dtype))
    log_p = torch.log_softmax(z, dim=-1)
    p = log_p.exp()
    g = -a.unsqueeze(-1) * p - b.unsqueeze(-1) * torch.where(p > 0, p * (log_p + entropy.unsqueeze(-1)), 0.0)
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    g.scatter_add_(1, safe.unsqueeze(-1), a.unsqueeze(-1))
    g = torch.where(valid.unsqueeze(-1), g / temperature, 0.0)
    out.copy_(g.reshape(out.shape))


def _stats_forward(logits3, labels, temperature, ignore_index, compute_entropy, backend):
    if backend == "torch":
        return _torch_stats(logits3, labels, temperature, ignore_index)
    n = labels.numel()
    out_dtype = torch.float64 if logits3.dtype == torch.float64 else torch.float32
    logp = torch.empty(n, dtype=out_dtype, device=logits3.device)
    lse, entropy = torch.empty_like(logp), torch.empty_like(logp)
    if n:
        _backend.kernel("token_stats_fwd", backend)(logits3, labels, 1.0 / temperature, ignore_index,
                                                    compute_entropy, logp, lse, entropy)
    return logp, lse, entropy


def _stats_backward(logits3, labels, logp, lse, entropy, a, b, temperature, ignore_index, has_b, backend, out):
    if backend == "torch":
        _torch_backward(logits3, labels, logp, lse, entropy, a, b if has_b else torch.zeros_like(a),
                        temperature, ignore_index, out)
    elif labels.numel():
        _backend.kernel("token_stats_bwd", backend)(logits3, labels, logp, lse, entropy, a, b,
                                                    1.0 / temperature, ignore_index, has_b, out)


class _InplaceTokenStats(torch.autograd.Function):
    """token_stats whose backward writes dL/dlogits into the logits buffer itself."""

    @staticmethod
    def forward(ctx, logits3, labels, temperature, ignore_index, compute_entropy, backend):
        logp, lse, entropy = _stats_forward(logits3, labels, temperature, ignore_index, compute_entropy, backend)
        ctx.save_for_backward(logits3, labels, logp, lse, entropy)
        ctx.args = (temperature, ignore_index, compute_entropy, backend)
        ctx.mark_non_differentiable(lse)
        return logp, lse, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_lse, grad_entropy):
        logits3, labels, logp, lse, entropy = ctx.saved_tensors
        temperature, ignore_index, compute_entropy, backend = ctx.args
        a = torch.zeros_like(logp) if grad_logp is None else grad_logp.contiguous()
        has_b = compute_entropy and grad_entropy is not None
        b = grad_entropy.contiguous() if has_b else a
        _stats_backward(logits3, labels, logp, lse, entropy, a, b, temperature, ignore_index, has_b,
                        backend, logits3)
        return logits3, None, None, None, None, None


class _PrecomputedGrad(torch.autograd.Function):
    """A terminal loss whose gradient w.r.t. the logits was computed during forward."""

    @staticmethod
    def forward(ctx, loss, logits, grad_logits):
        ctx.save_for_backward(grad_logits)
        return loss.clone()

    @staticmethod
    def backward(ctx, grad_output):
        (grad_logits,) = ctx.saved_tensors
        # the stored gradient is for grad_output = 1; scale it in place (no second [N, V] buffer)
        return None, grad_logits.mul_(grad_output.to(grad_logits.dtype)), None


# One-launch policy loss (issue 3): the per-token math of token-local methods runs inside the logits
# pass (csrc/common/policy_math.h, kernels/policy_loss.py), which writes the gradient row at once.
# Kernel contract, cpu and triton:
#   policy_loss_fused(logits, labels, old_logp, adv, ref_logp, is_weight, agg_norm, row_len, mask, method,
#                     kl_estimator,
#                     knobs, flags, inv_temperature, ignore_index, compute_entropy,
#                     logp, entropy, loss_terms, pg_terms, grad_logits)
#   per-token inputs [B*T] contiguous in the stats dtype, zeroed where mask is False; mask bool;
#   agg_norm = the normaliser per token, row_len = the row's length (seq-mean-token-mean) or 1: a
#   term's weight is (coef / agg_norm) / row_len; knobs/flags: policy_math.h.
#   loss_terms.sum() is the loss and pg_terms.sum() the pg_loss that fused_policy_loss returns
#   (summed in float64); grad_logits may alias logits.

_EPILOGUE_CODES = {"ppo": 0, "grpo": 0, "dapo": 0, "dr_grpo": 0, "ecpo": 0, "gppo": 1, "gppo_klear": 1,
                   "cispo": 2, "cispo_scalerl": 2, "reinforce": 3, "gpg": 3}
_EPILOGUE_KL_CODES = {"k1": 1, "k2": 2, "k3": 3, "low_var_kl": 4}  # KlEstimatorCode in policy_math.h
# The registry entries the codes describe; a re-registered name falls back to the two-pass path.
_EPILOGUE_METHODS = {name: METHODS[name] for name in _EPILOGUE_CODES}
_POLICY_SHARED_KEYS = ("clip_low", "clip_high", "clip_ratio_c", "ref_logp", "kl_coef", "kl_estimator",
                       "entropy_coef", "agg", "normalizer", "max_len", "rollout_is_weights", "ratio_log_clamp",
                       "cu_seqlens")


def _epilogue_eligible(method, kwargs, backend, compute_entropy, labels, named) -> bool:
    """Whether the one-launch kernel runs. A token-local method on the cpu or triton backend runs it
    unless its kernel fails to load: then a named backend raises, and the automatic one warns once
    (naming the cause) and runs the two-pass kernels."""
    if backend not in ("cpu", "triton") or not isinstance(method, str):
        return False
    if _EPILOGUE_METHODS.get(method) is None or METHODS.get(method) is not _EPILOGUE_METHODS[method]:
        return False
    if method == "ecpo" and kwargs.get("ratio_level", "token") != "token":
        return False  # the sequence-level log-ratio is a row mean
    if method == "gpg" and kwargs.get("gpg_alpha") is None:
        return False  # alpha is a statistic of the batch's groups
    entropy_coef = kwargs.get("entropy_coef", 0.0)
    if not compute_entropy and not (_is_number(entropy_coef) and entropy_coef == 0):
        return False  # the two-pass path raises the right error
    if labels.dim() != (1 if kwargs.get("cu_seqlens") is not None else 2):
        return False  # likewise
    _, reason = _backend.kernel_or_reason("policy_loss_fused", backend)
    if reason is not None:
        msg = f"the one-launch policy kernel (policy_loss_fused, backend {backend!r}) cannot be loaded: {reason}"
        if named:
            raise _backend.BackendUnavailableError(
                f"backend={backend!r}: {msg}; pass grad_in_forward=False, or name no backend to fall back to "
                "the two-pass kernels")
        _backend.warn_once(f"alignops: {msg}; fused_policy_loss(grad_in_forward=True) runs the two-pass kernels "
                           "instead", stacklevel=4)
        return False
    return True


def _epilogue_policy_loss(logits, logits3, labels, flat_labels, old_logp, advantages, mask, method, temperature,
                          ignore_index, compute_entropy, backend, inplace_grad, kwargs) -> PolicyLossOutput:
    m = METHODS[method]
    shared = {k: kwargs[k] for k in _POLICY_SHARED_KEYS if k in kwargs}
    opts = _resolve_options(m, {k: v for k, v in kwargs.items() if k not in _POLICY_SHARED_KEYS})
    clip_low = shared.get("clip_low")
    clip_high = shared.get("clip_high")
    clip_ratio_c = shared.get("clip_ratio_c")
    clip_low = _check_float("clip_low", m.defaults["clip_low"] if clip_low is None else clip_low, lo=0.0, hi=1.0)
    clip_high = clip_low if (clip_high is None and m.defaults["clip_high"] is None) else (
        m.defaults["clip_high"] if clip_high is None else clip_high)
    clip_high = _check_float("clip_high", clip_high, lo=0.0)
    clip_ratio_c = m.defaults["clip_ratio_c"] if clip_ratio_c is None else clip_ratio_c
    clip_ratio_c = _check_float("clip_ratio_c", clip_ratio_c, lo=1.0, allow_none=True)
    ratio_log_clamp = _check_float("ratio_log_clamp", shared.get("ratio_log_clamp", 20.0), lo=0.0, allow_none=True)
    kl_coef = _check_float("kl_coef", shared.get("kl_coef", 0.0), lo=0.0, lo_open=False)
    entropy_coef = _check_float("entropy_coef", shared.get("entropy_coef", 0.0))
    kl_estimator = shared.get("kl_estimator", "k3")
    agg = shared.get("agg") or m.defaults["agg"]
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    ref_logp = shared.get("ref_logp")
    if kl_coef > 0 and ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp (the reference policy's log-probs)")
    normalizer, max_len = shared.get("normalizer"), shared.get("max_len")
    if agg == "seq-mean-token-sum-norm" and normalizer is None:
        if max_len is None:
            raise ValueError("agg='seq-mean-token-sum-norm' needs max_len (the constant C, e.g. the maximum "
                             "response length) or an explicit normalizer")
        max_len = _check_float("max_len", max_len, lo=0.0)
    cu_seqlens = shared.get("cu_seqlens")
    if cu_seqlens is not None:
        _check_cu_seqlens(cu_seqlens, labels)
    mask = _check_mask(mask, labels)
    rollout_is_weights = shared.get("rollout_is_weights")
    for name, x in (("old_logp", old_logp), ("ref_logp", ref_logp), ("rollout_is_weights", rollout_is_weights)):
        _check_token_tensor(name, x, labels)
    rows = ref.Rows(labels.shape, labels.device, cu_seqlens)
    advantages = _check_advantages(advantages, labels, rows)

    dtype = ref.compute_dtype(logits.dtype)
    if normalizer is None:
        norm = ref.default_normalizer(agg, mask, rows, max_len, dtype)
    elif isinstance(normalizer, Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer must be a scalar, got shape {tuple(normalizer.shape)}")
        norm = normalizer.reshape(()).to(device=labels.device, dtype=dtype)
    else:
        norm = torch.as_tensor(_check_float("normalizer", normalizer, lo=0.0, lo_open=False), dtype=dtype,
                               device=labels.device)
    # The kernel forms each term's weight as (coef / normaliser) / row length, the order autograd
    # takes through ref.aggregate, so a and b match the two-pass path's.
    agg_norm = norm.expand(labels.shape).reshape(-1).contiguous()
    if agg == "seq-mean-token-mean":
        row_len = rows.to_tokens(rows.row_sum(mask.to(dtype)).clamp(min=1)).reshape(-1).contiguous()
    else:
        row_len = torch.ones(labels.numel(), dtype=dtype, device=labels.device)

    def flat(x):
        return ref.sanitize(x.detach(), mask, dtype).reshape(-1).contiguous()

    adv_c = flat(advantages)
    knobs = [1.0 - clip_low, 1.0 + clip_high, clip_ratio_c or 0.0, ratio_log_clamp or 0.0,
             math.log1p(clip_high + opts["ecpo_delta"]) if method == "ecpo" else 0.0,
             opts.get("gppo_beta1", 1.0), opts.get("gppo_beta2", 1.0),
             opts["gpg_alpha"] if method == "gpg" else 1.0, kl_coef, entropy_coef]
    kl_on = kl_coef > 0
    flags = ((1 if old_logp is not None else 0) | (2 if kl_on else 0) | (4 if rollout_is_weights is not None else 0)
             | (8 if clip_ratio_c is not None else 0) | (16 if ratio_log_clamp is not None else 0)
             | (32 if method == "ecpo" else 0))
    n = flat_labels.numel()
    logp = torch.empty(n, dtype=dtype, device=labels.device)
    entropy, loss_terms, pg_terms = torch.empty_like(logp), torch.empty_like(logp), torch.empty_like(logp)
    target = logits3.detach() if inplace_grad else torch.empty_like(logits3)
    with torch.no_grad():
        if n:
            _backend.kernel("policy_loss_fused", backend)(
                logits3.detach(), flat_labels, flat(old_logp) if old_logp is not None else adv_c, adv_c,
                flat(ref_logp) if kl_on else adv_c,
                flat(rollout_is_weights) if rollout_is_weights is not None else adv_c,
                agg_norm, row_len, mask.reshape(-1).contiguous(), _EPILOGUE_CODES[method],
                _EPILOGUE_KL_CODES[kl_estimator] if kl_on else 0, knobs, flags, 1.0 / temperature, ignore_index,
                compute_entropy, logp, entropy, loss_terms, pg_terms, target)
        # The loss and pg_loss are the kernel's: each token's share of them (its weight
        # (coef / normaliser) / row length included) summed in float64, so the order of the sum
        # costs no digits. The other metrics (and every remaining argument check) come from torch
        # on the kernel's logp and entropy: O(N) work.
        loss_value = loss_terms.sum(dtype=torch.float64).to(dtype)
        pg_value = pg_terms.sum(dtype=torch.float64).to(dtype)
        out = policy_loss(logp.view(labels.shape), old_logp, advantages, mask, method=method,
                          entropy=entropy.view(labels.shape) if compute_entropy else None, **kwargs)
    metrics = dict(out.metrics)
    metrics["pg_loss"] = pg_value.detach().to(torch.float32)
    grad = target.view(logits.shape) if inplace_grad else target.reshape(logits.shape)
    loss = _PrecomputedGrad.apply(loss_value, logits, grad)
    return PolicyLossOutput(loss, metrics)


def fused_policy_loss(logits: Tensor, labels: Tensor, old_logp: Tensor | None, advantages: Tensor,
                      mask: Tensor | None = None, *, method: str = "grpo", temperature: float = 1.0,
                      ignore_index: int = -100, compute_entropy: bool | None = None,
                      backend: str | None = None, inplace_grad: bool = False, grad_in_forward: bool = False,
                      validate_labels: bool | None = None, **kwargs) -> PolicyLossOutput:
    """policy_loss computed straight from the logits, in the logits pass of token_logprobs.

    `logits` are `[B, T, V]` with `labels [B, T]`, or packed `[N, V]` with `labels [N]` and
    `cu_seqlens`. Labels equal to `ignore_index` are masked out (whatever `mask` says; mask=None
    means `labels != ignore_index`). Every other keyword is
    policy_loss's. The entropy (and its gradient) is computed in the same pass when
    `entropy_coef != 0` or `compute_entropy=True` (which also reports the `entropy` metric).

    Equivalence (value and gradient w.r.t. the logits), on every backend:
        fused_policy_loss(logits, labels, ...) == policy_loss(token_logprobs(logits, labels), ...)

    inplace_grad=True: backward writes dL/dlogits into the logits' own storage (the logits are
        destroyed; `logits.grad` / the upstream gradient aliases the buffer). No [N, V] allocation.
    grad_in_forward=True: for a terminal loss (nothing else differentiates through these logits):
        a = dL/dlogp and b = dL/dH are taken during forward and the backward kernel runs at once,
        so the logits need not be kept; backward only scales by grad_output. Not traceable by
        torch.compile (it calls autograd inside forward); the default path is.
    """
    check_logits_labels(logits, labels)
    temperature = check_temperature(temperature)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    for name, flag in (("inplace_grad", inplace_grad), ("grad_in_forward", grad_in_forward)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    entropy_coef = kwargs.get("entropy_coef", 0.0)
    if compute_entropy is None:
        compute_entropy = _is_number(entropy_coef) and entropy_coef != 0
    # A position counts iff mask != 0 and label != ignore_index, so mask=None means
    # labels != ignore_index (an ignored position's logp is 0, and against an off-policy old_logp
    # it would otherwise enter the loss with a bogus ratio). A mask of the wrong shape or type is
    # left to policy_loss, which names it.
    if mask is None:
        mask = labels != ignore_index
    elif isinstance(mask, Tensor) and tuple(mask.shape) == tuple(labels.shape) and mask.device == labels.device:
        mask = (mask if mask.dtype == torch.bool else mask != 0) & (labels != ignore_index)

    if not (inplace_grad or grad_in_forward):
        result = token_logprobs(logits, labels, temperature=temperature, ignore_index=ignore_index,
                                return_entropy=compute_entropy, backend=backend,
                                validate_labels=validate_labels)
        logp, entropy = result if compute_entropy else (result, None)
        return policy_loss(logp, old_logp, advantages, mask, method=method, entropy=entropy, **kwargs)

    if torch.compiler.is_compiling():
        raise RuntimeError("inplace_grad / grad_in_forward are eager-only; use the default path under torch.compile")
    if validate_labels is None:
        validate_labels = labels.device.type == "cpu"
    if validate_labels:
        check_label_range(labels, logits.shape[-1], ignore_index)
    named = _backend.requested_backend(backend) is not None
    backend = _backend.resolve_backend(backend, logits.device, what=LOGITS_OPS)
    if logits.dtype == torch.float64 and backend in ("triton", "cuda"):
        raise TypeError(f"logits of dtype float64 are supported by the torch and cpu backends, not {backend!r}")
    logits3 = as_rows(logits)
    if inplace_grad and logits3.data_ptr() != logits.data_ptr():
        raise ValueError("inplace_grad=True needs logits with unit stride over the vocabulary")
    flat_labels = labels.reshape(-1).to(torch.int64).contiguous()
    needs_grad = torch.is_grad_enabled() and logits.requires_grad
    if grad_in_forward and needs_grad and _epilogue_eligible(method, kwargs, backend, compute_entropy, labels, named):
        return _epilogue_policy_loss(logits, logits3, labels, flat_labels, old_logp, advantages, mask, method,
                                     temperature, ignore_index, compute_entropy, backend, inplace_grad, kwargs)

    if not grad_in_forward:
        logp, _, entropy = _InplaceTokenStats.apply(logits3, flat_labels, temperature, ignore_index,
                                                    compute_entropy, backend)
        return policy_loss(logp.view(labels.shape), old_logp, advantages, mask, method=method,
                           entropy=entropy.view(labels.shape) if compute_entropy else None, **kwargs)

    with torch.no_grad():
        logp, lse, entropy = _stats_forward(logits3.detach(), flat_labels, temperature, ignore_index,
                                            compute_entropy, backend)
    logp_leaf = logp.view(labels.shape).detach().requires_grad_(needs_grad)
    ent_leaf = entropy.view(labels.shape).detach().requires_grad_(needs_grad) if compute_entropy else None
    with torch.enable_grad():
        out = policy_loss(logp_leaf, old_logp, advantages, mask, method=method, entropy=ent_leaf, **kwargs)
    if not needs_grad:
        return PolicyLossOutput(out.loss.detach(), out.metrics)
    leaves = [logp_leaf] + ([ent_leaf] if compute_entropy else [])
    grads = torch.autograd.grad(out.loss, leaves, allow_unused=True)
    a = torch.zeros_like(logp) if grads[0] is None else grads[0].reshape(-1).contiguous().to(logp.dtype)
    has_b = compute_entropy and grads[1] is not None
    b = grads[1].reshape(-1).contiguous().to(logp.dtype) if has_b else a
    with torch.no_grad():
        target = logits3.detach() if inplace_grad else torch.empty_like(logits3)
        _stats_backward(logits3.detach(), flat_labels, logp, lse, entropy, a, b, temperature, ignore_index,
                        has_b, backend, target)
    grad = target.view(logits.shape) if inplace_grad else target.reshape(logits.shape)
    # detached: out.loss's graph was consumed by autograd.grad above and must not be revisited
    loss = _PrecomputedGrad.apply(out.loss.detach(), logits, grad)
    return PolicyLossOutput(loss, out.metrics)


# --------------------------------------------------------------------------------------------
# value_loss (the PPO family's critic)


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor | None = None, *,
               clip_range: float | None = 0.5, agg: str = "token-mean", normalizer=None,
               max_len: int | None = None, cu_seqlens: Tensor | None = None) -> PolicyLossOutput:
    """PPO's clipped value loss (docs/methods.md §2.1):

        L_V = 1/2 Agg( max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2) )

    `values` `[B, T]` (or packed `[N]`) with autograd; `old_values` (rollout-time values) and
    `returns` (the GAE targets, computed before whitening) detached, same shape. `clip_range`
    None disables the clipped branch (plain 1/2 MSE). Aggregation and normaliser as in
    `policy_loss` (verl aggregates the critic with the actor's mode). Masked positions never
    reach the arithmetic. Metrics: vf_loss, vf_clipfrac (share of valid tokens where the clipped
    branch is the larger), vpred_mean, explained_variance."""
    if not isinstance(values, Tensor) or not values.dtype.is_floating_point:
        raise TypeError("values must be a floating-point torch.Tensor")
    if cu_seqlens is None and values.dim() != 2:
        raise ValueError(f"values must be [B, T] (or packed [N] with cu_seqlens), got shape {tuple(values.shape)}")
    if cu_seqlens is not None:
        if values.dim() != 1:
            raise ValueError(f"with cu_seqlens, values must be packed [N], got shape {tuple(values.shape)}")
        _check_cu_seqlens(cu_seqlens, values)
    for name, x in (("old_values", old_values), ("returns", returns)):
        if x is None:
            raise ValueError(f"{name} is required")
        _check_token_tensor(name, x, values)
    clip_range = _check_float("clip_range", clip_range, lo=0.0, allow_none=True)
    if agg not in AGG_MODES:
        raise ValueError(f"agg must be one of {AGG_MODES}, got {agg!r}")
    if agg == "seq-mean-token-sum-norm" and normalizer is None and max_len is None:
        raise ValueError("agg='seq-mean-token-sum-norm' needs max_len or an explicit normalizer")
    mask = _check_mask(mask, values)
    rows = ref.Rows(values.shape, values.device, cu_seqlens)
    dtype = ref.compute_dtype(values.dtype)
    v = ref.sanitize(values, mask, dtype)
    v_old = ref.sanitize(old_values.detach(), mask, dtype)
    ret = ref.sanitize(returns.detach(), mask, dtype)
    unclipped = (v - ret).square()
    if clip_range is None:
        per_token = unclipped
        clipped_wins = torch.zeros_like(mask)
    else:
        clipped = (v_old + (v - v_old).clamp(-clip_range, clip_range) - ret).square()
        per_token = torch.maximum(unclipped, clipped)
        clipped_wins = clipped > unclipped
    if normalizer is None:
        norm = ref.default_normalizer(agg, mask, rows, max_len, dtype)
    elif isinstance(normalizer, Tensor):
        norm = normalizer.reshape(()).to(device=values.device, dtype=dtype)
    else:
        norm = _check_float("normalizer", normalizer, lo=0.0, lo_open=False)
    loss = 0.5 * ref.aggregate(per_token, mask, rows, agg, norm)
    with torch.no_grad():
        ret_var = ref.masked_mean((ret - ref.masked_mean(ret, mask)).square(), mask)
        res_var = ref.masked_mean((ret - v - ref.masked_mean(ret - v, mask)).square(), mask)
        explained = torch.where(ret_var > 0, 1 - res_var / ret_var.clamp_min(1e-12), torch.zeros_like(ret_var))
        metrics = {"vf_loss": loss.detach(), "vf_clipfrac": ref.masked_mean(clipped_wins.to(dtype), mask),
                   "vpred_mean": ref.masked_mean(v.detach(), mask), "explained_variance": explained}
    return PolicyLossOutput(loss, ref.finalize_metrics(metrics))
