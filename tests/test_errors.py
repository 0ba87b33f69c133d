"""Bad inputs, one table: every public function of alignops (`alignops.__all__`, the advantage
estimators included) against each class of bad input that applies to it, and the error it raises.

The project's rule (docs/design.md "Errors"): bad input gives a clear error naming the argument.
`BAD` below is the table: each row calls one function with otherwise-valid small inputs and one bad
argument, and asserts the exception type and that the message names the argument. A row whose
function raises something else, or nothing, fails. `NOT_APPLICABLE` says, for every (function,
class) pair that has no row, why.

docs/errors.md is rendered from this table (`render()`); a test asserts the file equals the
rendering, and `ALIGNOPS_WRITE_ERRORS_DOC=1 python -m pytest tests/test_errors.py` rewrites it.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
from typing import Callable

import pytest
import torch

import alignops as ao
from tests.conftest import checkout_root

KINDS = ("shape", "dtype", "device", "range", "non-finite", "option")
B, T, V, H = 4, 3, 5, 4  # B = 4: two groups of group_size=2


# --------------------------------------------------------------------------------------------
# small valid inputs


def _f(*shape, lo=-1.0, hi=1.0):
    """A float32 tensor of `shape` with fixed values in [lo, hi] (no RNG: the rows are deterministic)."""
    n = 1
    for s in shape:
        n *= s
    x = torch.linspace(0.0, 1.0, n).reshape(shape) if n else torch.empty(shape)
    x = (x * 7.3).remainder(1.0)  # spread the values
    return lo + (hi - lo) * x


def _labels(*shape):
    n = 1
    for s in shape:
        n *= s
    return (torch.arange(n) * 3 % V).reshape(shape)


def _mask(*shape):
    return torch.ones(shape, dtype=torch.bool)


def _meta(x: torch.Tensor) -> torch.Tensor:
    """The stand-in for "a tensor on another device": the same tensor on the meta device."""
    return x.to("meta")


def _rewards():
    return torch.tensor([1.0, 0.0, 0.0, 1.0])


def _with_first(x: torch.Tensor, value=float("nan")) -> torch.Tensor:
    """`x` with its first element set to `value` (NaN by default)."""
    x = x.clone()
    x.view(-1)[0] = value
    return x


# Each public function's valid inputs, as keyword arguments (fresh tensors per call).
VALID: dict[str, Callable[[], dict]] = {
    "available_backends": lambda: dict(device="cpu"),
    "token_logprobs": lambda: dict(logits=_f(B, T, V), labels=_labels(B, T)),
    "sequence_logprobs": lambda: dict(logits=_f(B, T, V), labels=_labels(B, T), mask=_mask(B, T)),
    "sft_loss": lambda: dict(logits=_f(B, T, V), labels=_labels(B, T), mask=_mask(B, T)),
    "iw_sft_weights": lambda: dict(seq_logp_q=_f(B, lo=-3, hi=-1), seq_logp_ref=_f(B, lo=-3, hi=-1)),
    "chord_loss": lambda: dict(logp=_f(B, T, lo=-3, hi=-0.1), old_logp=_f(B, T, lo=-3, hi=-0.1),
                               advantages=_f(B), mask=_mask(B, T),
                               expert_mask=torch.tensor([True, False, True, False]), mu=0.5),
    "chord_mu_schedule": lambda: dict(step=3),
    "dpo_loss": lambda: dict(policy_chosen_logps=_f(B, lo=-3, hi=-1), policy_rejected_logps=_f(B, lo=-4, hi=-2),
                             ref_chosen_logps=_f(B, lo=-3, hi=-1), ref_rejected_logps=_f(B, lo=-3, hi=-1)),
    "orpo_loss": lambda: dict(policy_chosen_logps=_f(B, lo=-3, hi=-1), policy_rejected_logps=_f(B, lo=-4, hi=-2),
                              chosen_lengths=torch.full((B,), 3), rejected_lengths=torch.full((B,), 3)),
    "gvpo_loss": lambda: dict(logp=_f(B, lo=-3, hi=-1), anchor_logp=_f(B, lo=-3, hi=-1), rewards=_rewards(),
                              group_size=2),
    "rahf_loss": lambda: dict(lora_hidden=_f(B, T, H), base_hidden=_f(B, T, H, lo=0, hi=1),
                              direction=_f(B, T, H, lo=-2, hi=0), mask=_mask(B, T)),
    "log1mexp": lambda: dict(x=_f(B, lo=-3, hi=-0.1)),
    "policy_loss": lambda: dict(logp=_f(B, T, lo=-3, hi=-0.1), old_logp=_f(B, T, lo=-3, hi=-0.1),
                                advantages=_f(B), mask=_mask(B, T)),
    "fused_policy_loss": lambda: dict(logits=_f(B, T, V), labels=_labels(B, T), old_logp=_f(B, T, lo=-3, hi=-0.1),
                                      advantages=_f(B), mask=_mask(B, T)),
    "value_loss": lambda: dict(values=_f(B, T), old_values=_f(B, T, lo=0, hi=1), returns=_f(B, T, lo=-2, hi=2),
                               mask=_mask(B, T)),
    "fused_linear_token_logprobs": lambda: dict(hidden=_f(B, T, H), weight=_f(V, H), labels=_labels(B, T)),
    "fused_linear_policy_loss": lambda: dict(hidden=_f(B, T, H), weight=_f(V, H), labels=_labels(B, T),
                                             old_logp=_f(B, T, lo=-3, hi=-0.1), advantages=_f(B),
                                             mask=_mask(B, T)),
    "fused_linear_sequence_logprobs": lambda: dict(hidden=_f(B, T, H), weight=_f(V, H), labels=_labels(B, T),
                                                   mask=_mask(B, T)),
    "fused_linear_sft_loss": lambda: dict(hidden=_f(B, T, H), weight=_f(V, H), labels=_labels(B, T),
                                          mask=_mask(B, T)),
    "group_stats": lambda: dict(rewards=_rewards(), group_size=2),
    "grpo_advantages": lambda: dict(rewards=_rewards(), group_size=2),
    "rloo_advantages": lambda: dict(rewards=_rewards(), group_size=2),
    "gvpo_centered_rewards": lambda: dict(rewards=_rewards(), group_size=2),
    "gpg_advantages": lambda: dict(rewards=_rewards(), group_size=2),
    "seed_grpo_advantages": lambda: dict(rewards=_rewards(), semantic_entropy=_f(B, lo=0, hi=1), group_size=2,
                                         alpha=1.0),
    "semantic_entropy": lambda: dict(cluster_ids=torch.tensor([0, 1, 2, 2]), group_size=2),
    "dynamic_sampling_mask": lambda: dict(rewards=_rewards(), group_size=2),
    "remax_advantages": lambda: dict(rewards=_rewards(), greedy_rewards=torch.tensor([0.5, 0.5, 0.0, 1.0])),
    "masked_mean": lambda: dict(x=_f(B, T), mask=_mask(B, T)),
    "masked_var": lambda: dict(x=_f(B, T), mask=_mask(B, T)),
    "masked_whiten": lambda: dict(x=_f(B, T), mask=_mask(B, T)),
    "gae_advantages": lambda: dict(token_rewards=_f(B, T), values=_f(B, T, lo=0, hi=1), mask=_mask(B, T)),
    "vapo_lambda": lambda: dict(lengths=torch.tensor([3, 10, 100, 1000])),
    "k1_penalty": lambda: dict(old_logp=_f(B, T, lo=-3, hi=-0.1), ref_logp=_f(B, T, lo=-2, hi=-0.2),
                               mask=_mask(B, T)),
    "token_level_rewards": lambda: dict(scores=_rewards(), mask=_mask(B, T)),
    "kl_penalized_scores": lambda: dict(scores=_rewards(), old_logp=_f(B, T, lo=-3, hi=-0.1),
                                        ref_logp=_f(B, T, lo=-2, hi=-0.2), mask=_mask(B, T), kl_coef=0.1),
    "reinforce_pp_advantages": lambda: dict(scores=_rewards(), mask=_mask(B, T)),
    "reinforce_pp_baseline_advantages": lambda: dict(scores=_rewards(), mask=_mask(B, T), group_size=2),
    "dler_advantages": lambda: dict(rewards=_rewards(), group_size=2, mask=_mask(B, T)),
    "awpo_advantages": lambda: dict(outcome_rewards=_rewards(), reasoning_rewards=_f(B, lo=0, hi=1), group_size=2),
    "dapo_overlong_penalty": lambda: dict(lengths=torch.tensor([3, 10, 17, 20]), max_length=20, cache_length=4),
    "rollout_correction": lambda: dict(old_logp=_f(B, T, lo=-3, hi=-0.1), rollout_logp=_f(B, T, lo=-2.5, hi=-0.2),
                                       mask=_mask(B, T)),
    "simpo_loss": lambda: dict(policy_chosen_logps=_f(B, lo=-3, hi=-1), policy_rejected_logps=_f(B, lo=-4, hi=-2),
                               chosen_lengths=torch.full((B,), 3), rejected_lengths=torch.full((B,), 3)),
    "cpo_loss": lambda: dict(policy_chosen_logps=_f(B, lo=-3, hi=-1), policy_rejected_logps=_f(B, lo=-4, hi=-2),
                             chosen_lengths=torch.full((B,), 3)),
    "kto_loss": lambda: dict(policy_logps=_f(B, lo=-3, hi=-1), ref_logps=_f(B, lo=-3, hi=-1),
                             desirable=torch.tensor([True, False, True, False]), kl=0.1),
    # B = 4 rows: 2 chosen, then 2 rejected
    "fused_linear_simpo_loss": lambda: dict(hidden=_f(B, T, H), weight=_f(V, H), labels=_labels(B, T)),
    "fused_linear_cpo_loss": lambda: dict(hidden=_f(B, T, H), weight=_f(V, H), labels=_labels(B, T)),
    "fused_linear_kto_loss": lambda: dict(hidden=_f(B, T, H), weight=_f(V, H), labels=_labels(B, T),
                                          desirable=torch.tensor([True, False, True, False]),
                                          ref_logps=_f(B, lo=-3, hi=-1), kl=0.1),
    "distill_loss": lambda: dict(student_logits=_f(B, T, V), teacher_logits=_f(B, T, V), labels=_labels(B, T)),
    "fused_linear_distill_loss": lambda: dict(student_hidden=_f(B, T, H), student_weight=_f(V, H),
                                              teacher_hidden=_f(B, T, H + 1), teacher_weight=_f(V, H + 1),
                                              labels=_labels(B, T)),
    "opo_advantages": lambda: dict(rewards=_rewards(), group_size=2, mask=_mask(B, T)),
    "grpo_passk_advantages": lambda: dict(rewards=_rewards(), group_size=2),
    "gdpo_advantages": lambda: dict(rewards=torch.stack([_rewards(), _f(B, lo=0, hi=1)], -1), group_size=2,
                                    mask=_mask(B, T)),
    "optimal_token_baseline_advantages": lambda: dict(token_rewards=_f(B, T), old_logp=_f(B, T, lo=-3, hi=-0.1),
                                                      sum_pi_squared=_f(B, T, lo=0.5, hi=1), mask=_mask(B, T),
                                                      group_size=2),
}


# --------------------------------------------------------------------------------------------
# the table


@dataclasses.dataclass(frozen=True)
class Bad:
    fn: str                      # the public function (alignops.<fn>)
    kind: str                    # one of KINDS
    what: str                    # the bad input, in words (docs/errors.md)
    bad: Callable[[dict], dict]  # valid kwargs -> the keywords changed: the bad argument (and a setting it
                                 # needs to be read, e.g. weighting="iw" for seq_weights)
    exc: type                    # the exception it raises
    names: str                   # the argument the message names

    @property
    def id(self) -> str:
        return f"{self.fn}-{self.kind}-{self.what}"


row = Bad


VE, TE, BUE = ValueError, TypeError, ao.BackendUnavailableError

BAD: list[Bad] = [
    # ---- available_backends
    row("available_backends", "option", "device='nowhere'", lambda v: dict(device="nowhere"), VE, "device"),
    row("available_backends", "option", "device=1.5 (not a device)", lambda v: dict(device=1.5), TE, "device"),

    # ---- token_logprobs
    row("token_logprobs", "shape", "labels [B, T+1] for logits [B, T, V]",
        lambda v: dict(labels=_labels(B, T + 1)), VE, "labels"),
    row("token_logprobs", "shape", "logits 1-d", lambda v: dict(logits=_f(V)), VE, "logits"),
    row("token_logprobs", "dtype", "labels float", lambda v: dict(labels=v["labels"].float()), TE, "labels"),
    row("token_logprobs", "dtype", "logits int64", lambda v: dict(logits=v["labels"][..., None].expand(B, T, V)),
        TE, "logits"),
    row("token_logprobs", "device", "labels on another device", lambda v: dict(labels=_meta(v["labels"])),
        VE, "labels"),
    row("token_logprobs", "device", "logits on another device", lambda v: dict(logits=_meta(v["logits"])),
        VE, "logits"),
    row("token_logprobs", "range", "a label = V", lambda v: dict(labels=_with_first(v["labels"], V)), VE, "labels"),
    row("token_logprobs", "range", "a label = -1 (ignore_index=-100)",
        lambda v: dict(labels=_with_first(v["labels"], -1)), VE, "labels"),
    row("token_logprobs", "range", "temperature=-1", lambda v: dict(temperature=-1.0), VE, "temperature"),
    row("token_logprobs", "range", "temperature=0", lambda v: dict(temperature=0.0), VE, "temperature"),
    row("token_logprobs", "non-finite", "a NaN logit with check_finite=True",
        lambda v: dict(logits=_with_first(v["logits"]), check_finite=True), VE, "logits"),
    row("token_logprobs", "non-finite", "an inf logit with check_finite=True",
        lambda v: dict(logits=_with_first(v["logits"], float("inf")), check_finite=True), VE, "logits"),
    row("token_logprobs", "non-finite", "temperature=nan", lambda v: dict(temperature=float("nan")), VE, "temperature"),
    row("token_logprobs", "option", "backend='nope'", lambda v: dict(backend="nope"), VE, "backend"),
    row("token_logprobs", "option", "backend='cuda' on CPU tensors", lambda v: dict(backend="cuda"), BUE, "backend"),
    row("token_logprobs", "option", "temperature='1'", lambda v: dict(temperature="1"), TE, "temperature"),
    row("token_logprobs", "option", "ignore_index=1.5", lambda v: dict(ignore_index=1.5), TE, "ignore_index"),

    # ---- sequence_logprobs
    row("sequence_logprobs", "shape", "mask [B, T+1]", lambda v: dict(mask=_mask(B, T + 1)), VE, "mask"),
    row("sequence_logprobs", "dtype", "labels float", lambda v: dict(labels=v["labels"].float()), TE, "labels"),
    row("sequence_logprobs", "device", "mask on another device", lambda v: dict(mask=_meta(v["mask"])), VE, "mask"),
    row("sequence_logprobs", "device", "logits on another device", lambda v: dict(logits=_meta(v["logits"])),
        VE, "logits"),
    row("sequence_logprobs", "range", "a label = V", lambda v: dict(labels=_with_first(v["labels"], V)), VE, "labels"),
    row("sequence_logprobs", "range", "a mask value 2", lambda v: dict(mask=_with_first(v["mask"].long(), 2)),
        VE, "mask"),
    row("sequence_logprobs", "non-finite", "a NaN mask value", lambda v: dict(mask=_with_first(v["mask"].float())),
        VE, "mask"),
    row("sequence_logprobs", "non-finite", "temperature=inf", lambda v: dict(temperature=float("inf")),
        VE, "temperature"),
    row("sequence_logprobs", "option", "agg='token-mean'", lambda v: dict(agg="token-mean"), VE, "agg"),
    row("sequence_logprobs", "option", "backend='cuda' on CPU tensors", lambda v: dict(backend="cuda"), BUE, "backend"),

    # ---- sft_loss
    row("sft_loss", "shape", "labels [B, T+1]", lambda v: dict(labels=_labels(B, T + 1)), VE, "labels"),
    row("sft_loss", "shape", "seq_weights [B+1] (weighting='iw')",
        lambda v: dict(weighting="iw", seq_weights=_f(B + 1, lo=0.5, hi=1)), VE, "seq_weights"),
    row("sft_loss", "dtype", "logits int64", lambda v: dict(logits=v["labels"][..., None].expand(B, T, V)),
        TE, "logits"),
    row("sft_loss", "dtype", "seq_weights int64", lambda v: dict(weighting="iw", seq_weights=torch.ones(B).long()),
        TE, "seq_weights"),
    row("sft_loss", "device", "labels on another device", lambda v: dict(labels=_meta(v["labels"])), VE, "labels"),
    row("sft_loss", "device", "logits on another device", lambda v: dict(logits=_meta(v["logits"])),
        VE, "logits"),
    row("sft_loss", "range", "a label = -1", lambda v: dict(labels=_with_first(v["labels"], -1)), VE, "labels"),
    row("sft_loss", "range", "cutoff_prob=1.5", lambda v: dict(weighting="chord_phi", cutoff_prob=1.5),
        VE, "cutoff_prob"),
    row("sft_loss", "range", "normalizer=-1", lambda v: dict(normalizer=-1.0), VE, "normalizer"),
    row("sft_loss", "non-finite", "normalizer=nan", lambda v: dict(normalizer=float("nan")), VE, "normalizer"),
    row("sft_loss", "option", "weighting='nope'", lambda v: dict(weighting="nope"), VE, "weighting"),
    row("sft_loss", "option", "weighting='iw' without seq_weights", lambda v: dict(weighting="iw"), VE, "seq_weights"),
    row("sft_loss", "option", "backend='nope'", lambda v: dict(backend="nope"), VE, "backend"),

    # ---- iw_sft_weights
    row("iw_sft_weights", "shape", "seq_logp_ref [B+1]", lambda v: dict(seq_logp_ref=_f(B + 1)), VE, "seq_logp_ref"),
    row("iw_sft_weights", "shape", "valid_rows [B+1] (self_normalize=True)",
        lambda v: dict(self_normalize=True, valid_rows=_mask(B + 1)), VE, "valid_rows"),
    row("iw_sft_weights", "dtype", "seq_logp_q int64", lambda v: dict(seq_logp_q=torch.zeros(B, dtype=torch.long)),
        TE, "seq_logp_q"),
    row("iw_sft_weights", "device", "seq_logp_ref on another device",
        lambda v: dict(seq_logp_ref=_meta(v["seq_logp_ref"])), VE, "seq_logp_ref"),
    row("iw_sft_weights", "range", "clip=(10, 0) (bounds inverted)", lambda v: dict(clip=(10.0, 0.0)), VE, "clip"),
    row("iw_sft_weights", "range", "a valid_rows value 2 (self_normalize=True)",
        lambda v: dict(self_normalize=True, valid_rows=_with_first(torch.ones(B), 2)), VE, "valid_rows"),
    row("iw_sft_weights", "device", "valid_rows on another device (self_normalize=True)",
        lambda v: dict(self_normalize=True, valid_rows=_meta(_mask(B))), VE, "valid_rows"),
    row("iw_sft_weights", "non-finite", "clip=(0, nan)", lambda v: dict(clip=(0.0, float("nan"))), VE, "clip"),
    row("iw_sft_weights", "option", "clip='wide'", lambda v: dict(clip="wide"), TE, "clip"),
    row("iw_sft_weights", "option", "self_normalize='yes'", lambda v: dict(self_normalize="yes"), TE, "self_normalize"),

    # ---- chord_loss
    row("chord_loss", "shape", "old_logp [B, T+1]", lambda v: dict(old_logp=_f(B, T + 1)), VE, "old_logp"),
    row("chord_loss", "shape", "expert_mask [B+1]", lambda v: dict(expert_mask=_mask(B + 1)), VE, "expert_mask"),
    row("chord_loss", "dtype", "logp int64", lambda v: dict(logp=torch.zeros(B, T, dtype=torch.long)), TE, "logp"),
    row("chord_loss", "device", "advantages on another device", lambda v: dict(advantages=_meta(v["advantages"])),
        VE, "advantages"),
    # logp sets the token layout: the message names the argument checked against it (mask) and
    # calls logp "the tokens".
    row("chord_loss", "device", "logp on another device", lambda v: dict(logp=_meta(v["logp"])),
        VE, "mask"),
    row("chord_loss", "range", "mu=1.5", lambda v: dict(mu=1.5), VE, "mu"),
    row("chord_loss", "range", "a mask value 2", lambda v: dict(mask=_with_first(v["mask"].long(), 2)), VE, "mask"),
    row("chord_loss", "range", "clip_low=-0.1", lambda v: dict(clip_low=-0.1), VE, "clip_low"),
    row("chord_loss", "non-finite", "mu=nan", lambda v: dict(mu=float("nan")), VE, "mu"),
    row("chord_loss", "option", "sft_weighting='nope'", lambda v: dict(sft_weighting="nope"), VE, "sft_weighting"),
    row("chord_loss", "option", "agg='nope'", lambda v: dict(agg="nope"), VE, "agg"),
    row("chord_loss", "option", "mu='half'", lambda v: dict(mu="half"), TE, "mu"),

    # ---- chord_mu_schedule
    row("chord_mu_schedule", "range", "step=-1", lambda v: dict(step=-1), VE, "step"),
    row("chord_mu_schedule", "range", "mu_peak=1.5", lambda v: dict(mu_peak=1.5), VE, "mu_peak"),
    row("chord_mu_schedule", "non-finite", "mu_valley=nan", lambda v: dict(mu_valley=float("nan")), VE, "mu_valley"),
    row("chord_mu_schedule", "option", "step=1.5", lambda v: dict(step=1.5), TE, "step"),
    row("chord_mu_schedule", "option", "decay_steps='200'", lambda v: dict(decay_steps="200"), TE, "decay_steps"),

    # ---- dpo_loss
    row("dpo_loss", "shape", "policy_rejected_logps [B+1]", lambda v: dict(policy_rejected_logps=_f(B + 1)),
        VE, "policy_rejected_logps"),
    row("dpo_loss", "shape", "policy_chosen_logps [B, 1]", lambda v: dict(policy_chosen_logps=_f(B, 1)),
        VE, "policy_chosen_logps"),
    row("dpo_loss", "dtype", "ref_chosen_logps int64",
        lambda v: dict(ref_chosen_logps=torch.zeros(B, dtype=torch.long)), TE, "ref_chosen_logps"),
    row("dpo_loss", "device", "ref_rejected_logps on another device",
        lambda v: dict(ref_rejected_logps=_meta(v["ref_rejected_logps"])), VE, "ref_rejected_logps"),
    row("dpo_loss", "range", "beta=-0.1", lambda v: dict(beta=-0.1), VE, "beta"),
    row("dpo_loss", "range", "label_smoothing=0.7", lambda v: dict(label_smoothing=0.7), VE, "label_smoothing"),
    row("dpo_loss", "non-finite", "beta=nan", lambda v: dict(beta=float("nan")), VE, "beta"),
    row("dpo_loss", "option", "loss_type='nope'", lambda v: dict(loss_type="nope"), VE, "loss_type"),
    row("dpo_loss", "option", "ref_rejected_logps=None with ref_chosen_logps given",
        lambda v: dict(ref_rejected_logps=None), VE, "ref_rejected_logps"),

    # ---- orpo_loss
    row("orpo_loss", "shape", "rejected_lengths [B+1]", lambda v: dict(rejected_lengths=torch.full((B + 1,), 3)),
        VE, "rejected_lengths"),
    row("orpo_loss", "dtype", "policy_chosen_logps int64", lambda v: dict(policy_chosen_logps=torch.zeros(B).long()),
        TE, "policy_chosen_logps"),
    row("orpo_loss", "device", "policy_rejected_logps on another device",
        lambda v: dict(policy_rejected_logps=_meta(v["policy_rejected_logps"])), VE, "policy_rejected_logps"),
    row("orpo_loss", "range", "beta=0", lambda v: dict(beta=0.0), VE, "beta"),
    row("orpo_loss", "range", "a negative chosen length",
        lambda v: dict(chosen_lengths=_with_first(v["chosen_lengths"], -2)), VE, "chosen_lengths"),
    row("orpo_loss", "device", "rejected_lengths on another device",
        lambda v: dict(rejected_lengths=_meta(v["rejected_lengths"])), VE, "rejected_lengths"),
    row("orpo_loss", "non-finite", "beta=inf", lambda v: dict(beta=float("inf")), VE, "beta"),
    row("orpo_loss", "option", "nll_loss of shape [B]", lambda v: dict(nll_loss=_f(B)), VE, "nll_loss"),

    # ---- gvpo_loss
    row("gvpo_loss", "shape", "rewards [B+1]", lambda v: dict(rewards=_f(B + 1)), VE, "rewards"),
    row("gvpo_loss", "shape", "anchor_logp [B+1]", lambda v: dict(anchor_logp=_f(B + 1)), VE, "anchor_logp"),
    row("gvpo_loss", "dtype", "rewards int64", lambda v: dict(rewards=torch.ones(B, dtype=torch.long)), TE, "rewards"),
    row("gvpo_loss", "device", "anchor_logp on another device", lambda v: dict(anchor_logp=_meta(v["anchor_logp"])),
        VE, "anchor_logp"),
    row("gvpo_loss", "range", "group_size=1", lambda v: dict(group_size=1), VE, "group_size"),
    row("gvpo_loss", "range", "beta=-1", lambda v: dict(beta=-1.0), VE, "beta"),
    row("gvpo_loss", "non-finite", "beta=nan", lambda v: dict(beta=float("nan")), VE, "beta"),
    row("gvpo_loss", "option", "agg='token-mean'", lambda v: dict(agg="token-mean"), VE, "agg"),
    row("gvpo_loss", "option", "group_size=2.0", lambda v: dict(group_size=2.0), TE, "group_size"),

    # ---- rahf_loss
    row("rahf_loss", "shape", "base_hidden [B, T, H+1]",
        lambda v: dict(base_hidden=_f(B, T, H + 1)), VE, "base_hidden"),
    row("rahf_loss", "shape", "mask [B, T+1]", lambda v: dict(mask=_mask(B, T + 1)), VE, "mask"),
    row("rahf_loss", "dtype", "lora_hidden int64", lambda v: dict(lora_hidden=torch.zeros(B, T, H, dtype=torch.long)),
        TE, "lora_hidden"),
    row("rahf_loss", "device", "direction on another device", lambda v: dict(direction=_meta(v["direction"])),
        VE, "direction"),
    row("rahf_loss", "range", "a mask value 2", lambda v: dict(mask=_with_first(v["mask"].long(), 2)), VE, "mask"),
    row("rahf_loss", "non-finite", "alpha=nan", lambda v: dict(alpha=float("nan")), VE, "alpha"),
    row("rahf_loss", "option", "alpha='5'", lambda v: dict(alpha="5"), TE, "alpha"),
    row("rahf_loss", "option", "count_padding='yes'", lambda v: dict(count_padding="yes"), TE, "count_padding"),

    # ---- log1mexp
    row("log1mexp", "dtype", "x int64", lambda v: dict(x=torch.full((B,), -1, dtype=torch.long)), TE, "x"),
    row("log1mexp", "non-finite", "x = +inf (above the domain x <= 0)",
        lambda v: dict(x=torch.tensor([-1.0, float("inf")])), VE, "x"),
    row("log1mexp", "range", "x > 0", lambda v: dict(x=torch.tensor([0.5, -1.0])), VE, "x"),
    row("log1mexp", "option", "x a list", lambda v: dict(x=[-1.0, -2.0]), TE, "x"),

    # ---- policy_loss
    row("policy_loss", "shape", "old_logp [B, T+1]", lambda v: dict(old_logp=_f(B, T + 1)), VE, "old_logp"),
    row("policy_loss", "shape", "advantages [B+1]", lambda v: dict(advantages=_f(B + 1)), VE, "advantages"),
    row("policy_loss", "shape", "logp 3-d", lambda v: dict(logp=_f(B, T, 2)), VE, "logp"),
    row("policy_loss", "dtype", "logp int64", lambda v: dict(logp=torch.zeros(B, T, dtype=torch.long)), TE, "logp"),
    row("policy_loss", "dtype", "advantages int64", lambda v: dict(advantages=torch.ones(B, dtype=torch.long)),
        TE, "advantages"),
    row("policy_loss", "device", "old_logp on another device", lambda v: dict(old_logp=_meta(v["old_logp"])),
        VE, "old_logp"),
    row("policy_loss", "device", "mask on another device", lambda v: dict(mask=_meta(v["mask"])), VE, "mask"),
    # logp sets the token layout: the message names the argument checked against it (mask) and
    # calls logp "the tokens".
    row("policy_loss", "device", "logp on another device", lambda v: dict(logp=_meta(v["logp"])),
        VE, "mask"),
    row("policy_loss", "range", "clip_low=-0.2", lambda v: dict(clip_low=-0.2), VE, "clip_low"),
    row("policy_loss", "range", "clip_ratio_c=0.5 (dual clip below 1)", lambda v: dict(clip_ratio_c=0.5),
        VE, "clip_ratio_c"),
    row("policy_loss", "range", "a mask value 2", lambda v: dict(mask=_with_first(v["mask"].long(), 2)), VE, "mask"),
    row("policy_loss", "range", "kl_coef=-1", lambda v: dict(kl_coef=-1.0, ref_logp=v["old_logp"]), VE, "kl_coef"),
    row("policy_loss", "non-finite", "clip_high=inf", lambda v: dict(clip_high=float("inf")), VE, "clip_high"),
    row("policy_loss", "non-finite", "kl_coef=nan", lambda v: dict(kl_coef=float("nan"), ref_logp=v["old_logp"]),
        VE, "kl_coef"),
    row("policy_loss", "option", "method='nope'", lambda v: dict(method="nope"), VE, "method"),
    row("policy_loss", "option", "agg='nope'", lambda v: dict(agg="nope"), VE, "agg"),
    row("policy_loss", "option", "kl_estimator='k9'", lambda v: dict(kl_estimator="k9", ref_logp=v["old_logp"],
                                                                      kl_coef=0.1), VE, "kl_estimator"),
    row("policy_loss", "option", "an unknown method option bogus=1", lambda v: dict(bogus=1), TE, "bogus"),
    row("policy_loss", "option", "agg='seq-mean-token-sum-norm' without max_len",
        lambda v: dict(agg="seq-mean-token-sum-norm"), VE, "max_len"),
    row("policy_loss", "option", "kl_coef=0.1 without ref_logp", lambda v: dict(kl_coef=0.1), VE, "ref_logp"),

    # ---- fused_policy_loss
    row("fused_policy_loss", "shape", "labels [B, T+1]", lambda v: dict(labels=_labels(B, T + 1)), VE, "labels"),
    row("fused_policy_loss", "shape", "old_logp [B, T+1]", lambda v: dict(old_logp=_f(B, T + 1)), VE, "old_logp"),
    row("fused_policy_loss", "dtype", "labels float", lambda v: dict(labels=v["labels"].float()), TE, "labels"),
    row("fused_policy_loss", "dtype", "old_logp int64", lambda v: dict(old_logp=torch.zeros(B, T, dtype=torch.long)),
        TE, "old_logp"),
    row("fused_policy_loss", "device", "advantages on another device",
        lambda v: dict(advantages=_meta(v["advantages"])), VE, "advantages"),
    row("fused_policy_loss", "device", "logits on another device", lambda v: dict(logits=_meta(v["logits"])),
        VE, "logits"),
    row("fused_policy_loss", "range", "a label = V", lambda v: dict(labels=_with_first(v["labels"], V)), VE, "labels"),
    row("fused_policy_loss", "range", "temperature=-1", lambda v: dict(temperature=-1.0), VE, "temperature"),
    row("fused_policy_loss", "range", "a mask value 2",
        lambda v: dict(mask=_with_first(v["mask"].long(), 2)), VE, "mask"),
    row("fused_policy_loss", "non-finite", "temperature=nan", lambda v: dict(temperature=float("nan")),
        VE, "temperature"),
    row("fused_policy_loss", "option", "method='nope'", lambda v: dict(method="nope"), VE, "method"),
    row("fused_policy_loss", "option", "backend='cuda' on CPU tensors", lambda v: dict(backend="cuda"), BUE, "backend"),
    row("fused_policy_loss", "option", "backend='nope'", lambda v: dict(backend="nope"), VE, "backend"),

    # ---- value_loss
    row("value_loss", "shape", "returns [B, T+1]", lambda v: dict(returns=_f(B, T + 1)), VE, "returns"),
    row("value_loss", "shape", "values 1-d", lambda v: dict(values=_f(B)), VE, "values"),
    row("value_loss", "dtype", "values int64",
        lambda v: dict(values=torch.zeros(B, T, dtype=torch.long)), TE, "values"),
    row("value_loss", "dtype", "old_values int64", lambda v: dict(old_values=torch.zeros(B, T, dtype=torch.long)),
        TE, "old_values"),
    row("value_loss", "device", "old_values on another device", lambda v: dict(old_values=_meta(v["old_values"])),
        VE, "old_values"),
    # values sets the token layout: the message names the argument checked against it (old_values) and
    # calls values "the tokens".
    row("value_loss", "device", "values on another device", lambda v: dict(values=_meta(v["values"])),
        VE, "old_values"),
    row("value_loss", "range", "cliprange_value=-0.5", lambda v: dict(cliprange_value=-0.5), VE, "cliprange_value"),
    row("value_loss", "range", "a mask value 2", lambda v: dict(mask=_with_first(v["mask"].long(), 2)), VE, "mask"),
    row("value_loss", "non-finite", "cliprange_value=nan", lambda v: dict(cliprange_value=float("nan")),
        VE, "cliprange_value"),
    row("value_loss", "option", "agg='nope'", lambda v: dict(agg="nope"), VE, "agg"),
    row("value_loss", "option", "agg='seq-mean-token-sum-norm' without max_len",
        lambda v: dict(agg="seq-mean-token-sum-norm"), VE, "max_len"),

    # ---- fused_linear_token_logprobs
    row("fused_linear_token_logprobs", "shape", "weight [V, H+1]", lambda v: dict(weight=_f(V, H + 1)), VE, "weight"),
    row("fused_linear_token_logprobs", "shape", "labels [B, T+1]", lambda v: dict(labels=_labels(B, T + 1)),
        VE, "labels"),
    row("fused_linear_token_logprobs", "shape", "bias [V+1]", lambda v: dict(bias=_f(V + 1)), VE, "bias"),
    row("fused_linear_token_logprobs", "dtype", "hidden int64", lambda v: dict(hidden=torch.zeros(B, T, H).long()),
        TE, "hidden"),
    row("fused_linear_token_logprobs", "dtype", "weight float64 for float32 hidden",
        lambda v: dict(weight=v["weight"].double()), TE, "weight"),
    row("fused_linear_token_logprobs", "device", "weight on another device", lambda v: dict(weight=_meta(v["weight"])),
        VE, "weight"),
    row("fused_linear_token_logprobs", "device", "hidden on another device", lambda v: dict(hidden=_meta(v["hidden"])),
        VE, "hidden"),
    row("fused_linear_token_logprobs", "range", "a label = V", lambda v: dict(labels=_with_first(v["labels"], V)),
        VE, "labels"),
    row("fused_linear_token_logprobs", "range", "temperature=0", lambda v: dict(temperature=0.0), VE, "temperature"),
    row("fused_linear_token_logprobs", "range", "softcap=-1", lambda v: dict(softcap=-1.0), VE, "softcap"),
    row("fused_linear_token_logprobs", "range", "chunk_size=0", lambda v: dict(chunk_size=0), VE, "chunk_size"),
    row("fused_linear_token_logprobs", "non-finite", "logit_scale=inf", lambda v: dict(logit_scale=float("inf")),
        VE, "logit_scale"),
    row("fused_linear_token_logprobs", "option", "backend='cuda' on CPU tensors", lambda v: dict(backend="cuda"),
        BUE, "backend"),
    row("fused_linear_token_logprobs", "option", "chunk_size=1.5", lambda v: dict(chunk_size=1.5), TE, "chunk_size"),
    row("fused_linear_token_logprobs", "option", "reduce_hidden_grad=False without vocab_process_group",
        lambda v: dict(reduce_hidden_grad=False), VE, "reduce_hidden_grad"),

    # ---- fused_linear_policy_loss
    row("fused_linear_policy_loss", "shape", "hidden 1-d", lambda v: dict(hidden=_f(H)), VE, "hidden"),
    row("fused_linear_policy_loss", "shape", "advantages [B+1]",
        lambda v: dict(advantages=_f(B + 1)), VE, "advantages"),
    row("fused_linear_policy_loss", "dtype", "labels float", lambda v: dict(labels=v["labels"].float()), TE, "labels"),
    row("fused_linear_policy_loss", "device", "labels on another device", lambda v: dict(labels=_meta(v["labels"])),
        VE, "labels"),
    row("fused_linear_policy_loss", "device", "hidden on another device", lambda v: dict(hidden=_meta(v["hidden"])),
        VE, "hidden"),
    row("fused_linear_policy_loss", "range", "a label = -1", lambda v: dict(labels=_with_first(v["labels"], -1)),
        VE, "labels"),
    row("fused_linear_policy_loss", "range", "clip_low=-0.2", lambda v: dict(clip_low=-0.2), VE, "clip_low"),
    row("fused_linear_policy_loss", "non-finite", "temperature=nan", lambda v: dict(temperature=float("nan")),
        VE, "temperature"),
    row("fused_linear_policy_loss", "option", "method='nope'", lambda v: dict(method="nope"), VE, "method"),
    row("fused_linear_policy_loss", "option", "backend='nope'", lambda v: dict(backend="nope"), VE, "backend"),

    # ---- fused_linear_sequence_logprobs
    row("fused_linear_sequence_logprobs", "shape", "mask [B, T+1]", lambda v: dict(mask=_mask(B, T + 1)), VE, "mask"),
    row("fused_linear_sequence_logprobs", "dtype", "weight int64", lambda v: dict(weight=torch.zeros(V, H).long()),
        TE, "weight"),
    row("fused_linear_sequence_logprobs", "device", "mask on another device", lambda v: dict(mask=_meta(v["mask"])),
        VE, "mask"),
    # hidden sets the token layout: the message names the argument checked against it (mask) and
    # calls hidden "the tokens".
    row("fused_linear_sequence_logprobs", "device", "hidden on another device",
        lambda v: dict(hidden=_meta(v["hidden"])), VE, "mask"),
    row("fused_linear_sequence_logprobs", "range", "a label = V", lambda v: dict(labels=_with_first(v["labels"], V)),
        VE, "labels"),
    row("fused_linear_sequence_logprobs", "range", "a mask value 2",
        lambda v: dict(mask=_with_first(v["mask"].long(), 2)), VE, "mask"),
    row("fused_linear_sequence_logprobs", "non-finite", "softcap=nan", lambda v: dict(softcap=float("nan")),
        VE, "softcap"),
    row("fused_linear_sequence_logprobs", "option", "agg='token-mean'", lambda v: dict(agg="token-mean"), VE, "agg"),
    row("fused_linear_sequence_logprobs", "option", "backend='cuda' on CPU tensors", lambda v: dict(backend="cuda"),
        BUE, "backend"),

    # ---- fused_linear_sft_loss
    row("fused_linear_sft_loss", "shape", "weight 1-d", lambda v: dict(weight=_f(V)), VE, "weight"),
    row("fused_linear_sft_loss", "dtype", "hidden int64", lambda v: dict(hidden=torch.zeros(B, T, H).long()),
        TE, "hidden"),
    row("fused_linear_sft_loss", "device", "weight on another device", lambda v: dict(weight=_meta(v["weight"])),
        VE, "weight"),
    # hidden sets the token layout: the message names the argument checked against it (mask) and
    # calls hidden "the tokens".
    row("fused_linear_sft_loss", "device", "hidden on another device", lambda v: dict(hidden=_meta(v["hidden"])),
        VE, "mask"),
    row("fused_linear_sft_loss", "range", "a label = V",
        lambda v: dict(labels=_with_first(v["labels"], V)), VE, "labels"),
    row("fused_linear_sft_loss", "range", "cutoff_prob=0", lambda v: dict(weighting="chord_phi", cutoff_prob=0.0),
        VE, "cutoff_prob"),
    row("fused_linear_sft_loss", "non-finite", "temperature=inf", lambda v: dict(temperature=float("inf")),
        VE, "temperature"),
    row("fused_linear_sft_loss", "option", "weighting='nope'", lambda v: dict(weighting="nope"), VE, "weighting"),
    row("fused_linear_sft_loss", "option", "backend='cuda' on CPU tensors", lambda v: dict(backend="cuda"),
        BUE, "backend"),

    # ---- group estimators (rewards [B], groups of group_size consecutive rows or group_ids)
    *[r for fn in ("group_stats", "grpo_advantages", "rloo_advantages", "gvpo_centered_rewards", "gpg_advantages",
                   "dynamic_sampling_mask")
      for r in (
        row(fn, "shape", "rewards [B, 1]", lambda v: dict(rewards=v["rewards"][:, None]), VE, "rewards"),
        row(fn, "shape", "group_ids [B+1]", lambda v: dict(group_size=None, group_ids=torch.tensor([0, 0, 1, 1, 1])),
            VE, "group_ids"),
        row(fn, "dtype", "rewards complex", lambda v: dict(rewards=v["rewards"].to(torch.complex64)), TE, "rewards"),
        row(fn, "dtype", "group_ids float", lambda v: dict(group_size=None, group_ids=torch.tensor([0.0, 0, 1, 1])),
            TE, "group_ids"),
        row(fn, "device", "group_ids on another device",
            lambda v: dict(group_size=None, group_ids=_meta(torch.tensor([0, 0, 1, 1]))), VE, "group_ids"),
        row(fn, "range", "group_size=3 for B=4", lambda v: dict(group_size=3), VE, "group_size"),
        row(fn, "range", "group_ids outside [0, num_groups)",
            lambda v: dict(group_size=None, group_ids=torch.tensor([0, 0, 2, 2]), num_groups=2), VE, "group_ids"),
        row(fn, "non-finite", "an inf reward (NaN is an unscorable reward)",
            lambda v: dict(rewards=_with_first(v["rewards"], float("inf"))), VE, "rewards"),
        row(fn, "option", "group_size=2.0", lambda v: dict(group_size=2.0), TE, "group_size"),
        row(fn, "option", "both group_size and group_ids", lambda v: dict(group_ids=torch.tensor([0, 0, 1, 1])),
            VE, "group_ids"),
        row(fn, "option", "backend='cuda' (the advantage ops have no cuda kernel)", lambda v: dict(backend="cuda"),
            BUE, "backend"),
      )],
    row("grpo_advantages", "range", "std_eps=-1", lambda v: dict(std_eps=-1.0), VE, "std_eps"),
    row("grpo_advantages", "option", "scale='nope'", lambda v: dict(scale="nope"), VE, "scale"),
    row("grpo_advantages", "option", "singleton='nope'", lambda v: dict(singleton="nope"), VE, "singleton"),
    row("grpo_advantages", "option", "a singleton group with singleton='error'",
        lambda v: dict(group_size=None, group_ids=torch.tensor([0, 0, 0, 1])), VE, "singleton"),
    row("rloo_advantages", "option", "singleton='nope'", lambda v: dict(singleton="nope"), VE, "singleton"),
    row("gpg_advantages", "option", "alpha_mode='nope'", lambda v: dict(alpha_mode="nope"), VE, "alpha_mode"),
    row("gpg_advantages", "option", "f_norm='nope'", lambda v: dict(f_norm="nope"), VE, "f_norm"),
    row("gpg_advantages", "non-finite", "std_eps=nan", lambda v: dict(std_eps=float("nan")), VE, "std_eps"),
    row("dynamic_sampling_mask", "range", "std_eps=-1", lambda v: dict(std_eps=-1.0), VE, "std_eps"),

    # ---- seed_grpo_advantages
    row("seed_grpo_advantages", "shape", "semantic_entropy [3] (neither [P] nor [B])",
        lambda v: dict(semantic_entropy=_f(3)), VE, "semantic_entropy"),
    row("seed_grpo_advantages", "shape", "rewards [B, 1]",
        lambda v: dict(rewards=v["rewards"][:, None]), VE, "rewards"),
    row("seed_grpo_advantages", "dtype", "semantic_entropy complex",
        lambda v: dict(semantic_entropy=v["semantic_entropy"].to(torch.complex64)), TE, "semantic_entropy"),
    row("seed_grpo_advantages", "device", "semantic_entropy on another device",
        lambda v: dict(semantic_entropy=_meta(v["semantic_entropy"])), VE, "semantic_entropy"),
    row("seed_grpo_advantages", "range", "alpha=-1", lambda v: dict(alpha=-1.0), VE, "alpha"),
    row("seed_grpo_advantages", "range", "group_size=3 for B=4", lambda v: dict(group_size=3), VE, "group_size"),
    row("seed_grpo_advantages", "non-finite", "a NaN semantic entropy",
        lambda v: dict(semantic_entropy=_with_first(v["semantic_entropy"])), VE, "semantic_entropy"),
    row("seed_grpo_advantages", "non-finite", "an inf reward",
        lambda v: dict(rewards=_with_first(v["rewards"], float("inf"))), VE, "rewards"),
    row("seed_grpo_advantages", "option", "base='nope'", lambda v: dict(base="nope"), VE, "base"),
    row("seed_grpo_advantages", "option", "backend='nope'", lambda v: dict(backend="nope"), VE, "backend"),

    # ---- semantic_entropy
    row("semantic_entropy", "shape", "cluster_ids [B, 1]", lambda v: dict(cluster_ids=v["cluster_ids"][:, None]),
        VE, "cluster_ids"),
    row("semantic_entropy", "dtype", "cluster_ids float", lambda v: dict(cluster_ids=v["cluster_ids"].float()),
        TE, "cluster_ids"),
    row("semantic_entropy", "device", "group_ids on another device",
        lambda v: dict(group_size=None, group_ids=_meta(torch.tensor([0, 0, 1, 1]))), VE, "group_ids"),
    row("semantic_entropy", "range", "group_size=3 for B=4", lambda v: dict(group_size=3), VE, "group_size"),
    row("semantic_entropy", "option", "group_size='2'", lambda v: dict(group_size="2"), TE, "group_size"),

    # ---- remax_advantages
    row("remax_advantages", "shape", "greedy_rewards [B+1]", lambda v: dict(greedy_rewards=_f(B + 1)),
        VE, "greedy_rewards"),
    row("remax_advantages", "shape", "mask with [B] rewards", lambda v: dict(mask=_mask(B, T)), VE, "mask"),
    row("remax_advantages", "dtype", "greedy_rewards complex",
        lambda v: dict(greedy_rewards=v["greedy_rewards"].to(torch.complex64)), TE, "greedy_rewards"),
    row("remax_advantages", "device", "greedy_rewards on another device",
        lambda v: dict(greedy_rewards=_meta(v["greedy_rewards"])), VE, "greedy_rewards"),
    row("remax_advantages", "range", "a mask value 2 (token-level rewards)",
        lambda v: dict(rewards=_f(B, T), mask=_with_first(torch.ones(B, T), 2)), VE, "mask"),
    row("remax_advantages", "non-finite", "an inf greedy reward",
        lambda v: dict(greedy_rewards=_with_first(v["greedy_rewards"], float("inf"))), VE, "greedy_rewards"),
    row("remax_advantages", "option", "validate_mask='yes'",
        lambda v: dict(rewards=_f(B, T), mask=_mask(B, T), validate_mask="yes"), TE, "validate_mask"),

    # ---- masked_mean, masked_var, masked_whiten
    *[r for fn in ("masked_mean", "masked_var", "masked_whiten") for r in (
        row(fn, "shape", "mask [B, T+1]", lambda v: dict(mask=_mask(B, T + 1)), VE, "mask"),
        row(fn, "dtype", "x complex", lambda v: dict(x=v["x"].to(torch.complex64)), TE, "x"),
        row(fn, "device", "mask on another device", lambda v: dict(mask=_meta(v["mask"])), VE, "mask"),
        row(fn, "range", "a mask value 2", lambda v: dict(mask=_with_first(v["mask"].long(), 2)), VE, "mask"),
        row(fn, "non-finite", "a NaN mask value", lambda v: dict(mask=_with_first(v["mask"].float())), VE, "mask"),
        row(fn, "option", "backend='cuda' (no cuda kernel)", lambda v: dict(backend="cuda"), BUE, "backend"),
        row(fn, "option", "validate_mask='yes'", lambda v: dict(validate_mask="yes"), TE, "validate_mask"),
    )],
    row("masked_mean", "range", "dim=2 for a 2-d x", lambda v: dict(dim=2), VE, "dim"),
    row("masked_mean", "option", "dim=1.0", lambda v: dict(dim=1.0), TE, "dim"),
    row("masked_var", "option", "unbiased='yes'", lambda v: dict(unbiased="yes"), TE, "unbiased"),
    row("masked_whiten", "range", "var_eps=-1", lambda v: dict(var_eps=-1.0), VE, "var_eps"),
    row("masked_whiten", "non-finite", "var_eps=inf", lambda v: dict(var_eps=float("inf")), VE, "var_eps"),
    row("masked_whiten", "option", "var='nope'", lambda v: dict(var="nope"), VE, "var"),
    row("masked_whiten", "option", "var_eps_mode='nope'", lambda v: dict(var_eps_mode="nope"), VE, "var_eps_mode"),
    row("masked_whiten", "option", "shift_mean='yes'", lambda v: dict(shift_mean="yes"), TE, "shift_mean"),

    # ---- gae_advantages
    row("gae_advantages", "shape", "values [B, T+1]", lambda v: dict(values=_f(B, T + 1)), VE, "values"),
    row("gae_advantages", "shape", "lam [B+1]", lambda v: dict(lam=torch.full((B + 1,), 0.9)), VE, "lam"),
    row("gae_advantages", "dtype", "values complex", lambda v: dict(values=v["values"].to(torch.complex64)),
        TE, "values"),
    row("gae_advantages", "device", "values on another device", lambda v: dict(values=_meta(v["values"])),
        VE, "values"),
    row("gae_advantages", "range", "gamma=1.5", lambda v: dict(gamma=1.5), VE, "gamma"),
    row("gae_advantages", "range", "lam=-0.1", lambda v: dict(lam=-0.1), VE, "lam"),
    row("gae_advantages", "range", "a critic_lam value 2",
        lambda v: dict(critic_lam=torch.tensor([1.0, 2.0, 1.0, 1.0])), VE, "critic_lam"),
    row("gae_advantages", "range", "a mask value 2", lambda v: dict(mask=_with_first(v["mask"].long(), 2)), VE, "mask"),
    row("gae_advantages", "non-finite", "gamma=nan", lambda v: dict(gamma=float("nan")), VE, "gamma"),
    row("gae_advantages", "option", "var='nope' with whiten=True", lambda v: dict(whiten=True, var="nope"), VE, "var"),
    row("gae_advantages", "option", "backend='cuda' (no cuda kernel)", lambda v: dict(backend="cuda"), BUE, "backend"),
    row("gae_advantages", "option", "whiten='yes'", lambda v: dict(whiten="yes"), TE, "whiten"),

    # ---- vapo_lambda
    row("vapo_lambda", "shape", "lengths [B, 1]", lambda v: dict(lengths=v["lengths"][:, None]), VE, "lengths"),
    row("vapo_lambda", "dtype", "lengths complex", lambda v: dict(lengths=v["lengths"].to(torch.complex64)),
        TE, "lengths"),
    row("vapo_lambda", "range", "alpha=-1", lambda v: dict(alpha=-1.0), VE, "alpha"),
    row("vapo_lambda", "non-finite", "alpha=nan", lambda v: dict(alpha=float("nan")), VE, "alpha"),
    row("vapo_lambda", "option", "alpha='0.05'", lambda v: dict(alpha="0.05"), TE, "alpha"),

    # ---- k1_penalty
    row("k1_penalty", "shape", "ref_logp [B, T+1]", lambda v: dict(ref_logp=_f(B, T + 1)), VE, "ref_logp"),
    row("k1_penalty", "dtype", "ref_logp complex", lambda v: dict(ref_logp=v["ref_logp"].to(torch.complex64)),
        TE, "ref_logp"),
    row("k1_penalty", "device", "ref_logp on another device", lambda v: dict(ref_logp=_meta(v["ref_logp"])),
        VE, "ref_logp"),
    row("k1_penalty", "range", "a mask value 2", lambda v: dict(mask=_with_first(v["mask"].long(), 2)), VE, "mask"),
    row("k1_penalty", "option", "validate_mask='yes'", lambda v: dict(validate_mask="yes"), TE, "validate_mask"),

    # ---- token_level_rewards
    row("token_level_rewards", "shape", "scores [B+1]", lambda v: dict(scores=_f(B + 1)), VE, "scores"),
    # kl, when given, sets the token layout: the mask is what is checked against it.
    row("token_level_rewards", "shape", "kl [B, T+1] with mask [B, T]", lambda v: dict(kl=_f(B, T + 1), kl_coef=0.1),
        VE, "mask"),
    row("token_level_rewards", "dtype", "scores complex", lambda v: dict(scores=v["scores"].to(torch.complex64)),
        TE, "scores"),
    row("token_level_rewards", "device", "scores on another device", lambda v: dict(scores=_meta(v["scores"])),
        VE, "scores"),
    row("token_level_rewards", "range", "a mask value 2",
        lambda v: dict(mask=_with_first(v["mask"].long(), 2)), VE, "mask"),
    row("token_level_rewards", "non-finite", "kl_coef=nan", lambda v: dict(kl=_f(B, T), kl_coef=float("nan")),
        VE, "kl_coef"),
    row("token_level_rewards", "non-finite", "an inf score",
        lambda v: dict(scores=_with_first(v["scores"], float("inf"))), VE, "scores"),
    row("token_level_rewards", "option", "no mask, kl or shape", lambda v: dict(mask=None), VE, "mask"),

    # ---- kl_penalized_scores
    row("kl_penalized_scores", "shape", "scores [B+1]", lambda v: dict(scores=_f(B + 1)), VE, "scores"),
    row("kl_penalized_scores", "shape", "ref_logp [B, T+1]", lambda v: dict(ref_logp=_f(B, T + 1)), VE, "ref_logp"),
    row("kl_penalized_scores", "dtype", "old_logp complex", lambda v: dict(old_logp=v["old_logp"].to(torch.complex64)),
        TE, "old_logp"),
    row("kl_penalized_scores", "device", "ref_logp on another device", lambda v: dict(ref_logp=_meta(v["ref_logp"])),
        VE, "ref_logp"),
    row("kl_penalized_scores", "device", "scores on another device", lambda v: dict(scores=_meta(v["scores"])),
        VE, "scores"),
    row("kl_penalized_scores", "range", "a mask value 2",
        lambda v: dict(mask=_with_first(v["mask"].long(), 2)), VE, "mask"),
    row("kl_penalized_scores", "non-finite", "kl_coef=inf", lambda v: dict(kl_coef=float("inf")), VE, "kl_coef"),
    row("kl_penalized_scores", "non-finite", "an inf score",
        lambda v: dict(scores=_with_first(v["scores"], float("inf"))), VE, "scores"),
    row("kl_penalized_scores", "option", "kl_coef='0.1'", lambda v: dict(kl_coef="0.1"), TE, "kl_coef"),

    # ---- reinforce_pp_advantages, reinforce_pp_baseline_advantages
    *[r for fn in ("reinforce_pp_advantages", "reinforce_pp_baseline_advantages") for r in (
        row(fn, "shape", "scores [B, 1]", lambda v: dict(scores=v["scores"][:, None]), VE, "scores"),
        # old_logp/ref_logp, when given, set the token layout: the mask is what is checked against it.
        row(fn, "shape", "old_logp, ref_logp [B, T+1] with mask [B, T]",
            lambda v: dict(old_logp=_f(B, T + 1), ref_logp=_f(B, T + 1), kl_coef=0.1), VE, "mask"),
        row(fn, "shape", "ref_logp [B, T+1]", lambda v: dict(old_logp=_f(B, T), ref_logp=_f(B, T + 1), kl_coef=0.1),
            VE, "ref_logp"),
        row(fn, "dtype", "scores complex", lambda v: dict(scores=v["scores"].to(torch.complex64)), TE, "scores"),
        row(fn, "device", "scores on another device", lambda v: dict(scores=_meta(v["scores"])), VE, "scores"),
        row(fn, "range", "a mask value 2", lambda v: dict(mask=_with_first(v["mask"].long(), 2)), VE, "mask"),
        row(fn, "range", "var_eps=-1", lambda v: dict(var_eps=-1.0), VE, "var_eps"),
        row(fn, "non-finite", "an inf score",
            lambda v: dict(scores=_with_first(v["scores"], float("inf"))), VE, "scores"),
        row(fn, "option", "var_eps_mode='nope'", lambda v: dict(var_eps_mode="nope"), VE, "var_eps_mode"),
        row(fn, "option", "old_logp without ref_logp", lambda v: dict(old_logp=_f(B, T)), VE, "ref_logp"),
        row(fn, "option", "backend='cuda' (no cuda kernel)", lambda v: dict(backend="cuda"), BUE, "backend"),
    )],
    row("reinforce_pp_advantages", "range", "gamma=1.5", lambda v: dict(gamma=1.5), VE, "gamma"),
    row("reinforce_pp_advantages", "non-finite", "a NaN score (NaN is not allowed here)",
        lambda v: dict(scores=_with_first(v["scores"])), VE, "scores"),
    row("reinforce_pp_baseline_advantages", "range", "group_size=3 for B=4", lambda v: dict(group_size=3),
        VE, "group_size"),
    row("reinforce_pp_baseline_advantages", "option", "singleton='nope'", lambda v: dict(singleton="nope"),
        VE, "singleton"),

    # ---- dler_advantages
    row("dler_advantages", "shape", "mask [B+1, T]", lambda v: dict(mask=_mask(B + 1, T)), VE, "mask"),
    row("dler_advantages", "shape", "truncated [B+1]", lambda v: dict(truncated=torch.zeros(B + 1, dtype=torch.bool)),
        VE, "truncated"),
    row("dler_advantages", "dtype", "rewards complex", lambda v: dict(rewards=v["rewards"].to(torch.complex64)),
        TE, "rewards"),
    row("dler_advantages", "device", "mask on another device", lambda v: dict(mask=_meta(v["mask"])), VE, "mask"),
    row("dler_advantages", "device", "lengths on another device",
        lambda v: dict(mask=None, lengths=_meta(torch.full((B,), 3.0))), VE, "lengths"),
    row("dler_advantages", "range", "std_eps=-1", lambda v: dict(std_eps=-1.0), VE, "std_eps"),
    row("dler_advantages", "range", "a mask value 2",
        lambda v: dict(mask=_with_first(v["mask"].long(), 2)), VE, "mask"),
    row("dler_advantages", "range", "a negative length",
        lambda v: dict(mask=None, lengths=torch.tensor([3.0, -1, 2, 2])), VE, "lengths"),
    row("dler_advantages", "non-finite", "an inf reward",
        lambda v: dict(rewards=_with_first(v["rewards"], float("inf"))), VE, "rewards"),
    row("dler_advantages", "option", "batch_std_of='nope'", lambda v: dict(batch_std_of="nope"), VE, "batch_std_of"),
    row("dler_advantages", "option", "stat_weighting='nope'",
        lambda v: dict(stat_weighting="nope"), VE, "stat_weighting"),
    row("dler_advantages", "option", "both mask and lengths", lambda v: dict(lengths=torch.full((B,), 3.0)),
        VE, "lengths"),

    # ---- awpo_advantages
    row("awpo_advantages", "shape", "reasoning_rewards [B+1]", lambda v: dict(reasoning_rewards=_f(B + 1)),
        VE, "reasoning_rewards"),
    row("awpo_advantages", "dtype", "reasoning_rewards complex",
        lambda v: dict(reasoning_rewards=v["reasoning_rewards"].to(torch.complex64)), TE, "reasoning_rewards"),
    row("awpo_advantages", "device", "reasoning_rewards on another device",
        lambda v: dict(reasoning_rewards=_meta(v["reasoning_rewards"])), VE, "reasoning_rewards"),
    row("awpo_advantages", "range", "tau_low > tau_high (bounds inverted)", lambda v: dict(tau_low=0.9, tau_high=0.1),
        VE, "tau_high"),
    row("awpo_advantages", "range", "clip_low_min > clip_low_max (bounds inverted)",
        lambda v: dict(clip_low_min=0.3, clip_low_max=0.1), VE, "clip_low_max"),
    row("awpo_advantages", "range", "eps_mix=-0.1", lambda v: dict(eps_mix=-0.1), VE, "eps_mix"),
    row("awpo_advantages", "non-finite", "an inf reasoning reward",
        lambda v: dict(reasoning_rewards=_with_first(v["reasoning_rewards"], float("inf"))), VE, "reasoning_rewards"),
    row("awpo_advantages", "non-finite", "alpha_prio=nan", lambda v: dict(alpha_prio=float("nan")), VE, "alpha_prio"),
    row("awpo_advantages", "option", "singleton='nope'", lambda v: dict(singleton="nope"), VE, "singleton"),
    row("awpo_advantages", "option", "backend='cuda' (no cuda kernel)", lambda v: dict(backend="cuda"), BUE, "backend"),

    # ---- dapo_overlong_penalty
    row("dapo_overlong_penalty", "shape", "lengths [B, 1]",
        lambda v: dict(lengths=v["lengths"][:, None]), VE, "lengths"),
    row("dapo_overlong_penalty", "dtype", "lengths complex", lambda v: dict(lengths=v["lengths"].to(torch.complex64)),
        TE, "lengths"),
    row("dapo_overlong_penalty", "range", "cache_length > max_length", lambda v: dict(cache_length=30),
        VE, "cache_length"),
    row("dapo_overlong_penalty", "range", "penalty_factor=-1",
        lambda v: dict(penalty_factor=-1.0), VE, "penalty_factor"),
    row("dapo_overlong_penalty", "non-finite", "penalty_factor=nan", lambda v: dict(penalty_factor=float("nan")),
        VE, "penalty_factor"),
    row("dapo_overlong_penalty", "option", "max_length=20.5", lambda v: dict(max_length=20.5), TE, "max_length"),

    # ---- rollout_correction (and the policy losses' rollout_logp= route)
    row("rollout_correction", "shape", "rollout_logp [B, T+1]", lambda v: dict(rollout_logp=_f(B, T + 1)),
        VE, "rollout_logp"),
    row("rollout_correction", "shape", "old_logp 3-d", lambda v: dict(old_logp=_f(B, T, 2)), VE, "old_logp"),
    row("rollout_correction", "shape", "mask [B, T+1]", lambda v: dict(mask=_mask(B, T + 1)), VE, "mask"),
    row("rollout_correction", "shape", "old_logp [B, T] with cu_seqlens",
        lambda v: dict(cu_seqlens=torch.tensor([0, B * T])), VE, "old_logp"),
    row("rollout_correction", "dtype", "old_logp int64", lambda v: dict(old_logp=torch.zeros(B, T, dtype=torch.long)),
        TE, "old_logp"),
    row("rollout_correction", "dtype", "rollout_logp int64",
        lambda v: dict(rollout_logp=torch.zeros(B, T, dtype=torch.long)), TE, "rollout_logp"),
    row("rollout_correction", "device", "rollout_logp on another device",
        lambda v: dict(rollout_logp=_meta(v["rollout_logp"])), VE, "rollout_logp"),
    row("rollout_correction", "device", "mask on another device", lambda v: dict(mask=_meta(v["mask"])), VE, "mask"),
    row("rollout_correction", "range", "threshold=-1", lambda v: dict(threshold=-1.0), VE, "threshold"),
    row("rollout_correction", "range", "threshold=(2, 0.5) (bounds inverted)", lambda v: dict(threshold=(2.0, 0.5)),
        VE, "threshold"),
    row("rollout_correction", "range", "rejection={'token_k1': 0.5} (bounds (2, 0.5))",
        lambda v: dict(rejection={"token_k1": 0.5}), VE, "rejection"),
    row("rollout_correction", "range", "rejection={'seq_mean_k3': 0}", lambda v: dict(rejection={"seq_mean_k3": 0.0}),
        VE, "rejection"),
    row("rollout_correction", "range", "ratio_log_clamp=0", lambda v: dict(ratio_log_clamp=0.0), VE, "ratio_log_clamp"),
    row("rollout_correction", "range", "a mask value 2", lambda v: dict(mask=_with_first(v["mask"].long(), 2)),
        VE, "mask"),
    row("rollout_correction", "non-finite", "threshold=nan", lambda v: dict(threshold=float("nan")), VE, "threshold"),
    row("rollout_correction", "non-finite", "threshold=(0.5, inf)", lambda v: dict(threshold=(0.5, float("inf"))),
        VE, "threshold"),
    row("rollout_correction", "non-finite", "rejection={'token_k2': inf}",
        lambda v: dict(rejection={"token_k2": float("inf")}), VE, "rejection"),
    row("rollout_correction", "non-finite", "a NaN mask value", lambda v: dict(mask=_with_first(v["mask"].float())),
        VE, "mask"),
    row("rollout_correction", "option", "level='row'", lambda v: dict(level="row"), VE, "level"),
    row("rollout_correction", "option", "mode='clip'", lambda v: dict(mode="clip"), VE, "mode"),
    row("rollout_correction", "option", "threshold='2.0'", lambda v: dict(threshold="2.0"), TE, "threshold"),
    row("rollout_correction", "option", "rejection={'seq_max_k1': 2} (no such criterion)",
        lambda v: dict(rejection={"seq_max_k1": 2.0}), VE, "rejection"),
    row("rollout_correction", "option", "rejection='token_k1' (a string, not a dict)",
        lambda v: dict(rejection="token_k1"), TE, "rejection"),
    row("rollout_correction", "option", "rejection={'token_k3': (0.1, 0.2)} (a pair for k3)",
        lambda v: dict(rejection={"token_k3": (0.1, 0.2)}), TE, "rejection"),
    row("rollout_correction", "option", "batch_normalize='yes'", lambda v: dict(batch_normalize="yes"),
        TE, "batch_normalize"),
    row("policy_loss", "option", "rollout_logp with rollout_is_weights",
        lambda v: dict(rollout_logp=v["old_logp"], rollout_is_weights=torch.ones(B, T)), VE, "rollout_is_weights"),
    row("policy_loss", "option", "rollout_correction without rollout_logp",
        lambda v: dict(rollout_correction={"level": "sequence"}), VE, "rollout_logp"),
    row("policy_loss", "option", "rollout_correction={'bogus': 1}",
        lambda v: dict(rollout_logp=v["old_logp"], rollout_correction={"bogus": 1}), TE, "rollout_correction"),
    row("policy_loss", "shape", "rollout_logp [B, T+1]", lambda v: dict(rollout_logp=_f(B, T + 1)), VE, "rollout_logp"),
    row("fused_policy_loss", "option", "rollout_correction={'level': 'row'}",
        lambda v: dict(rollout_logp=v["old_logp"], rollout_correction={"level": "row"}), VE, "level"),
    row("fused_linear_policy_loss", "option", "rollout_logp with rollout_is_weights",
        lambda v: dict(rollout_logp=v["old_logp"], rollout_is_weights=torch.ones(B, T)), VE, "rollout_is_weights"),

    # ---- simpo_loss
    row("simpo_loss", "shape", "policy_rejected_logps [B+1]", lambda v: dict(policy_rejected_logps=_f(B + 1)),
        VE, "policy_rejected_logps"),
    row("simpo_loss", "shape", "rejected_lengths [B+1]", lambda v: dict(rejected_lengths=torch.full((B + 1,), 3)),
        VE, "rejected_lengths"),
    row("simpo_loss", "dtype", "policy_chosen_logps int64", lambda v: dict(policy_chosen_logps=torch.zeros(B).long()),
        TE, "policy_chosen_logps"),
    row("simpo_loss", "device", "policy_rejected_logps on another device",
        lambda v: dict(policy_rejected_logps=_meta(v["policy_rejected_logps"])), VE, "policy_rejected_logps"),
    row("simpo_loss", "device", "chosen_lengths on another device",
        lambda v: dict(chosen_lengths=_meta(v["chosen_lengths"])), VE, "chosen_lengths"),
    row("simpo_loss", "range", "beta=0", lambda v: dict(beta=0.0), VE, "beta"),
    row("simpo_loss", "range", "simpo_gamma=-0.5", lambda v: dict(simpo_gamma=-0.5), VE, "simpo_gamma"),
    row("simpo_loss", "range", "label_smoothing=0.6", lambda v: dict(label_smoothing=0.6), VE, "label_smoothing"),
    row("simpo_loss", "range", "cpo_alpha=-1", lambda v: dict(cpo_alpha=-1.0), VE, "cpo_alpha"),
    row("simpo_loss", "range", "a negative rejected length",
        lambda v: dict(rejected_lengths=torch.tensor([3, -1, 3, 3])), VE, "rejected_lengths"),
    row("simpo_loss", "non-finite", "simpo_gamma=nan", lambda v: dict(simpo_gamma=float("nan")), VE, "simpo_gamma"),
    row("simpo_loss", "non-finite", "beta=inf", lambda v: dict(beta=float("inf")), VE, "beta"),
    row("simpo_loss", "option", "chosen_lengths=None", lambda v: dict(chosen_lengths=None), VE, "chosen_lengths"),
    row("simpo_loss", "option", "simpo_gamma='0.5'", lambda v: dict(simpo_gamma="0.5"), TE, "simpo_gamma"),

    # ---- cpo_loss
    row("cpo_loss", "shape", "policy_chosen_logps [B, 1]", lambda v: dict(policy_chosen_logps=_f(B, 1)),
        VE, "policy_chosen_logps"),
    row("cpo_loss", "shape", "chosen_lengths [B+1]", lambda v: dict(chosen_lengths=torch.full((B + 1,), 3)),
        VE, "chosen_lengths"),
    row("cpo_loss", "dtype", "policy_rejected_logps int64",
        lambda v: dict(policy_rejected_logps=torch.zeros(B).long()), TE, "policy_rejected_logps"),
    row("cpo_loss", "device", "chosen_lengths on another device",
        lambda v: dict(chosen_lengths=_meta(v["chosen_lengths"])), VE, "chosen_lengths"),
    row("cpo_loss", "range", "beta=-0.1", lambda v: dict(beta=-0.1), VE, "beta"),
    row("cpo_loss", "range", "label_smoothing=-0.1", lambda v: dict(label_smoothing=-0.1), VE, "label_smoothing"),
    row("cpo_loss", "range", "cpo_alpha=-0.5", lambda v: dict(cpo_alpha=-0.5), VE, "cpo_alpha"),
    row("cpo_loss", "non-finite", "cpo_alpha=inf", lambda v: dict(cpo_alpha=float("inf")), VE, "cpo_alpha"),
    row("cpo_loss", "option", "chosen_lengths=None with cpo_alpha=1 (the NLL term's token count)",
        lambda v: dict(chosen_lengths=None), VE, "chosen_lengths"),
    row("cpo_loss", "option", "label_smoothing='0'", lambda v: dict(label_smoothing="0"), TE, "label_smoothing"),

    # ---- kto_loss
    row("kto_loss", "shape", "desirable [B+1]", lambda v: dict(desirable=torch.ones(B + 1, dtype=torch.bool)),
        VE, "desirable"),
    row("kto_loss", "shape", "ref_logps [B+1]", lambda v: dict(ref_logps=_f(B + 1)), VE, "ref_logps"),
    row("kto_loss", "shape", "policy_kl_logps 2-d",
        lambda v: dict(kl=None, policy_kl_logps=_f(B, 1), ref_kl_logps=_f(B, 1)), VE, "policy_kl_logps"),
    row("kto_loss", "dtype", "policy_logps int64", lambda v: dict(policy_logps=torch.zeros(B).long()),
        TE, "policy_logps"),
    row("kto_loss", "dtype", "kl an int64 tensor", lambda v: dict(kl=torch.tensor(0)), TE, "kl"),
    row("kto_loss", "device", "desirable on another device", lambda v: dict(desirable=_meta(v["desirable"])),
        VE, "desirable"),
    row("kto_loss", "device", "kl on another device", lambda v: dict(kl=torch.tensor(0.1, device="meta")), VE, "kl"),
    row("kto_loss", "range", "a desirable value 2", lambda v: dict(desirable=torch.tensor([1, 0, 2, 0])),
        VE, "desirable"),
    row("kto_loss", "range", "desirable_weight=-1", lambda v: dict(desirable_weight=-1.0), VE, "desirable_weight"),
    row("kto_loss", "range", "beta=0", lambda v: dict(beta=0.0), VE, "beta"),
    row("kto_loss", "non-finite", "kl=nan", lambda v: dict(kl=float("nan")), VE, "kl"),
    row("kto_loss", "non-finite", "undesirable_weight=inf", lambda v: dict(undesirable_weight=float("inf")),
        VE, "undesirable_weight"),
    row("kto_loss", "option", "loss_type='kto_pair'", lambda v: dict(loss_type="kto_pair"), VE, "loss_type"),
    row("kto_loss", "option", "no reference point (kl=None, no KL log-probs)", lambda v: dict(kl=None), VE, "kl"),
    row("kto_loss", "option", "kl with loss_type='apo_zero_unpaired'",
        lambda v: dict(loss_type="apo_zero_unpaired"), VE, "kl"),
    row("kto_loss", "option", "policy_kl_logps without ref_kl_logps",
        lambda v: dict(kl=None, policy_kl_logps=_f(B)), VE, "ref_kl_logps"),

    # ---- fused_linear_simpo_loss
    row("fused_linear_simpo_loss", "shape", "hidden with an odd number of rows (2B: chosen, then rejected)",
        lambda v: dict(hidden=_f(B - 1, T, H), labels=_labels(B - 1, T)), VE, "hidden"),
    row("fused_linear_simpo_loss", "shape", "weight 1-d", lambda v: dict(weight=_f(V)), VE, "weight"),
    row("fused_linear_simpo_loss", "dtype", "labels float", lambda v: dict(labels=v["labels"].float()), TE, "labels"),
    row("fused_linear_simpo_loss", "device", "weight on another device", lambda v: dict(weight=_meta(v["weight"])),
        VE, "weight"),
    row("fused_linear_simpo_loss", "range", "simpo_gamma=-1", lambda v: dict(simpo_gamma=-1.0), VE, "simpo_gamma"),
    row("fused_linear_simpo_loss", "range", "a label = V", lambda v: dict(labels=_with_first(v["labels"], V)),
        VE, "labels"),
    row("fused_linear_simpo_loss", "non-finite", "beta=nan", lambda v: dict(beta=float("nan")), VE, "beta"),
    row("fused_linear_simpo_loss", "option", "backend='nope'", lambda v: dict(backend="nope"), VE, "backend"),

    # ---- fused_linear_cpo_loss
    row("fused_linear_cpo_loss", "shape", "labels [B, T+1]", lambda v: dict(labels=_labels(B, T + 1)), VE, "labels"),
    row("fused_linear_cpo_loss", "dtype", "hidden int64", lambda v: dict(hidden=torch.zeros(B, T, H).long()),
        TE, "hidden"),
    row("fused_linear_cpo_loss", "device", "mask on another device", lambda v: dict(mask=_meta(_mask(B, T))),
        VE, "mask"),
    row("fused_linear_cpo_loss", "range", "label_smoothing=0.7", lambda v: dict(label_smoothing=0.7),
        VE, "label_smoothing"),
    row("fused_linear_cpo_loss", "range", "cpo_alpha=-0.5", lambda v: dict(cpo_alpha=-0.5), VE, "cpo_alpha"),
    row("fused_linear_cpo_loss", "non-finite", "temperature=inf", lambda v: dict(temperature=float("inf")),
        VE, "temperature"),
    row("fused_linear_cpo_loss", "option", "backend='cuda' on CPU tensors", lambda v: dict(backend="cuda"),
        BUE, "backend"),

    # ---- distill_loss
    row("distill_loss", "shape", "teacher_logits [B, T, V+1]", lambda v: dict(teacher_logits=_f(B, T, V + 1)), VE,
        "teacher_logits"),
    row("distill_loss", "shape", "labels [B, T+1]", lambda v: dict(labels=_labels(B, T + 1)), VE, "labels"),
    row("distill_loss", "dtype", "labels float", lambda v: dict(labels=v["labels"].float()), TE, "labels"),
    row("distill_loss", "dtype", "teacher_logits float64 (student float32)",
        lambda v: dict(teacher_logits=v["teacher_logits"].double()), VE, "teacher_logits"),
    row("distill_loss", "device", "teacher_logits on another device",
        lambda v: dict(teacher_logits=_meta(v["teacher_logits"])), VE, "teacher_logits"),
    row("distill_loss", "range", "beta=1.5", lambda v: dict(divergence="jsd", beta=1.5), VE, "beta"),
    row("distill_loss", "range", "temperature=0", lambda v: dict(temperature=0.0), VE, "temperature"),
    row("distill_loss", "range", "a mask value 2", lambda v: dict(mask=torch.full((B, T), 2)), VE, "mask"),
    row("distill_loss", "non-finite", "beta=nan", lambda v: dict(beta=float("nan")), VE, "beta"),
    row("distill_loss", "non-finite", "temperature=inf", lambda v: dict(temperature=float("inf")), VE, "temperature"),
    row("distill_loss", "option", "divergence='kl'", lambda v: dict(divergence="kl"), VE, "divergence"),
    row("distill_loss", "option", "agg='mean'", lambda v: dict(agg="mean"), VE, "agg"),
    row("distill_loss", "option", "backend='nope'", lambda v: dict(backend="nope"), VE, "backend"),
    # ---- fused_linear_distill_loss
    row("fused_linear_distill_loss", "shape", "teacher_weight with another V",
        lambda v: dict(teacher_weight=_f(V + 1, H + 1)), VE, "teacher_weight"),
    row("fused_linear_distill_loss", "shape", "student_weight 1-d", lambda v: dict(student_weight=_f(V)), VE,
        "student_weight"),
    row("fused_linear_distill_loss", "shape", "teacher_hidden with other tokens",
        lambda v: dict(teacher_hidden=_f(B, T + 1, H + 1)), VE, "teacher_hidden"),
    row("fused_linear_distill_loss", "dtype", "student_weight int64",
        lambda v: dict(student_weight=torch.zeros(V, H).long()), TE, "student_weight"),
    row("fused_linear_distill_loss", "device", "teacher_hidden on another device",
        lambda v: dict(teacher_hidden=_meta(v["teacher_hidden"])), VE, "teacher_hidden"),
    row("fused_linear_distill_loss", "range", "beta=-0.1", lambda v: dict(divergence="jsd", beta=-0.1), VE, "beta"),
    row("fused_linear_distill_loss", "non-finite", "temperature=nan", lambda v: dict(temperature=float("nan")), VE,
        "temperature"),
    row("fused_linear_distill_loss", "option", "chunk_size=0", lambda v: dict(chunk_size=0), VE, "chunk_size"),
    row("fused_linear_distill_loss", "option", "divergence='tv'", lambda v: dict(divergence="tv"), VE, "divergence"),
    # ---- fused_linear_kto_loss
    row("fused_linear_kto_loss", "shape", "desirable [B+1]",
        lambda v: dict(desirable=torch.ones(B + 1, dtype=torch.bool)), VE, "desirable"),
    row("fused_linear_kto_loss", "shape", "ref_logps [B+1]", lambda v: dict(ref_logps=_f(B + 1)), VE, "ref_logps"),
    row("fused_linear_kto_loss", "dtype", "weight int64", lambda v: dict(weight=torch.zeros(V, H).long()),
        TE, "weight"),
    row("fused_linear_kto_loss", "device", "ref_logps on another device",
        lambda v: dict(ref_logps=_meta(v["ref_logps"])), VE, "ref_logps"),
    row("fused_linear_kto_loss", "range", "a desirable value 2", lambda v: dict(desirable=torch.tensor([1, 0, 2, 0])),
        VE, "desirable"),
    row("fused_linear_kto_loss", "range", "undesirable_weight=-1", lambda v: dict(undesirable_weight=-1.0),
        VE, "undesirable_weight"),
    row("fused_linear_kto_loss", "non-finite", "kl=inf", lambda v: dict(kl=float("inf")), VE, "kl"),
    row("fused_linear_kto_loss", "option", "loss_type='nope'", lambda v: dict(loss_type="nope"), VE, "loss_type"),
    row("fused_linear_kto_loss", "option", "no reference point (kl=None, no KL log-probs)", lambda v: dict(kl=None),
        VE, "kl"),
    # ---- opo_advantages
    row("opo_advantages", "shape", "mask [B+1, T]", lambda v: dict(mask=_mask(B + 1, T)), VE, "mask"),
    row("opo_advantages", "dtype", "rewards complex", lambda v: dict(rewards=v["rewards"].to(torch.complex64)),
        TE, "rewards"),
    row("opo_advantages", "device", "mask on another device", lambda v: dict(mask=_meta(v["mask"])), VE, "mask"),
    row("opo_advantages", "device", "lengths on another device",
        lambda v: dict(mask=None, lengths=_meta(torch.full((B,), 3.0))), VE, "lengths"),
    row("opo_advantages", "range", "a negative length",
        lambda v: dict(mask=None, lengths=torch.tensor([3.0, -1, 2, 2])), VE, "lengths"),
    row("opo_advantages", "range", "a mask value 2", lambda v: dict(mask=_with_first(v["mask"].long(), 2)), VE, "mask"),
    row("opo_advantages", "non-finite", "an inf reward",
        lambda v: dict(rewards=_with_first(v["rewards"], float("inf"))), VE, "rewards"),
    row("opo_advantages", "non-finite", "a NaN length",
        lambda v: dict(mask=None, lengths=_with_first(torch.full((B,), 3.0))), VE, "lengths"),
    row("opo_advantages", "option", "singleton='nope'", lambda v: dict(singleton="nope"), VE, "singleton"),
    row("opo_advantages", "option", "both mask and lengths", lambda v: dict(lengths=torch.full((B,), 3.0)),
        VE, "lengths"),
    # ---- grpo_passk_advantages
    row("grpo_passk_advantages", "shape", "rewards [B, 2]", lambda v: dict(rewards=_f(B, 2)), VE, "rewards"),
    row("grpo_passk_advantages", "dtype", "rewards complex",
        lambda v: dict(rewards=v["rewards"].to(torch.complex64)), TE, "rewards"),
    row("grpo_passk_advantages", "device", "group_ids on another device",
        lambda v: dict(group_size=None, group_ids=_meta(torch.tensor([0, 0, 1, 1]))), VE, "group_ids"),
    row("grpo_passk_advantages", "range", "std_eps=-1", lambda v: dict(std_eps=-1.0), VE, "std_eps"),
    row("grpo_passk_advantages", "non-finite", "an inf reward",
        lambda v: dict(rewards=_with_first(v["rewards"], float("inf"))), VE, "rewards"),
    row("grpo_passk_advantages", "option", "scale='batch'", lambda v: dict(scale="batch"), VE, "scale"),
    # ---- gdpo_advantages
    row("gdpo_advantages", "shape", "weights [3] for K=2", lambda v: dict(weights=[1.0, 1.0, 1.0]), VE, "weights"),
    row("gdpo_advantages", "shape", "rewards [B, 2, 2]", lambda v: dict(rewards=_f(B, 2, 2)), VE, "rewards"),
    row("gdpo_advantages", "dtype", "rewards complex",
        lambda v: dict(rewards=v["rewards"].to(torch.complex64)), TE, "rewards"),
    row("gdpo_advantages", "device", "mask on another device", lambda v: dict(mask=_meta(v["mask"])), VE, "mask"),
    row("gdpo_advantages", "range", "var_eps=-1", lambda v: dict(var_eps=-1.0), VE, "var_eps"),
    row("gdpo_advantages", "non-finite", "an inf reward",
        lambda v: dict(rewards=_with_first(v["rewards"], float("inf"))), VE, "rewards"),
    row("gdpo_advantages", "non-finite", "a NaN weight", lambda v: dict(weights=[float("nan"), 1.0]), VE, "weights"),
    row("gdpo_advantages", "option", "scale='batch'", lambda v: dict(scale="batch"), VE, "scale"),
    row("gdpo_advantages", "option", "var_eps_mode='outside'", lambda v: dict(var_eps_mode="outside"), VE,
        "var_eps_mode"),
    # ---- optimal_token_baseline_advantages
    row("optimal_token_baseline_advantages", "shape", "sum_pi_squared [B, T+1]",
        lambda v: dict(sum_pi_squared=_f(B, T + 1, lo=0.5, hi=1)), VE, "sum_pi_squared"),
    row("optimal_token_baseline_advantages", "shape", "token_rewards [B]",
        lambda v: dict(token_rewards=_f(B), old_logp=_f(B), sum_pi_squared=_f(B), mask=None), VE, "token_rewards"),
    row("optimal_token_baseline_advantages", "dtype", "old_logp complex",
        lambda v: dict(old_logp=v["old_logp"].to(torch.complex64)), TE, "old_logp"),
    row("optimal_token_baseline_advantages", "device", "old_logp on another device",
        lambda v: dict(old_logp=_meta(v["old_logp"])), VE, "old_logp"),
    row("optimal_token_baseline_advantages", "range", "weight_eps=-1", lambda v: dict(weight_eps=-1.0), VE,
        "weight_eps"),
    row("optimal_token_baseline_advantages", "range", "a negative sum_pi_squared",
        lambda v: dict(sum_pi_squared=_with_first(v["sum_pi_squared"], -0.5)), VE, "sum_pi_squared"),
    row("optimal_token_baseline_advantages", "non-finite", "a NaN old_logp",
        lambda v: dict(old_logp=_with_first(v["old_logp"])), VE, "old_logp"),
    row("optimal_token_baseline_advantages", "option", "align='turn'", lambda v: dict(align="turn"), VE, "align"),
    row("optimal_token_baseline_advantages", "option", "zero_tail=1", lambda v: dict(zero_tail=1), TE, "zero_tail"),
]

# (function, class) pairs without a row, and why.
NOT_APPLICABLE: dict[tuple[str, str], str] = {
    ("available_backends", "shape"): "takes no tensor",
    ("available_backends", "dtype"): "takes no tensor",
    ("available_backends", "device"): "the device is the question, not an input to match",
    ("available_backends", "range"): "no numeric argument",
    ("available_backends", "non-finite"): "no numeric argument",
    ("chord_mu_schedule", "shape"): "takes no tensor",
    ("chord_mu_schedule", "dtype"): "takes no tensor (the wrong-type rows are under option)",
    ("chord_mu_schedule", "device"): "takes no tensor",
    ("log1mexp", "shape"): "elementwise: any shape",
    ("log1mexp", "device"): "one tensor argument: the result is on its device",
    ("vapo_lambda", "device"): "one tensor argument: the result is on its device",
    ("dapo_overlong_penalty", "device"): "one tensor argument: the result is on its device",
    ("semantic_entropy", "non-finite"): "cluster ids are integers",
    ("k1_penalty", "non-finite"): "the log-probs are not checked for NaN/inf (no such check is documented)",
}


# --------------------------------------------------------------------------------------------
# the tests


def _public_functions() -> list[str]:
    """The public functions, in the order of alignops.__all__ (classes, NamedTuples and constants left out)."""
    return [n for n in ao.__all__ if inspect.isfunction(getattr(ao, n))]


def _kwargs(r: Bad) -> dict:
    kwargs = VALID[r.fn]()
    kwargs.update(r.bad(kwargs))
    return kwargs


def _names(message: str, name: str) -> bool:
    """`message` names the argument `name` as a word of its own (`mask` is not named by `expert_mask`)."""
    return re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", message) is not None


@pytest.fixture(autouse=True)
def _no_backend_override(monkeypatch):
    monkeypatch.delenv("ALIGNOPS_BACKEND", raising=False)


@pytest.mark.parametrize("fn", list(VALID))
def test_valid_inputs_run(fn):
    """The otherwise-valid inputs of every row are valid: the one bad argument is what each row tests."""
    getattr(ao, fn)(**VALID[fn]())


@pytest.mark.parametrize("r", BAD, ids=[r.id for r in BAD])
def test_bad_input(r):
    kwargs = _kwargs(r)
    with pytest.raises(Exception) as info:
        getattr(ao, r.fn)(**kwargs)
    e = info.value
    assert type(e) is r.exc, f"{r.fn} with {r.what}: raised {type(e).__name__}: {e}; the table says {r.exc.__name__}"
    assert _names(str(e), r.names), f"{r.fn} with {r.what}: the message does not name {r.names!r}: {e}"


def test_table_covers_every_public_function():
    public = _public_functions()
    assert sorted(VALID) == sorted(public), "every public function needs valid inputs and rows here"
    rows = {(r.fn, r.kind) for r in BAD}
    for fn in public:
        for kind in KINDS:
            assert ((fn, kind) in rows) != ((fn, kind) in NOT_APPLICABLE), \
                f"({fn}, {kind}) needs a row or a NOT_APPLICABLE reason, not both"
    assert set(NOT_APPLICABLE) <= {(fn, k) for fn in public for k in KINDS}
    assert len({r.id for r in BAD}) == len(BAD), "row ids must be unique"
    for r in BAD:
        assert r.kind in KINDS, r
        inspect.signature(getattr(ao, r.fn)).bind(**_kwargs(r))  # the bad argument is one of the function's


# --------------------------------------------------------------------------------------------
# docs/errors.md


def _exc_name(exc: type) -> str:
    return f"alignops.{exc.__name__}" if exc.__module__.startswith("alignops") else exc.__name__


def render() -> str:
    """docs/errors.md: the table, one section per public function."""
    public = _public_functions()
    out = [
        "# Bad inputs and the errors they raise",
        "",
        "<!-- Generated from tests/test_errors.py (BAD, NOT_APPLICABLE, render()); do not edit by hand.",
        "     Regenerate: ALIGNOPS_WRITE_ERRORS_DOC=1 python -m pytest tests/test_errors.py -->",
        "",
        "Generated from the table in `tests/test_errors.py`: every row there is a test that calls the",
        "function with small valid inputs and the one bad input, and checks the exception type and that",
        "the message names the argument; a test checks that this page is that table's rendering. After",
        "changing the table, regenerate this page with",
        "`ALIGNOPS_WRITE_ERRORS_DOC=1 python -m pytest tests/test_errors.py`.",
        "",
        "The rule (docs/design.md, Errors): bad input gives a clear error naming the argument; degenerate",
        "valid input (a fully masked batch, a group of equal rewards) gives a correct finite answer; a",
        "named backend that cannot run raises `alignops.BackendUnavailableError`.",
        "",
        "Classes of bad input: **shape**, **dtype**, **device** (a tensor on another device than the",
        "others), **range** (values or bounds outside what the argument allows), **non-finite** (NaN or",
        "inf where the function checks for them), **option** (an unknown name, a missing companion",
        "argument, a keyword of the wrong type). The rows run on CPU tensors, where value checks (labels",
        "in range, masks 0/1, rewards finite, ...) are free; on GPU tensors labels and masks are checked",
        "with `validate_labels=True` / `validate_mask=True` (docs/api.md). Tensor values not listed",
        "under non-finite are not checked for NaN/inf (for the logits, docs/api.md: without",
        "`check_finite=True`, \"non-finite logits give non-finite outputs for those rows, never a crash\").",
        "",
        f"{len(public)} functions, {len(BAD)} rows.",
        "",
        "| function | rows | classes without a row |",
        "|---|---|---|",
    ]
    for fn in public:
        na = [k for k in KINDS if (fn, k) in NOT_APPLICABLE]
        out.append(f"| [`{fn}`](#{fn}) | {sum(r.fn == fn for r in BAD)} | {', '.join(na) or '–'} |")
    for fn in public:
        out += ["", f"## {fn}", "", "| class | bad input | exception | message names |", "|---|---|---|---|"]
        for kind in KINDS:
            for r in BAD:
                if r.fn == fn and r.kind == kind:
                    what = r.what.replace("|", "\\|")
                    out.append(f"| {kind} | {what} | `{_exc_name(r.exc)}` | `{r.names}` |")
        na = [(k, NOT_APPLICABLE[(fn, k)]) for k in KINDS if (fn, k) in NOT_APPLICABLE]
        if na:
            out += ["", "Without a row: " + "; ".join(f"{k}: {why}" for k, why in na) + "."]
    return "\n".join(out) + "\n"


def test_errors_doc_is_rendered_from_the_table():
    doc = checkout_root() / "docs" / "errors.md"  # docs/ is not in the wheel: skipped without a checkout
    text = render()
    if os.environ.get("ALIGNOPS_WRITE_ERRORS_DOC") == "1":
        doc.write_text(text)
    regenerate = "ALIGNOPS_WRITE_ERRORS_DOC=1 python -m pytest tests/test_errors.py"
    assert doc.exists(), f"docs/errors.md is missing: {regenerate}"
    assert doc.read_text() == text, f"docs/errors.md differs from the table in tests/test_errors.py: {regenerate}"
