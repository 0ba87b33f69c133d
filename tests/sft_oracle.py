"""Float64 eager oracles for alignops.sft: the full softmax is materialised and rows are walked one
by one, so that nothing is shared with the fused path but the formulas of docs/methods.md."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _rows(labels: Tensor, cu_seqlens):
    """(row index, positions) pairs: a [B, T] layout row by row, or the packed segments."""
    if cu_seqlens is None:
        return [(b, (b, slice(None))) for b in range(labels.shape[0])]
    cu = [int(c) for c in cu_seqlens]
    return [(b, (slice(cu[b], cu[b + 1]),)) for b in range(len(cu) - 1)]


def token_logp_and_prob(logits, labels, mask, temperature=1.0, ignore_index=-100, dtype=torch.float64):
    """log p and p of every label from log_softmax (float64 unless `dtype` asks for eager math in
    another precision); 0 where a position does not count."""
    valid = labels != ignore_index
    if mask is not None:
        valid = valid & (mask != 0)
    z = logits.to(dtype) / temperature
    logp_all = torch.log_softmax(z, dim=-1)
    safe = torch.where(valid, labels, torch.zeros_like(labels)).long()
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    prob = torch.softmax(z, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return logp, prob, valid


def sequence_logprobs(logits, labels, mask=None, reduction="sum", cu_seqlens=None,
                      temperature=1.0, ignore_index=-100, dtype=torch.float64):
    logp, _, valid = token_logp_and_prob(logits, labels, mask, temperature, ignore_index, dtype)
    logp = logp.double()
    out = []
    for _, pos in _rows(labels, cu_seqlens):
        total = logp[pos].sum()
        count = int(valid[pos].sum())
        out.append(total / count if (reduction == "mean" and count) else total)
    return torch.stack(out) if out else logp.new_zeros(0)


def sft_loss(logits, labels, mask=None, weighting="none", seq_weights=None, cutoff_prob=None,
             normalizer=None, cu_seqlens=None, temperature=1.0, ignore_index=-100, dtype=torch.float64):
    """-(1/N) sum m w logp with w = 1, sg(p), sg(p(1-p)) or a per-row constant."""
    logp, prob, valid = token_logp_and_prob(logits, labels, mask, temperature, ignore_index, dtype)
    logp, prob = logp.double(), prob.detach().double()
    weight = {"none": torch.ones_like(prob), "iw": torch.ones_like(prob), "dft": prob,
              "chord_phi": prob * (1 - prob)}[weighting]
    term = -logp
    if cutoff_prob is not None and cutoff_prob < 1:
        term = -torch.minimum(logp, torch.tensor(math.log(cutoff_prob), dtype=torch.float64))
    total = logp.new_zeros(())
    for b, pos in _rows(labels, cu_seqlens):
        w = weight[pos] * (float(seq_weights[b]) if seq_weights is not None else 1.0)
        total = total + (w * term[pos] * valid[pos]).sum()
    n = float(valid.sum()) if normalizer is None else float(normalizer)
    return total / n if n > 0 else total * 0


def grpo_token_mean(logp, old_logp, advantages, mask, clip_low=0.2, clip_high=None, normalizer=None):
    """PPO-clip surrogate, token-mean (the GRPO part of CHORD with agg='token-mean')."""
    clip_high = clip_low if clip_high is None else clip_high
    adv = advantages.double()
    if adv.dim() == 1:
        adv = adv[:, None].expand_as(logp)
    ratio = torch.exp((logp.double() - old_logp.double()).clamp(-20, 20))
    surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip_low, 1 + clip_high) * adv)
    m = mask.double()
    n = float(m.sum()) if normalizer is None else float(normalizer)
    total = -(surrogate * m).sum()
    return total / n if n > 0 else total * 0


def chord_mu(step, mu_peak, mu_valley, warmup_steps, decay_steps):
    if step < warmup_steps:
        return mu_peak * step / warmup_steps
    s = step - warmup_steps
    if s >= decay_steps:
        return mu_valley
    return mu_valley + (mu_peak - mu_valley) * (1 + math.cos(math.pi * s / decay_steps)) / 2
