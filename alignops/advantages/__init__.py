"""Advantage estimators and normalisation: rewards in, detached advantages out.

One file a family: group.py (group statistics and the estimators built on them: GRPO, RLOO,
GVPO, GPG, SEED-GRPO, ReMax, OPO, GRPO pass@k, semantic entropy), token.py (masked statistics and
whitening, GAE, VAPO's lambda, k1 KL-in-reward, token rewards, REINFORCE++, the optimal token
baseline), shaping.py (DLER, AWPO, GDPO, DAPO's overlong penalty and dynamic sampling), kl_control.py
(the KL controllers); _common.py holds the argument handling they share. Everything public is
re-exported here.

Every estimator follows docs/methods.md (section 00 wins): group std unbiased with eps outside the root
(default 1e-6); a group whose scorable rewards are all equal gets advantage exactly 0; singleton
groups raise unless `singleton="zero"|"raw"`; NaN rewards are left out of every statistic and get
advantage 0; whitening is token-weighted with verl semantics by default (unbiased variance,
var_eps=1e-8 inside the rsqrt) and OpenRLHF's (`var="biased"`, `var_eps_mode="floor"`) on request;
N <= 1 valid tokens centres without scaling.

Layouts: rewards are `[B]` with `group_size=G` (consecutive rows) or `group_ids=[B]` (any
integers; groups are numbered by sorted id, or pass `num_groups=P` with ids in [0, P) to skip the
torch.unique, which synchronises on CUDA). Token-level tensors are `[B, T]` with a mask, or packed
`[N]` with `cu_seqlens=[B+1]` (and an optional `[N]` mask).

Distributed: every function that reduces over the batch takes `process_group` and makes one
collective per call, so every rank gets the global statistics: variances gather each rank's
(count, mean, M2) and merge them through the deviations of the means (a (sum, sum of squares,
count) all-reduce cancels all digits for data like 1000 +- 1e-3); counts are all-reduced.
Group statistics are never reduced: each group must live entirely on one rank.

Outputs are float32 (float64 for float64 inputs), whatever the input precision (R3).

Kernel contract (torch, cpu and triton backends implement it; alignops._backend's registry):

    group_advantages(rewards, order, offsets, mode, std_eps, singleton_raw, adv, count, mean, std)
        rewards [B] fp32/fp64 contiguous, NaN = unscorable; order [B] int64, offsets [P+1] int64:
        the rows of group g are rewards[order[offsets[g]:offsets[g+1]]].
        count/mean/std [P] (rewards' dtype): number of non-NaN rewards, their mean (0 if none),
        their unbiased std, exactly 0 when they are all equal or fewer than two.
        adv [B]: mode 0: R - mean; 1: (R - mean) / (std + std_eps); 2: k/(k-1) (R - mean) (RLOO).
        Exactly 0 for NaN rows and for groups whose std is 0; for a group with one scorable
        reward: R if singleton_raw else 0. Statistics accumulate in float64.
    masked_moments(x, mask, out)
        x [N] fp32/fp64, mask [N] bool, out [3] float64 = (count, mean, M2) over mask, M2 the sum
        of squared deviations from the mean, computed from deviations (never sum of squares).
        Masked-out entries never reach the arithmetic (they may hold NaN).
    whiten_apply(x, mask, stats, shift_back, out)
        stats [2] float64 = (mean, inv_std); out = (x - mean) * inv_std (+ mean if shift_back)
        where mask, 0 elsewhere; arithmetic in float64.
    gae_scan(rewards, values, mask, cu_seqlens, gamma, lam_actor, lam_critic, adv, ret)
        rows [cu_seqlens[b], cu_seqlens[b+1]) of flat [N] tensors; lam_* [B] in rewards' dtype.
        Scans each row backwards over masked-in positions only (masked positions are transparent:
        their reward and value are not read and the recurrence carries across them):
        delta_t = r_t + gamma V_next(t) - V_t, A_t = delta_t + gamma lam A_next(t);
        adv = A with lam_actor; ret = A with lam_critic + V. Both 0 at masked positions.
"""

from __future__ import annotations

from alignops.advantages._common import _resolve  # noqa: F401 - the advantage ops' backend choice
from alignops.advantages.group import (GroupAdvantages, GroupStats, gpg_advantages, group_stats,
                                       grpo_advantages, grpo_passk_advantages, gvpo_centered_rewards,
                                       opo_advantages, remax_advantages, rloo_advantages, seed_grpo_advantages,
                                       semantic_entropy)
from alignops.advantages.kl_control import AdaptiveKLController, FixedKLController
from alignops.advantages.shaping import (AWPOAdvantages, DynamicSampling, awpo_advantages,
                                         dapo_overlong_penalty, dler_advantages, dynamic_sampling_mask,
                                         gdpo_advantages)
from alignops.advantages.token import (AdvantagesReturns, gae_advantages, k1_penalty, kl_penalized_scores,
                                       masked_mean, masked_var, masked_whiten, optimal_token_baseline_advantages,
                                       reinforce_pp_advantages, reinforce_pp_baseline_advantages,
                                       token_level_rewards, vapo_lambda)

__all__ = [
    "GroupStats", "GroupAdvantages", "AdvantagesReturns", "AWPOAdvantages", "DynamicSampling",
    "group_stats", "grpo_advantages", "rloo_advantages", "gvpo_centered_rewards", "gpg_advantages",
    "seed_grpo_advantages", "semantic_entropy", "dynamic_sampling_mask", "remax_advantages",
    "masked_mean", "masked_var", "masked_whiten", "gae_advantages", "vapo_lambda", "k1_penalty",
    "token_level_rewards", "kl_penalized_scores", "reinforce_pp_advantages",
    "reinforce_pp_baseline_advantages", "dler_advantages", "awpo_advantages", "dapo_overlong_penalty",
    "opo_advantages", "grpo_passk_advantages", "gdpo_advantages", "optimal_token_baseline_advantages",
    "FixedKLController", "AdaptiveKLController",
]
