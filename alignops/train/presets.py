"""Method presets: each method of the survey is (advantage estimator, per-token loss, aggregation)
plus a trainer data policy (METHODS.md R5, §3.1). A preset sets TrainConfig fields; the command
line can still override any of them. Add a method by adding one entry to PRESETS."""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

import alignops as ao


def _grpo_advantages(cfg, rewards, **_):
    return ao.grpo_advantages(rewards, group_size=cfg.num_generations, scale=cfg.scale_rewards,
                              **cfg.advantage_kwargs)


def _rloo_advantages(cfg, rewards, **_):
    return ao.rloo_advantages(rewards, group_size=cfg.num_generations)


def _gpg_advantages(cfg, rewards, **_):
    return ao.gpg_advantages(rewards, group_size=cfg.num_generations, **cfg.advantage_kwargs)


def _reinforce_pp_baseline_advantages(cfg, rewards, batch, **_):
    out = ao.reinforce_pp_baseline_advantages(rewards, batch.completion_mask, group_size=cfg.num_generations)
    return out.advantages


def _dler_advantages(cfg, rewards, batch, **_):
    # DLER's truncation penalty: a response that hits the length budget scores 0 (METHODS.md §00.13).
    rewards = torch.where(batch.truncated, torch.zeros_like(rewards), rewards)
    return ao.dler_advantages(rewards, group_size=cfg.num_generations, mask=batch.completion_mask,
                              truncated=batch.truncated)


def _seed_grpo_advantages(cfg, rewards, group, texts, **_):
    """Semantic entropy from clustering each group's final answers (exact string match)."""
    from alignops.train.tasks import final_answer  # noqa: PLC0415

    ids, table = [], {}
    for i, t in enumerate(texts):
        ids.append(table.setdefault((i // cfg.num_generations, final_answer(t)), len(table)))
    se = ao.semantic_entropy(torch.tensor(ids), group_size=cfg.num_generations)
    alpha = cfg.advantage_kwargs.get("alpha", 0.5)
    return ao.seed_grpo_advantages(rewards, se, group_size=cfg.num_generations, alpha=alpha)


def _remax_advantages(cfg, rewards, group, policy, tok, task, **_):
    """Baseline: the reward of the greedy decode of the same prompt (one extra decode per prompt)."""
    from alignops.train.rollout import generate  # noqa: PLC0415

    G = cfg.num_generations
    prompts = group[::G]
    greedy = generate(policy, [tok.encode(p.prompt, bos=True) for p in prompts],
                      max_new_tokens=cfg.max_completion_length, eos_id=tok.eos_token_id,
                      pad_id=tok.pad_token_id, temperature=0.0)
    greedy_r = torch.tensor([task.reward(p, tok.decode(ids)) for p, ids in zip(prompts, greedy.completion_ids)])
    return ao.remax_advantages(rewards, greedy_r.repeat_interleave(G).to(rewards.device))


ADVANTAGES: dict[str, Callable] = {
    "grpo": _grpo_advantages,
    "rloo": _rloo_advantages,
    "gpg": _gpg_advantages,
    "reinforce_pp_baseline": _reinforce_pp_baseline_advantages,
    "dler": _dler_advantages,
    "seed_grpo": _seed_grpo_advantages,
    "remax": _remax_advantages,
}


@dataclasses.dataclass
class Preset:
    name: str
    description: str
    config: dict = dataclasses.field(default_factory=dict)
    group_method: bool = True            # needs num_generations >= 2

    def validate(self, cfg) -> None:
        if cfg.advantage not in ADVANTAGES:
            raise ValueError(f"--advantage {cfg.advantage!r} is not one of {sorted(ADVANTAGES)}")
        if self.group_method and cfg.num_generations < 2:
            raise ValueError(f"method {self.name!r} compares samples within a group: "
                             f"num_generations must be >= 2, got {cfg.num_generations}")
        if cfg.beta < 0 or cfg.entropy_coeff < 0:
            raise ValueError(f"beta and entropy_coeff must be >= 0, got {cfg.beta} and {cfg.entropy_coeff}")
        if cfg.num_prompts * cfg.num_generations % (cfg.num_mini_batches * cfg.gradient_accumulation_steps):
            raise ValueError("num_prompts * num_generations must divide into num_mini_batches x "
                             "gradient_accumulation_steps micro-batches")

    def needs_reference(self, cfg) -> bool:
        return cfg.beta > 0

    def prepare(self, cfg, batch, rewards, **ctx):
        """Data policy and advantages. Returns (batch, rewards, advantages, extra metrics)."""
        adv = ADVANTAGES[cfg.advantage](cfg, rewards, batch=batch, **ctx)
        adv = adv[0] if isinstance(adv, tuple) else getattr(adv, "advantages", adv)
        return batch, rewards, adv, {}

    def loss(self, cfg, *, logits, labels, old_logp, advantages, mask, ref_logp, normalizer):
        return ao.fused_policy_loss(
            logits, labels, old_logp, advantages, mask, method=cfg.loss_method,
            temperature=cfg.temperature, clip_low=cfg.epsilon, clip_high=cfg.epsilon_high,
            clip_ratio_c=cfg.delta, ref_logp=ref_logp, kl_coef=cfg.beta,
            kl_estimator=cfg.kl_estimator, entropy_coef=cfg.entropy_coeff, agg=cfg.loss_type,
            normalizer=normalizer, max_len=cfg.max_completion_length, backend=cfg.backend,
            **cfg.loss_kwargs)

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        pass


@dataclasses.dataclass
class ReinforcePreset(Preset):
    """REINFORCE with an exponential-moving-average reward baseline (no groups needed)."""

    ema: float = 0.9
    baseline: float | None = None

    def prepare(self, cfg, batch, rewards, **ctx):
        b = float(rewards.mean()) if self.baseline is None else self.baseline
        adv = rewards - b
        self.baseline = self.ema * b + (1 - self.ema) * float(rewards.mean())
        return batch, rewards, adv, {"baseline": b}

    def state(self) -> dict:
        return {"baseline": self.baseline}

    def load_state(self, state: dict) -> None:
        self.baseline = state.get("baseline")


PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("grpo", "GRPO (DeepSeekMath): group-normalised advantages, PPO clip, k3 KL loss, "
                   "sequence-mean of token-means",
           {"loss_method": "grpo", "advantage": "grpo", "scale_rewards": "group",
            "loss_type": "seq-mean-token-mean", "beta": 0.04}),
    Preset("dr_grpo", "Dr.GRPO: no std division, constant normaliser B x max_len, no KL",
           {"loss_method": "grpo", "advantage": "grpo", "scale_rewards": "none",
            "loss_type": "seq-mean-token-sum-norm", "beta": 0.0}),
    Preset("dapo", "DAPO: clip-higher 0.2/0.28, token-mean, no KL",
           {"loss_method": "grpo", "advantage": "grpo", "epsilon": 0.2, "epsilon_high": 0.28,
            "loss_type": "token-mean", "beta": 0.0}),
    Preset("simplerl", "SimpleRL-Zoo: GRPO with low_var_kl 1e-3 and entropy bonus 1e-3, token-mean",
           {"loss_method": "grpo", "advantage": "grpo", "loss_type": "token-mean", "beta": 1e-3,
            "kl_estimator": "low_var_kl", "entropy_coeff": 1e-3}),
    Preset("gspo", "GSPO: sequence-level (geometric-mean) ratio clipped at 3e-4/4e-4",
           {"loss_method": "gspo", "advantage": "grpo", "epsilon": 3e-4, "epsilon_high": 4e-4,
            "loss_type": "seq-mean-token-mean", "beta": 0.0}),
    Preset("cispo", "CISPO: REINFORCE weighted by the clipped, detached IS ratio (verl: high 0.2, no low)",
           {"loss_method": "cispo", "advantage": "grpo", "epsilon": 1.0, "epsilon_high": 0.2,
            "loss_type": "token-mean", "beta": 0.0}),
    Preset("gppo", "GPPO: gradient-preserving clip (beta1 = beta2 = 1), 0.2/0.28, token-mean",
           {"loss_method": "gppo", "advantage": "grpo", "epsilon": 0.2, "epsilon_high": 0.28,
            "loss_type": "token-mean", "beta": 0.0}),
    Preset("ecpo", "ECPO: early-clipped old policy for negative advantages (delta 0.1)",
           {"loss_method": "ecpo", "advantage": "grpo", "loss_type": "seq-mean-token-mean", "beta": 0.0}),
    Preset("bapo", "BAPO: adaptive clipping bounds searched per update (paper mode)",
           {"loss_method": "bapo", "advantage": "grpo", "loss_type": "token-mean", "beta": 0.0}),
    Preset("gpg", "GPG: plain policy gradient with alpha-corrected group advantages, token-mean",
           {"loss_method": "gpg", "advantage": "gpg", "loss_type": "token-mean", "beta": 0.0}),
    Preset("rloo", "RLOO: leave-one-out baseline, token-level PPO clip",
           {"loss_method": "ppo", "advantage": "rloo", "loss_type": "token-mean", "beta": 0.0}),
    ReinforcePreset("reinforce", "REINFORCE with an EMA reward baseline, -A*logp, seq-mean-token-sum",
                    {"loss_method": "reinforce", "advantage": "grpo", "loss_type": "seq-mean-token-sum",
                     "beta": 0.0}, group_method=False),
    Preset("reinforce_pp_baseline", "REINFORCE++-baseline: group-mean baseline, global token whitening, PPO clip",
           {"loss_method": "ppo", "advantage": "reinforce_pp_baseline", "loss_type": "token-mean", "beta": 0.0}),
    Preset("remax", "ReMax: baseline = reward of the greedy decode, PPO clip (verl)",
           {"loss_method": "ppo", "advantage": "remax", "loss_type": "token-mean", "beta": 0.0}, group_method=False),
    Preset("dler", "DLER: truncation reward 0, group-centred + batch-normalised advantages, clip-higher 0.28",
           {"loss_method": "ppo", "advantage": "dler", "epsilon": 0.2, "epsilon_high": 0.28,
            "loss_type": "token-mean", "beta": 0.0}),
    Preset("seed_grpo", "SEED-GRPO: Dr.GRPO advantage scaled by 1 - alpha*SE/log G (answers clustered by "
                        "exact match; alpha 0.5 is ours)",
           {"loss_method": "grpo", "advantage": "seed_grpo", "loss_type": "token-mean", "beta": 0.0}),
]}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown method {name!r}; available: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]


def make_config(method: str, overrides: dict | None = None):
    from alignops.train.config import TrainConfig, apply_overrides  # noqa: PLC0415

    preset = get_preset(method)
    cfg = TrainConfig(method=method)
    apply_overrides(cfg, dict(preset.config))
    apply_overrides(cfg, dict(overrides or {}))
    return cfg
