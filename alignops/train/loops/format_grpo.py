"""GRPO on a new output format, shared by SRL (srl.py) and Reflect, Retry, Reward (reflect.py).

Both teach the SFT base a format it has never seen (SRL's "<reasoning>#<action>", RRR's
"attempt;<reflection>#<answer>") with a short SFT warm-up, then run on-policy GRPO over a masked
part of the completion. Self-replay (not in either paper, docs/loops/srl.md) adds to every update
the SFT NLL of the frozen base's own greedy answers to plain prompts, so that the new format does
not erase what the base does on the plain prompt.
"""

from __future__ import annotations

import random

import torch

import alignops as ao
from alignops.train.loops.base import labels, learning_rate_of
from alignops.train.rollout import Batch


def grpo_loss(cfg, head, batch, rewards: torch.Tensor, mask: torch.Tensor, max_len: int,
              group_size: int) -> ao.PolicyLossOutput:
    """The trainer's policy loss (cfg.loss_method, clip, aggregation) on GRPO advantages of
    `rewards`, on-policy (one update per batch), over the tokens of `mask` only (labels outside
    it are ignore_index, so those positions get no gradient)."""
    advantages = ao.grpo_advantages(rewards, group_size, scale=cfg.scale_rewards)
    lab = labels(batch).masked_fill(mask == 0, -100)
    return head.policy_loss(lab, None, advantages, mask, terminal=True, backend=cfg.backend,
                            method=cfg.loss_method, temperature=cfg.temperature, clip_low=cfg.epsilon,
                            clip_high=cfg.epsilon_high, clip_ratio_c=cfg.clip_ratio_c, entropy_coef=cfg.entropy_coef,
                            agg=cfg.agg, max_len=max_len, **cfg.loss_kwargs)


class SelfReplay:
    """The base policy's greedy completions (token ids, EOS included when it stopped) of the plain
    prompts of `pool_size` training problems, collected once before the first update (so from the
    base) and kept in the loop's state; loss(step) is the token-mean SFT NLL of `batch_size` of
    them under the current policy. Ids, not text: the targets are exactly what the base wrote."""

    def __init__(self, run, coef: float, batch_size: int, pool_size: int):
        self.run, self.coef, self.batch_size, self.pool_size = run, coef, batch_size, pool_size
        self.pool: list[list] | None = None   # [prompt, completion ids]

    @property
    def enabled(self) -> bool:
        return self.coef > 0

    @torch.no_grad()
    def collect(self) -> None:
        if self.pool is not None:
            return
        run = self.run
        rng = random.Random(f"self-replay:{run.cfg.seed}")  # its own stream: run.rng's draws stay as they were
        problems = rng.sample(run.task.train, min(self.pool_size, len(run.task.train)))
        batch, _ = run.sample([p.prompt for p in problems], temperature=0.0)
        lengths = batch.completion_mask.sum(-1).long().tolist()
        self.pool = [[p.prompt, batch.completion_ids[i, :n].tolist()] for i, (p, n) in enumerate(zip(problems, lengths))]

    def rows(self, step: int) -> list[list]:
        """The [prompt, completion ids] rows of `step`: a function of the seed and step (nothing to save)."""
        self.collect()
        rng = random.Random(f"self-replay:{self.run.cfg.seed}:{step}")
        return rng.sample(self.pool, min(self.batch_size, len(self.pool)))

    def batch(self, rows) -> Batch:
        return self.run.token_batch([p for p, _ in rows], [c for _, c in rows])

    def add_to(self, loss: torch.Tensor, step: int, metrics: dict) -> torch.Tensor:
        """loss + coef * replay NLL (loss itself when disabled); records replay/nll in metrics."""
        if not self.enabled:
            return loss
        rows = [r for r in self.rows(step) if r[1]]
        if not rows:
            return loss
        replay = self.run.sft_loss(self.batch(rows)).loss
        metrics["replay/nll"] = float(replay.detach())
        return loss + self.coef * replay


def grpo_update(run, batch, rewards, mask, step: int, max_len: int, replay: SelfReplay | None = None) -> dict:
    """One optimiser step of grpo_loss (+ the self-replay term); a batch with no row (or no masked
    token) is a zero-loss step that leaves the parameters (and Adam's moments) alone."""
    if batch is None or float(mask.sum()) == 0:
        return {"loss": 0.0, "grad_norm": 0.0, "skipped_update": 1.0}
    out = grpo_loss(run.cfg, run.head(batch), batch, rewards, mask, max_len, run.cfg.num_generations)
    metrics = {"skipped_update": 0.0}
    loss = out.loss if replay is None else replay.add_to(out.loss, step, metrics)
    return {**run.optimizer_step(loss, step), **metrics}


def warmup_sft_step(run, batch, step: int, learning_rate: float | None, replay: SelfReplay | None = None) -> dict:
    """run.sft_step (+ the self-replay term) at `learning_rate` (None: the run's), with the run's
    lr warm-up schedule."""
    with learning_rate_of(run, learning_rate):
        if replay is None or not replay.enabled:
            return run.sft_step(batch, step)
        nll = run.sft_loss(batch).loss
        metrics = {"nll": float(nll.detach()), "sft/tokens": float(batch.completion_mask.sum())}
        return {**run.optimizer_step(replay.add_to(nll, step, metrics), step), **metrics}


def replay_state(replay: SelfReplay) -> dict:
    """The replay pool for the checkpoint: after a resume it must still be the base's answers."""
    return {} if replay.pool is None else {"replay_pool": replay.pool}


def load_replay_state(replay: SelfReplay, state: dict) -> None:
    if "replay_pool" in state:
        replay.pool = [list(row) for row in state["replay_pool"]]


def check_no_kl(cfg, method: str) -> None:
    if cfg.beta > 0:
        raise ValueError(f"method {method!r} keeps no reference model: --beta must be 0, got {cfg.beta}")


def check_warmup(opts) -> None:
    """Checks the warm-up and self-replay options shared by SRL and Reflect, Retry, Reward."""
    if opts.replay_coef < 0:
        raise ValueError(f"replay_coef must be >= 0 (0: no replay), got {opts.replay_coef}")
    for name in ("replay_batch", "replay_pool"):
        if getattr(opts, name) < 1:
            raise ValueError(f"{name} must be >= 1, got {getattr(opts, name)}")
    if opts.format_warmup_steps < 0:
        raise ValueError(f"format_warmup_steps must be >= 0, got {opts.format_warmup_steps}")
    if opts.warmup_learning_rate is not None and opts.warmup_learning_rate <= 0:
        raise ValueError(f"warmup_learning_rate must be > 0 or None, got {opts.warmup_learning_rate}")
