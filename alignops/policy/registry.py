"""The method registry: one entry per policy-loss method carries everything about it.

    register_method(name, token_loss, defaults=..., options=..., validate=..., one_launch=..., examples=...)

- `token_loss(t: TokenInputs, **options) -> TokenLoss`: its torch math (phi per token);
- `defaults`: its defaults of the shared knobs (clip_low, clip_high, clip_ratio_c, agg);
- `options`: its own keyword options and their defaults (anything else is rejected, naming the
  method that owns it), checked by `validate(options) -> options` and, for tensor options, by
  `check_rows(options, rows)`;
- `one_launch`: how the one-launch kernel computes it (its per-token code family in
  alignops/policy/kernel_abi.py and the knobs it sets), or None when it needs batch statistics;
- `examples`: option sets the tests run it with (the tests take the methods from here).

Presets (dapo, dr_grpo, ...) are entries that reuse a loss with other defaults.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from alignops import layout
from alignops._validate import check_choice, check_float
from alignops.policy.kernel_abi import KNOBS, METHOD_CODES
from alignops.policy.math import KL_ESTIMATORS

SHARED_DEFAULTS = {"clip_low": 0.2, "clip_high": None, "clip_ratio_c": None, "agg": "token-mean"}


@dataclasses.dataclass(frozen=True)
class OneLaunch:
    """The one-launch kernel's view of a method. `code`: its per-token branch (kernel_abi.METHOD_CODES).
    `knobs(options, shared) -> {knob: value}`: the method's kernel knobs beyond the shared ones.
    `when(options) -> bool`: whether these options are token-local (default: always)."""
    code: str
    knobs: Callable[[dict, "SharedKnobs"], dict] | None = None
    when: Callable[[dict], bool] | None = None

    def applies(self, options: dict) -> bool:
        return self.when is None or bool(self.when(options))


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    token_loss: Callable
    defaults: dict
    options: dict
    validate: Callable[[dict], dict] | None = None
    check_rows: Callable[[dict, layout.Rows], None] | None = None
    one_launch: OneLaunch | None = None
    examples: tuple = ({},)
    doc: str = ""


METHODS: dict[str, Method] = {}


def register_method(name: str, token_loss: Callable, *, defaults: dict | None = None, options: dict | None = None,
                    validate: Callable | None = None, check_rows: Callable | None = None,
                    one_launch: OneLaunch | None = None, examples=({},), doc: str = "") -> Method:
    """Adds (or replaces) a method; see the module docstring."""
    unknown = set(defaults or {}) - set(SHARED_DEFAULTS)
    if unknown:
        raise ValueError(f"register_method: unknown shared defaults {sorted(unknown)}")
    if one_launch is not None and one_launch.code not in METHOD_CODES:
        raise ValueError(f"register_method: one_launch.code must be one of {sorted(METHOD_CODES)}, "
                         f"got {one_launch.code!r}")
    m = Method(name, token_loss, {**SHARED_DEFAULTS, **(defaults or {})}, dict(options or {}), validate, check_rows,
               one_launch, tuple(examples), doc)
    METHODS[name] = m
    return m


def method_names() -> list[str]:
    return sorted(METHODS)


def get_method(method) -> Method:
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known methods: {method_names()}")
    return METHODS[method]


def resolve_options(method: Method, given: dict) -> dict:
    """The method's options: its defaults updated with `given`, validated."""
    unknown = sorted(set(given) - set(method.options))
    if unknown:
        owners = {k: [m.name for m in METHODS.values() if k in m.options] for k in unknown}
        hints = "; ".join(f"{k!r} belongs to {v}" if v else f"{k!r} is not an option of any method"
                          for k, v in owners.items())
        raise TypeError(f"unknown option(s) {unknown} for method={method.name!r} "
                        f"(its options: {sorted(method.options) or 'none'}); {hints}")
    opts = {**method.options, **given}
    return method.validate(opts) if method.validate is not None else opts


@dataclasses.dataclass(frozen=True)
class SharedKnobs:
    """The shared knobs of one call, defaults applied and checked."""
    clip_low: float
    clip_high: float
    clip_ratio_c: float | None
    ratio_log_clamp: float | None
    kl_coef: float
    kl_estimator: str
    entropy_coef: float
    agg: str
    max_len: float | None

    def kernel_knobs(self) -> dict:
        """The shared part of the one-launch kernel's knobs (kernel_abi.KNOBS)."""
        return {"clip_lo": 1.0 - self.clip_low, "clip_hi": 1.0 + self.clip_high, "dual_clip": self.clip_ratio_c,
                "log_clamp": self.ratio_log_clamp, "kl_coef": self.kl_coef, "entropy_coef": self.entropy_coef}


def resolve_shared(method: Method, *, clip_low, clip_high, clip_ratio_c, ratio_log_clamp, kl_coef, kl_estimator,
                   entropy_coef, agg, normalizer, max_len, ref_logp, has_entropy: bool) -> SharedKnobs:
    clip_low = check_float("clip_low", method.defaults["clip_low"] if clip_low is None else clip_low, lo=0.0, hi=1.0)
    if clip_high is None:
        clip_high = clip_low if method.defaults["clip_high"] is None else method.defaults["clip_high"]
    clip_high = check_float("clip_high", clip_high, lo=0.0)
    clip_ratio_c = method.defaults["clip_ratio_c"] if clip_ratio_c is None else clip_ratio_c
    clip_ratio_c = check_float("clip_ratio_c", clip_ratio_c, lo=1.0, allow_none=True)
    ratio_log_clamp = check_float("ratio_log_clamp", ratio_log_clamp, lo=0.0, allow_none=True)
    kl_coef = check_float("kl_coef", kl_coef, lo=0.0, lo_open=False)
    entropy_coef = check_float("entropy_coef", entropy_coef)
    agg = layout.check_agg(method.defaults["agg"] if agg is None else agg)
    check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    if kl_coef > 0 and ref_logp is None:
        raise ValueError("kl_coef > 0 needs ref_logp (the reference policy's log-probs)")
    if entropy_coef != 0 and not has_entropy:
        raise ValueError("entropy_coef != 0 needs entropy (per-token entropy; fused_policy_loss computes it)")
    if agg == "seq-mean-token-sum-norm" and normalizer is None:
        if max_len is None:
            raise ValueError("agg='seq-mean-token-sum-norm' needs max_len (the constant C, e.g. the maximum "
                             "response length) or an explicit normalizer")
        max_len = check_float("max_len", max_len, lo=0.0)
    return SharedKnobs(clip_low, clip_high, clip_ratio_c, ratio_log_clamp, kl_coef, kl_estimator, entropy_coef, agg,
                       max_len)


def one_launch_knobs(method: Method, opts: dict, shared: SharedKnobs) -> dict:
    knobs = shared.kernel_knobs()
    if method.one_launch.knobs is not None:
        own = method.one_launch.knobs(opts, shared)
        unknown = set(own) - set(KNOBS)
        if unknown:
            raise ValueError(f"method {method.name!r} sets unknown kernel knobs {sorted(unknown)}")
        knobs.update(own)
    return knobs
