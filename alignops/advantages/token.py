"""Token-level estimators: masked statistics and whitening, GAE (and VAPO's lambda), the k1
KL-in-reward terms, token rewards, REINFORCE++ and the optimal token baseline (OTB).

Token tensors are `[B, T]` with a mask, or packed `[N]` with `cu_seqlens=[B+1]` (and an optional
`[N]` mask): alignops.layout. Masks are bool or 0/1; any other value is an error, checked on CPU
tensors and, with `validate_mask=True`, on GPU ones (alignops.layout.check_mask). Masked moments,
whitening and the GAE scan are the `masked_moments`, `whiten_apply` and `gae_scan` kernels
(contract: alignops.advantages).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from alignops import _backend, layout
from alignops._validate import check_bool, check_choice, check_float, renamed_keywords
from alignops.advantages._common import (_check_finite, _check_nonnegative, _float_tensor, _resolve, _rewards,
                                         _same_device, _tensor, _var)
from alignops.advantages.group import _groups, _run_groups
from alignops.distributed import merge_moments

class AdvantagesReturns(NamedTuple):
    """Token-level estimators: `adv, ret = ...`. Returns are computed before any whitening."""
    advantages: Tensor
    returns: Tensor


# --------------------------------------------------------------------------------------------
# token layout


class _Tokens(NamedTuple):
    shape: tuple
    mask: Tensor       # [N] bool contiguous
    rows: layout.Rows  # offsets: cu_seqlens [B+1] int64 (also for the padded layout)

    @property
    def cu_seqlens(self) -> Tensor:
        return self.rows.offsets

    @property
    def num_rows(self) -> int:
        return self.rows.num_rows


def _tokens(x: Tensor, mask, cu_seqlens, name: str, validate_mask=None) -> _Tokens:
    if cu_seqlens is None:
        if x.dim() != 2:
            raise ValueError(f"{name} must be [B, T] (or packed [N] with cu_seqlens), got shape {tuple(x.shape)}")
        rows = layout.Rows(x.shape, x.device)
    else:
        if x.dim() != 1:
            raise ValueError(f"{name} must be packed [N] when cu_seqlens is given, got shape {tuple(x.shape)}")
        rows = layout.Rows(x.shape, x.device, layout.check_cu_seqlens(cu_seqlens, x.numel(), x.device))
    m = layout.token_mask(mask, x.shape, x.device, validate=validate_mask).reshape(-1).contiguous()
    return _Tokens(tuple(x.shape), m, rows)


def _same(x, like: Tensor, name: str) -> Tensor:
    x = _float_tensor(x, name)
    if x.shape != like.shape:
        raise ValueError(f"{name} shape {tuple(x.shape)} does not match {tuple(like.shape)}")
    if x.device != like.device:
        raise ValueError(f"{name} is on {x.device} but the other inputs are on {like.device}")
    return x


# --------------------------------------------------------------------------------------------
# masked statistics and whitening


def _moments(x: Tensor, mask: Tensor, process_group, backend) -> Tensor:
    """(count, mean, M2) over mask, global over process_group."""
    out = torch.empty(3, dtype=torch.float64, device=x.device)
    _backend.kernel("masked_moments", _resolve(backend, x.device))(x, mask, out)
    return merge_moments(out, process_group)


def _flat_float(x, mask, name, validate_mask) -> tuple[Tensor, Tensor]:
    x = _float_tensor(x, name)
    m = layout.token_mask(mask, x.shape, x.device, validate=validate_mask)
    return x.reshape(-1).contiguous(), m.reshape(-1).contiguous()


def masked_mean(x: Tensor, mask: Tensor | None = None, dim: int | None = None, *, process_group=None,
                backend: str | None = None, validate_mask: bool | None = None) -> Tensor:
    """Mean of x over mask (global over `process_group` when dim is None). Empty selections give 0,
    not NaN (verl divides by count + 1e-8; this is exact instead)."""
    if dim is not None:
        if process_group is not None:
            raise ValueError("process_group reduces the whole batch; it cannot be combined with dim")
        xf = _float_tensor(x, "x")
        if isinstance(dim, bool) or not isinstance(dim, int):
            raise TypeError(f"dim must be an int or None, got {type(dim).__name__}")
        if not -max(xf.dim(), 1) <= dim < max(xf.dim(), 1):
            raise ValueError(f"dim must lie in [{-max(xf.dim(), 1)}, {max(xf.dim(), 1)}) for x of shape "
                             f"{tuple(xf.shape)}, got {dim}")
        m = layout.token_mask(mask, xf.shape, xf.device, validate=validate_mask)
        s = torch.where(m, xf, 0.0).sum(dim)
        return s / m.sum(dim).clamp_min(1).to(xf.dtype)
    xf, m = _flat_float(x, mask, "x", validate_mask)
    return _moments(xf, m, process_group, backend)[1].to(xf.dtype)


def masked_var(x: Tensor, mask: Tensor | None = None, *, unbiased: bool = True, process_group=None,
               backend: str | None = None, validate_mask: bool | None = None) -> Tensor:
    """Variance of x over mask (global over `process_group`); unbiased (x N/(N-1), verl) or biased
    (OpenRLHF). Fewer than two values (one for biased) give 0."""
    check_bool("unbiased", unbiased)
    xf, m = _flat_float(x, mask, "x", validate_mask)
    n, _, m2 = _moments(xf, m, process_group, backend)
    return _var(n, m2, unbiased).to(xf.dtype)


def _whiten_flat(x: Tensor, m: Tensor, shift_mean: bool, var: str, eps: float, eps_mode: str,
                 process_group, backend) -> Tensor:
    n, mean, m2 = _moments(x, m, process_group, backend)
    v = _var(n, m2, var == "unbiased")
    inv = torch.rsqrt(v + eps) if eps_mode == "add_inside" else torch.rsqrt(v.clamp_min(eps))
    # N <= 1: centre only (verl raises here; a finite answer is the contract).
    inv = torch.where(n > 1, inv, 1.0)
    stats = torch.stack([mean, inv]).contiguous()
    out = torch.empty_like(x)
    _backend.kernel("whiten_apply", _resolve(backend, x.device))(x, m, stats, not shift_mean, out)
    return out


def _whiten_args(var, eps, eps_mode):
    check_choice("var", var, ("unbiased", "biased"))
    check_choice("var_eps_mode", eps_mode, ("add_inside", "floor"))
    return check_float("var_eps", eps, lo=0.0, lo_open=False)


# the variance epsilon of whitening (inside the root) was `eps`; `std_eps` is the group std's (outside it)
_WHITEN_RENAMES = dict(eps="var_eps", eps_mode="var_eps_mode")


@renamed_keywords(**_WHITEN_RENAMES)
def masked_whiten(x: Tensor, mask: Tensor | None = None, shift_mean: bool = True, *, var: str = "unbiased",
                  var_eps: float = 1e-8, var_eps_mode: str = "add_inside", process_group=None,
                  backend: str | None = None, validate_mask: bool | None = None) -> Tensor:
    """(x - mean) / std over the masked-in entries of the whole (global) batch, token-weighted.

    Defaults are verl's `masked_whiten` (unbiased variance, rsqrt(var + var_eps)); `var="biased",
    var_eps_mode="floor"` is OpenRLHF's (rsqrt(max(var, var_eps))). `shift_mean=False` adds the mean back.
    Masked-out entries come back as 0. With N <= 1 valid entries the values are centred only.
    Works on any shape (a packed [N] tensor is just a 1-d x). One fused statistics pass, one
    all-reduce of (sum, sum of squares, count) when `process_group` is given, one apply pass.
    """
    eps = _whiten_args(var, var_eps, var_eps_mode)
    check_bool("shift_mean", shift_mean)
    xf = _float_tensor(x, "x")
    xflat, m = _flat_float(xf, mask, "x", validate_mask)
    return _whiten_flat(xflat, m, shift_mean, var, eps, var_eps_mode, process_group, backend).view(xf.shape)


# --------------------------------------------------------------------------------------------
# token-level estimators


def _lam_tensor(lam, rows: int, dtype, device, name: str) -> Tensor:
    if isinstance(lam, Tensor):
        lt = _float_tensor(lam, name).to(dtype)
        if lt.shape != (rows,):
            raise ValueError(f"{name} must be a float or a [B]={rows} tensor, got shape {tuple(lt.shape)}")
        if lt.device != torch.device(device):
            raise ValueError(f"{name} is on {lt.device} but the rewards are on {device}")
        if lt.device.type == "cpu" and bool(((lt < 0) | (lt > 1) | torch.isnan(lt)).any()):
            raise ValueError(f"{name} values must lie in [0, 1]")
        return lt.contiguous()
    value = check_float(name, lam, lo=0.0, hi=1.0, lo_open=False)
    return torch.full((rows,), value, dtype=dtype, device=device)


def _gae_flat(r: Tensor, v: Tensor, tok: _Tokens, gamma: float, lam, critic_lam, backend):
    lam_a = _lam_tensor(lam, tok.num_rows, r.dtype, r.device, "lam")
    lam_c = lam_a if critic_lam is None else _lam_tensor(critic_lam, tok.num_rows, r.dtype, r.device,
                                                         "critic_lam")
    rf, vf = r.reshape(-1).contiguous(), v.reshape(-1).contiguous()
    adv, ret = torch.empty_like(rf), torch.empty_like(rf)
    _backend.kernel("gae_scan", _resolve(backend, r.device))(rf, vf, tok.mask, tok.cu_seqlens, gamma,
                                                              lam_a, lam_c, adv, ret)
    return adv, ret


@renamed_keywords(**_WHITEN_RENAMES)
def gae_advantages(token_rewards: Tensor, values: Tensor, mask: Tensor | None = None, gamma: float = 1.0,
                   lam=0.95, *, critic_lam=None, cu_seqlens: Tensor | None = None, whiten: bool = False,
                   var: str = "unbiased", var_eps: float = 1e-8, var_eps_mode: str = "add_inside",
                   process_group=None, backend: str | None = None,
                   validate_mask: bool | None = None) -> AdvantagesReturns:
    """GAE with masked positions transparent to the scan (verl `gae`; PPO, VC-PPO, VAPO, ORZ).

    `lam` is the actor's lambda (a float or a per-row [B] tensor, e.g. `vapo_lambda(...)`);
    `critic_lam` (default: lam) is the lambda of the value targets (VC-PPO's decoupled GAE uses
    1.0). Returns (advantages, returns); returns = GAE(critic_lam) + V, computed before any
    whitening. `whiten=True` whitens the advantages over the global batch like `masked_whiten`.
    Masked positions get 0 in both outputs and their rewards/values are never read.
    """
    r = _float_tensor(token_rewards, "token_rewards")
    v = _same(values, r, "values")
    dtype = torch.float64 if torch.float64 in (r.dtype, v.dtype) else torch.float32
    r, v = r.to(dtype), v.to(dtype)
    gamma = check_float("gamma", gamma, lo=0.0, hi=1.0, lo_open=False)
    eps = _whiten_args(var, var_eps, var_eps_mode)
    check_bool("whiten", whiten)
    tok = _tokens(r, mask, cu_seqlens, "token_rewards", validate_mask)
    adv, ret = _gae_flat(r, v, tok, gamma, lam, critic_lam, backend)
    if whiten:
        adv = _whiten_flat(adv, tok.mask, True, var, eps, var_eps_mode, process_group, backend)
    return AdvantagesReturns(adv.view(tok.shape), ret.view(tok.shape))


def vapo_lambda(lengths: Tensor, alpha: float = 0.05) -> Tensor:
    """VAPO's length-adaptive actor lambda per row: clamp(1 - 1/(alpha L), 0, 1) (negative for
    L < 1/alpha without the clamp). `lengths` [B] (e.g. mask.sum(-1)). float32."""
    alpha = check_float("alpha", alpha, lo=0.0, lo_open=True)
    lengths = _float_tensor(lengths, "lengths")
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be [B], got shape {tuple(lengths.shape)}")
    lam = 1 - 1 / (alpha * lengths.clamp_min(0))
    return torch.nan_to_num(lam, neginf=0.0).clamp(0, 1)


def k1_penalty(old_logp: Tensor, ref_logp: Tensor, mask: Tensor | None = None, *,
               validate_mask: bool | None = None) -> Tensor:
    """Per-token k1 KL estimate for KL-in-reward, old_logp - ref_logp, 0 at masked positions
    (verl `apply_kl_penalty` with kl_penalty="kl", OpenRLHF `compute_approx_kl` k1). Detached."""
    old = _float_tensor(old_logp, "old_logp").detach()
    ref = _same(ref_logp, old, "ref_logp").detach()
    m = layout.token_mask(mask, old.shape, old.device, validate=validate_mask)
    return torch.where(m, old - ref, 0.0)


def token_level_rewards(scores: Tensor, mask: Tensor | None = None, *, cu_seqlens: Tensor | None = None,
                        shape=None, kl: Tensor | None = None, kl_coef: float = 0.0,
                        validate_mask: bool | None = None) -> Tensor:
    """Token rewards r_t = score * 1[t = last valid token of the row] - kl_coef * kl_t (valid t).

    Layout: `mask` [B, T] (or `shape=(B, T)` for an all-valid batch), or packed with `cu_seqlens`
    (and an optional [N] mask, or `shape=(N,)`). Rows without valid tokens drop their score.
    """
    s = _rewards(scores, "scores")
    if kl is not None:
        like = _float_tensor(kl, "kl")
    elif mask is not None:
        like = torch.empty(_tensor(mask, "mask").shape, dtype=s.dtype, device=mask.device)
    elif shape is not None:
        like = torch.empty(tuple(shape), dtype=s.dtype, device=s.device)
    else:
        raise ValueError("token_level_rewards needs the token layout: mask, kl or shape")
    _same_device(s, like.device, "scores", "the tokens")
    tok = _tokens(like, mask, cu_seqlens, "kl" if kl is not None else "mask", validate_mask)
    if tok.num_rows != s.numel():
        raise ValueError(f"scores has {s.numel()} rows but the token layout has {tok.num_rows}")
    return _token_rewards_flat(s, tok, None if kl is None else like.to(s.dtype).reshape(-1),
                               check_float("kl_coef", kl_coef)).view(tok.shape)


def _token_rewards_flat(s: Tensor, tok: _Tokens, kl_flat: Tensor | None, kl_coef: float) -> Tensor:
    n = tok.mask.numel()
    rows = tok.rows.row_ids
    pos = torch.arange(n, device=s.device)
    last = torch.full((tok.num_rows,), -1, dtype=torch.int64, device=s.device).scatter_reduce(
        0, rows, torch.where(tok.mask, pos, -1), "amax")
    out = torch.zeros(n, dtype=s.dtype, device=s.device)
    has = last >= 0
    out.index_put_((last.clamp_min(0),), torch.where(has, s, 0.0), accumulate=True)
    if kl_flat is not None and kl_coef != 0.0:
        out = out - kl_coef * torch.where(tok.mask, kl_flat, 0.0)
    return torch.where(tok.mask, out, 0.0)


def kl_penalized_scores(scores: Tensor, old_logp: Tensor, ref_logp: Tensor, mask: Tensor | None = None, *,
                        kl_coef: float, cu_seqlens: Tensor | None = None,
                        validate_mask: bool | None = None) -> Tensor:
    """TRL RLOO's sequence-level KL in the reward: R - kl_coef * sum_t mask * (old_logp - ref_logp)."""
    s = _rewards(scores, "scores")
    kl = k1_penalty(old_logp, ref_logp, mask, validate_mask=validate_mask)
    _same_device(s, kl.device, "scores", "the tokens")
    tok = _tokens(kl, mask, cu_seqlens, "old_logp", False)  # values checked by k1_penalty
    if tok.num_rows != s.numel():
        raise ValueError(f"scores has {s.numel()} rows but the token layout has {tok.num_rows}")
    per_row = torch.zeros(tok.num_rows, dtype=torch.float64, device=s.device).index_add_(
        0, tok.rows.row_ids, kl.reshape(-1).double())
    return (s.double() - check_float("kl_coef", kl_coef) * per_row).to(s.dtype)


def _reinforce_pp(scores: Tensor, mask, cu_seqlens, old_logp, ref_logp, kl_coef, gamma, var, eps,
                  eps_mode, process_group, backend, shape, validate_mask) -> AdvantagesReturns:
    kl_coef = check_float("kl_coef", kl_coef, lo=0.0, lo_open=False)
    gamma = check_float("gamma", gamma, lo=0.0, hi=1.0, lo_open=False)
    eps = _whiten_args(var, eps, eps_mode)
    if (old_logp is None) != (ref_logp is None):
        raise ValueError("give both old_logp and ref_logp for the KL-in-reward term, or neither")
    if old_logp is not None:
        kl = k1_penalty(old_logp, ref_logp, mask, validate_mask=validate_mask).to(scores.dtype)
        like = kl
        validate_mask = False  # k1_penalty checked the mask's values
    else:
        kl = None
        if mask is not None:
            like = torch.empty(_tensor(mask, "mask").shape, dtype=scores.dtype, device=mask.device)
        elif shape is not None:
            like = torch.empty(tuple(shape), dtype=scores.dtype, device=scores.device)
        else:
            raise ValueError("give mask (or shape, or old_logp/ref_logp) for the token layout")
    _same_device(scores, like.device, "scores", "the tokens")
    tok = _tokens(like, mask, cu_seqlens, "mask", validate_mask)
    if tok.num_rows != scores.numel():
        raise ValueError(f"scores has {scores.numel()} rows but the token layout has {tok.num_rows}")
    r = _token_rewards_flat(scores, tok, None if kl is None else kl.reshape(-1), kl_coef)
    # Returns are GAE with V = 0 and lambda = 1: G_t = r_t + gamma G_next(t), masked positions skipped.
    _, returns = _gae_flat(r, torch.zeros_like(r), tok, gamma, 1.0, None, backend)
    adv = _whiten_flat(returns, tok.mask, True, var, eps, eps_mode, process_group, backend)
    return AdvantagesReturns(adv.view(tok.shape), returns.view(tok.shape))


@renamed_keywords(**_WHITEN_RENAMES)
def reinforce_pp_advantages(scores: Tensor, mask: Tensor | None = None, *, cu_seqlens: Tensor | None = None,
                            shape=None, old_logp: Tensor | None = None, ref_logp: Tensor | None = None,
                            kl_coef: float = 0.0, gamma: float = 1.0, var: str = "unbiased",
                            var_eps: float = 1e-8, var_eps_mode: str = "add_inside", process_group=None,
                            backend: str | None = None, validate_mask: bool | None = None) -> AdvantagesReturns:
    """REINFORCE++ (verl `reinforce_plus_plus`, OpenRLHF `reinforce`): token rewards = score on
    the last valid token - kl_coef * k1(old_logp, ref_logp); discounted returns over valid tokens;
    advantages = returns whitened over all valid tokens of the global batch (verl semantics by
    default; `var="biased", var_eps_mode="floor"` for OpenRLHF). NaN scores are not allowed here."""
    s = _rewards(scores, "scores")
    _check_finite(s, "scores", allow_nan=False)
    return _reinforce_pp(s, mask, cu_seqlens, old_logp, ref_logp, kl_coef, gamma, var, var_eps, var_eps_mode,
                         process_group, backend, shape, validate_mask)


@renamed_keywords(**_WHITEN_RENAMES)
def reinforce_pp_baseline_advantages(scores: Tensor, mask: Tensor | None = None, group_size: int | None = None,
                                     *, group_ids: Tensor | None = None, num_groups: int | None = None,
                                     cu_seqlens: Tensor | None = None, shape=None,
                                     old_logp: Tensor | None = None, ref_logp: Tensor | None = None,
                                     kl_coef: float = 0.0, singleton: str = "error", var: str = "unbiased",
                                     var_eps: float = 1e-8, var_eps_mode: str = "add_inside", process_group=None,
                                     backend: str | None = None,
                                     validate_mask: bool | None = None) -> AdvantagesReturns:
    """REINFORCE++-baseline (verl `reinforce_plus_plus_baseline`, OpenRLHF `reinforce_baseline`):
    R - mean_g as the score (no std), optional k1 KL in the reward, gamma = 1, then global
    token-level whitening. NaN scores get 0 before whitening (they are left out of mean_g)."""
    s = _rewards(scores, "scores")
    tokens = mask if mask is not None else old_logp
    if isinstance(tokens, Tensor):  # before the group pass, which runs on the scores' device
        _same_device(s, tokens.device, "scores", "the tokens")
    groups = _groups(s.numel(), s.device, group_size, group_ids, num_groups)
    centered, _ = _run_groups(s, groups, "center", 0.0, singleton, backend)
    return _reinforce_pp(centered, mask, cu_seqlens, old_logp, ref_logp, kl_coef, 1.0, var, var_eps, var_eps_mode,
                         process_group, backend, shape, validate_mask)


def optimal_token_baseline_advantages(token_rewards: Tensor, old_logp: Tensor, sum_pi_squared: Tensor,
                                      mask: Tensor | None = None, group_size: int | None = None, *,
                                      group_ids: Tensor | None = None, num_groups: int | None = None,
                                      rollout_is_weights: Tensor | None = None, align: str = "position",
                                      zero_tail: bool = True, weight_eps: float = 1e-8, singleton: str = "error",
                                      validate_mask: bool | None = None) -> AdvantagesReturns:
    """The optimal token baseline (docs/methods.md §2.43; verl `optimal_token_baseline` and, with
    align="valid", `tir_optimal_token_baseline`): A_t = G_t - B_{g,t}, one baseline per group and
    token index.

    G_t is the return-to-go over the row's valid tokens (gamma = 1). Per token
    w_t = max(1 - 2 exp(old_logp_t) + sum_pi_squared_t, 0) * rho_t^2 (rho = `rollout_is_weights`,
    default 1), W_t its sum over the row's valid tokens up to t, and
    B_{g,t} = (sum_j G_j W_j + weight_eps * Gbar) / (sum_j W_j + weight_eps) over the rows j of the group
    valid at index t, Gbar their plain mean (equal returns give exactly 0; weight_eps pulls towards Gbar,
    not 0).
    align="position": index t is the padded column; "valid": the row's k-th valid token (multi-turn
    responses whose tool tokens are masked). `zero_tail`: where a single row of a group of two or
    more reaches index t, its baseline there is 0. A group with one row that has tokens follows
    `singleton` ("raw": no baseline, A = G, verl's). `[B, T]` inputs; returns (advantages, returns),
    both 0 at masked positions."""
    check_choice("align", align, ("position", "valid"))
    check_bool("zero_tail", zero_tail)
    check_choice("singleton", singleton, ("error", "zero", "raw"))
    eps = check_float("weight_eps", weight_eps, lo=0.0, lo_open=False)
    r = _float_tensor(token_rewards, "token_rewards")
    if r.dim() != 2:
        raise ValueError(f"token_rewards must be [B, T], got shape {tuple(r.shape)}")
    old = _same(old_logp, r, "old_logp")
    s2 = _same(sum_pi_squared, r, "sum_pi_squared")
    rho = None if rollout_is_weights is None else _same(rollout_is_weights, r, "rollout_is_weights")
    inputs = [r, old, s2] + ([] if rho is None else [rho])
    dtype = torch.float64 if any(x.dtype == torch.float64 for x in inputs) else torch.float32
    m = layout.token_mask(mask, r.shape, r.device, validate=validate_mask)
    for x, name in zip(inputs, ("token_rewards", "old_logp", "sum_pi_squared", "rollout_is_weights")):
        _check_finite(torch.where(m, x, 0.0), name, allow_nan=False)  # masked positions are never read
    _check_nonnegative(torch.where(m, s2, 0.0), "sum_pi_squared")
    b, t = r.shape
    groups = _groups(b, r.device, group_size, group_ids, num_groups)
    g, p = groups.index, groups.num_groups
    ret = torch.where(m, r.double(), 0.0).flip(-1).cumsum(-1).flip(-1)
    w = (1 - 2 * old.double().exp() + s2.double()).clamp_min(0)  # ||e_y - pi||^2 >= 0; the clamp absorbs rounding
    if rho is not None:
        w = w * rho.double() ** 2
    cum_w = torch.where(m, w, 0.0).cumsum(-1)
    if align == "valid":  # compact each row: its k-th valid token goes to column k
        rows, cols = m.nonzero(as_tuple=True)
        k = (m.long().cumsum(-1) - 1)[rows, cols]
        rc = torch.zeros(b, t, dtype=torch.float64, device=r.device)
        wc = torch.zeros_like(rc)
        mc = torch.zeros_like(m)
        rc[rows, k], wc[rows, k], mc[rows, k] = ret[rows, cols], cum_w[rows, cols], True
    else:
        rc, wc, mc = ret, cum_w, m
    zeros = torch.zeros(p, t, dtype=torch.float64, device=r.device)
    idx = g.unsqueeze(-1).expand(b, t)
    n = zeros.index_add(0, g, mc.double())
    sum_w = zeros.index_add(0, g, torch.where(mc, wc, 0.0))
    hi = torch.full_like(zeros, -torch.inf).scatter_reduce(0, idx, torch.where(mc, rc, -torch.inf), "amax")
    lo = torch.full_like(zeros, torch.inf).scatter_reduce(0, idx, torch.where(mc, rc, torch.inf), "amin")
    mean = torch.where(hi == lo, hi, zeros.index_add(0, g, torch.where(mc, rc, 0.0)) / n.clamp_min(1))
    dev = zeros.index_add(0, g, torch.where(mc, (rc - mean[g]) * wc, 0.0))
    den = sum_w + eps
    base = mean + torch.where(den > 0, dev / torch.where(den > 0, den, 1.0), 0.0)
    members = torch.zeros(p, dtype=torch.float64, device=r.device).index_add_(0, g, m.any(-1).double())
    if singleton == "error" and p and bool((members == 1).any()):
        gi = int(torch.nonzero(members == 1)[0, 0])
        raise ValueError(f"group {gi} has a single row with valid tokens, so its baseline is undefined; pass "
                         "singleton='zero' (advantage 0) or singleton='raw' (advantage = return, verl's), "
                         "or fix the grouping")
    if zero_tail:
        base = torch.where((n == 1) & (members >= 2).unsqueeze(-1), 0.0, base)
    adv_c = rc - base[g]
    alone = (members[g] == 1).unsqueeze(-1)
    if singleton != "error":
        adv_c = torch.where(alone, rc if singleton == "raw" else 0.0, adv_c)
    if align == "valid":
        adv = torch.zeros_like(rc)
        adv[rows, cols] = adv_c[rows, k]
    else:
        adv = adv_c
    adv = torch.where(m, adv, 0.0)
    return AdvantagesReturns(adv.to(dtype), torch.where(m, ret, 0.0).to(dtype))
