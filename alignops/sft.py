"""Sequence log-probs and supervised / SFT-hybrid losses on top of the fused logits pass.

Everything here that reads logits goes through `alignops.token_stats` (custom op
alignops::token_stats): one read of the logits forward, one read and one write backward, on every
backend. The per-token weights of DFT, CHORD-phi and iw-SFT are detached functions of the token's
own log-prob (p = exp(logp), never a softmax) or per-sequence constants, so they only change the
upstream gradient `dL/dlogp` that the fused backward consumes: the weighting costs O(tokens).

Layouts: `[B, T, V]` logits with `[B, T]` labels and mask, or packed `[N, V]` logits with `[N]`
labels and mask and `cu_seqlens=[B+1]` row boundaries. Labels are used as given (shift them
before the call, as for token_logprobs). A position counts iff mask != 0 and label != ignore_index;
the other positions are not read by the kernels at all.

Methods: docs/methods.md 1.13 (sequence sums), 2.25 (RAFT = plain SFT), 2.27 (DFT), 2.28 and 00.15
(iw-SFT), 2.29 (CHORD-mu, CHORD-phi and the mu schedule).
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from alignops import layout
from alignops._validate import check_bool, check_choice, is_number, renamed_keywords
from alignops.layout import check_cu_seqlens, check_mask
from alignops.logits.sources import check_logits_labels
from alignops.token_stats import token_logprobs

SFT_WEIGHTINGS = ("none", "dft", "chord_phi", "iw")
SEQUENCE_AGG_MODES = ("sum", "mean")
# docs/methods.md 00.3 / 00.15: sequence-level log-ratios are clamped before exp.
IW_LOG_CLAMP = 20.0
# The end of sft_loss's error for a mask that is not 0/1 (alignops.layout.check_mask).
SFT_MASK_WEIGHTS = ("sft_loss weights whole sequences with seq_weights= [B] (and tokens by their own "
                    "probability with weighting=); it has no per-token weights")


@dataclasses.dataclass
class SFTOutput:
    """`loss`: scalar with autograd. `metrics`: detached fp32 scalars (tensors, no host sync)."""
    loss: Tensor
    metrics: dict


# --------------------------------------------------------------------------------------------
# argument checks shared by the functions of this module


def _check_layout(tokens, labels, cu_seqlens, name="logits"):
    """`tokens` are the logits [B, T, V] / packed [N, V] (or the hidden states, [..., H])."""
    if name == "logits":
        check_logits_labels(tokens, labels)
    if cu_seqlens is None:
        if tokens.dim() != 3:
            raise ValueError(f"{name} must be [B, T, *] (or [N, *] with cu_seqlens for the packed "
                             f"layout), got shape {tuple(tokens.shape)}")
        return None
    if tokens.dim() != 2:
        raise ValueError(f"with cu_seqlens, {name} must be packed [N, *], got shape {tuple(tokens.shape)}")
    return check_cu_seqlens(cu_seqlens, labels.shape[0], tokens.device)


def _valid_and_labels(labels, mask, ignore_index):
    """Positions that count, and labels with every other position set to ignore_index so that the
    kernel skips them (padding labels may be any value, even outside [0, V))."""
    valid = labels != ignore_index
    if mask is not None:
        valid = valid & mask
        labels = torch.where(valid, labels, torch.full_like(labels, ignore_index))
    return valid, labels


def _check_prob(value, name, *, allow_none=True):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float in (0, 1], got {type(value).__name__}")
    if not (0.0 < value <= 1.0):
        raise ValueError(f"{name} must lie in (0, 1], got {value}")
    return float(value)


# --------------------------------------------------------------------------------------------
# sequence log-probs


class SequenceLogprobs(NamedTuple):
    """What sequence_logprobs and fused_linear_sequence_logprobs return with `return_lengths=True` (it unpacks
    as `logp, lengths = ...`). `logp`: `[B]` per-sequence log-probs; `lengths`: `[B]` int64 valid positions."""
    logp: Tensor
    lengths: Tensor


@renamed_keywords(reduction="agg")
def sequence_logprobs(logits: Tensor, labels: Tensor, mask: Optional[Tensor] = None,
                      agg: str = "sum", *, cu_seqlens: Optional[Tensor] = None,
                      temperature: float = 1.0, ignore_index: int = -100,
                      return_lengths: bool = False, backend: Optional[str] = None,
                      vocab_process_group=None, vocab_start: Optional[int] = None,
                      validate_mask: Optional[bool] = None):
    """Per-sequence log-probability of the labels: `S_i = sum_t m_it logp_it` ("sum", DPO, GVPO)
    or `S_i / L_i` ("mean", IPO and ORPO; an empty row gives 0), docs/methods.md 1.13.

    Args:
        logits: `[B, T, V]`, or packed `[N, V]` with `cu_seqlens`.
        labels: `[B, T]` (or `[N]`), already aligned with the logits (shifted by the caller).
        mask: same shape as labels, bool or 0/1 (any other value is an error); None = every
            label != ignore_index counts.
        agg: "sum" or "mean" over the valid positions of each row.
        cu_seqlens: `[B+1]` int row boundaries of the packed layout.
        temperature, ignore_index, backend, vocab_process_group, vocab_start: as in
            `alignops.token_stats` (the last two: logits sharded over the vocabulary).
        return_lengths: also return `L_i`, the number of valid positions per row (int64).
        validate_mask: check that a non-bool mask holds only 0 and 1; default: only for CPU
            tensors, where it costs no device synchronisation (as `validate_labels`).

    Returns:
        `[B]` fp32 (fp64 for fp64 logits) with autograd; `SequenceLogprobs(logp, lengths)` with
        return_lengths (unpacks as `S, L = ...`). One fused
        pass over the logits each way; the row reduction is O(tokens), in fp32.
    """
    return sequence_logprobs_from(
        lambda lab: token_logprobs(logits, lab, temperature=temperature, ignore_index=ignore_index, backend=backend,
                                   vocab_process_group=vocab_process_group, vocab_start=vocab_start),
        labels, mask, agg, cu_seqlens, ignore_index, return_lengths, tokens=logits, name="logits",
        validate_mask=validate_mask)


def sequence_logprobs_from(token_logp, labels, mask, agg, cu_seqlens, ignore_index, return_lengths, *,
                           tokens, name, validate_mask=None):
    """sequence_logprobs given `token_logp(labels) -> logp`, the logits pass of the tokens (the
    logits, or the hidden states and lm_head of alignops.fused_linear)."""
    check_choice("agg", agg, SEQUENCE_AGG_MODES)
    cu = _check_layout(tokens, labels, cu_seqlens, name)
    mask = check_mask(mask, labels.shape, tokens.device, validate=validate_mask,
                      weights="sequence_logprobs takes no per-token weights")
    valid, labels = _valid_and_labels(labels, mask, ignore_index)
    logp = token_logp(labels)
    rows = layout.Rows(labels.shape, logp.device, cu)
    sums = rows.row_sum(logp)  # ignored positions hold exactly 0 and get no gradient
    # Counts go through the float segment sum (exact below 2**24 tokens per row).
    lengths = rows.lengths(valid, sums.dtype).to(torch.int64)
    if agg == "mean":
        sums = sums / lengths.clamp_min(1).to(sums.dtype)
    return SequenceLogprobs(sums, lengths) if return_lengths else sums


# --------------------------------------------------------------------------------------------
# weighted token-mean NLL: SFT, DFT, CHORD-phi, iw-SFT


def iw_sft_weights(seq_logp_q: Tensor, seq_logp_ref: Tensor, clip=(0.0, 10.0),
                   self_normalize: bool = False, valid_rows: Optional[Tensor] = None) -> Tensor:
    """Per-sequence iw-SFT weights `exp(clamp(S_q - S_ref, -20, 20))`, clipped to `clip`, and
    optionally divided by their mean over the batch (docs/methods.md 2.28, 00.15). Detached.

    `seq_logp_q` are sequence log-probs under q (a lagged copy of the policy), `seq_logp_ref` under
    the policy that generated the data (both summed, e.g. from `sequence_logprobs`). With q = pi_ref
    every weight is 1 and iw-SFT is plain SFT. `valid_rows` ([B] bool) restricts the
    self-normalisation mean to non-empty rows.
    """
    for name, t in (("seq_logp_q", seq_logp_q), ("seq_logp_ref", seq_logp_ref)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if seq_logp_q.shape != seq_logp_ref.shape or seq_logp_q.dim() != 1:
        raise ValueError(f"seq_logp_q {tuple(seq_logp_q.shape)} and seq_logp_ref "
                         f"{tuple(seq_logp_ref.shape)} must both be [B]")
    if seq_logp_ref.device != seq_logp_q.device:
        raise ValueError(f"seq_logp_ref is on {seq_logp_ref.device} but seq_logp_q is on {seq_logp_q.device}")
    check_bool("self_normalize", self_normalize)
    dtype = layout.compute_dtype(seq_logp_q.dtype)
    log_w = (seq_logp_q.detach().to(dtype) - seq_logp_ref.detach().to(dtype))
    w = torch.exp(log_w.clamp(-IW_LOG_CLAMP, IW_LOG_CLAMP))
    if clip is not None:
        if not (isinstance(clip, (tuple, list)) and len(clip) == 2):
            raise TypeError(f"clip must be a (low, high) pair or None, got {clip!r}")
        low, high = clip
        for bound in (low, high):
            if bound is not None and not is_number(bound):
                raise TypeError(f"clip must hold numbers (or None for no bound), got {clip!r}")
            if bound is not None and math.isnan(bound):
                raise ValueError(f"clip must not hold NaN, got {clip!r}")
        if low is not None and high is not None and low > high:
            raise ValueError(f"clip must have low <= high, got {clip}")
        w = w.clamp(min=low, max=high)
    if self_normalize:
        rows = (torch.ones_like(w, dtype=torch.bool) if valid_rows is None
                else check_mask(valid_rows, device=w.device, name="valid_rows"))
        if rows.shape != w.shape:
            raise ValueError(f"valid_rows shape {tuple(rows.shape)} must be {tuple(w.shape)}")
        count = rows.sum().to(dtype)
        mean = torch.where(rows, w, torch.zeros_like(w)).sum() / count.clamp_min(1)
        # All-zero weights (or no rows) stay zero instead of 0/0.
        w = torch.where(mean > 0, w / torch.where(mean > 0, mean, torch.ones_like(mean)), w)
    return w


def token_weights(logp: Tensor, weighting: str) -> Tensor:
    """The detached per-token weight of each weighting, from the token's own log-prob:
    1 (SFT), p (DFT, docs/methods.md 2.27), p(1-p) (CHORD-phi, 2.29; 0.25 at p = 0.5)."""
    p = torch.exp(logp.detach())
    if weighting == "dft":
        return p
    if weighting == "chord_phi":
        return p * (1.0 - p)
    return torch.ones_like(p)


def weighted_nll(logp: Tensor, valid: Tensor, weighting: str = "none",
                 seq_weights: Optional[Tensor] = None, *, cu_seqlens: Optional[Tensor] = None,
                 cutoff_prob: Optional[float] = None, normalizer=None):
    """`-(1/N) sum_t m_t w_t logp_t` from token log-probs (the per-token part of `sft_loss`, shared
    with `chord_loss`). Returns (loss, metrics). `valid` is the bool mask of counted positions.

    cutoff_prob (CHORD): logp is clamped to <= log(cutoff_prob), so tokens the policy already
    predicts above the cutoff get zero gradient; the weight still uses the unclamped p (Trinity-RFT).
    """
    check_choice("weighting", weighting, SFT_WEIGHTINGS)
    cutoff_prob = _check_prob(cutoff_prob, "cutoff_prob")
    if weighting == "iw" and seq_weights is None:
        raise ValueError("weighting='iw' needs seq_weights (per-sequence importance weights, "
                         "see alignops.iw_sft_weights)")
    dtype = logp.dtype
    w = token_weights(logp, weighting)
    if seq_weights is not None:
        w = w * layout.Rows(logp.shape, logp.device, cu_seqlens).to_tokens(seq_weights.detach().to(dtype))
    w = torch.where(valid, w, torch.zeros_like(w))
    nll_terms = -logp
    if cutoff_prob is not None and cutoff_prob < 1.0:
        nll_terms = -logp.clamp(max=math.log(cutoff_prob))
    count = valid.sum().to(dtype)
    inv_norm = layout.inverse_normalizer(normalizer, count)
    # Masked positions hold logp = 0 from the kernel; the where() keeps a NaN of anything the
    # caller passed in at an invalid position out of the loss.
    loss = torch.where(valid, w * nll_terms, torch.zeros_like(w)).sum() * inv_norm
    with torch.no_grad():
        safe_count = count.clamp_min(1)
        plain_nll = torch.where(valid, -logp, torch.zeros_like(logp)).sum()
        metrics = {
            "nll": (plain_nll * inv_norm).float(),
            "weight/mean": (w.sum() / safe_count).float(),
            "prob/mean": (torch.where(valid, torch.exp(logp), torch.zeros_like(logp)).sum() / safe_count).float(),
            "num_tokens": count.float(),
        }
    return loss, metrics


def sft_loss(logits: Tensor, labels: Tensor, mask: Optional[Tensor] = None, weighting: str = "none",
             seq_weights: Optional[Tensor] = None, *, cutoff_prob: Optional[float] = None,
             normalizer=None, cu_seqlens: Optional[Tensor] = None, temperature: float = 1.0,
             ignore_index: int = -100, backend: Optional[str] = None, vocab_process_group=None,
             vocab_start: Optional[int] = None, validate_mask: Optional[bool] = None) -> SFTOutput:
    """Token-mean (weighted) negative log-likelihood, fused into the logits pass.

        loss = -(1/N) sum_{i,t} m_it * w_it * logp_it

    weighting:
        "none"       w = 1: plain SFT (also RAFT's SFT step, docs/methods.md 2.25).
        "dft"        w = sg(p): Dynamic Fine-Tuning (2.27); gradient = p x the SFT gradient.
        "chord_phi"  w = sg(p (1 - p)): CHORD-phi's expert loss (2.29).
        "iw"         w = seq_weights[i] (detached): iw-SFT (2.28); build them with `iw_sft_weights`.
    `seq_weights` ([B]) multiplies any weighting (required for "iw").
    `cutoff_prob`: clamp logp <= log(cutoff_prob) (CHORD); tokens above the cutoff get no gradient.
    `normalizer`: N, the token count of the whole optimiser step (docs/methods.md 00.2); default: this
    call's valid-token count. A zero normaliser gives loss 0 and gradient 0.

    `mask` selects tokens (bool or 0/1; any other value is an error): it is not a weight.

    Layouts and the remaining arguments are those of `sequence_logprobs`. p = exp(logp) is the
    token's own probability: no softmax is materialised, and backward is the fused token_stats pass
    with dL/dlogp = -m w / N.

    Returns `SFTOutput(loss, metrics)`; metrics: `nll` (unweighted NLL with the same normaliser),
    `weight/mean`, `prob/mean`, `num_tokens`.
    """
    return sft_loss_from(
        lambda lab: token_logprobs(logits, lab, temperature=temperature, ignore_index=ignore_index, backend=backend,
                                   vocab_process_group=vocab_process_group, vocab_start=vocab_start),
        labels, mask, weighting, seq_weights, cutoff_prob, normalizer, cu_seqlens, ignore_index, tokens=logits,
        name="logits", validate_mask=validate_mask)


def sft_loss_from(token_logp, labels, mask, weighting, seq_weights, cutoff_prob, normalizer, cu_seqlens,
                  ignore_index, *, tokens, name, validate_mask=None) -> SFTOutput:
    """sft_loss given `token_logp(labels) -> logp` (see sequence_logprobs_from)."""
    check_choice("weighting", weighting, SFT_WEIGHTINGS)
    cu = _check_layout(tokens, labels, cu_seqlens, name)
    mask = check_mask(mask, labels.shape, tokens.device, validate=validate_mask, weights=SFT_MASK_WEIGHTS)
    if seq_weights is not None:
        _check_seq_weights(seq_weights, labels, cu)
    valid, labels = _valid_and_labels(labels, mask, ignore_index)
    loss, metrics = weighted_nll(token_logp(labels), valid, weighting, seq_weights, cu_seqlens=cu,
                                 cutoff_prob=cutoff_prob, normalizer=normalizer)
    return SFTOutput(loss, metrics)


def _check_seq_weights(seq_weights, labels, cu):
    if not isinstance(seq_weights, Tensor):
        raise TypeError(f"seq_weights must be a torch.Tensor or None, got {type(seq_weights).__name__}")
    if not seq_weights.dtype.is_floating_point:
        raise TypeError(f"seq_weights must be a floating-point tensor, got {seq_weights.dtype}")
    rows = labels.shape[0] if cu is None else cu.shape[0] - 1
    if tuple(seq_weights.shape) != (rows,):
        raise ValueError(f"seq_weights must have shape [B] = ({rows},), got {tuple(seq_weights.shape)}")
    if seq_weights.device != labels.device:
        raise ValueError(f"seq_weights is on {seq_weights.device} but the labels are on {labels.device}")


# --------------------------------------------------------------------------------------------
# CHORD


def chord_mu_schedule(step: int, *, mu_peak: float = 0.9, mu_valley: float = 0.05,
                      warmup_steps: int = 0, decay_steps: int = 200) -> float:
    """CHORD's global SFT weight mu at optimiser step `step` (docs/methods.md 2.29): linear warm-up from 0
    to mu_peak over warmup_steps, cosine decay to mu_valley over decay_steps, then mu_valley.
    Defaults: the CHORD-mu preset. CHORD-phi's constant mu = 0.1 is mu_peak = mu_valley = 0.1,
    decay_steps = 0 (which returns mu_valley: no division by zero)."""
    for name, v in (("step", step), ("warmup_steps", warmup_steps), ("decay_steps", decay_steps)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
        if v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    for name, v in (("mu_peak", mu_peak), ("mu_valley", mu_valley)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 <= v <= 1.0):
            raise ValueError(f"{name} must be a float in [0, 1], got {v!r}")
    if step < warmup_steps:
        return step / warmup_steps * mu_peak
    if step >= warmup_steps + decay_steps:
        return float(mu_valley)
    cosine = 0.5 * (1.0 + math.cos(math.pi * (step - warmup_steps) / decay_steps))
    return (mu_peak - mu_valley) * cosine + mu_valley


def chord_loss(logp: Tensor, old_logp: Optional[Tensor], advantages: Tensor, mask: Tensor,
               expert_mask: Tensor, mu, *, sft_weighting: str = "none",
               cutoff_prob: Optional[float] = None, rl_normalizer=None, sft_normalizer=None,
               cu_seqlens: Optional[Tensor] = None, clip_low: float = 0.2,
               clip_high: Optional[float] = None, agg: str = "token-mean", validate_mask: Optional[bool] = None,
               **policy_kwargs) -> SFTOutput:
    """CHORD (docs/methods.md 2.29): `(1 - mu) * L_GRPO(rollout rows) + mu * L_SFT(expert rows)`.

    One batch holds both kinds of rows, flagged per row by `expert_mask` ([B] bool). `logp` are
    the current token log-probs ([B, T], or packed [N] with cu_seqlens), typically from
    `alignops.token_stats(logits, labels)`: the whole loss then costs one fused pass over the
    logits each way. The GRPO part (`alignops.policy_loss(..., method="grpo")` on the rollout
    rows, with `clip_low`, `clip_high`, `agg` and any further policy_loss keyword) is divided by
    `rl_normalizer`, the SFT part (`weighted_nll` on the expert rows, `sft_weighting` "none" for
    CHORD-mu or "chord_phi" for CHORD-phi, `cutoff_prob`) by its own `sft_normalizer`: each
    defaults to this call's count of its own valid tokens; pass the optimiser step's global
    counts for gradient accumulation. A part with no rows contributes 0.

    `mask` ([B, T]) and `expert_mask` are bool or 0/1 (any other value is an error; checked on CPU
    tensors, and on GPU ones with `validate_mask=True`); per-token weights of the GRPO part go in
    `rollout_is_weights`.

    `mu`: float in [0, 1] (see `chord_mu_schedule`) or a scalar tensor. mu = 0 is pure GRPO,
    mu = 1 pure SFT on the expert rows. Metrics: the GRPO part's under "rl/", the SFT part's under
    "sft/", plus "mu".
    """
    if not isinstance(logp, Tensor):
        raise TypeError(f"logp must be a torch.Tensor, got {type(logp).__name__}")
    check_choice("sft_weighting", sft_weighting, SFT_WEIGHTINGS)
    if isinstance(mu, Tensor):
        if mu.numel() != 1:
            raise ValueError(f"mu must be a scalar, got shape {tuple(mu.shape)}")
        mu = mu.reshape(()).to(logp.dtype)
    elif isinstance(mu, bool) or not isinstance(mu, (int, float)):
        raise TypeError(f"mu must be a float in [0, 1] or a scalar tensor, got {type(mu).__name__}")
    elif not 0.0 <= mu <= 1.0:
        raise ValueError(f"mu must lie in [0, 1], got {mu}")
    cu = None
    if cu_seqlens is not None:
        if logp.dim() != 1:
            raise ValueError(f"with cu_seqlens, logp must be packed [N], got shape {tuple(logp.shape)}")
        cu = check_cu_seqlens(cu_seqlens, logp.shape[0], logp.device)
    elif logp.dim() != 2:
        raise ValueError(f"logp must be [B, T] (or [N] with cu_seqlens), got shape {tuple(logp.shape)}")
    valid = check_mask(mask, logp.shape, logp.device, validate=validate_mask, weights=layout.POLICY_MASK_WEIGHTS)
    if valid is None:
        raise ValueError("mask must be given (a [B, T] bool or 0/1 tensor)")
    rows = logp.shape[0] if cu is None else cu.shape[0] - 1
    if not isinstance(expert_mask, Tensor):
        raise TypeError(f"expert_mask must be a torch.Tensor, got {type(expert_mask).__name__}")
    if tuple(expert_mask.shape) != (rows,):
        raise ValueError(f"expert_mask must have shape [B] = ({rows},), got {tuple(expert_mask.shape)}")
    expert_rows = check_mask(expert_mask, name="expert_mask", validate=validate_mask)
    expert_tok = layout.Rows(logp.shape, logp.device, cu).to_tokens(expert_rows.to(device=logp.device))
    rl_valid = valid & ~expert_tok
    sft_valid = valid & expert_tok

    rl = _grpo_part(logp, old_logp, advantages, rl_valid, cu, rl_normalizer, clip_low, clip_high,
                    agg, policy_kwargs)
    sft, sft_metrics = weighted_nll(logp, sft_valid, sft_weighting, cutoff_prob=cutoff_prob,
                                    normalizer=sft_normalizer)
    loss = (1 - mu) * rl.loss + mu * sft
    metrics = {f"rl/{k}": v for k, v in rl.metrics.items()}
    metrics.update({f"sft/{k}": v for k, v in sft_metrics.items()})
    metrics["mu"] = (mu.detach().float() if isinstance(mu, Tensor)
                     else torch.tensor(float(mu), device=logp.device))
    return SFTOutput(loss, metrics)


def _grpo_part(logp, old_logp, advantages, rl_valid, cu, normalizer, clip_low, clip_high, agg,
               policy_kwargs):
    from alignops.policy.loss import policy_loss  # noqa: PLC0415 - the policy-loss package is heavier

    kwargs = dict(method="grpo", clip_low=clip_low, clip_high=clip_high, agg=agg,
                  normalizer=normalizer, **policy_kwargs)
    if cu is not None:
        kwargs["cu_seqlens"] = cu
    return policy_loss(logp, old_logp, advantages, rl_valid, **kwargs)
