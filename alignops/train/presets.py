"""Method presets: each method of the survey is (advantage estimator, per-token loss, aggregation)
plus a trainer data policy (docs/methods.md R5, §3.1). A preset sets TrainConfig fields; the command
line can still override any of them. Add a method by adding one entry to PRESETS (and, when its
advantage is new, one function to ADVANTAGES; when its loss is not a policy_loss method, one
Preset subclass overriding `loss`)."""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch

import alignops as ao
from alignops.train.rollout import concat_batches
from alignops.train.trainer import Prepared, normalizer_for, score_completions

# --------------------------------------------------------------------------------------------
# advantage estimators: (cfg, rollout, scorer, ctx) -> Prepared


def _prepared(rollout, advantages, **data) -> Prepared:
    return Prepared(rollout.batch, {"advantages": advantages, "scores": rollout.scores,
                                    "correct": rollout.correct, **data})


def _grpo_advantages(cfg, rollout, scorer, ctx):
    kw = {k: v for k, v in cfg.advantage_kwargs.items() if k in ("std_eps", "singleton")}
    return _prepared(rollout, ao.grpo_advantages(rollout.scores, group_size=cfg.num_generations,
                                                 scale=cfg.scale_rewards, **kw))


def _rloo_advantages(cfg, rollout, scorer, ctx):
    return _prepared(rollout, ao.rloo_advantages(rollout.scores, group_size=cfg.num_generations))


def _gpg_advantages(cfg, rollout, scorer, ctx):
    return _prepared(rollout, ao.gpg_advantages(rollout.scores, group_size=cfg.num_generations,
                                                **cfg.advantage_kwargs))


def _kl_in_reward(cfg, scorer, batch, ctx) -> dict:
    """k1(old, ref) per token for the token rewards (verl apply_kl_penalty), when configured."""
    if not cfg.kl_in_reward:
        return {}
    return {"old_logp": scorer.old_logp(batch), "ref_logp": scorer.ref_logp(batch), "kl_coef": ctx.kl_coef}


def _kl_metric(kw: dict, mask, kl=None) -> dict:
    """The in-reward k1's batch mean (the adaptive controller's input); `kl` when already computed."""
    if not kw:
        return {}
    kl = ao.k1_penalty(kw["old_logp"], kw["ref_logp"], mask) if kl is None else kl
    return {"kl": ao.masked_mean(kl, mask)}


def _reinforce_pp_advantages(cfg, rollout, scorer, ctx):
    b = rollout.batch
    kw = _kl_in_reward(cfg, scorer, b, ctx)
    prep = _prepared(rollout, ao.reinforce_pp_advantages(rollout.scores, b.completion_mask, gamma=cfg.gamma,
                                                         **kw).advantages)
    prep.metrics.update(_kl_metric(kw, b.completion_mask))
    return prep


def _reinforce_pp_baseline_advantages(cfg, rollout, scorer, ctx):
    b = rollout.batch
    kw = _kl_in_reward(cfg, scorer, b, ctx)
    out = ao.reinforce_pp_baseline_advantages(rollout.scores, b.completion_mask, group_size=cfg.num_generations, **kw)
    prep = _prepared(rollout, out.advantages)
    prep.metrics.update(_kl_metric(kw, b.completion_mask))
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
                            critic_lam=cfg.critic_lam, whiten=cfg.whiten_advantages)
    prep = _prepared(rollout, out.advantages, returns=out.returns)
    prep.metrics.update(_kl_metric(kw, mask, kl))
    if cfg.lam_alpha:
        prep.metrics["lam/mean"] = lam.mean()
    return prep


def _dler_advantages(cfg, rollout, scorer, ctx):
    b = rollout.batch
    return _prepared(rollout, ao.dler_advantages(rollout.scores, group_size=cfg.num_generations,
                                                 mask=b.completion_mask, truncated=b.truncated))


def _seed_grpo_advantages(cfg, rollout, scorer, ctx):
    """Semantic entropy from clustering each group's final answers (exact string match)."""
    from alignops.train.tasks import final_answer  # noqa: PLC0415

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
    from alignops.train.rollout import generate  # noqa: PLC0415

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
    from alignops.train import rewards as rw  # noqa: PLC0415

    kw = dict(cfg.advantage_kwargs)
    judge = rw.resolve(kw.pop("judge", "arithmetic_work"))
    r_rsn = torch.tensor([float(judge(ctx.task, p, t)) for p, t in zip(rollout.problems, rollout.texts)],
                         dtype=rollout.scores.dtype, device=rollout.scores.device)
    out = ao.awpo_advantages(rollout.scores, r_rsn, group_size=cfg.num_generations, **kw)
    prep = _prepared(rollout, out.advantages)
    eps = float(out.clip_eps)
    prep.loss_overrides = {"epsilon": eps, "epsilon_high": eps}
    prep.metrics.update({"awpo/clip_eps": eps, "awpo/gate_mean": out.gate.float().mean(),
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

    def side(x):
        mu, sd = x.mean(), x.std() if x.numel() > 1 else x.new_zeros(())
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


# --------------------------------------------------------------------------------------------
# presets


@dataclasses.dataclass
class Preset:
    name: str
    description: str
    config: dict = dataclasses.field(default_factory=dict)
    group_method: bool = True            # needs num_generations >= 2
    whole_groups: bool = False           # mini-batches must hold whole groups (GVPO)

    def validate(self, cfg) -> None:
        if cfg.advantage not in ADVANTAGES:
            raise ValueError(f"--advantage {cfg.advantage!r} is not one of {sorted(ADVANTAGES)}")
        if (self.group_method or cfg.dynamic_sampling or cfg.min_valid_group_fraction > 0) and cfg.num_generations < 2:
            raise ValueError(f"method {self.name!r} compares samples within a group: "
                             f"num_generations must be >= 2, got {cfg.num_generations}")
        if cfg.beta < 0 or cfg.entropy_coeff < 0 or cfg.nll_coef < 0:
            raise ValueError(f"beta, entropy_coeff and nll_coef must be >= 0, got {cfg.beta}, "
                             f"{cfg.entropy_coeff}, {cfg.nll_coef}")
        rows = cfg.num_prompts * cfg.num_generations
        if rows % (cfg.num_mini_batches * cfg.gradient_accumulation_steps):
            raise ValueError("num_prompts * num_generations must divide into num_mini_batches x "
                             "gradient_accumulation_steps micro-batches")
        if self.whole_groups and (rows // (cfg.num_mini_batches * cfg.gradient_accumulation_steps)) % cfg.num_generations:
            raise ValueError(f"method {self.name!r} needs whole groups in every micro-batch: num_prompts must be a "
                             "multiple of num_mini_batches x gradient_accumulation_steps")
        critic = cfg.advantage in CRITIC_ADVANTAGES
        for knob, on in (("value_pretrain_steps", cfg.value_pretrain_steps > 0), ("critic_lam", cfg.critic_lam is not None),
                         ("lam_alpha", cfg.lam_alpha is not None)):
            if on and not critic:
                raise ValueError(f"--{knob} needs a critic: use it with --advantage gae (ppo, vc_ppo, vapo, orz, "
                                 f"cppo_hit), not {cfg.advantage!r}")
        if cfg.kl_in_reward and cfg.advantage not in TOKEN_REWARD_ADVANTAGES:
            raise ValueError(f"--kl_in_reward puts the KL in token rewards, which --advantage {cfg.advantage!r} does "
                             f"not read; use one of {TOKEN_REWARD_ADVANTAGES} or the KL loss (--beta alone)")
        if cfg.dynamic_sampling and cfg.min_valid_group_fraction > 0:
            raise ValueError("dynamic_sampling and min_valid_group_fraction are two group-resampling policies; "
                             "choose one")
        if not 0.0 <= cfg.min_valid_group_fraction <= 1.0:
            raise ValueError(f"min_valid_group_fraction must lie in [0, 1], got {cfg.min_valid_group_fraction}")
        if cfg.kl_ctrl not in ("fixed", "adaptive"):
            raise ValueError(f"kl_ctrl must be 'fixed' or 'adaptive', got {cfg.kl_ctrl!r}")
        if cfg.overlong_buffer_len < 0 or cfg.overlong_buffer_len > cfg.max_completion_length:
            raise ValueError(f"overlong_buffer_len must lie in [0, max_completion_length="
                             f"{cfg.max_completion_length}], got {cfg.overlong_buffer_len}")
        if self.needs_reference(cfg) and cfg.ref_model in (None, "none"):
            raise ValueError(f"method {self.name!r} needs a reference model (beta={cfg.beta}, "
                             f"kl_in_reward={cfg.kl_in_reward}) but --ref_model is none")

    def needs_reference(self, cfg) -> bool:
        return cfg.beta > 0

    def needs_critic(self, cfg) -> bool:
        return cfg.advantage in CRITIC_ADVANTAGES

    def needs_old_logp(self, cfg) -> bool:
        return False

    def prepare(self, cfg, rollout, scorer, ctx) -> Prepared:
        """Data policy and advantages of one step."""
        return ADVANTAGES[cfg.advantage](cfg, rollout, scorer, ctx)

    def normalizers(self, cfg, data: dict) -> dict:
        """Denominators over one optimiser step (the whole mini-batch), shared by its micro-batches."""
        return {"pg": normalizer_for(cfg.loss_type, data["mask"], cfg.max_completion_length)}

    def loss_options(self, cfg, data, norms, overrides) -> dict:
        o = {k: overrides.get(k, getattr(cfg, k)) for k in ("epsilon", "epsilon_high")}
        return dict(method=cfg.loss_method, temperature=cfg.temperature, clip_low=o["epsilon"],
                    clip_high=o["epsilon_high"], clip_ratio_c=cfg.delta, ref_logp=data.get("ref_logp"),
                    kl_coef=0.0 if cfg.kl_in_reward else cfg.beta, kl_estimator=cfg.kl_estimator,
                    entropy_coef=cfg.entropy_coeff, agg=cfg.loss_type, normalizer=norms["pg"],
                    max_len=cfg.max_completion_length, **cfg.loss_kwargs)

    def loss(self, cfg, *, logits, data, norms, overrides):
        # compute_entropy: the entropy metric every step (TRL logs it); it comes from the same logits pass
        return ao.fused_policy_loss(logits, data["labels"], data.get("old_logp"), data["advantages"], data["mask"],
                                    backend=cfg.backend, compute_entropy=True,
                                    **self.loss_options(cfg, data, norms, overrides))

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        pass


def _policy_loss_from_logits(preset, cfg, logits, data, norms, overrides):
    """The two-pass path: fused token log-probs (with autograd), then policy_loss; used by losses
    that add a term of their own on the same log-probs."""
    opts = preset.loss_options(cfg, data, norms, overrides)
    temperature = opts.pop("temperature")
    logp, entropy = ao.token_logprobs(logits, data["labels"], temperature=temperature, return_entropy=True,
                                      backend=cfg.backend)
    out = ao.policy_loss(logp, data.get("old_logp"), data["advantages"], data["mask"], entropy=entropy, **opts)
    return logp, out


@dataclasses.dataclass
class VapoPreset(Preset):
    """PPO + mu * NLL over the correct completions (VAPO's positive-example LM loss), normalised
    by their token count over the mini-batch; no correct completion -> the term is 0."""

    def normalizers(self, cfg, data):
        norms = super().normalizers(cfg, data)
        norms["nll"] = (data["mask"] * data["correct"][:, None]).sum()
        return norms

    def loss(self, cfg, *, logits, data, norms, overrides):
        logp, out = _policy_loss_from_logits(self, cfg, logits, data, norms, overrides)
        if cfg.nll_coef == 0:
            return out
        pos = data["mask"] * data["correct"][:, None]
        nll = -(torch.where(pos > 0, logp, 0.0) * pos).sum() / norms["nll"].clamp_min(1)
        out.metrics["nll_loss"] = nll.detach()
        return ao.PolicyLossOutput(out.loss + cfg.nll_coef * nll, out.metrics)


@dataclasses.dataclass
class CppoHitPreset(Preset):
    """alpha_i-weighted PPO-clip + kr_coef * beta_i * (logp - logp_prev)^2 (token-mean), logp_prev
    from the previous task's policy: here the reference model (the SFT base)."""

    def needs_reference(self, cfg) -> bool:
        return True

    def loss(self, cfg, *, logits, data, norms, overrides):
        logp, out = _policy_loss_from_logits(self, cfg, logits, data, norms, overrides)
        m = data["mask"] > 0
        diff = torch.where(m, logp - data["ref_logp"], 0.0)
        kr = (data["kr_weight"][:, None] * diff.square()).sum() / norms["pg"].clamp_min(1)
        coef = float(cfg.loss_kwargs.get("kr_coef", 0.1))
        out.metrics["kr_loss"] = kr.detach()
        return ao.PolicyLossOutput(out.loss + coef * kr, out.metrics)

    def loss_options(self, cfg, data, norms, overrides):
        opts = super().loss_options(cfg, data, norms, overrides)
        opts.pop("kr_coef", None)
        return opts


@dataclasses.dataclass
class GvpoPreset(Preset):
    """GVPO: MSE between the group-centred implicit rewards beta (S - S_anchor) and the centred
    rewards; anchor = the rollout policy; mean over the mini-batch's groups."""

    whole_groups: bool = True

    def needs_old_logp(self, cfg) -> bool:
        return True

    def normalizers(self, cfg, data):
        return {"groups": torch.tensor(float(data["mask"].shape[0] // cfg.num_generations))}

    def loss(self, cfg, *, logits, data, norms, overrides):
        logp = ao.token_logprobs(logits, data["labels"], temperature=cfg.temperature, backend=cfg.backend)
        out = ao.gvpo_loss(logp, data["old_logp"], data["scores"], mask=data["mask"] > 0,
                           group_size=cfg.num_generations, beta=float(cfg.loss_kwargs.get("gvpo_beta", 0.1)),
                           normalizer=norms["groups"])
        return ao.PolicyLossOutput(out.loss, out.metrics)


@dataclasses.dataclass
class ReinforcePreset(Preset):
    """REINFORCE with an exponential-moving-average reward baseline (no groups needed)."""

    ema: float = 0.9
    baseline: float | None = None

    def prepare(self, cfg, rollout, scorer, ctx):
        b = float(rollout.scores.mean()) if self.baseline is None else self.baseline
        self.baseline = self.ema * b + (1 - self.ema) * float(rollout.scores.mean())
        prep = _prepared(rollout, rollout.scores - b)
        prep.metrics["baseline"] = b
        return prep

    def state(self) -> dict:
        return {"baseline": self.baseline}

    def load_state(self, state: dict) -> None:
        self.baseline = state.get("baseline")


_PPO_CRITIC = {"advantage": "gae", "gamma": 1.0, "lam": 0.95, "whiten_advantages": True, "cliprange_value": 0.2}

PRESETS: dict[str, Preset] = {p.name: p for p in [
    # --- critic-based
    Preset("ppo", "PPO: critic + GAE(1, 0.95) + whitening, clipped value loss, dual clip 3, k1 KL in the "
                  "reward with the adaptive controller",
           {**_PPO_CRITIC, "loss_method": "ppo", "loss_type": "token-mean", "delta": 3.0, "beta": 0.01,
            "kl_in_reward": True, "kl_ctrl": "adaptive", "kl_target": 0.05, "kl_horizon": 10000},
           group_method=False),
    Preset("vc_ppo", "VC-PPO: value pretraining, decoupled GAE (critic lambda 1, actor 0.95), clip-higher",
           {**_PPO_CRITIC, "critic_lam": 1.0, "value_pretrain_steps": 50, "loss_method": "ppo",
            "epsilon": 0.2, "epsilon_high": 0.28, "loss_type": "token-mean", "beta": 0.0}, group_method=False),
    VapoPreset("vapo", "VAPO: value pretraining, decoupled + length-adaptive GAE (alpha 0.05), clip-higher, "
                       "token-mean, + 0.1 NLL on correct completions",
               {**_PPO_CRITIC, "critic_lam": 1.0, "lam_alpha": 0.05, "value_pretrain_steps": 50,
                "loss_method": "ppo", "epsilon": 0.2, "epsilon_high": 0.28, "loss_type": "token-mean",
                "beta": 0.0, "nll_coef": 0.1}),
    Preset("orz", "Open-Reasoner-Zero: PPO with GAE(1, 1) + whitening, no KL, value clip 0.2, "
                  "seq-mean-token-mean", {**_PPO_CRITIC, "lam": 1.0, "loss_method": "ppo", "epsilon": 0.2,
                                          "loss_type": "seq-mean-token-mean", "beta": 0.0}, group_method=False),
    CppoHitPreset("cppo_hit", "CPPO (continual PPO): sample-typed alpha_i on the PPO surrogate and beta_i on a "
                              "(logp - logp_prev)^2 retention term (our weight table)",
                  {**_PPO_CRITIC, "advantage": "cppo_hit", "loss_method": "ppo", "loss_type": "token-mean",
                   "beta": 0.0}, group_method=False),
    # --- critic-free, REINFORCE family
    ReinforcePreset("reinforce", "REINFORCE with an EMA reward baseline, -A*logp, seq-mean-token-sum",
                    {"loss_method": "reinforce", "advantage": "grpo", "loss_type": "seq-mean-token-sum",
                     "beta": 0.0}, group_method=False),
    Preset("reinforce_pp", "REINFORCE++: k1 KL in the token rewards (0.01), returns, global whitening, PPO clip",
           {"loss_method": "ppo", "advantage": "reinforce_pp", "loss_type": "token-mean", "beta": 0.01,
            "kl_in_reward": True}, group_method=False),
    Preset("reinforce_pp_baseline", "REINFORCE++-baseline: group-mean baseline, global token whitening, PPO clip",
           {"loss_method": "ppo", "advantage": "reinforce_pp_baseline", "loss_type": "token-mean", "beta": 0.0}),
    Preset("remax", "ReMax: baseline = reward of the greedy decode, PPO clip (verl)",
           {"loss_method": "ppo", "advantage": "remax", "loss_type": "token-mean", "beta": 0.0}, group_method=False),
    Preset("rloo", "RLOO: leave-one-out baseline, token-level PPO clip",
           {"loss_method": "ppo", "advantage": "rloo", "loss_type": "token-mean", "beta": 0.0}),
    # --- GRPO family
    Preset("grpo", "GRPO (DeepSeekMath): group-normalised advantages, PPO clip, k3 KL loss, "
                   "sequence-mean of token-means",
           {"loss_method": "grpo", "advantage": "grpo", "scale_rewards": "group",
            "loss_type": "seq-mean-token-mean", "beta": 0.04}),
    Preset("dr_grpo", "Dr.GRPO: no std division, constant normaliser B x max_len, no KL",
           {"loss_method": "grpo", "advantage": "grpo", "scale_rewards": "none",
            "loss_type": "seq-mean-token-sum-norm", "beta": 0.0}),
    Preset("dapo", "DAPO: clip-higher 0.2/0.28, token-mean, no KL, dynamic sampling with refill, overlong shaping",
           {"loss_method": "grpo", "advantage": "grpo", "epsilon": 0.2, "epsilon_high": 0.28,
            "loss_type": "token-mean", "beta": 0.0, "dynamic_sampling": True, "max_num_gen_batches": 10,
            "overlong_buffer_len": 2, "overlong_penalty_factor": 1.0}),
    Preset("simplerl", "SimpleRL-Zoo: GRPO with low_var_kl 1e-3 and entropy bonus 1e-3, token-mean",
           {"loss_method": "grpo", "advantage": "grpo", "loss_type": "token-mean", "beta": 1e-3,
            "kl_estimator": "low_var_kl", "entropy_coeff": 1e-3}),
    Preset("gspo", "GSPO: sequence-level (geometric-mean) ratio clipped at 3e-4/4e-4",
           {"loss_method": "gspo", "advantage": "grpo", "epsilon": 3e-4, "epsilon_high": 4e-4,
            "loss_type": "seq-mean-token-mean", "beta": 0.0}),
    Preset("gpg", "GPG: plain policy gradient with alpha-corrected group advantages, token-mean, threshold "
                  "resampling beta_th 0.6",
           {"loss_method": "gpg", "advantage": "gpg", "loss_type": "token-mean", "beta": 0.0,
            "min_valid_group_fraction": 0.6, "max_num_gen_batches": 3}),
    Preset("gppo", "GPPO: gradient-preserving clip (beta1 = beta2 = 1), 0.2/0.28, token-mean",
           {"loss_method": "gppo", "advantage": "grpo", "epsilon": 0.2, "epsilon_high": 0.28,
            "loss_type": "token-mean", "beta": 0.0}),
    Preset("cispo", "CISPO: REINFORCE weighted by the clipped, detached IS ratio (verl: high 0.2, no low)",
           {"loss_method": "cispo", "advantage": "grpo", "epsilon": 1.0, "epsilon_high": 0.2,
            "loss_type": "token-mean", "beta": 0.0}),
    Preset("ecpo", "ECPO: early-clipped old policy for negative advantages (delta 0.1)",
           {"loss_method": "ecpo", "advantage": "grpo", "loss_type": "seq-mean-token-mean", "beta": 0.0}),
    Preset("bapo", "BAPO: adaptive clipping bounds searched per update (paper mode)",
           {"loss_method": "bapo", "advantage": "grpo", "loss_type": "token-mean", "beta": 0.0}),
    Preset("cppo_xmu", "CPPO (completion pruning): GRPO advantages on the full group, keep the top half by |A|, "
                       "refill with more prompts",
           {"loss_method": "grpo", "advantage": "cppo_xmu", "loss_type": "seq-mean-token-mean", "beta": 0.04,
            "advantage_kwargs": {"pruning_rate": 0.5}, "max_num_gen_batches": 4}),
    Preset("seed_grpo", "SEED-GRPO: Dr.GRPO advantage scaled by 1 - alpha*SE/log G (answers clustered by "
                        "exact match; alpha 0.5 is ours)",
           {"loss_method": "grpo", "advantage": "seed_grpo", "loss_type": "token-mean", "beta": 0.0}),
    GvpoPreset("gvpo", "GVPO: group MSE between centred implicit rewards beta(S - S_old) and centred rewards, "
                       "beta 0.1", {"loss_method": "grpo", "advantage": "grpo", "scale_rewards": "none",
                                    "beta": 0.0, "loss_kwargs": {"gvpo_beta": 0.1}}),
    Preset("awpo", "AWPO: outcome advantages mixed with a judge's reasoning reward (rule-based arithmetic_work) "
                   "through the variance gate; clip radius from the gate",
           {"loss_method": "ppo", "advantage": "awpo", "loss_type": "token-mean", "beta": 0.0}),
    Preset("dler", "DLER: truncation reward 0, group-centred + batch-normalised advantages, clip-higher 0.28, "
                   "dynamic sampling",
           {"loss_method": "ppo", "advantage": "dler", "epsilon": 0.2, "epsilon_high": 0.28,
            "loss_type": "token-mean", "beta": 0.0, "truncation_reward": 0.0, "dynamic_sampling": True,
            "max_num_gen_batches": 10}),
]}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def make_config(method: str, overrides: dict | None = None):
    from alignops.train.config import TrainConfig, apply_overrides  # noqa: PLC0415

    preset = get_preset(method)
    cfg = TrainConfig(method=method)
    apply_overrides(cfg, {k: (dict(v) if isinstance(v, dict) else v) for k, v in preset.config.items()})
    apply_overrides(cfg, dict(overrides or {}))
    return cfg
