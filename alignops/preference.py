"""Pairwise preference losses (DPO, IPO, cDPO, robust DPO, ORPO, SimPO, CPO), KTO, GVPO and RAHF.

These are `[B]`-sized math on sequence log-probs (or, for RAHF, on hidden states): the expensive
pass over the logits is `alignops.sequence_logprobs`, fused on every backend. Everything is
computed in fp32 (fp64 for fp64 inputs) whatever the input dtype (docs/methods.md R3), with
`logsigmoid`, never `log(sigmoid)` (3.3).

SimPO, CPO and KTO also come straight from hidden states and the lm_head weight
(`fused_linear_simpo_loss`, `fused_linear_cpo_loss`, `fused_linear_kto_loss`): one
`fused_linear_sequence_logprobs` pass, so the `[N, V]` logits never exist.

Metric names follow TRL: `rewards/chosen`, `rewards/rejected`, `rewards/accuracies`,
`rewards/margins`, `logps/chosen`, `logps/rejected` (+ ORPO's `nll_loss`, `log_odds_ratio`,
`log_odds_chosen`; SimPO's and CPO's `nll_loss`; KTO's `kl`).

docs/methods.md 2.14 (GVPO), 2.22 (DPO family), 2.23 (ORPO), 2.26 (RAHF), 2.37 (SimPO), 2.38 (CPO),
2.39 (KTO), 3.3.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from alignops._validate import check_bool, check_choice, check_float, renamed_keywords
from alignops.fused_linear import fused_linear_sequence_logprobs
from alignops.layout import check_mask, inverse_normalizer

DPO_LOSS_TYPES = ("sigmoid", "robust", "ipo", "hinge")
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")
GVPO_AGG_MODES = ("mean", "sum")
# docs/methods.md 2.23: P = exp(mean logp) -> 1 sends log(1 - P) to -inf; the odds use mean logp <= this.
ORPO_LOGP_CLAMP = -1e-6
_LN2 = math.log(2.0)


@dataclasses.dataclass
class PreferenceOutput:
    """`loss`: scalar with autograd. `losses`: per pair (or per group for GVPO), with autograd.
    `chosen_rewards` / `rejected_rewards`: detached implicit rewards per pair (None for GVPO/RAHF).
    `metrics`: detached fp32 scalars (tensors, no host sync)."""
    loss: Tensor
    losses: Tensor
    metrics: dict
    chosen_rewards: Optional[Tensor] = None
    rejected_rewards: Optional[Tensor] = None


# --------------------------------------------------------------------------------------------
# helpers


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x <= 0, accurate everywhere: log1p(-exp(x)) below -ln 2 and
    log(-expm1(x)) above (Maechler 2012); each branch loses digits in the other's range.
    `x` is a floating-point tensor; x > 0 is an error on CPU tensors (checked where it is free, like
    labels and masks) and NaN on GPU ones."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
    if x.device.type == "cpu" and not torch.compiler.is_compiling() and bool((x > 0).any()):
        raise ValueError(f"x must be <= 0 (log(1 - exp(x)) is undefined above 0), found {x[x > 0][0].item()}")
    # Each branch is evaluated on an input that keeps it finite, so the branch that where() drops
    # cannot send inf/NaN into the gradient.
    far = x < -_LN2
    x_far = torch.where(far, x, torch.full_like(x, -1.0))
    x_near = torch.where(far, torch.full_like(x, -0.5), x)
    return torch.where(far, torch.log1p(-torch.exp(x_far)), torch.log(-torch.expm1(x_near)))


def _float_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _check_vector(t, name, like=None, like_name=None, *, floating=True):
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if like is None:
        if t.dim() != 1:
            raise ValueError(f"{name} must be a 1-D tensor [B], got shape {tuple(t.shape)}")
    else:
        if t.shape != like.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} does not match {like_name} shape "
                             f"{tuple(like.shape)}")
        if t.device != like.device:
            raise ValueError(f"{name} is on {t.device} but {like_name} is on {like.device}")
    return t


def _check_positive(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value}")
    return float(value)


def _mean(x: Tensor) -> Tensor:
    """Detached fp32 mean that is 0 (not NaN) for an empty batch."""
    x = x.detach().float()
    return x.sum() / max(x.numel(), 1)


def _lengths(lengths, like, name):
    if lengths is None:
        return None
    if not isinstance(lengths, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [B], got {type(lengths).__name__}")
    if lengths.shape != like.shape:
        raise ValueError(f"{name} shape {tuple(lengths.shape)} must be [B] = {tuple(like.shape)}")
    if lengths.device != like.device:
        raise ValueError(f"{name} is on {lengths.device} but the log-probs are on {like.device}")
    if lengths.device.type == "cpu" and not torch.compiler.is_compiling() and bool((lengths < 0).any()):
        raise ValueError(f"{name} must be >= 0 (token counts), found {lengths[lengths < 0][0].item()}")
    # An empty response has S = 0; dividing by max(L, 1) keeps its mean 0 instead of 0/0.
    return lengths.to(device=like.device, dtype=like.dtype).clamp_min(1)


# --------------------------------------------------------------------------------------------
# DPO family


def _reward_metrics(chosen_rewards, rejected_rewards, logps_w, logps_l) -> dict:
    return {
        "rewards/chosen": _mean(chosen_rewards),
        "rewards/rejected": _mean(rejected_rewards),
        "rewards/accuracies": _mean((chosen_rewards > rejected_rewards).float()),
        "rewards/margins": _mean(chosen_rewards - rejected_rewards),
        "logps/chosen": _mean(logps_w),
        "logps/rejected": _mean(logps_l),
    }


def dpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor,
             ref_chosen_logps: Optional[Tensor] = None, ref_rejected_logps: Optional[Tensor] = None,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0, *,
             chosen_lengths: Optional[Tensor] = None, rejected_lengths: Optional[Tensor] = None,
             ipo_length_norm: bool = True, normalizer=None) -> PreferenceOutput:
    """DPO and its cheap variants on summed sequence log-probs (docs/methods.md 2.22).

    With `h = (S_w - S_w^ref) - (S_l - S_l^ref)` (summed log-probs, `sequence_logprobs`):

        sigmoid  -(1 - eps) logsig(beta h) - eps logsig(-beta h)   (eps = label_smoothing: cDPO)
        robust   (-(1 - eps) logsig(beta h) + eps logsig(-beta h)) / (1 - 2 eps),  0 <= eps < 0.5
        ipo      (h~ - 1 / (2 beta))^2, h~ from length-averaged log-ratios when ipo_length_norm
                 (TRL; needs chosen_lengths / rejected_lengths), else from the sums (OpenRLHF)
        hinge    relu(1 - beta h)   (SLiC)

    `ref_*=None` (both) is reference-free DPO. `loss` = sum of per-pair losses / normalizer
    (default: number of pairs; pass the step's global pair count for gradient accumulation).
    Metrics as TRL: rewards/chosen = mean beta (S_w - S_w^ref), rewards/rejected,
    rewards/accuracies (chosen reward > rejected), rewards/margins, logps/chosen, logps/rejected.
    """
    _check_vector(policy_chosen_logps, "policy_chosen_logps")
    _check_vector(policy_rejected_logps, "policy_rejected_logps", policy_chosen_logps, "policy_chosen_logps")
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("ref_chosen_logps and ref_rejected_logps must both be given or both be None "
                         "(reference-free)")
    if ref_chosen_logps is not None:
        _check_vector(ref_chosen_logps, "ref_chosen_logps", policy_chosen_logps, "policy_chosen_logps")
        _check_vector(ref_rejected_logps, "ref_rejected_logps", policy_chosen_logps, "policy_chosen_logps")
    beta = _check_positive(beta, "beta")
    check_choice("loss_type", loss_type, DPO_LOSS_TYPES)
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing must be a float, got {type(label_smoothing).__name__}")
    eps = float(label_smoothing)
    if loss_type == "robust" and not 0.0 <= eps < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5) for loss_type='robust', got {eps}")
    if loss_type == "sigmoid" and not 0.0 <= eps <= 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5] for loss_type='sigmoid', got {eps}")
    if loss_type in ("ipo", "hinge") and eps != 0.0:
        raise ValueError(f"label_smoothing is not defined for loss_type={loss_type!r}; got {eps}")

    tensors = [policy_chosen_logps, policy_rejected_logps]
    if ref_chosen_logps is not None:
        tensors += [ref_chosen_logps, ref_rejected_logps]
    dtype = _float_dtype(*tensors)
    pc, pr = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    if ref_chosen_logps is None:
        rc = rr = torch.zeros_like(pc)
    else:
        rc, rr = ref_chosen_logps.detach().to(dtype), ref_rejected_logps.detach().to(dtype)
    chosen_ratio, rejected_ratio = pc - rc, pr - rr
    if loss_type == "ipo" and ipo_length_norm:
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type='ipo' with ipo_length_norm=True needs chosen_lengths and "
                             "rejected_lengths (or pass ipo_length_norm=False for summed log-ratios)")
        chosen_ratio = chosen_ratio / _lengths(chosen_lengths, pc, "chosen_lengths")
        rejected_ratio = rejected_ratio / _lengths(rejected_lengths, pc, "rejected_lengths")
    h = chosen_ratio - rejected_ratio

    if loss_type == "sigmoid":
        losses = -(1.0 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1.0 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1.0 - 2.0 * eps)
    elif loss_type == "ipo":
        losses = (h - 1.0 / (2.0 * beta)) ** 2
    else:
        losses = torch.relu(1.0 - beta * h)

    inv_norm = inverse_normalizer(normalizer, torch.tensor(float(losses.numel()), dtype=dtype,
                                                            device=losses.device))
    loss = losses.sum() * inv_norm
    chosen_rewards = (beta * chosen_ratio).detach()
    rejected_rewards = (beta * rejected_ratio).detach()
    return PreferenceOutput(loss, losses, _reward_metrics(chosen_rewards, rejected_rewards, pc, pr), chosen_rewards,
                            rejected_rewards)


# --------------------------------------------------------------------------------------------
# ORPO


def orpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, chosen_lengths: Tensor,
              rejected_lengths: Tensor, beta: float = 0.1, *, nll_loss: Optional[Tensor] = None,
              nll_normalizer=None, normalizer=None) -> PreferenceOutput:
    """ORPO (docs/methods.md 2.23): `L = L_NLL(chosen) - beta * mean logsig(z)`, no reference model.

    Inputs are **summed** response log-probs and response lengths per pair (e.g.
    `sequence_logprobs(..., return_lengths=True)`); the odds use the means `S / L`, clamped to
    <= -1e-6 (P -> 1 sends log(1 - P) to -inf; above the clamp the odds term has no gradient):

        z = (Sw~ - Sl~) - (log1mexp(Sw~) - log1mexp(Sl~))

    The NLL term is, by default, the token-mean NLL of the chosen *responses*:
    `-sum S_w / sum L_w` (the paper; `nll_normalizer` overrides the token count for gradient
    accumulation). TRL computes it over prompt + chosen: pass that as `nll_loss` (e.g.
    `sft_loss(...).loss` on the concatenated sequence) to reproduce TRL. `beta` is TRL's `beta`
    (the paper's lambda). The odds term is summed over pairs / normalizer (default: pairs).
    Metrics: TRL's names (rewards = beta * mean log-prob), nll_loss, log_odds_ratio
    (mean logsig(z)), log_odds_chosen (mean z).
    """
    _check_vector(policy_chosen_logps, "policy_chosen_logps")
    _check_vector(policy_rejected_logps, "policy_rejected_logps", policy_chosen_logps, "policy_chosen_logps")
    if chosen_lengths is None or rejected_lengths is None:
        raise ValueError("chosen_lengths and rejected_lengths are required (ORPO's odds use mean log-probs)")
    beta = _check_positive(beta, "beta")
    dtype = _float_dtype(policy_chosen_logps, policy_rejected_logps)
    sw, sl = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    lw = _lengths(chosen_lengths, sw, "chosen_lengths")
    ll = _lengths(rejected_lengths, sw, "rejected_lengths")
    mean_w = (sw / lw).clamp(max=ORPO_LOGP_CLAMP)
    mean_l = (sl / ll).clamp(max=ORPO_LOGP_CLAMP)
    log_odds = (mean_w - mean_l) - (log1mexp(mean_w) - log1mexp(mean_l))
    ratio = F.logsigmoid(log_odds)
    losses = -beta * ratio
    inv_pairs = inverse_normalizer(normalizer, torch.tensor(float(sw.numel()), dtype=dtype, device=sw.device))
    odds_term = losses.sum() * inv_pairs

    if nll_loss is None:
        tokens = chosen_lengths.to(device=sw.device, dtype=dtype).sum()
        nll = -sw.sum() * inverse_normalizer(nll_normalizer, tokens, "nll_normalizer")
    else:
        if not isinstance(nll_loss, Tensor) or nll_loss.numel() != 1:
            raise ValueError("nll_loss must be a scalar tensor (or None for the response-only NLL)")
        nll = nll_loss.reshape(()).to(dtype)
    loss = nll + odds_term
    chosen_rewards = (beta * (sw / lw)).detach()
    rejected_rewards = (beta * (sl / ll)).detach()
    metrics = {
        "rewards/chosen": _mean(chosen_rewards),
        "rewards/rejected": _mean(rejected_rewards),
        "rewards/accuracies": _mean((chosen_rewards > rejected_rewards).float()),
        "rewards/margins": _mean(chosen_rewards - rejected_rewards),
        "logps/chosen": _mean(sw / lw),
        "logps/rejected": _mean(sl / ll),
        "nll_loss": nll.detach().float(),
        "log_odds_ratio": _mean(ratio),
        "log_odds_chosen": _mean(log_odds),
    }
    return PreferenceOutput(loss, losses, metrics, chosen_rewards, rejected_rewards)


# --------------------------------------------------------------------------------------------
# SimPO and CPO (reference-free pairs; TRL's CPOTrainer), KTO (unpaired)


def _check_smoothing(label_smoothing) -> float:
    return check_float("label_smoothing", label_smoothing, lo=0.0, lo_open=False, hi=0.5)


def _check_simpo_options(beta, simpo_gamma, label_smoothing, cpo_alpha):
    return (_check_positive(beta, "beta"), check_float("simpo_gamma", simpo_gamma, lo=0.0, lo_open=False),
            _check_smoothing(label_smoothing), check_float("cpo_alpha", cpo_alpha, lo=0.0, lo_open=False))


def _check_cpo_options(beta, label_smoothing, cpo_alpha):
    return (_check_positive(beta, "beta"), _check_smoothing(label_smoothing),
            check_float("cpo_alpha", cpo_alpha, lo=0.0, lo_open=False))


def _check_kto_options(beta, desirable_weight, undesirable_weight, loss_type):
    check_choice("loss_type", loss_type, KTO_LOSS_TYPES)
    return (_check_positive(beta, "beta"),
            check_float("desirable_weight", desirable_weight, lo=0.0, lo_open=False),
            check_float("undesirable_weight", undesirable_weight, lo=0.0, lo_open=False))


def _smoothed_pair_losses(x: Tensor, eps: float) -> Tensor:
    """-(1 - eps) logsig(x) - eps logsig(-x): the sigmoid pair loss, with cDPO's label smoothing."""
    losses = -F.logsigmoid(x)
    if eps:
        losses = (1.0 - eps) * losses - eps * F.logsigmoid(-x)
    return losses


def _chosen_nll(sw: Tensor, chosen_lengths: Optional[Tensor], nll_normalizer) -> Tensor:
    """Token-mean NLL of the chosen responses, -sum S_w / sum L_w (nll_normalizer overrides the count)."""
    if chosen_lengths is None:
        tokens = torch.zeros((), dtype=sw.dtype, device=sw.device)
    else:
        tokens = chosen_lengths.to(device=sw.device, dtype=sw.dtype).sum()
    return -sw.sum() * inverse_normalizer(nll_normalizer, tokens, "nll_normalizer")


def _pair_metrics(chosen_rewards, rejected_rewards, logps_w, logps_l, nll) -> dict:
    return {**_reward_metrics(chosen_rewards, rejected_rewards, logps_w, logps_l),
            "nll_loss": torch.zeros((), dtype=torch.float32, device=logps_w.device) if nll is None
            else nll.detach().float()}


def simpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, chosen_lengths: Tensor,
               rejected_lengths: Tensor, beta: float = 0.1, simpo_gamma: float = 0.5, label_smoothing: float = 0.0,
               *, cpo_alpha: float = 0.0, nll_normalizer=None, normalizer=None) -> PreferenceOutput:
    """SimPO (docs/methods.md 2.37): reference-free, on length-averaged log-probs, with a target margin.

    Inputs are **summed** response log-probs and response lengths per pair (e.g.
    `sequence_logprobs(..., return_lengths=True)`); with the means `Sw~ = S_w / L_w`, `Sl~ = S_l / L_l`
    (an empty response, L = 0, has mean 0):

        x = beta (Sw~ - Sl~) - simpo_gamma
        per pair  -(1 - eps) logsig(x) - eps logsig(-x)        (eps = label_smoothing, 0 <= eps <= 0.5)

    `simpo_gamma` is the margin gamma itself (TRL's `simpo_gamma`, Liger's `gamma`; the SimPO code's
    `gamma_beta_ratio` is simpo_gamma / beta). `cpo_alpha` > 0 adds cpo_alpha x the token-mean NLL of
    the chosen responses, `-sum S_w / sum L_w` (CPO-SimPO; `nll_normalizer` overrides the token
    count): 0 by default, the paper's SimPO, where TRL's CPOConfig defaults to 1.0 (TRL's docs: pure
    SimPO is `cpo_alpha=0`). The pair term is summed over pairs / normalizer (default: pairs).
    Metrics: TRL's names, rewards = beta * mean log-prob, logps/* the means, nll_loss.
    """
    _check_vector(policy_chosen_logps, "policy_chosen_logps")
    _check_vector(policy_rejected_logps, "policy_rejected_logps", policy_chosen_logps, "policy_chosen_logps")
    if chosen_lengths is None or rejected_lengths is None:
        raise ValueError("chosen_lengths and rejected_lengths are required (SimPO's reward is the length-averaged "
                         "log-prob)")
    beta, gamma, eps, cpo_alpha = _check_simpo_options(beta, simpo_gamma, label_smoothing, cpo_alpha)
    dtype = _float_dtype(policy_chosen_logps, policy_rejected_logps)
    sw, sl = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    mean_w = sw / _lengths(chosen_lengths, sw, "chosen_lengths")
    mean_l = sl / _lengths(rejected_lengths, sw, "rejected_lengths")
    nll = _chosen_nll(sw, chosen_lengths, nll_normalizer)
    return _reference_free_output(beta, mean_w, mean_l, gamma, eps, normalizer, nll, cpo_alpha)


def cpo_loss(policy_chosen_logps: Tensor, policy_rejected_logps: Tensor, beta: float = 0.1,
             label_smoothing: float = 0.0, *, cpo_alpha: float = 1.0, chosen_lengths: Optional[Tensor] = None,
             nll_normalizer=None, normalizer=None) -> PreferenceOutput:
    """CPO (docs/methods.md 2.38): reference-free DPO on summed log-probs plus an NLL (behaviour
    cloning) term on the chosen responses:

        per pair  -(1 - eps) logsig(beta (S_w - S_l)) - eps logsig(-beta (S_w - S_l))
        L = sum(per pair) / normalizer + cpo_alpha * (-sum S_w / sum L_w)

    `S_*` are **summed** response log-probs (`sequence_logprobs`); the NLL is the token mean over the
    chosen responses, so `chosen_lengths` is required when cpo_alpha != 0 (or `nll_normalizer`, the
    token count, e.g. the step's global one). Defaults are TRL's CPOConfig (beta 0.1, cpo_alpha 1.0,
    label_smoothing 0, 0 <= eps <= 0.5). TRL's `loss_type="hinge"` / `"ipo"` of CPOTrainer are
    `dpo_loss` without reference (`ref_*=None`, loss_type "hinge" / "ipo" with the lengths) plus the
    same NLL. Metrics: TRL's names (rewards = beta * S), nll_loss (0 without lengths).
    """
    _check_vector(policy_chosen_logps, "policy_chosen_logps")
    _check_vector(policy_rejected_logps, "policy_rejected_logps", policy_chosen_logps, "policy_chosen_logps")
    beta, eps, cpo_alpha = _check_cpo_options(beta, label_smoothing, cpo_alpha)
    dtype = _float_dtype(policy_chosen_logps, policy_rejected_logps)
    sw, sl = policy_chosen_logps.to(dtype), policy_rejected_logps.to(dtype)
    if chosen_lengths is not None:
        _lengths(chosen_lengths, sw, "chosen_lengths")
    if cpo_alpha and chosen_lengths is None and nll_normalizer is None:
        raise ValueError("cpo_alpha != 0 needs chosen_lengths (the NLL term is the token mean over the chosen "
                         "responses) or nll_normalizer; pass cpo_alpha=0.0 for no NLL term")
    has_nll = chosen_lengths is not None or nll_normalizer is not None
    nll = _chosen_nll(sw, chosen_lengths, nll_normalizer) if has_nll else None
    return _reference_free_output(beta, sw, sl, 0.0, eps, normalizer, nll, cpo_alpha)


def _reference_free_output(beta, logps_w, logps_l, margin, eps, normalizer, nll, cpo_alpha) -> PreferenceOutput:
    """SimPO's and CPO's shared tail: the smoothed sigmoid loss of beta (logps_w - logps_l) - margin
    summed over pairs / normalizer (default: pairs), plus cpo_alpha x the chosen NLL where given."""
    losses = _smoothed_pair_losses(beta * (logps_w - logps_l) - margin, eps)
    pairs = torch.tensor(float(logps_w.numel()), dtype=logps_w.dtype, device=logps_w.device)
    loss = losses.sum() * inverse_normalizer(normalizer, pairs)
    if nll is not None and cpo_alpha:
        loss = loss + cpo_alpha * nll
    chosen_rewards, rejected_rewards = (beta * logps_w).detach(), (beta * logps_l).detach()
    return PreferenceOutput(loss, losses, _pair_metrics(chosen_rewards, rejected_rewards, logps_w, logps_l, nll),
                            chosen_rewards, rejected_rewards)


def _kto_reference_point(kl, policy_kl_logps, ref_kl_logps, loss_type, like: Tensor, dtype) -> Tensor:
    """z0: max(0, kl) or max(0, mean(policy_kl_logps - ref_kl_logps)), detached; 0 for apo_zero_unpaired."""
    pair = policy_kl_logps is not None or ref_kl_logps is not None
    if loss_type == "apo_zero_unpaired":
        if kl is not None or pair:
            raise ValueError("kl, policy_kl_logps and ref_kl_logps do not apply to loss_type='apo_zero_unpaired' "
                             "(it has no KL reference point)")
        return torch.zeros((), dtype=dtype, device=like.device)
    if kl is not None and pair:
        raise ValueError("give kl or policy_kl_logps and ref_kl_logps, not both")
    if pair:
        if policy_kl_logps is None or ref_kl_logps is None:
            raise ValueError("policy_kl_logps and ref_kl_logps must both be given (or neither)")
        _check_vector(policy_kl_logps, "policy_kl_logps")
        _check_vector(ref_kl_logps, "ref_kl_logps", policy_kl_logps, "policy_kl_logps")
        if policy_kl_logps.device != like.device:
            raise ValueError(f"policy_kl_logps is on {policy_kl_logps.device} but policy_logps is on {like.device}")
        diff = policy_kl_logps.detach().to(dtype) - ref_kl_logps.detach().to(dtype)
        z0 = diff.sum() / max(diff.numel(), 1)
    elif kl is not None:
        if isinstance(kl, Tensor):
            if not kl.dtype.is_floating_point:
                raise TypeError(f"kl must be a float or a floating-point scalar tensor, got {kl.dtype}")
            if kl.numel() != 1:
                raise ValueError(f"kl must be a scalar, got shape {tuple(kl.shape)}")
            if kl.device != like.device:
                raise ValueError(f"kl is on {kl.device} but policy_logps is on {like.device}")
            z0 = kl.detach().reshape(()).to(dtype)
        else:
            z0 = torch.tensor(check_float("kl", kl), dtype=dtype, device=like.device)
    else:
        raise ValueError("loss_type='kto' needs its KL reference point: kl= (the batch's estimate, e.g. the global "
                         "mean over ranks; kl=0.0 for none) or policy_kl_logps= and ref_kl_logps= (summed log-probs "
                         "of mismatched prompt/completion pairs)")
    return z0.clamp_min(0.0)


def kto_loss(policy_logps: Tensor, ref_logps: Optional[Tensor], desirable: Tensor, beta: float = 0.1, *,
             kl=None, policy_kl_logps: Optional[Tensor] = None, ref_kl_logps: Optional[Tensor] = None,
             desirable_weight: float = 1.0, undesirable_weight: float = 1.0, loss_type: str = "kto",
             normalizer=None) -> PreferenceOutput:
    """KTO (docs/methods.md 2.39): unpaired examples, each desirable or undesirable. With the summed
    log-ratio `r = S - S_ref` (`ref_logps=None`: reference-free, r = S) and the reference point z0:

        desirable    lambda_D * (1 - sigmoid(beta (r - z0)))
        undesirable  lambda_U * (1 - sigmoid(beta (z0 - r)))

    computed as sigmoid(-x), not 1 - sigmoid(x). z0 is the KL term, detached and clamped at 0: either
    `kl=` (a float or scalar tensor: the caller's estimate, e.g. averaged over ranks as TRL does), or
    `policy_kl_logps` / `ref_kl_logps` ([M] summed log-probs of mismatched prompt/completion pairs,
    TRL's `KL_completion_ids`), whose mean difference it is. One of the two is required; kl=0.0 is
    no reference point. `loss_type="apo_zero_unpaired"` (TRL): lambda_D (1 - sigmoid(beta r)) and
    lambda_U sigmoid(beta r), without z0. `desirable`: [B] bool (or 0/1), True = desirable (TRL's
    `label`). lambda_D = `desirable_weight`, lambda_U = `undesirable_weight` (TRL's names, default 1).
    `losses` are per example (weighted, in input order); `loss` = their sum / normalizer (default:
    the number of examples, TRL's mean). Metrics (TRL's names, means over each label's examples, 0
    for none): kl (z0), rewards/chosen, rewards/rejected (beta r), rewards/margins, logps/chosen,
    logps/rejected. chosen_rewards / rejected_rewards are None: KTO has no pairs.
    """
    _check_vector(policy_logps, "policy_logps")
    if ref_logps is not None:
        _check_vector(ref_logps, "ref_logps", policy_logps, "policy_logps")
    if not isinstance(desirable, Tensor):
        raise TypeError(f"desirable must be a torch.Tensor [B] (bool), got {type(desirable).__name__}")
    if desirable.shape != policy_logps.shape:
        raise ValueError(f"desirable shape {tuple(desirable.shape)} does not match policy_logps shape "
                         f"{tuple(policy_logps.shape)}")
    if desirable.device != policy_logps.device:
        raise ValueError(f"desirable is on {desirable.device} but policy_logps is on {policy_logps.device}")
    good = check_mask(desirable, name="desirable", weights="desirable_weight and undesirable_weight weigh the "
                                                           "two labels")
    beta, w_good, w_bad = _check_kto_options(beta, desirable_weight, undesirable_weight, loss_type)
    tensors = [policy_logps] + ([ref_logps] if ref_logps is not None else [])
    dtype = _float_dtype(*tensors)
    s = policy_logps.to(dtype)
    z0 = _kto_reference_point(kl, policy_kl_logps, ref_kl_logps, loss_type, policy_logps, dtype)
    r = s if ref_logps is None else s - ref_logps.detach().to(dtype)
    if loss_type == "kto":
        gain, loss_bad = torch.sigmoid(-beta * (r - z0)), torch.sigmoid(-beta * (z0 - r))
    else:
        gain, loss_bad = torch.sigmoid(-beta * r), torch.sigmoid(beta * r)
    losses = torch.where(good, w_good * gain, w_bad * loss_bad)
    inv = inverse_normalizer(normalizer, torch.tensor(float(s.numel()), dtype=dtype, device=s.device))
    loss = losses.sum() * inv

    with torch.no_grad():
        bad = ~good
        n_good, n_bad = good.sum().float(), bad.sum().float()

        def label_mean(x, m, n):
            return torch.where(m, x.float(), torch.zeros((), device=x.device)).sum() / n.clamp_min(1.0)

        rewards = (beta * r).detach()
        r_good, r_bad = label_mean(rewards, good, n_good), label_mean(rewards, bad, n_bad)
        both = (n_good > 0) & (n_bad > 0)
        metrics = {
            "kl": z0.detach().float(),
            "rewards/chosen": r_good,
            "rewards/rejected": r_bad,
            "rewards/margins": torch.where(both, r_good - r_bad, torch.zeros_like(r_good)),
            "logps/chosen": label_mean(s.detach(), good, n_good),
            "logps/rejected": label_mean(s.detach(), bad, n_bad),
        }
    return PreferenceOutput(loss, losses, metrics)


# --------------------------------------------------------------------------------------------
# SimPO, CPO and KTO from hidden states and the lm_head weight (no [N, V] logits)


def _fused_sums(hidden, weight, labels, mask, bias, cu_seqlens, temperature, ignore_index, softcap, logit_scale,
                backend, chunk_size, vocab_process_group, vocab_start):
    """(summed log-probs [R], response lengths [R]) of the R rows, one fused pass."""
    return fused_linear_sequence_logprobs(hidden, weight, labels, mask, "sum", bias=bias, cu_seqlens=cu_seqlens,
                                          temperature=temperature, ignore_index=ignore_index, softcap=softcap,
                                          logit_scale=logit_scale, return_lengths=True, backend=backend,
                                          chunk_size=chunk_size, vocab_process_group=vocab_process_group,
                                          vocab_start=vocab_start)


def _split_pairs(sums: Tensor, lengths: Tensor):
    rows = sums.shape[0]
    if rows % 2:
        raise ValueError(f"hidden must hold 2B rows, the B chosen rows then the B rejected rows; got {rows} rows")
    b = rows // 2
    return sums[:b], sums[b:], lengths[:b], lengths[b:]


def fused_linear_simpo_loss(hidden: Tensor, weight: Tensor, labels: Tensor, mask: Optional[Tensor] = None,
                            beta: float = 0.1, simpo_gamma: float = 0.5, label_smoothing: float = 0.0, *,
                            cpo_alpha: float = 0.0, bias: Optional[Tensor] = None,
                            cu_seqlens: Optional[Tensor] = None, temperature: float = 1.0, ignore_index: int = -100,
                            softcap: Optional[float] = None, logit_scale: Optional[float] = None,
                            backend: Optional[str] = None, chunk_size: Optional[int] = None,
                            vocab_process_group=None, vocab_start: Optional[int] = None, nll_normalizer=None,
                            normalizer=None) -> PreferenceOutput:
    """simpo_loss of the logits `hidden @ weight.T + bias`, without forming them.

    `hidden` `[2B, T, H]` (or packed `[N, H]` with `cu_seqlens` of 2B rows): the B chosen rows, then
    the B rejected rows (Liger's layout); `labels` like hidden without H, response tokens only
    (`ignore_index` elsewhere; `mask=None` means `labels != ignore_index`). One
    `fused_linear_sequence_logprobs` pass gives the sums and lengths; the head's keywords are its
    own. Value and gradients (hidden, weight, bias) equal `simpo_loss(sequence_logprobs(hidden @
    weight.T + bias, ...))`.
    """
    _check_simpo_options(beta, simpo_gamma, label_smoothing, cpo_alpha)
    sw, sl, lw, ll = _split_pairs(*_fused_sums(hidden, weight, labels, mask, bias, cu_seqlens, temperature,
                                               ignore_index, softcap, logit_scale, backend, chunk_size,
                                               vocab_process_group, vocab_start))
    return simpo_loss(sw, sl, lw, ll, beta, simpo_gamma, label_smoothing, cpo_alpha=cpo_alpha,
                      nll_normalizer=nll_normalizer, normalizer=normalizer)


def fused_linear_cpo_loss(hidden: Tensor, weight: Tensor, labels: Tensor, mask: Optional[Tensor] = None,
                          beta: float = 0.1, label_smoothing: float = 0.0, *, cpo_alpha: float = 1.0,
                          bias: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
                          temperature: float = 1.0, ignore_index: int = -100, softcap: Optional[float] = None,
                          logit_scale: Optional[float] = None, backend: Optional[str] = None,
                          chunk_size: Optional[int] = None, vocab_process_group=None,
                          vocab_start: Optional[int] = None, nll_normalizer=None,
                          normalizer=None) -> PreferenceOutput:
    """cpo_loss of the logits `hidden @ weight.T + bias`, without forming them: `hidden` holds the B
    chosen rows then the B rejected rows, as fused_linear_simpo_loss; the NLL term's token count is
    the chosen rows' (the lengths come from the same pass)."""
    _check_cpo_options(beta, label_smoothing, cpo_alpha)
    sw, sl, lw, _ = _split_pairs(*_fused_sums(hidden, weight, labels, mask, bias, cu_seqlens, temperature,
                                              ignore_index, softcap, logit_scale, backend, chunk_size,
                                              vocab_process_group, vocab_start))
    return cpo_loss(sw, sl, beta, label_smoothing, cpo_alpha=cpo_alpha, chosen_lengths=lw,
                    nll_normalizer=nll_normalizer, normalizer=normalizer)


def fused_linear_kto_loss(hidden: Tensor, weight: Tensor, labels: Tensor, desirable: Tensor,
                          ref_logps: Optional[Tensor], mask: Optional[Tensor] = None, beta: float = 0.1, *,
                          kl=None, policy_kl_logps: Optional[Tensor] = None, ref_kl_logps: Optional[Tensor] = None,
                          desirable_weight: float = 1.0, undesirable_weight: float = 1.0, loss_type: str = "kto",
                          bias: Optional[Tensor] = None, cu_seqlens: Optional[Tensor] = None,
                          temperature: float = 1.0, ignore_index: int = -100, softcap: Optional[float] = None,
                          logit_scale: Optional[float] = None, backend: Optional[str] = None,
                          chunk_size: Optional[int] = None, vocab_process_group=None,
                          vocab_start: Optional[int] = None, normalizer=None) -> PreferenceOutput:
    """kto_loss of the logits `hidden @ weight.T + bias`, without forming them: `hidden` `[B, T, H]`
    (or packed with `cu_seqlens`), one example a row; `ref_logps` `[B]` the reference's summed
    log-probs (precomputed, e.g. `fused_linear_sequence_logprobs` of the reference under no_grad;
    None: reference-free). The KL reference point is `kl=` or `policy_kl_logps` / `ref_kl_logps`,
    as kto_loss (detached: compute the mismatched pairs' policy log-probs under no_grad)."""
    _check_kto_options(beta, desirable_weight, undesirable_weight, loss_type)
    s, _ = _fused_sums(hidden, weight, labels, mask, bias, cu_seqlens, temperature, ignore_index, softcap,
                       logit_scale, backend, chunk_size, vocab_process_group, vocab_start)
    return kto_loss(s, ref_logps, desirable, beta, kl=kl, policy_kl_logps=policy_kl_logps, ref_kl_logps=ref_kl_logps,
                    desirable_weight=desirable_weight, undesirable_weight=undesirable_weight, loss_type=loss_type,
                    normalizer=normalizer)


# --------------------------------------------------------------------------------------------
# GVPO


def _group_index(rows: int, group_size, group_ids, device):
    """(inverse [B] int64 group index, counts [P]) from group_size or group_ids."""
    if (group_size is None) == (group_ids is None):
        raise ValueError("give exactly one of group_size (consecutive rows) and group_ids ([B])")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, int):
            raise TypeError(f"group_size must be an int, got {type(group_size).__name__}")
        if group_size < 2:
            raise ValueError(f"group_size must be >= 2 for GVPO (k - 1 divides the loss), got {group_size}")
        if rows % group_size:
            raise ValueError(f"the batch of {rows} rows is not a whole number of groups of group_size={group_size}")
        n_groups = rows // group_size
        inverse = torch.arange(rows, device=device) // group_size
        return inverse, torch.full((n_groups,), group_size, device=device, dtype=torch.int64)
    if not isinstance(group_ids, Tensor):
        raise TypeError(f"group_ids must be a torch.Tensor [B], got {type(group_ids).__name__}")
    if tuple(group_ids.shape) != (rows,):
        raise ValueError(f"group_ids must have shape [B] = ({rows},), got {tuple(group_ids.shape)}")
    _, inverse, counts = torch.unique(group_ids.to(device), return_inverse=True, return_counts=True)
    if counts.numel() and int(counts.min()) < 2:
        raise ValueError("every GVPO group needs k >= 2 members in the step (found a group of 1)")
    return inverse, counts


@renamed_keywords(reduction="agg")
def gvpo_loss(logp: Tensor, anchor_logp: Tensor, rewards: Tensor, *, mask: Optional[Tensor] = None,
              group_size: Optional[int] = None, group_ids: Optional[Tensor] = None,
              beta: float = 0.1, agg: str = "mean", normalizer=None,
              validate_mask: Optional[bool] = None) -> PreferenceOutput:
    """GVPO (docs/methods.md 2.14): per group g of k rows,

        L_g = 1/(k-1) * 1/2 * sum_i [ (R~_i - mean_g R~) - (R_i - mean_g R) ]^2,   R~ = beta (S - S_anc)

    with S the **summed** sequence log-prob under the policy (with gradient) and S_anc under the
    anchor (the rollout policy in the authors' code; the reference model is valid too).
    `logp`/`anchor_logp`: `[B]` sequence sums (e.g. `sequence_logprobs`), or `[B, T]` token
    log-probs with `mask` (summed here in fp32; bool or 0/1, any other value is an error, checked on
    CPU tensors and, with `validate_mask=True`, on GPU ones). Groups: `group_size=k` (consecutive
    rows) or `group_ids=[B]` (the latter synchronises with the host to count groups). k >= 2.

    agg "mean" (default, ours): sum of L_g / normalizer (default: the number of groups);
    "sum": the authors' code, which sums over the groups of the micro-batch.
    Metrics: implicit_rewards/mean, implicit_rewards/centered_std, residual/mse.
    """
    check_choice("agg", agg, GVPO_AGG_MODES)
    if not isinstance(logp, Tensor):
        raise TypeError(f"logp must be a torch.Tensor, got {type(logp).__name__}")
    _check_vector(anchor_logp, "anchor_logp", logp, "logp")
    beta = _check_positive(beta, "beta")
    dtype = _float_dtype(logp, anchor_logp)
    if logp.dim() == 2:
        valid = check_mask(mask, logp.shape, logp.device, validate=validate_mask,
                           weights="gvpo_loss takes no per-token weights")
        if valid is None:
            raise ValueError("token-level logp [B, T] needs mask")
        zero = torch.zeros((), dtype=dtype, device=logp.device)
        s = torch.where(valid, logp.to(dtype), zero).sum(-1)
        s_anc = torch.where(valid, anchor_logp.detach().to(dtype), zero).sum(-1)
    elif logp.dim() == 1:
        if mask is not None:
            raise ValueError("mask applies to token-level logp [B, T]; logp [B] are already sequence sums")
        s, s_anc = logp.to(dtype), anchor_logp.detach().to(dtype)
    else:
        raise ValueError(f"logp must be [B] sequence sums or [B, T] token log-probs, got {tuple(logp.shape)}")
    rows = s.shape[0]
    _check_vector(rewards, "rewards")
    if tuple(rewards.shape) != (rows,):
        raise ValueError(f"rewards must have shape [B] = ({rows},), got {tuple(rewards.shape)}")
    inverse, counts = _group_index(rows, group_size, group_ids, s.device)
    n_groups = counts.numel()
    k = counts.to(dtype)

    def group_sums(x):
        # Consecutive groups reduce with a reshape: deterministic on every device (index_add
        # would use float atomics on CUDA).
        if group_size is not None:
            return x.view(n_groups, group_size).sum(-1)
        return torch.zeros(n_groups, dtype=dtype, device=x.device).index_add(0, inverse, x)

    def centred(x):
        return x - (group_sums(x) / k)[inverse]

    implicit = beta * (s - s_anc)
    residual = centred(implicit) - centred(rewards.detach().to(dtype))
    per_row = 0.5 * residual.square() / (k - 1)[inverse]
    losses = group_sums(per_row)
    if agg == "sum":
        loss = losses.sum()
    else:
        inv = inverse_normalizer(normalizer, torch.tensor(float(n_groups), dtype=dtype, device=s.device))
        loss = losses.sum() * inv
    with torch.no_grad():
        metrics = {
            "implicit_rewards/mean": _mean(implicit),
            "implicit_rewards/centered_std": _mean(centred(implicit).square()).sqrt(),
            "residual/mse": _mean(residual.square()),
        }
    return PreferenceOutput(loss, losses, metrics)


# --------------------------------------------------------------------------------------------
# RAHF


HiddenStates = Union[Tensor, Sequence[Tensor]]


def _stack_layers(x: HiddenStates, name: str) -> Tensor:
    """[L, B, T, H] from a tensor [L, B, T, H] / [B, T, H] (one layer) or a sequence of [B, T, H]."""
    if isinstance(x, Tensor):
        if x.dim() == 3:
            return x.unsqueeze(0)
        if x.dim() == 4:
            return x
        raise ValueError(f"{name} must be [B, T, H], [L, B, T, H] or a list of [B, T, H], got {tuple(x.shape)}")
    if isinstance(x, (list, tuple)) and x and all(isinstance(t, Tensor) for t in x):
        shapes = {tuple(t.shape) for t in x}
        if len(shapes) != 1 or x[0].dim() != 3:
            raise ValueError(f"{name} layers must all be [B, T, H] of one shape, got {sorted(shapes)}")
        return torch.stack(list(x))
    raise TypeError(f"{name} must be a tensor or a non-empty list of tensors, got {type(x).__name__}")


def rahf_loss(lora_hidden: HiddenStates, base_hidden: HiddenStates, direction: HiddenStates,
              mask: Optional[Tensor] = None, alpha: float = 5.0, *,
              count_padding: bool = False, validate_mask: Optional[bool] = None) -> PreferenceOutput:
    """RAHF's representation loss (docs/methods.md 2.26): per layer l and response position (b, t),

        d = || h^LoRA_lbt - (h^base_lbt + alpha v_lbt) ||_2          (unsquared L2 over H)

    averaged over the valid positions (mask [B, T], bool or 0/1: any other value is an error, checked on
    CPU tensors, and on GPU ones with `validate_mask=True`) of each layer, then over layers. The target
    (base + alpha v) is detached. `count_padding=True` reproduces the authors' code, which zeroes
    masked positions but still counts them in the mean (dividing by B*T). Inputs: one tensor per
    layer ([B, T, H] each, a list) or stacked [L, B, T, H]; the layer ids are the caller's (HF's
    `hidden_states[l]` is the output of block l-1). fp32 math for any input dtype.
    `losses` holds the per-layer losses; metrics `layer/{i}` the same values, detached.
    """
    h = _stack_layers(lora_hidden, "lora_hidden")
    base = _stack_layers(base_hidden, "base_hidden")
    v = _stack_layers(direction, "direction")
    for name, t in (("base_hidden", base), ("direction", v)):
        if t.shape != h.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} does not match lora_hidden shape {tuple(h.shape)}")
        if t.device != h.device:
            raise ValueError(f"{name} is on {t.device} but lora_hidden is on {h.device}")
    if not h.dtype.is_floating_point:
        raise TypeError(f"lora_hidden must be floating point, got {h.dtype}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise TypeError(f"alpha must be a finite float, got {type(alpha).__name__}")
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be a finite float, got {alpha!r}")
    check_bool("count_padding", count_padding)
    n_layers, batch, seq, _ = h.shape
    valid = check_mask(mask, (batch, seq), h.device, validate=validate_mask,
                       weights="rahf_loss takes no per-token weights")
    dtype = _float_dtype(h, base, v)
    target = (base.detach().to(dtype) + float(alpha) * v.detach().to(dtype))
    # vector_norm's backward is 0 (not NaN) where the difference is exactly 0: the alpha = 0,
    # fresh-LoRA starting point has a zero, finite gradient.
    dist = torch.linalg.vector_norm(h.to(dtype) - target, dim=-1)  # [L, B, T]
    if valid is None:
        per_layer = dist.mean(dim=(1, 2)) if batch * seq else dist.sum(dim=(1, 2))
    else:
        dist = torch.where(valid, dist, torch.zeros_like(dist))
        count = torch.tensor(float(batch * seq), dtype=dtype, device=h.device) if count_padding \
            else valid.sum().to(dtype)
        per_layer = dist.sum(dim=(1, 2)) * inverse_normalizer(None, count)
    loss = per_layer.mean()
    metrics = {f"layer/{i}": per_layer[i].detach().float() for i in range(n_layers)}
    return PreferenceOutput(loss, per_layer, metrics)
