"""The advantage estimators of the trainer, one per `--advantage` name: each turns a step's rollout
into what the update reads (advantages [B] or [B, T], value targets, extra per-row data, per-step
loss overrides and metrics) through alignops' estimators. Some also apply a method's data policy
(CPPO's completion pruning) or keep a running state across steps (REINFORCE's EMA baseline)."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

import alignops as ao
from alignops.train import rewards as rw
from alignops.train.rollout import Batch, concat_batches, generate, score_completions
from alignops.train.tasks import final_answer
from alignops.train.tokenizer import CharTokenizer


@dataclasses.dataclass
class Prepared:
    """What an estimator hands the update: the batch, per-row data sliced with each micro-batch
    (advantages [B] or [B, T], returns, ...), per-step loss overrides and metrics."""

    batch: Batch
    data: dict
    loss_overrides: dict = dataclasses.field(default_factory=dict)
    metrics: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Context:
    """What an estimator may use besides the rollout: the models, the task, the current in-reward
    KL coefficient, more rollouts (CPPO's refill), the run's reward functions (ReMax's baseline)
    the run's estimator state (saved with every checkpoint) and the ranks' process group."""

    policy: torch.nn.Module
    tok: CharTokenizer
    task: object
    kl_coef: float
    sample_more: object
    reward_model: object = dataclasses.field(default_factory=lambda: rw.RewardModel("accuracy"))
    state: dict = dataclasses.field(default_factory=dict)
    process_group: object = None  # under DDP: batch statistics are the global batch's (ddp.Ranks.group)


def compute_advantages(cfg, rollout, scorer, ctx: Context) -> Prepared:
    """The step's advantages from the estimator cfg.advantage names."""
    return ADVANTAGES[cfg.advantage](cfg, rollout, scorer, ctx)


def needs_critic(cfg) -> bool:
    return cfg.advantage in CRITIC_ADVANTAGES


# --------------------------------------------------------------------------------------------
# the estimators: (cfg, rollout, scorer, ctx) -> Prepared


def _prepared(rollout, advantages, **data) -> Prepared:
    return Prepared(rollout.batch, {"advantages": advantages, "scores": rollout.scores,
                                    "correct": rollout.correct, **data})


def _grpo_advantages(cfg, rollout, scorer, ctx):
    kw = {k: v for k, v in cfg.advantage_kwargs.items() if k in ("std_eps", "singleton")}
    return _prepared(rollout, ao.grpo_advantages(rollout.scores, group_size=cfg.num_generations,
                                                 scale=cfg.scale_rewards, process_group=ctx.process_group, **kw))


def _ema_baseline_advantages(cfg, rollout, scorer, ctx):
    """REINFORCE's baseline: an exponential moving average of the mean score over earlier steps
    (`ema` in advantage_kwargs, default 0.9; the first step's baseline is its own mean), kept in
    the run's state; no groups needed."""
    ema = float(cfg.advantage_kwargs.get("ema", 0.9))
    mean = float(ao.masked_mean(rollout.scores, process_group=ctx.process_group))
    b = ctx.state.get("baseline")
    b = mean if b is None else b
    ctx.state["baseline"] = ema * b + (1 - ema) * mean
    prep = _prepared(rollout, rollout.scores - b)
    prep.metrics["baseline"] = b
    return prep


def _rloo_advantages(cfg, rollout, scorer, ctx):
    return _prepared(rollout, ao.rloo_advantages(rollout.scores, group_size=cfg.num_generations))


def _gpg_advantages(cfg, rollout, scorer, ctx):
    return _prepared(rollout, ao.gpg_advantages(rollout.scores, group_size=cfg.num_generations,
                                                process_group=ctx.process_group, **cfg.advantage_kwargs))


def _kl_in_reward(cfg, scorer, batch, ctx) -> dict:
    """k1(old, ref) per token for the token rewards (verl apply_kl_penalty), when configured."""
    if not cfg.kl_in_reward:
        return {}
    return {"old_logp": scorer.old_logp(batch), "ref_logp": scorer.ref_logp(batch), "kl_coef": ctx.kl_coef}


def _kl_metric(kw: dict, mask, kl=None, process_group=None) -> dict:
    """The in-reward k1's batch mean (the adaptive controller's input, so the global batch's under
    DDP); `kl` when already computed."""
    if not kw:
        return {}
    kl = ao.k1_penalty(kw["old_logp"], kw["ref_logp"], mask) if kl is None else kl
    return {"kl": ao.masked_mean(kl, mask, process_group=process_group)}


def _reinforce_pp_advantages(cfg, rollout, scorer, ctx):
    b = rollout.batch
    kw = _kl_in_reward(cfg, scorer, b, ctx)
    prep = _prepared(rollout, ao.reinforce_pp_advantages(rollout.scores, b.completion_mask, gamma=cfg.gamma,
                                                         process_group=ctx.process_group, **kw).advantages)
    prep.metrics.update(_kl_metric(kw, b.completion_mask, process_group=ctx.process_group))
    return prep


def _reinforce_pp_baseline_advantages(cfg, rollout, scorer, ctx):
    b = rollout.batch
    kw = _kl_in_reward(cfg, scorer, b, ctx)
    out = ao.reinforce_pp_baseline_advantages(rollout.scores, b.completion_mask, group_size=cfg.num_generations,
                                              process_group=ctx.process_group, **kw)
    prep = _prepared(rollout, out.advantages)
    prep.metrics.update(_kl_metric(kw, b.completion_mask, process_group=ctx.process_group))
    return prep


def _gae_advantages(cfg, rollout, scorer, ctx):
    """PPO family: token rewards (score on the last token, - beta k1 when KL is in the reward), GAE
    on the critic's values (decoupled lambdas and VAPO's length-adaptive lambda when set), then
    whitening over the batch; the value targets are the returns before whitening."""
    b = rollout.batch
    mask = b.completion_mask
    kw = _kl_in_reward(cfg, scorer, b, ctx)
    kl = ao.k1_penalty(kw["old_logp"], kw["ref_logp"], mask) if kw else None
    token_rewards = ao.token_level_rewards(rollout.scores, mask, kl=kl, kl_coef=ctx.kl_coef if kw else 0.0)
    lam = ao.vapo_lambda(b.lengths, cfg.lam_alpha) if cfg.lam_alpha else cfg.lam
    out = ao.gae_advantages(token_rewards, scorer.values(b), mask, gamma=cfg.gamma, lam=lam,
                            critic_lam=cfg.critic_lam, whiten=cfg.whiten_advantages, process_group=ctx.process_group)
    prep = _prepared(rollout, out.advantages, returns=out.returns)
    prep.metrics.update(_kl_metric(kw, mask, kl, ctx.process_group))
    if cfg.lam_alpha:
        prep.metrics["lam/mean"] = lam.mean()
    return prep


def _dler_advantages(cfg, rollout, scorer, ctx):
    b = rollout.batch
    return _prepared(rollout, ao.dler_advantages(rollout.scores, group_size=cfg.num_generations,
                                                 mask=b.completion_mask, truncated=b.truncated,
                                                 process_group=ctx.process_group))


def _seed_grpo_advantages(cfg, rollout, scorer, ctx):
    """Semantic entropy from clustering each group's final answers (exact string match)."""
    ids, table = [], {}
    for i, t in enumerate(rollout.texts):
        ids.append(table.setdefault((i // cfg.num_generations, final_answer(t)), len(table)))
    se = ao.semantic_entropy(torch.tensor(ids), group_size=cfg.num_generations)
    alpha = cfg.advantage_kwargs.get("alpha", 0.5)
    adv = ao.seed_grpo_advantages(rollout.scores, se.to(rollout.scores.device), group_size=cfg.num_generations,
                                  alpha=alpha)
    prep = _prepared(rollout, adv)
    prep.metrics["semantic_entropy"] = se.float().mean()
    return prep


def _remax_advantages(cfg, rollout, scorer, ctx):
    """Baseline: the reward of the greedy decode of the same prompt (one extra decode per prompt)."""
    G = cfg.num_generations
    prompts = rollout.problems[::G]
    greedy = generate(ctx.policy, [ctx.tok.encode(p.prompt, bos=True) for p in prompts],
                      max_new_tokens=cfg.max_completion_length, eos_id=ctx.tok.eos_token_id,
                      pad_id=ctx.tok.pad_token_id, temperature=0.0)
    texts = [ctx.tok.decode(ids) for ids in greedy.completion_ids]
    greedy_r, _, _ = score_completions(cfg, ctx.task, ctx.reward_model, prompts, texts, greedy.truncated)
    return _prepared(rollout, ao.remax_advantages(rollout.scores, greedy_r.repeat_interleave(G).to(rollout.scores.device)))


def _awpo_advantages(cfg, rollout, scorer, ctx):
    """AWPO: outcome reward = the run's reward; reasoning reward from a judge (`judge` in
    advantage_kwargs: a reward-function name; the built-in rule-based `arithmetic_work` grades the
    shown work); the clip radius of this step comes from the gate (awpo_advantages)."""
    kw = dict(cfg.advantage_kwargs)
    judge = rw.resolve(kw.pop("judge", "arithmetic_work"))
    r_rsn = torch.tensor([float(judge(ctx.task, p, t)) for p, t in zip(rollout.problems, rollout.texts)],
                         dtype=rollout.scores.dtype, device=rollout.scores.device)
    out = ao.awpo_advantages(rollout.scores, r_rsn, group_size=cfg.num_generations,
                             process_group=ctx.process_group, **kw)
    prep = _prepared(rollout, out.advantages)
    eps = float(out.clip_low)
    prep.loss_overrides = {"epsilon": eps, "epsilon_high": eps}
    prep.metrics.update({"awpo/clip_low": eps, "awpo/gate_mean": out.gate.float().mean(),
                         "awpo/reasoning_reward": r_rsn.mean()})
    return prep


def _cppo_xmu_advantages(cfg, rollout, scorer, ctx):
    """CPPO (completion pruning): GRPO advantages on the full group, keep the k = ceil(G(1-P))
    completions of largest |A| per group (stable: ties keep the earlier row), drop zero-variance
    groups, and refill with more prompts' completions until num_prompts x k rows (or
    max_num_gen_batches rounds)."""
    G = cfg.num_generations
    P = float(cfg.advantage_kwargs.get("pruning_rate", 0.5))
    if not 0.0 <= P < 1.0:
        raise ValueError(f"pruning_rate must lie in [0, 1), got {P}")
    k = max(1, math.ceil(G * (1 - P)))
    target = cfg.num_prompts * k
    parts, kept, rounds = [], 0, 0
    while True:
        rounds += 1
        adv = ao.grpo_advantages(rollout.scores, group_size=G, scale=cfg.scale_rewards)
        a = adv.view(-1, G).abs()
        order = torch.sort(-a, dim=-1, stable=True).indices[:, :k]
        live = a.amax(-1) > 0
        rows = (order + torch.arange(a.shape[0], device=a.device)[:, None] * G)[live].reshape(-1)
        parts.append((rollout.select(rows), adv[rows]))
        kept += rows.numel()
        if kept >= target or (0 < cfg.max_num_gen_batches <= rounds):
            break
        rollout = ctx.sample_more()
    sel = [r for r, _ in parts]
    batch = concat_batches([r.batch for r in sel], ctx.tok.pad_token_id)
    n = min(kept, target)
    data = {"advantages": torch.cat([a for _, a in parts])[:n], "scores": torch.cat([r.scores for r in sel])[:n],
            "correct": torch.cat([r.correct for r in sel])[:n]}
    return Prepared(batch.select(torch.arange(n)), data,
                    metrics={"cppo/kept_rows": n, "cppo/gen_rounds": rounds})


def _cppo_hit_advantages(cfg, rollout, scorer, ctx):
    """CPPO (continual PPO): GAE advantages as PPO, then per-sample weights from sample typing:
    each rollout is typed by its reward R and generation probability P (mean token prob under the
    rollout policy) against batch mean +- k std. The (alpha, beta) table is ours (the paper's is
    unverified, docs/methods.md 2.12): high-performance (R+, P+) -> (1, ub): retain; overfitting
    (R-, P+) and high-variance (R+, P-) -> (ub, lb): learn; noisy (R-, P-) -> (lb, lb); normal (1, 1).
    alpha scales the advantage (the clipped surrogate is linear in A for alpha >= 0); beta weighs
    the knowledge-retention term (logp - logp_prev)^2 against the previous policy (the reference)."""
    prep = _gae_advantages(cfg, rollout, scorer, ctx)
    kw = cfg.advantage_kwargs
    k, lb, ub = float(kw.get("k", 0.5)), float(kw.get("lb", 0.5)), float(kw.get("ub", 1.5))
    b = rollout.batch
    R = rollout.scores.double()
    # the sampler's recorded log-probs: the rollout policy's, without another forward pass
    P = ((b.behaviour_logp.double() * b.completion_mask).sum(-1) / b.lengths.clamp_min(1)).exp()

    def side(x):  # the global batch's mean and (unbiased) std under DDP
        mu = ao.masked_mean(x, process_group=ctx.process_group)
        var = ao.masked_var(x, process_group=ctx.process_group)
        sd = var.clamp_min(0).sqrt()
        return (x > mu + k * sd), (x < mu - k * sd)

    r_hi, r_lo = side(R)
    p_hi, p_lo = side(P)
    alpha, beta = torch.ones_like(R), torch.ones_like(R)
    for cond, (a, bt) in (((r_hi & p_hi), (1.0, ub)), ((r_lo & p_hi), (ub, lb)), ((r_hi & p_lo), (ub, lb)),
                          ((r_lo & p_lo), (lb, lb))):
        alpha = torch.where(cond, a, alpha)
        beta = torch.where(cond, bt, beta)
    adv = prep.data["advantages"]
    prep.data["advantages"] = adv * alpha.to(adv.dtype)[:, None]
    prep.data["kr_weight"] = beta.float()
    prep.metrics.update({"cppo/alpha_mean": alpha.mean(), "cppo/beta_mean": beta.mean()})
    return prep


ADVANTAGES: dict[str, Callable] = {
    "grpo": _grpo_advantages,
    "rloo": _rloo_advantages,
    "ema_baseline": _ema_baseline_advantages,
    "gpg": _gpg_advantages,
    "gae": _gae_advantages,
    "reinforce_pp": _reinforce_pp_advantages,
    "reinforce_pp_baseline": _reinforce_pp_baseline_advantages,
    "dler": _dler_advantages,
    "seed_grpo": _seed_grpo_advantages,
    "remax": _remax_advantages,
    "awpo": _awpo_advantages,
    "cppo_xmu": _cppo_xmu_advantages,
    "cppo_hit": _cppo_hit_advantages,
}
CRITIC_ADVANTAGES = ("gae", "cppo_hit")
TOKEN_REWARD_ADVANTAGES = CRITIC_ADVANTAGES + ("reinforce_pp", "reinforce_pp_baseline")
