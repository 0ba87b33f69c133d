"""CHORD (alignops/train/loops/chord.py, docs/methods.md §2.29): the mixed batch's expert share,
mu = 0 is the on-policy GRPO gradient and mu = 1 the expert rows' SFT gradient (both by hand in
float64), the mu schedule against the docs formula, bad options, both presets end to end."""

import copy
import math
import os
import random

import pytest
import torch

from alignops.train import checkpoint as ckpt
from alignops.train.loops import chord
from alignops.train.loops.base import Run, parse_options
from alignops.train.presets import make_config
from alignops.train.rewards import RewardModel
from alignops.train.rollout import GroupSeeds, sequence_logits
from alignops.train.tasks import AdditionTask
from alignops.train.trainer import setup, train

MICRO = dict(hidden_size=32, num_layers=1, num_prompts=2, num_generations=4, max_completion_length=3,
             eval_size=8, eval_every=100, init_from="none", progress=False, max_steps=2)


@pytest.fixture
def varied_rewards(monkeypatch):
    """A random micro-policy almost never solves a sum: reward completion length parity instead."""
    monkeypatch.setattr(AdditionTask, "reward", lambda self, problem, completion: float(len(completion) % 2))


def micro(method, tmp_path, **overrides):
    return make_config(method, {**MICRO, "output_dir": str(tmp_path / method), **overrides})


def build_loop(tmp_path, method="chord_mu", **loop_kwargs):
    cfg = micro(method, tmp_path)
    task, tok, policy = setup(cfg)
    run = Run(cfg, task, tok, policy, torch.optim.AdamW(policy.parameters()), random.Random(0), GroupSeeds(0, "cpu"),
              RewardModel(cfg.reward_funcs, cfg.reward_weights), str(tmp_path))
    kwargs = {**cfg.loop_kwargs, **loop_kwargs}
    return run, chord.CHORDLoop(run, parse_options(chord.CHORDLoop, kwargs, method))


def grads(policy, loss):
    policy.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.detach().double().clone() for n, p in policy.named_parameters() if p.grad is not None}


def token_logp64(policy, batch):
    logits = sequence_logits(policy, batch).double()
    return torch.log_softmax(logits, -1).gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)


def assert_same(got, want):
    assert got.keys() == want.keys()
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6)


def test_mixed_batch_has_the_expert_share(tmp_path, varied_rewards):
    run, loop = build_loop(tmp_path)
    batch, expert_mask, rewards, _ = loop.mixed_batch()
    assert batch.input_ids.shape[0] == 10 and expert_mask.tolist() == [False] * 8 + [True] * 2   # 2 / 10 = 0.2
    assert rewards.shape == (8,)
    assert [chord.expert_rows(n, 0.2) for n in (8, 128, 1)] == [2, 32, 0]
    assert chord.expert_rows(8, 0.0) == 0 and chord.expert_rows(6, 0.5) == 6


def test_mu_zero_is_on_policy_grpo_gradient(tmp_path, varied_rewards):
    run, loop = build_loop(tmp_path)
    batch, expert_mask, rewards, _ = loop.mixed_batch()
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])   # both groups informative
    got = grads(run.policy, loop.loss(batch, expert_mask, rewards, 0.0).loss)
    # by hand: A = (r - mean_g) / (unbiased std_g + 1e-6); at ratio 1 the clipped surrogate's gradient is
    # -(1/N) sum_{rollout tokens} A_i grad logp
    r = rewards.double().view(2, 4)
    adv = ((r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-6)).view(-1)
    mask = batch.completion_mask.double()[:8]
    logp = token_logp64(run.policy, batch)[:8]
    want = grads(run.policy, -(adv[:, None] * logp * mask).sum() / mask.sum())
    assert_same(got, want)


def test_mu_one_is_sft_on_the_expert_rows(tmp_path, varied_rewards):
    run, loop = build_loop(tmp_path)
    batch, expert_mask, rewards, _ = loop.mixed_batch()
    got = grads(run.policy, loop.loss(batch, expert_mask, rewards, 1.0).loss)
    mask = batch.completion_mask.double()[8:]
    logp = token_logp64(run.policy, batch)[8:]
    want = grads(run.policy, -(logp * mask).sum() / mask.sum())
    assert_same(got, want)


def test_phi_expert_loss_weights_tokens_by_p_one_minus_p(tmp_path, varied_rewards):
    run, loop = build_loop(tmp_path, "chord_phi")
    batch, expert_mask, rewards, _ = loop.mixed_batch()
    got = grads(run.policy, loop.loss(batch, expert_mask, rewards, 1.0).loss)
    mask = batch.completion_mask.double()[8:]
    logp = token_logp64(run.policy, batch)[8:]
    p = logp.detach().exp()
    want = grads(run.policy, -(p * (1 - p) * logp * mask).sum() / mask.sum())
    assert_same(got, want)


def docs_mu(s, peak, valley, warmup, decay):
    if s < warmup:
        return s / warmup * peak
    if s >= warmup + decay:
        return valley
    return (peak - valley) * 0.5 * (1 + math.cos(math.pi * (s - warmup) / decay)) + valley


@pytest.mark.parametrize("step, expected", [(0, 0.9), (100, 0.475), (200, 0.05), (500, 0.05)])
def test_mu_variant_schedule(step, expected):
    opts = chord.CHORDOptions(variant="mu")
    assert opts.mu(step) == pytest.approx(expected, abs=1e-12)      # hand values: 0.85 * 0.5 + 0.05 at 100
    assert opts.mu(step) == pytest.approx(docs_mu(step, 0.9, 0.05, 0, 200), abs=1e-12)


def test_phi_variant_constant_mu_and_custom_schedule():
    phi = chord.CHORDOptions(variant="phi")
    assert [phi.mu(s) for s in (0, 1, 50, 10_000)] == [0.1] * 4 and phi.sft_weighting == "chord_phi"
    custom = chord.CHORDOptions(variant="mu", mu_peak=0.5, mu_valley=0.1, mu_warmup_steps=10, mu_decay_steps=20)
    for s in (0, 5, 10, 17, 30, 31):
        assert custom.mu(s) == pytest.approx(docs_mu(s, 0.5, 0.1, 10, 20), abs=1e-12)


@pytest.mark.parametrize("method", ["chord_mu", "chord_phi"])
def test_preset_runs_and_updates(method, tmp_path, varied_rewards):
    cfg = micro(method, tmp_path)
    before = copy.deepcopy(setup(cfg)[2].state_dict())
    rows = [r for r in train(cfg)["log"] if "loss" in r]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)
    assert [r["chord/mu"] for r in rows] == pytest.approx(
        [docs_mu(s, 0.9, 0.05, 0, 200) for s in (0, 1)] if method == "chord_mu" else [0.1, 0.1], abs=1e-6)
    assert all(0.0 <= r["reward"] <= 1.0 and r["chord/expert_rows"] == 2 for r in rows)
    after = setup(cfg)[2]
    ckpt.load_model_weights(cfg.resolved_output_dir(), after)
    assert any(not torch.equal(before[k], after.state_dict()[k]) for k in before)


@pytest.mark.parametrize("overrides, match", [
    ({"loop_kwargs": {"variant": "nu"}}, "method 'chord_mu': variant must be one of"),
    ({"loop_kwargs": {"expert_ratio": 1.0}}, "method 'chord_mu': expert_ratio must be in"),
    ({"loop_kwargs": {"mu_peak": 1.5}}, "method 'chord_mu': mu_peak must be in"),
    ({"loop_kwargs": {"mu_decay_steps": -1}}, "method 'chord_mu': mu_decay_steps must be >= 0"),
    ({"loop_kwargs": {"sft_weighting": "dft"}}, "method 'chord_mu': sft_weighting must be one of"),
    ({"loop_kwargs": {"cutoff_prob": 0.0}}, "method 'chord_mu': cutoff_prob must be in"),
    ({"beta": 0.1}, "--beta must be 0"),
    ({"loss_method": "cispo"}, "--loss_method must be 'grpo'"),
])
def test_bad_options_fail_before_training(overrides, match, tmp_path):
    cfg = micro("chord_mu", tmp_path, **overrides)
    with pytest.raises(ValueError, match=match):
        train(cfg)
    assert not os.path.exists(os.path.join(cfg.resolved_output_dir(), "metrics.jsonl"))
