"""SFT-family loops: DFT on the task's expert answers; RAFT and iw-SFT on the policy's own samples.

RAFT (docs/methods.md §2.25): K samples per prompt, keep the best (local ranking) or the batch's
top fraction (global ranking), optionally only those reaching `min_reward`, SFT on them, repeat.
iw-SFT (§2.28, §00.15): SFT on the policy's own correct samples, each weighted by q / pi_ref with q
a lagged, frozen copy of the policy. DFT (§2.27): SFT weighted per token by sg(p).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import torch

import alignops as ao
from alignops.train.loops.base import DataLoop

RANKINGS = ("local", "global")


def select(rewards: torch.Tensor, ranking: str = "local", top_fraction: float | None = None,
           min_reward: float | None = None) -> list[int]:
    """RAFT's selection over rewards [P, K] (row-major: row p * K + k is sample k of prompt p);
    the kept row indices, ascending. Ties go to the lower row index (a stable order).

    local: the best sample of each prompt. global: the round-half-up(top_fraction * P * K)
    highest rewards of the whole batch (at least one; top_fraction None: 1 / K). min_reward then
    drops every kept row whose reward is below it (None: keep all)."""
    if rewards.dim() != 2 or rewards.numel() == 0:
        raise ValueError(f"rewards must be a non-empty [P, K] tensor, got shape {tuple(rewards.shape)}")
    P, K = rewards.shape
    flat = rewards.reshape(-1).tolist()
    if ranking == "local":
        # max() returns the first maximum: the lowest index among ties
        kept = [p * K + max(range(K), key=lambda k: flat[p * K + k]) for p in range(P)]
    elif ranking == "global":
        fraction = 1.0 / K if top_fraction is None else top_fraction
        n_keep = min(P * K, max(1, math.floor(fraction * P * K + 0.5)))
        kept = sorted(range(P * K), key=lambda i: (-flat[i], i))[:n_keep]
    else:
        raise ValueError(f"ranking must be one of {RANKINGS}, got {ranking!r}")
    if min_reward is not None:
        kept = [i for i in kept if flat[i] >= min_reward]
    return sorted(kept)


def sample_and_score(run, K: int):
    """cfg.num_prompts problems, K samples each: the batch, the rewards [P * K] (the run's reward
    functions) and the reward metrics."""
    problems = run.task.sample(run.rng, run.cfg.num_prompts)
    batch, texts = run.sample([p.prompt for p in problems], K)
    rewards, metrics = run.reward_model(run.task, [p for p in problems for _ in range(K)], texts)
    return batch, torch.tensor(rewards, dtype=torch.float32), metrics


def skipped_update() -> dict:
    """The row of a step with nothing to train on: no optimiser step (Adam's moments untouched)."""
    return {"loss": 0.0, "nll": 0.0, "grad_norm": 0.0, "skipped_update": 1.0}


def check_positive(opts, *names) -> None:
    for name in names:
        value = getattr(opts, name)
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


# ---- DFT

@dataclasses.dataclass
class DFTOptions:
    batch_size: int = 64           # expert (prompt, answer) pairs per step

    def __post_init__(self):
        check_positive(self, "batch_size")


class DFTLoop(DataLoop):
    """DFT (docs/methods.md §2.27): SFT on expert completions with each token's NLL weighted by
    its detached probability sg(p)."""

    Options = DFTOptions

    def step(self, step: int) -> dict:
        run = self.run
        problems = run.task.sample(run.rng, self.opts.batch_size)
        with_steps = run.task.with_steps()
        batch = run.teacher_batch([p.prompt for p in problems], [p.expert_completion(with_steps) for p in problems])
        return run.sft_step(batch, step, weighting="dft")


# ---- RAFT

@dataclasses.dataclass
class RAFTOptions:
    K: int | None = None                 # samples per prompt (None: cfg.num_generations)
    ranking: str = "local"               # local: best per prompt (paper); global: batch top fraction (LMFlow)
    top_fraction: float | None = None    # global ranking's kept share (None: 1 / K)
    # 1.0: with the 0/1 accuracy reward only correct samples are kept (rejection-sampling fine-tuning);
    # None is the paper's RAFT, which keeps a prompt's best sample even when it is wrong
    min_reward: float | None = 1.0
    sft_epochs: int = 1                  # optimiser steps over the selected set per step

    def __post_init__(self):
        check_positive(self, "K", "sft_epochs")
        if self.ranking not in RANKINGS:
            raise ValueError(f"ranking must be one of {RANKINGS}, got {self.ranking!r}")
        if self.top_fraction is not None:
            if not 0.0 < self.top_fraction <= 1.0:
                raise ValueError(f"top_fraction must be in (0, 1], got {self.top_fraction}")
            if self.ranking != "global":
                raise ValueError("top_fraction applies to ranking='global' only")


class RAFTLoop(DataLoop):
    """RAFT: sample K per prompt, rank, keep, SFT (token-mean NLL) on the kept samples."""

    Options = RAFTOptions

    def step(self, step: int) -> dict:
        run, opts = self.run, self.opts
        K = opts.K or run.cfg.num_generations
        batch, rewards, reward_metrics = sample_and_score(run, K)
        kept = select(rewards.view(-1, K), opts.ranking, opts.top_fraction, opts.min_reward)
        metrics = {"reward": float(rewards.mean()), **reward_metrics, "raft/selected": float(len(kept)),
                   "raft/selected_reward": float(rewards[kept].mean()) if kept else 0.0}
        if not kept:
            return {**metrics, **skipped_update()}
        chosen = batch.select(torch.tensor(kept, device=batch.input_ids.device))
        for _ in range(opts.sft_epochs):
            update = run.sft_step(chosen, step)
        return {**metrics, **update, "skipped_update": 0.0}


# ---- iw-SFT

@dataclasses.dataclass
class IWSFTOptions:
    K: int | None = None            # samples per prompt (None: cfg.num_generations)
    min_reward: float = 1.0         # D+: the samples whose reward reaches this (0/1 accuracy: the correct ones)
    w_min: float = 0.0              # weight clip (§00.15)
    w_max: float = 10.0
    self_normalize: bool = False    # divide the weights by their batch mean
    q_update_every: int = 20        # steps between refreshes of the lagged q ([UNVERIFIED] in the paper: ours)

    def __post_init__(self):
        check_positive(self, "K", "q_update_every")
        if not 0.0 <= self.w_min <= self.w_max:
            raise ValueError(f"need 0 <= w_min <= w_max, got w_min={self.w_min}, w_max={self.w_max}")


class IWSFTLoop(DataLoop):
    """iw-SFT: each step collects D+ (the policy's own correct samples; pi_ref = the policy that
    sampled them) and takes one SFT step weighted per sequence by clip(q / pi_ref), q a frozen copy
    of the policy refreshed every q_update_every steps."""

    Options = IWSFTOptions

    def __init__(self, run, options):
        super().__init__(run, options)
        self.q = copy.deepcopy(run.policy).eval().requires_grad_(False)
        self.q_step = 0   # the step whose policy q holds

    def refresh_q(self, step: int) -> None:
        if step - self.q_step >= self.opts.q_update_every:
            self.q.load_state_dict(self.run.policy.state_dict())
            self.q_step = step

    def loss(self, batch, seq_logp_ref: torch.Tensor):
        """The weighted SFT loss (an SFTOutput) of D+ rows `batch` sampled with sequence log-probs
        seq_logp_ref, and the weights."""
        opts = self.opts
        seq_logp_q = self.run.sequence_logprobs(batch, self.q)
        weights = ao.iw_sft_weights(seq_logp_q, seq_logp_ref, clip=(opts.w_min, opts.w_max),
                                    self_normalize=opts.self_normalize)
        return self.run.sft_loss(batch, weighting="iw", seq_weights=weights), weights

    def step(self, step: int) -> dict:
        run = self.run
        self.refresh_q(step)
        K = self.opts.K or run.cfg.num_generations
        batch, rewards, reward_metrics = sample_and_score(run, K)
        positive = (rewards >= self.opts.min_reward).nonzero().view(-1).tolist()
        metrics = {"reward": float(rewards.mean()), **reward_metrics, "iw/positives": float(len(positive)),
                   "iw/q_age": float(step - self.q_step)}
        if not positive:
            return {**metrics, **skipped_update()}
        data = batch.select(torch.tensor(positive, device=batch.input_ids.device))
        # pi_ref's log-probs rescored by the policy that sampled them (this one, before the update) at
        # temperature 1, as q is scored: the sampler's own log-probs are those of its temperature / top-p
        seq_logp_ref = run.sequence_logprobs(data)
        out, weights = self.loss(data, seq_logp_ref)
        return {**metrics, **run.optimizer_step(out.loss, step), "nll": float(out.metrics["nll"]),
                "iw/weight_mean": float(weights.mean()), "iw/weight_max": float(weights.max()),
                "skipped_update": 0.0}

    def state_dict(self) -> dict:
        return {"q_step": self.q_step}

    def tensors(self) -> dict:
        return {"q": {k: v.detach().clone().contiguous() for k, v in self.q.state_dict().items()}}

    def load_state_dict(self, state: dict, tensors: dict) -> None:
        self.q_step = state["q_step"]
        self.q.load_state_dict(tensors["q"])
