"""The PPO family's critic: a value model initialised from the policy, its clipped value-loss step
on each mini-batch of the update, and the value pretraining of VC-PPO/VAPO."""

from __future__ import annotations

import torch

import alignops as ao
from alignops.distributed import merge_moment_rows, merge_moments
from alignops.layout import step_normalizer
from alignops.train import ddp
from alignops.train.model import ValueModel
from alignops.train.rollout import Batch, completion_values


def build_critic(policy) -> torch.nn.Module:
    """A value model with the policy's architecture, its trunk initialised from the policy (the
    SFT base), its scalar head from zero."""
    critic = ValueModel(policy.config).to(next(policy.parameters()).device)
    critic.trunk.load_state_dict(policy.get_decoder().state_dict())
    return critic


def critic_agg(cfg) -> str:
    """The value loss's aggregation: the actor's mode (verl aggregates the critic with the actor's
    loss_agg_mode; ORZ averages per sequence, docs/methods.md §2.3), so orz's critic is
    seq-mean-token-mean like its actor, the token-mean presets' critics token-mean."""
    return cfg.agg


def critic_normalizer(cfg, mask: torch.Tensor) -> torch.Tensor:
    """The critic's own denominator over its optimiser step: critic_agg's, from the critic's mask."""
    return step_normalizer(critic_agg(cfg), mask, cfg.max_completion_length)


def critic_step(cfg, critic, critic_opt, batch: Batch, data: dict, mb: torch.Tensor,
                ranks: ddp.Ranks = ddp.ALONE) -> dict:
    """One optimiser step of the clipped value loss on a mini-batch (micro-batched like the actor),
    aggregated with critic_agg and divided by the critic's own normaliser over the mini-batch (over
    all ranks' shares `mb` under DDP, the gradients then summed over the ranks)."""
    critic_opt.zero_grad(set_to_none=True)
    sums: dict[str, float] = {}
    agg = critic_agg(cfg)
    local = torch.stack([critic_normalizer(cfg, data["mask"][mb]).reshape(()), data["mask"][mb].sum()])
    total = ddp.all_sum(local, ranks)
    normalizer, tokens = total[0].to(torch.float32), total[1]
    moments = []  # per micro-batch (count, mean, M2) of the returns and of the residuals returns - values
    for micro in mb.chunk(cfg.gradient_accumulation_steps):
        if len(micro) == 0:
            continue
        values = completion_values(critic, batch.select(micro))
        returns, mask = data["returns"][micro], data["mask"][micro]
        out = ao.value_loss(values, data["old_values"][micro], returns, mask,
                            cliprange_value=cfg.cliprange_value, agg=agg, normalizer=normalizer,
                            max_len=cfg.max_completion_length)
        out.loss.backward()
        # vf_loss is this micro-batch's share of the step's loss (global normaliser): summed; the
        # token means are weighted by the micro-batch's share of the tokens; explained_variance, a
        # ratio of variances, is recomputed below from the merged moments of the whole mini-batch
        w = float(mask.sum() / tokens.clamp_min(1))
        for k, v in out.metrics.items():
            if k != "explained_variance":
                sums[f"critic/{k}"] = sums.get(f"critic/{k}", 0.0) + float(v) * (1.0 if k == "vf_loss" else w)
        moments.append(torch.stack([_moments(returns, mask), _moments(returns - values.detach(), mask)]))
    metrics, _ = ddp.reduce_metrics(sums, {}, ranks)
    merged = merge_moment_rows(torch.stack(moments)) if moments else torch.zeros(2, 3, dtype=torch.float64)
    ret_m2, res_m2 = merge_moments(merged.to(tokens.device), ranks.group)[:, 2].tolist()
    metrics["critic/explained_variance"] = 1.0 - res_m2 / ret_m2 if ret_m2 > 0 else 0.0
    ddp.sum_gradients(critic.parameters(), ranks)
    metrics["critic/grad_norm"] = float(torch.nn.utils.clip_grad_norm_(critic.parameters(), cfg.max_grad_norm))
    critic_opt.step()
    return metrics


def _moments(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(count, mean, M2) of x over the masked-in tokens, float64."""
    m = mask > 0
    n = m.sum().to(torch.float64)
    xs = torch.where(m, x.detach().to(torch.float64), 0.0)
    mean = xs.sum() / n.clamp_min(1)
    m2 = torch.where(m, xs - mean, 0.0).square().sum()
    return torch.stack([n, mean, m2])


def pretrain_critic(cfg, critic, critic_opt, collect, ranks: ddp.Ranks = ddp.ALONE) -> dict:
    """VC-PPO/VAPO value pretraining: the policy is frozen (rollouts only) and the critic learns
    Monte-Carlo targets (GAE with lambda = 1: the return R at every token)."""
    metrics: dict = {}
    for _ in range(cfg.value_pretrain_steps):
        rollout = collect()
        batch, mask = rollout.batch, rollout.batch.completion_mask
        with torch.no_grad():
            old_values = completion_values(critic, batch)
        rewards = ao.token_level_rewards(rollout.scores, mask)
        returns = ao.gae_advantages(rewards, old_values, mask, gamma=cfg.gamma, lam=1.0).returns
        data = {"old_values": old_values, "returns": returns, "mask": mask}
        metrics = critic_step(cfg, critic, critic_opt, batch, data, torch.arange(mask.shape[0], device=mask.device),
                              ranks)
    return {k.replace("critic/", "value_pretrain/"): v for k, v in metrics.items()}
