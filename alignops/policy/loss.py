"""policy_loss: every registered method's loss from per-token log-probs (pure PyTorch).

The total loss (docs/methods.md §00.18) is

    L = Agg(rollout_is_weights * phi) + kl_coef * Agg(KL(logp, ref_logp)) - entropy_coef * Agg(H)

with phi the method's per-token loss (alignops/policy/methods.py) and Agg one of the four
aggregation modes divided by `normalizer`, the whole optimiser step's count (docs/methods.md §00.2,
alignops.layout.step_normalizer).
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from alignops import layout
from alignops.policy import math as pmath
from alignops.policy.registry import Method, SharedKnobs, get_method, resolve_options, resolve_shared
from alignops.rollout_correction import check_route_options, correct


@dataclasses.dataclass
class PolicyLossOutput:
    """`loss`: scalar tensor with autograd. `metrics`: detached fp32 scalar tensors (no host sync)."""
    loss: Tensor
    metrics: dict[str, Tensor]


@dataclasses.dataclass
class PolicyCall:
    """One call's arguments, checked and resolved: what the two-pass path and the one-launch kernel share."""
    method: Method
    options: dict
    knobs: SharedKnobs
    normalizer: float | Tensor | None
    mask: Tensor          # bool, token-shaped
    rows: layout.Rows
    advantages: Tensor    # token-shaped
    old_logp: Tensor | None
    ref_logp: Tensor | None
    rollout_is_weights: Tensor | None
    # rollout_logp= route (docs/methods.md §1.15): (rollout_logp, checked options) until the weights
    # and the mask are computed from it (resolve_rollout); the correction's metrics join the loss's
    rollout: tuple | None = None
    extra_metrics: dict = dataclasses.field(default_factory=dict)

    def norm(self, dtype) -> Tensor:
        if self.normalizer is None:
            return layout.default_normalizer(self.knobs.agg, self.mask, self.rows, self.knobs.max_len, dtype)
        return torch.as_tensor(self.normalizer, dtype=dtype, device=self.mask.device)


def prepare_call(like: Tensor, old_logp, advantages, mask, *, method, clip_low=None, clip_high=None,
                 clip_ratio_c=None, ref_logp=None, kl_coef=0.0, kl_estimator="k3", has_entropy=False,
                 entropy_coef=0.0, agg=None, normalizer=None, max_len=None, rollout_is_weights=None,
                 ratio_log_clamp=20.0, cu_seqlens=None, validate_mask=None, rollout_logp=None,
                 rollout_correction=None, **method_options) -> PolicyCall:
    """Checks every argument against the token tensor `like` (logp, or the labels) and resolves the
    method's defaults, once per call; see policy_loss for the arguments. Every keyword that is not
    one of the shared ones above is the method's own option (an unknown one raises, naming the
    method). With `rollout_logp` and `old_logp` the rollout correction is computed here; with
    `rollout_logp` alone (on-policy) it waits for the current log-probs (resolve_rollout)."""
    m = get_method(method)
    rows = layout.token_layout("logp", like, cu_seqlens)
    opts = resolve_options(m, method_options)
    knobs = resolve_shared(m, clip_low=clip_low, clip_high=clip_high, clip_ratio_c=clip_ratio_c,
                           ratio_log_clamp=ratio_log_clamp, kl_coef=kl_coef, kl_estimator=kl_estimator,
                           entropy_coef=entropy_coef, agg=agg, normalizer=normalizer, max_len=max_len,
                           ref_logp=ref_logp, has_entropy=has_entropy)
    normalizer = layout.check_normalizer(normalizer, like.device)
    mask = layout.token_mask(mask, like.shape, like.device, validate=validate_mask,
                             weights=layout.POLICY_MASK_WEIGHTS)
    for name, x in (("old_logp", old_logp), ("ref_logp", ref_logp), ("rollout_is_weights", rollout_is_weights),
                    ("rollout_logp", rollout_logp)):
        layout.check_like(name, x, like)
    rollout = None
    if rollout_logp is not None:
        if rollout_is_weights is not None:
            raise ValueError("pass rollout_logp (the weights are computed from it) or rollout_is_weights, not both")
        rollout = (rollout_logp, check_route_options(rollout_correction))
    elif rollout_correction is not None:
        raise ValueError("rollout_correction was given without rollout_logp (the log-probs it corrects for)")
    advantages = layout.per_token("advantages", advantages, like, rows)
    if m.check_rows is not None:
        m.check_rows(opts, rows)
    call = PolicyCall(m, opts, knobs, normalizer, mask, rows, advantages, old_logp, ref_logp, rollout_is_weights,
                      rollout)
    return resolve_rollout(call, None)


def resolve_rollout(call: PolicyCall, logp: Tensor | None) -> PolicyCall:
    """The call with the rollout_logp route computed: the weights and the mask of rollout_correction
    on (old_logp, or the current logp when on-policy; rollout_logp; the call's mask), its metrics
    kept for the loss's. Unchanged when there is no route, or (logp None) while on-policy."""
    if call.rollout is None:
        return call
    trainer = call.old_logp if call.old_logp is not None else logp
    if trainer is None:
        return call
    rollout_logp, opts = call.rollout
    out = correct(trainer, rollout_logp, call.mask, call.rows, opts)
    return dataclasses.replace(call, mask=out.mask, rollout_is_weights=out.rollout_is_weights, rollout=None,
                               extra_metrics=out.metrics)


def _token_terms(call: PolicyCall, logp: Tensor):
    """The method's per-token terms in fp32 (fp64 for fp64 logp), padding zeroed before any exp."""
    k, mask = call.knobs, call.mask
    dtype = layout.compute_dtype(logp.dtype)
    logp_c = layout.sanitize(logp, mask, dtype)
    old_c = logp_c.detach() if call.old_logp is None else layout.sanitize(call.old_logp.detach(), mask, dtype)
    adv_c = layout.sanitize(call.advantages.detach(), mask, dtype)
    t = pmath.TokenInputs(logp_c, old_c, adv_c, mask, call.rows, k.clip_low, k.clip_high, k.clip_ratio_c,
                          k.ratio_log_clamp)
    return dtype, logp_c, old_c, adv_c, call.method.token_loss(t, **call.options)


def compute(call: PolicyCall, logp: Tensor, entropy: Tensor | None = None) -> PolicyLossOutput:
    """The loss of a prepared call, with autograd, and its metrics."""
    call = resolve_rollout(call, logp.detach())
    k, mask, rows = call.knobs, call.mask, call.rows
    dtype, logp_c, old_c, adv_c, tl = _token_terms(call, logp)
    phi = tl.phi
    if call.rollout_is_weights is not None:
        phi = phi * layout.sanitize(call.rollout_is_weights.detach(), mask, dtype)
    norm = call.normalizer if call.normalizer is not None else call.norm(dtype)
    pg_loss = layout.aggregate(phi, mask, rows, k.agg, norm)
    loss = pg_loss
    kl = ent = None
    if call.ref_logp is not None:
        kl = pmath.kl_penalty(logp_c, layout.sanitize(call.ref_logp.detach(), mask, dtype), k.kl_estimator)
        if k.kl_coef > 0:
            loss = loss + k.kl_coef * layout.aggregate(kl, mask, rows, k.agg, norm)
    if entropy is not None:
        ent = layout.sanitize(entropy, mask, dtype)
        if k.entropy_coef != 0:
            loss = loss - k.entropy_coef * layout.aggregate(ent, mask, rows, k.agg, norm)
    return PolicyLossOutput(loss, _metrics(call, pg_loss, logp_c, old_c, adv_c, tl, kl, ent))


def metrics(call: PolicyCall, logp: Tensor, entropy: Tensor | None, pg_loss: Tensor) -> dict[str, Tensor]:
    """The metrics of a prepared call whose loss was computed elsewhere (the one-launch kernel):
    O(N) torch on its log-probs and entropy, no autograd."""
    call = resolve_rollout(call, logp.detach())
    with torch.no_grad():
        dtype, logp_c, old_c, adv_c, tl = _token_terms(call, logp)
        kl = None if call.ref_logp is None else pmath.kl_penalty(
            logp_c, layout.sanitize(call.ref_logp.detach(), call.mask, dtype), call.knobs.kl_estimator)
        ent = None if entropy is None else layout.sanitize(entropy, call.mask, dtype)
        return _metrics(call, pg_loss, logp_c, old_c, adv_c, tl, kl, ent)


def _metrics(call, pg_loss, logp_c, old_c, adv_c, tl, kl, ent) -> dict[str, Tensor]:
    mask = call.mask
    out = {"pg_loss": pg_loss}
    if kl is not None:
        out["kl"] = layout.token_mean(kl.detach(), mask)
    if ent is not None:
        out["entropy"] = layout.token_mean(ent.detach(), mask)
    with torch.no_grad():
        out.update(pmath.ratio_metrics(tl, adv_c, mask))
        out["approx_kl"] = layout.token_mean(old_c - logp_c.detach(), mask)
        out.update(tl.metrics)
    out.update(call.extra_metrics)
    return pmath.finalize_metrics(out)


def policy_loss(logp: Tensor, old_logp: Tensor | None, advantages: Tensor, mask: Tensor | None = None, *,
                method: str = "grpo", clip_low: float | None = None, clip_high: float | None = None,
                clip_ratio_c: float | None = None, ref_logp: Tensor | None = None, kl_coef: float = 0.0,
                kl_estimator: str = "k3", entropy: Tensor | None = None, entropy_coef: float = 0.0,
                agg: str | None = None, normalizer=None, max_len: int | None = None,
                rollout_is_weights: Tensor | None = None, ratio_log_clamp: float | None = 20.0,
                cu_seqlens: Tensor | None = None, validate_mask: bool | None = None,
                rollout_logp: Tensor | None = None, rollout_correction: dict | None = None,
                **method_options) -> PolicyLossOutput:
    """Policy-gradient loss from per-token log-probs (pure PyTorch; composable, compile-traceable).

    Args:
        logp: `[B, T]` (or packed `[N]` with `cu_seqlens`) log-probs of the sampled tokens, with autograd.
        old_logp: behaviour-policy log-probs, same shape; None = on-policy (old = sg(logp)).
        advantages: `[B]` per sequence (broadcast over T) or per token like `logp`; detached.
        mask: bool or 0/1 like `logp`; only masked-in tokens count anywhere. None = all tokens.
            Any other value is an error (per-token weights go in `rollout_is_weights`).
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
        rollout_logp, rollout_correction: the inference engine's log-probs of the tokens (like
            `logp`) and a dict of `ao.rollout_correction`'s options (level, mode, threshold, rejection,
            batch_normalize, ratio_log_clamp, process_group; None = its defaults, token-level TIS
            at 2.0): the loss computes `rollout_correction(old_logp or sg(logp), rollout_logp, mask,
            ...)`, uses its weights as `rollout_is_weights` and its mask as the mask, and adds its
            `rollout_corr/...` metrics (docs/methods.md §1.15). Not with `rollout_is_weights`.
        ratio_log_clamp: log-ratios are clamped to +-this before exp (None disables; GSPO: +10 above).
        cu_seqlens: `[B + 1]` row offsets of the packed layout.
        validate_mask: check that a non-bool mask holds only 0 and 1; default: only for CPU
            tensors, where it costs no device synchronisation (as `validate_labels`).
        **method_options: the method's own options (ecpo_delta, ratio_level, gppo_beta1/2, gpg_alpha,
            group_size, group_ids, rewards, bapo_*, process_group).

    Returns:
        PolicyLossOutput(loss, metrics), loss in fp32 (fp64 for fp64 logp).
    """
    get_method(method)
    if not isinstance(logp, Tensor):
        raise TypeError(f"logp must be a torch.Tensor, got {type(logp).__name__}")
    if not logp.dtype.is_floating_point:
        raise TypeError(f"logp must be a floating-point tensor, got {logp.dtype}")
    call = prepare_call(logp, old_logp, advantages, mask, method=method, clip_low=clip_low, clip_high=clip_high,
                        clip_ratio_c=clip_ratio_c, ref_logp=ref_logp, kl_coef=kl_coef, kl_estimator=kl_estimator,
                        has_entropy=entropy is not None, entropy_coef=entropy_coef, agg=agg, normalizer=normalizer,
                        max_len=max_len, rollout_is_weights=rollout_is_weights, ratio_log_clamp=ratio_log_clamp,
                        cu_seqlens=cu_seqlens, validate_mask=validate_mask, rollout_logp=rollout_logp,
                        rollout_correction=rollout_correction, **method_options)
    layout.check_like("entropy", entropy, logp)
    return compute(call, logp, entropy)
