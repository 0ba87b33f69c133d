"""CHORD (docs/methods.md §2.29): on-policy GRPO batches mixed with the task's expert answers,
L = (1 - mu) L_GRPO(rollout rows) + mu L_SFT(expert rows), each part over its own tokens.

CHORD-mu: plain SFT on the expert rows, mu on the cosine schedule 0.9 -> 0.05 over 200 steps.
CHORD-phi: the expert NLL weighted per token by sg(p (1 - p)), constant mu = 0.1.
"""

from __future__ import annotations

import dataclasses

import torch

import alignops as ao
from alignops.train.loops.base import DataLoop
from alignops.train.rollout import concat_batches

# the variants' schedule (mu_peak, mu_valley, mu_warmup_steps, mu_decay_steps) and expert weighting (§2.29)
VARIANTS = {"mu": ((0.9, 0.05, 0, 200), "none"), "phi": ((0.1, 0.1, 0, 0), "chord_phi")}
SFT_WEIGHTINGS = ("none", "chord_phi")


@dataclasses.dataclass
class CHORDOptions:
    variant: str = "mu"
    expert_ratio: float = 0.2               # expert rows' share of the mixed batch (Trinity's mix_chord)
    mu_peak: float | None = None            # None: the variant's value (see VARIANTS)
    mu_valley: float | None = None
    mu_warmup_steps: int | None = None
    mu_decay_steps: int | None = None
    sft_weighting: str | None = None        # "none" | "chord_phi" (None: the variant's)
    cutoff_prob: float | None = None        # clamp expert logp <= log(cutoff_prob) (off)

    def __post_init__(self):
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be one of {sorted(VARIANTS)}, got {self.variant!r}")
        (peak, valley, warmup, decay), weighting = VARIANTS[self.variant]
        self.mu_peak = peak if self.mu_peak is None else self.mu_peak
        self.mu_valley = valley if self.mu_valley is None else self.mu_valley
        self.mu_warmup_steps = warmup if self.mu_warmup_steps is None else self.mu_warmup_steps
        self.mu_decay_steps = decay if self.mu_decay_steps is None else self.mu_decay_steps
        self.sft_weighting = weighting if self.sft_weighting is None else self.sft_weighting
        if not 0.0 <= self.expert_ratio < 1.0:
            raise ValueError(f"expert_ratio must be in [0, 1), got {self.expert_ratio}")
        for name in ("mu_peak", "mu_valley"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        for name in ("mu_warmup_steps", "mu_decay_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.sft_weighting not in SFT_WEIGHTINGS:
            raise ValueError(f"sft_weighting must be one of {SFT_WEIGHTINGS}, got {self.sft_weighting!r}")
        if self.cutoff_prob is not None and not 0.0 < self.cutoff_prob <= 1.0:
            raise ValueError(f"cutoff_prob must be in (0, 1] or None, got {self.cutoff_prob}")

    def mu(self, step: int) -> float:
        return ao.chord_mu_schedule(step, mu_peak=self.mu_peak, mu_valley=self.mu_valley,
                                    warmup_steps=self.mu_warmup_steps, decay_steps=self.mu_decay_steps)


def expert_rows(rollout_rows: int, ratio: float) -> int:
    """Expert rows so that they are `ratio` of the mixed batch: round(ratio / (1 - ratio) * rollouts)."""
    return int(ratio / (1.0 - ratio) * rollout_rows + 0.5)


class CHORDLoop(DataLoop):
    """CHORD: each step num_prompts x num_generations on-policy samples with group-normalised
    advantages, plus expert rows, one optimiser step on ao.chord_loss."""

    Options = CHORDOptions

    def __init__(self, run, options):
        super().__init__(run, options)
        if run.cfg.beta > 0:
            raise ValueError(f"method {run.cfg.method!r} keeps no reference model: --beta must be 0, "
                             f"got {run.cfg.beta}")
        if run.cfg.loss_method != "grpo":
            raise ValueError(f"method {run.cfg.method!r}: CHORD's RL part is GRPO; --loss_method must be 'grpo', "
                             f"got {run.cfg.loss_method!r}")

    def mixed_batch(self):
        """The rollout rows then the expert rows as one Batch, expert_mask [B], the rollout rewards."""
        run, cfg = self.run, self.run.cfg
        G = cfg.num_generations
        problems = run.task.sample(run.rng, cfg.num_prompts)
        batch, texts = run.sample([p.prompt for p in problems], G)
        rewards, reward_metrics = run.reward_model(run.task, [p for p in problems for _ in range(G)], texts)
        n_expert = expert_rows(batch.input_ids.shape[0], self.opts.expert_ratio)
        parts = [batch]
        if n_expert:
            experts = run.task.sample(run.rng, n_expert)
            with_steps = run.task.with_steps()
            parts.append(run.teacher_batch([p.prompt for p in experts],
                                           [p.expert_completion(with_steps) for p in experts]))
        mixed = concat_batches(parts, run.tok.pad_token_id)
        expert_mask = torch.arange(mixed.input_ids.shape[0], device=run.device) >= batch.input_ids.shape[0]
        return mixed, expert_mask, torch.tensor(rewards, dtype=torch.float32), reward_metrics

    def loss(self, batch, expert_mask: torch.Tensor, rewards: torch.Tensor, mu: float):
        """ao.chord_loss of the mixed batch: GRPO advantages of the rollout rewards (0 on expert rows),
        on-policy (old log-probs = sg(logp): one update per batch)."""
        cfg, device = self.run.cfg, self.run.device
        advantages = torch.zeros(batch.input_ids.shape[0], device=device)
        advantages[~expert_mask] = ao.grpo_advantages(rewards.to(device), cfg.num_generations,
                                                      scale=cfg.scale_rewards)
        logp = self.run.token_logprobs(batch)
        extra = {"max_len": cfg.max_completion_length} if cfg.agg == "seq-mean-token-sum-norm" else {}
        return ao.chord_loss(logp, None, advantages, batch.completion_mask, expert_mask, mu,
                             sft_weighting=self.opts.sft_weighting, cutoff_prob=self.opts.cutoff_prob,
                             clip_low=0.2 if cfg.epsilon is None else cfg.epsilon, clip_high=cfg.epsilon_high,
                             agg=cfg.agg, **extra)

    def step(self, step: int) -> dict:
        batch, expert_mask, rewards, reward_metrics = self.mixed_batch()
        mu = self.opts.mu(step)
        out = self.loss(batch, expert_mask, rewards, mu)
        return {**self.run.optimizer_step(out.loss, step), "reward": float(rewards.mean()), **reward_metrics,
                "chord/mu": mu, "chord/expert_rows": float(expert_mask.sum()),
                "nll": float(out.metrics.get("sft/nll", 0.0))}
