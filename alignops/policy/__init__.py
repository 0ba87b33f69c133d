"""The policy-loss family: every clipping and weighting method, from log-probs and fused from logits.

    out = ao.policy_loss(logp, old_logp, advantages, mask, method="grpo", ...)
    out = ao.fused_policy_loss(logits, labels, old_logp, advantages, mask, method="grpo", ...)
    out.loss, out.metrics

Files, one idea each:
    loss.py         policy_loss, from per-token log-probs (the API and its argument checks)
    fused.py        fused_policy_loss, from logits, and its three routes over any source of logits tiles
    one_launch.py   the one-launch kernel's contract and its per-token inputs
    registry.py     the method registry (register_method, METHODS)
    methods.py      every method: its torch math next to its registry entry
    math.py         torch math the methods share (ratios, clipped surrogate, KL estimators, metrics)
    bapo.py         BAPO's bound search
    kernel_abi.py   the one-launch kernel's codes, knobs and flags (the table C++ and Triton follow)
    value_loss.py   the PPO critic's clipped value loss
"""

from alignops.policy import methods as _methods  # noqa: F401 - registers the built-in methods
from alignops.layout import AGG_MODES
from alignops.policy.bapo import bapo_search
from alignops.policy.fused import fused_policy_loss
from alignops.policy.loss import PolicyLossOutput, policy_loss
from alignops.policy.math import KL_ESTIMATORS
from alignops.policy.registry import METHODS, OneLaunch, method_names, register_method
from alignops.policy.value_loss import ValueLossOutput, value_loss

__all__ = ["policy_loss", "fused_policy_loss", "value_loss", "PolicyLossOutput", "ValueLossOutput", "register_method", "OneLaunch",
           "METHODS", "method_names", "bapo_search", "AGG_MODES", "KL_ESTIMATORS"]
