"""The policy loss of one micro-batch, with the step's normalisers: `fused_loss` (ao.fused_policy_loss
with the config's options) for most presets, and the three presets' own losses (a preset's `loss`
hook): VAPO's positive-example NLL, CPPO-HIT's retention term and GVPO's group MSE.

A loss hook is `loss(cfg, head, data, norms, overrides) -> ao.PolicyLossOutput`: `head`
(rollout.HeadOutput) predicts the micro-batch's completion tokens, as the decoder's last hidden
states with the lm_head (cfg.fused_lm_head, the default: the logits are never formed) or as the
logits; a hook reads it only through `head.token_logprobs` and `head.policy_loss`, so it is written
once for both. `data` is its slice of the step's per-row data (labels, mask, advantages, old/ref
log-probs, ...), `norms` the mini-batch's denominators (step_normalizers) and `overrides` the
estimator's per-step loss options (AWPO's clip radius; under DDP, BAPO's process_group)."""

from __future__ import annotations

import torch

import alignops as ao
from alignops.layout import step_normalizer


def step_normalizers(cfg, data: dict) -> dict:
    """Denominators over one optimiser step (the whole mini-batch), shared by its micro-batches so
    micro-batching gives the same update as one big batch (docs/methods.md §00.2): `pg`, the
    aggregation's; `nll`, the tokens of correct completions (VAPO); `groups`, the mini-batch's
    whole groups (GVPO)."""
    return {"pg": step_normalizer(cfg.agg, data["mask"], cfg.max_completion_length),
            "nll": (data["mask"] * data["correct"][:, None]).sum(),
            "groups": torch.tensor(float(data["mask"].shape[0] // cfg.num_generations))}


def loss_options(cfg, data: dict, norms: dict, overrides: dict) -> dict:
    o = {k: overrides.get(k, getattr(cfg, k)) for k in ("epsilon", "epsilon_high")}
    group = {"process_group": overrides["process_group"]} if "process_group" in overrides else {}
    return dict(**group, method=cfg.loss_method, temperature=cfg.temperature, clip_low=o["epsilon"],
                clip_high=o["epsilon_high"], clip_ratio_c=cfg.clip_ratio_c, ref_logp=data.get("ref_logp"),
                kl_coef=0.0 if cfg.kl_in_reward else cfg.beta, kl_estimator=cfg.kl_estimator,
                entropy_coef=cfg.entropy_coef, agg=cfg.agg, normalizer=norms["pg"],
                max_len=cfg.max_completion_length, **cfg.loss_kwargs)


def fused_loss(cfg, head, data, norms, overrides) -> ao.PolicyLossOutput:
    """cfg.loss_method through ao.fused_policy_loss (ao.fused_linear_policy_loss from the hidden
    states), in one pass over the logits."""
    # compute_entropy: the entropy metric every step (TRL logs it); it comes from the same logits pass
    # terminal: policy_update only backpropagates it
    return head.policy_loss(data["labels"], data.get("old_logp"), data["advantages"], data["mask"], terminal=True,
                            backend=cfg.backend, compute_entropy=True, **loss_options(cfg, data, norms, overrides))


def _two_pass(cfg, head, data, opts: dict):
    """(logp, policy loss): fused token log-probs (with autograd), then ao.policy_loss, for losses
    that add a term of their own on the same log-probs."""
    temperature = opts.pop("temperature")
    logp, entropy = head.token_logprobs(data["labels"], temperature=temperature, compute_entropy=True,
                                        backend=cfg.backend)
    out = ao.policy_loss(logp, data.get("old_logp"), data["advantages"], data["mask"], entropy=entropy, **opts)
    return logp, out


def vapo_loss(cfg, head, data, norms, overrides) -> ao.PolicyLossOutput:
    """PPO + nll_coef * NLL over the correct completions (VAPO's positive-example LM loss), normalised
    by their token count over the mini-batch; no correct completion -> the term is 0."""
    logp, out = _two_pass(cfg, head, data, loss_options(cfg, data, norms, overrides))
    if cfg.nll_coef == 0:
        return out
    pos = data["mask"] * data["correct"][:, None]
    nll = -(torch.where(pos > 0, logp, 0.0) * pos).sum() / norms["nll"].clamp_min(1)
    out.metrics["nll_loss"] = nll.detach()
    return ao.PolicyLossOutput(out.loss + cfg.nll_coef * nll, out.metrics)


def cppo_hit_loss(cfg, head, data, norms, overrides) -> ao.PolicyLossOutput:
    """alpha_i-weighted PPO-clip (the estimator scaled the advantages) + kr_coef * beta_i *
    (logp - logp_prev)^2 (token-mean), logp_prev from the previous task's policy: here the
    reference model (the SFT base)."""
    opts = loss_options(cfg, data, norms, overrides)
    opts.pop("kr_coef", None)
    logp, out = _two_pass(cfg, head, data, opts)
    m = data["mask"] > 0
    diff = torch.where(m, logp - data["ref_logp"], 0.0)
    kr = (data["kr_weight"][:, None] * diff.square()).sum() / norms["pg"].clamp_min(1)
    coef = float(cfg.loss_kwargs.get("kr_coef", 0.1))
    out.metrics["kr_loss"] = kr.detach()
    return ao.PolicyLossOutput(out.loss + coef * kr, out.metrics)


def gvpo_loss(cfg, head, data, norms, overrides) -> ao.PolicyLossOutput:
    """GVPO: MSE between the group-centred implicit rewards beta (S - S_anchor) and the centred
    rewards; anchor = the rollout policy; mean over the mini-batch's groups."""
    logp = head.token_logprobs(data["labels"], temperature=cfg.temperature, backend=cfg.backend)
    out = ao.gvpo_loss(logp, data["old_logp"], data["scores"], mask=data["mask"] > 0,
                       group_size=cfg.num_generations, beta=float(cfg.loss_kwargs.get("gvpo_beta", 0.1)),
                       normalizer=norms["groups"])
    return ao.PolicyLossOutput(out.loss, out.metrics)
